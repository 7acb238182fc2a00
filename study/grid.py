"""The study: DPO and PPO over a grid of settings and seeds, compared at matched KL.

``uv run main.py --preset offline --sweep --seeds 0 1 2 3 4`` trains, for every seed, DPO over ``--sweep_betas``
and PPO and PPO-GT (the judge's reward) at the default adaptive target and at each fixed KL
coefficient of ``--sweep_kl_coefs``. A seed changes the preference-pair sample, the initialisation of the
reward model's head, every sampling seed and the held-out prompt sample; the base models and the judge stay
the same. Every evaluation during training (on the validation prompts) is a checkpoint; per method, seed and
KL budget, :func:`select_checkpoints` chooses among them on validation numbers alone, and ``protocol.py`` (this package)
evaluates the chosen ones on held-out prompts and compares methods with :func:`hierarchical_bootstrap`.

The selection, bootstrap and frontier functions are pure (lists of points in, numbers out) and tested exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config import ConfigError, n_evals
from runtime.run_log import read_results
from runtime.settings import settings_diff

METHODS = ("dpo", "ppo", "ppo_gt")
METHOD_LABELS = {"dpo": "DPO", "ppo": "PPO (learned reward)", "ppo_gt": "PPO-GT (judge reward)"}
METHOD_SHORT = {m: label.split(" (")[0] for m, label in METHOD_LABELS.items()}  # "PPO" for tables and ticks


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    method: str  # "dpo", "ppo" or "ppo_gt"
    setting: str  # e.g. "beta=0.1", "target_kl=6.0", "kl_coef=0.5"
    seed: int
    name: str  # run directory name under models/ (and models/runs/)
    overrides: dict  # Config.replace(**overrides) on top of the run's config
    main: bool  # the default single run (default beta / target KL) of its method


def study_runs(cfg, seeds: list[int]) -> list[RunSpec]:
    """Every run of the study, seed by seed: the default DPO and PPO runs, and with ``--sweep`` the beta grid,
    PPO at each fixed KL coefficient and PPO-GT. The first seed's default runs keep the spec's names
    (``<output_dir>/dpo_toxic_reduced_model``, ``<output_dir>/ppo_toxic_reduced_model``, where output_dir is
    models/<preset> by default); the others live in ``<output_dir>/sweep/seed<k>/``."""
    rc, runs = cfg.run, []
    for i, seed in enumerate(seeds):
        where = "" if i == 0 else f"sweep/seed{seed}/"
        betas = [cfg.dpo.beta] + ([b for b in cfg.eval.sweep_betas if b != cfg.dpo.beta] if rc.sweep else [])
        # PPO: the default run (adaptive KL controller), then one run per fixed KL coefficient
        default = (("target_kl", cfg.ppo.target_kl) if cfg.ppo.target_kl is not None
                   else ("kl_coef", cfg.ppo.init_kl_coef))
        settings = [default] + ([("kl_coef", c) for c in cfg.eval.sweep_kl_coefs if ("kl_coef", c) != default]
                                if rc.sweep else [])
        if not rc.ppo_only:
            for j, beta in enumerate(betas):
                name = f"{where}dpo_toxic_reduced_model" if j == 0 else f"sweep/seed{seed}/dpo_beta{beta}"
                runs.append(RunSpec("dpo", f"beta={beta}", seed, name, {"dpo": {"beta": beta}}, j == 0))
        if not rc.dpo_only:
            # --ppo_reward judge makes the default PPO runs PPO-GT; with the learned reward, the sweep adds one
            # PPO-GT run per setting, on the judge's own reward.
            method = "ppo_gt" if cfg.ppo.ppo_reward == "judge" else "ppo"
            for j, (kind, value) in enumerate(settings):
                name = f"{where}ppo_toxic_reduced_model" if j == 0 else f"sweep/seed{seed}/ppo_klcoef{value}"
                over = {"ppo": {"target_kl": value}} if kind == "target_kl" else \
                    {"ppo": {"target_kl": None, "init_kl_coef": value}}
                runs.append(RunSpec(method, f"{kind}={value}", seed, name, over, j == 0))
            if rc.sweep and cfg.eval.sweep_ppo_gt and method == "ppo":  # PPO-GT over the same settings
                for j, (kind, value) in enumerate(settings):
                    name = f"sweep/seed{seed}/ppo_gt" if j == 0 else f"sweep/seed{seed}/ppo_gt_klcoef{value}"
                    over = {"ppo": {"ppo_reward": "judge"}} if kind == "target_kl" else \
                        {"ppo": {"ppo_reward": "judge", "target_kl": None, "init_kl_coef": value}}
                    runs.append(RunSpec("ppo_gt", f"{kind}={value}", seed, name, over, False))
    return runs


def coverage(cfg) -> dict:
    """``{method: (runs per seed, evaluations per run)}`` of the study's grid (``--sweep``): the protocol compares
    methods that had the same number of runs and of evaluations to choose from."""
    per_method = {}
    for spec in study_runs(cfg.replace(run={"sweep": True, "dpo_only": False, "ppo_only": False}), [0]):
        per_method[spec.method] = per_method.get(spec.method, 0) + 1
    return {m: (n, n_evals(cfg.dpo.dpo_steps, cfg.dpo.dpo_eval_every, cfg.dpo.dpo_eval_steps) if m == "dpo"
                else n_evals(cfg.ppo.ppo_steps, cfg.ppo.ppo_eval_every, cfg.ppo.ppo_eval_steps))
            for m, n in per_method.items()}


def check_coverage(cfg) -> None:
    """Refuse a study grid in which the methods have unequal numbers of runs or evaluations, or whose ``--max_kl``
    stops the runs before the top band can be reached (ConfigError)."""
    ec = cfg.eval
    top = max(ec.kl_bands) * (1 + ec.band_width)
    if ec.max_kl is not None and ec.max_kl < top:
        raise ConfigError(f"--max_kl {ec.max_kl:g} stops the study's runs before its top band ({max(ec.kl_bands):g} "
                          f"nats, up to {top:g}) is reached: raise it to {top:g} or more, or leave it out")
    cov = coverage(cfg)
    if len(set(cov.values())) > 1:
        said = ", ".join(f"{METHOD_SHORT[m]} {n} runs x {e} evaluations" for m, (n, e) in cov.items())
        raise ConfigError(f"--sweep compares methods at equal coverage, but the grid gives {said}; make them equal "
                          f"(--sweep_betas / --sweep_kl_coefs for runs, --dpo_eval_every / --ppo_eval_every or "
                          f"--dpo_eval_steps / --ppo_eval_steps for evaluations)")


def run_setup(cfg, precision: str, data_fingerprint: str) -> dict:
    """What two runs must share for their results to sit in one results.json: the models, data, seeds,
    precision and the evaluations' prompts (held-out and validation) and temperatures."""
    return {"preset": cfg.run.preset, "policy_model": cfg.model.policy_model, "judge_model": cfg.model.judge_model,
            "precision": precision, "data": data_fingerprint, "split_seed": cfg.data.split_seed,
            "n_pairs": cfg.data.n_pairs, "pair_source": cfg.dpo.pair_source, "seeds": cfg.run.seeds or [cfg.run.seed],
            "n_eval_prompts": cfg.eval.n_eval_prompts, "n_val_prompts": cfg.eval.n_val_prompts,
            "response_tokens": cfg.data.response_tokens,
            "eval_temperature": cfg.eval.eval_temperature, "temperatures": list(cfg.eval.temperatures),
            # only when on, so that a results.json written before the setting existed is still this setup's
            **({"sealed_prompts": True} if cfg.eval.sealed_prompts else {})}


