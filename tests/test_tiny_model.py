"""Checks with a tiny randomly initialised GPT-2 (seconds, no data files)."""

import pytest
import torch
from conftest import summed_response_logps as response_logps

from dpo_utils import concatenated_forward, dpo_loss
from eval_utils import generate
from modeling.batching import concatenated_batch, rollout_batch
from modeling.logprobs import ResponseLogProbs
from modeling.models import weights_fingerprint
from ppo_utils import gae, kl_penalized_rewards, policy_loss, value_loss, whiten
from train_dpo import reference_logps
from train_ppo import response_logps_values

PAIRS = [{"prompt": [5, 6, 7], "chosen": [8, 9, 10, 11], "rejected": [12, 13]},
         {"prompt": [20, 21], "chosen": [22, 23], "rejected": [24, 25, 26, 27, 28]},
         {"prompt": [30, 31, 32, 33], "chosen": [34], "rejected": [35, 36]}]


def test_summed_response_logps_equal_model_loss_times_response_tokens(tiny_lm):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out = tiny_lm(input_ids=ids, labels=ids.masked_fill(mask == 0, -100))
        ours, _ = ResponseLogProbs(tiny_lm)(ids, torch.ones_like(ids), mask)
    # the model's loss is the mean NLL over the 4 response tokens
    assert torch.allclose(ours.sum(-1), -out.loss * 4, atol=1e-5)


def test_lean_head_equals_full_vocabulary_log_softmax_and_its_gradient(tiny_lm):
    """The response-only head with a selective log-softmax against the plain recipe: full logits, full
    log_softmax, gather, mask -- values and gradients."""
    b = concatenated_batch(PAIRS, pad_id=0)
    lean = ResponseLogProbs(tiny_lm)(b["input_ids"], b["attention_mask"], b["response_mask"])[0].sum(-1)
    grad_lean = torch.autograd.grad(lean.sum(), list(tiny_lm.parameters()))
    logits = tiny_lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    full = torch.gather(logits.log_softmax(-1), 2, b["input_ids"][:, 1:, None]).squeeze(2)
    full = (full * b["response_mask"][:, 1:]).sum(-1)
    grad_full = torch.autograd.grad(full.sum(), list(tiny_lm.parameters()))
    assert torch.allclose(lean, full, atol=1e-5)
    assert all(torch.allclose(a, f, atol=1e-5) for a, f in zip(grad_lean, grad_full))


def test_padding_and_prompt_tokens_do_not_change_logps(tiny_lm):
    b = concatenated_batch(PAIRS, pad_id=0)
    model = ResponseLogProbs(tiny_lm)
    with torch.no_grad():
        chosen, rejected = concatenated_forward(model, b)
        for i, p in enumerate(PAIRS):
            alone = concatenated_batch([p], pad_id=0)  # no padding at all
            c, r = concatenated_forward(model, alone)
            assert torch.allclose(c, chosen[i:i + 1], atol=1e-5) and torch.allclose(r, rejected[i:i + 1], atol=1e-5)
        # the same completion after a different prompt changes the value (the prompt is conditioned on) ...
        other = concatenated_forward(model, concatenated_batch([{**PAIRS[0], "prompt": [1, 2, 3]}], 0))[0]
        assert not torch.allclose(other, chosen[:1])


def test_one_dpo_step_changes_parameters_and_lowers_loss(tiny_lm):
    b = concatenated_batch(PAIRS, pad_id=0)
    model = ResponseLogProbs(tiny_lm)
    with torch.no_grad():
        ref_c, ref_r = concatenated_forward(model, b)
    before = [p.detach().clone() for p in tiny_lm.parameters()]
    opt = torch.optim.AdamW(tiny_lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        c, r = concatenated_forward(model, b)
        loss = dpo_loss(c, r, ref_c, ref_r, beta=0.1)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - 0.6931) < 1e-3
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, tiny_lm.parameters()))


