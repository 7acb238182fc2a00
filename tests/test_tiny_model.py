"""Checks with a tiny randomly initialised GPT-2 (seconds, no data files)."""

import torch

from dpo_utils import concatenated_batch, concatenated_forward, dpo_loss, sequence_logps
from eval_utils import generate, response_logps
from ppo_utils import gae, kl_penalized_rewards, policy_loss, value_loss, whiten
from train_dpo import reference_logps
from train_ppo import PolicyWithValueHead, response_logps_values, rollout_batch

PAIRS = [{"prompt": [5, 6, 7], "chosen": [8, 9, 10, 11], "rejected": [12, 13]},
         {"prompt": [20, 21], "chosen": [22, 23], "rejected": [24, 25, 26, 27, 28]},
         {"prompt": [30, 31, 32, 33], "chosen": [34], "rejected": [35, 36]}]


def test_sequence_logps_equals_model_loss_times_response_tokens(tiny_lm):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out = tiny_lm(input_ids=ids, labels=ids.masked_fill(mask == 0, -100))
        ours = sequence_logps(out.logits, ids, mask)
    # the model's loss is the mean NLL over the 4 response tokens
    assert torch.allclose(ours, -out.loss * 4, atol=1e-5)


def test_padding_and_prompt_tokens_do_not_change_logps(tiny_lm):
    b = concatenated_batch(PAIRS, pad_id=0)
    with torch.no_grad():
        chosen, rejected = concatenated_forward(tiny_lm, b)
        for i, p in enumerate(PAIRS):
            alone = concatenated_batch([p], pad_id=0)  # no padding at all
            c, r = concatenated_forward(tiny_lm, alone)
            assert torch.allclose(c, chosen[i:i + 1], atol=1e-5) and torch.allclose(r, rejected[i:i + 1], atol=1e-5)
        # the same completion after a different prompt changes the value (the prompt is conditioned on) ...
        other = concatenated_forward(tiny_lm, concatenated_batch([{**PAIRS[0], "prompt": [1, 2, 3]}], 0))[0]
        assert not torch.allclose(other, chosen[:1])


def test_one_dpo_step_changes_parameters_and_lowers_loss(tiny_lm):
    b = concatenated_batch(PAIRS, pad_id=0)
    with torch.no_grad():
        ref_c, ref_r = concatenated_forward(tiny_lm, b)
    before = [p.detach().clone() for p in tiny_lm.parameters()]
    opt = torch.optim.AdamW(tiny_lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        c, r = concatenated_forward(tiny_lm, b)
        loss = dpo_loss(c, r, ref_c, ref_r, beta=0.1)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - 0.6931) < 1e-3
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, tiny_lm.parameters()))


def test_cached_reference_logps_equal_a_fresh_forward(tiny_lm, tmp_path):
    c1, r1 = reference_logps(tiny_lm, PAIRS, 0, 2, "cpu", tmp_path, "tiny")
    assert len(list(tmp_path.glob("ref_logps-*.pt"))) == 1
    c2, r2 = reference_logps(tiny_lm, PAIRS, 0, 2, "cpu", tmp_path, "tiny")  # from the cache
    with torch.no_grad():
        fc, fr = concatenated_forward(tiny_lm, concatenated_batch(PAIRS, 0))
    assert torch.equal(c1, c2) and torch.equal(r1, r2)
    assert torch.allclose(c1, fc, atol=1e-5) and torch.allclose(r1, fr, atol=1e-5)


def test_rollout_layout_logps_match_right_padded_scoring(tiny_lm, tiny_tokenizer):
    prompts = [[5, 6], [7, 8, 9, 10, 11], [12]]
    responses = [[13, 14, 15], [16], [17, 18]]
    b = rollout_batch(prompts, responses, pad_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        lp, _ = response_logps_values(tiny_lm, b)
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
    policy = PolicyWithValueHead(tiny_lm)
    prompts, responses = [[5, 6], [7, 8, 9]], [[10, 11, 12], [13]]
    b = rollout_batch(prompts, responses, pad_id=0)
    mask = b["response_mask"].float()
    with torch.no_grad():
        old_lp, old_v = response_logps_values(policy, b)
    assert old_lp.shape == (2, 3) and old_v.shape == (2, 3)
    rewards, _ = kl_penalized_rewards(torch.tensor([1.0, -1.0]), old_lp, old_lp, mask, 0.1)
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
