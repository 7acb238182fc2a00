"""The learning rates of DPO, PPO and PPO-GT, chosen by one rule (docs/tuning.md), written before the runs:

* the same number of candidate rates for every method (``--dpo_lrs``, ``--ppo_lrs``, ``--ppo_gt_lrs``);
* one seed outside the study's (``--seed``, default 100); validation prompts only (every evaluation during
  training is on them; the held-out prompts are never read);
* the study's own run lengths and grid: at each candidate rate, every run the study (``--sweep``) trains per seed
  for that method (``grid.study_runs``: DPO over its betas, PPO and PPO-GT at their default and fixed KL
  coefficients; main.py's ``--sweep_betas`` / ``--sweep_kl_coefs`` change it), evaluated on the study's schedule;
* one criterion, the mean over the study's budgets k (``--kl_bands``; the offline preset's 1, 2, 4, 8 and 12 nats)
  of the method's value at k, read as the study reads its cells (``--rule``): by default the highest point at
  KL <= k of the upper concave envelope of the method's checkpoints (every run of its grid at that rate) and the
  reference (docs/preregistration.md); ``--rule bands``, the tunings before it, the best validation safety in
  k ± ``--band_width`` * k, the reference's where no checkpoint is in the band. Highest wins; a tie goes to the
  smaller rate.

    uv run scripts/tune_lr.py --jobs 2 --out docs/tuning.json [any main.py flag]

Runs are kept under ``--output_dir`` (default models/tuning) and reused when finished with the same settings.
``--report`` prints the table of the runs already finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import ConfigError  # noqa: E402
from scripts import grid  # noqa: E402
from scripts.grid import reference_safety, run_rows  # noqa: E402
from study.grid import (  # noqa: E402
    band_choice,
    check_coverage,
    envelope_cell,
    reference_vertex,
    study_runs,
    validation_points,  # noqa: E402
)

LR_FIELD = {"dpo": ("dpo", "dpo_lr"), "ppo": ("ppo", "ppo_lr"), "ppo_gt": ("ppo", "ppo_gt_lr")}


def tasks_for(cfg, seed: int, lrs: dict) -> list[dict]:
    """At every candidate rate of each method, the runs the study trains for that method on a seed."""
    specs = study_runs(cfg.replace(run={"sweep": True, "dpo_only": False, "ppo_only": False}), [seed])
    tasks = []
    for method, rates in lrs.items():
        section, key = LR_FIELD[method]
        for lr in rates:
            for spec in (s for s in specs if s.method == method):
                over = {sec: dict(v) for sec, v in spec.overrides.items()}
                over.setdefault(section, {})[key] = lr
                tasks.append({"seed": seed, "method": method,
                              "name": f"{method}/lr{lr:g}/{spec.setting}", "overrides": over})
    return tasks


def criterion(points: list[dict], ref_safety: float, ks: list[float], width: float,
              rule: str = "envelope") -> tuple[float, dict]:
    """The rule's criterion: the mean over ``ks`` of the method's value at k. ``"envelope"`` (the frontier study's
    primary reading, docs/preregistration.md): the highest point at KL <= k of the upper concave envelope of
    ``points`` and the reference (KL 0, ``ref_safety``), which a mixture of two checkpoints attains
    (``study.grid.envelope_cell``). ``"bands"`` (the tunings before it, docs/tuning.md): the best validation safety
    in k ± ``width`` * k, the reference's where no checkpoint is in the band."""
    per_k = {}
    for k in ks:
        if rule == "envelope":
            # used in full exactly as the study's cells say it (grid.select_envelope_cells: envelope_cell's kl is
            # k itself when it mixes two vertices around k)
            cell = envelope_cell([reference_vertex("", 0, ref_safety), *points], k)
            per_k[f"{k:g}"] = {"safety": cell["safety"], "reached": cell["kl"] >= k, "kl": cell["kl"],
                               "w": cell["w"], "vertices": [[v.get("run"), v["step"]] for v in (cell["a"], cell["b"])]}
        else:
            best, inside = band_choice(points, k, width)
            per_k[f"{k:g}"] = {"safety": best["safety"] if best else ref_safety, "reached": best is not None,
                               "kl": best["kl"] if best else None, "n_candidates": len(inside)}
    return sum(b["safety"] for b in per_k.values()) / len(ks), per_k


def choose(rows: list[dict]) -> float:
    """The rule's choice among one method's complete candidates (``{"lr", "criterion"}`` each): the highest
    criterion, compared to 10 decimals (a difference below that is rounding, not safety); a tie goes to the smaller
    rate."""
    return max(rows, key=lambda r: (round(r["criterion"], 10), -r["lr"]))["lr"]


