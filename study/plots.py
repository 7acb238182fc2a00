"""The dashboard, the individual plots and the printed tables, drawn from results.json and the metrics files
alone (no torch), so ``uv run main.py --plots-only`` redraws them in seconds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from config import ConfigError
from runtime.run_log import read_metrics, read_results
from study.grid import METHOD_LABELS, METHOD_SHORT, METHODS, envelope_curves, family_key, upper_envelope

COLORS = {"reference": "#7f7f7f", "dpo": "#1f77b4", "ppo": "#d62728", "ppo_gt": "#2ca02c"}
LABELS = {"reference": "reference", **METHOD_LABELS}
SAFETY_MIN_SPAN = 0.1  # a safety axis never zooms closer: differences smaller than noise must look small
KL_MIN_SPAN = 0.5  # nats


def _short(method: str) -> str:
    """``PPO`` for ``PPO (learned reward)``: tick labels and example tables."""
    return METHOD_SHORT.get(method, LABELS[method])


def _label(method: str, setting: str | None = None) -> str:
    """``PPO (learned reward), target_kl=6.0``."""
    return LABELS[method] + (f", {setting}" if setting else "")


def _safety_axis(ax, values) -> None:
    """A safety y-axis at least SAFETY_MIN_SPAN wide around ``values``, inside [0, 1], plain tick labels."""
    vals = [v for v in values if v is not None and math.isfinite(v)] or [0.5]
    span = max(max(vals) - min(vals), SAFETY_MIN_SPAN) * 1.2
    lo = min(max(0.0, (max(vals) + min(vals)) / 2 - span / 2), 1.0 - span)
    ax.set_ylim(max(0.0, lo), min(1.0, max(0.0, lo) + span))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def _noise_note(results: dict, values) -> str:
    """A title suffix when ``values`` (safety scores of one panel) all lie within twice the 95% half-width of one
    evaluation's noise of each other: then the panel shows no difference, whatever the lines look like."""
    noise = results.get("eval_noise")
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if noise is None or len(vals) < 2 or max(vals) - min(vals) >= 2 * 1.96 * noise:
        return ""
    return f"\n(all within evaluation noise: ±{1.96 * noise:.2g} per safety score, 95%)"


def _missing(v) -> bool:
    """No number: results.json writes an empty cell (NaN in memory) as null."""
    return v is None or math.isnan(v)


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if _missing(mean):
        return "not reached"
    return fmt.format(mean) + ("" if _missing(std) else " ± " + fmt.format(std))


# Printed under every table that puts default runs side by side: their KLs differ, so their safeties do not compare.
KL_NOTE = ("these runs sit at different KLs (kl_to_ref): side by side they are not a comparison of the methods; the "
           "study (--sweep) compares them at equal KL")


def summary_table(results: dict) -> str:
    """The default single runs of the first seed (every temperature), then, for several seeds or a sweep, the
    default runs over seeds and the matched-KL table."""
    names = [n for n in ("reference", *METHODS) if n in results]
    lines = [f"default runs, seed {results['seed']}:", "| metric | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for key, fmt in (("safety_score", "{:.3f}"), ("positive_rate", "{:.3f}"), ("kl_to_ref", "{:.2f}"),
                     ("train_time_s", "{:.0f}"), ("ref_logps_s", "{:.0f}"), ("rm_train_s", "{:.0f}"),
                     ("eval_time_s", "{:.0f}")):
        if any(key in results[n] for n in names):  # itemised parts: "-" where a method has no such stage
            lines.append(f"| {key} | " + " | ".join(fmt.format(results[n][key]) if key in results[n] else "-"
                                                     for n in names) + " |")
    diffs = {n: results[n].get("safety_vs_reference") for n in names}
    if any(diffs.values()):  # the evaluation noise of the comparison, printed beside it
        lines.append("| safety - reference, 95% paired CI | " + " | ".join(
            f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else "-" for d in diffs.values()) + " |")
    temp = str(results["eval_temperature"])
    lines.append(f"| win rate vs ref (T={temp}) | " + " | ".join(
        "{:.3f}".format(results[n]["win_rate_vs_ref"].get(temp, float("nan"))) for n in names) + " |")
    if len(names) > 2:  # two methods side by side
        lines.append(KL_NOTE)
    study = results.get("study", {})
    if len(study.get("seeds", [])) > 1:
        lines += ["", f"default runs over seeds {study['seeds']} (last evaluation, validation prompts; mean ± std):",
                  "| method | safety | positive rate | KL (nats) | training s |", "|---|---|---|---|---|"]
        for m, row in study["default_runs"].items():
            lines.append(f"| {LABELS[m]} | {_pm(*row['safety'], '{:.3f}')} | {_pm(*row['positive_rate'], '{:.3f}')} "
                         f"| {_pm(*row['kl'], '{:.2f}')} | {_pm(*row['train_time_s'], '{:.0f}')} |")
        lines.append(KL_NOTE)
    if "protocol" in results:
        if "envelope" in results["protocol"]:  # the primary reading; the bands are the secondary one
            lines += ["", envelope_markdown(results), "", "secondary reading, in KL bands:"]
        if "bands" in results["protocol"]:
            lines += ["", band_markdown(results)]
        lines += ["", "secondary reading, within a KL budget (the chosen checkpoints' KLs differ: not a comparison "
                      "at equal KL):", protocol_markdown(results)]
    return "\n".join(lines)


