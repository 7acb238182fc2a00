"""The dashboard and the individual plots, drawn from results.json and the metrics files alone (no torch),
so ``uv run main.py --plots-only`` redraws them in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from config import ConfigError


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl file (an empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_table(results: dict) -> str:
    names = [n for n in ("reference", "dpo", "ppo") if n in results]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, fmt in (("safety_score", "{:.3f}"), ("positive_rate", "{:.3f}"), ("kl_to_ref", "{:.2f}"),
                     ("train_time_s", "{:.0f}"), ("ref_logps_s", "{:.0f}"), ("rm_train_s", "{:.0f}"),
                     ("eval_time_s", "{:.0f}")):
        if any(key in results[n] for n in names):  # itemised parts: "-" where a method has no such stage
            lines.append(f"| {key} | " + " | ".join(fmt.format(results[n][key]) if key in results[n] else "-"
                                                     for n in names) + " |")
    temp = str(results["eval_temperature"])
    lines.append(f"| win rate vs ref (T={temp}) | " + " | ".join(
        "{:.3f}".format(results[n]["win_rate_vs_ref"].get(temp, float("nan"))) for n in names) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plotting
COLORS = {"reference": "#7f7f7f", "dpo": "#1f77b4", "ppo": "#d62728"}
LABELS = {"reference": "reference", "dpo": "DPO", "ppo": "PPO"}


def plot_learning_curve(ax, results: dict) -> None:
    top = None
    for r in results["runs"]:
        if not r["main"]:
            continue
        rows = [row for row in read_metrics(r["metrics"]) if "eval/safety_score" in row]
        steps, safety = [row["step"] for row in rows], [row["eval/safety_score"] for row in rows]
        if r["method"] == "ppo" and any(x["method"] == "dpo" and x["main"] for x in results["runs"]):
            # PPO iterations and DPO steps are different units: PPO gets the top axis.
            top = top or ax.twiny()
            top.plot(steps, safety, "s-", color=COLORS["ppo"], label=f"PPO ({r['label']})")
            top.set_xlabel("PPO iteration (rollout + update)", color=COLORS["ppo"])
        else:
            ax.plot(steps, safety, "o-", color=COLORS[r["method"]], label=f"{LABELS[r['method']]} ({r['label']})")
    ax.axhline(results["reference"]["safety_score"], ls="--", color=COLORS["reference"], label="reference")
    ax.set_xlabel("DPO optimiser step" if any(r["method"] == "dpo" and r["main"] for r in results["runs"])
                  else "PPO iteration (rollout + update)")
    ax.set_ylabel("safety score (judge P(positive))")
    ax.set_title("Learning curve on held-out prompts")
    handles, labels = ax.get_legend_handles_labels()
    if top is not None:
        h2, l2 = top.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_pareto(ax, results: dict) -> None:
    pts = results["frontier"]["points"]
    for method in ("dpo", "ppo"):
        mine = [p for p in pts if p["method"] == method]
        if not mine:
            continue
        ax.scatter([p["kl"] for p in mine], [p["safety"] for p in mine], s=14, alpha=0.45, color=COLORS[method])
        env = results["frontier"]["envelope"].get(method, [])
        labels = sorted({p["label"] for p in mine})
        ax.plot([e[0] for e in env], [e[1] for e in env], "-", lw=2, color=COLORS[method],
                label=f"{LABELS[method]} frontier ({len(labels)} run{'s' if len(labels) > 1 else ''})")
    ax.scatter([0], [results["reference"]["safety_score"]], marker="*", s=120, color=COLORS["reference"],
               label="reference", zorder=5)
    ax.set_xlabel("sequence KL to reference (nats)")
    ax.set_ylabel("safety score (judge P(positive))")
    ax.set_title("Safety vs KL (Pareto frontier)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_temperature(ax, results: dict) -> None:
    temps = results["temperatures"]
    for method in ("dpo", "ppo"):
        if method in results:
            ax.plot(temps, [results[method]["win_rate_vs_ref"][str(t)] for t in temps], "o-", color=COLORS[method],
                    label=LABELS[method])
    ax.axhline(0.5, ls="--", color=COLORS["reference"], label="tie with reference")
    ax.set_ylim(0, 1)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate vs reference")
    ax.set_title("Temperature robustness")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_final(ax, results: dict) -> None:
    names = [n for n in ("reference", "dpo", "ppo") if n in results]
    x = np.arange(len(names))
    w = 0.38
    safety = [results[n]["safety_score"] for n in names]
    kls = [results[n]["kl_to_ref"] for n in names]
    bars = ax.bar(x - w / 2, safety, w, color=[COLORS[n] for n in names], label="safety score")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("safety score (judge P(positive))")
    kl_ax = ax.twinx()
    kl_bars = kl_ax.bar(x + w / 2, kls, w, color="white", edgecolor=[COLORS[n] for n in names], hatch="//",
                        label="KL to reference (nats)")
    kl_ax.set_ylabel("sequence KL to reference (nats)")
    kl_ax.set_ylim(0, max(1.0, max(kls) * 1.25))
    for b, v in zip(bars, safety):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    for b, v in zip(kl_bars, kls):
        kl_ax.text(b.get_x() + b.get_width() / 2, v + 0.02 * kl_ax.get_ylim()[1], f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(x, [LABELS[n] for n in names])
    ax.set_title("Final safety (solid) and KL (hatched)")
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
    fig.suptitle(f"DPO vs PPO on IMDb ({results['preset']} preset: policy {Path(results['policy_model']).name}, "
                 f"{results['n_eval_prompts']} held-out prompts, seed {results['seed']})")
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