def test_cached_reference_logps_equal_a_fresh_forward(tiny_lm, tmp_path):
    model = ResponseLogProbs(tiny_lm)
    w = weights_fingerprint(tiny_lm)
    c1, r1, cached1 = reference_logps(model, PAIRS, 0, 2, "cpu", tmp_path, w)
    assert len(list(tmp_path.glob("ref_logps-*.pt"))) == 1
    c2, r2, cached2 = reference_logps(model, PAIRS, 0, 2, "cpu", tmp_path, w)  # from the cache
    with torch.no_grad():
        fc, fr = concatenated_forward(model, concatenated_batch(PAIRS, 0))
    assert (cached1, cached2) == (False, True)
    assert torch.equal(c1, c2) and torch.equal(r1, r2)
    assert torch.allclose(c1, fc, atol=1e-5) and torch.allclose(r1, fr, atol=1e-5)


def test_reference_cache_is_rebuilt_when_the_weights_change_at_the_same_path(tiny_lm, tmp_path):
    """A model retrained in place keeps its path: the cache must follow the weights, not the name."""
    from modeling.models import load_causal_lm

    path, cache = tmp_path / "model", tmp_path / "cache"
    tiny_lm.save_pretrained(path)
    first = load_causal_lm(str(path))
    c1, _, _ = reference_logps(ResponseLogProbs(first), PAIRS, 0, 2, "cpu", cache, weights_fingerprint(first))
    with torch.no_grad():
        tiny_lm.transformer.ln_f.bias.add_(0.5)  # "retrain" it ...
    tiny_lm.save_pretrained(path)  # ... and save it where it was
    retrained = ResponseLogProbs(load_causal_lm(str(path)))
    c2, _, cached = reference_logps(retrained, PAIRS, 0, 2, "cpu", cache, weights_fingerprint(retrained.lm))
    with torch.no_grad():
        fresh, _ = concatenated_forward(retrained, concatenated_batch(PAIRS, 0))
    assert not cached and len(list(cache.glob("ref_logps-*.pt"))) == 2
    assert not torch.allclose(c1, c2) and torch.allclose(c2, fresh, atol=1e-5)


def test_rollout_layout_logps_match_right_padded_scoring(tiny_lm, tiny_tokenizer):
    prompts = [[5, 6], [7, 8, 9, 10, 11], [12]]
    responses = [[13, 14, 15], [16], [17, 18]]
    b = rollout_batch(prompts, responses, pad_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        lp, _ = response_logps_values(ResponseLogProbs(tiny_lm), b)
        summed = response_logps(tiny_lm, prompts, responses, tiny_tokenizer.pad_token_id, 8, "cpu")
    assert torch.allclose((lp * b["response_mask"]).sum(1), summed, atol=1e-4)


def test_generation_is_seeded_and_continues_the_prompt(tiny_lm, tiny_tokenizer):
    prompts = [[5, 6], [7, 8, 9]]
    a = generate(tiny_lm, tiny_tokenizer, prompts, 6, 1.0, seed=1, batch_size=2, device="cpu")
    b = generate(tiny_lm, tiny_tokenizer, prompts, 6, 1.0, seed=1, batch_size=2, device="cpu")
    c = generate(tiny_lm, tiny_tokenizer, prompts, 6, 1.0, seed=2, batch_size=2, device="cpu")
    assert a == b and a != c
    assert all(1 <= len(r) <= 6 for r in a)
    state = torch.get_rng_state()
    generate(tiny_lm, tiny_tokenizer, prompts, 6, 1.0, seed=1, batch_size=2, device="cpu")
    assert torch.equal(state, torch.get_rng_state())  # evaluation never disturbs the training RNG


def test_value_head_shape_and_one_ppo_update_changes_the_policy(tiny_lm):
    policy = ResponseLogProbs(tiny_lm, value_head=True)
    prompts, responses = [[5, 6], [7, 8, 9]], [[10, 11, 12], [13]]
    b = rollout_batch(prompts, responses, pad_id=0)
    mask = b["response_mask"].float()
    with torch.no_grad():
        old_lp, old_v = response_logps_values(policy, b)
    assert old_lp.shape == (2, 3) and old_v.shape == (2, 3)
    rewards = kl_penalized_rewards(torch.tensor([1.0, -1.0]), (old_lp - old_lp) * mask, mask, 0.1)
    adv, ret = gae(rewards, old_v * mask, mask, 1.0, 0.95)
    adv = whiten(adv, mask)
    before = [p.detach().clone() for p in policy.lm.parameters()]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    new_lp, new_v = response_logps_values(policy, b)
    loss = (policy_loss(new_lp, old_lp, adv, mask, 0.2)["pg_loss"].mean()
            + 0.1 * value_loss(new_v, old_v, ret, mask, 0.2).mean())
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.lm.parameters()))
    with torch.no_grad():
        after, _ = response_logps_values(policy, b)
    # the first rollout had the higher score: its tokens became more likely
    assert ((after - old_lp) * mask)[0].sum() > ((after - old_lp) * mask)[1].sum()


