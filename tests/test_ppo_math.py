"""Exact checks of the PPO math (no model)."""

import pytest
import torch

from ppo_utils import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
    whiten,
)


def _naive_gae(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


def _mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def test_gae_matches_a_naive_backwards_loop_with_masks():
    g = torch.Generator().manual_seed(0)
    lengths, T = [7, 3, 1, 5], 7
    rewards, values = torch.randn(4, T, generator=g), torch.randn(4, T, generator=g)
    mask = _mask(lengths, T)
    adv, ret = gae(rewards, values, mask, gamma=0.9, gae_lambda=0.8)
    expected = _naive_gae(rewards, values, lengths, 0.9, 0.8)
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-5)
    assert (adv[mask == 0] == 0).all()


def test_gae_with_unit_gamma_lambda_and_zero_values_is_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    mask = _mask([3, 2], 4)
    adv, _ = gae(rewards, torch.zeros(2, 4), mask, gamma=1.0, gae_lambda=1.0)
    assert adv.tolist() == [[6.0, 5.0, 3.0, 0.0], [9.0, 5.0, 0.0, 0.0]]


def test_score_lands_on_the_last_response_token_and_kl_is_penalised():
    kl = torch.tensor([[0.5, 0.0, -0.5], [0.3, 7.0, 7.0]])  # the second row's padding must not count
    mask = _mask([3, 1], 3)
    rewards = kl_penalized_rewards(torch.tensor([10.0, 20.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 10.05], [19.97, 0.0, 0.0]]))


def test_clipped_policy_loss_at_and_beyond_the_clip_range():
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    eps = 0.2
    # ratios 1.0, 1.1 (inside), 1.5 (beyond) with positive advantage: the gain is capped at 1 + eps.
    new = torch.log(torch.tensor([[1.0, 1.1, 1.5]]))
    adv = torch.ones(1, 3)
    out = policy_loss(new, old, adv, mask, eps)
    assert out["pg_loss"].item() == pytest.approx(-(1.0 + 1.1 + 1.2) / 3, rel=1e-6)
    assert out["clipfrac"].item() == pytest.approx(1 / 3)
    # negative advantage: the pessimistic max keeps the unclipped 1.5 ratio's loss.
    out = policy_loss(new, old, -adv, mask, eps)
    assert out["pg_loss"].item() == pytest.approx((1.0 + 1.1 + 1.5) / 3, rel=1e-6)
    # exactly at the edge both branches agree
    edge = policy_loss(torch.log(torch.tensor([[0.8]])), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), eps)
    assert edge["pg_loss"].item() == pytest.approx(-0.8, rel=1e-6)
    ratio = torch.tensor([1.0, 1.1, 1.5])
    assert out["approx_kl"].item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item(), rel=1e-5)


def test_clipped_value_loss_matches_formula():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[0.1, 1.0]])  # second is beyond the 0.2 clip
    returns = torch.tensor([[0.5, 0.5]])
    loss = value_loss(values, old, returns, torch.ones(1, 2), vf_clip_coef=0.2)
    expected = 0.5 * (max(0.4 ** 2, 0.4 ** 2) + max(0.5 ** 2, 0.3 ** 2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_whiten_zero_mean_unit_variance_on_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert (w[0, :3] ** 2).mean().item() == pytest.approx(1.0, rel=1e-4)
    assert w[0, 3].item() == 0.0


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # above target: raise
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    high = ctl.value
    ctl.update(1.0, n_steps=10)  # below target: lower
    assert ctl.value < high
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3


def test_held_kl_controller_waits_for_the_target_then_adapts_both_ways_and_resumes_its_state():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100, hold=True)
    for kl in (0.5, 2.0, 5.9):  # the rise: a KL below the target does not lower the coefficient yet
        ctl.update(kl, n_steps=10)
    assert ctl.value == 0.1 and not ctl.reached
    ctl.update(7.2, n_steps=10)  # reached: from here the usual update, up ...
    assert ctl.reached and ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl.update(3.0, n_steps=10)  # ... and down, even after the KL falls below the target again
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1) * (1 - 0.2 * 0.1))
    resumed = AdaptiveKLController(0.5, target=6.0, horizon=100, hold=True)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.reached and resumed.value == ctl.value
    unheld = AdaptiveKLController(0.1, target=6.0, horizon=100)  # Ziegler et al.: lowers it from the start
    unheld.update(0.5, n_steps=10)
    assert unheld.value < 0.1


