"""Does PPO's KL coefficient set its KL? Trains PPO (offline preset, fp32 by default) at fixed KL coefficients and
at adaptive KL targets for several seeds, evaluates every run on the validation prompts as it trains, and prints
per seed the validation KL each setting ends at, whether the fixed coefficients order it, how close the adaptive
runs end to their targets, and the best validation safety in KL bands, beside the same bands of the PPO runs
recorded in a committed study (the settings before the PPO fixes).

    uv run scripts/ppo_kl_control.py --seeds 0 1 2 --coefs 0.05 0.2 1 5 --targets 2 6 --jobs 2 \\
        --out docs/ppo_kl_control.json [any main.py flag, e.g. --ppo_lr 5e-5 --ppo_steps 60]

Runs are kept under ``--output_dir`` (default models/kl_control); a run already finished with the same
settings is read, not trained again, so an interrupted measurement continues where it stopped. ``--jobs N``
trains N runs at once, each process on one CPU thread (fp32 numbers depend on the thread count, so every run is
pinned to one whatever the machine; the reward models are trained first, one seed at a time). ``--report``
prints the table of the runs already finished, without training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.run_log import read_results  # noqa: E402
from scripts import grid  # noqa: E402
from scripts.grid import run_rows  # noqa: E402
from study.grid import band_choice, validation_points  # noqa: E402

BANDS = (2.0, 4.0, 8.0)  # the safety comparison: best validation safety with validation KL within ±20%
BASELINE = ROOT / "docs" / "study_review_pairs" / "results.json"  # PPO before the fixes (AdamW decay 0.01)


def settings(coefs: list[float], targets: list[float]) -> list[tuple[str, float]]:
    return [("kl_coef", c) for c in coefs] + [("target_kl", t) for t in targets]


def run_name(seed: int, kind: str, value: float) -> str:
    return f"seed{seed}/{'klcoef' if kind == 'kl_coef' else 'target'}{value:g}"


def overrides(kind: str, value: float, init: float | None = None) -> dict:
    """A fixed coefficient ``value``, or the adaptive controller at target ``value`` starting from ``init`` (None:
    the config's ``--init_kl_coef``, PPO-GT's ``--ppo_gt_init_kl_coef`` where set)."""
    if kind == "kl_coef":
        return {"ppo": {"target_kl": None, "init_kl_coef": value}}
    start = {} if init is None else {"init_kl_coef": init, "ppo_gt_init_kl_coef": init}  # PPO-GT's start too
    return {"ppo": {"target_kl": value, **start}}


def report(out_dir: Path, seeds: list[int], coefs: list[float], targets: list[float]) -> dict:
    runs = {}
    for seed in seeds:
        for kind, value in settings(coefs, targets):
            pts = validation_points(run_rows(out_dir, run_name(seed, kind, value)))
            if pts:
                runs[run_name(seed, kind, value)] = {"seed": seed, "kind": kind, "value": value, "points": pts,
                                                     "final_kl": pts[-1]["kl"], "max_kl": max(p["kl"] for p in pts),
                                                     "last_step": pts[-1]["step"]}
    print("\nvalidation KL at the last evaluation of each run (its largest over the run in brackets), nats")
    print("| setting | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for kind, value in settings(coefs, targets):
        cells = []
        for seed in seeds:
            r = runs.get(run_name(seed, kind, value))
            cells.append(f"{r['final_kl']:.2f} ({r['max_kl']:.2f})" if r else "-")
        label = f"coefficient {value:g}" if kind == "kl_coef" else f"adaptive, target {value:g}"
        print(f"| {label} | " + " | ".join(cells) + " |")

    checks = {}
    ordered = []
    for seed in seeds:
        finals = [runs.get(run_name(seed, "kl_coef", c), {}).get("final_kl") for c in sorted(coefs)]
        if None not in finals:
            ordered.append(all(a > b for a, b in zip(finals, finals[1:])))
    if len(coefs) > 1:  # an order needs two coefficients
        checks["coefficients_order_the_kl_on_every_seed"] = len(ordered) == len(seeds) and all(ordered)
    if coefs:
        big = [runs[n]["max_kl"] for s in seeds if (n := run_name(s, "kl_coef", max(coefs))) in runs]
        small = [runs[n]["max_kl"] for s in seeds if (n := run_name(s, "kl_coef", min(coefs))) in runs]
        checks[f"coefficient_{max(coefs):g}_largest_kl_over_seeds"] = max(big) if big else None
        checks[f"coefficient_{min(coefs):g}_smallest_over_seeds_of_its_largest_kl"] = min(small) if small else None
    for t in targets:
        errs = [runs[n]["final_kl"] / t - 1 for s in seeds if (n := run_name(s, "target_kl", t)) in runs]
        checks[f"target_{t:g}_relative_error_at_the_end"] = [round(e, 3) for e in errs]
    print("\nchecks: " + json.dumps(checks))

    # Best validation safety per band: these runs against the PPO runs of the committed study (before the fixes).
    base = {}
    if BASELINE.exists():
        vp = read_results(BASELINE)["protocol"]["validation_points"]
        base = {seed: [p for p in vp if p["method"] == "ppo" and p["seed"] == seed] for seed in seeds}
    bands = {}
    print("\nbest validation safety with validation KL in k ± 20% (mean over the seeds whose runs reach the band)")
    print(f"| band | these settings | per seed | before the fixes ({BASELINE.parent.name}) | per seed |")
    print("|---|---|---|---|---|")
    for k in BANDS:
        new = {s: band_choice([p for r in runs.values() if r["seed"] == s for p in r["points"]], k, 0.2)[0]
               for s in seeds}
        old = {s: band_choice(base.get(s, []), k, 0.2)[0] for s in seeds}

        def fmt(d):
            vals = [d[s]["safety"] for s in seeds if d[s]]
            mean = sum(vals) / len(vals) if vals else None
            return mean, (f"{mean:.3f} ({len(vals)} seeds)" if vals else "not reached"), \
                " ".join(f"{d[s]['safety']:.3f}" if d[s] else "-" for s in seeds)
        (nm, ns, nps), (om, os_, ops) = fmt(new), fmt(old)
        bands[f"{k:g}"] = {"new": new, "before": old, "new_mean": nm, "before_mean": om}
        print(f"| {k:g} | {ns} | {nps} | {os_} | {ops} |")

    # The reward models (trained without weight decay now) against the study's (AdamW's default decay 0.01).
    rms = {}
    for seed in seeds:
        summary = next((out_dir / n / "train_summary.json" for n in runs if runs[n]["seed"] == seed
                        and (out_dir / n / "train_summary.json").exists()), None)
        now = json.loads(summary.read_text()).get("reward_model") if summary else None
        then = next((r.get("reward_model") for r in (read_results(BASELINE)["runs"] if BASELINE.exists() else [])
                     if r["method"] == "ppo" and r["main"] and r["seed"] == seed), None)
        rms[seed] = {"now": now and {k: now[k] for k in ("val_pair_accuracy", "heldout_pair_accuracy", "best_step")},
                     "before": then and {k: then[k] for k in ("val_pair_accuracy", "heldout_pair_accuracy",
                                                             "best_step")}}
    # Seconds per iteration (training only: no evaluation, no reward model), as these processes ran.
    per_iter = []
    for n in runs:
        path = out_dir / n / "train_summary.json"
        if path.exists():
            t = json.loads(path.read_text())
            per_iter.append((t["train_time_s"] - t.get("rm_train_s", 0.0)) / t["iterations"])
    if per_iter:
        per_iter.sort()
        print(f"\nseconds per PPO iteration (training only), median over {len(per_iter)} runs: "
              f"{per_iter[len(per_iter) // 2]:.2f} (range {per_iter[0]:.2f}-{per_iter[-1]:.2f})")
    if any(r["now"] for r in rms.values()):
        print("\nreward model, validation / held-out pair accuracy: " + "; ".join(
            f"seed {s}: " + " vs ".join(f"{r[k]['val_pair_accuracy']:.3f} / {r[k]['heldout_pair_accuracy']:.3f}"
                                        if r[k] else "-" for k in ("now", "before")) + " before"
            for s, r in rms.items()))
    return {"runs": runs, "checks": checks, "bands": bands, "reward_models": rms, "seconds_per_iteration": per_iter}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--coefs", type=float, nargs="*", default=[0.05, 0.2, 1.0, 5.0])
    ap.add_argument("--targets", type=float, nargs="*", default=[2.0, 6.0])
    ap.add_argument("--target_inits", type=float, nargs="*", default=[],
                    help="the adaptive runs' starting coefficients, one per target (default: --init_kl_coef; "
                         "PPO-GT's --ppo_gt_init_kl_coef where set)")
    ap.add_argument("--ppo_gt", action="store_true",
                    help="PPO-GT (PPO on the judge's logit, whose scale is another) instead of PPO on the reward model")
    grid.add_arguments(ap)
    a, rest = ap.parse_known_args()
    cfg = grid.command_config(rest, a.jobs, "models/kl_control")
    if cfg is None:
        return 2
    if any(c <= 0 for c in a.coefs + a.targets + a.target_inits) or \
            (a.target_inits and len(a.target_inits) != len(a.targets)):
        print("error: every --coefs / --targets / --target_inits value must be > 0, and --target_inits needs one "
              "value per target", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    inits = dict(zip(a.targets, a.target_inits or [None] * len(a.targets)))
    method, reward = ("ppo_gt", {"ppo_reward": "judge"}) if a.ppo_gt else ("ppo", {})
    tasks = [{"seed": s, "method": method, "name": run_name(s, k, v),
              "overrides": {"ppo": {**overrides(k, v, inits.get(v))["ppo"], **reward}}}
             for s in a.seeds for k, v in settings(a.coefs, a.targets)]
    return grid.run_and_report(__file__, a, rest, cfg, tasks,
                               lambda: report(Path(cfg.run.output_dir), a.seeds, a.coefs, a.targets),
                               target_inits=a.target_inits, method=method, config=cfg.to_dict()["ppo"])


if __name__ == "__main__":
    sys.exit(main())