def test_reference_cache_is_kept_apart_per_precision(tiny_lm, tmp_path):
    model, w = ResponseLogProbs(tiny_lm), weights_fingerprint(tiny_lm)
    c32, _, _ = reference_logps(model, PAIRS, 0, 2, "cpu", tmp_path, w, torch.float32)
    c16, _, cached = reference_logps(model, PAIRS, 0, 2, "cpu", tmp_path, w, torch.bfloat16)
    assert not cached and len(list(tmp_path.glob("ref_logps-*.pt"))) == 2
    assert c16.dtype == torch.float32 and not torch.equal(c16, c32)  # bf16 forward, fp32 sums
    assert torch.allclose(c16, c32, atol=0.5)


def test_exact_kl_head_agrees_with_the_plain_head_and_is_zero_against_itself(tiny_lm):
    import copy

    from train_ppo import reference_pass, response_logps_values_kl

    policy = ResponseLogProbs(tiny_lm, value_head=True)
    b = rollout_batch([[5, 6], [7, 8, 9]], [[10, 11, 12], [13]], pad_id=0)
    lp, v = response_logps_values(policy, b)
    with torch.no_grad():
        ref_lp, ref_vocab = reference_pass(ResponseLogProbs(copy.deepcopy(tiny_lm)), b, vocab=True)
    lp2, v2, kl = response_logps_values_kl(policy, b, ref_vocab)
    assert torch.equal(lp, lp2) and torch.equal(v, v2)  # the sampled tokens' log-probs exactly as without it
    assert torch.equal(ref_lp, lp) and kl.shape == lp.shape and (kl == 0).all()
    other = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        other.transformer.wte.weight.add_(0.5 * torch.randn_like(other.transformer.wte.weight))
        _, other_vocab = reference_pass(ResponseLogProbs(other), b, vocab=True)
    _, _, kl = response_logps_values_kl(policy, b, other_vocab)
    mask = b["response_mask"].bool()
    assert (kl[mask] > 0).all() and (kl[~mask] == 0).all()


def test_a_minibatch_reads_its_own_states_from_the_batch_reference_pass(tiny_lm):
    """The reference's vocabulary log-probs are computed once per rollout batch and read per minibatch through
    state_rows: for rows in any order the KL equals the KL against a reference pass over the minibatch itself."""
    import copy

    from train_ppo import reference_pass, response_logps_values_kl, state_rows

    torch.manual_seed(0)
    policy = ResponseLogProbs(tiny_lm, value_head=True)
    other = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        other.transformer.wte.weight.add_(0.5 * torch.randn_like(other.transformer.wte.weight))
    ref = ResponseLogProbs(other)
    b = rollout_batch([[5, 6], [7, 8, 9], [14], [15, 16]], [[10, 11, 12], [13], [17, 18, 19, 20], [21, 22]], pad_id=0)
    with torch.no_grad():
        _, ref_vocab = reference_pass(ref, b, vocab=True)
    rows = state_rows(b)
    assert int((rows >= 0).sum()) == ref_vocab.shape[0] == 10  # one row per response token
    mb_idx = torch.tensor([3, 0, 2])
    mb = {k: (v[mb_idx] if torch.is_tensor(v) else v) for k, v in b.items()}
    mb_rows = rows[mb_idx]
    _, _, kl = response_logps_values_kl(policy, mb, ref_vocab[mb_rows[mb_rows >= 0]])
    with torch.no_grad():
        _, own_vocab = reference_pass(ref, mb, vocab=True)
    _, _, kl_own = response_logps_values_kl(policy, mb, own_vocab)
    assert (kl[mb["response_mask"].bool()] > 0).all()
    assert torch.allclose(kl, kl_own, atol=1e-6)


