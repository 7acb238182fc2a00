"""Recompute the study's paired intervals from the per-prompt scores in results.json, and split their width by
level: how wide would each interval be from prompt sampling alone, and from seeds alone?

    uv run scripts/interval_levels.py evaluation_plots/offline/results.json

For every comparison (DPO - PPO, DPO - PPO-GT, PPO - PPO-GT) and KL budget it prints

* ``full``: the 95% hierarchical bootstrap (seeds, then prompts within each seed), recomputed from
  ``protocol.checkpoints[...].per_prompt.scores``; it must equal the interval stored in
  ``protocol.differences`` (the script exits 1 if not), so the stored intervals are reproducible from the
  stored per-prompt scores;
* ``prompts only``: the seeds held fixed, each seed's prompts resampled (the width prompt sampling alone gives);
* ``seeds only``: each seed's mean difference held fixed, the seeds resampled.

Numbers only; nothing is written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.run_log import read_results  # noqa: E402
from study.grid import hierarchical_bootstrap  # noqa: E402

N_RESAMPLES = 2000


def per_seed_differences(protocol: dict, a: str, b: str, k: str) -> list[np.ndarray]:
    """Per matching seed, the per-prompt differences of held-out safety between the checkpoints chosen for
    methods ``a`` and ``b`` at budget ``k`` (seeds where either cell is "-" are left out, as the study does)."""
    def chosen(method):
        return {r["seed"]: r["checkpoint"] for r in protocol["cells"][method][k]["per_seed"] if r["status"] == "ok"}

    ca, cb, ck = chosen(a), chosen(b), protocol["checkpoints"]
    return [np.asarray(ck[ca[s]]["per_prompt"]["scores"]) - np.asarray(ck[cb[s]]["per_prompt"]["scores"])
            for s in sorted(set(ca) & set(cb))]


def main() -> int:
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if len(sys.argv) != 2:
        print("usage: uv run scripts/interval_levels.py PATH/results.json (a study's, made with --sweep)")
        return 2
    try:
        results = read_results(sys.argv[1])
    except ValueError as e:
        print(e)
        return 2
    protocol = results.get("protocol")
    if not protocol:
        print(f"{sys.argv[1]}: no 'protocol' section: it is not a study's results.json (run main.py with --sweep)")
        return 2
    mismatches = 0
    print(f"{'comparison':<16}{'KL <=':>6}  {'seeds':>5}  {'mean':>7}  {'full 95% CI':>18}  {'prompts only':>18}  "
          f"{'seeds only':>18}  half-widths full / prompts / seeds")
    for name, cells in protocol["differences"].items():
        a, b = name.split("-", 1)
        for k, stored in cells.items():
            arrays = per_seed_differences(protocol, a, b, k)
            if not arrays:
                print(f"{name:<16}{k:>6}  {0:>5}  (no seed with both cells)")
                continue
            full = hierarchical_bootstrap(arrays, N_RESAMPLES)
            same = all(math.isclose(full[x], stored[x], rel_tol=0, abs_tol=1e-12) for x in ("mean", "lo", "hi"))
            mismatches += not same
            prompts = hierarchical_bootstrap(arrays, N_RESAMPLES, resample="prompts")
            seeds = hierarchical_bootstrap(arrays, N_RESAMPLES, resample="seeds")
            (p_lo, p_hi), (s_lo, s_hi) = (prompts["lo"], prompts["hi"]), (seeds["lo"], seeds["hi"])
            print(f"{name:<16}{k:>6}  {len(arrays):>5}  {full['mean']:+.4f}  [{full['lo']:+.4f}, {full['hi']:+.4f}]  "
                  f"[{p_lo:+.4f}, {p_hi:+.4f}]  [{s_lo:+.4f}, {s_hi:+.4f}]  {(full['hi'] - full['lo']) / 2:.4f} / "
                  f"{(p_hi - p_lo) / 2:.4f} / {(s_hi - s_lo) / 2:.4f}" + ("" if same else "  DIFFERS FROM STORED"))
    print("recomputed intervals " + ("all equal the stored ones" if not mismatches
                                     else f"differ from the stored ones in {mismatches} cell(s)"))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
