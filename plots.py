"""The dashboard, the individual plots and the printed tables, drawn from results.json and the metrics files
alone (no torch), so ``uv run main.py --plots-only`` redraws them in seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from config import ConfigError

COLORS = {"reference": "#7f7f7f", "dpo": "#1f77b4", "ppo": "#d62728", "ppo_gt": "#2ca02c"}
LABELS = {"reference": "reference", "dpo": "DPO", "ppo": "PPO (learned reward)", "ppo_gt": "PPO-GT (judge reward)"}
POLICIES = ("dpo", "ppo", "ppo_gt")


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl file (an empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pm(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "not reached"
    return fmt.format(mean) + ("" if math.isnan(std) else " ± " + fmt.format(std))


def summary_table(results: dict) -> str:
    """The default single runs of the first seed (every temperature), then, for several seeds or a sweep, the
    default runs over seeds and the matched-KL table."""
    names = [n for n in ("reference", *POLICIES) if n in results]
    lines = [f"default runs, seed {results['seed']}:", "| metric | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for key, fmt in (("safety_score", "{:.3f}"), ("positive_rate", "{:.3f}"), ("kl_to_ref", "{:.2f}"),
                     ("train_time_s", "{:.0f}"), ("ref_logps_s", "{:.0f}"), ("rm_train_s", "{:.0f}"),
                     ("eval_time_s", "{:.0f}")):
        if any(key in results[n] for n in names):  # itemised parts: "-" where a method has no such stage
            lines.append(f"| {key} | " + " | ".join(fmt.format(results[n][key]) if key in results[n] else "-"
                                                     for n in names) + " |")
    temp = str(results["eval_temperature"])
    lines.append(f"| win rate vs ref (T={temp}) | " + " | ".join(
        "{:.3f}".format(results[n]["win_rate_vs_ref"].get(temp, float("nan"))) for n in names) + " |")
    study = results.get("study", {})
    if len(study.get("seeds", [])) > 1:
        lines += ["", f"default runs over seeds {study['seeds']} (mean ± std):",
                  "| method | safety | positive rate | KL (nats) | training s |", "|---|---|---|---|---|"]
        for m, row in study["default_runs"].items():
            lines.append(f"| {LABELS[m]} | {_pm(*row['safety'], '{:.3f}')} | {_pm(*row['positive_rate'], '{:.3f}')} "
                         f"| {_pm(*row['kl'], '{:.2f}')} | {_pm(*row['train_time_s'], '{:.0f}')} |")
    if len(study.get("final_points", [])) > len(study.get("default_runs", {})) * len(study.get("seeds", [])):
        lines += ["", matched_kl_markdown(results)]
    return "\n".join(lines)


def matched_kl_markdown(results: dict) -> str:
    """Safety (and positive rate) on each method's frontier at the matched KLs, mean ± std over seeds."""
    study = results["study"]
    kls = study["matched_kls"]
    lines = [f"matched KL: safety / positive rate on each method's frontier, mean ± std over seeds {study['seeds']}",
             "| method | " + " | ".join(f"KL {k:g}" for k in kls) + " |", "|---" * (len(kls) + 1) + "|"]
    for m, cells in study["matched_kl"].items():
        row = []
        for k in kls:
            c = cells[str(k)]
            row.append(f"{_pm(c['safety_mean'], c['safety_std'], '{:.3f}')} / "
                       f"{_pm(c['positive_rate_mean'], c['positive_rate_std'], '{:.3f}')} (n={c['n']})")
        lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plotting
