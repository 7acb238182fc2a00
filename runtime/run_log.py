"""A training run's record and how it ends: ``metrics.jsonl`` (written by :class:`MetricsLog`, read by
:func:`read_metrics`) and :class:`StopTraining`. The lifecycle that uses them is ``lifecycle.TrainingRun``;
this part stays free of torch, so ``--help`` and ``--plots-only`` import it without the modelling stack."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from runtime.artifacts import atomic_write_text


class StopTraining(Exception):
    """Raised to end a run early with a message and an exit code (1: non-finite, 2: bad input, 130:
    interrupted); main.py prints the message in one line."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def interrupted_line(name: str) -> str:
    """The one line of a run interrupted outside a training step (by the main thread, or by the signal watchdog
    while the main thread is stuck in native code)."""
    return (f"interrupted ({name}) outside a training step, nothing half-written: a run cut before its first "
            f"checkpoint starts over; finished runs are kept (rerun with --resume to skip them)")


class Signals:
    """SIGINT (Ctrl-C) and SIGTERM (what launchers and schedulers send), one process-wide policy; main.py installs
    it first thing, a training loop turns it on (:meth:`collecting`).

    * Inside a training loop the first signal only sets :attr:`signum`; the loop acts on it after the step: a
      checkpoint, then exit 128 + the signal (130 for SIGINT, 143 for SIGTERM).
    * Elsewhere (loading, the reference pass, evaluation after training) the first signal raises
      ``KeyboardInterrupt`` at once: nothing a checkpoint could keep has been trained, and every file is written
      atomically, so nothing is left half-written.
    * A second signal within :attr:`window_s` of the first is the same interrupt delivered twice (``uv run`` and
      launchers forward the terminal's Ctrl-C to a process that got it already): ignored, wherever it lands.
    * A later one forces the exit (``KeyboardInterrupt``), but never while a checkpoint is written
      (:meth:`critical`): then it takes effect when the write is done.
    * Once the process is ending (:meth:`end`: main.py is reporting how it ended), a signal changes nothing: under a
      launcher the SIGTERM that follows a peer's death must not cut the report of it."""

    window_s = 2.0
    grace_s = 0.75  # how long the watchdog lets the main thread stop by itself

    def __init__(self):
        self.signum: int | None = None  # the first signal received, or None
        self._first_t: float | None = None
        self._collecting = False
        self._critical = 0
        self._pending = False
        self._installed = False
        self.ending = False
        self._handled_t = -float("inf")  # when the main thread last ran the handler

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (once; only the main thread may), and start the watchdog thread."""
        if not self._installed:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handle)
            self._installed = True
            self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        """Python runs a signal handler in the main thread between bytecodes only: in a long native call (the
        tokenizers' training and batch encoding, a pandas or torch operation) it would wait for the call to end,
        seconds to minutes. The C-level handler writes each signal's number to a pipe at once (``set_wakeup_fd``);
        this thread reads it, and when the main thread has not ended within :attr:`grace_s` of a signal that
        should have stopped it (outside a training loop, no checkpoint being written), it prints the one line
        and ends the process. Every file is written atomically, so nothing half-written is left to be read."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            os.close(r)
            os.close(w)
            return
        threading.Thread(target=self._watch, args=(r,), name="signal-watchdog", daemon=True).start()

    def _watch(self, fd: int) -> None:
        while data := os.read(fd, 64):
            t_read, signum, collecting = time.monotonic(), data[-1], self._collecting
            if signum not in (signal.SIGINT, signal.SIGTERM) or signal.getsignal(signum) != self._handle:
                continue  # another handler's signal (this policy was replaced)
            while time.monotonic() < t_read + self.grace_s or self._critical:
                time.sleep(0.05)
            # The main thread ran the handler for this signal (it stops, or a training loop checkpoints after its
            # step), or the outcome is being reported: nothing to do. Else it is stuck in native code: end it here.
            if collecting or self._collecting or self.ending or self._handled_t > t_read - 0.25:
                continue
            self.ending = True
            print(interrupted_line(signal.Signals(self.signum or signum).name), file=sys.stderr, flush=True)
            sys.stdout.flush()
            FATAL.disarm()  # not a fatal signal: peers under a launcher must not report this process as dead
            os._exit(128 + (self.signum or signum))

    def reset(self) -> None:
        self.signum, self._first_t, self._pending, self.ending = None, None, False, False

    def end(self) -> None:
        """The process is ending (its outcome decided, being reported): signals from now on are dropped. Where a
        signal may already be on its way (the first statement of an ``except`` that reports), set :attr:`ending`
        with a plain store instead: Python runs a pending handler at a call's entry, so ``end()`` itself could
        raise the very interrupt it is meant to drop (seen once under a launcher, whose SIGINT to rank 0 followed
        rank 1's death)."""
        self.ending = True

    def _handle(self, signum, frame):
        self._handled_t = time.monotonic()  # the main thread is not stuck: the watchdog leaves it be
        if self.ending:
            return
        now = time.monotonic()
        if self._first_t is not None and now - self._first_t < self.window_s:
            return  # the first signal again, forwarded
        first = self._first_t is None
        if first:
            self.signum, self._first_t = signum, now
            if self._collecting:
                return  # the loop checkpoints and stops after this step
        if self._critical:
            self._pending = True  # after the checkpoint is written
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def collecting(self):
        """A training loop: the first signal sets the flag instead of raising."""
        self.install()
        self._collecting = True
        try:
            yield self
        finally:
            self._collecting = False

    @contextlib.contextmanager
    def critical(self):
        """A write that a forced exit must not cut (a checkpoint): a forcing signal waits for its end."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            if not self._critical and self._pending:
                self._pending = False
                raise KeyboardInterrupt

    def ignore(self) -> None:
        """Ignore SIGINT and SIGTERM from now on: called as the process exits after an interrupt, because a
        forwarded copy may still be on its way, and Python restores the default handlers (death by the signal)
        while it shuts down, but leaves ignored signals ignored."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    @property
    def exit_code(self) -> int:
        """128 + the first signal (130 for SIGINT, 143 for SIGTERM); 130 when none was received."""
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name


SIGNALS = Signals()


class FatalLogs:
    """What a process killed by a fatal signal leaves behind, under a launcher. An abort inside C++ code (the
    distributed stack's "terminate called ...", found once in CI as rank 1 shut down) or a segfault ends a
    process without any Python ``except``: it cannot report itself, and the launcher then stops the others with
    SIGTERM, so the user would read "interrupted (SIGTERM)" from the main process and a launcher traceback.
    Each process arms :mod:`faulthandler` into ``<output_dir>/logs/rank<k>-fatal.log`` (emptied at start,
    removed when the process ends without one); a process stopped that way reads the others' logs
    (:meth:`dead_peers`) and reports the death in one line."""

    def __init__(self):
        self.path: Path | None = None
        self._file = None
        self._t0 = time.time()

    def arm(self, output_dir: str, rank: int) -> None:
        import faulthandler

        path = Path(output_dir) / "logs" / f"rank{rank}-fatal.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w")
        except OSError:
            return  # output dirs are checked before this: nothing better to do than run unarmed
        faulthandler.enable(file=self._file, all_threads=True)
        self.path = path

    def disarm(self) -> None:
        """The process ends normally: the (empty) log goes."""
        if self._file is None:
            return
        import faulthandler

        faulthandler.disable()
        self._file.close()
        self._file = None
        if self.path.stat().st_size == 0:
            self.path.unlink()

    def dead_peers(self, output_dir: str, rank: int) -> dict[int, str]:
        """``{rank: first line}`` of every other process whose fatal log of this run (written after this process
        started) has content, e.g. ``{1: "Fatal Python error: Aborted"}``."""
        dead = {}
        for path in sorted((Path(output_dir) / "logs").glob("rank*-fatal.log")):
            try:
                k, stat = int(path.name[4:].split("-")[0]), path.stat()
                text = path.read_text(errors="replace") if stat.st_mtime >= self._t0 else ""
            except (OSError, ValueError):
                continue
            if k != rank and text.strip():
                dead[k] = text.strip().splitlines()[0]
        return dead


