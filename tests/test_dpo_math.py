"""Exact checks of the DPO math (no model)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_utils import concatenated_batch, dpo_loss, sequence_logps


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


def test_cdpo_with_zero_smoothing_equals_sigmoid():
    args = _logps()
    a, _, _ = dpo_loss(*args, beta=0.3)
    b, _, _ = dpo_loss(*args, beta=0.3, label_smoothing=0.0)
    assert torch.equal(a, b)
    c, _, _ = dpo_loss(*args, beta=0.3, label_smoothing=0.2)
    assert not torch.allclose(a, c)


def test_ipo_matches_its_formula():
    pc, pr, rc, rr = _logps()
    beta = 0.25
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(losses, (h - 1 / (2 * beta)) ** 2)


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


def test_sequence_logps_counts_only_masked_tokens_with_one_token_shift():
    V = 5
    logits = torch.randn(1, 4, V)
    labels = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])  # prompt of 2 tokens, response of 2
    lp = logits.log_softmax(-1)
    expected = lp[0, 1, 3] + lp[0, 2, 4]  # position t predicts token t+1
    assert torch.allclose(sequence_logps(logits, labels, mask), expected.unsqueeze(0))


def test_concatenated_batch_layout():
    pairs = [{"prompt": [1, 2], "chosen": [3, 4, 5], "rejected": [6]},
             {"prompt": [7], "chosen": [8], "rejected": [9, 10]}]
    b = concatenated_batch(pairs, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert b["attention_mask"].sum(1).tolist() == [5, 2, 3, 3]
