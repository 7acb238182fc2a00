"""Plumbing shared by the training loops: seeding, metrics.jsonl, checkpoints, atomic saves, signals."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from config import StopTraining  # noqa: F401  (re-exported for the training loops)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_indices(step: int, batch: int, n: int, seed: list[int]) -> list[int]:
    """Indices of the ``batch`` items used at ``step`` (1-based): epochs are seeded permutations of
    ``range(n)`` walked in order. A pure function of the step, so resuming needs no saved data position."""
    first = (step - 1) * batch
    epoch, offset = divmod(first, n)
    n_epochs = math.ceil((offset + batch) / n)
    order = np.concatenate([np.random.default_rng([*seed, epoch + e]).permutation(n) for e in range(n_epochs)])
    return order[offset:offset + batch].tolist()


class MetricsLog:
    """Appends one flat JSON dict per step to ``metrics.jsonl``.

    On resume, rows after the checkpoint's step are dropped first, so a resumed run's file ends up equal
    to an uninterrupted run's.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            rows = [r for r in self.path.read_text().splitlines() if r.strip()] if self.path.exists() else []
            kept = []
            for r in rows:
                try:
                    row = json.loads(r)
                except json.JSONDecodeError:  # the line being written when the process was killed
                    continue
                if row["step"] <= resume_step:
                    kept.append(r)
            self.path.write_text("".join(r + "\n" for r in kept))

    def log(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final`` so that at every moment one complete version exists on disk."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_dir(final: Path, write) -> None:
    """Call ``write(tmp_dir)`` and move the result to ``final``; on any exception ``final`` is untouched."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, final)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Atomically write ``state`` (model/optimiser/... state dicts, RNG) as ``checkpoints/step-N``."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    atomic_write_dir(final, lambda tmp: torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt"))
    for old in sorted(ckpt_root.glob("step-???????"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_or_start(run_dir: Path, resume: bool, stateful: dict, setup_s: float = 0.0, name: str = "run"):
    """Load the latest checkpoint into each object of ``stateful`` (anything with ``load_state_dict``) and
    restore every RNG; returns ``(start_step, timer, consecutive_bad, resumed)``. Without ``resume`` (or a
    checkpoint) it starts from step 0 with a timer that already counts ``setup_s`` of training."""
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is None:
        return 0, Timer(setup_s), 0, False
    state = load_checkpoint(ckpt)
    for key, obj in stateful.items():
        obj.load_state_dict(state[key])
    set_rng_state(state["rng"])
    print(f"{name}: resuming from {ckpt} (step {state['step']})")
    return state["step"], Timer(state["elapsed"], state["eval_s"]), state["consecutive_bad"], True


def checkpoint(run_dir: Path, step: int, stateful: dict, timer: "Timer", consecutive_bad: int, keep: int) -> Path:
    """Save the state dicts of ``stateful`` plus the timer and the non-finite counter (see save_checkpoint)."""
    state = {key: obj.state_dict() for key, obj in stateful.items()}
    return save_checkpoint(run_dir, step, {**state, "elapsed": timer.elapsed, "eval_s": timer.eval_s,
                                           "consecutive_bad": consecutive_bad}, keep)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-???????"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(Path(path) / "state.pt", weights_only=False)


class SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (so a checkpoint can be written)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: give up on the clean exit
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class Timer:
    """Training wall time of a run, without its evaluations, surviving resumes (both sums are checkpointed).

    Time spent inside ``with timer.evaluating():`` is counted in ``eval_s`` and left out of ``elapsed``.
    """

    def __init__(self, already: float = 0.0, eval_s: float = 0.0):
        self.start, self.already, self.eval_s, self._paused = time.time(), already, eval_s, 0.0

    @property
    def elapsed(self) -> float:
        return self.already + time.time() - self.start - self._paused

    @contextmanager
    def evaluating(self):
        t0 = time.time()
        try:
            yield
        finally:
            self._paused += time.time() - t0
            self.eval_s += time.time() - t0
