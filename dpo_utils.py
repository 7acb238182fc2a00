"""DPO math: pure functions of tensors, per-example outputs (after the reference implementation's
``preference_loss``), and the forward pass that feeds them (batches come from ``batching.concatenated_batch``).

Notation (arXiv:2305.18290): x prompt, y_w chosen (winner), y_l rejected (loser), pi policy, ref reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-example DPO loss and implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) log pi(y_w|x), log pi(y_l|x).
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference.
        beta: KL-constraint temperature.
        loss_type: ``"sigmoid"`` (DPO, Eq. 7) or ``"ipo"`` (Azar et al., 2023, arXiv:2310.12036, Eq. 17).
        label_smoothing: epsilon of conservative DPO (cDPO): the probability that a label is flipped.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,). Rewards are beta * (policy - reference)
        log-ratios (Eq. 5, the implicit reward up to the partition function), detached: they are for logging.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    h = pi_logratios - ref_logratios  # the difference of the two log-ratios inside Eq. 7
    if loss_type == "sigmoid":
        # Eq. 7, arXiv:2305.18290: -log sigma(beta * h); with eps > 0 the label-flip mixture (cDPO).
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        # Eq. 17, arXiv:2310.12036: regress h onto 1 / (2 beta) (tau = beta); no sigmoid saturation.
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def concatenated_forward(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over chosen and rejected together (half the kernel launches of two passes).

    Args:
        model: a :class:`logprobs.ResponseLogProbs` around the policy or the reference.
        batch: from :func:`batching.concatenated_batch`.
    Returns:
        (policy_chosen_logps, policy_rejected_logps), each (B,): sum over response tokens of log p, in fp32.
    """
    token_logps, _ = model(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    logps = token_logps.sum(-1)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]
