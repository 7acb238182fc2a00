"""The RLHF baseline: a Bradley-Terry reward model on the DPO training pairs, then PPO with GAE and a per-token
KL penalty to the frozen reference (Ziegler et al. 2019; Stiennon et al. 2020). ``train(cfg, data, kit)``.

Value function: a linear value head on the policy's own last hidden state (``ResponseLogProbs(value_head=True)``,
as TRL's original PPOTrainer and Ziegler et al. do), not a separate value model. On a CPU that halves the
forward/backward work of every rollout and update; the price -- value-loss gradients reaching the shared
trunk -- is kept small by ``vf_coef`` (0.1).
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

from config import ConfigError
from dpo_utils import pad_sequences
from eval_utils import EvalKit, eval_metrics, evaluate_policy, fsdp_world, generate, judge_logits, response_batch
from logprobs import ResponseLogProbs, generation_ready
from models import autocast, dtype_name, load_causal_lm
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
    any_process,
    atomic_write_dir,
    checkpoint,
    gather_share,
    local_share,
    mean_over_processes,
    padded_share,
    resume_or_start,
    save_policy,
    seed_everything,
    step_indices,
)


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


def response_logps_values(model: ResponseLogProbs, b) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probs of the response tokens and (B, T) values of the states that emitted them (None for a
    model without a value head), from a :func:`rollout_batch` whose responses start at column P."""
    P = b["P"]
    full_mask = torch.cat([torch.zeros_like(b["input_ids"][:, :P]), b["response_mask"]], 1)
    token_logps, values = model(b["input_ids"], b["attention_mask"], full_mask, b["position_ids"])
    return token_logps[:, P:], (values[:, P:] if values is not None else None)