def carried_over(cfg, setup: dict) -> list[dict]:
    """For ``--dpo-only`` or ``--ppo-only``: the other method's runs recorded in the results.json already in
    ``--plots_dir`` (their ``runs`` entries), so that the new results hold both methods. Empty for a run of
    both methods or when there is no results.json. A results.json from another setup, or whose runs' models
    are gone, is refused (ConfigError, before any training) rather than overwritten."""
    path = Path(cfg.run.plots_dir) / "results.json"
    if not (cfg.run.dpo_only or cfg.run.ppo_only) or not path.exists():
        return []
    fix = f"pass another --plots_dir, or move {path} away to start afresh"
    try:
        prev = read_results(path)
    except ValueError:  # not JSON, or JSON but not an object
        raise ConfigError(f"{path} is not a results.json main.py wrote, so this run's results cannot be added to "
                          f"it; {fix}") from None
    old = prev.get("setup")
    if old is None:
        raise ConfigError(f"{path} was written by an older version (no setup recorded), so this run's results "
                          f"cannot be added to it; {fix}")
    diff = [k for k in setup if old.get(k) != setup[k]]
    if diff:
        k = diff[0]
        raise ConfigError(f"{path} holds results of another setup ({k}: {old.get(k)!r} there, {setup[k]!r} now), "
                          f"so this run's results cannot be added to it; {fix}")
    keep = ("ppo", "ppo_gt") if cfg.run.dpo_only else ("dpo",)
    mine = [r for r in prev.get("runs", []) if r["method"] in keep]
    gone = [r["name"] for r in mine if not Path(r["metrics"]).exists()]
    if gone:
        raise ConfigError(f"{path} lists run {gone[0]}, whose model is no longer in {cfg.run.output_dir}; {fix}")
    return mine


