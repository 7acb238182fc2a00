"""PPO moves off the reference only through its reward and its KL penalty (tiny models, the real trainer)."""

from __future__ import annotations

import types

import pytest
import torch

import train_ppo
from config import PRESETS
from modeling.models import load_causal_lm
from runtime.run_utils import make_accelerator
from training.lifecycle import RunContext


@pytest.mark.parametrize("kl_penalty, weight_decay", [("full", 0.0), ("sampled", 0.0), ("loss", 0.0), ("full", 0.01)])
def test_with_a_zero_reward_ppo_stays_bit_identical_to_the_reference(tiny_lm, tiny_tokenizer, tmp_path,
                                                                      monkeypatch, kl_penalty, weight_decay):
    """With a zero reward the reference is the optimum and PPO's KL penalty is exactly 0 there: the value head
    starts at 0, so every advantage, return and gradient is 0 (the exact KL's gradient too, exactly, not up to
    rounding: ``ppo_utils.exact_kl``). Nothing may move the weights; AdamW's weight decay
    (its default 0.01, PPO's optimiser before) does, and whitening then blows that drift up into full steps."""
    base = tmp_path / "base"
    tiny_lm.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    prompts = [tiny_tokenizer.encode(f"a film number {i} was")[:4] for i in range(16)]
    data = types.SimpleNamespace(train_pairs=[{"prompt": p} for p in prompts],
                                 train_prompts=prompts)  # all PPO reads of the data
    zero = (lambda ps, rs: torch.zeros(len(ps)), None)
    monkeypatch.setattr(train_ppo, "reward_function", lambda cfg, data, ctx: zero)
    cfg = PRESETS["smoke"].replace(
        model={"policy_model": str(base), "build_offline_models": False, "dtype": "fp32"},
        data={"response_tokens": 6, "max_length": 16},
        ppo={"ppo_steps": 2, "ppo_batch_size": 16, "ppo_mini_batch_size": 8, "ppo_epochs": 2, "ppo_lr": 1e-2,
             "target_kl": None, "init_kl_coef": 5.0, "ppo_weight_decay": weight_decay, "kl_penalty": kl_penalty},
        run={"output_dir": str(tmp_path / "out"), "save_every": 100})
    ref = load_causal_lm(str(base))
    ctx = RunContext(tokenizer=tiny_tokenizer, ref_model=ref, device=torch.device("cpu"),
                     acc=make_accelerator(torch.device("cpu")), batch_size=16)
    out = train_ppo.train(cfg, data, ctx, name="zero_reward", evaluate=False)
    moved = [n for (n, a), b in zip(ref.named_parameters(), out["policy"].parameters()) if not torch.equal(a, b)]
    if weight_decay == 0:
        assert moved == []
    else:  # the old optimiser: the test above could fail
        assert moved


@pytest.mark.parametrize("ppo_reward, target_kl, start", [("judge", 6.0, 0.3), ("model", 6.0, 0.1),
                                                          ("judge", None, 0.1)])
def test_ppo_gt_starts_its_adaptive_coefficient_at_its_own_start(tiny_lm, tiny_tokenizer, tmp_path, monkeypatch,
                                                                 ppo_reward, target_kl, start):
    """--ppo_gt_init_kl_coef is the adaptive start of PPO on the judge's reward (whose scale is not the reward
    model's); PPO on the reward model, and any fixed coefficient, start at --init_kl_coef (the trainer's logged
    coefficient at its first iteration)."""
    from runtime.run_log import read_metrics

    base = tmp_path / "base"
    tiny_lm.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    prompts = [tiny_tokenizer.encode(f"a film number {i} was")[:4] for i in range(8)]
    data = types.SimpleNamespace(train_pairs=[{"prompt": p} for p in prompts], train_prompts=prompts)
    one = (lambda ps, rs: torch.ones(len(ps)), None)
    monkeypatch.setattr(train_ppo, "reward_function", lambda cfg, data, ctx: one)
    cfg = PRESETS["smoke"].replace(
        model={"policy_model": str(base), "build_offline_models": False, "dtype": "fp32"},
        data={"response_tokens": 4, "max_length": 12},
        ppo={"ppo_steps": 1, "ppo_batch_size": 8, "ppo_mini_batch_size": 8, "ppo_epochs": 1, "ppo_reward": ppo_reward,
             "target_kl": target_kl, "init_kl_coef": 0.1, "ppo_gt_init_kl_coef": 0.3},
        run={"output_dir": str(tmp_path / "out"), "save_every": 100})
    ctx = RunContext(tokenizer=tiny_tokenizer, ref_model=load_causal_lm(str(base)), device=torch.device("cpu"),
                     acc=make_accelerator(torch.device("cpu")), batch_size=8)
    out = train_ppo.train(cfg, data, ctx, name="start", evaluate=False)
    rows = read_metrics(tmp_path / "out" / "start" / "metrics.jsonl") or read_metrics(
        tmp_path / "out" / "runs" / "start" / "metrics.jsonl")
    coefs = [r["objective/kl_coef"] for r in rows if "objective/kl_coef" in r]
    assert out["policy"] is not None and coefs and coefs[0] == pytest.approx(start)
