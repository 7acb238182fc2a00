"""PPO as the field runs it against the loss-term variant: both trained on the tuning seed over the study's PPO grid
(the adaptive run at ``--target_kl`` and the fixed ``--sweep_kl_coefs``), evaluated on the validation prompts only,
at the study's run lengths and the preset's rates. Prints per variant the best validation safety in each of the
study's KL bands (``--kl_bands`` ± ``--band_width``) and the highest point at KL <= k of the upper concave envelope
of its validation points and the reference (``study.grid.envelope_cell``: a mixture of two checkpoints attains
it), and draws both variants' points and envelopes, safety against KL, in one plot.

    uv run scripts/ppo_variants.py --jobs 2 --out docs/ppo_variants.json --plot docs/ppo_variants.png

The loss-term variant's coefficients are in other units (whitened advantage per nat per token, not reward per nat
of sequence KL): its grid is ``--loss_coefs`` (fixed) and ``--loss_init`` (the adaptive run's start), by default the
committed studies' grid (0.0003 and 0.01 fixed, 0.003 at the start) times the response length, 32, because that
variant's term was then a sum over the response's tokens and is now their mean. Runs are kept under
``--output_dir`` (default models/ppo_variants) and a finished one is read, not trained again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts import grid  # noqa: E402
from scripts.grid import run_rows  # noqa: E402
from study.grid import band_choice, concave_envelope, envelope_cell, validation_points  # noqa: E402

VARIANTS = {"full": "PPO (the KL in the reward, --kl_penalty full)",
            "loss": "the KL as a loss term (--kl_penalty loss)"}


def tasks(seed: int, cfg, loss_coefs: list[float], loss_init: float) -> list[dict]:
    target, coefs, init = cfg.ppo.target_kl, cfg.eval.sweep_kl_coefs, cfg.ppo.init_kl_coef
    out = []
    for variant, fixed, start in (("full", coefs, init), ("loss", loss_coefs, loss_init)):
        runs = [(f"target_kl={target:g}", {"target_kl": target, "init_kl_coef": start})] + \
               [(f"kl_coef={c:g}", {"target_kl": None, "init_kl_coef": c}) for c in fixed]
        out += [{"seed": seed, "method": "ppo", "name": f"{variant}/{setting}",
                 "overrides": {"ppo": {**over, "kl_penalty": variant}}} for setting, over in runs]
    return out


def report(out_dir: Path, task_list: list[dict], bands: list[float], width: float, plot: str | None) -> dict:
    points = {v: [] for v in VARIANTS}
    runs = {}
    for t in task_list:
        pts = validation_points(run_rows(out_dir, t["name"]))
        variant = t["name"].split("/")[0]
        runs[t["name"]] = pts
        points[variant] += [{**p, "run": t["name"]} for p in pts]
    ref = next((r["eval/safety_score"] for t in task_list for r in run_rows(out_dir, t["name"])
                if r.get("step") == 0 and "eval/safety_score" in r), None)
    env_points = {v: pts + ([{"kl": 0.0, "safety": ref}] if ref is not None else []) for v, pts in points.items()}
    table = {}
    print(f"\nreference validation safety {ref:.3f}" if ref is not None else "")
    print("| KL band (± {:.0%}) | ".format(width) + " | ".join(f"{v}: best in band (n) | {v}: envelope, KL <= k"
                                                           for v in VARIANTS) + " |")
    print("|---|" + "---|---|" * len(VARIANTS))
    for k in bands:
        row = {}
        cells = []
        for v in VARIANTS:
            best, inside = band_choice(points[v], k, width)
            cell = envelope_cell(env_points[v], k)
            env = cell and cell["safety"]
            row[v] = {"band_best": best and best["safety"], "band_kl": best and best["kl"], "n": len(inside),
                      "envelope": env, "envelope_kl": cell and cell["kl"]}
            cells.append((f"{best['safety']:.3f} at {best['kl']:.2f} ({len(inside)})" if best else "none")
                         + " | " + (f"{env:.3f}" + (f" (peak at {cell['kl']:.2f})" if cell["kl"] < k else "")
                                    if cell else "none"))
        table[f"{k:g}"] = row
        print(f"| {k:g} | " + " | ".join(cells) + " |")
    for v in VARIANTS:
        finals = {n.split("/", 1)[1]: (pts[-1]["step"], round(pts[-1]["kl"], 2)) for n, pts in runs.items()
                  if n.startswith(v + "/") and pts}
        print(f"{v}: each run's last evaluation (iteration, validation KL): {finals}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (v, label), color in zip(VARIANTS.items(), ("tab:blue", "tab:orange")):
            ax.scatter([p["kl"] for p in points[v]], [p["safety"] for p in points[v]], s=14, alpha=0.6, color=color)
            hull = concave_envelope(env_points[v])
            ax.plot([p["kl"] for p in hull], [p["safety"] for p in hull], color=color, label=label + ": envelope")
        if ref is not None:
            ax.axhline(ref, color="grey", lw=0.8, ls=":", label="reference")
        for k in bands:
            ax.axvline(k, color="grey", lw=0.5, alpha=0.4)
        ax.set_xlabel("validation KL to the reference (nats)")
        ax.set_ylabel("validation safety (judge P(positive))")
        ax.set_title("PPO's two KL variants on the tuning seed: validation points and their envelopes", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        print(f"\nwrote {plot}")
    return {"reference_safety": ref, "bands": table, "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--seed", type=int, default=100, help="the tuning seed (docs/tuning.md): never a study's")
    ap.add_argument("--loss_coefs", type=float, nargs="+", default=[0.0096, 0.32],
                    help="the loss-term variant's fixed coefficients (per nat per token)")
    ap.add_argument("--loss_init", type=float, default=0.096, help="the loss-term variant's adaptive start")
    ap.add_argument("--plot", help="draw both variants' validation points and envelopes here (PNG)")
    grid.add_arguments(ap)
    a, rest = ap.parse_known_args()
    cfg = grid.command_config(rest, a.jobs, "models/ppo_variants")
    if cfg is None:
        return 2
    if any(c <= 0 for c in a.loss_coefs + [a.loss_init]):
        print("error: every --loss_coefs / --loss_init value must be > 0", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    task_list = tasks(a.seed, cfg, a.loss_coefs, a.loss_init)
    return grid.run_and_report(__file__, a, rest, cfg, task_list,
                               lambda: report(Path(cfg.run.output_dir), task_list, cfg.eval.kl_bands,
                                              cfg.eval.band_width, a.plot),
                               seed=a.seed, loss_coefs=a.loss_coefs, loss_init=a.loss_init)


if __name__ == "__main__":
    sys.exit(main())
