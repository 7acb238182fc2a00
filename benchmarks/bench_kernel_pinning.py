"""Do fp32 numbers depend on the thread count or on which CPU kernels run, and what does pinning cost?

    uv run benchmarks/bench_kernel_pinning.py                 # smoke runs under each setting, then step times
    uv run benchmarks/bench_kernel_pinning.py --settings default threads1 --no-timing

Each setting runs the same ``main.py --preset smoke --dtype fp32`` (DPO and PPO, from the same prebuilt smoke
models) in a fresh process with a different environment, then every number of every ``metrics.jsonl`` row
(timings excluded) and every per-prompt score of ``results.json`` is compared with the ``default`` setting's.
A setting that changes nothing prints ``identical``. Then a training step of the offline GPT-2's shape is
timed under each setting (``benchmarks/bench_dtype_cpu.py --shapes offline_lm offline_dpo``, fp32 column).

Settings: ``default`` (this machine's own kernels and threads); ``threads1`` (one torch thread);
``avx2`` (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_CBWR=AVX2``: the kernels an
AVX2-only CPU runs, on any newer x86 CPU). Asserts nothing; prints what it measured and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from runtime.run_log import read_metrics  # noqa: E402

SETTINGS = {
    "default": {},
    "threads1": {"OMP_NUM_THREADS": "1"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
}
SKIP = ("time", "per_s", "_s")  # wall-clock keys: time_s, pairs_per_s, charts/generation_s, ...


def numbers(out: Path) -> dict:
    """Every non-timing number of the run: metrics rows by (run, step, key), per-prompt scores by model."""
    found = {}
    for path in sorted((out / "models").glob("*_toxic_reduced_model/metrics.jsonl")):
        for row in read_metrics(path):
            for k, v in row.items():
                if isinstance(v, (int, float)) and not any(k.endswith(s) or s == k for s in SKIP):
                    found[(path.parent.name, row["step"], k)] = v
    results = json.loads((out / "plots" / "results.json").read_text())
    for model in ("reference", "dpo", "ppo"):
        for i, v in enumerate(results[model]["per_prompt"]["scores"]):
            found[(model, "score", i)] = v
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--no-timing", action="store_true", help="compare the numbers only")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kernel_pinning_"))
    base = [sys.executable, str(ROOT / "main.py"), "--preset", "smoke", "--dtype", "fp32"]
    print("building the smoke models once", file=sys.stderr)
    subprocess.run([*base, "--dpo-only", "--dpo_steps", "1", "--output_dir", str(work / "build" / "models"),
                    "--plots_dir", str(work / "build" / "plots")], check=True, capture_output=True, cwd=ROOT)
    runs, summary = {}, {"settings": {}}
    for name in args.settings:
        out = work / name
        shutil.copytree(work / "build" / "models" / "offline", out / "models" / "offline")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **SETTINGS[name]}
        t0 = time.time()
        proc = subprocess.run([*base, "--output_dir", str(out / "models"), "--plots_dir", str(out / "plots")],
                              env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        runs[name] = numbers(out)
        entry = {"env": SETTINGS[name], "smoke_wall_s": round(time.time() - t0, 1)}
        if name != "default" and "default" in runs:
            a, b = runs["default"], runs[name]
            diff = [k for k in a if a[k] != b.get(k)]
            entry.update(compared=len(a), differing=len(diff),
                         first_differing=[list(map(str, k)) for k in sorted(diff, key=str)[:5]],
                         max_abs_diff=max((abs(a[k] - b[k]) for k in diff if k in b), default=0.0))
            print(f"{name:9s} vs default: " + ("identical" if not diff else
                  f"{len(diff)} of {len(a)} numbers differ (max |diff| {entry['max_abs_diff']:.3g}), "
                  f"first: {entry['first_differing'][0]}"), flush=True)
        summary["settings"][name] = entry
    if not args.no_timing:
        for name in args.settings:
            env = {**os.environ, **SETTINGS[name]}
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_dtype_cpu.py"), "--shapes", "offline_lm",
                   "offline_dpo", "--steps", "8", "--precisions", "fp32"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            shapes = json.loads(proc.stdout.strip().splitlines()[-1])["shapes"]
            summary["settings"][name]["fp32_step_s"] = {s["shape"]: s["fp32_step_s"] for s in shapes}
            print(f"{name:9s} fp32 step: " + ", ".join(f"{s['shape']} {s['fp32_step_s'] * 1e3:.0f} ms" for s in shapes),
                  flush=True)
    sys.path.insert(0, str(ROOT))
    from modeling.models import machine_info

    summary["machine"] = machine_info()
    print(json.dumps(summary))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
