"""The RLHF baseline: a Bradley-Terry reward model on the DPO training pairs, then PPO with GAE and a per-token
KL penalty to the frozen reference (Ziegler et al. 2019; Stiennon et al. 2020). ``train(cfg, data, kit)``.

Value function: a linear value head on the policy's own last hidden state (as TRL's original PPOTrainer and
Ziegler et al. do), not a separate value model. On a CPU that halves the forward/backward work of every
rollout and update; the price -- value-loss gradients reaching the shared trunk -- is kept small by
``vf_coef`` (0.1).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification

from dpo_utils import pad_sequences, token_logps
from eval_utils import EvalKit, eval_metrics, evaluate_policy, generate, judge_logits, response_batch
from models import autocast, load_causal_lm
from ppo_utils import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from run_utils import (
    MetricsLog,
    SignalFlag,
    StopTraining,
    atomic_write_dir,
    checkpoint,
    resume_or_start,
    seed_everything,
    step_indices,
)


class PolicyWithValueHead(torch.nn.Module):
    """A causal LM plus a scalar value head on its final hidden state."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.v_head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.v_head.weight)  # start from V = 0: no spurious advantages at step 1
        torch.nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True)
        return out.logits, self.v_head(out.hidden_states[-1]).squeeze(-1)


def rollout_batch(prompts, responses, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts followed by right-padded responses (the layout ``generate`` produces), so every
    response starts in the same column P. Position ids count from each row's first real token, as
    generation did, so the log-probs recomputed here are those of the sampled tokens."""
    P = max(len(p) for p in prompts)
    left = pad_sequences(prompts, pad_id, side="left")
    right = pad_sequences(responses, pad_id)
    input_ids = torch.cat([left, right], 1)
    response_mask = pad_sequences([[1] * len(r) for r in responses], 0)
    attention_mask = torch.cat([pad_sequences([[1] * len(p) for p in prompts], 0, side="left"), response_mask], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "response_mask": response_mask, "P": P}


def response_logps_values(model, b) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probs of the response tokens and (B, T) values of the states that emitted them."""
    P, T = b["P"], b["response_mask"].shape[1]
    if isinstance(model, PolicyWithValueHead):
        logits, values = model(b["input_ids"], b["attention_mask"], b["position_ids"])
        values = values[:, P - 1:P - 1 + T]
    else:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
        values = None
    # token_logps[:, t] scores token t+1, so response token P+j is column P-1+j.
    return token_logps(logits, b["input_ids"])[:, P - 1:P - 1 + T], values


# ------------------------------------------------------------------------------------------ reward model
def train_reward_model(cfg, data, kit: EvalKit):
    """Bradley-Terry reward model -log sigma(r(x, y_w) - r(x, y_l)) on the training pairs; cached by settings."""
    pc, device, pad = cfg.ppo, kit.device, kit.tokenizer.pad_token_id
    settings = {"base": cfg.model.policy_model, "steps": pc.rm_steps, "batch": pc.rm_batch_size, "lr": pc.rm_lr,
                "seed": cfg.run.seed, "pairs": hashlib.sha256(json.dumps(data.train_pairs).encode()).hexdigest()[:16]}
    out = Path(cfg.run.output_dir) / "reward_model"
    if (out / "rm_settings.json").exists() and json.loads((out / "rm_settings.json").read_text()) == settings:
        report = json.loads((out / "rm_report.json").read_text())
        print(f"ppo: reusing reward model {out} (held-out pair accuracy {report['heldout_pair_accuracy']:.3f})")
        return AutoModelForSequenceClassification.from_pretrained(out).to(device).eval(), report

    torch.manual_seed(cfg.run.seed)
    rm = AutoModelForSequenceClassification.from_pretrained(cfg.model.policy_model, num_labels=1).to(device)
    rm.config.pad_token_id = pad
    rm.eval()  # dropout off; gradients still flow

    def scores(pairs):
        completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        b = response_batch([p["prompt"] for p in pairs] * 2, completions, pad)
        r = rm(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits.squeeze(-1)
        return r[: len(pairs)], r[len(pairs):]

    opt = torch.optim.AdamW(rm.parameters(), lr=pc.rm_lr)
    rng = np.random.default_rng(cfg.run.seed + 3)
    t0 = time.time()
    for _ in tqdm(range(pc.rm_steps), desc="ppo: reward model", unit="step"):
        idx = rng.integers(0, len(data.train_pairs), pc.rm_batch_size)
        r_w, r_l = scores([data.train_pairs[i] for i in idx])
        loss = -F.logsigmoid(r_w - r_l).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        held = data.eval_pairs[:512]
        wins = torch.cat([torch.gt(*scores(held[s:s + 64])).float() for s in range(0, len(held), 64)])
    report = {"heldout_pair_accuracy": float(wins.mean()), "n_heldout_pairs": len(held), "train_s": time.time() - t0}
    print(f"ppo: reward model held-out pair accuracy {report['heldout_pair_accuracy']:.3f} ({len(held)} pairs)")

    def write(tmp: Path):
        rm.save_pretrained(tmp)
        (tmp / "rm_settings.json").write_text(json.dumps(settings, indent=2))
        (tmp / "rm_report.json").write_text(json.dumps(report, indent=2))

    atomic_write_dir(out, write)
    return rm, report


# ---------------------------------------------------------------------------------------------------- PPO
def train(cfg, data, kit: EvalKit, name: str = "ppo_toxic_reduced_model", evaluate: bool = True) -> dict:
    """Train the reward model (unless ``ppo_reward="judge"``), then PPO; ``evaluate=False`` skips the
    held-out evaluations (benchmarks time the training alone)."""
    pc, rc = cfg.ppo, cfg.run
    out_dir = Path(rc.output_dir)
    run_dir, final_dir = out_dir / "runs" / name, out_dir / name
    device, tok = kit.device, kit.tokenizer
    seed_everything(rc.seed)

    # --- reward: learned Bradley-Terry model (RLHF) or the oracle judge's logit (PPO-GT) ---
    if pc.ppo_reward == "learned":
        rm, rm_report = train_reward_model(cfg, data, kit)

        def score_fn(prompts, responses):
            b = response_batch(prompts, responses, tok.pad_token_id)
            with torch.no_grad():
                return rm(input_ids=b["input_ids"].to(device),
                          attention_mask=b["attention_mask"].to(device)).logits.squeeze(-1).float().cpu()
    else:
        rm_report = None

        def score_fn(prompts, responses):
            texts = [tok.decode(p + r, skip_special_tokens=True) for p, r in zip(prompts, responses)]
            return judge_logits(kit.judge_tok, kit.judge, texts, kit.batch_size, device)

    policy = PolicyWithValueHead(load_causal_lm(cfg.model.policy_model, device)).to(device)
    policy.eval()  # dropout off throughout: PPO's ratios assume the sampling and training log-probs agree
    optimizer = torch.optim.AdamW(policy.parameters(), lr=pc.ppo_lr, eps=1e-5)
    kl_ctl = (FixedKLController(pc.init_kl_coef) if pc.target_kl is None
              else AdaptiveKLController(pc.init_kl_coef, pc.target_kl, pc.kl_horizon))
    prompts_all = data.train_prompts

    # --- resume ---
    stateful = {"model": policy, "optimizer": optimizer, "kl_ctl": kl_ctl}
    start, timer, consecutive_bad, resumed = resume_or_start(run_dir, rc.resume, stateful, name="ppo")
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if resumed else None)
    cfg.save(run_dir / "training_config.json")
    if start == 0 and evaluate:
        metrics.log({"step": 0, **eval_metrics(kit.reference_result(cfg.eval.eval_temperature))})

    B, mb_size = pc.ppo_batch_size, pc.ppo_mini_batch_size
    bar = tqdm(range(start + 1, pc.ppo_steps + 1), desc="ppo", unit="iter", initial=start, total=pc.ppo_steps)
    with SignalFlag() as interrupted:
        for step in bar:
            t0 = time.time()
            # --- rollout ---
            prompts = [prompts_all[i] for i in step_indices(step, B, len(prompts_all), [rc.seed, 7])]
            responses = generate(policy.lm, tok, prompts, cfg.data.response_tokens, 1.0, rc.seed * 7919 + step,
                                 kit.batch_size, device)
            t_gen = time.time()
            b = {k: (v.to(device) if torch.is_tensor(v) else v)
                 for k, v in rollout_batch(prompts, responses, tok.pad_token_id).items()}
            mask = b["response_mask"].float()
            with torch.no_grad(), autocast(device):
                old_logprobs, old_values = response_logps_values(policy, b)
                ref_logprobs, _ = response_logps_values(kit.ref_model, b)
            old_values = old_values.float() * mask
            t_logps = time.time()

            # --- score ---
            scores = score_fn(prompts, responses).to(device)
            t_score = time.time()

            # --- advantages ---
            rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value)
            advantages, returns = gae(rewards, old_values, mask, pc.gamma, pc.gae_lambda)
            advantages = whiten(advantages, mask)
            seq_kl = kl.sum(1).mean().item()

            # --- update ---
            stats = {"pg_loss": [], "v_loss": [], "approx_kl": [], "clipfrac": []}
            bad = False
            rng = np.random.default_rng([rc.seed, 11, step])
            for _epoch in range(pc.ppo_epochs):
                for mb_idx in np.split(rng.permutation(B), B // mb_size):
                    mb_idx = torch.as_tensor(mb_idx, device=device)
                    mb = {k: (v[mb_idx] if torch.is_tensor(v) else v) for k, v in b.items()}
                    with autocast(device):
                        new_logprobs, new_values = response_logps_values(policy, mb)
                    mb_mask = mask[mb_idx]
                    pg = policy_loss(new_logprobs.float(), old_logprobs[mb_idx], advantages[mb_idx], mb_mask,
                                     pc.clip_coef)
                    v_loss = value_loss(new_values.float(), old_values[mb_idx], returns[mb_idx], mb_mask,
                                        pc.vf_clip_coef)
                    loss = pg["pg_loss"].mean() + pc.vf_coef * v_loss.mean()
                    if step in rc.debug_nan_steps:  # test hook for the non-finite guard
                        loss = loss * float("nan")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0).item()
                    if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
                        bad = True  # skip this minibatch; never step on a non-finite gradient
                        continue
                    optimizer.step()
                    for k, v in (("pg_loss", pg["pg_loss"]), ("v_loss", v_loss), ("approx_kl", pg["approx_kl"]),
                                 ("clipfrac", pg["clipfrac"])):
                        stats[k].append(v.mean().item())
            optimizer.zero_grad(set_to_none=True)
            t_update = time.time()
            consecutive_bad = consecutive_bad + 1 if bad else 0
            kl_ctl_value = kl_ctl.value
            kl_ctl.update(seq_kl, B)

            # --- log ---
            n_tokens = int(mask.sum().item()) + sum(len(p) for p in prompts)
            row = {"step": step,
                   "losses/policy_loss": float(np.mean(stats["pg_loss"])) if stats["pg_loss"] else float("nan"),
                   "losses/value_loss": float(np.mean(stats["v_loss"])) if stats["v_loss"] else float("nan"),
                   "losses/approx_kl": float(np.mean(stats["approx_kl"])) if stats["approx_kl"] else float("nan"),
                   "losses/clipfrac": float(np.mean(stats["clipfrac"])) if stats["clipfrac"] else float("nan"),
                   "objective/kl": seq_kl, "objective/kl_coef": kl_ctl_value,
                   "objective/score": scores.mean().item(),
                   "objective/rlhf_reward": (scores - kl_ctl_value * kl.sum(1)).mean().item(),
                   "objective/response_len": mask.sum(1).mean().item(), "nonfinite_skipped": int(bad),
                   # phase timings: sampling, policy/value/reference log-probs, reward, PPO epochs
                   "charts/generation_s": t_gen - t0, "charts/logps_s": t_logps - t_gen,
                   "charts/score_s": t_score - t_logps, "charts/update_s": t_update - t_score,
                   "charts/tokens_per_s": n_tokens * (1 + pc.ppo_epochs) / (t_update - t0)}
            if evaluate and (step % pc.ppo_eval_every == 0 or step == pc.ppo_steps):
                row.update(eval_metrics(evaluate_policy(policy.lm, kit, cfg.eval.eval_temperature)))
            row["time_s"] = timer.elapsed
            metrics.log(row)
            bar.set_postfix(score=f"{row['objective/score']:.2f}", kl=f"{seq_kl:.2f}")
            if step % rc.log_every == 0 or "eval/safety_score" in row:
                extra = (f" | safety {row['eval/safety_score']:.3f} kl {row['eval/kl_to_ref']:.2f}"
                         if "eval/safety_score" in row else "")
                tqdm.write(f"ppo iter {step}: score {row['objective/score']:.3f} kl {seq_kl:.2f} "
                           f"kl_coef {kl_ctl_value:.3f} pg {row['losses/policy_loss']:.4f} "
                           f"v {row['losses/value_loss']:.4f}{extra}")

            # --- checkpoint ---
            # Non-finite minibatches were skipped, so the current weights are the last good ones.
            diverged = consecutive_bad >= rc.max_nonfinite_skips
            if step % rc.save_every == 0 or interrupted.signum or diverged:
                ckpt = checkpoint(run_dir, step, stateful, timer, 0 if diverged else consecutive_bad,
                                  rc.keep_checkpoints)
                if diverged:
                    raise StopTraining(f"ppo: {consecutive_bad} consecutive iterations had a non-finite loss or "
                                       f"gradient (last at {step}); the last good weights are in {ckpt}; lower "
                                       f"--ppo_lr and add --resume", 1)
                if interrupted.signum:
                    raise StopTraining(f"ppo: interrupted at iteration {step}; checkpoint saved in {ckpt}. Resume "
                                       f"with the same command plus --resume", 130)

    # --- save (atomic) ---
    # PPO's cost includes its explicit reward model, the stage DPO does without.
    train_time = timer.elapsed + (rm_report["train_s"] if rm_report else 0.0)

    def write(tmp: Path):
        policy.lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        torch.save(policy.v_head.state_dict(), tmp / "value_head.pt")
        cfg.save(tmp / "training_config.json")
        (tmp / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
        (tmp / "train_summary.json").write_text(json.dumps(
            {"method": "ppo", "train_time_s": train_time, "iterations": pc.ppo_steps, "reward": pc.ppo_reward,
             "reward_model": rm_report}, indent=2))

    atomic_write_dir(final_dir, write)
    print(f"ppo: saved {final_dir} ({train_time:.0f}s of training)")
    return {"model_dir": str(final_dir), "train_time_s": train_time, "policy": policy.lm}