def report(out_dir: Path, tasks: list[dict], lrs: dict, ks: list[float], width: float, rule: str) -> dict:
    ref = next((s for t in tasks if (s := reference_safety(out_dir, t["name"])) is not None), None)
    print(f"\nreference validation safety {ref:.4f}" if ref is not None else "\nno run finished yet")
    if ref is None:
        return {}
    table, chosen = {}, {}
    print(f"criterion ({rule}): " + ("the envelope's value at KL <= k; '(peak x)': its peak, at x < k" if
                                     rule == "envelope" else "the best in k ± 20%; '(ref)': no checkpoint in it"))
    print("| method | lr | " + " | ".join(f"k = {k:g}" for k in ks) + " | criterion | runs done |")
    print("|---|---|" + "---|" * len(ks) + "---|---|")
    for method, rates in lrs.items():
        for lr in rates:
            mine = [t for t in tasks if t["name"].startswith(f"{method}/lr{lr:g}/")]
            runs = {t["name"]: validation_points(run_rows(out_dir, t["name"]), run=t["name"]) for t in mine}
            points = [p for pts in runs.values() for p in pts]
            score, per_k = criterion(points, ref, ks, width, rule)
            done = sum(bool(p) for p in runs.values())
            table[f"{method}/lr{lr:g}"] = {"method": method, "lr": lr, "criterion": score, "bands": per_k,
                                          "runs": runs, "runs_done": done, "runs_planned": len(mine)}
            cells = [f"{b['safety']:.3f}" + ("" if b["reached"] else (f" (peak {b['kl']:.2f})" if rule == "envelope"
                                                                        else " (ref)")) for b in per_k.values()]
            print(f"| {method} | {lr:g} | " + " | ".join(cells) + f" | {score:.4f} | {done}/{len(mine)} |")
        rows = [r for r in table.values() if r["method"] == method and r["runs_done"] == r["runs_planned"]]
        if len(rows) == len(rates):  # every candidate complete: the rule picks
            chosen[method] = choose(rows)
    print("\nchosen: " + (json.dumps(chosen) if chosen else "none yet (a method's candidates are not all done)"))
    return {"rule": rule, "reference_safety": ref, "bands": list(ks), "band_width": width, "candidates": table,
            "chosen": chosen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--dpo_lrs", type=float, nargs="*", default=[5e-5, 1e-4, 2e-4])
    ap.add_argument("--ppo_lrs", type=float, nargs="*", default=[5e-5, 1e-4, 2e-4])
    ap.add_argument("--ppo_gt_lrs", type=float, nargs="*", default=[5e-5, 1e-4, 2e-4])
    ap.add_argument("--rule", choices=["envelope", "bands"], default="envelope",
                    help="the criterion: the envelope at each k (the frontier study's, docs/preregistration.md) or "
                         "the best checkpoint in each band (the tunings before it, docs/tuning.md)")
    grid.add_arguments(ap)
    a, rest = ap.parse_known_args()
    lrs = {m: v for m, v in (("dpo", a.dpo_lrs), ("ppo", a.ppo_lrs), ("ppo_gt", a.ppo_gt_lrs)) if v}
    cfg = grid.command_config(rest, a.jobs, "models/tuning")
    if cfg is None:
        return 2
    try:  # the study's rule, here too: every method the same number of runs and evaluations
        check_coverage(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len({len(v) for v in lrs.values()}) > 1 or any(x <= 0 for v in lrs.values() for x in v):
        print("error: every method needs the same number of candidate rates, all > 0 (the rule: no method gets "
              "more tries than another)", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    tasks = tasks_for(cfg, a.seed, lrs)
    ks, width = cfg.eval.kl_bands, cfg.eval.band_width
    return grid.run_and_report(__file__, a, rest, cfg, tasks,
                               lambda: report(Path(cfg.run.output_dir), tasks, lrs, ks, width, a.rule), seed=a.seed,
                               runs=[t["name"] for t in tasks], max_kl=cfg.eval.max_kl,
                               run_lengths={"dpo_steps": cfg.dpo.dpo_steps, "dpo_eval_every": cfg.dpo.dpo_eval_every,
                                            "dpo_eval_steps": cfg.dpo.dpo_eval_steps,
                                            "ppo_steps": cfg.ppo.ppo_steps, "ppo_eval_every": cfg.ppo.ppo_eval_every,
                                            "ppo_eval_steps": cfg.ppo.ppo_eval_steps},
                               config={k: v for k, v in cfg.to_dict().items() if k in ("data", "dpo", "ppo", "eval")})


if __name__ == "__main__":
    sys.exit(main())
