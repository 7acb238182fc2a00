"""Work items done in several one-thread processes (``--jobs N``): a generic runner that knows nothing of the study.

On a 2-core CPU two one-thread processes get more through than one two-thread process (BENCHMARKS.md, "Two
cores"): these models are too small for two threads to keep both cores busy. What each item computes is unchanged
but for the thread count, which fp32 numbers depend on: every worker is pinned to ``--threads`` (1 unless given).

The caller hands :func:`run_items` a list of JSON items, each with ``after`` (the indices of the items it waits
for), and the name of a handler module. Up to N worker processes (``python -m runtime.workers <task file>``) each
import the handler, call its ``make_worker(cfg)`` once, and pass it item after item: each worker takes the first
item no worker has claimed yet (an exclusive file create) whose prerequisites are done, so a long item on one
process never leaves the other idle while other items remain. The study's items and handler: ``study/jobs.py``.

Each worker's output goes to ``<output_dir>/logs/<tag>_worker<i>.log``; the caller shows one progress bar. A worker
that fails stops the others (each checkpoints and stops) and is reported in one line naming its log. Ctrl-C (or
SIGTERM to the caller) reaches the workers: each checkpoints and stops.

Imports: ``config`` and ``runtime`` only; the handler is imported by name, in the worker process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: the handler's package is found from it


def worker_threads(cfg, jobs: int) -> int:
    """The thread count of each worker process: ``--threads``, else 1 when there are several (0: torch's default).
    The caller computes at the same count once the workers are done (``experiment.train_runs``), so that every
    number of one study is made at one thread count."""
    return cfg.model.threads or (1 if jobs > 1 else 0)


def run_items(cfg, items: list[dict], jobs: int, handler: str, what: str, tag: str, stage: str) -> None:
    """Do ``items`` (JSON dicts, each with ``after``: the indices of the items it waits for) in up to ``jobs``
    worker processes, each passing them to ``importlib.import_module(handler).make_worker(cfg)`` (see the
    module's docstring). ``stage`` prefixes the printed lines ("study"), ``what`` says what the items are,
    ``tag`` names the logs. Raises ``run_log.StopTraining`` when a worker fails (the others are stopped: each
    checkpoints its run); ``KeyboardInterrupt`` after the workers stopped when interrupted."""
    from tqdm.auto import tqdm

    from runtime.run_log import StopTraining, strict_json

    logs = Path(cfg.run.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    worker_cfg = cfg.replace(model={"threads": worker_threads(cfg, jobs)}, run={"jobs": 1})
    threads = f"{worker_cfg.model.threads} CPU thread(s)" if worker_cfg.model.threads else "torch's default threads"
    items = [{"after": [], **item} for item in items]
    n = min(jobs, len(items))
    print(f"{stage}: {what} in {n} process(es) of {threads} each; their logs in {logs}/", flush=True)
    claims = logs / f"claims-{os.getpid()}-{time.time_ns()}"
    claims.mkdir()
    task = claims / "task.json"
    task.write_text(strict_json({"config": worker_cfg.to_dict(), "items": items, "claims": str(claims),
                                  "handler": handler}))
    # the repository on the path wherever the caller stands: the workers import this package and the handler's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    procs = []
    for i in range(n):
        log = logs / f"{tag}_worker{i}.log"
        with open(log, "w") as f:
            # the caller's working directory: the config's relative paths mean the same in every process
            procs.append((subprocess.Popen([sys.executable, "-m", "runtime.workers", str(task)], stdout=f,
                                           stderr=subprocess.STDOUT, env=env), log))
    bar = tqdm(total=len(items), desc=f"{stage}: {what} ({n} processes)", unit="item")

    def advance():
        done = len(list(claims.glob("*.done")))
        if done > bar.n:
            bar.update(done - bar.n)

    def stop_all():
        stop([p for p, _ in procs])

    try:
        while None in (codes := [p.poll() for p, _ in procs]):  # every process polled, each time
            advance()
            if any(codes):  # one failed: the others would wait on its items forever
                stop_all()
            time.sleep(1)
        advance()
    except KeyboardInterrupt:
        stop_all()
        raise
    finally:
        bar.close()
        shutil.rmtree(claims, ignore_errors=True)
    failed = [(p.returncode, log) for p, log in procs if p.returncode not in (0, -signal.SIGTERM, 143)]
    failed = failed or [(p.returncode, log) for p, log in procs if p.returncode]
    if failed:
        code, log = failed[0]
        lines = [x for x in log.read_text(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
        said = next((x for x in reversed(lines) if x.startswith(("error:", "interrupted"))), lines[-1] if lines else "")
        raise StopTraining(f"{stage}: a worker process failed (exit code {code}): {said.removeprefix('error: ')} (its "
                           f"log: {log}); finished runs are kept: rerun with --resume to continue",
                           code if code in (2, 130, 143) else 1)


def stop(procs: list[subprocess.Popen], grace_s: float = 120.0) -> None:
    """Stop worker processes: SIGTERM to each at once (a worker that got the terminal's Ctrl-C too counts the
    copy once), then up to ``grace_s`` for each to checkpoint its run and leave, then SIGKILL for one that did
    not: never a wait without a limit."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"study: worker process {p.pid} did not stop within {grace_s:.0f} s of SIGTERM: killed", flush=True)
            p.kill()
            p.wait()


def _claim(claims: Path, i: int) -> bool:
    try:
        os.close(os.open(claims / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def work(task_path: str) -> None:
    """A worker: import the task's handler, make its item function once, and do items until none is left."""
    import importlib

    import torch

    from config import Config

    task = json.loads(Path(task_path).read_text())
    cfg, claims, items = Config.from_dict(task["config"]), Path(task["claims"]), task["items"]
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    do = importlib.import_module(task["handler"]).make_worker(cfg)
    while (i := _next_item(claims, items)) is not None:
        do(items[i])
        (claims / f"{i}.done").touch()


def _next_item(claims: Path, items: list[dict]) -> int | None:
    """Claim the first unclaimed item whose ``after`` items are all done; wait while every unclaimed one waits on
    another process's item; None when every item is claimed."""
    while True:
        open_ = [i for i in range(len(items)) if not (claims / str(i)).exists()]
        if not open_:
            return None
        for i in open_:
            if all((claims / f"{j}.done").exists() for j in items[i]["after"]) and _claim(claims, i):
                return i
        time.sleep(1)


def main(argv: list[str]) -> int:
    from runtime.exits import ending
    from runtime.run_log import SIGNALS

    SIGNALS.install()  # as main.py: a signal inside a training loop checkpoints and stops it
    try:
        work(argv[0])
        return 0
    except BaseException as e:
        SIGNALS.ending = True  # a plain store, not a call (run_log.Signals.end says why)
        return ending(e, None, 0, 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
