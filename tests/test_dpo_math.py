"""Exact checks of the DPO math (no model)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_utils import dpo_loss
from modeling.batching import concatenated_batch
from modeling.logprobs import selective_log_softmax


def _logps(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g) * 40 + 5) for _ in range(4)]


def test_loss_is_log2_and_rewards_zero_when_policy_equals_reference():
    pc, pr, _, _ = _logps()
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert torch.count_nonzero(cr) == 0 and torch.count_nonzero(rr) == 0


def test_swapping_chosen_and_rejected_flips_the_margin():
    pc, pr, rc, rr = _logps()
    _, c1, r1 = dpo_loss(pc, pr, rc, rr, beta=0.5)
    _, c2, r2 = dpo_loss(pr, pc, rr, rc, beta=0.5)
    assert torch.allclose(c1 - r1, -(c2 - r2))


def test_gradient_raises_chosen_and_lowers_rejected():
    pc, pr, rc, rr = _logps()
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all()  # descending the loss increases log pi(y_w|x)
    assert (pr.grad > 0).all()  # ... and decreases log pi(y_l|x)


def test_cdpo_with_zero_smoothing_is_the_plain_dpo_loss_and_smoothing_mixes_in_the_flipped_label():
    pc, pr, rc, rr = _logps()
    beta = 0.3
    logits = beta * ((pc - rc) - (pr - rr)).double()
    plain = torch.log1p(torch.exp(-logits))  # -log sigma(x), written independently of dpo_loss
    zero, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.0)
    assert torch.allclose(zero.double(), plain, atol=1e-5)
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2)
    assert torch.allclose(smooth.double(), 0.8 * plain + 0.2 * torch.log1p(torch.exp(logits)), atol=1e-5)


def test_ipo_hand_computed_example():
    # log-ratios: chosen +2, rejected -1 -> h = 3 (summed over tokens, not averaged); beta 0.25 -> target
    # 1 / (2 * 0.25) = 2 -> loss (3 - 2)^2 = 1. With beta 1: target 0.5 -> 2.5^2 = 6.25.
    args = torch.tensor([-10.0]), torch.tensor([-13.0]), torch.tensor([-12.0]), torch.tensor([-12.0])
    assert dpo_loss(*args, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(1.0)
    assert dpo_loss(*args, beta=1.0, loss_type="ipo")[0].item() == pytest.approx(6.25)
    # at the target the loss is 0, and its gradient pushes h towards the target from either side
    at_target = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-12.0]), torch.tensor([-12.0]),
                         beta=0.25, loss_type="ipo")[0]
    assert at_target.item() == pytest.approx(0.0)


def test_hand_computed_example():
    # log-ratios: chosen +2, rejected -1 -> h = 3; beta 0.5 -> loss = -log sigmoid(1.5)
    losses, cr, rr = dpo_loss(torch.tensor([-10.0]), torch.tensor([-13.0]), torch.tensor([-12.0]),
                              torch.tensor([-12.0]), beta=0.5)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))), rel=1e-6)
    assert cr.item() == pytest.approx(1.0) and rr.item() == pytest.approx(-0.5)
    smoothed, _, _ = dpo_loss(torch.tensor([-10.0]), torch.tensor([-13.0]), torch.tensor([-12.0]),
                              torch.tensor([-12.0]), beta=0.5, label_smoothing=0.1)
    expected = -0.9 * F.logsigmoid(torch.tensor(1.5)) - 0.1 * F.logsigmoid(torch.tensor(-1.5))
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*_logps(), beta=0.1, loss_type="hinge-ish")


def test_selective_log_softmax_equals_log_softmax_then_gather_and_is_fp32():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g) * 20).to(torch.bfloat16)
    index = torch.randint(0, 11, (3, 7), generator=g)
    expected = logits.float().log_softmax(-1).gather(-1, index[..., None]).squeeze(-1)
    out = selective_log_softmax(logits, index)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)


def test_concatenated_batch_layout():
    pairs = [{"prompt": [1, 2], "chosen": [3, 4, 5], "rejected": [6]},
             {"prompt": [7], "chosen": [8], "rejected": [9, 10]}]
    b = concatenated_batch(pairs, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert b["attention_mask"].sum(1).tolist() == [5, 2, 3, 3]
