"""What the measurement scripts share: train a grid of DPO and PPO runs over several worker processes, each run
evaluated on the validation prompts as it trains, and read their validation points back.

A task is ``{"seed", "method" ("dpo", "ppo" or "ppo_gt"), "name", "overrides"}`` (``Config.replace`` sections on
top of the command's config). Runs live under ``<output_dir>/<name>/``; one already finished with the same settings
is kept, not trained again, so an interrupted grid continues where it stopped. The worker processes are the
study's own (``workers.py``, as ``main.py --jobs``): with ``jobs`` > 1 each runs on one CPU thread (fp32 numbers
depend on the thread count: pinned, they do not depend on the machine's), and what runs share is made first, so
two processes never write the same cache entry.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.artifacts import atomic_write_text  # noqa: E402
from runtime.run_log import read_metrics, strict_json  # noqa: E402


def add_arguments(ap) -> None:
    """The flags every grid script has (``--jobs``, ``--out``, ``--report``)."""
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one CPU thread each when > 1)")
    ap.add_argument("--out", help="write every run's validation points and the tables here (JSON)")
    ap.add_argument("--report", action="store_true", help="only print the tables of the runs already finished")


def command_config(rest: list[str], jobs: int, output_dir: str):
    """The config of the main.py flags in ``rest`` on top of the offline preset at fp32 (runs under
    ``output_dir``, caches in models/; a run finished with the same settings is kept, an interrupted one continues:
    ``--resume``), one CPU thread per process when ``jobs`` > 1, no held-out prompts (validation only); None after
    a one-line error."""
    from config import ConfigError
    from runtime.cli import parse_config

    # --n_eval_prompts 0, last: no held-out prompt is drawn, so nothing a grid script runs (tuning, probes) can
    # evaluate the test set (training.lifecycle.RunContext.on refuses an empty prompt list).
    flags = ["--preset", "offline", "--dtype", "fp32", "--output_dir", output_dir, "--cache_dir", "models",
             "--resume", *(["--threads", "1"] if jobs > 1 else []), *rest, "--n_eval_prompts", "0"]
    try:
        if jobs < 1:
            raise ConfigError(f"--jobs must be >= 1 (got {jobs})")
        if held_out := [f for f in rest if f.split("=")[0] in ("--n_eval_prompts", "--sealed_prompts")]:
            raise ConfigError(f"{held_out[0].split('=')[0]}: the grid scripts evaluate validation prompts only "
                              f"and draw no held-out prompts; leave it out")
        return parse_config(flags)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def run_grid(cfg, tasks: list[dict], jobs: int) -> None:
    """Train ``tasks`` in ``jobs`` worker processes (``study.jobs.run_in_processes``, the models built first)."""
    from runtime.run_log import StopTraining
    from study.grid import RunSpec
    from study.jobs import run_in_processes

    specs = [RunSpec(t["method"], t["name"], t["seed"], t["name"], t["overrides"], False) for t in tasks]
    try:
        run_in_processes(cfg, specs, jobs, build_models=True)
    except StopTraining as e:
        raise SystemExit(f"grid: {e}") from None


def run_and_report(script: str, a, rest: list[str], cfg, tasks: list[dict], report, **record) -> int:
    """The end of a grid script's main: train ``tasks`` (unless ``--report``), print the tables (``report()``,
    which returns the JSON record), add the command, ``record`` and the wall time, and write it to ``--out``."""
    t0 = time.time()
    if not a.report:
        run_grid(cfg, tasks, a.jobs)
    out = report()
    out.update(command=f"uv run scripts/{Path(script).name} " + " ".join(sys.argv[1:]), **record,
               wall_s=time.time() - t0)
    if a.out:
        atomic_write_text(Path(a.out), strict_json(out, indent=1))
        print(f"\nwrote {a.out}")
    return 0


def run_rows(out_dir: Path, name: str) -> list[dict]:
    """A finished (or interrupted) grid run's metrics.jsonl rows, wherever the grid put it (``<out>/<name>/`` or
    ``<out>/runs/<name>/``); its validation points: ``study.grid.validation_points(run_rows(...))``."""
    for path in (out_dir / name / "metrics.jsonl", out_dir / "runs" / name / "metrics.jsonl"):
        rows = read_metrics(path)
        if rows:
            return rows
    return []


def reference_safety(out_dir: Path, name: str) -> float | None:
    """The reference's validation safety, as the run's step-0 evaluation recorded it."""
    rows = [r for r in run_rows(out_dir, name) if r.get("step") == 0 and "eval/safety_score" in r]
    return rows[0]["eval/safety_score"] if rows else None
