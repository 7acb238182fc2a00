"""The study's protocol (``--sweep``): choose on validation, report on held-out.

1. Every evaluation during training is on the validation prompts (openings of training reviews no pair uses),
   and the weights of every evaluated step are kept (``runs/<run>/evaluated/step-N/``).
2. At equal KL budgets used in full (the primary reading, :func:`grid.select_envelope_cells`): for each method,
   seed and k in ``--kl_bands``, the highest point at KL <= k of the upper concave envelope of that method's
   validation points and the reference (KL 0), which a mixture of at most two checkpoints attains (a share w of
   the prompts answered by one, the rest by the other); its held-out cell is the per-prompt w-mix of their scores
   (:func:`envelope_tables`). Every method can reach every point under its envelope, so no cell depends on where
   a checkpoint happened to fall. In bands (a secondary reading): for each method, seed and KL band (target k +-
   ``--band_width``), :func:`grid.select_band_checkpoints` picks, among all that method's runs and checkpoints of
   that seed, the
   best validation safety whose validation KL lies in the band, and records how many candidates it had; the
   highest validation safety at any KL up to the largest band (:func:`grid.highest_safety`) is chosen the same
   way. Within a budget (another secondary reading): :func:`grid.select_checkpoints`, the best with validation
   KL <= k. Held-out numbers are never looked at to choose, and no maximum is ever taken over them.
3. Only the chosen checkpoints are evaluated on the held-out prompts (each seed its own sample, every method
   sampled with the same seeds on the same prompts), and their per-prompt judge scores, VADER compound scores
   (the second judge, ``eval_utils.vader_compound``) and log-ratios are saved.
4. Paired differences between methods at each k (envelope mixtures, and band checkpoints): each seed's paired
   mean difference over its prompts, then a Student-t 95% interval and p-value over the seeds
   (:func:`grid.seed_t_interval`), with the hierarchical bootstrap beside it; the same for VADER. Holm's
   correction over the family of the primary reading (both settings) is applied by ``scripts/study_family.py``,
   which reads every setting's results.json. Budget cells keep the hierarchical bootstrap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from eval_utils import VADER_POSITIVE, evaluate_policy, vader_compound
from modeling.models import load_causal_lm
from runtime.run_log import StopTraining, read_metrics
from study import grid
from training.lifecycle import evaluated_dir

PAIRS = (("dpo", "ppo"), ("dpo", "ppo_gt"), ("ppo", "ppo_gt"))  # the paired comparisons of the table
N_RESAMPLES = 2000


def study_protocol(cfg, runs: list[dict], heldout: dict) -> dict:
    """Select, evaluate the selected on held-out prompts, and compare.

    Args:
        runs: ``{"spec": grid.RunSpec, ...}`` for every run of every seed.
        heldout: ``{seed: RunContext}`` with that seed's held-out prompts and sampling seed.
    Returns:
        results.json's ``protocol`` section: the validation points, the chosen checkpoints with their held-out
        numbers and per-prompt scores, each cell per seed and over seeds, and the paired differences.
    """
    kls = list(cfg.eval.matched_kls)
    bands, width = list(cfg.eval.kl_bands), cfg.eval.band_width
    points, references = [], {}
    for r in runs:
        s = r["spec"]
        rows = read_metrics(Path(cfg.run.output_dir) / "runs" / s.name / "metrics.jsonl")
        for p in grid.validation_points(rows, reference=True, method=s.method, label=s.setting, seed=s.seed,
                                        run=s.name):
            if p["step"] > 0:
                points.append(p)
            else:  # the reference's validation safety: its step-0 evaluation, the same in every run of the seed
                references.setdefault(s.seed, p["safety"])
    envelope = grid.select_envelope_cells(points, references, bands)
    chosen = grid.select_checkpoints(points, kls, min_use=cfg.eval.min_budget_use)
    banded = grid.select_band_checkpoints(points, bands, width)
    top_kl = max(bands) * (1 + width)
    top = grid.highest_safety(points, top_kl)

    picked = [c["point"] for sel in (chosen, banded) for by_seed in sel.values() for cells in by_seed.values()
              for c in cells.values() if c["point"]]
    picked += [p for by_seed in top.values() for p in by_seed.values()]
    picked += [v for by_seed in envelope.values() for cells in by_seed.values() for c in cells.values()
               for v in (c["a"], c["b"]) if v["run"] is not None]
    checkpoints, reference = evaluate_chosen(cfg, picked, heldout)
    seeds = sorted({r["spec"].seed for r in runs})
    cells, differences = budget_tables(chosen, checkpoints, seeds, kls)
    bands_out = band_tables(banded, checkpoints, seeds, bands, width)
    envelope_out = envelope_tables(envelope, checkpoints, reference, seeds, bands)
    highest = {}
    for m, by_seed in top.items():
        for s, p in by_seed.items():
            ck = checkpoints[f"{p['run']}@{p['step']}"]
            highest.setdefault(m, {})[str(s)] = {"checkpoint": f"{p['run']}@{p['step']}",
                                                 "validation": ck["validation"], "heldout": ck["heldout"]}
    return {"matched_kls": kls, "n_resamples": N_RESAMPLES, "validation_points": points, "cells": cells,
            "differences": differences, "checkpoints": checkpoints, "reference": reference,
            "bands": bands_out, "envelope": {**envelope_out, "reference_validation": references},
            "highest": {"max_kl": top_kl, "per_method": highest},
            "selection": "primary, at equal KL budgets used in full: the highest point at KL <= k of the upper "
                         "concave envelope of each method's validation points and the reference, a mixture of at most "
                         "two checkpoints; secondary, in bands: validation safety among checkpoints whose validation "
                         "KL is in the band; "
                         "within a budget (secondary): validation safety, validation KL <= k; held-out prompts "
                         "evaluated only for the chosen"}


def evaluate_chosen(cfg, picked: list[dict], heldout: dict) -> tuple[dict, dict]:
    """The held-out evaluation of the chosen checkpoints only (``picked``: validation points), each once, and of
    the reference once per seed (``heldout``: ``{seed: RunContext}``); with ``--jobs`` > 1 made by worker processes
    and read back from the cache. Returns ``({"run@step": checkpoint entry}, {seed: the reference's entry})``."""
    checkpoints, reference, temp = {}, {}, cfg.eval.eval_temperature
    todo = {(p["seed"], p["run"], p["step"]): p for p in picked}
    runs_dir = Path(cfg.run.output_dir) / "runs"
    missing = sorted((run, step) for _, run, step in todo if not evaluated_dir(runs_dir / run, step).is_dir())
    if missing:  # e.g. a run carried over from a --dpo-only / --ppo-only run made without --sweep
        run, step = missing[0]
        raise StopTraining(f"study: run {run} kept no weights of its evaluated step {step} ({len(missing)} such "
                           f"checkpoint(s)); it was trained without --sweep: train it again with --sweep, or pass "
                           f"another --output_dir", 2)
    if cfg.run.jobs > 1 and len(todo) > 1:  # made by worker processes, read back below from the cache
        from runtime import workers
        from study import jobs

        refs = [{"what": "heldout", "seed": seed, "run": None, "step": None} for seed in sorted({k[0] for k in todo})]
        workers.run_items(cfg, refs + [{"what": "heldout", "seed": seed, "run": run, "step": step}
                                       for seed, run, step in sorted(todo)], cfg.run.jobs, jobs.HANDLER,
                          "held-out evaluations", "heldout", "study")
    for (seed, run, step), p in tqdm(sorted(todo.items()), desc="study: held-out evaluation of the chosen",
                                     unit="checkpoint"):
        ctx = heldout[seed]
        if seed not in reference:
            ref = heldout_result(cfg, ctx, temp)
            vader = vader_compound(ref["texts"])
            reference[seed] = {"safety": ref["safety_score"], **_vader_summary(vader),
                               "per_prompt": {"scores": [float(x) for x in ref["scores"]], "vader": vader}}
        res = heldout_result(cfg, ctx, temp, run, step)
        vader = vader_compound(res["texts"])
        checkpoints[f"{run}@{step}"] = {
            "method": p["method"], "label": p["label"], "seed": seed, "run": run, "step": step,
            "validation": {"safety": p["safety"], "positive_rate": p["positive_rate"], "kl": p["kl"]},
            "heldout": {"safety": res["safety_score"], "positive_rate": res["positive_rate"], "kl": res["kl_to_ref"],
                        **_vader_summary(vader), "n_prompts": len(res["scores"])},
            "per_prompt": {"scores": [float(x) for x in res["scores"]], "vader": vader,
                           "log_ratios": list(res["log_ratios"])}}
    return checkpoints, reference


def budget_tables(chosen: dict, checkpoints: dict, seeds: list[int], kls: list[float]) -> tuple[dict, dict]:
    """The secondary within-budget reading: per method and budget, each seed's chosen checkpoint, then over seeds
    (``cells``), and the paired differences over the seeds both methods have (``differences``)."""
    def per_prompt(method, seed, k):
        return chosen_checkpoint(chosen, checkpoints, method, seed, k)

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
                "safety": grid.hierarchical_bootstrap([x["per_prompt"]["scores"] for x in ok], N_RESAMPLES),
                "positive_rate": grid.mean_and_std([x["heldout"]["positive_rate"] for x in ok])[0] if ok else None,
                "kl": grid.mean_and_std([x["heldout"]["kl"] for x in ok])[0] if ok else None}

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
            differences[f"{a}-{b}"][str(k)] = {**grid.hierarchical_bootstrap(diffs, N_RESAMPLES), "seeds": used}
    return cells, differences


def mixture_heldout(cell: dict, checkpoints: dict, reference: dict) -> dict:
    """An envelope cell on held-out prompts: per prompt the ``w``-mix of its two vertices' judge and VADER scores
    (a share w of the prompts answered by ``a``, the rest by ``b``: the mixture's expected score on each prompt),
    and the w-mix of their held-out KLs (the reference's is 0). ``reference``: the seed's held-out entry."""
    def side(v):
        if v["run"] is None:
            return reference["per_prompt"]["scores"], reference["per_prompt"]["vader"], 0.0
        ck = checkpoints[f"{v['run']}@{v['step']}"]
        return ck["per_prompt"]["scores"], ck["per_prompt"]["vader"], ck["heldout"]["kl"]

    w = cell["w"]
    (sa, va, ka), (sb, vb, kb) = side(cell["a"]), side(cell["b"])
    return {"scores": w * np.asarray(sa) + (1 - w) * np.asarray(sb),
            "vader": w * np.asarray(va) + (1 - w) * np.asarray(vb), "kl": w * ka + (1 - w) * kb}


def envelope_tables(choices: dict, checkpoints: dict, reference: dict, seeds: list[int], budgets: list[float]
                    ) -> dict:
    """The primary reading from the envelope choices (:func:`grid.select_envelope_cells`) and the held-out numbers
    of their vertices: per method and budget its cell (every seed's mixture, then held-out safety with a t
    interval over the seeds, KL and VADER) and per pair of methods and budget the paired comparison (each seed's
    mean paired difference of the mixtures over its prompts; Student-t interval and p over the seeds, the seeds'
    signs; the hierarchical bootstrap beside it; the same for VADER; each side's held-out KL). A cell's held-out KL
    more than 20% above its budget is flagged (``kl_over``). Pure: recomputable from results.json
    (``scripts/study_family.py`` does)."""
    mixed = {m: {s: {str(k): mixture_heldout(by_seed[s][str(k)], checkpoints, grid.for_seed(reference, s))
                     for k in budgets} for s in seeds if s in by_seed} for m, by_seed in choices.items()}
    cells = {}
    for method, by_seed in choices.items():
        cells[method] = {}
        for k in budgets:
            rows = []
            for seed in mixed[method]:
                c, h = by_seed[seed][str(k)], mixed[method][seed][str(k)]
                rows.append({"seed": seed, "status": c["status"], "reason": c["reason"], "w": c["w"],
                             "a": _vertex_name(c["a"]), "b": _vertex_name(c["b"]),
                             "reference_vertex": c["a"]["run"] is None or c["b"]["run"] is None,
                             "largest_kl": c["largest_kl"],
                             "validation": {"safety": c["safety"], "kl": c["kl"]},
                             "heldout": {"safety": float(h["scores"].mean()), "kl": h["kl"],
                                         "vader": float(h["vader"].mean()), "kl_over": bool(h["kl"] > 1.2 * k)}})
            cells[method][str(k)] = {
                "per_seed": rows, "n_seeds": len(rows),
                "safety": grid.seed_t_interval([r["heldout"]["safety"] for r in rows]),
                "kl": float(np.mean([r["heldout"]["kl"] for r in rows])),
                "vader": float(np.mean([r["heldout"]["vader"] for r in rows]))}

    differences = {}
    for a, b in PAIRS:
        if a not in choices or b not in choices:
            continue
        differences[f"{a}-{b}"] = {}
        for k in budgets:
            used = [s for s in seeds if s in mixed[a] and s in mixed[b]]
            x, y = ([mixed[m][s][str(k)] for s in used] for m in (a, b))
            judge = [u["scores"] - v["scores"] for u, v in zip(x, y)]
            vader = [u["vader"] - v["vader"] for u, v in zip(x, y)]
            means = [float(d.mean()) for d in judge]
            differences[f"{a}-{b}"][str(k)] = {
                "seeds": used, "judge": grid.seed_t_interval(means), "judge_seed_means": means,
                "signs": {"positive": sum(m > 0 for m in means), "n": len(means)},
                "judge_bootstrap": grid.hierarchical_bootstrap(judge, N_RESAMPLES),
                "vader": grid.seed_t_interval([d.mean() for d in vader]),
                "vader_seed_means": [float(d.mean()) for d in vader],
                "kl": {a: float(np.mean([u["kl"] for u in x])), b: float(np.mean([v["kl"] for v in y]))}}
    return {"budgets": budgets, "cells": cells, "differences": differences}


def _vertex_name(v: dict) -> str:
    return "reference" if v["run"] is None else f"{v['run']}@{v['step']}"


def heldout_result(cfg, ctx, temperature: float, run: str | None = None, step: int | None = None) -> dict:
    """The held-out evaluation of run ``run``'s checkpoint at ``step`` (of the reference when ``run`` is None) on
    ``ctx``'s prompts: ``{"safety_score", "positive_rate", "kl_to_ref", "scores", "texts", "log_ratios"}``.

    Cached as ``<cache_dir>/cache/heldout-<key>.json``, the key everything the numbers depend on (the weights of
    the checkpoint, the reference and the judge, the prompts, their batching, the temperature, the sampling seed,
    the completion length, the precisions, the device type, the CPU thread count), so that worker processes
    (``--jobs``) make them and the study reads them, and a study interrupted here continues where it stopped."""
    import json

    import torch

    from modeling.models import dtype_name, threads_key, weights_fingerprint
    from runtime.artifacts import Artifact

    lm = ctx.ref_model if run is None else load_causal_lm(
        str(evaluated_dir(Path(cfg.run.output_dir) / "runs" / run, step)), ctx.device)
    settings = [weights_fingerprint(lm), weights_fingerprint(ctx.ref_model), weights_fingerprint(ctx.judge),
                ctx.prompts, ctx.batch_size, temperature, ctx.seed, ctx.max_new_tokens, dtype_name(ctx.dtype),
                dtype_name(ctx.judge_dtype), torch.device(ctx.device).type, threads_key(ctx.device)]
    art = Artifact(Path(cfg.run.cache_dir) / "cache", settings, prefix="heldout-", suffix=".json", digits=16)
    if art.exists():
        return json.loads(art.path.read_text())
    res = evaluate_policy(lm, ctx, temperature)
    out = {"safety_score": res["safety_score"], "positive_rate": res["positive_rate"], "kl_to_ref": res["kl_to_ref"],
           "scores": [float(x) for x in res["scores"]], "texts": res["texts"],
           "log_ratios": [float(x) for x in res["log_ratios"]]}
    if ctx.acc is None or ctx.acc.is_main_process:
        art.write(lambda tmp: tmp.write_text(json.dumps(out)))
    return out


def chosen_checkpoint(selection: dict, checkpoints: dict, method: str, seed: int, k: float) -> dict | None:
    """The held-out record of the checkpoint a selection (budgets or bands) chose for ``method``, ``seed`` and
    ``k``; None when that cell chose none (or is not "ok")."""
    c = selection.get(method, {}).get(seed, {}).get(str(k))
    return None if c is None or c["status"] != "ok" else checkpoints[f"{c['point']['run']}@{c['point']['step']}"]


def _vader_summary(vader: list[float]) -> dict:
    """VADER's mean compound score and positive rate (compound > 0.05) over a model's held-out texts."""
    return {"vader": float(np.mean(vader)), "vader_positive_rate": float(np.mean(np.asarray(vader) > VADER_POSITIVE))}


def band_tables(banded: dict, checkpoints: dict, seeds: list[int], bands: list[float], width: float) -> dict:
    """The equal-KL reading from the band choices (:func:`grid.select_band_checkpoints`) and the chosen
    checkpoints' held-out numbers: per method and band its cell (every seed's choice, then held-out safety with a
    t interval over the seeds, KL and VADER), and per pair of methods and band the paired comparison (each seed's
    mean paired difference over its prompts; Student-t interval and p over the seeds; the hierarchical bootstrap
    beside it; the same for VADER; each side's held-out KL and candidates). Pure: recomputable from results.json
    (``scripts/study_family.py`` does)."""
    def chosen(method, seed, k):
        return chosen_checkpoint(banded, checkpoints, method, seed, k)

    cells = {}
    for method, by_seed in banded.items():
        cells[method] = {}
        for k in bands:
            rows, ok = [], []
            for seed in seeds:
                c = by_seed.get(seed, {}).get(str(k))
                ck = chosen(method, seed, k)
                rows.append({"seed": seed, "status": c["status"] if c else "no runs",
                             "reason": c["reason"] if c else "",
                             "n_candidates": c["n_candidates"] if c else 0,
                             "largest_kl": c["largest_kl"] if c else None,
                             "checkpoint": f"{ck['run']}@{ck['step']}" if ck else None,
                             "validation": ck["validation"] if ck else None, "heldout": ck["heldout"] if ck else None})
                if ck:
                    ok.append(ck)
            cells[method][str(k)] = {
                "per_seed": rows, "n_seeds": len(ok), "all_seeds": len(ok) == len(seeds),
                "safety": grid.seed_t_interval([x["heldout"]["safety"] for x in ok]),
                "kl": float(np.mean([x["heldout"]["kl"] for x in ok])) if ok else None,
                "vader": float(np.mean([x["heldout"]["vader"] for x in ok])) if ok else None,
                "vader_positive_rate": (float(np.mean([x["heldout"]["vader_positive_rate"] for x in ok]))
                                        if ok else None)}

    differences = {}
    for a, b in PAIRS:
        if a not in banded or b not in banded:
            continue
        differences[f"{a}-{b}"] = {}
        for k in bands:
            used, judge, vader, kl_a, kl_b = [], [], [], [], []
            for s in seeds:
                x, y = chosen(a, s, k), chosen(b, s, k)
                if x is None or y is None:
                    continue
                used.append(s)
                judge.append(np.subtract(x["per_prompt"]["scores"], y["per_prompt"]["scores"]))
                vader.append(np.subtract(x["per_prompt"]["vader"], y["per_prompt"]["vader"]))
                kl_a.append(x["heldout"]["kl"])
                kl_b.append(y["heldout"]["kl"])
            ka, kb = (float(np.mean(v)) if v else None for v in (kl_a, kl_b))
            differences[f"{a}-{b}"][str(k)] = {
                "seeds": used, "all_seeds": len(used) == len(seeds),
                "judge": grid.seed_t_interval([d.mean() for d in judge]),
                "judge_seed_means": [float(d.mean()) for d in judge],
                "judge_bootstrap": grid.hierarchical_bootstrap(judge, N_RESAMPLES),
                "vader": grid.seed_t_interval([d.mean() for d in vader]),
                "vader_seed_means": [float(d.mean()) for d in vader],
                "kl": {a: ka, b: kb},
                # "differ by more than 20%": the larger mean held-out KL over the smaller
                "kl_mismatch": bool(ka and kb and max(ka, kb) > 1.2 * min(ka, kb)),
                "n_candidates": {m: [banded[m][s][str(k)]["n_candidates"] for s in used] for m in (a, b)}}
    return {"targets": bands, "width": width, "cells": cells, "differences": differences}
