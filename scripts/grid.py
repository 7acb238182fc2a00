"""What the measurement scripts share: train a grid of DPO and PPO runs over several worker processes, each run
evaluated on the validation prompts as it trains, and read their validation points back.

A task is ``{"seed", "method" ("dpo" or "ppo"), "name", "overrides"}`` (``Config.replace`` sections on top of the
command's config). Runs live under ``<output_dir>/<name>/``; one already finished with the same settings is kept,
not trained again, so an interrupted grid continues where it stopped. With ``jobs`` > 1 every process runs on one
CPU thread (fp32 numbers depend on the thread count: pinned, they do not depend on the machine's). What runs share
is made first, by one process each: the offline models, then per seed the reward model and DPO's reference
log-probs (the seeds in parallel: different files), so two processes never write the same cache entry.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from run_log import read_metrics, strict_json  # noqa: E402


def add_arguments(ap) -> None:
    """The flags every grid script has (``--jobs``, ``--out``, ``--report``) and the worker's hidden ones."""
    import argparse

    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one CPU thread each when > 1)")
    ap.add_argument("--out", help="write every run's validation points and the tables here (JSON)")
    ap.add_argument("--report", action="store_true", help="only print the tables of the runs already finished")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare_only", action="store_true", help=argparse.SUPPRESS)


def command_config(rest: list[str], jobs: int, output_dir: str):
    """The config of the main.py flags in ``rest`` on top of the offline preset at fp32 (runs under
    ``output_dir``, caches in models/), one CPU thread per process when ``jobs`` > 1; None after a one-line error."""
    from config import ConfigError, parse_config

    flags = ["--preset", "offline", "--dtype", "fp32", "--output_dir", output_dir, "--cache_dir", "models",
             *(["--threads", "1"] if jobs > 1 else []), *rest]
    try:
        if jobs < 1:
            raise ConfigError(f"--jobs must be >= 1 (got {jobs})")
        return parse_config(flags)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def worker(cfg, tasks: list[dict], prepare_only: bool) -> None:
    """Train ``tasks`` one after the other in this process (models and each seed's data loaded once). With
    ``prepare_only``, only make what the seeds' runs share (reward model, reference log-probs)."""
    import torch
    import transformers

    import dataset
    import experiment
    import train_dpo
    import train_ppo
    from logprobs import ResponseLogProbs
    from models import weights_fingerprint
    from reward_model import train_reward_model
    from run_utils import make_accelerator
    from study import RunSpec, finished

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    reviews = dataset.load_reviews(cfg.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
    stack = experiment.load_stack(cfg, make_accelerator(torch.device("cpu")), train_df, eval_df)
    cfg, tok, ref, device, dtype = stack.cfg, stack.tokenizer, stack.ref_model, stack.device, stack.dtype
    prepared = {}
    for task in tasks:
        seed = task["seed"]
        rcfg = cfg.replace(run={"seed": seed}).replace(**task["overrides"])
        if seed not in prepared:
            prepared[seed] = experiment.seed_context(stack, rcfg)
        data, ctx = prepared[seed]
        if prepare_only:
            if task["method"] == "ppo" and rcfg.ppo.ppo_reward == "learned":
                train_reward_model(rcfg, data, ctx)
            if task["method"] == "dpo":
                train_dpo.reference_logps(ResponseLogProbs(ref), data.train_pairs, tok.pad_token_id,
                                          rcfg.dpo.dpo_batch_size, device, Path(rcfg.run.cache_dir),
                                          weights_fingerprint(ref), dtype)
            continue
        if finished(rcfg, RunSpec(task["method"], task["name"], seed, task["name"], {}, False)):
            print(f"grid: {task['name']} finished earlier with the same settings: kept", flush=True)
            continue
        t0 = time.time()
        (train_dpo if task["method"] == "dpo" else train_ppo).train(rcfg, data, ctx, name=task["name"])
        print(f"grid: {task['name']} trained in {time.time() - t0:.0f}s", flush=True)


def _launch(script: str, argv: list[str], parts: list[list[dict]], jobs: int, prepare_only: bool, logs: Path,
            tag: str) -> None:
    procs = []
    for i, part in enumerate(parts):
        cmd = [sys.executable, script, "--worker", json.dumps(part), "--jobs", str(jobs),
               *(["--prepare_only"] if prepare_only else []), *argv]
        log = logs / f"{tag}_worker{i}.log"
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT), log))
    for code, log in [(p.wait(), log) for p, log in procs]:
        if code:
            tail = [line for line in log.read_text().replace("\r", "\n").splitlines() if line.strip()][-15:]
            print("\n".join(tail), file=sys.stderr)
            raise SystemExit(f"grid: a worker failed with exit code {code} (its log: {log}); rerun the same command "
                             f"to continue")


