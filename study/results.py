"""The final evaluation and results.json: the reference and the first seed's default policies on held-out prompts
at every temperature (win rates, examples), every run's validation points and the study's protocol section.
The dashboard is drawn from results.json alone (``plots.py``).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np

from dataset import SEEN_DRAW_PROMPTS, seen_draws
from eval_utils import evaluate_policy, win_rate
from modeling.models import dtype_name, machine_info
from runtime.artifacts import atomic_write_text
from runtime.run_log import read_metrics, strict_json
from study import grid


def _examples(ctx, result: dict, indices: list[int]) -> list[dict]:
    tok = ctx.tokenizer
    return [{"prompt_index": int(i), "prompt": tok.decode(ctx.prompts[i], skip_special_tokens=True),
             "completion": tok.decode(result["responses"][i], skip_special_tokens=True),
             "p_positive": round(float(result["scores"][i]), 4)} for i in indices]


ROOT = Path(__file__).resolve().parents[1]
PREREGISTRATION = "docs/preregistration.md"  # the frontier study's analysis, fixed before its final runs


def provenance(root: Path = ROOT) -> dict:
    """The code a run starts from, for results.json: the commit checked out, whether tracked files differ from it,
    and the preregistration (:data:`PREREGISTRATION`): the last commit that changed it and whether the file read
    now is that commit's. None for what git cannot say (no repository, no git)."""
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    pre = root / PREREGISTRATION
    record = {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
              "preregistration": None}
    if pre.exists():
        changed = git("status", "--porcelain", "--", PREREGISTRATION)
        record["preregistration"] = {"file": PREREGISTRATION, "commit": git("log", "-1", "--format=%H", "--",
                                                                             PREREGISTRATION) or None,
                                     "sha256": hashlib.sha256(pre.read_bytes()).hexdigest(),
                                     "as_committed": None if changed is None else not changed}
    return record


TIME_KEYS = ("train_time_s", "eval_time_s", "ref_logps_s", "rm_train_s", "rm_test_s")
# what results.json keeps of a learned reward model's report (docs/studies.md quotes its accuracies from here)
RM_KEYS = ("heldout_pair_accuracy", "n_heldout_pairs", "val_pair_accuracy", "n_val_pairs", "best_step", "reused")


def run_record(summary: dict) -> dict:
    """What results.json keeps of a run's train() summary: its times and its reward model's accuracies."""
    rm = summary.get("reward_model")
    return {**{k: summary[k] for k in TIME_KEYS if k in summary},
            **({"reward_model": {k: rm.get(k) for k in RM_KEYS}} if rm else {})}
EXAMPLES_SEED = 20231129  # which held-out prompts are shown as examples (drawn at random, the same for all models)


def _model_entry(ctx, cfg, policy, times: dict) -> dict:
    """Metrics of one model at the evaluation temperature, and its win rate vs the reference at each
    temperature of the sweep (same prompts, same seeds)."""
    temp = cfg.eval.eval_temperature
    if policy is ctx.ref_model:
        res = ctx.reference_result(temp)
    else:
        res = evaluate_policy(policy, ctx, temp)
    wins = {}
    for t in cfg.eval.temperatures:
        pol_t = res if t == temp else (ctx.reference_result(t) if policy is ctx.ref_model
                                       else evaluate_policy(policy, ctx, t, with_kl=False))
        wins[str(t)] = win_rate(pol_t["scores"], ctx.reference_result(t)["scores"])
    shown = np.random.default_rng(EXAMPLES_SEED).choice(len(ctx.prompts), min(cfg.eval.n_examples, len(ctx.prompts)),
                                                        replace=False)
    return {"safety_score": res["safety_score"], "positive_rate": res["positive_rate"], "kl_to_ref": res["kl_to_ref"],
            "response_len": res["response_len"], **{k: times[k] for k in TIME_KEYS if k in times},
            "win_rate_vs_ref": wins, "examples": _examples(ctx, res, sorted(shown)),
            # per held-out prompt, in prompt order: anyone can recompute a mean, a paired difference or an interval
            "per_prompt": {"scores": [float(x) for x in res["scores"]], "log_ratios": list(res["log_ratios"])}}