def test_the_controllers_proportional_term_answers_the_error_at_once_and_leaves_the_integral_as_ziegler_s():
    import math

    pi = AdaptiveKLController(0.1, target=4.0, horizon=64, hold=True, damping=4.0)
    ziegler = AdaptiveKLController(0.1, target=4.0, horizon=64, hold=True)
    pi.update(1.0, n_steps=64)
    assert pi.value == 0.1  # held below the target
    for kl in (4.4, 4.4, 3.0, 4.0):
        pi.update(kl, n_steps=64)
        ziegler.update(kl, n_steps=64)
        error = min(max(kl / 4.0 - 1, -0.2), 0.2)
        assert pi.base == pytest.approx(ziegler.value)  # the integral is Ziegler et al.'s update
        assert pi.value == pytest.approx(ziegler.value * math.exp(4.0 * error))
    assert pi.value == pytest.approx(pi.base)  # on target: the proportional term is 1
    resumed = AdaptiveKLController(0.7, target=4.0, horizon=64, damping=4.0)
    resumed.load_state_dict(pi.state_dict())
    assert (resumed.value, resumed.base, resumed.reached) == (pi.value, pi.base, pi.reached)


def test_whiten_over_process_shares_equals_whitening_the_global_batch():
    """Each process whitens its share with the global batch's mean and variance (sums over processes)."""
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(6, 5, generator=g) * 3 + 1, (torch.rand(6, 5, generator=g) > 0.3).float()
    shares = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    sums = [torch.stack([m.sum(), (s * m).sum(), (s * s * m).sum()]) for s, m in shares]
    total = sum(sums)
    assert torch.allclose(torch.cat([whiten(s, m, sum_over_processes=lambda t: total) for s, m in shares]),
                          whiten(x, mask), atol=1e-5)
    assert not torch.allclose(whiten(*shares[0]), whiten(x, mask)[:3], atol=1e-3)  # a share's own stats differ


def test_whiten_of_nearly_constant_advantages_is_finite():
    """One-pass variance E[x^2] - mean^2 rounds below 0 for values like these (by more than the 1e-8 that
    rsqrt is guarded with); the clamp keeps the result finite."""
    x = torch.full((4, 8), 1000.1)  # float32: E[x^2] - mean^2 = -0.125
    m = torch.ones_like(x)
    mean = x.sum() / m.sum()
    assert (x * x).sum() / m.sum() - mean ** 2 < -1e-8  # the rounding this test is about
    out = whiten(x, m)
    assert torch.isfinite(out).all()


def test_exact_kl_is_the_kl_of_the_two_distributions_and_zero_at_the_reference():
    from ppo_utils import exact_kl

    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    expected = torch.nn.functional.kl_div(ref_logp, logp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(exact_kl(logp, ref_logp), expected, atol=1e-6)
    assert (exact_kl(logp, ref_logp) > 0).all() and exact_kl(logp, logp).abs().max() == 0
    # the sampled log-ratio (k1) is an unbiased estimate of it: its mean over many draws agrees
    torch.manual_seed(0)
    draws = torch.distributions.Categorical(logits=logp[0]).sample((200_000,))
    k1 = (logp[0, draws] - ref_logp[0, draws]).mean()
    assert k1.item() == pytest.approx(exact_kl(logp, ref_logp)[0].item(), abs=0.02)


def test_exact_kl_has_the_gradient_of_the_kl_and_none_at_the_reference():
    from ppo_utils import exact_kl

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, generator=g, requires_grad=True)
    ref_logp = torch.randn(3, 7, generator=g).log_softmax(-1)
    exact_kl(logits.log_softmax(-1), ref_logp).sum().backward()
    p = logits.detach().softmax(-1)
    d = p.log() - ref_logp
    expected = p * (d - (p * d).sum(-1, keepdim=True))  # d KL / d logits
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    at_ref = ref_logp.clone().requires_grad_(True)
    exact_kl(at_ref.log_softmax(-1), at_ref.detach().log_softmax(-1)).sum().backward()
    assert (at_ref.grad == 0).all()  # exactly: nothing moves a policy that equals the reference