def run_grid(script: str, argv: list[str], tasks: list[dict], jobs: int, logs: Path) -> None:
    """Train ``tasks`` in ``jobs`` worker processes of ``script`` (which hands ``--worker`` to :func:`worker`)."""
    logs.mkdir(parents=True, exist_ok=True)
    print(f"grid: {len(tasks)} runs over {jobs} process(es); each process's log in {logs}", flush=True)
    _launch(script, argv, [[]], jobs, True, logs, "build")  # the offline models, by one process
    first = {}
    for t in tasks:  # per seed and method, what its runs share
        first.setdefault((t["seed"], t["method"]), t)
    shared = list(first.values())
    _launch(script, argv, [shared[i::jobs] for i in range(jobs) if shared[i::jobs]], jobs, True, logs, "prepare")
    _launch(script, argv, [tasks[i::jobs] for i in range(jobs) if tasks[i::jobs]], jobs, False, logs, "train")


def run_and_report(script: str, a, rest: list[str], cfg, tasks: list[dict], report, **record) -> int:
    """The end of a grid script's main: train ``tasks`` (unless ``--report``), print the tables (``report()``,
    which returns the JSON record), add the command, ``record`` and the wall time, and write it to ``--out``."""
    t0 = time.time()
    if not a.report:
        run_grid(script, rest, tasks, a.jobs, Path(cfg.run.output_dir) / "logs")
    out = report()
    out.update(command=f"uv run scripts/{Path(script).name} " + " ".join(sys.argv[1:]), **record,
               wall_s=time.time() - t0)
    if a.out:
        Path(a.out).write_text(strict_json(out, indent=1))
        print(f"\nwrote {a.out}")
    return 0


def validation_points(out_dir: Path, name: str) -> list[dict]:
    """A finished (or interrupted) run's evaluations: ``{"step", "kl", "safety"}`` on the validation prompts."""
    for path in (out_dir / name / "metrics.jsonl", out_dir / "runs" / name / "metrics.jsonl"):
        rows = read_metrics(path)
        if rows:
            return [{"step": r["step"], "kl": r["eval/kl_to_ref"], "safety": r["eval/safety_score"]}
                    for r in rows if "eval/kl_to_ref" in r and r["step"] > 0]
    return []


def reference_safety(out_dir: Path, name: str) -> float | None:
    """The reference's validation safety, as the run's step-0 evaluation recorded it."""
    for path in (out_dir / name / "metrics.jsonl", out_dir / "runs" / name / "metrics.jsonl"):
        rows = [r for r in read_metrics(path) if r.get("step") == 0 and "eval/safety_score" in r]
        if rows:
            return rows[0]["eval/safety_score"]
    return None


def band_best(points: list[dict], k: float, width: float = 0.2) -> dict | None:
    """The point with the best validation safety among ``points`` whose validation KL is within k ± width * k (the
    study's bands: ``study.band_bounds``)."""
    from study import band_bounds

    lo, hi = band_bounds(k, width)
    inside = [p for p in points if lo <= p["kl"] <= hi]
    return max(inside, key=lambda p: p["safety"]) if inside else None