def finished(run_cfg, spec: RunSpec) -> dict | None:
    """The saved summary of a run that completed with this very configuration (its final model directory is
    only ever written whole), or None. A run whose saved config differs in a setting it depends on
    (``settings.run_settings``: not the run-control flags, nor the read-out-only settings, nor those the method
    never reads) is not finished: it is
    trained again; so is one whose evaluations were not on the validation prompts, or a study run that did not
    keep its evaluated weights."""
    final = Path(run_cfg.run.output_dir) / spec.name
    if not (final / "train_summary.json").exists() or not (final / "training_config.json").exists():
        return None
    saved, now = json.loads((final / "training_config.json").read_text()), run_cfg.to_dict()
    summary = json.loads((final / "train_summary.json").read_text())
    # A run trained before evaluations moved to the validation prompts, or (for the study) without its evaluated
    # weights kept, cannot serve the study's choices: trained again.
    if summary.get("evaluated_on") != "validation" or (run_cfg.run.sweep and not summary.get("kept_evaluated")):
        return None
    return None if settings_diff(saved, now, spec.method) else summary


def reuse_run(run_cfg, spec: RunSpec, other_dir: str) -> dict | None:
    """Take a run another study finished (``--reuse_runs_from``): when ``<other_dir>/<name>`` is
    :func:`finished` with every setting this run depends on equal (``settings.run_settings``: PPO-GT, which reads no
    preference pairs, is the same run in both settings of the study), link its final model and its
    ``runs/<name>`` (metrics, evaluated weights) into this study's output directory and return its summary with
    ``reused_from``; otherwise None. A link already there is replaced; a real directory there is left alone
    (None)."""
    other = Path(other_dir).resolve()
    summary = finished(run_cfg.replace(run={"output_dir": str(other)}), spec)
    out = Path(run_cfg.run.output_dir)
    pairs = [(other / spec.name, out / spec.name), (other / "runs" / spec.name, out / "runs" / spec.name)]
    if summary is None or other == out.resolve() or any(d.exists() and not d.is_symlink() for _, d in pairs):
        return None
    for src, dst in pairs:
        if dst.is_symlink():
            dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src, target_is_directory=True)
    return {**summary, "model_dir": str(out / spec.name), "reused_from": str(other / spec.name)}


# ----------------------------------------------------------------------------------------- frontiers
def upper_envelope(points) -> list[tuple[float, float]]:
    """Pareto frontier of (kl, safety) points: those no other point beats with lower-or-equal KL.

    Returned sorted by KL, safety strictly increasing along it.
    """
    best, out = -np.inf, []
    for kl, safety in sorted(points, key=lambda p: (p[0], -p[1])):
        if safety > best:
            out.append((float(kl), float(safety)))
            best = safety
    return out


