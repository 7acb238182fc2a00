"""PPO throughput, phase by phase: generation, log-probs (policy + value head, reference), reward, update.

    uv run --group bench benchmarks/bench_ppo.py [--iters 10] [--batch 64] [--repeats 3]

Runs this project's ``train_ppo.train`` (offline preset, evaluation off) and reads the per-iteration phase
timings it logs in metrics.jsonl (``charts/generation_s``, ``charts/logps_s``, ``charts/score_s``,
``charts/update_s``). The first iteration is dropped as warm-up. Prints a table and one JSON line of
medians; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import dataset  # noqa: E402
import train_ppo  # noqa: E402
from config import PRESETS  # noqa: E402
from eval_utils import EvalKit  # noqa: E402
from models import load_causal_lm, load_judge, load_tokenizer  # noqa: E402
from offline_models import ensure_offline_models  # noqa: E402
from plots import read_metrics  # noqa: E402

PHASES = ("generation_s", "logps_s", "score_s", "update_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reward", choices=["learned", "judge"], default="learned")
    a = ap.parse_args()

    cfg = PRESETS["offline"].replace(ppo={"ppo_steps": a.iters, "ppo_batch_size": a.batch, "ppo_reward": a.reward})
    reviews = dataset.load_reviews(cfg.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.run.seed)
    paths = ensure_offline_models(cfg, train_df, eval_df)
    tok = load_tokenizer(paths["policy_model"])
    ref = load_causal_lm(paths["policy_model"], "cpu")
    judge_tok, judge = load_judge(paths["judge_model"], "cpu")
    data = dataset.prepare(cfg, tok, train_df, eval_df)
    kit = EvalKit(tok, ref, judge_tok, judge, [], cfg.data.response_tokens, cfg.eval.eval_batch_size,
                  torch.device("cpu"), cfg.run.seed)

    rows = []
    for r in range(a.repeats):
        print(f"repeat {r + 1}/{a.repeats}", file=sys.stderr)
        with tempfile.TemporaryDirectory() as out:
            # the reward model is trained once per repeat and is not part of the timed iterations
            c = cfg.replace(run={"output_dir": out, "log_every": 10 ** 9, "save_every": 10 ** 9},
                            model={**paths, "build_offline_models": False})
            train_ppo.train(c, data, kit, name="bench", evaluate=False)
            rows += read_metrics(Path(out) / "runs" / "bench" / "metrics.jsonl")[1:]

    med = {p: statistics.median(r[f"charts/{p}"] for r in rows) for p in PHASES}
    gen_tokens = statistics.median(r["objective/response_len"] for r in rows) * a.batch
    total = sum(med.values())
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    summary = {"machine": machine,
               "iters": a.iters, "batch": a.batch, "epochs": cfg.ppo.ppo_epochs, "reward": a.reward,
               "phase_s": med, "iteration_s": total, "generated_tokens_per_s": gen_tokens / med["generation_s"],
               "updates_per_s": (a.batch // cfg.ppo.ppo_mini_batch_size) * cfg.ppo.ppo_epochs / med["update_s"],
               "iterations_per_s": 1 / total}
    print(f"\nPPO iteration ({a.batch} rollouts x {cfg.data.response_tokens} tokens, {cfg.ppo.ppo_epochs} epochs), "
          f"medians of {len(rows)} iterations on {os.cpu_count()} CPUs")
    for p in PHASES:
        print(f"  {p[:-2]:<12}{med[p]:>8.2f} s  {100 * med[p] / total:>5.1f}%")
    print(f"  generated tokens/s {summary['generated_tokens_per_s']:.0f}, minibatch updates/s "
          f"{summary['updates_per_s']:.2f}, iterations/s {summary['iterations_per_s']:.3f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
