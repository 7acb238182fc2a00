"""The RLHF baseline: PPO with GAE and the KL to the frozen reference in every token's reward (Ziegler et al. 2019;
Stiennon et al. 2020; InstructGPT; TRL), on the reward of ``training/reward_model.py``. ``train(cfg, data, ctx)``.

It maximises E[score] - kl_coef * KL(pi || pi_ref) of the whole response (kl_coef in reward units per nat).
``--kl_penalty`` says how the KL enters: ``full`` (every preset's), each token's reward is -kl_coef x the exact KL
over the vocabulary at its state, and that KL's own gradient is a loss term on the policy term's scale
(``ppo_utils.ppo_loss``); ``sampled``, Ziegler et al.'s -kl_coef x the sampled token's log-ratio; ``loss``, a
variant, not the field's PPO: the rewards are the score alone and the exact KL is a loss term only (GRPO's and
OpenRLHF's ``--use_kl_loss``), which drops the effect of an action on the KL of the states after it.

Value function: a linear value head on the policy's own last hidden state (``ResponseLogProbs(value_head=True)``,
as TRL's original PPOTrainer and Ziegler et al. do), not a separate value model. On a CPU that halves the
forward/backward work of every rollout and update; the price -- value-loss gradients reaching the shared
trunk -- is kept small by ``vf_coef`` (0.1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from eval_utils import generate
from modeling.batching import rollout_batch
from modeling.logprobs import ResponseLogProbs, generation_ready
from modeling.models import autocast, load_causal_lm
from ppo_utils import (
    exact_kl,
    gae,
    kl_controller,
    kl_loss_coef,
    kl_penalized_rewards,
    ppo_loss,
    sampling_logp_gap,
    whiten,
    whitening_std,
)
from runtime.run_utils import (
    fsdp_world,
    local_share,
    mean_over_processes,
    process_sum,
    spread_over_processes,
    step_indices,
)
from training.lifecycle import RunContext, TrainingRun
from training.reward_model import reward_function

# metrics.jsonl's loss keys and the :func:`ppo_utils.ppo_loss` terms they average
LOGGED = {"losses/policy_loss": "pg_loss", "losses/value_loss": "v_loss", "losses/approx_kl": "approx_kl",
          "losses/clipfrac": "clipfrac", "losses/kl_loss": "kl_loss"}


def _model_args(b) -> tuple:
    """A :func:`rollout_batch`'s forward arguments, its response mask widened over the prompt columns [0, P)."""
    full_mask = torch.cat([torch.zeros_like(b["input_ids"][:, :b["P"]]), b["response_mask"]], 1)
    return b["input_ids"], b["attention_mask"], full_mask, b["position_ids"]


