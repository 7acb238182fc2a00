"""Fitting a causal LM with the next-token loss on IMDb reviews: the loop shared by the offline GPT-2's
pre-training (``offline_models``) and the optional SFT stage (``train_sft``), with its batches and its
held-out loss."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling.batching import pad_sequences
from modeling.models import autocast
from runtime.run_utils import NonFiniteGuard


def warmup_cosine(opt, total: int, warmup_frac: float = 0.05):
    """Linear warmup over ``warmup_frac`` of ``total`` steps, then cosine decay to 0."""
    warmup = max(1, int(total * warmup_frac))

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)



def review_token_ids(tok, df, cap: int, min_tokens: int = 8) -> list[list[int]]:
    """Each review's first ``cap`` tokens (reviews shorter than ``min_tokens`` dropped)."""
    ids = tok(df["review"].tolist(), add_special_tokens=False, truncation=True, max_length=cap)["input_ids"]
    return [t for t in ids if len(t) >= min_tokens]


def lm_batch(ids: list[list[int]], n: int, seq_len: int, pad_id: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of up to ``seq_len`` tokens: half review openings (what prompts are), half windows from
    a random place (what continuations look like). Returns (input_ids, attention_mask), each (n, T)."""
    rows = []
    for i in rng.integers(0, len(ids), n):
        t = ids[i]
        start = 0 if rng.random() < 0.5 or len(t) <= seq_len else int(rng.integers(0, len(t) - seq_len))
        rows.append(t[start:start + seq_len])
    return pad_sequences(rows, pad_id), pad_sequences([[1] * len(r) for r in rows], 0)


def lm_loss(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # labels = input ids with padding set to -100; the model shifts them by one token internally.
    return model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss


@torch.no_grad()
def heldout_lm_loss(model, eval_ids, seq_len: int, pad_id: int, seed: int, dtype, device="cpu") -> float:
    """Mean next-token loss on 8 seeded batches of 64 held-out sequences (the same ones for the same seed)."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    with autocast(device, dtype):
        losses = [lm_loss(model, x.to(device), m.to(device)).item()
                  for x, m in (lm_batch(eval_ids, 64, seq_len, pad_id, rng) for _ in range(8))]
    model.train(was_training)
    return float(np.mean(losses))


def fit_causal_lm(model, train_ids, *, steps: int, batch_size: int, seq_len: int, lr: float, pad_id: int, rng,
                  dtype, device="cpu", desc: str, betas=(0.9, 0.95), weight_decay: float = 0.01,
                  lr_flag: str = "--lm_lr", nan_steps=()) -> None:
    """Next-token training on review openings and windows (:func:`lm_batch`): AdamW, warmup then cosine decay,
    gradients clipped at 1, a step with a non-finite loss or gradient skipped (``run_utils.NonFiniteGuard``;
    ``nan_steps``: 1-based steps whose loss a test makes NaN). Shared by the offline GPT-2's pre-training and the
    optional SFT stage."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    sched = warmup_cosine(opt, steps)
    model.train()
    guard = NonFiniteGuard(desc, lr_flag)
    bar = tqdm(range(1, steps + 1), desc=desc, unit="step")
    for step in bar:
        x, mask = lm_batch(train_ids, batch_size, seq_len, pad_id, rng)
        with autocast(device, dtype):
            loss = lm_loss(model, x.to(device), mask.to(device))
        if step in nan_steps:
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        if guard.finite(loss.item(), grad_norm, step):
            opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.2f}")
    model.eval()
