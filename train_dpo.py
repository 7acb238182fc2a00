"""DPO training (arXiv:2305.18290): ``train(cfg, data, kit)`` reads top to bottom.

The reference model is never run during training: its log-probs of every training pair are computed once,
before the first step, while the policy still *is* the reference, and cached on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from config import ConfigError
from dpo_utils import concatenated_batch, concatenated_forward, dpo_loss
from eval_utils import EvalKit, eval_metrics, evaluate_policy, generate, judge_scores
from logprobs import ResponseLogProbs
from models import autocast, dtype_name, load_causal_lm, weights_fingerprint
from run_utils import (
    MetricsLog,
    SignalFlag,
    StopTraining,
    any_process,
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


@torch.no_grad()
def reference_logps(model, pairs: list[dict], pad_id: int, batch_size: int, device, cache_dir: Path, weights: str,
                    dtype: torch.dtype = torch.float32, acc=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(N,), (N,) reference log-probs of the chosen and rejected completions, and whether they came from the
    cache. The cache key is everything the numbers depend on: ``weights`` (a hash of the weights themselves,
    not their path, which a model retrained in place keeps), the precision, the device type, the padding id
    and the pairs. Under several processes each computes its share of the pairs and all get every result."""
    key = hashlib.sha256(json.dumps([weights, dtype_name(dtype), torch.device(device).type, pad_id,
                                     [[p["prompt"], p["chosen"], p["rejected"]] for p in pairs]]).encode())
    path = Path(cache_dir) / f"ref_logps-{key.hexdigest()[:16]}.pt"
    if path.exists():
        cached = torch.load(path)
        return cached["chosen"], cached["rejected"], True
    share = padded_share(list(range(len(pairs))), acc) if acc is not None else list(range(len(pairs)))
    chosen, rejected = [], []
    for s in tqdm(range(0, len(share), batch_size), desc="dpo: reference log-probs", unit="batch", leave=False):
        batch = {k: v.to(device) for k, v in concatenated_batch([pairs[i] for i in share[s:s + batch_size]],
                                                                pad_id).items()}
        # Same precision as the training forward, so that at step 1 policy and reference log-probs agree.
        with autocast(device, dtype):
            c, r = concatenated_forward(model, batch)
        chosen += c.tolist()
        rejected += r.tolist()
    if acc is not None:
        chosen, rejected = gather_share(chosen, len(pairs), acc), gather_share(rejected, len(pairs), acc)
    out = {"chosen": torch.tensor(chosen), "rejected": torch.tensor(rejected)}
    if acc is None or acc.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.rename(path)
    return out["chosen"], out["rejected"], False


def generated_pairs(cfg, prompts: list[list[int]], kit: EvalKit) -> list[dict]:
    """Pairs as in the DPO paper: sample several completions per prompt from the reference and let the judge
    order them; the best is y_w, the worst y_l (prompts whose samples tie are dropped)."""
    k = cfg.dpo.n_generated_samples
    samples, scores = [], []
    for i in tqdm(range(k), desc="dpo: sample pairs from the reference", unit="round"):
        resp = generate(kit.ref_model, kit.tokenizer, prompts, cfg.data.response_tokens, 1.0, cfg.run.seed + 1000 + i,
                        kit.batch_size, kit.device, kit.dtype)
        texts = [kit.tokenizer.decode(p + r, skip_special_tokens=True) for p, r in zip(prompts, resp)]
        samples.append(resp)
        scores.append(judge_scores(kit.judge_tok, kit.judge, texts, kit.batch_size, kit.device, kit.judge_dtype))
    scores = np.stack(scores)  # (k, N)
    best, worst = scores.argmax(0), scores.argmin(0)
    return [{"prompt": p, "chosen": samples[best[j]][j], "rejected": samples[worst[j]][j]}
            for j, p in enumerate(prompts) if scores[best[j], j] > scores[worst[j], j]]


