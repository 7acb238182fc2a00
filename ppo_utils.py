"""PPO math for RLHF on token sequences: pure functions of tensors with shapes in their docstrings.

Conventions: B rollouts, T response tokens; ``mask`` (B, T) is 1 on response tokens and 0 on right padding
(a response is contiguous from t = 0). Sources: Schulman et al. 2017 (PPO, arXiv:1707.06347), Schulman et
al. 2016 (GAE, arXiv:1506.02438), Ziegler et al. 2019 (KL-penalised RLHF, arXiv:1909.08593), and the
cleanrl / TRL implementations of the same formulas.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


WHITEN_EPS = 1e-8  # added to the variance before whitening divides by its root (whiten, whitening_std)


def whiten(x: torch.Tensor, mask: torch.Tensor, sum_over_processes=None, return_stats: bool = False):
    """Normalise ``x`` (B, T) to zero mean and unit variance over the masked positions; zero elsewhere.

    ``sum_over_processes`` (a function summing a tensor over data-parallel processes) makes the mean and
    variance those of the global batch, of which each process holds a share. ``return_stats`` also returns
    the (3,) tensor (count, mean, variance) used, the same on every process.
    """
    m = mask.to(x.dtype)
    total = sum_over_processes or (lambda t: t)
    n, s, s2 = total(torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])).unbind()
    mean = s / n.clamp(min=1)
    # One pass (so one all-reduce under several processes), but E[x^2] - mean^2 can round below 0 when x is
    # nearly constant: clamped, or rsqrt would turn it into NaN.
    var = (s2 / n.clamp(min=1) - mean ** 2).clamp(min=0.0)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    return (out * m, torch.stack([n, mean, var])) if return_stats else out * m


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """Per-token rewards r_t = -kl_coef * kl_t, plus the sequence score on the last response token.

    Eq. 2 of Ziegler et al. 2019, R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)), spread over the tokens
    (``kl_coef`` is that beta, in reward units per nat of sequence KL; DPO's beta is another quantity). ``kl``
    is either the sampled token's log-ratio, log pi(y_t) - log pi_ref(y_t) (the paper's; TRL's k1), or the exact
    KL over the vocabulary at the state that emitted y_t (:func:`exact_kl`; TRL's legacy ``kl_penalty="full"``).
    Either sums, in expectation, to the sequence KL.
    Args:
        scores: (B,) reward-model (or judge) score of each full completion.
        kl: (B, T) per-token KL estimate; mask: (B, T) response mask.
    Returns:
        (B, T) rewards, zero on padding.
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl
    # The score belongs to the whole sequence: put it on the last non-padding response token.
    last = (mask.long().sum(1) - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards * m


def exact_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) of the next-token distributions at each state, summed over the whole vocabulary:
    sum_v pi(v) (log pi(v) - log pi_ref(v)). Its sum over a response's states is the sequence KL's chain-rule
    decomposition, so its mean over sampled responses estimates the sequence KL without the sampling noise of the
    log-ratio of the sampled token (k1; Schulman 2020, "Approximating KL divergence").

    Args:
        logps, ref_logps: (N, V) log-probs of the policy and the reference at the same N states.
    Returns:
        (N,) per-state KL, >= 0 up to rounding, differentiable in ``logps``.
    """
    # The log-ratio is detached: the gradient it would add, sum_v pi(v) grad log pi(v) = grad sum_v pi(v), is 0 in
    # exact arithmetic but not in floating point, where it would nudge a policy that equals the reference. What
    # remains is the KL's whole gradient, pi * (log-ratio - KL) in the logits: exactly 0 at the reference. The
    # value is the same.
    return (logps.exp() * (logps - ref_logps).detach()).sum(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float):
    """Generalised advantage estimation over the response tokens (Eq. 16, arXiv:1506.02438).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lambda * A_{t+1}, with V and A past the
    last response token taken as 0 (the episode ends there).
    Args:
        rewards, values, mask: (B, T).
    Returns:
        (advantages, returns), each (B, T), zero on padding; returns = advantages + values.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        next_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(m[:, 0])
        next_value = values[:, t + 1] * next_m if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        lastgaelam = delta + gamma * gae_lambda * next_m * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * m
    return advantages, (advantages + values) * m


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_coef: float) -> dict[str, torch.Tensor]:
    """Clipped surrogate objective (Eq. 7, arXiv:1707.06347), per example.

    Args:
        logprobs: (B, T) under the policy being updated; old_logprobs: (B, T) at rollout time.
        advantages: (B, T); mask: (B, T).
    Returns:
        ``pg_loss`` (B,): masked token mean of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps));
        ``approx_kl`` (B,): masked mean of (ratio - 1) - log ratio (the low-variance k3 estimator);
        ``clipfrac`` (B,): fraction of tokens where the ratio left [1-eps, 1+eps].
    """
    logratio = logprobs - old_logprobs
    ratio = logratio.exp()
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)
    return {"pg_loss": masked_mean(torch.max(pg_losses, pg_losses2), mask, dim=1),
            "approx_kl": masked_mean((ratio - 1) - logratio, mask, dim=1).detach(),
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_coef).float(), mask, dim=1).detach()}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               vf_clip_coef: float) -> torch.Tensor:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2), per example (B,)."""
    v_clipped = old_values + (values - old_values).clamp(-vf_clip_coef, vf_clip_coef)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask, dim=1)


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, token_kl: torch.Tensor | None, mask: torch.Tensor,
             clip_coef: float, vf_clip_coef: float, vf_coef: float, kl_loss_coef: float) -> dict[str, torch.Tensor]:
    """PPO's loss per example: ``pg_loss + vf_coef * v_loss + kl_loss_coef * kl_loss``, each a per-token mean.

    ``kl_loss`` is the masked token mean of ``token_kl`` (B, T), the exact KL to the reference at each response
    token's state under the policy being updated (:func:`exact_kl`, differentiable), or 0 when ``token_kl`` is None.
    Where the KL is also in the rewards (``--kl_penalty full``) this term adds what a policy gradient cannot see: a
    reward reaches the policy only through the actions before it, so KL_t in the reward credits the actions that
    led to state t, and grad KL_t at that state is this term's. Its weight is then beta / sigma, sigma the
    advantages' whitening scale (:func:`whitening_std`): the policy term is a token mean of advantages divided by
    sigma, and the two must sum to a gradient of E[score] - beta * KL. Alone (``--kl_penalty loss``, the GRPO
    style) it is a penalty beside the policy term, in nats per token against whitened advantages.
    Args:
        logprobs, values: (B, T) under the policy being updated; old_logprobs, old_values: (B, T) at rollout.
        advantages, returns: (B, T); mask: (B, T).
    Returns:
        ``loss`` (B,) and its terms ``pg_loss``, ``v_loss``, ``kl_loss`` (B,), with ``approx_kl`` and ``clipfrac``
        (:func:`policy_loss`).
    """
    pg = policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef)
    v_loss = value_loss(values, old_values, returns, mask, vf_clip_coef)
    kl_loss = masked_mean(token_kl, mask, dim=1) if token_kl is not None else torch.zeros_like(v_loss)
    return {**pg, "v_loss": v_loss, "kl_loss": kl_loss,
            "loss": pg["pg_loss"] + vf_coef * v_loss + kl_loss_coef * kl_loss}


def whitening_std(white_stats: torch.Tensor) -> float:
    """The scale :func:`whiten` divided by, sqrt(variance + 1e-8), from its ``return_stats`` (count, mean, var)."""
    return math.sqrt(float(white_stats[2]) + WHITEN_EPS)


def kl_loss_coef(kl_penalty: str, kl_coef: float, adv_std: float) -> float:
    """The weight of :func:`ppo_loss`'s ``kl_loss`` under each ``--kl_penalty``: ``full``, kl_coef / adv_std (the
    policy term's scale: the advantages are divided by ``adv_std``, :func:`whitening_std`; 1 without whitening);
    ``loss``, kl_coef itself; ``sampled``, 0 (the sampled log-ratio's gradient is all in the rewards)."""
    return {"full": kl_coef / adv_std, "loss": kl_coef, "sampled": 0.0}[kl_penalty]


class AdaptiveKLController:
    """Adaptive KL coefficient: Ziegler et al.'s controller (Sec. 2.2, 2019; TRL's) with a proportional term.

    Ziegler et al. integrate the clipped relative error e = clip(KL / target - 1, -0.2, 0.2) into the coefficient,
    base <- base * (1 + K * e) with K = n_steps / horizon. PPO's KL answers its coefficient only over tens of
    iterations, so that integral alone overshoots and oscillates (docs/ppo_kl_control.md: from target 2, the KL
    swung between 1.3 and 3.5 nats at horizon 32; at 128 it is too slow to stop a rising KL). ``damping`` adds a
    proportional term on the log coefficient, kl_coef = base * exp(damping * e): it answers the error at once and
    damps the loop (PI control; 0 is Ziegler et al.'s).

    ``hold=True`` keeps the coefficient at its start until the KL first reaches the target (conditional
    integration, the usual anti-windup): integrating the error of PPO's slow rise would wind the coefficient far
    below the one that holds the target, and the KL would then overshoot it. Start below the coefficient that
    holds the target, so that the KL gets there."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int, hold: bool = False, damping: float = 0.0):
        self.value = self.base = init_kl_coef
        self.target, self.horizon, self.damping = target, horizon, damping
        self.reached = not hold  # whether the update runs (always without the hold)

    def update(self, current_kl: float, n_steps: int) -> None:
        self.reached = self.reached or current_kl >= self.target
        if not self.reached:
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.base *= 1 + error * n_steps / self.horizon
        self.value = self.base * math.exp(self.damping * error)

    def state_dict(self) -> dict:
        return {"value": self.value, "base": self.base, "reached": self.reached}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.reached = d["value"], d.get("reached", self.reached)
        self.base = d.get("base", self.value)


class FixedKLController:
    """A constant KL coefficient (``--target_kl`` unset): the same interface, and ``update`` changes nothing."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = d["value"]


def kl_controller(init_kl_coef: float, target: float | None, horizon: int, hold: bool = False, damping: float = 0.0):
    """The fixed controller when ``target`` is None, else the adaptive one (``hold``, ``damping``: its docstring)."""
    return (FixedKLController(init_kl_coef) if target is None
            else AdaptiveKLController(init_kl_coef, target, horizon, hold, damping))


def sampling_logp_gap(sampled_logps: list[list[float]], logprobs: torch.Tensor) -> float:
    """Mean over rollouts of the summed log-probs the tokens were sampled with minus those recomputed for the KL
    term, ``logprobs`` (B, T), zero on padding. Under bf16 autocast the two passes differ; the gap is the bias of
    the KL penalty (0 up to float rounding in fp32)."""
    return float(np.mean([math.fsum(g) for g in sampled_logps]) - logprobs.sum(1).mean().item())