def frontier_at(points: list[dict], kls: list[float], key: str = "safety") -> list[float]:
    """Read a frontier at given KLs.

    Args:
        points: dicts with ``kl``, ``safety`` (and ``key``): one method's evaluations (one seed).
        kls: where to read it.
        key: the value to read (``safety``, or ``positive_rate`` of the same frontier points).
    Returns:
        One value per KL: the best the method does within that KL budget, i.e. linear interpolation between
        consecutive frontier points (the upper envelope of (kl, safety)), flat after the envelope's last point up
        to the largest KL any point reached (a run that went further without gaining is dominated, not missing);
        NaN outside the KL range the points span (not reached, never extrapolated).
    """
    env = upper_envelope([(p["kl"], p["safety"]) for p in points])
    if not env:
        return [float("nan")] * len(kls)
    by_point = {(p["kl"], p["safety"]): p[key] for p in points}
    xs = [kl for kl, _ in env]
    ys = [by_point[(kl, s)] for kl, s in env]
    reached = max(p["kl"] for p in points)
    return [float(np.interp(k, xs, ys)) if xs[0] <= k <= reached else float("nan") for k in kls]


def concave_envelope(points: list[dict]) -> list[dict]:
    """The vertices of the upper concave envelope of ``points`` (dicts with ``kl`` and ``safety``), by increasing
    KL: every point under it is the safety and KL of a mixture of two checkpoints (answer a share w of the prompts
    with one, the rest with the other: both the safety and the KL to the reference are then the w-mix of theirs).
    Of two points at the same KL only the safer can be a vertex."""
    hull: list[dict] = []
    for p in sorted(points, key=lambda q: (q["kl"], -q["safety"])):
        if hull and p["kl"] == hull[-1]["kl"]:
            continue
        # drop the last vertex while it lies on or under the chord from the one before it to p
        while len(hull) >= 2 and ((hull[-1]["kl"] - hull[-2]["kl"]) * (p["safety"] - hull[-2]["safety"])
                                  - (hull[-1]["safety"] - hull[-2]["safety"]) * (p["kl"] - hull[-2]["kl"])) >= 0:
            hull.pop()
        hull.append(p)
    return hull


def envelope_cell(points: list[dict], k: float) -> dict | None:
    """The highest point of the concave envelope at KL <= ``k``, and the mixture that attains it:
    ``{"safety", "kl", "a", "b", "w"}``, the mixture answering a share ``w`` of the prompts with checkpoint ``a``
    and the rest with ``b`` (one vertex: ``a is b``, w = 1). Past the envelope's peak the peak itself (a budget not
    used in full: ``kl`` < k); below the smallest KL any point has, None."""
    hull = concave_envelope(points)
    if not hull or hull[0]["kl"] > k:
        return None
    peak = max(range(len(hull)), key=lambda i: hull[i]["safety"])
    if hull[peak]["kl"] <= k:
        v = hull[peak]
        return {"safety": v["safety"], "kl": v["kl"], "a": v, "b": v, "w": 1.0}
    # below the peak the envelope rises: its best at KL <= k is at k, between the vertices around k
    j = next(i for i in range(1, peak + 1) if hull[i]["kl"] > k)
    a, b = hull[j - 1], hull[j]
    w = (b["kl"] - k) / (b["kl"] - a["kl"])
    return {"safety": w * a["safety"] + (1 - w) * b["safety"], "kl": k, "a": a, "b": b, "w": w}


def for_seed(per_seed: dict, seed: int):
    """A per-seed dict's entry for ``seed``, keyed by the int or, read back from results.json, by its string."""
    return per_seed[seed] if seed in per_seed else per_seed[str(seed)]


def reference_vertex(method: str, seed: int, safety: float) -> dict:
    """The reference as a point of a method's envelope: KL 0, its step-0 validation safety (``run`` None)."""
    return {"method": method, "label": "reference", "seed": seed, "run": None, "step": 0, "time_s": 0.0,
            "kl": 0.0, "safety": safety, "positive_rate": None}


def with_reference(method: str, seed: int, cands: list[dict], references: dict) -> list[dict]:
    """What a method's envelope on a seed is made of: the reference (``references``: ``{seed: its step-0
    validation safety}``) and that method's checkpoints of that seed, ``cands``."""
    return [reference_vertex(method, seed, for_seed(references, seed)), *cands]