def response_logps_values(model: ResponseLogProbs, b) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probs of the response tokens and (B, T) values of the states that emitted them (None for a
    model without a value head), from a :func:`rollout_batch` whose responses start at column P."""
    P = b["P"]
    token_logps, values = model(*_model_args(b))
    return token_logps[:, P:], (values[:, P:] if values is not None else None)


def reference_pass(ref: ResponseLogProbs, b, vocab: bool):
    """The frozen reference on a whole rollout batch, once: (B, T) log-probs of the response tokens and, with
    ``vocab``, (N, V) fp32 log-probs of the whole vocabulary at the batch's N response-token states (row-major, as
    :class:`ResponseLogProbs` makes them; None without). The exact KL penalty reads them in every minibatch of
    every epoch: one reference pass per iteration instead of one per minibatch and epoch (1 + 16 at 4 epochs of
    4 minibatches; the same numbers, up to float rounding of the batch's shape)."""
    if not vocab:
        return response_logps_values(ref, b)[0], None
    token_logps, _, full = ref(*_model_args(b), vocab_logps=True)
    return token_logps[:, b["P"]:], full


def state_rows(b) -> torch.Tensor:
    """(B, T - 1): each response-token state's row in :func:`reference_pass`'s (N, V) log-probs, -1 elsewhere.
    ``rows[mb_idx]`` keeps only a minibatch's rows, and its entries >= 0, read row-major, are the minibatch's
    states in the order its own forward pass makes them."""
    pred = _model_args(b)[2][:, 1:].bool()
    rows = torch.full(pred.shape, -1, dtype=torch.long, device=pred.device)
    rows[pred] = torch.arange(int(pred.sum()), device=pred.device)
    return rows


def response_logps_values_kl(policy: ResponseLogProbs, b, ref_logps: torch.Tensor):
    """:func:`response_logps_values` of ``policy`` plus (B, T) the exact per-token KL(policy || ref) over the
    vocabulary at each response token's state (:func:`ppo_utils.exact_kl`), 0 elsewhere; ``ref_logps`` (N, V) are
    the reference's log-probs at this batch's N response-token states (row-major: :func:`reference_pass`'s rows,
    picked with :func:`state_rows`)."""
    P, args = b["P"], _model_args(b)
    token_logps, values, logps = policy(*args, vocab_logps=True)
    kl = ResponseLogProbs.scatter(args[2], exact_kl(logps, ref_logps))
    return token_logps[:, P:], values[:, P:], kl[:, P:]


def rollout_pass(policy: ResponseLogProbs, ref: ResponseLogProbs, b, kl_penalty: str):
    """The rollout's no-grad pass: the policy's (B, T) log-probs and values, the reference's vocabulary log-probs at
    the batch's response states ((N, V), :func:`reference_pass`; None with the sampled penalty), and (B, T) each
    token's KL to the reference, zero on padding: the exact KL over the vocabulary at the state that emitted it
    (``full`` and ``loss``), or the sampled token's log-ratio (``sampled``). Policy and reference run the same
    forward pass on the same batch, so at the reference every KL is exactly 0."""
    mask = b["response_mask"].float()
    ref_logprobs, ref_vocab = reference_pass(ref, b, vocab=kl_penalty != "sampled")
    if ref_vocab is None:
        logprobs, values = response_logps_values(policy, b)
        kl = logprobs - ref_logprobs
    else:
        logprobs, values, kl = response_logps_values_kl(policy, b, ref_vocab)
    return logprobs, values.float() * mask, ref_vocab, kl.float() * mask


def minibatch_forward(policy, mb: dict, mb_idx, rows, ref_vocab):
    """The policy's response log-probs and values on a minibatch, both ``(mb, T)``, and, with the exact KL
    (``ref_vocab``, the batch's reference distributions, and ``rows``, each state's row in it: :func:`state_rows`),
    ``(mb, T)`` the exact per-state KL to the reference with its gradient, for :func:`ppo_utils.ppo_loss`'s KL
    term; None with the sampled penalty, which is all in the rewards."""
    if ref_vocab is None:
        return (*response_logps_values(policy, mb), None)
    mb_rows = rows[mb_idx]
    new_logprobs, new_values, token_kl = response_logps_values_kl(policy, mb, ref_vocab[mb_rows[mb_rows >= 0]])
    return new_logprobs, new_values, token_kl.float()


def iteration_row(stats: dict, scores, kl, mask, prompts, kl_coef: float, next_kl_coef: float, seq_kl: float,
                  logp_gap: float, white_stats, epochs: int, seconds: float, acc) -> dict:
    """One iteration's metrics.jsonl row: the update's losses and the rollout's objective, means over every
    process's share (``scores`` ``(B,)``, ``kl`` and ``mask`` ``(B, T)``), and the spread over processes of what
    every process must agree on (the coefficient and the whitening statistics)."""
    row = mean_over_processes({**{k: np.mean(v) if v else float("nan") for k, v in stats.items()},
                               "objective/score": scores.mean().item(),
                               "objective/rlhf_reward": (scores - kl_coef * kl.sum(1)).mean().item(),
                               "objective/response_len": mask.sum(1).mean().item()}, acc)
    n_tokens = (int(mask.sum().item()) + sum(len(p) for p in prompts)) * acc.num_processes * (1 + epochs)
    row.update({"objective/kl": seq_kl, "objective/kl_coef": kl_coef, "objective/sampling_logp_gap": logp_gap,
                # every process must use the same coefficient and whitening statistics: their spread, measured
                **spread_over_processes(torch.cat([white_stats.float(), torch.tensor([kl_coef, next_kl_coef])]), acc),
                "charts/tokens_per_s": n_tokens / seconds})  # and the phases' seconds (run.lap)
    return row


def train(cfg, data, ctx: RunContext, name: str = "ppo_toxic_reduced_model", evaluate: bool = True) -> dict:
    """Train the reward model (unless ``ppo_reward="judge"``), then PPO; ``evaluate=False`` skips the validation
    evaluations. Data-parallel over ``ctx.acc``'s processes: each samples and scores its share of every rollout
    batch; advantages are whitened and the KL controller fed over the global batch."""
    pc, rc, acc, device, tok = cfg.ppo, cfg.run, ctx.acc, ctx.device, ctx.tokenizer
    run = TrainingRun(cfg, ctx, name, "ppo", pc.ppo_steps, pc.ppo_eval_every, evaluate, unit="iteration",
                      per_process={"--ppo_batch_size": pc.ppo_batch_size,
                                   "--ppo_mini_batch_size": pc.ppo_mini_batch_size}, eval_steps=pc.ppo_eval_steps)
    # --- reward: learned Bradley-Terry model (RLHF) or the oracle judge's logit (PPO-GT) ---
    score_fn, rm_report = reward_function(cfg, data, ctx)
    policy = ResponseLogProbs(load_causal_lm(cfg.model.policy_model, device), value_head=True).to(device)
    policy.eval()  # dropout off throughout: PPO's ratios assume the sampling and training log-probs agree
    # No weight decay by default: decay moves the weights off the reference even when every gradient is zero,
    # and with whitened advantages any such drift is then amplified into full-size updates.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=pc.lr, eps=1e-5, weight_decay=pc.ppo_weight_decay)
    policy, optimizer = acc.prepare(policy, optimizer)
    ref = ResponseLogProbs(ctx.ref_model)
    kl_ctl = kl_controller(pc.kl_start, pc.target_kl, pc.kl_horizon, pc.kl_hold, pc.kl_damping)
    # PPO's training time starts with its reward model's, the stage DPO does without (0 s when reused).
    rm_train_s = rm_report["train_s"] if rm_report else 0.0
    run.begin(policy, {"kl_ctl": kl_ctl}, setup_s=rm_train_s)
    B, mb_size = pc.ppo_batch_size // acc.num_processes, pc.ppo_mini_batch_size // acc.num_processes  # per process
    for step in run.steps():
        # --- rollout (each process samples its share of the batch's prompts) ---
        # Each rollout's draws are seeded by its place in the global batch, never by the process: the same
        # prompts get the same samples at any process count.
        batch_idx = step_indices(step, pc.ppo_batch_size, len(data.train_prompts), [rc.seed, 7])
        positions = local_share(list(range(len(batch_idx))), acc)
        prompts = [data.train_prompts[batch_idx[j]] for j in positions]
        with generation_ready(policy):
            responses, gen_logps = generate(acc.unwrap_model(policy).lm, tok, prompts, cfg.data.response_tokens, 1.0,
                                            [rc.seed, 7919, step], ctx.batch_size, device, ctx.dtype, fsdp_world(acc),
                                            prompt_ids=positions, return_logps=True)
        run.lap("generation")
        b = rollout_batch(prompts, responses, tok.pad_token_id, device)
        mask = b["response_mask"].float()
        with torch.no_grad(), autocast(device, ctx.dtype):
            old_logprobs, old_values, ref_vocab, kl = rollout_pass(policy, ref, b, pc.kl_penalty)
        rows = state_rows(b) if ref_vocab is not None else None  # the exact KL's lookup only
        # The KL's log-probs come from a second pass, not from sampling: their gap is measured, not assumed.
        logp_gap = mean_over_processes(sampling_logp_gap(gen_logps, old_logprobs), acc)
        run.lap("logps")

        # --- score, then rewards -kl_coef * KL_t + score at the end, and advantages whitened over the global batch ---
        scores = score_fn(prompts, responses).to(device)
        run.lap("score")
        rewards = kl_penalized_rewards(scores, kl, mask, 0.0 if pc.kl_penalty == "loss" else kl_ctl.value)
        advantages, returns = gae(rewards, old_values, mask, pc.gamma, pc.gae_lambda)
        advantages, white_stats = whiten(advantages, mask, sum_over_processes=process_sum(acc), return_stats=True)
        kl_weight = kl_loss_coef(pc.kl_penalty, kl_ctl.value, whitening_std(white_stats))  # the KL loss term's
        seq_kl = mean_over_processes(kl.sum(1).mean().item(), acc)

        # --- update ---
        stats = {k: [] for k in LOGGED}
        bad = False
        rng = np.random.default_rng([rc.seed, 11, step])
        for _epoch in range(pc.ppo_epochs):
            for mb_idx in np.split(rng.permutation(B), B // mb_size):
                mb_idx = torch.as_tensor(mb_idx, device=device)
                mb = {k: (v[mb_idx] if torch.is_tensor(v) else v) for k, v in b.items()}
                with autocast(device, ctx.dtype):
                    new_logprobs, new_values, token_kl = minibatch_forward(policy, mb, mb_idx, rows, ref_vocab)
                out = ppo_loss(new_logprobs.float(), old_logprobs[mb_idx], advantages[mb_idx], new_values.float(),
                               old_values[mb_idx], returns[mb_idx], token_kl, mask[mb_idx], pc.clip_coef,
                               pc.vf_clip_coef, pc.vf_coef, kl_weight)
                loss = out["loss"].mean()
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
                for k, term in LOGGED.items():
                    stats[k].append(out[term].mean().item())
        optimizer.zero_grad(set_to_none=True)
        run.lap("update")
        kl_coef = kl_ctl.value  # the coefficient this iteration's rewards used
        kl_ctl.update(seq_kl, pc.ppo_batch_size)

        # --- log (means over every process's share) ---
        row = iteration_row(stats, scores, kl, mask, prompts, kl_coef, kl_ctl.value, seq_kl, logp_gap, white_stats,
                            pc.ppo_epochs, run.step_seconds(), acc)
        run.end_step(step, row, nonfinite=bad,
                     log_line=f"ppo iter {step}: score {row['objective/score']:.3f} kl {seq_kl:.2f} kl_coef "
                              f"{kl_coef:.3f} pg {row['losses/policy_loss']:.4f} v {row['losses/value_loss']:.4f}",
                     postfix={"score": f"{row['objective/score']:.2f}", "kl": f"{seq_kl:.2f}"})

    return run.finish({"rm_train_s": rm_train_s, "rm_test_s": rm_report["test_s"] if rm_report else 0.0,
                       "iterations": pc.ppo_steps, "reward": pc.ppo_reward, "reward_model": rm_report},
                      note=f", of which {rm_train_s:.0f}s the reward model")
