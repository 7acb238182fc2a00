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
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out * m, torch.stack([n, mean, var])) if return_stats else out * m


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -kl_coef * (log pi - log pi_ref), plus the sequence score on the last token.

    Eq. 2 of Ziegler et al. 2019: R(x, y) = r(x, y) - kl_coef * log(pi(y|x) / pi_ref(y|x)), spread over
    tokens (the paper's beta; DPO's beta is another quantity).
    Args:
        scores: (B,) reward-model (or judge) score of each full completion.
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens under the rollout policy / reference.
        mask: (B, T) response mask.
    Returns:
        (rewards, kl), each (B, T) and zero on padding; kl is the per-token log-ratio.
    """
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -kl_coef * kl
    # The score belongs to the whole sequence: put it on the last non-padding response token.
    last = (mask.long().sum(1) - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards * m, kl


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


class AdaptiveKLController:
    """Adaptive KL coefficient (Sec. 2.2, Ziegler et al. 2019): kl_coef <- kl_coef * (1 + K * e), where
    e = clip(KL / target - 1, -0.2, 0.2) and K = n_steps / horizon.

    ``hold=True`` keeps the coefficient at its start until the KL first reaches the target (conditional
    integration, the usual anti-windup). PPO's KL takes tens of iterations to rise; integrating the error of that
    rise winds the coefficient far below the one that holds the target, and the KL then overshoots it
    (docs/ppo_kl_control.md: target 6 overshot to 10-11 nats). With the hold, start at or below the coefficient
    that holds the target, so that the KL gets there."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int, hold: bool = False):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon
        self.reached = not hold  # whether the update runs (always without the hold)

    def update(self, current_kl: float, n_steps: int) -> None:
        self.reached = self.reached or current_kl >= self.target
        if not self.reached:
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "reached": self.reached}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.reached = d["value"], d.get("reached", self.reached)


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


def kl_controller(init_kl_coef: float, target: float | None, horizon: int, hold: bool = False):
    """The fixed controller when ``target`` is None, else the adaptive one (``hold``: see its docstring)."""
    return (FixedKLController(init_kl_coef) if target is None
            else AdaptiveKLController(init_kl_coef, target, horizon, hold))


def sampling_logp_gap(sampled_logps: list[list[float]], logprobs: torch.Tensor) -> float:
    """Mean over rollouts of the summed log-probs the tokens were sampled with minus those recomputed for the KL
    term, ``logprobs`` (B, T), zero on padding. Under bf16 autocast the two passes differ; the gap is the bias of
    the KL penalty (0 up to float rounding in fp32)."""
    return float(np.mean([math.fsum(g) for g in sampled_logps]) - logprobs.sum(1).mean().item())