def envelope_curves(points: list[dict], references: dict, n: int = 60) -> dict:
    """Each method's validation envelope (the primary reading's, :func:`select_envelope_cells`: its points and the
    reference) read on a KL grid from 0 to its largest KL, per seed, then its mean and std over the seeds (for the
    dashboard): ``{method: {"kl", "mean", "std"}}``. Past a seed's largest KL its value is its peak (a policy at a
    lower KL meets any larger budget)."""
    envelopes = {}
    for method, seed, cands in by_method_and_seed(points):
        envelopes.setdefault(method, []).append(with_reference(method, seed, cands, references))
    curves = {}
    for method, per_seed in envelopes.items():
        kls = np.linspace(0.0, max(p["kl"] for pts in per_seed for p in pts), n)
        values = np.array([[envelope_cell(pts, float(k))["safety"] for k in kls] for pts in per_seed])
        std = values.std(0, ddof=1) if len(values) > 1 else np.full(n, np.nan)
        curves[method] = {"kl": kls.tolist(), "mean": values.mean(0).tolist(), "std": std.tolist()}
    return curves


def mean_and_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def frontier_curves(points: list[dict], seeds: list[int], n: int = 60) -> dict:
    """Each method's frontier on a KL grid, per seed, then its mean and std over the seeds (for the Pareto
    panel): ``{method: {"kl", "mean", "std", "n"}}``, NaN where no seed's frontier reaches."""
    curves = {}
    for method in METHODS:
        mine = [p for p in points if p["method"] == method]
        if not mine:
            continue
        grid = np.linspace(0.0, max(p["kl"] for p in mine), n).tolist()
        per_seed = np.array([frontier_at([p for p in mine if p["seed"] == s], grid) for s in seeds
                             if any(p["seed"] == s for p in mine)])
        ok = np.isfinite(per_seed)
        counts = ok.sum(0)
        mean = np.where(counts > 0, np.nansum(per_seed, 0) / np.maximum(counts, 1), np.nan)
        std = np.array([np.std(per_seed[ok[:, j], j], ddof=1) if counts[j] > 1 else np.nan for j in range(n)])
        curves[method] = {"kl": grid, "mean": mean.tolist(), "std": std.tolist(), "n": counts.tolist()}
    return curves


def paired_difference(a, b, z: float = 1.96) -> dict:
    """Mean of ``a - b`` over paired items (the same held-out prompts, sampled with the same seeds) and its
    normal-approximation interval ``mean ± z * sd / sqrt(n)``: the evaluation noise of one comparison.
    Returns ``{"mean", "lo", "hi", "n"}``."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or d.size < 2:
        raise ValueError("paired_difference needs two equally long arrays of at least 2 items")
    half = z * d.std(ddof=1) / np.sqrt(d.size)
    return {"mean": float(d.mean()), "lo": float(d.mean() - half), "hi": float(d.mean() + half), "n": int(d.size)}


def default_runs(finals: list[dict]) -> dict:
    """The default single runs (default beta, default target KL) of every seed: each final metric's mean and
    std over the seeds, per method."""
    out = {}
    for method in METHODS:
        mine = [f for f in finals if f["method"] == method and f["main"]]
        if mine:
            out[method] = {"n_seeds": len(mine), **{
                key: mean_and_std([f[key] for f in mine])
                for key in ("safety", "positive_rate", "kl", "train_time_s")}}
    return out


# ------------------------------------------------------------------------- the protocol (pure parts)
def validation_points(rows: list[dict], reference: bool = False, **tags) -> list[dict]:
    """A run's evaluations, from its metrics.jsonl rows with one: ``{**tags, "step", "time_s", "kl", "safety",
    "positive_rate"}`` each, in validation numbers (every evaluation during training is on the validation prompts);
    step 0 (the reference, before any update) only with ``reference``. The one reader of validation points: the
    study's, results.json's frontier and the grid scripts' (tuning, KL control) all come from here."""
    return [{**tags, "step": r["step"], "time_s": r.get("time_s", 0.0), "kl": r["eval/kl_to_ref"],
             "safety": r["eval/safety_score"], "positive_rate": r["eval/positive_rate"]}
            for r in rows if "eval/kl_to_ref" in r and (reference or r["step"] > 0)]


def by_method_and_seed(points: list[dict], methods=METHODS):
    """``(method, seed, that method's points of that seed)`` for each method in order and each of its seeds."""
    for method in methods:
        mine = [p for p in points if p["method"] == method]
        for seed in sorted({p["seed"] for p in mine}):
            yield method, seed, [p for p in mine if p["seed"] == seed]


