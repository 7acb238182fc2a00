"""DPO training throughput: this project's DPO vs TRL's DPOTrainer, in one process, on the same work.

    uv run --group bench benchmarks/bench_dpo.py [--steps 40] [--batch 16] [--repeats 3]

Same model (the offline preset's base GPT-2, built if missing, or ``--model DIR``), same preference pairs
(prompt and completions decoded to text for TRL, which re-tokenises them), batch size, max length, beta,
learning rate and schedule (linear warmup, then constant), gradient clipping, fp32 on the CPU, no gradient
checkpointing, seed and step count. TRL runs twice: with its defaults (a reference forward at every
step) and with ``precompute_ref_log_probs=True``; the precompute pass is inside the timed region, as our
reference pass is. Prints one table and one JSON line; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

import dataset  # noqa: E402
import train_dpo  # noqa: E402
from config import PRESETS  # noqa: E402
from eval_utils import EvalKit  # noqa: E402
from models import load_causal_lm, load_tokenizer  # noqa: E402
from plots import read_metrics  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_ours(cfg, data, tok, model_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as out:  # fresh cache: our reference pass is timed too
        c = cfg.replace(run={"output_dir": out, "log_every": 10 ** 9, "save_every": 10 ** 9},
                        model={"policy_model": model_dir, "build_offline_models": False})
        kit = EvalKit(tok, None, None, None, [], c.data.response_tokens, c.eval.eval_batch_size,
                      torch.device("cpu"), c.run.seed)
        with PeakRSS() as mem:
            t0 = time.time()
            train_dpo.train(c, data, kit, name="bench", evaluate=False)
            wall = time.time() - t0
        rows = read_metrics(Path(out) / "runs" / "bench" / "metrics.jsonl")
    return {"wall_s": wall, "train_s": rows[-1]["time_s"], "losses": [r["loss"] for r in rows],
            "peak_rss_mb": mem.peak / 2**20}


def run_trl(cfg, data, tok, model_dir: str, steps: int, precompute: bool) -> dict:
    import datasets
    from trl import DPOConfig, DPOTrainer

    datasets.disable_caching()  # TRL caches precomputed reference log-probs by fingerprint: never reuse them

    dc = cfg.dpo
    rows = [{k: tok.decode(p[k]) for k in ("prompt", "chosen", "rejected")} for p in data.train_pairs]
    model = load_causal_lm(model_dir, "cpu")
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=dc.dpo_batch_size, max_steps=steps,
                         learning_rate=dc.dpo_lr, beta=dc.beta, lr_scheduler_type="constant_with_warmup",
                         warmup_steps=dc.dpo_warmup_steps, max_grad_norm=1.0, weight_decay=0.0,
                         bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                         precompute_ref_log_probs=precompute, max_length=cfg.data.max_length + 1,
                         logging_steps=1, report_to=[], save_strategy="no", seed=cfg.run.seed,
                         dataloader_num_workers=0, disable_dropout=True)
        with PeakRSS() as mem:
            t0 = time.time()
            # TRL tokenises the dataset and (with precompute_ref_log_probs) runs its reference pass here
            trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok)
            t_init = time.time() - t0
            trainer.train()
            wall = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": wall, "train_s": wall, "init_s": t_init, "losses": losses, "peak_rss_mb": mem.peak / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each trainer; medians are reported")
    ap.add_argument("--model", default=None, help="causal LM directory (default: the offline preset's base GPT-2)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    cfg = PRESETS["offline"].replace(dpo={"dpo_steps": a.steps, "dpo_batch_size": a.batch},
                                     data={"n_pairs": a.steps * a.batch})
    reviews = dataset.load_reviews(cfg.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.run.seed)
    model_dir = a.model
    if model_dir is None:
        from offline_models import ensure_offline_models

        model_dir = ensure_offline_models(cfg, train_df, eval_df)["policy_model"]
    tok = load_tokenizer(model_dir)
    data = dataset.prepare(cfg, tok, train_df, eval_df)
    resp_tokens = sum(len(p["chosen"]) + len(p["rejected"]) for p in data.train_pairs)

    runs = {"ours": [], "trl_default": [], "trl_precompute": []}
    for r in range(a.repeats):
        print(f"repeat {r + 1}/{a.repeats}", file=sys.stderr)
        runs["ours"].append(run_ours(cfg, data, tok, model_dir))
        runs["trl_default"].append(run_trl(cfg, data, tok, model_dir, a.steps, precompute=False))
        runs["trl_precompute"].append(run_trl(cfg, data, tok, model_dir, a.steps, precompute=True))

    n_pairs = a.steps * a.batch
    summary = {"machine": {"cpus": os.cpu_count(), "torch_threads": a.threads, "torch": torch.__version__},
               "steps": a.steps, "batch": a.batch, "precision": "fp32", "repeats": a.repeats, "model": model_dir}
    for name, rs in runs.items():
        train_s = statistics.median(r["train_s"] for r in rs)
        summary[name] = {"pairs_per_s": n_pairs / train_s, "response_tokens_per_s": resp_tokens / train_s,
                         "train_s": train_s, "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                         "final_loss": statistics.median(statistics.mean(r["losses"][-5:]) for r in rs)}
    for ref in ("trl_default", "trl_precompute"):
        summary[f"speedup_vs_{ref}"] = summary["ours"]["pairs_per_s"] / summary[ref]["pairs_per_s"]

    print(f"\nDPO, {a.steps} steps x {a.batch} pairs, fp32 on {os.cpu_count()} CPUs ({a.threads} torch threads), "
          f"median of {a.repeats}")
    print(f"{'trainer':<16}{'pairs/s':>10}{'resp tok/s':>12}{'train s':>10}{'peak RSS MB':>13}{'loss@N':>9}")
    for name in runs:
        s = summary[name]
        print(f"{name:<16}{s['pairs_per_s']:>10.1f}{s['response_tokens_per_s']:>12.0f}{s['train_s']:>10.1f}"
              f"{s['peak_rss_mb']:>13.0f}{s['final_loss']:>9.4f}")
    print(f"ours / TRL defaults: {summary['speedup_vs_trl_default']:.2f}x, ours / TRL precompute: "
          f"{summary['speedup_vs_trl_precompute']:.2f}x")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