def final_evaluation(cfg, ctx, first: dict, runs: list[dict], data, n_reviews: int, command: str,
                     setup: dict | None = None, judge_check: dict | None = None, protocol: dict | None = None,
                     seen_overlap: dict | None = None, code: dict | None = None) -> dict:
    """Evaluate the reference and the first seed's final default policies on its held-out prompts (``ctx``) at
    every temperature (win rates, examples), gather every run's validation points (the learning curves and the
    validation frontier) and whether its KL flattened, add the study's ``protocol`` section (checkpoints chosen
    on validation, their held-out numbers and paired intervals; ``--sweep``), and write results.json.

    Args:
        first: ``{method: train() output with its policy}``, the first seed's default runs.
        runs: ``{"spec": grid.RunSpec, "summary": train() output}`` for every run of every seed.
        seen_overlap: ``{seed: n}`` with --sealed_prompts: held-out prompts that open a review an earlier draw used.
        code: :func:`provenance`, taken when the run started.
    """
    from tqdm.auto import tqdm

    seeds = sorted({r["spec"].seed for r in runs})
    results = {"preset": cfg.run.preset, "command": command, "policy_model": cfg.model.policy_model,
               "judge_model": cfg.model.judge_model, "n_reviews": n_reviews, "n_train_pairs": len(data.train_pairs),
               "n_eval_prompts": len(ctx.prompts), "seed": seeds[0], "seeds": seeds,
               "eval_temperature": cfg.eval.eval_temperature, "temperatures": list(cfg.eval.temperatures),
               "beta": cfg.dpo.beta, "ppo_reward": cfg.ppo.ppo_reward, "target_kl": cfg.ppo.target_kl,
               "device": str(ctx.device), "precision": dtype_name(ctx.dtype),
               "judge_precision": dtype_name(ctx.judge_dtype), "machine": machine_info(ctx.device),
               "examples_seed": EXAMPLES_SEED, "setup": setup or {}, "code": code or provenance()}
    if cfg.eval.sealed_prompts:  # the sealed test set: which draws it avoids, and how many prompts it could not
        results["sealed_prompts"] = {
            "seen_draw_seeds": seen_draws(cfg.data.split_seed), "seen_draw_prompts": SEEN_DRAW_PROMPTS,
            "prompts_from_seen_reviews": {str(s): seen_overlap[s] for s in seeds} if seen_overlap else {}}
    for name in tqdm(["reference", *first], desc="final evaluation", unit="model"):
        if name == "reference":
            results[name] = _model_entry(ctx, cfg, ctx.ref_model, {"train_time_s": 0.0, "eval_time_s": 0.0})
        else:
            results[name] = _model_entry(ctx, cfg, first[name]["policy"], first[name])

    # --- each final policy's safety minus the reference's, paired over the same prompts and seeds ---
    ref_scores = results["reference"]["per_prompt"]["scores"]
    for name in first:
        results[name]["safety_vs_reference"] = grid.paired_difference(results[name]["per_prompt"]["scores"],
                                                                       ref_scores)
    s = np.asarray(ref_scores)
    results["eval_noise"] = float(s.std(ddof=1) / np.sqrt(s.size))  # the standard error of one safety score
    if judge_check:
        results["judge_accuracy"] = judge_check

    # --- every run's validation points (evaluations during training): the frontier, each run's final point ---
    results["runs"] = [{"method": r["spec"].method, "label": r["spec"].setting, "seed": r["spec"].seed,
                        "main": r["spec"].main, "name": r["spec"].name,
                        "metrics": str(Path(r["summary"]["model_dir"]) / "metrics.jsonl"),
                        **run_record(r["summary"])} for r in runs]
    points, finals = [], []
    for r in results["runs"]:
        rows = [row for row in read_metrics(r["metrics"]) if "eval/kl_to_ref" in row]
        r["kl_flattened"] = grid.kl_flattened(rows)  # validation KL moved < 10% over the last fifth
        mine = grid.validation_points(rows, reference=True, method=r["method"], label=r["label"], seed=r["seed"])
        points += mine
        finals.append({**mine[-1], "main": r["main"], "train_time_s": r.get("train_time_s")})
    results["frontier"] = {"prompts": "validation", "points": points, "curves": grid.frontier_curves(points, seeds)}
    results["study"] = {"seeds": seeds, "final_points": finals, "matched_kls": list(cfg.eval.matched_kls),
                        "default_runs": grid.default_runs(finals)}
    if protocol is not None:
        results["protocol"] = protocol
    if ctx.acc is None or ctx.acc.is_main_process:
        atomic_write_text(Path(cfg.run.plots_dir) / "results.json", strict_json(results, indent=2))
    return results