def _toy_first_update(kl_penalty: str, beta: float, seed: int, kl_loss: bool = True):
    """A toy policy whose every response can be listed: 3 tokens, responses of 2, a table of logits per state
    (the first state, and one per first token). Returns (the gradient of PPO's expected first update, whitening
    off, gamma = lambda = 1, a zero value: the loss of each response weighted by its probability; the autograd
    gradient of E[score] - beta * KL(pi || pi_ref) of the whole response; T)."""
    import itertools

    from ppo_utils import exact_kl, kl_loss_coef, ppo_loss

    g = torch.Generator().manual_seed(seed)
    V, T = 3, 2
    theta = torch.randn(1 + V, V, generator=g, dtype=torch.float64).requires_grad_()
    ref_logits = torch.randn(1 + V, V, generator=g, dtype=torch.float64)
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (S, T): all 9 responses
    scores = torch.randn(len(seqs), generator=g, dtype=torch.float64)
    states = torch.stack([torch.zeros(len(seqs), dtype=torch.long), 1 + seqs[:, 0]], 1)  # (S, T) state ids
    vocab = theta.log_softmax(-1)[states]  # (S, T, V)
    ref_vocab = ref_logits.log_softmax(-1)[states]
    logp = vocab.gather(-1, seqs[..., None])[..., 0]  # (S, T)
    ref_logp = ref_vocab.gather(-1, seqs[..., None])[..., 0]
    prob = logp.sum(1).exp()  # pi(y), sums to 1 over the list

    objective = (prob * (scores - beta * (logp - ref_logp).sum(1))).sum()
    (grad_objective,) = torch.autograd.grad(objective, theta, retain_graph=True)

    mask = torch.ones(len(seqs), T, dtype=torch.float64)
    token_kl = exact_kl(vocab.reshape(-1, V), ref_vocab.reshape(-1, V)).reshape(len(seqs), T)
    kl = (logp - ref_logp).detach() if kl_penalty == "sampled" else token_kl.detach()
    rewards = kl_penalized_rewards(scores, kl, mask, 0.0 if kl_penalty == "loss" else beta)
    zero = torch.zeros_like(mask)
    advantages, returns = gae(rewards, zero, mask, gamma=1.0, gae_lambda=1.0)
    out = ppo_loss(logp, logp.detach(), advantages, zero, zero, returns,
                   None if kl_penalty == "sampled" else token_kl, mask, clip_coef=0.2, vf_clip_coef=0.2, vf_coef=0.1,
                   kl_loss_coef=kl_loss_coef(kl_penalty, beta, adv_std=1.0) if kl_loss else 0.0)
    (grad_update,) = torch.autograd.grad((prob.detach() * out["loss"]).sum(), theta)
    return grad_update, grad_objective, T


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kl_penalty", ["full", "sampled"])
def test_ppos_expected_first_update_is_the_gradient_of_score_minus_beta_kl(kl_penalty, seed):
    """Both ways of putting the KL in the reward give, in expectation, a step along the gradient of
    E[score] - beta * KL (the loss's gradient is minus it, over the response length: the policy term is a
    per-token mean)."""
    grad_update, grad_objective, T = _toy_first_update(kl_penalty, beta=0.7, seed=seed)
    assert grad_objective.abs().max() > 0.05  # something to match
    assert torch.allclose(-T * grad_update, grad_objective, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("what", ["full without its loss term", "loss"])
def test_the_kl_as_a_loss_term_alone_or_in_the_reward_alone_is_not_that_gradient(what):
    """The exact KL in the reward credits only the actions before each state; without its direct gradient, or with
    the direct gradient alone (the loss-term variant), the update is not the objective's: the test above can fail."""
    grad_update, grad_objective, T = _toy_first_update("loss" if what == "loss" else "full", beta=0.7, seed=0,
                                                       kl_loss=what == "loss")
    assert (-T * grad_update - grad_objective).abs().max() > 1e-3
    exact_update, *_ = _toy_first_update("full", beta=0.0, seed=0)  # at beta 0 every variant is plain PPO
    assert torch.allclose(-T * exact_update, _toy_first_update("loss", beta=0.0, seed=0)[1], atol=1e-12)


def test_the_kl_loss_weights_put_the_term_on_the_policy_terms_scale():
    from ppo_utils import kl_loss_coef, whitening_std

    stats = torch.tensor([10.0, 0.3, 4.0])  # whiten's (count, mean, variance): it divides by sqrt(4 + 1e-8)
    assert whitening_std(stats) == pytest.approx(2.0)
    assert kl_loss_coef("full", 0.5, whitening_std(stats)) == pytest.approx(0.25)
    assert kl_loss_coef("loss", 0.5, 2.0) == 0.5 and kl_loss_coef("sampled", 0.5, 2.0) == 0.0
    x, m = torch.randn(4, 5), torch.ones(4, 5)
    _, stats = whiten(x, m, return_stats=True)
    assert torch.allclose(whiten(x, m) * whitening_std(stats) + stats[1], x, atol=1e-5)
