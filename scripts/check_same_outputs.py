"""Do two versions of the code train and evaluate to the same numbers? (issue 19: a refactor changes no output)

    uv run scripts/check_same_outputs.py OLD_REV [NEW_REV]     # NEW_REV default: the working tree as it is

Each version is exported to its own temporary directory and run there with this interpreter, every run in a
fresh output directory (so every smoke model, reward model and reference cache is built anew):

* ``smoke``: ``--preset smoke --dtype fp32 --threads 2``;
* ``sweep``: the same with ``--sweep --seeds 0 1`` (fixed KL coefficients, PPO-GT, the reward model reused);
* ``resume_dpo`` / ``resume_ppo``: a run killed with SIGKILL once its DPO (PPO) run has a checkpoint, then
  resumed with ``--resume``;
* the OLD version's killed directories resumed by the NEW version, with the same command (checkpoints written
  before the change still resume).

Compared, file by file (same relative paths, so hash-keyed cache names must match too): every metrics.jsonl,
results.json, train_summary.json, rm_report.json, training_config.json, and the saved weights, tensor for
tensor. JSON values must be equal exactly, except the wall-clock and provenance fields in ``EXCLUDED``.
Checkpoint directories are not compared (the kill time decides which exist). Exit code 0 when all agree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from runtime.run_log import read_metrics  # noqa: E402

BASE = ("--preset", "smoke", "--dtype", "fp32", "--threads", "2")
SCENARIOS = {"smoke": BASE, "sweep": (*BASE, "--sweep", "--seeds", "0", "1")}
# killed when the run's checkpoints reach this step, then resumed
KILLS = {"resume_dpo": (("--save_every", "3"), "dpo_toxic_reduced_model", 6),
         "resume_ppo": (("--save_every", "3", "--ppo_steps", "9"), "ppo_toxic_reduced_model", 3)}
# Wall-clock and provenance fields, by name: everything else must be equal to the last bit.
EXCLUDED = {"time_s", "pairs_per_s", "train_time_s", "eval_time_s", "ref_logps_s", "rm_train_s", "rm_test_s",
            "train_s", "test_s", "build_s", "charts/generation_s", "charts/logps_s", "charts/score_s",
            "charts/update_s", "charts/tokens_per_s", "command", "machine"}
JSON_FILES = ("metrics.jsonl", "results.json", "train_summary.json", "rm_report.json", "training_config.json")
WEIGHT_FILES = ("model.safetensors", "value_head.pt")


def export(rev: str | None, dest: Path) -> Path:
    """The tree of ``rev`` (None: the working tree, tracked and untracked-but-not-ignored files) in ``dest``,
    with the IMDb data linked in."""
    dest.mkdir(parents=True)
    if rev is None:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split("\0")
        for f in filter(None, files):
            if (ROOT / f).is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, dest / f)
    else:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "data").mkdir(exist_ok=True)
    csv = (ROOT / "data" / "IMDB Dataset.csv").resolve()
    if not csv.exists():
        sys.exit("error: data/IMDB Dataset.csv is missing: link or copy the IMDb CSV there first")
    (dest / "data" / "IMDB Dataset.csv").unlink(missing_ok=True)
    (dest / "data" / "IMDB Dataset.csv").symlink_to(csv)
    return dest


def out_args(name: str) -> list[str]:
    return ["--output_dir", f"out/{name}/models", "--plots_dir", f"out/{name}/plots"]


def run(tree: Path, args: list[str], what: str) -> None:
    t0 = time.time()
    p = subprocess.run([sys.executable, "main.py", *args], cwd=tree, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": "0"})
    if p.returncode != 0:
        sys.exit(f"error: {what} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    print(f"  {what}: {time.time() - t0:.0f}s", flush=True)


def run_killed(tree: Path, args: list[str], run_name: str, at_step: int, what: str) -> None:
    """Start a run, SIGKILL it once ``run_name`` has a checkpoint at ``at_step`` or later."""
    ckpts = tree / args[args.index("--output_dir") + 1] / "runs" / run_name / "checkpoints"
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=tree, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not any(int(c.name[5:]) >= at_step for c in ckpts.glob("step-???????")):
        if proc.poll() is not None or time.time() > deadline:
            sys.exit(f"error: {what} ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"  {what}: killed after {min(int(c.name[5:]) for c in ckpts.glob('step-???????'))}+", flush=True)


def run_version(tree: Path, label: str, keep_killed: Path | None = None) -> None:
    print(f"{label}: {tree}", flush=True)
    for name, args in SCENARIOS.items():
        run(tree, [*args, *out_args(name)], f"{label} {name}")
    for name, (extra, run_name, at_step) in KILLS.items():
        args = [*BASE, *extra, *out_args(name)]
        run_killed(tree, args, run_name, at_step, f"{label} {name} (killed)")
        if keep_killed is not None:
            shutil.copytree(tree / "out" / name, keep_killed / name, symlinks=True)
        run(tree, [*args, "--resume"], f"{label} {name} (resumed)")


def compare_json(a, b, where: str, diffs: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in EXCLUDED:
                continue
            if k not in a or k not in b:
                diffs.append(f"{where}.{k}: only in {'new' if k in b else 'old'}")
            else:
                compare_json(a[k], b[k], f"{where}.{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{where}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            compare_json(x, y, f"{where}[{i}]", diffs)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        pass
    elif a != b or type(a) is not type(b):
        diffs.append(f"{where}: {a!r} vs {b!r}")


def load_json(path: Path):
    if path.suffix == ".jsonl":
        return read_metrics(path)
    return json.loads(path.read_text())


def load_weights(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    return load_file(path) if path.suffix == ".safetensors" else torch.load(path)


def compared_files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts
            and p.name in (*JSON_FILES, *WEIGHT_FILES)}


def compare_trees(old: Path, new: Path, name: str) -> list[str]:
    import torch

    diffs = []
    a, b = compared_files(old), compared_files(new)
    diffs += [f"{name}/{f}: only in old" for f in sorted(a - b)] + [f"{name}/{f}: only in new" for f in sorted(b - a)]
    for f in sorted(a & b):
        if f.endswith(WEIGHT_FILES):
            wa, wb = load_weights(old / f), load_weights(new / f)
            if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
                diffs.append(f"{name}/{f}: weights differ")
        else:
            compare_json(load_json(old / f), load_json(new / f), f"{name}/{f}", diffs)
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="the version before the change (a git revision)")
    ap.add_argument("new", nargs="?", help="the version after it (a git revision; default: the working tree)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary trees (their path is printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="same_outputs-"))
    t0 = time.time()
    try:
        old = export(args.old, tmp / "old")
        new = export(args.new, tmp / "new")
        run_version(old, f"old ({args.old})", keep_killed=tmp / "killed_by_old")
        run_version(new, f"new ({args.new or 'working tree'})")
        # The old version's killed runs, resumed by the new code with the very same command (in a third copy of
        # the new tree, so that every path, and so the saved config, is the same as in the old one's resume).
        cross = export(args.new, tmp / "cross")
        for name, (extra, _, _) in KILLS.items():
            shutil.copytree(tmp / "killed_by_old" / name, cross / "out" / name, symlinks=True)
            run(cross, [*BASE, *extra, *out_args(name), "--resume"], f"new {name} from the old checkpoint")
        diffs, n_files = [], 0
        for name in [*SCENARIOS, *KILLS]:
            diffs += compare_trees(old / "out" / name, new / "out" / name, name)
            n_files += len(compared_files(old / "out" / name))
        for name in KILLS:
            diffs += compare_trees(old / "out" / name, cross / "out" / name, f"{name} (old checkpoint, new code)")
        if diffs:
            print(f"DIFFERENT: {len(diffs)} differences", *diffs[:50], sep="\n")
            return 1
        print(f"SAME: {n_files} files in {len(SCENARIOS) + len(KILLS)} scenarios, plus old checkpoints resumed by "
              f"the new code, agree (excluding {', '.join(sorted(EXCLUDED))}); {time.time() - t0:.0f}s")
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
