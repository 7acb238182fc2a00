"""Win rates, the Pareto envelope and judge edge cases."""

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from eval_utils import judge_logits, judge_scores, win_rate


def test_win_rate_counts_ties_half():
    assert win_rate([0.9, 0.2, 0.5, 0.7], [0.1, 0.3, 0.5, 0.7]) == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert win_rate([1.0, 1.0], [0.0, 0.0]) == 1.0
    assert win_rate([0.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        win_rate([0.1, 0.2], [0.1])


def test_judge_scores_empty_long_and_non_ascii_texts(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=len(tiny_tokenizer), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                           max_position_embeddings=32, pad_token_id=tiny_tokenizer.pad_token_id,
                           id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    judge = DistilBertForSequenceClassification(cfg).eval()
    judge.positive_index = 1
    tiny_tokenizer.model_max_length = 32
    texts = ["", "a lovely film " * 200, "très émouvant — 映画 😀", "fine"]
    scores = judge_scores(tiny_tokenizer, judge, texts, batch_size=3, device="cpu")
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
    logits = judge_logits(tiny_tokenizer, judge, texts, batch_size=3, device="cpu")
    p = torch.tensor(scores, dtype=torch.float64)
    assert torch.allclose(logits.double(), torch.log(p) - torch.log1p(-p), atol=1e-4)


# ------------------------------------------------------------------------------------ KL at temperature T
V, EOS, PROMPT, MAX_NEW = 6, 5, [1, 2], 3


class _Tok:  # what generate() needs of a tokenizer
    eos_token_id = pad_token_id = EOS


def _peaky_lm(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2, initializer_range=0.6,
                     eos_token_id=EOS, bos_token_id=EOS, pad_token_id=EOS)
    return GPT2LMHeadModel(cfg).eval()


def _all_completions():
    """Every completion generate() can return: up to MAX_NEW tokens, ending at the first EOS or at MAX_NEW."""
    import itertools

    out = []
    for n in range(1, MAX_NEW + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS not in seq[:-1] and (seq[-1] == EOS or n == MAX_NEW):
                out.append(list(seq))
    return out


@torch.no_grad()
def _brute_logp(model, completion, temperature):
    """log pi_T(completion | PROMPT), one full forward per token: softmax(logits / T) step by step."""
    total, ids = 0.0, list(PROMPT)
    for tok in completion:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        total += (logits / temperature).log_softmax(-1)[tok].item()
        ids.append(tok)
    return total


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_kl_to_the_reference_at_temperature_t_matches_brute_force(temperature):
    """Per-sequence log-probs under softmax(logits / T) equal a brute-force enumeration, they sum to 1 over
    every completion generate() can return, and the Monte Carlo KL of evaluate_policy's recipe (sample at T,
    score both models at T) lands on the exact KL(pi_T || pi_ref,T)."""
    from conftest import summed_response_logps as response_logps

    from eval_utils import generate

    policy, ref = _peaky_lm(0), _peaky_lm(1)
    ys = _all_completions()
    brute = {name: torch.tensor([_brute_logp(m, y, temperature) for y in ys], dtype=torch.float64)
             for name, m in (("pi", policy), ("ref", ref))}
    assert brute["pi"].exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    ours = response_logps(policy, [PROMPT] * len(ys), ys, EOS, 64, "cpu", temperature)
    assert torch.allclose(ours.double(), brute["pi"], atol=1e-4)
    exact_kl = float((brute["pi"].exp() * (brute["pi"] - brute["ref"])).sum())

    # evaluation's own path: each model scored by generate(forced=...) on the sampling path
    _, forced = generate(policy, _Tok(), [PROMPT] * len(ys), MAX_NEW, temperature, 0, len(ys), "cpu", forced=ys,
                         return_logps=True)
    assert torch.allclose(torch.tensor([sum(lp) for lp in forced], dtype=torch.float64), brute["pi"], atol=1e-4)

    n = 6000
    samples, sample_lps = generate(policy, _Tok(), [PROMPT] * n, MAX_NEW, temperature, seed=3, batch_size=n,
                                   device="cpu", return_logps=True)
    log_ratio = (response_logps(policy, [PROMPT] * n, samples, EOS, n, "cpu", temperature)
                 - response_logps(ref, [PROMPT] * n, samples, EOS, n, "cpu", temperature)).double()
    se = log_ratio.std().item() / n ** 0.5
    assert exact_kl > 0.05  # the two models differ enough for the test to mean something
    assert abs(log_ratio.mean().item() - exact_kl) < 4 * se + 1e-3, (log_ratio.mean().item(), exact_kl, se)
    # ... and evaluate_policy's recipe: the sampler's own log-probs minus the reference's on the same path
    _, ref_lps = generate(ref, _Tok(), [PROMPT] * n, MAX_NEW, temperature, 3, n, "cpu", forced=samples,
                          return_logps=True)
    ratio = torch.tensor([sum(a) - sum(b) for a, b in zip(sample_lps, ref_lps)], dtype=torch.float64)
    assert abs(ratio.mean().item() - exact_kl) < 4 * se + 1e-3, (ratio.mean().item(), exact_kl, se)


def test_evaluate_policy_kl_is_zero_for_a_copy_of_the_reference_and_positive_for_another_model(tiny_tokenizer):
    import copy

    from eval_utils import evaluate_policy
    from training.lifecycle import RunContext

    ref = _peaky_lm(1)
    judge_cfg = DistilBertConfig(vocab_size=len(tiny_tokenizer), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                 max_position_embeddings=32, pad_token_id=tiny_tokenizer.pad_token_id)
    judge = DistilBertForSequenceClassification(judge_cfg).eval()
    judge.positive_index = 1
    ctx = RunContext(tokenizer=_Tok(), ref_model=ref, device="cpu", acc=None, batch_size=16, judge_tok=tiny_tokenizer,
                     judge=judge, prompts=[PROMPT] * 32, max_new_tokens=MAX_NEW, seed=0)
    ctx.tokenizer.decode = lambda ids, skip_special_tokens=True: " ".join(map(str, ids))
    same = evaluate_policy(copy.deepcopy(ref), ctx, 1.0)
    other = evaluate_policy(_peaky_lm(0), ctx, 1.0)
    assert same["kl_to_ref"] == pytest.approx(0.0, abs=1e-6)
    assert other["kl_to_ref"] > 0.05


def _loud_lm(seed):
    """A 6-token model whose logits all carry a common offset of about 80: softmax ignores it, but bf16 rounds
    logits of that size to multiples of 0.5, so the rounding moves each log-prob by up to ~0.25 nats."""
    model = _peaky_lm(seed)
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 10.0
        model.lm_head.weight[:, 0] = 8.0  # every token's logit gets ~10 * 8 from dimension 0
    return model


def test_kl_under_bf16_is_that_of_the_distribution_sampled():
    """Under bf16 autocast the completions come from rounded logits. The KL estimate must be that of the
    distribution sampled from: enumerate every completion's probability along the sampling path (generate
    with ``forced``) for the policy and the reference, and the Monte Carlo KL of evaluate_policy's recipe lands
    on the exact sum. Scoring the samples with an fp32 head instead (the former recipe) misses it."""
    from conftest import summed_response_logps as response_logps

    from eval_utils import generate

    bf16 = torch.bfloat16
    policy, ref = _loud_lm(0), _loud_lm(1)
    ys = _all_completions()
    exact = {}
    for name, m in (("pi", policy), ("ref", ref)):
        _, lps = generate(m, _Tok(), [PROMPT] * len(ys), MAX_NEW, 1.0, 0, len(ys), "cpu", bf16, forced=ys,
                          return_logps=True)
        exact[name] = torch.tensor([sum(lp) for lp in lps], dtype=torch.float64)
    assert exact["pi"].exp().sum().item() == pytest.approx(1.0, abs=1e-4)  # a distribution over completions
    exact_kl = float((exact["pi"].exp() * (exact["pi"] - exact["ref"])).sum())

    n = 6000
    samples, lps = generate(policy, _Tok(), [PROMPT] * n, MAX_NEW, 1.0, 3, n, "cpu", bf16, return_logps=True)
    _, ref_lps = generate(ref, _Tok(), [PROMPT] * n, MAX_NEW, 1.0, 3, n, "cpu", bf16, forced=samples,
                          return_logps=True)
    ratio = torch.tensor([sum(a) - sum(b) for a, b in zip(lps, ref_lps)], dtype=torch.float64)
    se = ratio.std().item() / n ** 0.5
    assert abs(ratio.mean().item() - exact_kl) < 4 * se + 1e-3, (ratio.mean().item(), exact_kl, se)

    # The former recipe: bf16 samples scored by a separate pass with the LM head in fp32.
    old = (response_logps(policy, [PROMPT] * n, samples, EOS, n, "cpu", 1.0, bf16)
           - response_logps(ref, [PROMPT] * n, samples, EOS, n, "cpu", 1.0, bf16)).double()
    assert abs(old.mean().item() - exact_kl) > 4 * se + 1e-3, (old.mean().item(), exact_kl, se)


def test_a_prompts_sample_does_not_depend_on_its_batch_or_position():
    """Each prompt draws from its own seed (``[seed, prompt id]``): sampled alone, in a batch, or at another
    place of the batch, the same prompt id gives the same completion and log-probs."""
    from eval_utils import generate

    model, prompts = _peaky_lm(0), [[1, 2], [3, 1], [2, 2], [4, 3]]
    together = generate(model, _Tok(), prompts, MAX_NEW, 1.0, 7, 4, "cpu", prompt_ids=[10, 11, 12, 13],
                        return_logps=True)
    alone = [generate(model, _Tok(), [p], MAX_NEW, 1.0, 7, 1, "cpu", prompt_ids=[10 + i], return_logps=True)
             for i, p in enumerate(prompts)]
    reversed_ = generate(model, _Tok(), prompts[::-1], MAX_NEW, 1.0, 7, 4, "cpu", prompt_ids=[13, 12, 11, 10],
                         return_logps=True)
    assert together[0] == [a[0][0] for a in alone] == reversed_[0][::-1]
    for lp, a in zip(together[1], alone):
        assert lp == pytest.approx(a[1][0], abs=1e-5)
    other_seed = generate(model, _Tok(), prompts * 8, MAX_NEW, 1.0, 8, 32, "cpu")
    assert other_seed != generate(model, _Tok(), prompts * 8, MAX_NEW, 1.0, 7, 32, "cpu")


def test_chunks_are_the_same_at_any_process_count():
    from types import SimpleNamespace

    from runtime.run_utils import chunk_share

    one = chunk_share(23, 5, None)
    assert one == [list(range(s, min(s + 5, 23))) for s in range(0, 23, 5)]
    for k in (2, 3, 4, 7):
        shares = [chunk_share(23, 5, SimpleNamespace(num_processes=k, process_index=r)) for r in range(k)]
        assert len({len(s) for s in shares}) == 1  # the same number of batches on every process (FSDP)
        assert sorted({tuple(c) for s in shares for c in s}) == [tuple(c) for c in one]  # the very same chunks