def examples_text(results: dict, n: int = 3) -> str:
    """A few held-out prompts with each model's completion and the judge's P(positive): a degenerate policy
    (repeated tokens, empty text) shows at a glance."""
    names = [m for m in ("reference", *METHODS) if m in results and results[m].get("examples")]
    if not names:
        return ""
    lines = ["example completions (held-out prompts; judge P(positive) in brackets):"]
    for i, ex in enumerate(results[names[0]]["examples"][:n]):
        lines.append(f'  prompt: "{ex["prompt"]}"')
        for m in names:
            e = results[m]["examples"][i]
            lines.append(f'    {_short(m):>9}: "{e["completion"].strip()}" ({e["p_positive"]:.2f})')
    return "\n".join(lines)


def _ci(c: dict, fmt: str = "{:+.3f}") -> str:
    """``+0.012 [-0.004, +0.027] (n=5)`` for a bootstrap result; "-" without data."""
    if not c or not c.get("n_seeds"):
        return "-"
    return f"{fmt.format(c['mean'])} [{fmt.format(c['lo'])}, {fmt.format(c['hi'])}] (n={c['n_seeds']})"


def _t(c: dict, fmt: str = "{:+.3f}") -> str:
    """``+0.012 [-0.004, +0.027]`` for a seed-level t interval; the mean alone for one seed; "-" for none."""
    if not c or not c.get("n_seeds"):
        return "-"
    if c["n_seeds"] < 2:
        return f"{fmt.format(c['mean'])} (1 seed)"
    return f"{fmt.format(c['mean'])} [{fmt.format(c['lo'])}, {fmt.format(c['hi'])}]"


def _holm_text(results: dict, family: dict, name: str, k: float) -> str:
    """A comparison's Holm-adjusted p in the family (``scripts/study_family.py``), "survives" beside it; "-" when
    no family is stored."""
    h = family.get("holm", {}).get(family_key(results["setup"]["pair_source"], name, k))
    return "-" if h is None else f"{h['p_holm']:.3f}" + (" survives" if h["survives"] else "")


