"""One process with two threads, or two processes with one thread each: which gets more of the study's work
through a 2-core CPU? Two workloads, on the offline preset's models at fp32:

* ``--work eval`` (default): one validation evaluation as the study makes it: sample a 32-token completion for each
  of 512 review openings, score the completions under the reference on the sampler's path (the KL) and judge
  prompt + completion;
* ``--work dpo``: DPO training as the study runs it (``train_dpo.train`` without evaluations: the reference pass,
  then ``--steps`` steps of 16 pairs).

Each way does the same total work (two processes split it); printed: the time of each (the slowest worker's, model
loading excluded), units per minute and the ratio.

    uv run benchmarks/bench_processes.py [--work eval|dpo] [--prompts 512] [--evals 4] [--steps 60]

``main.py --jobs 2`` and ``scripts/grid.py --jobs 2`` run a study's runs as two one-thread processes
(``study/jobs.py``). Numbers depend on the machine: run it where the study will run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    """``args.evals`` evaluations in this process at ``args.threads`` threads; prints one JSON line."""
    import dataclasses

    import torch

    import eval_utils
    from modeling import models
    from runtime.run_utils import make_accelerator
    from training.lifecycle import RunContext

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    lm, ref = models.load_causal_lm(args.policy), models.load_causal_lm(args.policy)
    judge_tok, judge = models.load_judge(args.judge)
    # the study's own validation evaluation (eval_utils.evaluate_policy), batch 256 as the offline preset's
    ctx = RunContext(models.load_tokenizer(args.policy), ref, cpu, make_accelerator(cpu), batch_size=256,
                     judge_tok=judge_tok, judge=judge, prompts=json.loads(Path(args.prompts_file).read_text()),
                     max_new_tokens=32)
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(args.evals):
            eval_utils.evaluate_policy(lm, dataclasses.replace(ctx, seed=k), 1.0)
    print(json.dumps({"threads": args.threads, "evals": args.evals, "s": time.perf_counter() - t0}), flush=True)


def dpo_worker(args) -> None:
    """``args.evals`` DPO trainings of ``args.steps`` steps in this process at ``args.threads`` threads (the
    study's ``train_dpo.train``, evaluations off, each with its reference pass); prints one JSON line."""
    import torch

    import dataset
    from benchmarks.bench_dpo import run_ours
    from config import PRESETS
    from modeling.models import load_tokenizer
    from runtime.run_utils import make_accelerator

    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.size].replace(model={"dtype": "fp32"}, dpo={"dpo_steps": args.steps, "dpo_eval_steps": []},
                                     data={"n_pairs": args.steps * 16, "n_val_pairs": 8},
                                     eval={"n_val_prompts": 8})  # evaluations are off: a token validation split
    reviews = dataset.load_reviews(cfg.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
    tok = load_tokenizer(args.policy)
    data = dataset.prepare(cfg, tok, train_df, eval_df)
    acc = make_accelerator(torch.device("cpu"))
    seconds = sum(run_ours(cfg, data, tok, args.policy, acc)["train_s"] for _ in range(args.evals))
    print(json.dumps({"threads": args.threads, "evals": args.evals, "s": seconds}), flush=True)


def run_way(args, n_procs: int, threads: int, evals_each: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--evals", str(evals_each),
           "--work", args.work, "--steps", str(args.steps), "--size", args.size,
           "--policy", args.policy, "--judge", args.judge, "--prompts_file", args.prompts_file]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n_procs)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit(f"bench_processes: a worker failed (exit codes {[p.returncode for p in procs]})")
    workers = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    evals = sum(w["evals"] for w in workers)
    # throughput over the evaluating time (the slowest worker's, as they run side by side), not the model loading
    busy = max(w["s"] for w in workers)
    return {"processes": n_procs, "threads": threads, "evaluations": evals, "wall_s": wall,
            "worker_s": [w["s"] for w in workers], "evals_per_min": 60 * evals / busy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", choices=("eval", "dpo"), default="eval",
                    help="eval: validation evaluations; dpo: DPO trainings of --steps steps")
    ap.add_argument("--prompts", type=int, default=512, help="validation prompts per evaluation (the study: 512)")
    ap.add_argument("--evals", type=int, default=4, help="evaluations (or trainings) per way (even: two processes "
                                                        "split them)")
    ap.add_argument("--steps", type=int, default=60, help="--work dpo: steps of each training")
    ap.add_argument("--size", choices=["offline", "smoke"], default="offline",
                    help="smoke: the smoke preset's tiny models (a check that the benchmark runs, not a measurement)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--judge", help=argparse.SUPPRESS)
    ap.add_argument("--prompts_file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        (worker if args.work == "eval" else dpo_worker)(args)
        return 0
    if args.evals < 2 or args.evals % 2 or args.prompts < 1 or args.steps < 1:
        print("error: --evals must be an even number >= 2, --prompts and --steps >= 1", file=sys.stderr)
        return 2

    import tempfile

    import dataset
    from benchmarks.common import machine, offline_models
    from config import PRESETS

    cfg = PRESETS[args.size].replace(model={"dtype": "fp32"})
    reviews = dataset.load_reviews(cfg.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
    dirs = offline_models(train_df, eval_df, preset=args.size)
    from modeling.models import load_tokenizer

    tok = load_tokenizer(dirs["policy_model"])
    prompts, _ = dataset.build_prompts(train_df, tok, cfg.data, 0, args.prompts)  # openings as the study's prompts
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    args.policy, args.judge, args.prompts_file = dirs["policy_model"], dirs["judge_model"], f.name
    try:
        one = run_way(args, 1, 2, args.evals)
        two = run_way(args, 2, 1, args.evals // 2)
    finally:
        Path(f.name).unlink(missing_ok=True)
    what = "evaluations" if args.work == "eval" else f"DPO trainings of {args.steps} steps"
    print(json.dumps({"machine": machine(), "work": args.work, "prompts": args.prompts, "steps": args.steps,
                      "ways": [one, two]}, indent=1))
    for w in (one, two):
        print(f"{w['processes']} process(es) x {w['threads']} thread(s): {w['evaluations']} {what} in "
              f"{max(w['worker_s']):.1f} s ({w['wall_s']:.1f} s wall with loading), {w['evals_per_min']:.2f} per "
              f"minute")
    print(f"two one-thread processes / one two-thread process: {two['evals_per_min'] / one['evals_per_min']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