def select_checkpoints(points: list[dict], kls: list[float], methods=METHODS, min_use: float = 0.5) -> dict:
    """For each method, seed and KL budget k: among all that method's checkpoints of that seed (every run of
    the grid), the one with the best validation safety whose validation KL is at most k. Exact ties (only a
    judge that cannot tell checkpoints apart makes them) go to the higher KL, then the later step: the
    checkpoint the method reaches within the budget. Reads validation numbers only.

    Returns ``{method: {seed: {str(k): {"point": point or None, "status": "ok" or "-", "reason": str}}}}``: a
    cell is "-" when no checkpoint is within the budget, or when the chosen one's KL is under ``min_use * k``
    (the method never went near k, so the cell would describe another budget; it is reported, never
    interpolated).
    """
    out = {}
    for method, seed, cands in by_method_and_seed(points, methods):
        cells = out.setdefault(method, {}).setdefault(seed, {})
        for k in kls:
            within = [p for p in cands if p["kl"] <= k]
            if not within:
                cells[str(k)] = {"point": None, "status": "-",
                                 "reason": f"no checkpoint within {k:g} nats (the lowest is at "
                                           f"{min(p['kl'] for p in cands):.2f})"}
                continue
            best = max(within, key=lambda p: (p["safety"], p["kl"], p["step"]))
            far = min_use > 0 and best["kl"] < min_use * k
            cells[str(k)] = {"point": best, "status": "-" if far else "ok",
                             "reason": f"the best checkpoint within {k:g} nats is at {best['kl']:.2f} "
                                       f"(< {min_use:g} k)" if far else ""}
    return out


def hierarchical_bootstrap(per_seed: list, n_resamples: int = 2000, level: float = 0.95, seed: int = 0,
                           resample: str = "both") -> dict:
    """Mean over seeds of each seed's mean over prompts, and its percentile interval from a two-level bootstrap:
    resample the seeds with replacement, then within each drawn seed its prompts with replacement.

    Args:
        per_seed: one 1-D array per seed (e.g. per-prompt score differences of two methods on that seed's
            held-out prompts).
        resample: ``"both"`` (the interval the study reports), or one level alone to see where the width
            comes from: ``"prompts"`` (the seeds held fixed, each seed's prompts resampled) or ``"seeds"``
            (each seed's mean held fixed, the seeds resampled).
    Returns:
        ``{"mean", "lo", "hi", "n_seeds", "n_prompts", "n_resamples"}``; lo/hi NaN without data.
    """
    if resample not in ("both", "prompts", "seeds"):
        raise ValueError(f"resample must be 'both', 'prompts' or 'seeds', not {resample!r}")
    arrays = [np.asarray(a, dtype=float) for a in per_seed if len(a)]
    if not arrays:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n_seeds": 0, "n_prompts": 0,
                "n_resamples": n_resamples}
    rng = np.random.default_rng(seed)
    S = len(arrays)
    means = np.array([a.mean() for a in arrays])
    stats = np.empty(n_resamples)
    for b in range(n_resamples):
        drawn = np.arange(S) if resample == "prompts" else rng.integers(0, S, S)
        if resample == "seeds":
            stats[b] = means[drawn].mean()
        else:
            stats[b] = np.mean([arrays[s][rng.integers(0, arrays[s].size, arrays[s].size)].mean() for s in drawn])
    tail = (1 - level) / 2
    return {"mean": float(means.mean()), "lo": float(np.quantile(stats, tail)),
            "hi": float(np.quantile(stats, 1 - tail)), "n_seeds": S, "n_prompts": int(sum(a.size for a in arrays)),
            "n_resamples": n_resamples}


def kl_over_last_fifth(rows: list[dict]) -> tuple[float, float] | None:
    """A run's validation KL at the last evaluation at or before 80% of its steps and at its final evaluation,
    ``(start, end)``; None when no evaluation lies in the first four fifths. With evaluations every tenth of a
    run that is its last fifth; with four (steps 10-40) it is its last quarter (30 to 40)."""
    evals = [r for r in rows if "eval/kl_to_ref" in r]
    if not evals:
        return None
    last = evals[-1]
    before = [r for r in evals if r["step"] <= 0.8 * last["step"]]
    if not before:
        return None
    return before[-1]["eval/kl_to_ref"], last["eval/kl_to_ref"]


