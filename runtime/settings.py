"""What a training run's results depend on: the settings that ``--resume``, ``--reuse_runs_from`` and the runs
carried over by ``--dpo-only`` / ``--ppo-only`` compare with a saved ``training_config.json``. Imports nothing of
the project: it reads ``Config.to_dict()`` dicts.
"""

from __future__ import annotations

# Settings that only say how results are read out or which runs a sweep has (each run's own beta or KL coefficient
# is in its dpo / ppo section), the held-out prompts (evaluated after training, never during it), or the thread count:
# changing them neither changes what a run trains nor makes a finished run unfinished.
READ_OUT_ONLY = {"eval": ("temperatures", "n_examples", "sweep_betas", "sweep_kl_coefs", "sweep_ppo_gt", "matched_kls",
                          "min_budget_use", "kl_bands", "band_width", "n_eval_prompts", "sealed_prompts"),
                 "model": ("threads",)}


# Values a setting had once, whose name now means something else or nothing: a run saved under one is refused by
# --resume in one line, not compared field by field.
RETIRED = {("ppo", "kl_penalty", "exact"): "--kl_penalty exact (the KL as a loss term summed over the response, "
                                           "before 2026-12-06; now --kl_penalty loss, a per-token mean)"}
RETIRED_AT = "0d57f64"  # the last commit that runs them


def retired_setting(saved: dict) -> str | None:
    """What of :data:`RETIRED` a saved ``Config.to_dict()`` holds, in words, or None."""
    return next((words for (sec, key, value), words in RETIRED.items() if saved.get(sec, {}).get(key) == value), None)


PAIR_SETTINGS = ("pair_source", "n_generated_samples")  # the preference pairs' source: DPO's and the reward model's
ADAPTIVE_ONLY = ("kl_horizon", "kl_hold", "kl_damping")  # the adaptive controller's: a fixed coefficient ignores them


def run_settings(config: dict, method: str | None = None) -> dict:
    """What a training run's results depend on, from a ``Config.to_dict()`` (also an older one): every setting
    but the run-control flags of ``run`` (the seed is kept) and the :data:`READ_OUT_ONLY` ones. Given the run's
    ``method`` ("dpo", "ppo", "ppo_gt" or "rm", the reward model), also not the other method's section, nor, for
    PPO at a fixed coefficient, the adaptive controller's settings, nor, for the reward model, PPO's own: a run
    does not depend on settings it never reads."""
    out = {sec: {k: v for k, v in values.items() if k not in READ_OUT_ONLY.get(sec, ())}
           for sec, values in config.items() if sec != "run"}
    out["run"] = {"seed": config["run"]["seed"]}
    for sec, key in (("dpo", "dpo_eval_steps"), ("ppo", "ppo_eval_steps")):
        if not out.get(sec, {}).get(key):  # unset is every --*_eval_every, as before the field existed
            out.get(sec, {}).pop(key, None)
    if method == "dpo":
        out.pop("ppo", None)
    elif method == "rm":
        out["dpo"] = {k: v for k, v in out.get("dpo", {}).items() if k in PAIR_SETTINGS}
        out["ppo"] = {k: v for k, v in out.get("ppo", {}).items() if k.startswith("rm_")}
    elif method in ("ppo", "ppo_gt"):
        # PPO's reward model learns from the preference pairs (their source is a DPO setting); PPO-GT reads none
        pairs = {k: v for k, v in out.get("dpo", {}).items() if k in PAIR_SETTINGS}
        out.pop("dpo", None)
        if method == "ppo" and pairs:
            out["dpo"] = pairs
        if out.get("ppo", {}).get("target_kl") is None:
            out["ppo"] = {k: v for k, v in out.get("ppo", {}).items() if k not in ADAPTIVE_ONLY}
        # the rate it trains at (PPOConfig.lr) and the coefficient it starts at (PPOConfig.kl_start), whichever
        # field holds them: PPO does not read PPO-GT's
        ppo = out.get("ppo", {})
        gt_lr, gt_start = ppo.pop("ppo_gt_lr", None), ppo.pop("ppo_gt_init_kl_coef", None)
        if method == "ppo_gt" and ppo.get("ppo_reward") == "judge":
            if gt_lr is not None:
                ppo["ppo_lr"] = gt_lr
            if gt_start is not None and ppo.get("target_kl") is not None:
                ppo["init_kl_coef"] = gt_start
    return out


def settings_diff(saved: dict, now: dict, method: str | None = None) -> list[str]:
    """``section.field: saved -> now`` for each run setting (:func:`run_settings`) that differs."""
    a, b = run_settings(saved, method), run_settings(now, method)
    return [f"{sec}.{k}: {a.get(sec, {}).get(k)!r} -> {b.get(sec, {}).get(k)!r}"
            for sec in sorted(set(a) | set(b)) for k in sorted(set(a.get(sec, {})) | set(b.get(sec, {})))
            if a.get(sec, {}).get(k) != b.get(sec, {}).get(k)]