FATAL = FatalLogs()

_CUT_NOTED: set[str] = set()


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def strict_json(obj, indent: int | None = None) -> str:
    """``json.dumps`` that every JSON parser reads: a NaN or infinite number (an empty cell, a std of one seed)
    is written ``null``, never Python's ``NaN``."""
    return json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False)


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl file (an empty list if it does not exist). A last line cut mid-write (the run
    was killed while appending it) is skipped, and said once per file; a bad line elsewhere is a ``ValueError``."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON; the file was not written by a training "
                                 f"run, or was edited") from None
            if str(path) not in _CUT_NOTED:
                _CUT_NOTED.add(str(path))
                print(f"note: {path}: its last line was cut mid-write (the run was killed); skipped",
                      file=sys.stderr)
    return rows


def read_results(path) -> dict:
    """A results.json written by main.py, or a one-line ``ValueError`` naming the problem (missing, not JSON,
    not an object) for the caller to print; ``--plots-only`` and the scripts under ``scripts/`` read it here."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no {path}: train first (uv run main.py ...), which writes it")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a results.json written by main.py ({type(e).__name__}: {e}); "
                         f"rerun the training that writes it") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds a JSON {type(results).__name__}, not the object main.py writes")
    return results


def check_output_dirs(dirs: dict[str, str]) -> None:
    """Check, before any work, that each output directory can be written: it, or the nearest part of its path
    that exists, must be a directory in which a file can be created (one is, then removed: nothing is left
    behind, and a run refused later for bad input has made no directories). A file in its place, a parent that
    is a file, or a directory that refuses writes is a ``ValueError`` naming the flag, for main.py to print in
    one line. ``dirs`` maps a flag (``--plots_dir``) to its path."""
    import tempfile

    for flag, path in dirs.items():
        p = Path(path).absolute()
        long = next((part for part in p.parts if len(part.encode()) > 255), None)  # NAME_MAX of every common FS
        if len(str(p).encode()) >= 4096 or long:
            raise ValueError(f"{flag} is too long a path ({len(str(p))} characters"
                             f"{f', one name of {len(long)}' if long else ''}; the system takes 255 a name and 4095 "
                             f"in all): give {flag} a shorter path")
        if p.exists() and not p.is_dir():
            raise ValueError(f"{flag} {path} is a file, not a directory: give {flag} a directory")
        found = next(q for q in (p, *p.parents) if q.exists())
        if not found.is_dir():
            raise ValueError(f"{flag} {path} lies under {found}, a file: give {flag} a directory")
        try:
            with tempfile.NamedTemporaryFile(dir=found, prefix=".write_check_"):
                pass
        except OSError as e:
            raise ValueError(f"{flag} {path} cannot be written ({e.strerror or e} in {found}): give {flag} a "
                             f"directory you can write") from None


class MetricsLog:
    """Appends one flat JSON dict per step to ``metrics.jsonl`` (main process only) and sends the same
    names to the experiment trackers of ``--report_to`` (TensorBoard, W&B) through accelerate.

    On resume, rows after the checkpoint's step are dropped first, so a resumed run's file ends up equal
    to an uninterrupted run's.
    """

    def __init__(self, path: Path, resume_step: int | None = None, acc=None, run_name: str = "run",
                 config: dict | None = None):
        self.path, self.acc = Path(path), acc
        self.main = acc is None or acc.is_main_process
        if acc is not None and acc.log_with:
            # one tracker run per training run; the config is logged as (flattened, scalar) hyperparameters
            flat = {f"{sec}/{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                    for sec, fields_ in (config or {}).items() for k, v in fields_.items()}
            acc.init_trackers(run_name.replace("/", "_"), config=flat)
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole or not at all (a kill here leaves the old file for the next resume), its rows read by the
        # one rule of read_metrics: a cut last line is skipped, any other bad line is an error naming it.
        try:
            kept = [] if resume_step is None else [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        except ValueError as e:
            raise StopTraining(f"cannot resume: {e}; move the run's directory away to start it over", 2) from None
        atomic_write_text(self.path, "".join(strict_json(r) + "\n" for r in kept))

    def log(self, row: dict) -> None:
        if self.acc is not None and self.acc.log_with:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.main:
            with self.path.open("a") as fh:
                fh.write(strict_json(row) + "\n")

    def close(self) -> None:
        """End this run's tracker runs (the next training run opens its own)."""
        if self.acc is not None and self.acc.log_with:
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.trackers = []