# ------------------------------------------------------------------------------------------ reward model
def train_reward_model(cfg, data, kit: EvalKit):
    """Bradley-Terry reward model -log sigma(r(x, y_w) - r(x, y_l)) on the training pairs, trained until its
    accuracy on the validation pairs stops rising (the best checkpoint is kept), then scored once on the
    held-out pairs. Data-parallel like DPO. Cached under ``reward_models/<settings hash>/``; returns
    ``(model, report)``."""
    pc, device, pad, acc = cfg.ppo, kit.device, kit.tokenizer.pad_token_id, kit.acc
    settings = {"base": cfg.model.policy_model, "steps": pc.rm_steps, "batch": pc.rm_batch_size, "lr": pc.rm_lr,
                "eval_every": pc.rm_eval_every, "patience": pc.rm_patience, "seed": cfg.run.seed,
                "precision": dtype_name(kit.dtype),
                "pairs": hashlib.sha256(json.dumps([data.train_pairs, data.val_pairs]).encode()).hexdigest()[:16]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cfg.run.cache_dir) / "reward_models" / key
    if (out / "rm_report.json").exists():
        report = json.loads((out / "rm_report.json").read_text())
        print(f"ppo: reusing reward model {out} (held-out pair accuracy {report['heldout_pair_accuracy']:.3f})")
        return AutoModelForSequenceClassification.from_pretrained(out).to(device).eval(), report
    if pc.rm_batch_size % acc.num_processes:
        raise ConfigError(f"--rm_batch_size {pc.rm_batch_size} must be a multiple of the {acc.num_processes} processes")

    torch.manual_seed(cfg.run.seed)  # the scalar head's initialisation
    rm = AutoModelForSequenceClassification.from_pretrained(cfg.model.policy_model, num_labels=1).to(device)
    rm.config.pad_token_id = pad
    rm.eval()  # dropout off; gradients still flow
    opt = torch.optim.AdamW(rm.parameters(), lr=pc.rm_lr)
    rm, opt = acc.prepare(rm, opt)

    def scores(pairs):
        completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        b = response_batch([p["prompt"] for p in pairs] * 2, completions, pad)
        with autocast(device, kit.dtype):
            r = rm(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        r = r.squeeze(-1).float()
        return r[: len(pairs)], r[len(pairs):]

    @torch.no_grad()
    def pair_accuracy(pairs):  # each process scores its share; all get the mean
        share = padded_share(pairs, acc)
        wins = torch.cat([torch.gt(*scores(share[s:s + 64])).float() for s in range(0, len(share), 64)]).tolist()
        return float(np.mean(gather_share(wins, len(pairs), acc)))

    t0 = time.time()
    best = {"acc": -1.0, "step": 0, "state": None}
    curve = []
    bar = tqdm(range(1, pc.rm_steps + 1), desc="ppo: reward model", unit="step")
    for step in bar:
        idx = local_share(step_indices(step, pc.rm_batch_size, len(data.train_pairs), [cfg.run.seed, 3]), acc)
        r_w, r_l = scores([data.train_pairs[i] for i in idx])
        loss = -F.logsigmoid(r_w - r_l).mean()
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        # --- early stopping on the validation pairs (training reviews the training pairs do not use) ---
        if step % pc.rm_eval_every == 0 or step == pc.rm_steps:
            val = pair_accuracy(data.val_pairs)
            curve.append({"step": step, "val_pair_accuracy": val})
            bar.set_postfix(val_acc=f"{val:.3f}")
            if val > best["acc"]:
                best = {"acc": val, "step": step, "state": {k: v.detach().clone() for k, v in rm.state_dict().items()}}
            elif step - best["step"] >= pc.rm_patience * pc.rm_eval_every:
                break
    bar.close()
    rm.load_state_dict(best["state"])
    train_s = time.time() - t0
    # --- the held-out pairs are scored once, after training: an evaluation, not part of the training time ---
    t1 = time.time()
    held = data.eval_pairs[:512]
    report = {"heldout_pair_accuracy": pair_accuracy(held), "n_heldout_pairs": len(held),
              "val_pair_accuracy": best["acc"], "n_val_pairs": len(data.val_pairs), "best_step": best["step"],
              "steps_run": curve[-1]["step"], "stopped_early": curve[-1]["step"] < pc.rm_steps,
              "curve": curve, "train_s": train_s, "test_s": time.time() - t1}
    print(f"ppo: reward model held-out pair accuracy {report['heldout_pair_accuracy']:.3f} ({len(held)} pairs); "
          f"validation {best['acc']:.3f} at step {best['step']} of {report['steps_run']} ({train_s:.0f}s)")

    state = acc.get_state_dict(rm)  # every process (FSDP gathers the shards); the main one writes
    if acc.is_main_process:
        def write(tmp: Path):
            acc.unwrap_model(rm).save_pretrained(tmp, state_dict=state)
            (tmp / "rm_settings.json").write_text(json.dumps(settings, indent=2))
            (tmp / "rm_report.json").write_text(json.dumps(report, indent=2))

        atomic_write_dir(out, write)
    acc.wait_for_everyone()
    acc.free_memory()  # the reward model only scores from now on: PPO's checkpoints hold the policy alone
    return rm.eval(), report


# ---------------------------------------------------------------------------------------------------- PPO
def train(cfg, data, kit: EvalKit, name: str = "ppo_toxic_reduced_model", evaluate: bool = True) -> dict:
    """Train the reward model (unless ``ppo_reward="judge"``), then PPO; ``evaluate=False`` skips the
    held-out evaluations (benchmarks time the training alone). Data-parallel over ``kit.acc``'s processes:
    each samples and scores its share of every rollout batch; advantages are whitened and the KL controller
    fed over the global batch."""
    pc, rc, acc = cfg.ppo, cfg.run, kit.acc
    out_dir = Path(rc.output_dir)
    run_dir, final_dir = out_dir / "runs" / name, out_dir / name
    device, tok = kit.device, kit.tokenizer
    for flag, value in (("--ppo_batch_size", pc.ppo_batch_size), ("--ppo_mini_batch_size", pc.ppo_mini_batch_size)):
        if value % acc.num_processes:
            raise ConfigError(f"{flag} {value} must be a multiple of the {acc.num_processes} processes")
    seed_everything(rc.seed)

    # --- reward: learned Bradley-Terry model (RLHF) or the oracle judge's logit (PPO-GT) ---
    if pc.ppo_reward == "learned":
        rm, rm_report = train_reward_model(cfg, data, kit)

        def score_fn(prompts, responses):
            b = response_batch(prompts, responses, tok.pad_token_id)
            with torch.no_grad(), autocast(device, kit.dtype):
                return rm(input_ids=b["input_ids"].to(device),
                          attention_mask=b["attention_mask"].to(device)).logits.squeeze(-1).float().cpu()
    else:
        rm_report = None

        def score_fn(prompts, responses):
            texts = [tok.decode(p + r, skip_special_tokens=True) for p, r in zip(prompts, responses)]
            return judge_logits(kit.judge_tok, kit.judge, texts, kit.batch_size, device, kit.judge_dtype)

    policy = ResponseLogProbs(load_causal_lm(cfg.model.policy_model, device), value_head=True).to(device)
    policy.eval()  # dropout off throughout: PPO's ratios assume the sampling and training log-probs agree
    optimizer = torch.optim.AdamW(policy.parameters(), lr=pc.ppo_lr, eps=1e-5)
    policy, optimizer = acc.prepare(policy, optimizer)
    ref = ResponseLogProbs(kit.ref_model)
    kl_ctl = (FixedKLController(pc.init_kl_coef) if pc.target_kl is None
              else AdaptiveKLController(pc.init_kl_coef, pc.target_kl, pc.kl_horizon))
    prompts_all = data.train_prompts

    # --- resume ---
    # PPO's training time starts with its reward model's, the stage DPO does without.
    rm_train_s = rm_report["train_s"] if rm_report else 0.0
    start, timer, consecutive_bad, resumed = resume_or_start(acc, run_dir, rc.resume, rm_train_s, name,
                                                             {"kl_ctl": kl_ctl})
    metrics = MetricsLog(run_dir / "metrics.jsonl", start if resumed else None, acc, name, cfg.to_dict())
    if acc.is_main_process:
        cfg.save(run_dir / "training_config.json")
    if start == 0 and evaluate:
        with timer.evaluating():
            metrics.log({"step": 0, "time_s": 0.0, **eval_metrics(kit.reference_result(cfg.eval.eval_temperature))})

    B, mb_size = pc.ppo_batch_size // acc.num_processes, pc.ppo_mini_batch_size // acc.num_processes  # per process
    sum_over_processes = (lambda t: acc.reduce(t, "sum")) if acc.num_processes > 1 else None
    bar = tqdm(range(start + 1, pc.ppo_steps + 1), desc="ppo", unit="iter", initial=start, total=pc.ppo_steps)
    last_eval, last_eval_step = None, None
    with SignalFlag() as interrupted:
        for step in bar:
            t0 = time.time()
            # --- rollout (each process samples its share of the batch's prompts) ---
            # Each rollout's draws are seeded by its place in the global batch, never by the process: the
            # same prompts get the same samples at any process count.
            batch_idx = step_indices(step, pc.ppo_batch_size, len(prompts_all), [rc.seed, 7])
            positions = local_share(list(range(len(batch_idx))), acc)
            prompts = [prompts_all[batch_idx[j]] for j in positions]
            with generation_ready(policy):
                responses, gen_logps = generate(acc.unwrap_model(policy).lm, tok, prompts, cfg.data.response_tokens,
                                                1.0, [rc.seed, 7919, step], kit.batch_size, device, kit.dtype,
                                                fsdp_world(acc), prompt_ids=positions, return_logps=True)
            t_gen = time.time()
            b = {k: (v.to(device) if torch.is_tensor(v) else v)
                 for k, v in rollout_batch(prompts, responses, tok.pad_token_id).items()}
            mask = b["response_mask"].float()
            with torch.no_grad(), autocast(device, kit.dtype):
                old_logprobs, old_values = response_logps_values(policy, b)
                ref_logprobs, _ = response_logps_values(ref, b)
            old_values = old_values.float() * mask
            # The KL penalty scores the rollouts in a separate pass; under bf16 autocast its log-probs differ
            # from those the tokens were sampled with. The mean summed gap is the bias of the KL term (0 up to
            # float rounding in fp32), logged so that it is measured rather than assumed.
            logp_gap = mean_over_processes(float(np.mean([math.fsum(g) for g in gen_logps])
                                                 - old_logprobs.sum(1).mean().item()), acc)
            t_logps = time.time()

            # --- score ---
            scores = score_fn(prompts, responses).to(device)
            t_score = time.time()

            # --- advantages (whitened over the global batch) ---
            rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value)
            advantages, returns = gae(rewards, old_values, mask, pc.gamma, pc.gae_lambda)
            advantages, white_stats = whiten(advantages, mask, sum_over_processes=sum_over_processes,
                                             return_stats=True)
            seq_kl = mean_over_processes(kl.sum(1).mean().item(), acc)

            # --- update ---
            stats = {"pg_loss": [], "v_loss": [], "approx_kl": [], "clipfrac": []}
            bad = False
            rng = np.random.default_rng([rc.seed, 11, step])
            for _epoch in range(pc.ppo_epochs):
                for mb_idx in np.split(rng.permutation(B), B // mb_size):
                    mb_idx = torch.as_tensor(mb_idx, device=device)
                    mb = {k: (v[mb_idx] if torch.is_tensor(v) else v) for k, v in b.items()}
                    with autocast(device, kit.dtype):
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
                    acc.backward(loss)
                    # The norm of the gradient averaged over processes: every process takes the same decision.
                    grad_norm = acc.clip_grad_norm_(policy.parameters(), 1.0).item()
                    if not math.isfinite(grad_norm):
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
            kl_ctl.update(seq_kl, pc.ppo_batch_size)
            if acc.num_processes > 1:  # every process must use the same coefficient and whitening statistics
                mine = torch.cat([white_stats.float(), torch.tensor([kl_ctl_value, kl_ctl.value])]).to(device)
                every = acc.gather(mine.unsqueeze(0))
                sync = {"sync/spread": (every.max(0).values - every.min(0).values).abs().max().item()}
            else:
                sync = {}

            # --- log (means over every process's share) ---
            n_tokens = int(mask.sum().item()) + sum(len(p) for p in prompts)
            row = mean_over_processes({
                "losses/policy_loss": np.mean(stats["pg_loss"]) if stats["pg_loss"] else float("nan"),
                "losses/value_loss": np.mean(stats["v_loss"]) if stats["v_loss"] else float("nan"),
                "losses/approx_kl": np.mean(stats["approx_kl"]) if stats["approx_kl"] else float("nan"),
                "losses/clipfrac": np.mean(stats["clipfrac"]) if stats["clipfrac"] else float("nan"),
                "objective/score": scores.mean().item(),
                "objective/rlhf_reward": (scores - kl_ctl_value * kl.sum(1)).mean().item(),
                "objective/response_len": mask.sum(1).mean().item()}, acc)
            row = {"step": step, **row, "objective/kl": seq_kl, "objective/kl_coef": kl_ctl_value,
                   "objective/sampling_logp_gap": logp_gap, **sync,
                   "nonfinite_skipped": int(bad),
                   # phase timings (main process): sampling, policy/value/reference log-probs, reward, PPO epochs
                   "charts/generation_s": t_gen - t0, "charts/logps_s": t_logps - t_gen,
                   "charts/score_s": t_score - t_logps, "charts/update_s": t_update - t_score,
                   "charts/tokens_per_s": n_tokens * acc.num_processes * (1 + pc.ppo_epochs) / (t_update - t0),
                   "time_s": timer.elapsed}
            if evaluate and (step % pc.ppo_eval_every == 0 or step == pc.ppo_steps):
                with timer.evaluating():
                    last_eval, last_eval_step = evaluate_policy(policy, kit, cfg.eval.eval_temperature), step
                    row.update(eval_metrics(last_eval))
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
            stop = any_process(interrupted.signum is not None, acc)
            if step % rc.save_every == 0 or stop or diverged:
                ckpt = checkpoint(acc, run_dir, step, timer, 0 if diverged else consecutive_bad, rc.keep_checkpoints,
                                  {"kl_ctl": kl_ctl})
                if diverged:
                    raise StopTraining(f"ppo: {consecutive_bad} consecutive iterations had a non-finite loss or "
                                       f"gradient (last at {step}); the last good weights are in {ckpt}; lower "
                                       f"--ppo_lr and add --resume", 1)
                if stop:
                    raise StopTraining(f"ppo: interrupted at iteration {step}; checkpoint saved in {ckpt}. Resume "
                                       f"with the same command plus --resume", 130)

    # --- save (atomic) ---
    summary = {"method": "ppo", "precision": dtype_name(kit.dtype), "train_time_s": timer.elapsed,
               "eval_time_s": timer.eval_s, "rm_train_s": rm_train_s,
               "rm_test_s": rm_report["test_s"] if rm_report else 0.0, "iterations": pc.ppo_steps,
               "reward": pc.ppo_reward, "reward_model": rm_report}
    save_policy(acc, policy, tok, cfg, run_dir, final_dir, summary)
    metrics.close()
    print(f"ppo: saved {final_dir} ({summary['train_time_s']:.0f}s of training, of which {rm_train_s:.0f}s the "
          f"reward model; {summary['eval_time_s']:.0f}s of evaluation)")
    # The last step's evaluation is of the saved weights: the final comparison reuses it instead of redoing it.
    return {"model_dir": str(final_dir), "policy": policy, **summary,
            "final_eval": last_eval if last_eval_step == pc.ppo_steps else None}
