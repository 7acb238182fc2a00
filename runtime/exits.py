"""How a run that did not finish ends: one line, its exit code, and under a launcher each failing process's
traceback in a log file. ``main.py`` and the worker processes (``runtime/workers.py``) end the same way.

Exit codes: 0 done, 1 training diverged (or, under a launcher, one process failed), 2 bad input or config, 130
interrupted by SIGINT (Ctrl-C) and 143 by SIGTERM. Imports ``config`` and ``runtime.run_log`` only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from config import Config, ConfigError
from runtime.run_log import FATAL, SIGNALS, StopTraining, interrupted_line


def error_log(cfg: Config | None, rank: int, text: str) -> Path | None:
    """Write a failing process's traceback to ``<output_dir>/logs/rank<k>-error.log``; its path, or None when
    the run's directory is not known (the config did not parse) or cannot be written."""
    if cfg is None:
        return None
    path = Path(cfg.run.output_dir) / "logs" / f"rank{rank}-error.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return None
    return path


def peer_died(cfg: Config | None, rank: int, world: int) -> bool:
    """Under a launcher: did another process die by a fatal signal (``run_log.FatalLogs``)? Then the launcher
    stopped this one, or a collective failed, because of it: the lowest-ranked process still alive says which
    process died and why in one line, instead of reporting the consequence."""
    dead = FATAL.dead_peers(cfg.run.output_dir, rank) if cfg is not None and world > 1 else {}
    if not dead:
        return False
    if rank == min(set(range(world)) - set(dead)):
        k, first = min(dead.items())
        print(f"error: rank {k} died: {first} (its Python stack in {Path(cfg.run.output_dir) / 'logs'}"
              f"/rank{k}-fatal.log); the launcher stopped the other processes", file=sys.stderr, flush=True)
    return True


def ending(e: BaseException, cfg: Config | None, rank: int, world: int) -> int:
    """Report how a run that did not finish ended, in one line, and return its exit code (main.py's docstring).
    Bad input and the collective stops (interrupt, divergence) meet every process alike: the first one alone
    reports them. Any other error is one process's own: under a launcher each failing process says so in one line
    naming its rank, its traceback in a log file (a non-main process's output is otherwise silenced)."""
    report = print if rank == 0 else (lambda *a, **k: None)
    if isinstance(e, ConfigError):
        report(f"error: {e}", file=sys.stderr)
        if rank:  # kept all the same: were it this process's alone, rank 0 would fail on without it
            error_log(cfg, rank, f"ConfigError: {e}\n")
        return 2
    if peer_died(cfg, rank, world):  # e.g. gloo's "Connection closed by peer": a consequence, not the cause
        return 1
    if isinstance(e, StopTraining):
        report(f"error: {e}" if e.code != 130 else str(e), file=sys.stderr)
        if rank and e.code != 130:
            error_log(cfg, rank, f"StopTraining (exit {e.code}): {e}\n")
        return e.code
    if isinstance(e, KeyboardInterrupt):  # outside a training step (loading, the reference pass, the final evaluation)
        report(interrupted_line(SIGNALS.name), file=sys.stderr)
        return SIGNALS.exit_code
    if world == 1 or not isinstance(e, Exception):
        raise e
    import traceback

    text = "".join(traceback.format_exception(e))
    path = error_log(cfg, rank, text)
    where = f"traceback in {path}" if path else "traceback:\n" + text
    first = next(iter(str(e).splitlines()), "")  # one line: a gloo error runs over several
    print(f"error: rank {rank}: {type(e).__name__}: {first} ({where})", file=sys.stderr, flush=True)
    return 1
