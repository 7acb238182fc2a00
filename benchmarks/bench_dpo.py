"""DPO training throughput: this project's DPO vs TRL's DPOTrainer, in one process, on the same work.

    uv run --group bench benchmarks/bench_dpo.py [--size offline|paper] [--steps 40] [--batch 16] [--repeats 2]
        [--model_dir DIR]

Trainers (``--trainers`` picks some):

* ``ours`` -- this project's defaults (``--dtype auto``: bf16 autocast where the CPU or GPU has bf16 matrix
  units, fp32 elsewhere; the reference pass once, before training, inside the timed region);
* ``trl_defaults`` -- TRL's ``DPOConfig`` out of the box: ``bf16=True`` and ``gradient_checkpointing=True``,
  a reference forward at every step;
* ``trl_fp32`` -- TRL at equal precision: fp32, no gradient checkpointing, reference every step;
* ``trl_fp32_precompute`` -- the same with ``precompute_ref_log_probs=True`` (its pass inside the timed region).

Everything else is the same: model (``offline``: the offline preset's base GPT-2, built if missing;
``paper``: a random-init stand-in with distilgpt2's exact shape), preference pairs (decoded to text for
TRL, which re-tokenises them and appends EOS to each completion: one token more than ours), batch size, max
length, beta, learning rate and schedule (linear warmup, then constant), gradient clipping at 1, dropout
off, seed and step count. Timed: ours from ``train_dpo.train`` to its last step; TRL's from the
``DPOTrainer(...)`` constructor (tokenisation, and the precompute pass) to the end of ``trainer.train()``.
Peak RSS of each. Prints one table and one JSON line; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import PeakMemory, build_standins, machine, offline_models  # noqa: E402

import dataset  # noqa: E402
import train_dpo  # noqa: E402
from config import PRESETS  # noqa: E402
from modeling.models import (  # noqa: E402
    bf16_native,
    dtype_name,
    load_causal_lm,
    load_config,
    load_tokenizer,
    model_width,
    resolve_dtype,
)
from runtime.run_log import read_metrics  # noqa: E402
from runtime.run_utils import make_accelerator  # noqa: E402
from training.lifecycle import RunContext  # noqa: E402

TRAINERS = ("ours", "trl_defaults", "trl_fp32", "trl_fp32_precompute")


def run_ours(cfg, data, tok, model_dir: str, acc) -> dict:
    dtype = resolve_dtype(cfg.model.dtype, "cpu", model_width(load_config(model_dir)))
    with tempfile.TemporaryDirectory() as out:  # fresh cache: our reference pass is timed too
        c = cfg.replace(run={"output_dir": out, "cache_dir": out, "log_every": 10 ** 9, "save_every": 10 ** 9},
                        model={"policy_model": model_dir, "build_offline_models": False})
        ctx = RunContext(tokenizer=tok, ref_model=None, device=torch.device("cpu"), acc=acc, dtype=dtype,
                         batch_size=c.eval.eval_batch_size)  # training alone: no judge, no evaluation prompts
        with PeakMemory() as mem:
            train_dpo.train(c, data, ctx, name="bench", evaluate=False)
        rows = read_metrics(Path(out) / "runs" / "bench" / "metrics.jsonl")
    return {"train_s": rows[-1]["time_s"], "losses": [r["loss"] for r in rows], "peak_mb": mem.peak_mb,
            "precision": dtype_name(dtype)}


def run_trl(cfg, data, tok, model_dir: str, steps: int, variant: str) -> dict:
    import datasets
    from trl import DPOConfig, DPOTrainer

    datasets.disable_caching()  # TRL caches precomputed reference log-probs by fingerprint: never reuse them
    dc = cfg.dpo
    rows = [{k: tok.decode(p[k]) for k in ("prompt", "chosen", "rejected")} for p in data.train_pairs]
    same = dict(output_dir=None, per_device_train_batch_size=dc.dpo_batch_size, max_steps=steps,
                learning_rate=dc.dpo_lr, beta=dc.beta, lr_scheduler_type="constant_with_warmup",
                warmup_steps=dc.dpo_warmup_steps, max_grad_norm=1.0, weight_decay=0.0, use_cpu=True,
                max_length=cfg.data.max_length + 1, logging_steps=1, report_to=[], save_strategy="no",
                seed=cfg.run.seed, dataloader_num_workers=0, disable_dropout=True)
    # trl_defaults leaves bf16, gradient_checkpointing and precompute_ref_log_probs at TRL's own defaults
    own = {"trl_defaults": {}, "trl_fp32": dict(bf16=False, gradient_checkpointing=False),
           "trl_fp32_precompute": dict(bf16=False, gradient_checkpointing=False, precompute_ref_log_probs=True)}
    model = load_causal_lm(model_dir, "cpu")
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**{**same, "output_dir": out}, **own[variant])
        with PeakMemory() as mem:
            t0 = time.time()
            # TRL tokenises the dataset and (with precompute_ref_log_probs) runs its reference pass here
            trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok)
            trainer.train()
            wall = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_s": wall, "losses": losses, "peak_mb": mem.peak_mb,
            "precision": "bf16" if args.bf16 else "fp32", "gradient_checkpointing": args.gradient_checkpointing}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["offline", "paper", "smoke"], default="offline",
                    help="offline: the offline preset's base GPT-2; paper: a random-init distilgpt2-shaped stand-in; "
                         "smoke: the smoke preset's tiny GPT-2 (a check that the benchmark runs, not a measurement)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each trainer; medians are reported")
    ap.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--model_dir", help="--size offline: an existing policy model directory (default: the offline "
                                        "preset's fp32 base GPT-2, built first if missing: about 14 min)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()

    # 8 validation pairs (never evaluated: nothing is timed but training), so all their prompts: --n_val_prompts 0
    cfg = PRESETS["offline"].replace(dpo={"dpo_steps": a.steps, "dpo_batch_size": a.batch, "dpo_eval_steps": []},
                                     data={"n_pairs": a.steps * a.batch, "n_val_pairs": 8}, eval={"n_val_prompts": 0})
    reviews = dataset.load_reviews(cfg.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
    if a.size == "paper":
        model_dir, _ = build_standins(Path(tempfile.mkdtemp(prefix="bench_dpo_")), train_df)
    else:
        model_dir = offline_models(train_df, eval_df, policy_model=a.model_dir,
                                   preset="smoke" if a.size == "smoke" else "offline")["policy_model"]
    tok = load_tokenizer(model_dir)
    data = dataset.prepare(cfg, tok, train_df, eval_df)
    resp_tokens = sum(len(p["chosen"]) + len(p["rejected"]) for p in data.train_pairs)
    acc = make_accelerator(torch.device("cpu"))

    runs = {name: [] for name in a.trainers}
    for r in range(a.repeats):
        for name in a.trainers:
            print(f"repeat {r + 1}/{a.repeats}: {name}", file=sys.stderr)
            runs[name].append(run_ours(cfg, data, tok, model_dir, acc) if name == "ours"
                              else run_trl(cfg, data, tok, model_dir, a.steps, name))

    n_pairs = a.steps * a.batch
    summary = {"machine": {**machine(), "bf16_matrix_units": bf16_native("cpu")}, "size": a.size,
               "model": "(a random-init stand-in in a temporary directory)" if a.size == "paper" else model_dir,
               "steps": a.steps, "batch": a.batch, "repeats": a.repeats}
    for name, rs in runs.items():
        train_s = statistics.median(r["train_s"] for r in rs)
        summary[name] = {"pairs_per_s": n_pairs / train_s, "response_tokens_per_s": resp_tokens / train_s,
                         "train_s": train_s, "peak_rss_mb": statistics.median(r["peak_mb"] for r in rs),
                         "final_loss": statistics.median(statistics.mean(r["losses"][-5:]) for r in rs),
                         "precision": rs[0]["precision"]}
    for ref in (n for n in runs if n != "ours"):
        if "ours" in runs:
            summary[f"speedup_vs_{ref}"] = summary["ours"]["pairs_per_s"] / summary[ref]["pairs_per_s"]

    print(f"\nDPO, {a.size} size, {a.steps} steps x {a.batch} pairs, {summary['machine']['cpu']} "
          f"({summary['machine']['cpus']} CPUs, bf16 matrix units: {summary['machine']['bf16_matrix_units']}), "
          f"median of {a.repeats}")
    print(f"{'trainer':<22}{'precision':>10}{'pairs/s':>9}{'resp tok/s':>12}{'train s':>9}{'peak RSS MB':>13}"
          f"{'loss@N':>9}{'ours is':>9}")
    for name in runs:
        s = summary[name]
        ratio = f"{summary[f'speedup_vs_{name}']:.2f}x" if f"speedup_vs_{name}" in summary else ""
        print(f"{name:<22}{s['precision']:>10}{s['pairs_per_s']:>9.1f}{s['response_tokens_per_s']:>12.0f}"
              f"{s['train_s']:>9.1f}{s['peak_rss_mb']:>13.0f}{s['final_loss']:>9.4f}{ratio:>9}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
