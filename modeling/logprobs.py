"""The one response log-prob head shared by DPO, PPO and evaluation.

DPO needs log pi(y|x) summed over the completion, PPO the same per token (plus a value per token, and with the
exact KL penalty the vocabulary's log-probs at the response tokens). Both go through :class:`ResponseLogProbs`,
which runs the transformer once and applies the LM head and the log-softmax only where a response token is
predicted: the full (B, T, V) logits and log-probs are never materialised. (Evaluation scores completions
while sampling them, and the reference on the same tokens with ``eval_utils.generate(forced=...)``, the
sampling loop itself.)
"""

from __future__ import annotations

import contextlib

import torch


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[index]`` computed as the gathered logit minus the logsumexp, in fp32.

    Args:
        logits: (..., V).
        index: (...) token ids.
    Returns:
        (...) fp32 log-probabilities. The full (..., V) log-prob tensor is never built; only the logsumexp's
        softmax appears, in the backward pass.
    """
    # fp32: the log-ratios DPO and PPO are made of are small differences of large sums; bf16 loses them.
    logits = logits.float()
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def as_scorer(model) -> torch.nn.Module:
    """``model`` itself when it is a :class:`ResponseLogProbs` (possibly inside a DDP wrapper, whose forward
    then runs), else a :class:`ResponseLogProbs` around the causal LM ``model``."""
    return model if isinstance(getattr(model, "module", model), ResponseLogProbs) else ResponseLogProbs(model)


@contextlib.contextmanager
def generation_ready(model):
    """Make ``model.lm.generate()`` safe under FSDP2: ``generate`` calls the LM directly, bypassing the
    wrapper's forward, which is what gathers the root's own parameters (embeddings, final norm, LM head); they
    are gathered for the duration instead (the transformer blocks gather theirs in their own hooks). The root
    is initialised as the root first: otherwise the first block to run would claim that role. A no-op for a
    plain or DDP-wrapped model."""
    if not hasattr(model, "unshard"):
        yield
        return
    from torch.distributed.fsdp import fully_shard

    fully_shard.state(model)._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


class ResponseLogProbs(torch.nn.Module):
    """A causal LM (and optionally a scalar value head) whose forward returns per-token log-probs of the
    response tokens.

    Wrapping the LM in a module, rather than calling its parts from a helper, keeps the whole computation
    inside one ``forward``: data-parallel and FSDP wrappers see it, and gradients synchronise as usual.
    """

    def __init__(self, lm, value_head: bool = False):
        super().__init__()
        self.lm = lm
        self.v_head = torch.nn.Linear(lm.config.hidden_size, 1) if value_head else None
        if self.v_head is not None:
            torch.nn.init.zeros_(self.v_head.weight)  # start from V = 0: no spurious advantages at step 1
            torch.nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, vocab_logps: bool = False):
        """Log-probs of the tokens marked by ``response_mask`` given everything before them.

        Args:
            input_ids, attention_mask, response_mask: (B, T); ``response_mask`` is 1 on the tokens whose
                log-prob is wanted (never on column 0, which has no context).
            position_ids: (B, T) or None (the model's default: 0..T-1, right for right-padded rows).
            vocab_logps: also return the log-probs of the whole vocabulary at every response token's state, (N, V)
                fp32 for the N response tokens in row-major order (:meth:`scatter` lays a per-token (N,) result
                out as (B, T)); PPO's exact KL penalty needs them.
        Returns:
            ``(token_logps, values)``: (B, T) fp32, ``token_logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])``
            on response tokens and 0 elsewhere; ``values`` (B, T), the value of the state that emitted each
            token (0 elsewhere), or None without a value head. With ``vocab_logps``, the (N, V) log-probs third.
        """
        lm = self.lm
        head = lm.get_output_embeddings()
        hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state
        # The state at t predicts token t+1: drop the last state and the first token, then keep only the
        # states whose next token is a response token (the prompt's and the padding's logits are never made).
        pred = response_mask[:, 1:].bool()
        h = hidden[:, :-1][pred]  # (N, D)
        logits = head(h).float()
        # The sampled tokens' log-probs the same way with or without the vocabulary's: PPO's ratios compare them.
        lp = selective_log_softmax(logits, input_ids[:, 1:][pred])
        full = torch.log_softmax(logits, dim=-1) if vocab_logps else None
        token_logps = self.scatter(response_mask, lp)
        values = None
        if self.v_head is not None:
            zeros = torch.zeros(input_ids.shape[0], 1, dtype=torch.float32, device=input_ids.device)
            v = self.v_head(hidden[:, :-1]).squeeze(-1).float() * pred
            values = torch.cat([zeros, v], dim=1)
        return (token_logps, values, full) if vocab_logps else (token_logps, values)

    @staticmethod
    def scatter(response_mask: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
        """Lay out ``per_token`` (N,), one value per response token in row-major order, as (B, T) fp32 aligned with
        ``response_mask`` (B, T), 0 elsewhere."""
        pred = response_mask[:, 1:].bool()
        zeros = torch.zeros(response_mask.shape[0], 1, dtype=torch.float32, device=response_mask.device)
        return torch.cat([zeros, torch.zeros_like(pred, dtype=torch.float32).masked_scatter(pred, per_token.float())],
                         1)