def plot_learning_curve(ax, results: dict) -> None:
    """Safety of each default run over its training seconds (the same unit for every method; PPO's clock
    starts with its reward model's training), one line per seed."""
    for r in results["runs"]:
        if not r["main"]:
            continue
        rows = [row for row in read_metrics(r["metrics"]) if "eval/safety_score" in row]
        first = r["seed"] == results["seed"]
        ax.plot([row.get("time_s", 0.0) for row in rows], [row["eval/safety_score"] for row in rows],
                "o-" if first else ".-", color=COLORS[r["method"]], alpha=1.0 if first else 0.45,
                lw=1.6 if first else 1, label=f"{LABELS[r['method']]} ({r['label']})" if first else None)
    ax.axhline(results["reference"]["safety_score"], ls="--", color=COLORS["reference"], label="reference")
    n = len(results.get("seeds", [results["seed"]]))
    ax.set_xlabel("training seconds (evaluation excluded; PPO's include its reward model)")
    ax.set_ylabel("safety score (judge P(positive))")
    ax.set_title("Learning curves on held-out prompts" + (f" ({n} seeds; faint: other seeds)" if n > 1 else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_pareto(ax, results: dict) -> None:
    """Every evaluation point of every run, each method's frontier (mean over seeds) and its seed band."""
    pts, curves = results["frontier"]["points"], results["frontier"].get("curves", {})
    n_seeds = len(results.get("seeds", [results["seed"]]))
    for method in POLICIES:
        mine = [p for p in pts if p["method"] == method]
        if not mine:
            continue
        ax.scatter([p["kl"] for p in mine], [p["safety"] for p in mine], s=10, alpha=0.35, color=COLORS[method])
        c = curves.get(method)
        if c:
            kl, mean, std, n = (np.array(c[k], dtype=float) for k in ("kl", "mean", "std", "n"))
            every = n >= n_seeds  # where every seed's frontier reaches: a mean over the same seeds throughout
            runs = len({p["label"] for p in mine})
            ax.plot(kl[every], mean[every], "-", lw=2, color=COLORS[method],
                    label=f"{LABELS[method]}: frontier, mean of {n_seeds} seed{'s' if n_seeds > 1 else ''} "
                          f"({runs} setting{'s' if runs > 1 else ''})")
            if n_seeds > 1:
                ax.fill_between(kl[every], (mean - std)[every], (mean + std)[every], color=COLORS[method], alpha=0.15)
    ax.scatter([0], [results["reference"]["safety_score"]], marker="*", s=120, color=COLORS["reference"],
               label="reference", zorder=5)
    ax.set_xlabel(f"KL(π_T ‖ π_ref,T) per sequence, nats (T = {results['eval_temperature']})")
    ax.set_ylabel("safety score (judge P(positive))")
    ax.set_title("Safety vs KL: every evaluation, frontier ± 1 std over seeds")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)


def plot_temperature(ax, results: dict) -> None:
    temps = results["temperatures"]
    for method in POLICIES:
        if method in results:
            ax.plot(temps, [results[method]["win_rate_vs_ref"][str(t)] for t in temps], "o-", color=COLORS[method],
                    label=LABELS[method])
    ax.axhline(0.5, ls="--", color=COLORS["reference"], label="tie with reference")
    ax.set_ylim(0, 1)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate vs reference")
    ax.set_title(f"Temperature robustness (default runs, seed {results['seed']})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_final(ax, results: dict) -> None:
    """The default runs' final safety and KL: mean ± std over seeds (one seed: that run)."""
    runs = results.get("study", {}).get("default_runs", {})
    names = ["reference", *[m for m in POLICIES if m in runs]]
    x = np.arange(len(names))
    w = 0.38
    safety = [(results["reference"]["safety_score"], 0.0)] + [tuple(runs[m]["safety"]) for m in names[1:]]
    kls = [(0.0, 0.0)] + [tuple(runs[m]["kl"]) for m in names[1:]]
    err = [[0 if math.isnan(s) else s for _, s in v] for v in (safety, kls)]
    bars = ax.bar(x - w / 2, [m for m, _ in safety], w, yerr=err[0], capsize=3,
                  color=[COLORS[n] for n in names], label="safety score")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("safety score (judge P(positive))")
    kl_ax = ax.twinx()
    kl_bars = kl_ax.bar(x + w / 2, [m for m, _ in kls], w, yerr=err[1], capsize=3, color="white",
                        edgecolor=[COLORS[n] for n in names], hatch="//", label="KL to reference (nats)")
    kl_ax.set_ylabel("sequence KL to reference (nats)")
    kl_ax.set_ylim(0, max(1.0, max(m + s for (m, _), s in zip(kls, err[1])) * 1.25))
    for b, (v, _) in zip(bars, safety):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    for b, (v, _) in zip(kl_bars, kls):
        kl_ax.text(b.get_x() + b.get_width() / 2, v + 0.02 * kl_ax.get_ylim()[1], f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(x, [LABELS[n].split(" (")[0] for n in names])
    n = len(results.get("seeds", [results["seed"]]))
    ax.set_title("Default runs: final safety (solid) and KL (hatched)"
                 + (f", mean ± std of {n} seeds" if n > 1 else ""))
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = kl_ax.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)


PANELS = {"learning_curve": plot_learning_curve, "pareto_frontier": plot_pareto,
          "temperature_robustness": plot_temperature, "final_metrics": plot_final}


def draw_dashboard(plots_dir) -> Path:
    """Draw the four-panel dashboard and each panel alone, from results.json and the metrics files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    path = plots_dir / "results.json"
    if not path.exists():
        raise ConfigError(f"no {path}: train first (uv run main.py ...), then --plots-only can redraw it")
    results = json.loads(path.read_text())
    missing = [r["metrics"] for r in results["runs"] if not Path(r["metrics"]).exists()]
    if missing:
        raise ConfigError(f"metrics file {missing[0]} named in {path} is missing; rerun training to recreate it")
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    for ax, draw in zip(axes.flat, PANELS.values()):
        draw(ax, results)
    seeds = results.get("seeds", [results["seed"]])
    fig.suptitle(f"DPO vs PPO on IMDb ({results['preset']} preset: policy {Path(results['policy_model']).name}, "
                 f"{results['n_eval_prompts']} held-out prompts, seed{'s' if len(seeds) > 1 else ''} "
                 f"{', '.join(map(str, seeds))})")
    fig.tight_layout()
    out = plots_dir / "dpo_results_dashboard.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    for name, draw in PANELS.items():
        f, ax = plt.subplots(figsize=(7, 5))
        draw(ax, results)
        f.tight_layout()
        f.savefig(plots_dir / f"{name}.png", dpi=110)
        plt.close(f)
    return out
