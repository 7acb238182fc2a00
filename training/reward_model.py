"""PPO's reward: a Bradley-Terry reward model learned from the preference pairs (RLHF, Ziegler et al. 2019;
Stiennon et al. 2020), or the oracle judge's own logit (PPO-GT: optimising the evaluation metric itself).
``reward_function`` gives PPO either as one scoring function of (prompts, responses)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from eval_utils import judge_logits
from modeling.batching import response_batch
from modeling.models import autocast, dtype_name, threads_key
from runtime.artifacts import Artifact
from runtime.run_log import strict_json
from runtime.run_utils import gather_share, local_share, mean_over_processes, padded_share, step_indices
from training.lifecycle import TrainingRun


class BestSoFar:
    """Early stopping's memory: the best validation pair accuracy, its step and weights, and every evaluation so
    far. Checkpointed with the run (``state_dict``), so a resumed run stops and keeps the same weights as an
    uninterrupted one."""

    def __init__(self):
        self.acc, self.step, self.weights, self.curve = -1.0, 0, None, []

    def update(self, step: int, acc: float, model) -> None:
        self.curve.append({"step": step, "val_pair_accuracy": acc})
        if acc > self.acc:
            self.acc, self.step = acc, step
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict:
        return {"acc": self.acc, "step": self.step, "weights": self.weights, "curve": self.curve}

    def load_state_dict(self, state: dict) -> None:
        self.acc, self.step, self.weights, self.curve = state["acc"], state["step"], state["weights"], state["curve"]


def train_reward_model(cfg, data, ctx):
    """Bradley-Terry reward model -log sigma(r(x, y_w) - r(x, y_l)) on the training pairs, trained until its
    accuracy on the validation pairs stops rising (the best checkpoint is kept), then scored once on the
    held-out pairs. Data-parallel like DPO, under the same lifecycle (``lifecycle.TrainingRun``: resume,
    checkpoints, metrics.jsonl, the non-finite guard, Ctrl-C) in ``<output_dir>/runs/reward_model/<key>/``.
    Cached under ``reward_models/<settings hash>/``; returns ``(model, report)``. A model from the cache has
    ``reused`` True and ``train_s``/``test_s`` 0 (this run spent none), its original times in
    ``cached_train_s``/``cached_test_s``."""
    pc, device, pad, acc = cfg.ppo, ctx.device, ctx.tokenizer.pad_token_id, ctx.acc
    settings = {"base": cfg.model.policy_model, "steps": pc.rm_steps, "batch": pc.rm_batch_size, "lr": pc.rm_lr,
                "weight_decay": pc.rm_weight_decay,
                "eval_every": pc.rm_eval_every, "patience": pc.rm_patience, "seed": cfg.run.seed,
                "precision": dtype_name(ctx.dtype), **threads_key(device),
                "pairs": hashlib.sha256(json.dumps([data.train_pairs, data.val_pairs]).encode()).hexdigest()[:16]}
    art = Artifact(Path(cfg.run.cache_dir) / "reward_models", settings, done="rm_report.json")
    if art.exists():
        # Its training and test time were charged to the run that trained it: 0 s here, the original kept apart.
        report = art.report()
        report.update(reused=True, cached_train_s=report["train_s"], cached_test_s=report["test_s"], train_s=0.0,
                      test_s=0.0)
        print(f"ppo: reusing reward model {art.path} (held-out pair accuracy {report['heldout_pair_accuracy']:.3f}); "
              f"its {report['cached_train_s']:.0f}s of training count for the run that trained it, 0s for this one")
        return AutoModelForSequenceClassification.from_pretrained(art.path).to(device).eval(), report

    best = BestSoFar()

    def scores(pairs):
        completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        b = response_batch([p["prompt"] for p in pairs] * 2, completions, pad)
        with autocast(device, ctx.dtype):
            r = rm(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        r = r.squeeze(-1).float()
        return r[: len(pairs)], r[len(pairs):]

    @torch.no_grad()
    def pair_accuracy(pairs):  # each process scores its share; all get the mean
        share = padded_share(pairs, acc)
        wins = torch.cat([torch.gt(*scores(share[s:s + 64])).float() for s in range(0, len(share), 64)]).tolist()
        return float(np.mean(gather_share(wins, len(pairs), acc)))

    def validate(step):  # early stopping on the validation pairs (training reviews the training pairs do not use)
        best.update(step, pair_accuracy(data.val_pairs), rm)
        return {"eval/val_pair_accuracy": best.curve[-1]["val_pair_accuracy"]}

    # Seeds everything (the scalar head's initialisation too); keyed by the cache's key, so that any run needing
    # this reward model resumes its checkpoint.
    run = TrainingRun(cfg, ctx, f"reward_model/{art.path.name}", "rm", pc.rm_steps, pc.rm_eval_every, validate,
                      per_process={"--rm_batch_size": pc.rm_batch_size}, desc="ppo: reward model", final_dir=art.path)
    rm = AutoModelForSequenceClassification.from_pretrained(cfg.model.policy_model, num_labels=1).to(device)
    rm.config.pad_token_id = pad
    rm.eval()  # dropout off; gradients still flow
    opt = torch.optim.AdamW(rm.parameters(), lr=pc.rm_lr, weight_decay=pc.rm_weight_decay)
    rm, opt = acc.prepare(rm, opt)

    run.begin(rm, {"best": best})
    for step in run.steps():
        idx = local_share(step_indices(step, pc.rm_batch_size, len(data.train_pairs), [cfg.run.seed, 3]), acc)
        r_w, r_l = scores([data.train_pairs[i] for i in idx])
        loss = -F.logsigmoid(r_w - r_l).mean()  # Bradley-Terry, Eq. 2 of arXiv:2305.18290
        if step in cfg.run.debug_nan_steps:  # test hook for the non-finite guard
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(rm.parameters(), 1.0).item()
        loss_value = mean_over_processes(loss.item(), acc)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)  # never step on a non-finite gradient
        if finite:
            opt.step()
        run.end_step(step, {"losses/loss": loss_value, "grad_norm": grad_norm}, nonfinite=not finite,
                     log_line=f"rm step {step}: loss {loss_value:.4f}", postfix={"loss": f"{loss_value:.3f}"})
        if step - best.step >= pc.rm_patience * pc.rm_eval_every:
            break  # no better validation accuracy for rm_patience evaluations
    rm.load_state_dict(best.weights)
    train_s = run.timer.elapsed + run.timer.eval_s  # its validation is part of its training (early stopping)
    # --- the held-out pairs are scored once, after training: an evaluation, not part of the training time ---
    t1 = time.time()
    held = data.eval_pairs[:512]
    curve = best.curve
    report = {"heldout_pair_accuracy": pair_accuracy(held), "n_heldout_pairs": len(held),
              "val_pair_accuracy": best.acc, "n_val_pairs": len(data.val_pairs), "best_step": best.step,
              "steps_run": curve[-1]["step"], "stopped_early": curve[-1]["step"] < pc.rm_steps,
              "curve": curve, "train_s": train_s, "test_s": time.time() - t1, "reused": False}
    print(f"ppo: reward model held-out pair accuracy {report['heldout_pair_accuracy']:.3f} ({len(held)} pairs); "
          f"validation {best.acc:.3f} at step {best.step} of {report['steps_run']} ({train_s:.0f}s)")

    def save(summary):
        state = acc.get_state_dict(rm)  # every process (FSDP gathers the shards); the main one writes
        if acc.is_main_process:
            def write(tmp: Path):
                acc.unwrap_model(rm).save_pretrained(tmp, state_dict=state)
                (tmp / "rm_settings.json").write_text(json.dumps(settings, indent=2))
                (tmp / "rm_report.json").write_text(strict_json(report, indent=2))
                (tmp / "metrics.jsonl").write_text((run.run_dir / "metrics.jsonl").read_text())

            art.write(write)
        acc.wait_for_everyone()

    run.finish({}, save=save)
    acc.free_memory()  # the reward model only scores from now on: PPO's checkpoints hold the policy alone
    return rm.eval(), report


def reward_function(cfg, data, ctx):
    """``(score_fn, report)``: ``score_fn(prompts, responses)`` gives (B,) fp32 rewards on the CPU, from the
    learned reward model (``--ppo_reward learned``; ``report`` is its :func:`train_reward_model` report) or the
    judge's POSITIVE minus NEGATIVE logit (``--ppo_reward judge``; ``report`` None)."""
    tok, device = ctx.tokenizer, ctx.device
    if cfg.ppo.ppo_reward == "judge":
        def judge_reward(prompts, responses):
            texts = [tok.decode(p + r, skip_special_tokens=True) for p, r in zip(prompts, responses)]
            return judge_logits(ctx.judge_tok, ctx.judge, texts, ctx.batch_size, device, ctx.judge_dtype)

        return judge_reward, None
    rm, report = train_reward_model(cfg, data, ctx)

    @torch.no_grad()
    def learned_reward(prompts, responses):
        b = response_batch(prompts, responses, tok.pad_token_id)
        with autocast(device, ctx.dtype):
            return rm(input_ids=b["input_ids"].to(device),
                      attention_mask=b["attention_mask"].to(device)).logits.squeeze(-1).float().cpu()

    return learned_reward, report
