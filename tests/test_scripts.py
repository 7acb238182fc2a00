"""Every script under scripts/ and benchmarks/ answers --help, and every benchmark runs one tiny step: a preset
change cannot break them silently (the offline preset's 256 validation prompts once broke bench_dpo.py at both
sizes, and the paper-scale benchmark's --max_reviews, with no test to notice)."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_imdb


def _entry_points(folder: str) -> list[Path]:
    """The runnable files of ``folder`` (a module of helpers, such as benchmarks/common.py, is not one)."""
    return sorted(p for p in (ROOT / folder).iterdir()
                  if p.suffix == ".sh" or (p.suffix == ".py" and 'if __name__ == "__main__"' in p.read_text()))


def _run(path: Path, *args: str, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    cmd = ["bash", str(path)] if path.suffix == ".sh" else [sys.executable, str(path)]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("path", _entry_points("scripts") + _entry_points("benchmarks"), ids=lambda p: p.name)
def test_every_script_and_benchmark_answers_help(path):
    proc = _run(path, "--help", timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) >= 2, proc.stdout


# One tiny step of each benchmark: the smoke preset's models (or toy shapes), TRL left out (it is not installed
# with the dev group; bench_ppo times ours alone without it).
TINY = {
    "bench_dpo.py": ["--size", "smoke", "--steps", "2", "--batch", "4", "--repeats", "1", "--trainers", "ours"],
    "bench_ppo.py": ["--size", "smoke", "--iters", "1", "--repeats", "1"],
    "bench_processes.py": ["--size", "smoke", "--work", "dpo", "--steps", "2", "--evals", "2"],
    "profile_dpo_step.py": ["--size", "smoke", "--steps", "1", "--batch", "2"],
    "bench_paper_scale.py": ["--tiny", "--max_reviews", "400", "--steps", "1", "--rm_steps", "1", "--dtype", "fp32"],
    "bench_dtype_cpu.py": ["--shapes", "judge", "--steps", "1", "--repeats", "1"],
    "bench_kernel_pinning.py": ["--settings", "default", "--no-timing"],
}


def test_every_benchmark_has_a_tiny_step():
    assert {p.name for p in _entry_points("benchmarks")} == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_benchmark_runs_one_tiny_step(name, tmp_path):
    require_imdb()
    proc = _run(ROOT / "benchmarks" / name, *TINY[name], cwd=tmp_path)  # its models/ built there
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.strip(), "a benchmark prints its numbers"