def kl_flattened(rows: list[dict], tolerance: float = 0.1) -> bool | None:
    """Had a run's validation KL flattened by its last step: did it change by less than ``tolerance`` (10%) over
    the last fifth of the run (:func:`kl_over_last_fifth`)? None when that cannot be read."""
    span = kl_over_last_fifth(rows)
    if span is None:
        return None
    start, end = span
    return bool(abs(end - start) <= tolerance * abs(end))


# ------------------------------------------------------------------------ equal KL: bands (pure parts)
def band_bounds(k: float, width: float) -> tuple[float, float]:
    """The KL band around target ``k``: ``[k (1 - width), k (1 + width)]`` nats."""
    return k * (1 - width), k * (1 + width)


def band_choice(points: list[dict], k: float, width: float) -> tuple[dict | None, list[dict]]:
    """The band choice, the one rule of the study and the tuning: among ``points`` whose validation KL lies in
    ``k`` ± ``width`` * ``k`` (:func:`band_bounds`), the one with the best validation safety; ties (a judge that
    cannot tell checkpoints apart) go to the KL nearer ``k``, then the later step. Returns ``(choice or None,
    the points in the band)``."""
    lo, hi = band_bounds(k, width)
    inside = [p for p in points if lo <= p["kl"] <= hi]
    best = max(inside, key=lambda p: (p["safety"], -abs(p["kl"] - k), p["step"])) if inside else None
    return best, inside


def select_band_checkpoints(points: list[dict], bands: list[float], width: float, methods=METHODS) -> dict:
    """For each method, seed and band (target ``k`` ± ``width``): among all that method's checkpoints of that seed
    (every run of the grid) whose validation KL lies in the band, the one with the best validation safety. Ties
    (a judge that cannot tell checkpoints apart) go to the KL nearer ``k``, then the later step. Reads validation
    numbers only.

    Returns ``{method: {seed: {str(k): cell}}}``, a cell ``{"point", "status", "n_candidates", "largest_kl",
    "reason"}``: status ``"ok"`` with the chosen point, or ``"not reached"`` (the seed's largest KL is below the
    band) or ``"skipped"`` (its checkpoints lie below and above the band, none in it) with ``point`` None.
    ``n_candidates``: the checkpoints in the band (a method with more of them has a best-of-N advantage: the
    study records it beside every choice)."""
    out = {}
    for method, seed, cands in by_method_and_seed(points, methods):
        cells = out.setdefault(method, {}).setdefault(seed, {})
        largest = max(p["kl"] for p in cands)
        for k in bands:
            lo, hi = band_bounds(k, width)
            best, inside = band_choice(cands, k, width)
            if inside:
                cells[str(k)] = {"point": best, "status": "ok", "n_candidates": len(inside),
                                 "largest_kl": largest, "reason": ""}
            elif largest < lo:
                cells[str(k)] = {"point": None, "status": "not reached", "n_candidates": 0, "largest_kl": largest,
                                 "reason": f"not reached (largest KL {largest:.2f})"}
            else:
                below = max((p["kl"] for p in cands if p["kl"] < lo), default=float("nan"))
                above = min(p["kl"] for p in cands if p["kl"] > hi)
                cells[str(k)] = {"point": None, "status": "skipped", "n_candidates": 0, "largest_kl": largest,
                                 "reason": f"no checkpoint in [{lo:.2f}, {hi:.2f}] (nearest {below:.2f} and "
                                           f"{above:.2f}): evaluate more densely"}
    return out


