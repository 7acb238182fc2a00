"""The study's protocol (``--sweep``): choose on validation, report on held-out.

1. Every evaluation during training is on the validation prompts (openings of training reviews no pair uses),
   and the weights of every evaluated step are kept (``runs/<run>/evaluated/step-N/``).
2. For each method, seed and KL budget k, :func:`study.select_checkpoints` picks, among all that method's runs
   and checkpoints of that seed, the best validation safety with validation KL <= k. Held-out numbers are never
   looked at to choose, and no maximum is ever taken over them.
3. Only the chosen checkpoints are evaluated on the held-out prompts (each seed its own sample, every method
   sampled with the same seeds on the same prompts), and their per-prompt judge scores and log-ratios are saved.
4. Paired differences between methods (matching seeds only) get 95% hierarchical bootstrap intervals (seeds,
   then prompts within each seed).
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

import study
from eval_utils import evaluate_policy
from lifecycle import evaluated_dir
from models import load_causal_lm
from run_log import StopTraining, read_metrics

PAIRS = (("dpo", "ppo"), ("dpo", "ppo_gt"), ("ppo", "ppo_gt"))  # the paired comparisons of the table
N_RESAMPLES = 2000


def study_protocol(cfg, runs: list[dict], heldout: dict) -> dict:
    """Select, evaluate the selected on held-out prompts, and compare.

    Args:
        runs: ``{"spec": study.RunSpec, ...}`` for every run of every seed.
        heldout: ``{seed: RunContext}`` with that seed's held-out prompts and sampling seed.
    Returns:
        results.json's ``protocol`` section: the validation points, the chosen checkpoints with their held-out
        numbers and per-prompt scores, each cell per seed and over seeds, and the paired differences.
    """
    kls, temp = list(cfg.eval.matched_kls), cfg.eval.eval_temperature
    points = []
    for r in runs:
        s = r["spec"]
        rows = read_metrics(Path(cfg.run.output_dir) / "runs" / s.name / "metrics.jsonl")
        points += study.checkpoint_points(s.method, s.setting, s.seed, s.name, rows)
    chosen = study.select_checkpoints(points, kls, min_use=cfg.eval.min_budget_use)

    # --- held-out evaluation of the chosen checkpoints only, each once ---
    checkpoints, reference = {}, {}
    todo = {(c["point"]["seed"], c["point"]["run"], c["point"]["step"]): c["point"]
            for by_seed in chosen.values() for cells in by_seed.values() for c in cells.values() if c["point"]}
    runs_dir = Path(cfg.run.output_dir) / "runs"
    missing = sorted((run, step) for _, run, step in todo if not evaluated_dir(runs_dir / run, step).is_dir())
    if missing:  # e.g. a run carried over from a --dpo-only / --ppo-only run made without --sweep
        run, step = missing[0]
        raise StopTraining(f"study: run {run} kept no weights of its evaluated step {step} ({len(missing)} such "
                           f"checkpoint(s)); it was trained without --sweep: train it again with --sweep, or pass "
                           f"another --output_dir", 2)
    for (seed, run, step), p in tqdm(sorted(todo.items()), desc="study: held-out evaluation of the chosen",
                                     unit="checkpoint"):
        ctx = heldout[seed]
        if seed not in reference:
            ref = ctx.reference_result(temp)
            reference[seed] = {"safety": ref["safety_score"],
                               "per_prompt": {"scores": [float(x) for x in ref["scores"]]}}
        lm = load_causal_lm(str(evaluated_dir(runs_dir / run, step)), ctx.device)
        res = evaluate_policy(lm, ctx, temp)
        checkpoints[f"{run}@{step}"] = {
            "method": p["method"], "label": p["label"], "seed": seed, "run": run, "step": step,
            "validation": {"safety": p["safety"], "positive_rate": p["positive_rate"], "kl": p["kl"]},
            "heldout": {"safety": res["safety_score"], "positive_rate": res["positive_rate"], "kl": res["kl_to_ref"],
                        "n_prompts": len(res["scores"])},
            "per_prompt": {"scores": [float(x) for x in res["scores"]], "log_ratios": list(res["log_ratios"])}}

    # --- the table: per method and budget, each seed's chosen checkpoint, then over seeds ---
    def per_prompt(method, seed, k):
        c = chosen.get(method, {}).get(seed, {}).get(str(k))
        return None if c is None or c["status"] != "ok" else checkpoints[f"{c['point']['run']}@{c['point']['step']}"]

    seeds = sorted({r["spec"].seed for r in runs})
    cells = {}
    for method, by_seed in chosen.items():
        cells[method] = {}
        for k in kls:
            rows = []
            for seed, mine in by_seed.items():
                c = mine[str(k)]
                ck = checkpoints[f"{c['point']['run']}@{c['point']['step']}"] if c["point"] else None
                rows.append({"seed": seed, "status": c["status"], "reason": c["reason"],
                             "checkpoint": f"{ck['run']}@{ck['step']}" if ck else None,
                             "validation": ck["validation"] if ck else None,
                             "heldout": ck["heldout"] if ck else None})
            ok = [per_prompt(method, s, k) for s in seeds]
            ok = [x for x in ok if x is not None]
            cells[method][str(k)] = {
                "per_seed": rows,
                "safety": study.hierarchical_bootstrap([x["per_prompt"]["scores"] for x in ok], N_RESAMPLES),
                "positive_rate": study.mean_and_std([x["heldout"]["positive_rate"] for x in ok])[0] if ok else None,
                "kl": study.mean_and_std([x["heldout"]["kl"] for x in ok])[0] if ok else None}

    # --- paired differences, matching seeds only ---
    differences = {}
    for a, b in PAIRS:
        if a not in chosen or b not in chosen:
            continue
        differences[f"{a}-{b}"] = {}
        for k in kls:
            diffs, used = [], []
            for s in seeds:
                x, y = per_prompt(a, s, k), per_prompt(b, s, k)
                if x is not None and y is not None:
                    diffs.append([u - v for u, v in zip(x["per_prompt"]["scores"], y["per_prompt"]["scores"])])
                    used.append(s)
            differences[f"{a}-{b}"][str(k)] = {**study.hierarchical_bootstrap(diffs, N_RESAMPLES), "seeds": used}
    return {"matched_kls": kls, "n_resamples": N_RESAMPLES, "validation_points": points, "cells": cells,
            "differences": differences, "checkpoints": checkpoints, "reference": reference,
            "selection": "validation safety, validation KL <= k; held-out prompts evaluated only for the chosen"}
