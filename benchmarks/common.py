"""What the benchmark scripts share: peak-memory measurement and the machine's description."""

from __future__ import annotations

import os
import platform
import threading
import time

import torch


class PeakMemory:
    """Peak memory while the block runs: ``torch.cuda.max_memory_allocated`` on a GPU, else this process's
    resident set size (RSS) sampled every 10 ms. ``.peak_mb`` after the block."""

    def __init__(self, device="cpu"):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._peak, self._proc.memory_info().rss) / 2**20


def machine(device="cpu") -> dict:
    """CPU model and core count, torch version and threads, and the GPU's name when on one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out