@pytest.mark.parametrize("kl_penalty", ["full", "sampled", "loss"])
def test_the_rewards_ppo_builds_are_minus_beta_kl_per_token_plus_the_score_at_the_end(tiny_lm, kl_penalty):
    """The trainer's rollout pass and rewards (train_ppo.rollout_pass, ppo_utils.kl_penalized_rewards) against an
    oracle that runs each prompt + response alone through the plain LM and takes the whole vocabulary's
    log-softmax: -beta x the exact KL at the state that emitted each token (or the sampled token's log-ratio), the
    score added on the last token; the loss variant's rewards are the score alone."""
    import copy

    from train_ppo import rollout_pass

    torch.manual_seed(1)
    other = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        other.transformer.wte.weight.add_(0.3 * torch.randn_like(other.transformer.wte.weight))
    prompts, responses = [[5, 6], [7, 8, 9], [14]], [[10, 11, 12], [13], [17, 18, 19, 20]]
    b = rollout_batch(prompts, responses, pad_id=0)
    mask = b["response_mask"].float()
    scores, beta = torch.tensor([0.5, -1.0, 2.0]), 0.3
    with torch.no_grad():
        _, _, _, kl = rollout_pass(ResponseLogProbs(tiny_lm, value_head=True), ResponseLogProbs(other), b, kl_penalty)
        rewards = kl_penalized_rewards(scores, kl, mask, 0.0 if kl_penalty == "loss" else beta)
        expected = torch.zeros_like(rewards)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            pi, ref = tiny_lm(ids).logits[0].log_softmax(-1), other(ids).logits[0].log_softmax(-1)
            for t, token in enumerate(r):
                state = len(p) + t - 1  # the position whose next-token distribution emitted r[t]
                exact = (pi[state].exp() * (pi[state] - ref[state])).sum()
                sampled = pi[state, token] - ref[state, token]
                k = sampled if kl_penalty == "sampled" else exact
                expected[i, t] = 0.0 if kl_penalty == "loss" else -beta * k
            expected[i, len(r) - 1] += scores[i]
    assert (expected[mask == 0] == 0).all() and expected.abs().max() > 0.5
    assert torch.allclose(rewards, expected, atol=1e-5)
    if kl_penalty != "loss":
        assert (kl[mask.bool()] != 0).all()  # the KL part is there to check


def test_lm_fitting_skips_a_non_finite_step_and_stops_after_five(tiny_lm):
    """The offline builders' loop (lm_fitting.fit_causal_lm) has the non-finite guard: a NaN step leaves the
    weights untouched (the run goes on), five in a row stop it with one line naming the rate's flag."""
    import copy

    import numpy as np
    import pytest

    from modeling.lm_fitting import fit_causal_lm
    from runtime.run_log import StopTraining

    ids = [list(range(5, 25)), list(range(30, 50))] * 4
    kw = dict(batch_size=4, seq_len=12, lr=1e-2, pad_id=0, dtype=torch.float32, desc="fit")

    def fitted(steps, nan_steps=()):
        model = copy.deepcopy(tiny_lm)
        torch.manual_seed(0)  # the same dropout masks in every call
        fit_causal_lm(model, ids, steps=steps, rng=np.random.default_rng(0), nan_steps=nan_steps, **kw)
        return model.state_dict()

    one, skipped = fitted(1), fitted(2, nan_steps={2})
    assert all(torch.equal(one[k], skipped[k]) for k in one)  # step 2 changed nothing
    assert not all(torch.equal(one[k], fitted(2)[k]) for k in one)  # while a finite step 2 does
    with pytest.raises(StopTraining, match="5 consecutive steps had a non-finite loss.*lower --lm_lr") as e:
        fitted(8, nan_steps={3, 4, 5, 6, 7})
    assert e.value.code == 1 and "last at step 7" in str(e.value)
