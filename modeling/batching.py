"""Padding and batching: token-id lists in, padded (B, T) tensors out. Below everything that batches
(DPO, PPO, the reward model, evaluation and the LM fitting loop); depends on torch alone."""

from __future__ import annotations

import torch


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str = "right") -> torch.Tensor:
    """(B, T) tensor of the sequences padded to the longest one."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


def response_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response rows with a mask over the response tokens, each (B, T)."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    return {"input_ids": pad_sequences(seqs, pad_id),
            "attention_mask": pad_sequences([[1] * len(s) for s in seqs], 0),
            "response_mask": pad_sequences([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], 0)}


def concatenated_batch(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows of one batch of preference pairs, right-padded to the batch's own
    longest sequence (dynamic padding: T is the longest prompt + response of *this* batch).

    Returns ``input_ids``, ``attention_mask`` and ``response_mask`` (response tokens only), each (2B, T).
    """
    prompts = [p["prompt"] for p in pairs] * 2
    return response_batch(prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def rollout_batch(prompts, responses, pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """Left-padded prompts followed by right-padded responses (the layout ``generate`` produces), so every
    response starts in the same column P. Position ids count from each row's first real token, as
    generation did, so the log-probs recomputed here are those of the sampled tokens. Tensors (B, T) on
    ``device``, and ``P``."""
    P = max(len(p) for p in prompts)
    left = pad_sequences(prompts, pad_id, side="left")
    right = pad_sequences(responses, pad_id)
    input_ids = torch.cat([left, right], 1)
    response_mask = pad_sequences([[1] * len(r) for r in responses], 0)
    attention_mask = torch.cat([pad_sequences([[1] * len(p) for p in prompts], 0, side="left"), response_mask], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "position_ids": position_ids.to(device), "response_mask": response_mask.to(device), "P": P}
