"""Seeding, data order and processes: the accelerator, each process's share of a batch, and reductions over
processes. The lifecycle of a run (checkpoints, metrics, saving) is ``training/lifecycle.py``."""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from runtime.run_log import StopTraining


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


def fsdp_world(acc) -> bool:
    """Several FSDP processes: their generate() calls must step together (``synced_gpus``)."""
    return acc is not None and acc.num_processes > 1 and acc.distributed_type.name == "FSDP"


def spread_over_processes(values: torch.Tensor, acc) -> dict:
    """``{"sync/spread": ...}``: the largest difference between processes of any entry of ``values`` (n,), numbers
    every process must hold equal (0 when they do); nothing on one process."""
    if acc.num_processes == 1:
        return {}
    every = acc.gather(values.to(acc.device).unsqueeze(0))
    return {"sync/spread": (every.max(0).values - every.min(0).values).abs().max().item()}


def process_sum(acc):
    """A function summing a tensor over the processes (an all-reduce), or None on one process."""
    return (lambda t: acc.reduce(t, "sum")) if acc.num_processes > 1 else None


class NonFiniteGuard:
    """The non-finite guard of a loop outside the lifecycle (the offline builders): :meth:`finite` says whether a
    step's loss and gradient norm are finite (the caller then steps, or skips the step and leaves the weights and
    optimiser moments untouched), and after ``limit`` consecutive non-finite steps stops the loop with a
    one-line ``StopTraining`` naming the learning-rate flag (exit 1)."""

    def __init__(self, what: str, lr_flag: str, limit: int = 5):
        self.what, self.lr_flag, self.limit, self.bad = what, lr_flag, limit, 0

    def finite(self, loss: float, grad_norm: float, step: int) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.bad = 0
            return True
        self.bad += 1
        if self.bad >= self.limit:
            raise StopTraining(f"{self.what}: {self.bad} consecutive steps had a non-finite loss or gradient (last "
                               f"at step {step}); lower {self.lr_flag} and run again", 1)
        return False
