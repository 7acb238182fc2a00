"""DPO training (arXiv:2305.18290): ``train(cfg, data, ctx)`` reads top to bottom.

The reference model is never run during training: its log-probs of every training pair are computed once,
before the first step, while the policy still *is* the reference, and cached on disk.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpo_utils import concatenated_forward, dpo_loss
from modeling.batching import concatenated_batch
from modeling.logprobs import ResponseLogProbs
from modeling.models import autocast, dtype_name, load_causal_lm, threads_key, weights_fingerprint
from runtime.artifacts import Artifact
from runtime.run_log import StopTraining
from runtime.run_utils import gather_share, local_share, mean_over_processes, padded_share, step_indices
from training.lifecycle import RunContext, TrainingRun


@torch.no_grad()
def reference_logps(model, pairs: list[dict], pad_id: int, batch_size: int, device, cache_dir: Path, weights: str,
                    dtype: torch.dtype = torch.float32, acc=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(N,), (N,) reference log-probs of the chosen and rejected completions, and whether they came from the
    cache. The cache key is everything the numbers depend on: ``weights`` (a hash of the weights themselves,
    not their path, which a model retrained in place keeps), the precision, the device type, the padding id
    and the pairs. Under several processes each computes its share of the pairs and all get every result."""
    art = Artifact(cache_dir, [weights, dtype_name(dtype), torch.device(device).type, pad_id,
                              [[p["prompt"], p["chosen"], p["rejected"]] for p in pairs], threads_key(device)],
                   prefix="ref_logps-", suffix=".pt", digits=16)
    if art.exists():
        cached = torch.load(art.path)
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
        art.write(lambda tmp: torch.save(out, tmp))
    return out["chosen"], out["rejected"], False


def run_reference_logps(cfg, pairs: list[dict], model, weights: str, ctx: RunContext, acc=None):
    """:func:`reference_logps` as a DPO run of ``cfg`` makes and caches them (its batching, cache directory and
    precision): the worker processes (``study/jobs.py``) make them before a seed's DPO runs, which then find them
    in the cache."""
    return reference_logps(model, pairs, ctx.tokenizer.pad_token_id, 2 * cfg.dpo.dpo_batch_size, ctx.device,
                           Path(cfg.run.cache_dir) / "cache", weights, ctx.dtype, acc)


def train(cfg, data, ctx: RunContext, name: str = "dpo_toxic_reduced_model", evaluate: bool = True) -> dict:
    """Train DPO on ``data.train_pairs``; ``evaluate=False`` skips the evaluations on the
    validation prompts (benchmarks time the training alone). Data-parallel over ``ctx.acc``'s processes: each takes
    its share of every batch, so the batch size is global and the result the same at any process count."""
    dc, rc, acc, device, tok = cfg.dpo, cfg.run, ctx.acc, ctx.device, ctx.tokenizer
    # Seeds everything; the reference pass counts as DPO's training time.
    run = TrainingRun(cfg, ctx, name, "dpo", dc.dpo_steps, dc.dpo_eval_every, evaluate,
                      per_process={"--dpo_batch_size": dc.dpo_batch_size}, eval_steps=dc.dpo_eval_steps)
    # eval mode: dropout off (the log-probs must match the reference's at step 1)
    policy = ResponseLogProbs(load_causal_lm(cfg.model.policy_model, device))
    weights = weights_fingerprint(policy.lm)  # of the reference's weights, before any sharding
    pairs_per_step = dc.dpo_batch_size * dc.dpo_grad_accum

    # --- preference pairs: review pairs, or the reference's judged samples (data preparation made them) ---
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
    ref_chosen_logps, ref_rejected_logps, ref_cached = run_reference_logps(cfg, pairs, policy, weights, ctx, acc)
    ref_logps_s = time.time() - t_ref

    run.begin(policy, {"scheduler": scheduler})
    for step in run.steps():
        t0 = time.time()
        idx = step_indices(step, pairs_per_step, len(pairs), [rc.seed])

        # --- update ---
        stats = dict.fromkeys(("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
                               "logps/rejected"), 0.0)
        for micro in range(dc.dpo_grad_accum):
            mb = local_share(idx[micro * dc.dpo_batch_size:(micro + 1) * dc.dpo_batch_size], acc)
            batch = {k: v.to(device) for k, v in concatenated_batch([pairs[i] for i in mb], tok.pad_token_id).items()}
            with autocast(device, ctx.dtype):
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
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used: read before the scheduler advances
        scheduler.step()

        # --- log ---
        row = {**stats, "rewards/margins": stats["rewards/chosen"] - stats["rewards/rejected"],
               "grad_norm": grad_norm, "lr": lr, "pairs_per_s": pairs_per_step / (time.time() - t0)}
        run.end_step(step, row, nonfinite=not finite,
                     log_line=f"dpo step {step}: loss {stats['loss']:.4f} margin {row['rewards/margins']:.3f} "
                              f"acc {stats['rewards/accuracies']:.2f} {row['pairs_per_s']:.1f} pairs/s",
                     postfix={"loss": f"{stats['loss']:.3f}", "acc": f"{stats['rewards/accuracies']:.2f}"})

    return run.finish({"ref_logps_s": ref_logps_s, "ref_logps_cached": ref_cached, "steps": dc.dpo_steps,
                       "pairs": len(pairs)}, note=f", of which {ref_logps_s:.0f}s the reference pass")