def band_markdown(results: dict) -> str:
    """The study's reading at equal KL: per band (target k +- width), each method's checkpoint chosen on validation
    among those whose validation KL is in the band, on held-out prompts (mean over seeds [95% t interval over
    seeds], held-out KL, VADER's mean compound score, candidates per seed); the paired comparisons (judge and
    VADER, t intervals over seeds, p; Holm-adjusted p where ``scripts/study_family.py`` has added it); and the
    highest validation safety each method reaches. A cell missing some seeds says which and why."""
    b = results["protocol"]["bands"]
    ks, w = b["targets"], b["width"]
    head = " | ".join(f"{k:g} ± {w:.0%}" for k in ks)
    lines = ["equal KL (checkpoints chosen on validation inside each KL band; held-out safety, mean over seeds [95% "
             "t interval over seeds]; held-out KL; VADER mean compound; candidates per seed):",
             f"| method | {head} |", "|---" * (len(ks) + 1) + "|"]
    notes = []
    for m, cells in b["cells"].items():
        row = []
        for k in ks:
            c = cells[str(k)]
            if not c["n_seeds"]:
                row.append("not reached" if all(r["status"] == "not reached" for r in c["per_seed"]) else "-")
            else:
                row.append(f"{_t(c['safety'], '{:.3f}')}, KL {c['kl']:.2f}, VADER {c['vader']:+.3f}, n "
                           + "/".join(str(r["n_candidates"]) for r in c["per_seed"]))
            notes += [f"{_short(m)}, {k:g} nats, seed {r['seed']}: {r['reason']}" for r in c["per_seed"]
                      if r["status"] != "ok"]
        lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
    family = results.get("family", {})
    if b["differences"]:
        lines += ["", "paired differences at equal KL (each seed's mean over its prompts, then a 95% t interval over "
                      "the seeds; p two-sided; Holm over the family when scripts/study_family.py has run; "
                      "the judge's claimed, VADER's shown):",
                  "| comparison | band | seeds | judge | p | p (Holm) | VADER | KL each side |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, cells in b["differences"].items():
            a, bb = name.split("-", 1)
            for k in ks:
                d = cells[str(k)]
                if not d["seeds"]:
                    lines.append(f"| {_short(a)} - {_short(bb)} | {k:g} | 0 | - | - | - | - | - |")
                    continue
                holm_text = _holm_text(results, family, name, k)
                kl = d["kl"]
                lines.append(f"| {_short(a)} - {_short(bb)} | {k:g} | {len(d['seeds'])}"
                             f"{'' if d['all_seeds'] else ' (not all)'} | {_t(d['judge'])} | "
                             f"{'-' if _missing(d['judge']['p']) else format(d['judge']['p'], '.3f')} | {holm_text} | "
                             f"{_t(d['vader'])} | "
                             f"{kl[a]:.2f} / {kl[bb]:.2f}{' differ > 20%' if d['kl_mismatch'] else ''} |")
    hi = results["protocol"].get("highest")
    if hi:
        lines += ["", f"highest validation safety at any KL up to {hi['max_kl']:.1f} nats, per seed (held-out safety "
                      f"at held-out KL; shown, never claimed):"]
        for m, by_seed in hi["per_method"].items():
            lines.append(f"  {_short(m)}: " + "; ".join(
                f"seed {s} {r['heldout']['safety']:.3f} at {r['heldout']['kl']:.1f}" for s, r in by_seed.items()))
    if notes:
        lines += ["cells missing seeds:"] + [f"  {x}" for x in notes]
    return "\n".join(lines)


def envelope_markdown(results: dict) -> str:
    """The study's primary reading: per KL budget k, each method's best mixture of at most two checkpoints on the
    upper concave envelope of its validation points and the reference, at KL <= k, on held-out prompts (mean over
    seeds [95% t interval over seeds], held-out KL, VADER), then the paired comparisons (judge and VADER, t
    intervals over seeds, p, the seeds' signs, Holm where ``scripts/study_family.py`` has added it). Every cell that
    does not use its budget in full, or whose held-out KL is more than 20% above it, is listed below the table."""
    e = results["protocol"]["envelope"]
    ks = e["budgets"]
    lines = ["equal KL budgets (per method and seed, the validation envelope's best mixture of two checkpoints at KL "
             "<= k; held-out safety, mean over seeds [95% t interval over seeds]; held-out KL; VADER mean compound):",
             "| method | " + " | ".join(f"k = {k:g}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    notes = []
    for m, cells in e["cells"].items():
        row = []
        for k in ks:
            c = cells[str(k)]
            row.append(f"{_t(c['safety'], '{:.3f}')}, KL {c['kl']:.2f}, VADER {c['vader']:+.3f}")
            notes += [f"{_short(m)}, k = {k:g}, seed {r['seed']}: " + "; ".join(
                x for x in (r["reason"], f"held-out KL {r['heldout']['kl']:.2f} > 1.2 k" if r["heldout"]["kl_over"]
                            else "") if x) for r in c["per_seed"] if r["status"] != "ok" or r["heldout"]["kl_over"]]
        lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
    family = results.get("family", {})
    if e["differences"]:
        n = len(results["study"]["seeds"])
        lines += ["", "paired differences at equal KL budgets (each seed's mean over its prompts, then a 95% t "
                      f"interval over the seeds, which assumes their means normal: with {n} seeds no sign or rank "
                      f"test goes below p = {2 / 2 ** n:.4g}; p two-sided; Holm over the family when "
                      "scripts/study_family.py has run; the judge's claimed, VADER's shown):",
                  "| comparison | k | seeds > 0 | judge | p | p (Holm) | VADER | KL each side |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, cells in e["differences"].items():
            a, bb = name.split("-", 1)
            for k in ks:
                d = cells[str(k)]
                holm_text = _holm_text(results, family, name, k)
                p = "-" if _missing(d["judge"]["p"]) else format(d["judge"]["p"], ".3f")
                lines.append(f"| {_short(a)} - {_short(bb)} | {k:g} | {d['signs']['positive']}/{d['signs']['n']} | "
                             f"{_t(d['judge'])} | {p} | {holm_text} | {_t(d['vader'])} | "
                             f"{d['kl'][a]:.2f} / {d['kl'][bb]:.2f} |")
    if notes:
        lines += ["cells below their budget or above it on held-out prompts:"] + [f"  {x}" for x in notes]
    return "\n".join(lines)


def protocol_markdown(results: dict) -> str:
    """The study's table: per KL budget, each method's checkpoint chosen on validation (best validation safety
    with validation KL <= k), reported on held-out prompts with its 95% hierarchical bootstrap interval; then
    the paired differences between methods (matching seeds only). A cell whose chosen checkpoint's KL is under
    k/2, or that has none within k, counts as "-" (how many seeds, and why, is said)."""
    p = results["protocol"]
    kls = p["matched_kls"]
    lines = [f"study (checkpoints chosen on validation; held-out safety, mean over seeds [95% hierarchical bootstrap "
             f"CI, {p['n_resamples']} resamples]; held-out KL):",
             "| method | " + " | ".join(f"KL <= {k:g}" for k in kls) + " |", "|---" * (len(kls) + 1) + "|"]
    reasons = []
    for m, cells in p["cells"].items():
        row = []
        for k in kls:
            c = cells[str(k)]
            dash = [r for r in c["per_seed"] if r["status"] != "ok"]
            text = _ci(c["safety"], "{:.3f}")
            if c["kl"] is not None:
                text += f", KL {c['kl']:.2f}"
            if dash:
                text += f" ({len(dash)} seed{'s' if len(dash) > 1 else ''} -)"
                reasons += [f"{_short(m)}, KL <= {k:g}, seed {r['seed']}: {r['reason']}" +
                            (f" (held-out KL {r['heldout']['kl']:.2f})" if r["heldout"] else "") for r in dash]
            row.append(text)
        lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
    if p["differences"]:
        lines += ["", "paired differences of held-out safety (matching seeds; 95% hierarchical bootstrap CI):",
                  "| comparison | " + " | ".join(f"KL <= {k:g}" for k in kls) + " |", "|---" * (len(kls) + 1) + "|"]
        for name, cells in p["differences"].items():
            a, b = name.split("-", 1)
            lines.append(f"| {_short(a)} - {_short(b)} | " + " | ".join(
                _ci(cells[str(k)]) + (" no difference detected" if cells[str(k)]["n_seeds"] and
                                      cells[str(k)]["lo"] <= 0 <= cells[str(k)]["hi"] else "")
                for k in kls) + " |")
    if reasons:
        lines += ["cells shown as - for some seeds:"] + [f"  {r}" for r in reasons]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plotting
def plot_learning_curve(ax, results: dict) -> None:
    """Validation safety of each default run over its training progress (the fraction of its steps: DPO's steps
    and PPO's iterations are different units, and seconds would show the machine's load), one line per seed; each
    run's length and training seconds are in the legend."""
    shown, ref = [], None
    for r in results["runs"]:
        if not r["main"]:
            continue
        rows = [row for row in read_metrics(r["metrics"]) if "eval/safety_score" in row]
        if not rows:
            continue
        ref = next((row["eval/safety_score"] for row in rows if row["step"] == 0), ref)
        first = r["seed"] == results["seed"]
        last = max(row["step"] for row in rows) or 1
        unit = "iterations" if r["method"] != "dpo" else "steps"
        ax.plot([row["step"] / last for row in rows], [row["eval/safety_score"] for row in rows],
                "o-" if first else ".-", color=COLORS[r["method"]], alpha=1.0 if first else 0.45,
                lw=1.6 if first else 1,
                label=f"{_label(r['method'], r['label'])} ({last} {unit}, {r['train_time_s']:.0f} s, ends at KL "
                      f"{rows[-1].get('eval/kl_to_ref', float('nan')):.2f})" if first else None)
        shown += [row["eval/safety_score"] for row in rows]
    held_out = ref is None  # a resumed run may lack its step 0: then the held-out reference, said so
    ref = results["reference"]["safety_score"] if held_out else ref
    ax.axhline(ref, ls="--", color=COLORS["reference"], label="reference (held-out)" if held_out else "reference")
    n = len(results.get("seeds", [results["seed"]]))
    ax.set_xlabel("training progress (fraction of the run's steps)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylabel("safety score (judge P(positive))")
    _safety_axis(ax, shown + [ref])
    ax.set_title("Learning curves on validation prompts" + (f" ({n} seeds; faint: other seeds)" if n > 1 else "")
                 + _noise_note(results, shown + [ref]))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


FEW_POINTS = 4  # a frontier of fewer points (median over seeds) is drawn as points: a line through 2-3 suggests a curve


def _validation_reference(results: dict) -> float | None:
    """The reference's validation safety: the step-0 evaluation of the first seed's default runs."""
    return next((row["eval/safety_score"] for r in results.get("runs", []) if r["main"] and r["seed"] ==
                 results["seed"] for row in read_metrics(r["metrics"])[:1] if row["step"] == 0), None)


def plot_pareto(ax, results: dict) -> None:
    """Every validation evaluation of every run, each method's validation frontier (mean over seeds) and its seed
    band, and (a study) the checkpoints chosen on validation at their held-out KL and safety with 95% CIs."""
    pts, curves = results["frontier"]["points"], results["frontier"].get("curves", {})
    n_seeds = len(results.get("seeds", [results["seed"]]))
    e = results.get("protocol", {}).get("envelope")
    envelope = envelope_curves(results["protocol"]["validation_points"], e["reference_validation"]) if e else {}
    for method in METHODS:
        mine = [p for p in pts if p["method"] == method]
        if not mine:
            continue
        ax.scatter([p["kl"] for p in mine], [p["safety"] for p in mine], s=10, alpha=0.35, color=COLORS[method])
        c = curves.get(method)
        seeds = sorted({p["seed"] for p in mine})
        envelopes = {sd: upper_envelope([(p["kl"], p["safety"]) for p in mine if p["seed"] == sd]) for sd in seeds}
        runs = len({p["label"] for p in mine})
        # "runs", not "settings": the study's two settings are its pair sources, a method's runs its beta or KL
        # coefficients
        settings = f"{runs} run{'s' if runs > 1 else ''}{' per seed' if len(seeds) > 1 else ''}"
        if np.median([len(e) for e in envelopes.values()]) < FEW_POINTS:
            # a frontier of a few points: those points, each seed's, never a line through them
            for i, env in enumerate(envelopes.values()):
                ax.plot([k for k, _ in env], [v for _, v in env], "o", ls="none", ms=7, mfc="none", mew=1.6,
                        color=COLORS[method], label=None if i else
                        f"{LABELS[method]}: validation frontier points{' of each seed' if len(seeds) > 1 else ''}"
                        f" ({settings})")
        elif envelope:  # the primary reading's envelope (points and reference), mean ± std over the seeds
            curve = envelope[method]
            kl, mean, std = (np.array(curve[k], dtype=float) for k in ("kl", "mean", "std"))
            ax.plot(kl, mean, "-", lw=2, color=COLORS[method],
                    label=f"{LABELS[method]}: validation envelope (with the reference), mean of {n_seeds} seeds "
                          f"({settings})")
            if n_seeds > 1:
                ax.fill_between(kl, mean - std, mean + std, color=COLORS[method], alpha=0.15)
        elif c:
            kl, mean, std, n = (np.array(c[k], dtype=float) for k in ("kl", "mean", "std", "n"))
            every = n >= n_seeds  # where every seed's frontier reaches: a mean over the same seeds throughout
            what = (f"validation frontier, mean of {n_seeds} seeds up to the KL all reach" if n_seeds > 1
                    else "validation frontier (best safety within each KL)")
            ax.plot(kl[every], mean[every], "-", lw=2, color=COLORS[method],
                    label=f"{LABELS[method]}: {what} ({settings})")
            if n_seeds > 1:
                ax.fill_between(kl[every], (mean - std)[every], (mean + std)[every], color=COLORS[method], alpha=0.15)
    # Held out: a study with the envelope shows its cells (mean over seeds, 95% t interval over seeds, at their
    # mean held-out KL); an older study its within-budget picks (the secondary reading), labelled as such.
    chosen, cells_of = [], (e["cells"] if e else results.get("protocol", {}).get("cells", {}))
    for method, cells in cells_of.items():
        for c in cells.values():
            if c["kl"] is not None and c["safety"]["n_seeds"]:
                chosen.append((method, c))
    for i, (method, c) in enumerate(chosen):
        s = c["safety"]
        first = all(m != method for m, _ in chosen[:i])
        what = ("envelope cell at each k, held-out mean and 95% t interval over seeds" if e else
                "within-budget pick (secondary reading), held-out mean and 95% bootstrap CI")
        err = [[0.0], [0.0]] if _missing(s["lo"]) else [[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]]
        ax.errorbar([c["kl"]], [s["mean"]], yerr=err, fmt="o" if e else "D", ms=6, color=COLORS[method],
                    mec="black", capsize=3, zorder=6, label=f"{_short(method)}: {what}" if first else None)
    # The reference's validation safety is the KL-0 end of the validation frontiers; its held-out safety (a
    # different prompt sample, so a different number) only beside the held-out checkpoints.
    val_ref = _validation_reference(results)
    if val_ref is not None:
        ax.scatter([0], [val_ref], marker="*", s=120, color=COLORS["reference"], label="reference (validation)",
                   zorder=5)
    if chosen or val_ref is None:
        ax.scatter([0], [results["reference"]["safety_score"]], marker="*", s=120, facecolor="white",
                   edgecolor=COLORS["reference"], label="reference (held-out)", zorder=5)
    ax.set_xlabel(f"KL(π_T ‖ π_ref,T) per sequence, nats (T = {results['eval_temperature']})")
    ax.set_ylabel("safety score (judge P(positive))")
    safeties = ([p["safety"] for p in pts] + [results["reference"]["safety_score"]] + [v for v in [val_ref] if v]
                + [c["safety"][k] for _, c in chosen for k in ("lo", "hi") if not _missing(c["safety"][k])])
    _safety_axis(ax, safeties)
    kls = [p["kl"] for p in pts] + [c["kl"] for _, c in chosen]
    right = max([KL_MIN_SPAN] + [1.1 * k for k in kls])
    ax.set_xlim(min([0.0] + [1.1 * k for k in kls]) - 0.03 * right, right)  # the reference's star in full at KL 0
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_title("Safety vs KL on validation prompts" + (f" (frontier ± 1 std, {n_seeds} seeds)" if n_seeds > 1
                                                         else "")
                 + (("\n● envelope cells (mixtures chosen on validation), on held-out prompts" if e else
                     "\n◆ within-budget picks (secondary reading), on held-out prompts") if chosen else "")
                 + _noise_note(results, safeties))
    ax.legend(loc="upper left", fontsize=7)  # the frontiers rise to the right: the upper left stays empty
    ax.grid(alpha=0.3)


def plot_temperature(ax, results: dict) -> None:
    temps = results["temperatures"]
    for method in METHODS:
        if method in results:
            kl = results[method].get("kl_to_ref")
            at = "" if kl is None else f" (KL {kl:.2f} at T = {results['eval_temperature']})"
            ax.plot(temps, [results[method]["win_rate_vs_ref"][str(t)] for t in temps], "o-", color=COLORS[method],
                    label=LABELS[method] + at)
    ax.axhline(0.5, ls="--", color=COLORS["reference"], label="tie with reference")
    ax.set_ylim(0, 1)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate vs reference")
    n = results.get("n_eval_prompts", 0)
    wins = [results[m]["win_rate_vs_ref"][str(t)] for m in METHODS if m in results for t in temps]
    # a win rate over n prompts has a standard error of at most 0.5 / sqrt(n)
    tie = n > 1 and wins and max(abs(w - 0.5) for w in wins) < 1.96 * 0.5 / math.sqrt(n)
    ax.set_title(f"Temperature robustness (default runs, seed {results['seed']})"
                 + (f"\n(every win rate within evaluation noise of a tie: ±{1.96 * 0.5 / math.sqrt(n):.3f})"
                    if tie else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_final(ax, results: dict) -> None:
    """The default runs' final safety, each run's KL to the reference on its bar (the runs end at different KLs:
    the panel says so, and the safety-vs-KL panel compares them): one seed, on its held-out prompts with the
    paired 95% interval against the reference; several seeds, on the validation prompts (the last evaluation of
    each seed's run), mean ± std over the seeds. The reference has no interval: it is what the others are
    measured against."""
    runs = results.get("study", {}).get("default_runs", {})
    n = len(results.get("seeds", [results["seed"]]))
    names = ["reference", *[m for m in METHODS if (m in runs if n > 1 else m in results)]]
    x = np.arange(len(names))
    means, lo_err, hi_err, ticks, kls = [], [], [], [], []
    for name in names:
        if name == "reference":  # several seeds: its validation safety (the step-0 evaluation of the first run)
            ref = _validation_reference(results) if n > 1 else None
            mean, low, high, kl = (results["reference"]["safety_score"] if ref is None else ref), 0.0, 0.0, "KL 0"
        elif n > 1:  # spread over seeds
            mean, std = runs[name]["safety"]
            std = 0.0 if _missing(std) else std
            low = high = std
            kl = "KL\n" + _pm(*runs[name]["kl"], "{:.2f}")
        else:  # one seed: held-out, with the paired interval of its difference to the reference
            mean = results[name]["safety_score"]
            diff = results[name].get("safety_vs_reference")
            low, high = ((diff["mean"] - diff["lo"]), (diff["hi"] - diff["mean"])) if diff else (0.0, 0.0)
            kl = f"KL\n{results[name]['kl_to_ref']:.2f}"
        means.append(mean)
        lo_err.append(min(low, mean))  # never below 0
        hi_err.append(min(high, 1.0 - mean))
        ticks.append(LABELS[name].replace(" (", "\n("))
        kls.append(kl)
    bars = ax.bar(x, means, 0.6, color=[COLORS[m] for m in names])
    ax.errorbar(x[1:], means[1:], yerr=[lo_err[1:], hi_err[1:]], fmt="none", ecolor="black", capsize=4)
    for b, v, up, kl in zip(bars, means, hi_err, kls):  # the value above the error bar, the KL inside the bar
        ax.text(b.get_x() + b.get_width() / 2, v + up + 0.015, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.text(b.get_x() + b.get_width() / 2, 0.04, kl + (" nats" if kl != "KL 0" else ""), ha="center",
                va="bottom", fontsize=9, color="white", fontweight="bold")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("safety score (judge P(positive))")
    ax.set_xticks(x, ticks, fontsize=8)
    bars_mean = (f"validation, mean ± std over {n} seeds" if n > 1
                 else "held-out; bars: 95% paired CI vs reference")
    quiet = n == 1 and all(not (d["lo"] > 0 or d["hi"] < 0) for d in
                           (results.get(m, {}).get("safety_vs_reference") for m in names[1:]) if d)
    ax.set_title(f"Default runs: final safety ({bars_mean})\n"
                 f"each at its own KL: not comparable here, see safety vs KL"
                 + ("\n(no method differs from the reference beyond evaluation noise)" if quiet and names[1:] else ""))


def plot_bands(ax, results: dict) -> None:
    """A study's reading at equal KL: per KL band and method, the held-out safety of the checkpoints chosen on
    validation inside the band, mean over seeds with its 95% t interval over the seeds; a cell missing seeds is
    drawn hollow and labelled with its seed count, a band a method never reached is labelled so. The reference's
    held-out safety (mean over seeds) is the dashed line."""
    b = results["protocol"]["bands"]
    ks, methods = b["targets"], [m for m in METHODS if m in b["cells"]]
    x = np.arange(len(ks))
    width = 0.8 / max(1, len(methods))
    values = []
    for j, m in enumerate(methods):
        xs = x - 0.4 + width * (j + 0.5)
        for xi, k in zip(xs, ks):
            c = b["cells"][m][str(k)]
            t = c["safety"]
            if not c["n_seeds"]:
                ax.text(xi, 0.02, "not reached" if all(r["status"] == "not reached" for r in c["per_seed"]) else
                        "no checkpoint", rotation=90, ha="center", va="bottom", fontsize=7, color=COLORS[m])
                continue
            full = c["all_seeds"]
            ax.bar(xi, t["mean"], width * 0.9, color=COLORS[m] if full else "none", edgecolor=COLORS[m],
                   label=LABELS[m])  # one legend entry per method: duplicates dropped below
            if not _missing(t["lo"]):
                ax.errorbar(xi, t["mean"], yerr=[[t["mean"] - t["lo"]], [t["hi"] - t["mean"]]], fmt="none",
                            ecolor="black", capsize=3)
                values += [t["lo"], t["hi"]]
            values.append(t["mean"])
            if not full:
                ax.text(xi, t["mean"] + 0.01, f"{c['n_seeds']}/{len(c['per_seed'])}\nseeds", ha="center",
                        va="bottom", fontsize=7)
    refs = [r["safety"] for r in results["protocol"]["reference"].values()]
    if refs:
        ax.axhline(float(np.mean(refs)), color=COLORS["reference"], ls="--", lw=1, label="reference (held-out)")
    ax.set_xticks(x, [f"{k:g} nats\n({k * (1 - b['width']):.2g}-{k * (1 + b['width']):.2g})" for k in ks],
                  fontsize=8)
    ax.set_xlabel("KL band (validation KL of the chosen checkpoints)")
    ax.set_ylabel("held-out safety (judge P(positive))")
    ax.set_ylim(0, min(1.05, max(values + [0.5]) + 0.12))
    n = len(results.get("study", {}).get("seeds", []))
    secondary = "envelope" in results["protocol"]
    ax.set_title(f"{'Secondary reading, in KL bands' if secondary else 'Equal KL'}: held-out safety in each band, "
                 f"mean over {n} seeds (95% t interval)\nhollow: some seeds have no checkpoint in the band",
                 fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    seen = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    ax.legend(seen.values(), seen.keys(), fontsize=8, loc="lower right")


def plot_forest(ax, results: dict) -> None:
    """The primary reading's paired differences: per pair of methods and KL budget k, the mean over seeds of each
    seed's paired mean difference of the two envelope mixtures on held-out prompts, with its 95% t interval over
    the seeds; filled where it survives Holm over the family (``scripts/study_family.py``), hollow otherwise, and
    the seeds' signs beside each row."""
    e = results["protocol"]["envelope"]
    holm = results.get("family", {}).get("holm", {})
    setting = results["setup"]["pair_source"]
    rows = [(name, k, cells[str(k)]) for name, cells in e["differences"].items() for k in e["budgets"]]
    y = np.arange(len(rows))[::-1]
    for yi, (name, k, d) in zip(y, rows):
        t, a = d["judge"], name.split("-", 1)[0]
        h = holm.get(family_key(setting, name, k))
        survives = bool(h and h["survives"])
        color = COLORS[a]
        if not _missing(t["lo"]):
            ax.plot([t["lo"], t["hi"]], [yi, yi], "-", color=color, lw=1.5)
        ax.plot([t["mean"]], [yi], "o", ms=7, color=color, mfc=color if survives else "white", mew=1.5)
        ax.text(1.01, yi, f"{d['signs']['positive']}/{d['signs']['n']}", transform=ax.get_yaxis_transform(),
                va="center", fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{' − '.join(_short(m) for m in n.split('-', 1))}, k = {k:g}" for n, k, _ in rows], fontsize=7)
    ax.set_xlabel("paired difference in held-out safety (judge), mean over seeds, 95% t interval")
    ax.set_title("Equal KL budgets: paired differences of the envelope mixtures\n"
                 + ("filled: survives Holm over the family; right: seeds above 0" if holm else
                    "Holm not yet applied (scripts/study_family.py --write); right: seeds above 0"), fontsize=10)
    ax.grid(alpha=0.3, axis="x")


def plot_overoptimisation(ax, results: dict) -> None:
    """Over-optimisation (Gao et al. 2022) of PPO with the learned reward, first seed: along each of its runs, the
    reward model's mean score of the rollouts (what PPO maximises; left axis) and the judge's validation safety
    (what the study scores; right axis) against the square root of the KL to the reference (the rollouts' and the
    validation prompts', nats). Where the first keeps rising and the second flattens or falls, PPO is exploiting
    its reward model: the gap PPO-GT, trained on the judge itself, does not have."""
    runs = [r for r in results["runs"] if r["method"] == "ppo" and r["seed"] == results["seed"]]
    right = ax.twinx()
    for i, r in enumerate(runs):
        rows = read_metrics(r["metrics"])
        train = [row for row in rows if "objective/score" in row and "objective/kl" in row]
        val = [row for row in rows if "eval/kl_to_ref" in row]
        alpha = 1.0 - 0.5 * i / max(1, len(runs))
        ax.plot([math.sqrt(max(row["objective/kl"], 0.0)) for row in train], [row["objective/score"] for row in train],
                "-", color=COLORS["ppo"], alpha=alpha, lw=1.2,
                label="reward model's score (rollouts)" if i == 0 else None)
        right.plot([math.sqrt(max(row["eval/kl_to_ref"], 0.0)) for row in val],
                   [row["eval/safety_score"] for row in val], "o--", ms=3, color="black", alpha=alpha, lw=1,
                   label="judge's safety (validation)" if i == 0 else None)
    ax.set_xlabel("√KL to the reference (√nats)")
    ax.set_ylabel("reward model's score (its logit)", color=COLORS["ppo"])
    right.set_ylabel("judge's safety (P(positive))")
    ax.set_title(f"PPO on the learned reward: what it optimises vs what is scored (seed {results['seed']}, "
                 f"{len(runs)} runs)", fontsize=10)
    handles = [h for a in (ax, right) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


PANELS = {"learning_curve": plot_learning_curve, "pareto_frontier": plot_pareto,
          "temperature_robustness": plot_temperature, "final_metrics": plot_final}


def dashboard_title(results: dict) -> str:
    """``DPO vs PPO-GT on IMDb (quick preset: ...)``: the methods named by their reward, as in the panels."""
    seeds = results.get("seeds", [results["seed"]])
    policy = Path(results["policy_model"]).name
    policy = "self-built GPT-2" if policy.startswith(("base_lm-", "sft-")) or "/sft/" in results["policy_model"] \
        else policy
    methods = " vs ".join(_short(m) for m in METHODS if m in results or any(r["method"] == m for r in results["runs"]))
    return (f"{methods or 'The reference'} on IMDb ({results['preset']} preset: policy {policy}, "
            f"{results['n_eval_prompts']} held-out prompts, seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))})")


def draw_dashboard(plots_dir) -> Path:
    """Draw the four-panel dashboard and each panel alone, from results.json and the metrics files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    path = plots_dir / "results.json"
    if not path.exists():
        raise ConfigError(f"no {path}: train first (uv run main.py ...), then --plots-only can redraw it")
    try:
        results = read_results(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    missing = [r["metrics"] for r in results["runs"] if not Path(r["metrics"]).exists()]
    if missing:
        raise ConfigError(f"metrics file {missing[0]} named in {path} is missing; rerun training to recreate it")
    panels = dict(PANELS)
    if "envelope" in results.get("protocol", {}):  # a study: its paired differences replace the default runs' bars
        panels.pop("final_metrics")
        panels["paired_differences"] = plot_forest
        panels["equal_kl_bands"] = plot_bands  # the secondary reading, labelled as such
        if any(r["method"] == "ppo" for r in results["runs"]):
            panels["overoptimisation"] = plot_overoptimisation
    elif "bands" in results.get("protocol", {}):  # a study before the envelope: its band cells
        panels.pop("final_metrics")
        panels["equal_kl"] = plot_bands
    cols = 2 if len(panels) <= 4 else 3
    fig, axes = plt.subplots(2, cols, figsize=(7 * cols, 10))
    for ax, draw in zip(axes.flat, panels.values()):
        draw(ax, results)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(dashboard_title(results))
    fig.tight_layout()
    out = plots_dir / "dpo_results_dashboard.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    for name, draw in panels.items():
        f, ax = plt.subplots(figsize=(7, 5))
        draw(ax, results)
        f.tight_layout()
        f.savefig(plots_dir / f"{name}.png", dpi=110)
        plt.close(f)
    return out
