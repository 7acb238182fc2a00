"""Plumbing shared by the training loops: seeding, metrics.jsonl, checkpoints, atomic saves, signals."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
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


def step_indices(step: int, batch: int, n: int, seed: list[int]) -> list[int]:
    """Indices of the ``batch`` items used at ``step`` (1-based): epochs are seeded permutations of
    ``range(n)`` walked in order. A pure function of the step, so resuming needs no saved data position."""
    first = (step - 1) * batch
    epoch, offset = divmod(first, n)
    n_epochs = math.ceil((offset + batch) / n)
    order = np.concatenate([np.random.default_rng([*seed, epoch + e]).permutation(n) for e in range(n_epochs)])
    return order[offset:offset + batch].tolist()


# ------------------------------------------------------------------------------- processes (accelerate)
def make_accelerator(device: torch.device, report_to: str = "none", output_dir="models"):
    """The run's :class:`accelerate.Accelerator`: one process for ``uv run main.py``; N data-parallel
    processes under ``accelerate launch`` or ``torchrun`` (DDP, or FSDP from an accelerate config file). On a
    CPU it forms a gloo group (``cpu=True``); trackers (``--report_to``) write under ``<output_dir>/tracking``.

    Processes other than the main one print nothing and show no progress bars."""
    import importlib.util

    from accelerate import Accelerator

    need = {"tensorboard": ("tensorboard", "uv sync --group tensorboard"),
            "wandb": ("wandb", "uv sync --group wandb")}
    if report_to in need and importlib.util.find_spec(need[report_to][0]) is None:
        raise StopTraining(f"--report_to {report_to} needs the {need[report_to][0]} package: {need[report_to][1]}, "
                           f"or --report_to none", 2)
    acc = Accelerator(cpu=device.type == "cpu", log_with=None if report_to == "none" else report_to,
                      project_dir=str(Path(output_dir) / "tracking"))
    if not acc.is_main_process:
        # stdout goes nowhere (tqdm.write too) and progress bars are off; stderr stays, so that a crash on any
        # process still shows where it happened. tqdm reads TQDM_* variables when it is imported, which it
        # already is here: its constructor's default is changed instead.
        from functools import partialmethod

        from tqdm import tqdm as std_tqdm

        sys.stdout = open(os.devnull, "w")
        std_tqdm.__init__ = partialmethod(std_tqdm.__init__, disable=True)
    return acc


def local_share(items: list, acc) -> list:
    """This process's contiguous share of a global batch (``len(items)`` must divide by the process count:
    every process then takes the same number, so the mean of the processes' mean losses is the global mean)."""
    n, k = len(items), acc.num_processes
    assert n % k == 0, f"a batch of {n} does not split over {k} processes"
    return items[acc.process_index * (n // k):(acc.process_index + 1) * (n // k)]


def padded_share(items: list, acc) -> list:
    """This process's contiguous share of ``items``, the last share padded by repeating its last item so that
    every process runs the same number of forward passes (FSDP needs that); :func:`gather_share` drops the
    padding again."""
    if acc is None or acc.num_processes == 1:
        return list(items)
    k = acc.num_processes
    size = -(-len(items) // k)
    share = items[acc.process_index * size:(acc.process_index + 1) * size] or items[-1:]
    return share + share[-1:] * (size - len(share))


def gather_share(share: list, n: int, acc) -> list:
    """The inverse of :func:`padded_share`: every process gets all ``n`` results, in the original order."""
    if acc is None or acc.num_processes == 1:
        return share[:n]
    from accelerate.utils import gather_object

    return gather_object(share)[:n]


def chunk_share(n: int, chunk: int, acc) -> list[list[int]]:
    """This process's chunks of the indices 0..n-1: chunks of ``chunk`` consecutive indices, chunk c going to
    process c mod k. A chunk is the same set of items whatever the process count, so a batched computation
    on it (its padding, its batch) is too. Every process gets the same number of chunks (FSDP needs that):
    one short of it repeats one of its own, or chunk 0; :func:`gather_indexed` drops the repeats."""
    chunks = [list(range(s, min(s + chunk, n))) for s in range(0, n, chunk)]
    if acc is None or acc.num_processes == 1:
        return chunks
    k, r = acc.num_processes, acc.process_index
    mine = chunks[r::k]
    rounds = -(-len(chunks) // k)
    return mine + [(mine or chunks)[-1]] * (rounds - len(mine))


def gather_indexed(results: dict, n: int, acc) -> list:
    """Every process's ``{index: result}`` merged and returned in index order 0..n-1, on every process (the
    inverse of :func:`chunk_share`)."""
    if acc is not None and acc.num_processes > 1:
        from accelerate.utils import gather_object

        merged = {}
        for part in gather_object([results]):
            merged.update(part)
        results = merged
    return [results[i] for i in range(n)]


def mean_over_processes(x, acc):
    """The mean over processes of a number, or of each value of a dict of numbers (one all-reduce)."""
    if acc.num_processes == 1:
        return x
    keys = list(x) if isinstance(x, dict) else None
    values = torch.tensor([float(x[k]) for k in keys] if keys else [float(x)], device=acc.device)
    values = acc.reduce(values, "mean").tolist()
    return dict(zip(keys, values)) if keys else values[0]


def any_process(flag: bool, acc) -> bool:
    """True on every process when it is true on one (to stop all processes at the same step)."""
    if acc.num_processes == 1:
        return flag
    return acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item() > 0


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
        if self.acc is not None and self.acc.log_with:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.main:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def close(self) -> None:
        """End this run's tracker runs (the next training run opens its own)."""
        if self.acc is not None and self.acc.log_with:
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.trackers = []


def save_policy(acc, policy, tok, cfg, run_dir: Path, final_dir: Path, summary: dict) -> None:
    """Write a trained :class:`logprobs.ResponseLogProbs` policy atomically into ``final_dir``: the LM with
    ``save_pretrained`` (and ``value_head.pt`` if it has one), its tokenizer, the resolved config, the run's
    metrics and its summary. Every process takes part in gathering the weights (FSDP shards them); the
    main process writes."""
    state = acc.get_state_dict(policy)
    if acc.is_main_process:
        model = acc.unwrap_model(policy)

        def write(tmp: Path):
            model.lm.save_pretrained(tmp, state_dict={k[3:]: v for k, v in state.items() if k.startswith("lm.")})
            if model.v_head is not None:
                torch.save({k[7:]: v for k, v in state.items() if k.startswith("v_head.")}, tmp / "value_head.pt")
            tok.save_pretrained(tmp)
            cfg.save(tmp / "training_config.json")
            (tmp / "metrics.jsonl").write_text((Path(run_dir) / "metrics.jsonl").read_text())
            (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2))

        atomic_write_dir(final_dir, write)
    acc.wait_for_everyone()
    acc.free_memory()  # forget this run's prepared model and optimiser: the next run's save_state is its own


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


def checkpoint(acc, run_dir: Path, step: int, timer: Timer, consecutive_bad: int, keep: int,
               extra: dict | None = None) -> Path:
    """Atomically write ``checkpoints/step-N``: accelerate's ``save_state`` (the prepared model and optimiser,
    sharded or gathered as the FSDP config says, and every process's RNG states) plus ``meta.pt`` (step,
    timer, non-finite counter and the state dicts of ``extra``: scheduler, KL controller). Every process
    calls it; the main one renames the finished directory into place and deletes all but the last ``keep``."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if acc.is_main_process:
        meta = {"step": step, "elapsed": timer.elapsed, "eval_s": timer.eval_s, "consecutive_bad": consecutive_bad,
                **{k: obj.state_dict() for k, obj in (extra or {}).items()}}
        torch.save(meta, tmp / "meta.pt")
        _replace_dir(tmp, final)
        for old in sorted(root.glob("step-???????"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def resume_or_start(acc, run_dir: Path, resume: bool, setup_s: float = 0.0, name: str = "run",
                    extra: dict | None = None):
    """With ``resume`` and a checkpoint: load it into the prepared model and optimiser (accelerate's
    ``load_state``, which also restores each process's RNG) and into the objects of ``extra``; returns
    ``(start_step, timer, consecutive_bad, resumed)``. Otherwise step 0, with a timer that already counts
    ``setup_s`` of training."""
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is None:
        if resume:  # say so: a mistyped --output_dir would otherwise retrain silently
            print(f"{name}: nothing to resume in {Path(run_dir) / 'checkpoints'}; starting from scratch")
        return 0, Timer(setup_s), 0, False
    acc.load_state(str(ckpt))
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    for key, obj in (extra or {}).items():
        obj.load_state_dict(meta[key])
    print(f"{name}: resuming from {ckpt} (step {meta['step']})")
    return meta["step"], Timer(meta["elapsed"], meta["eval_s"]), meta["consecutive_bad"], True


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-???????"))
    return ckpts[-1] if ckpts else None


class SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (so a checkpoint can be written).

    A second signal gives up on the clean exit, except under a launcher (``torchrun``/``accelerate launch``):
    it passes the user's Ctrl-C on to every process, which then sees it twice, and it kills processes that
    outstay its own shutdown timeout anyway."""

    def __init__(self):
        self.signum: int | None = None
        self.launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and not self.launched:  # a second Ctrl-C: give up on the clean exit
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