def train(cfg, data, kit: EvalKit, name: str = "dpo_toxic_reduced_model", evaluate: bool = True) -> dict:
    """Train DPO on ``data.train_pairs`` (or generated pairs); ``evaluate=False`` skips the held-out
    evaluations (benchmarks time the training alone). Data-parallel over ``kit.acc``'s processes: each takes
    its share of every batch, so the batch size is global and the result the same at any process count."""
    dc, rc, acc = cfg.dpo, cfg.run, kit.acc
    out_dir = Path(rc.output_dir)
    run_dir, final_dir = out_dir / "runs" / name, out_dir / name
    device, tok = kit.device, kit.tokenizer
    if dc.dpo_batch_size % acc.num_processes:
        raise ConfigError(f"--dpo_batch_size {dc.dpo_batch_size} must be a multiple of the {acc.num_processes} "
                          f"processes")
    seed_everything(rc.seed)
    t_setup = time.time()  # the pair sampling and the reference pass count as DPO's training time
    # eval mode: dropout off (the log-probs must match the reference's at step 1)
    policy = ResponseLogProbs(load_causal_lm(cfg.model.policy_model, device))
    weights = weights_fingerprint(policy.lm)  # of the reference's weights, before any sharding
    pairs_per_step = dc.dpo_batch_size * dc.dpo_grad_accum

    # --- preference pairs ---
    if dc.pair_source == "generated":
        n_needed = min(len(data.train_prompts), dc.dpo_steps * pairs_per_step)
        pairs = generated_pairs(cfg, data.train_prompts[:n_needed], kit)
    else:
        pairs = data.train_pairs
    if not pairs:
        raise StopTraining("dpo: no preference pairs to train on", 2)

    # --- optimiser: linear warmup, then constant (as the reference implementation) ---
    opt_cls = torch.optim.RMSprop if dc.dpo_optimizer == "rmsprop" else torch.optim.AdamW
    opt_kw = {"weight_decay": 0.0} if dc.dpo_optimizer == "adamw" else {}
    optimizer = opt_cls(policy.parameters(), lr=dc.dpo_lr, **opt_kw)
    # Not prepared: it steps once per optimiser step, whatever the number of processes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (dc.dpo_warmup_steps + 1)))
    policy, optimizer = acc.prepare(policy, optimizer)

    # --- reference log-probs, once (the policy equals the reference before step 1) ---
    t_ref = time.time()
    ref_chosen_logps, ref_rejected_logps, ref_cached = reference_logps(
        policy, pairs, tok.pad_token_id, 2 * dc.dpo_batch_size, device, Path(rc.cache_dir) / "cache", weights,
        kit.dtype, acc)
    ref_logps_s = time.time() - t_ref

    # --- resume ---
    start, timer, consecutive_bad, resumed = resume_or_start(acc, run_dir, rc.resume, time.time() - t_setup,
                                                             name, {"scheduler": scheduler})
    metrics = MetricsLog(run_dir / "metrics.jsonl", start if resumed else None, acc, name, cfg.to_dict())
    if acc.is_main_process:
        cfg.save(run_dir / "training_config.json")
    if start == 0 and evaluate:
        with timer.evaluating():
            metrics.log({"step": 0, "time_s": 0.0, **eval_metrics(kit.reference_result(cfg.eval.eval_temperature))})

    bar = tqdm(range(start + 1, dc.dpo_steps + 1), desc="dpo", unit="step", initial=start, total=dc.dpo_steps)
    last_eval, last_eval_step = None, None
    with SignalFlag() as interrupted:
        for step in bar:
            t0 = time.time()
            idx = step_indices(step, pairs_per_step, len(pairs), [rc.seed])

            # --- update ---
            stats = dict.fromkeys(("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
                                   "logps/rejected"), 0.0)
            for micro in range(dc.dpo_grad_accum):
                mb = local_share(idx[micro * dc.dpo_batch_size:(micro + 1) * dc.dpo_batch_size], acc)
                batch = concatenated_batch([pairs[i] for i in mb], tok.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(device, kit.dtype):
                    policy_chosen_logps, policy_rejected_logps = concatenated_forward(policy, batch)
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps[mb].to(device),
                    ref_rejected_logps[mb].to(device), dc.beta, dc.loss_type, dc.label_smoothing)
                loss = losses.mean()
                if step in rc.debug_nan_steps:  # test hook for the non-finite guard below
                    loss = loss * float("nan")
                # Gradients are averaged over processes only at the last micro-batch.
                with acc.no_sync(policy) if micro < dc.dpo_grad_accum - 1 else contextlib.nullcontext():
                    acc.backward(loss / dc.dpo_grad_accum)
                for k, v in (("loss", loss.detach()), ("rewards/chosen", chosen_rewards.mean()),
                             ("rewards/rejected", rejected_rewards.mean()),
                             ("rewards/accuracies", (chosen_rewards > rejected_rewards).float().mean()),
                             ("logps/chosen", policy_chosen_logps.detach().mean()),
                             ("logps/rejected", policy_rejected_logps.detach().mean())):
                    stats[k] += v.item() / dc.dpo_grad_accum
            stats = mean_over_processes(stats, acc)  # every process's share of the batch weighs the same
            grad_norm = acc.clip_grad_norm_(policy.parameters(), 1.0).item()
            # Non-finite guard: never let one bad batch poison the weights or the optimiser moments.
            finite = math.isfinite(stats["loss"]) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                consecutive_bad = 0
            else:
                consecutive_bad += 1
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]  # the rate this step used: read before the scheduler advances
            scheduler.step()

            # --- log ---
            row = {"step": step, **stats, "rewards/margins": stats["rewards/chosen"] - stats["rewards/rejected"],
                   "grad_norm": grad_norm, "lr": lr, "nonfinite_skipped": int(not finite),
                   "pairs_per_s": pairs_per_step / (time.time() - t0), "time_s": timer.elapsed}
            if evaluate and (step % dc.dpo_eval_every == 0 or step == dc.dpo_steps):
                with timer.evaluating():
                    last_eval, last_eval_step = evaluate_policy(policy, kit, cfg.eval.eval_temperature), step
                    row.update(eval_metrics(last_eval))
            metrics.log(row)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['rewards/accuracies']:.2f}")
            if step % rc.log_every == 0 or "eval/safety_score" in row:
                extra = (f" | safety {row['eval/safety_score']:.3f} kl {row['eval/kl_to_ref']:.2f}"
                         if "eval/safety_score" in row else "")
                tqdm.write(f"dpo step {step}: loss {stats['loss']:.4f} margin {row['rewards/margins']:.3f} "
                           f"acc {stats['rewards/accuracies']:.2f} {row['pairs_per_s']:.1f} pairs/s{extra}")

            # --- checkpoint ---
            # Skipped steps leave the weights untouched, so after too many of them the current weights are
            # still the last good ones: save them, then stop. Every process stops at the same step.
            diverged = consecutive_bad >= rc.max_nonfinite_skips
            stop = any_process(interrupted.signum is not None, acc)
            if step % rc.save_every == 0 or stop or diverged:
                ckpt = checkpoint(acc, run_dir, step, timer, 0 if diverged else consecutive_bad, rc.keep_checkpoints,
                                  {"scheduler": scheduler})
                if diverged:
                    raise StopTraining(f"dpo: {consecutive_bad} consecutive steps had a non-finite loss or gradient "
                                       f"(last at step {step}); the last good weights are in {ckpt}; lower "
                                       f"--dpo_lr and add --resume", 1)
                if stop:
                    raise StopTraining(f"dpo: interrupted at step {step}; checkpoint saved in {ckpt}. Resume with "
                                       f"the same command plus --resume", 130)

    # --- save (atomic: a crash here never leaves a half-written model nor destroys the previous one) ---
    summary = {"method": "dpo", "precision": dtype_name(kit.dtype), "train_time_s": timer.elapsed,
               "eval_time_s": timer.eval_s, "ref_logps_s": ref_logps_s, "ref_logps_cached": ref_cached,
               "steps": dc.dpo_steps, "pairs": len(pairs)}
    save_policy(acc, policy, tok, cfg, run_dir, final_dir, summary)
    metrics.close()
    print(f"dpo: saved {final_dir} ({summary['train_time_s']:.0f}s of training, of which {ref_logps_s:.0f}s the "
          f"reference pass; {summary['eval_time_s']:.0f}s of evaluation)")
    # The last step's evaluation is of the saved weights: the final comparison reuses it instead of redoing it.
    return {"model_dir": str(final_dir), "policy": policy, **summary,
            "final_eval": last_eval if last_eval_step == dc.dpo_steps else None}