def select_envelope_cells(points: list[dict], references: dict, budgets: list[float], methods=METHODS) -> dict:
    """The study's primary reading, from validation numbers only: for each method, seed and budget k, the highest
    point at KL <= k of the upper concave envelope of that method's checkpoints of that seed and the reference
    (``references``: ``{seed: its step-0 validation safety}``, the reference's evaluation before any update, the
    same for every run of a seed), and the mixture of at most two of them that attains it (:func:`envelope_cell`).

    Returns ``{method: {seed: {str(k): cell}}}``, a cell ``{"a", "b", "w", "safety", "kl", "largest_kl", "status",
    "reason"}``: answer a share ``w`` of the prompts with vertex ``a``, the rest with ``b`` (a vertex that is the
    reference has ``run`` None); ``safety`` and ``kl`` the envelope's (validation). Status ``"ok"`` uses the budget
    in full; ``"peak"`` takes the envelope's highest point, below k: the seed's largest validation KL is below k
    (reason ``"largest KL x < k"``), or its envelope falls past a point below k."""
    out = {}
    for method, seed, cands in by_method_and_seed(points, methods):
        cells = out.setdefault(method, {}).setdefault(seed, {})
        largest = max(p["kl"] for p in cands)
        for k in budgets:
            c = envelope_cell(with_reference(method, seed, cands, references), k)
            full = c["kl"] >= k
            reason = "" if full else (f"largest KL {largest:.2f} < {k:g}" if largest < k else
                                      f"envelope peaks at {c['kl']:.2f} < {k:g}")
            cells[str(k)] = {**c, "largest_kl": largest, "status": "ok" if full else "peak", "reason": reason}
    return out


def highest_safety(points: list[dict], max_kl: float, methods=METHODS) -> dict:
    """Per method and seed, the checkpoint with the best validation safety at any validation KL up to ``max_kl``
    (ties: the lower KL, then the earlier step): ``{method: {seed: point}}``. Validation numbers only."""
    out = {}
    for method, seed, cands in by_method_and_seed(points, methods):
        cands = [p for p in cands if p["kl"] <= max_kl]
        if cands:
            out.setdefault(method, {})[seed] = max(cands, key=lambda p: (p["safety"], -p["kl"], -p["step"]))
    return out


def seed_t_interval(seed_means, level: float = 0.95) -> dict:
    """The seed-level inference of a paired comparison: the mean over seeds of each seed's paired mean
    difference, its Student-t interval with S - 1 degrees of freedom, and the two-sided p-value of the one-sample
    t-test of mean 0. The seed is the unit of replication (what a new run of the study would redraw).

    Args:
        seed_means: (S,) one paired mean difference per seed.
    Returns:
        ``{"mean", "lo", "hi", "sd", "t", "p", "n_seeds"}``; lo, hi, t and p NaN under 2 seeds; for S >= 2 seeds
        with zero spread, the interval is the point and p is 0 (a nonzero mean) or 1."""
    from scipy import stats

    d = np.asarray(seed_means, dtype=float)
    S = d.size
    nan = float("nan")
    if S == 0:
        return {"mean": nan, "lo": nan, "hi": nan, "sd": nan, "t": nan, "p": nan, "n_seeds": 0}
    mean = float(d.mean())
    if S < 2:
        return {"mean": mean, "lo": nan, "hi": nan, "sd": nan, "t": nan, "p": nan, "n_seeds": 1}
    sd = float(d.std(ddof=1))
    se = sd / np.sqrt(S)
    if se == 0:
        return {"mean": mean, "lo": mean, "hi": mean, "sd": 0.0, "t": nan, "p": 0.0 if mean else 1.0, "n_seeds": S}
    half = float(stats.t.ppf(0.5 + level / 2, S - 1)) * se
    t = mean / se
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "t": float(t),
            "p": float(2 * stats.t.sf(abs(t), S - 1)), "n_seeds": S}


def holm(pvalues: dict, alpha: float = 0.05) -> dict:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values: the k-th smallest of m is multiplied by
    m - k + 1, running maxima keep the order, capped at 1. A comparison survives when its adjusted p is below
    ``alpha``; the family-wise error rate is then at most ``alpha``. NaN p-values (a comparison that could not be
    made) are left out of the family and stay NaN.

    Returns ``{key: {"p", "p_holm", "survives"}}`` for every key of ``pvalues``."""
    keys = sorted((k for k, p in pvalues.items() if np.isfinite(p)), key=lambda k: pvalues[k])
    m, running, out = len(keys), 0.0, {}
    for i, k in enumerate(keys):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = {"p": float(pvalues[k]), "p_holm": running, "survives": running < alpha}
    for k, p in pvalues.items():
        out.setdefault(k, {"p": float("nan"), "p_holm": float("nan"), "survives": False})
    return out


def family_key(setting: str, pair: str, k: float) -> str:
    """The name of one comparison in the family Holm's correction runs over, ``<pair_source>|<pair>|<band>``:
    ``dataset|dpo-ppo|4``."""
    return f"{setting}|{pair}|{k:g}"
