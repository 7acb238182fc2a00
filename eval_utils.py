"""Evaluation shared by DPO, PPO and the final comparison: sampling, judge scores, KL to the reference and win
rates (the final evaluation that writes results.json is ``study/results.py``; the dashboard is drawn from
results.json by ``study/plots.py``).

Definitions (the DPO paper's IMDb experiment, Sec. 6.1):

* **safety score**: mean judge P(POSITIVE) of prompt + completion (as TRL's sentiment example scores
  query + response); **positive rate**: fraction the judge labels POSITIVE.
* **sequence KL to the reference**: mean over completions y ~ pi_T of sum_t [log pi_T(y_t|x,y_<t) -
  log pi_ref,T(y_t|x,y_<t)], a Monte Carlo estimate of KL(pi_T || pi_ref,T) in nats, where pi_T samples from
  softmax(logits / T) at the evaluation temperature T. Both models are scored at the temperature the samples
  were drawn at; at T = 1 this is KL(pi || pi_ref), the DPO paper's x-axis.
* **win rate vs the reference**: for the same prompt, the policy wins when the judge gives its completion a
  higher P(POSITIVE) than the reference's completion; ties count half.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from modeling.batching import pad_sequences
from modeling.logprobs import as_scorer, generation_ready
from modeling.models import autocast
from runtime.run_utils import chunk_share, fsdp_world, gather_indexed


# ------------------------------------------------------------------------------------------- sampling
class _ChooseTokens(LogitsProcessor):
    """Chooses every new token of a batched ``generate()`` itself and records its log-prob.

    ``generate()`` runs greedy; this processor turns the scores into ``-inf`` everywhere but the chosen token.
    The token is either drawn from ``softmax(logits / T)`` by inverting its CDF at a uniform of the row's own
    (``uniforms``: (B, steps), one per row and step, from the row's own seed, so that a row's sample does not
    depend on which other rows share its batch or process), or ``forced`` ((B, steps) token ids: scoring given
    completions along the same path). Either way ``logps`` records ``log softmax(logits / T)`` of that token,
    computed from the very logits the choice was made from: at any precision the log-probs are those of the
    distribution sampled from, which is what makes the KL estimate unbiased under bf16 autocast.
    """

    def __init__(self, temperature: float, uniforms: torch.Tensor | None = None, forced: torch.Tensor | None = None):
        self.temperature, self.uniforms, self.forced = temperature, uniforms, forced
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = len(self.logps)
        logits = scores.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        logp = torch.log_softmax(logits, dim=-1)
        if self.forced is not None:
            token = self.forced[:, t]
        else:
            # Inverse CDF in float64: the interval of each token is its probability to ~1e-16, so the sampled
            # distribution is the recorded one. u in (0, 1], and the first index whose CDF reaches u * total is
            # never a token of probability 0.
            cdf = logp.double().exp().cumsum(-1)
            u = (1.0 - self.uniforms[:, t].double()) * cdf[:, -1]
            token = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
        self.logps.append(logp.gather(-1, token.unsqueeze(-1)).squeeze(-1))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token.unsqueeze(-1), 0.0)


def prompt_uniforms(seed, prompt_ids: list[int], steps: int) -> torch.Tensor:
    """(N, steps) uniforms in [0, 1), row ``i`` from the seed sequence ``[*seed, prompt_ids[i]]`` alone: the same
    prompt gets the same draws whatever batch, process or process count it is sampled in."""
    seed = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    return torch.from_numpy(np.stack([np.random.default_rng([*seed, int(i)]).random(steps) for i in prompt_ids]))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed,
             batch_size: int, device, dtype: torch.dtype = torch.float32, synced_gpus: bool = False, *,
             prompt_ids: list[int] | None = None, forced: list[list[int]] | None = None, return_logps: bool = False):
    """Sample one completion per prompt (pure sampling: top-k 0, top-p 1), batched with the KV cache.

    Prompts are left-padded so every row continues right after its prompt. Each prompt's draws come from its
    own seed, ``[seed, prompt_ids[i]]`` (``prompt_ids`` default to the positions 0..N-1; pass global indices
    when sampling a share of a larger set): a completion depends on the prompt, the seed and the weights, not
    on the batch or the process that samples it. No global RNG is touched. A completion ends at the first
    EOS (kept, so a completion is never empty) or after ``max_new_tokens`` tokens. Nothing but the temperature
    reshapes the distribution.

    ``forced``: completions to score instead of sampling (one per prompt): the model runs exactly the path of
    sampling (same padding, KV cache and precision), so a model scored on its own samples gets the very
    log-probs it sampled with, and a copy of the sampler gets a log-ratio of exactly 0.
    ``return_logps``: also return each completion's per-token log-probs under ``softmax(logits / T)``, from
    the logits the tokens were drawn (or forced) from. ``synced_gpus`` keeps FSDP processes stepping together.

    Returns the completions (lists of token ids), or ``(completions, logps)`` with ``return_logps``.
    """
    eos = tokenizer.eos_token_id
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    out, out_logps = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        input_ids = pad_sequences(chunk, tokenizer.pad_token_id, side="left").to(device)
        attention_mask = pad_sequences([[1] * len(p) for p in chunk], 0, side="left").to(device)
        if forced is not None:
            rows = forced[start:start + batch_size]
            steps = max(len(r) for r in rows)
            chooser = _ChooseTokens(temperature, forced=pad_sequences(rows, eos).to(device))
        else:
            steps = max_new_tokens
            chooser = _ChooseTokens(temperature, uniforms=prompt_uniforms(seed, prompt_ids[start:start + batch_size],
                                                                          steps).to(device))
        config = GenerationConfig(do_sample=False, max_new_tokens=steps, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=eos)
        with autocast(device, dtype):
            gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 logits_processor=LogitsProcessorList([chooser]), synced_gpus=synced_gpus)
        new = gen[:, input_ids.shape[1]:].tolist() if forced is None else forced[start:start + batch_size]
        logps = torch.stack(chooser.logps, 1).cpu().tolist()
        for row, lp in zip(new, logps):
            row = row[: row.index(eos) + 1] if eos in row else row
            out.append(list(row))
            out_logps.append(lp[: len(row)])
    return (out, out_logps) if return_logps else out


@torch.no_grad()
def _judge_forward(judge_tok, judge, texts: list[str], batch_size: int, device,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 2) fp32 judge logits on the CPU; texts longer than the judge's max length are truncated, empty
    ones scored."""
    max_len = min(getattr(judge_tok, "model_max_length", 512) or 512, 512,
                  getattr(judge.config, "max_position_embeddings", 512))
    out = []
    for s in range(0, len(texts), batch_size):
        enc = judge_tok(texts[s:s + batch_size], truncation=True, max_length=max_len, padding=True,
                        return_tensors="pt").to(device)
        with autocast(device, dtype):
            out.append(judge(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().cpu())
    return torch.cat(out)


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads its lexicon once


def vader_compound(texts: list[str]) -> list[float]:
    """VADER's compound sentiment of each text, in [-1, 1] (Hutto & Gilbert 2014, the ``vaderSentiment`` package:
    a lexicon and rules shipped inside the wheel, nothing trained or downloaded here): the study's second judge,
    independent of the one that labels the pairs, rewards PPO-GT and scores everything. VADER's own threshold
    for a positive text is compound > 0.05 (:data:`VADER_POSITIVE`)."""
    return [float(_vader().polarity_scores(t)["compound"]) for t in texts]


VADER_POSITIVE = 0.05


def judge_scores(judge_tok, judge, texts: list[str], batch_size: int, device,
                 dtype: torch.dtype = torch.float32) -> np.ndarray:
    """(N,) judge P(POSITIVE)."""
    logits = _judge_forward(judge_tok, judge, texts, batch_size, device, dtype)
    return logits.softmax(-1)[:, judge.positive_index].numpy()


def judge_logits(judge_tok, judge, texts: list[str], batch_size: int, device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) the judge's POSITIVE logit minus NEGATIVE logit (PPO-GT's reward), read off the logits directly
    rather than back from a clipped probability."""
    logits = _judge_forward(judge_tok, judge, texts, batch_size, device, dtype)
    return logits[:, judge.positive_index] - logits[:, 1 - judge.positive_index]


def judge_accuracy(judge_tok, judge, tokenizer, eval_df, n_tokens: int, device, dtype=torch.float32,
                   n: int = 1000, batch_size: int = 100) -> dict:
    """The judge's accuracy on held-out review openings cut to ``n_tokens`` of the policy's tokenizer and
    decoded: texts as long as the prompt + completion it judges, in the form it judges them. Beside it, the
    second judge's on the same texts: VADER's accuracy (positive when compound > 0.05) and the Pearson
    correlation of its compound score with the judge's P(positive). Returns ``{"accuracy", "vader_accuracy",
    "vader_correlation", "n"}``."""
    df = eval_df.iloc[:n]
    ids = tokenizer(df["review"].tolist(), add_special_tokens=False, truncation=True, max_length=n_tokens)["input_ids"]
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
    scores = judge_scores(judge_tok, judge, texts, batch_size, device, dtype)
    labels = df["label"].to_numpy()
    vader = np.asarray(vader_compound(texts))
    return {"accuracy": float(((scores > 0.5).astype(int) == labels).mean()),
            "vader_accuracy": float(((vader > VADER_POSITIVE).astype(int) == labels).mean()),
            # undefined (NaN) when either judge gives every text the same score (the smoke judge can)
            "vader_correlation": (float(np.corrcoef(scores, vader)[0, 1]) if min(np.std(scores), np.std(vader)) > 0
                                  else float("nan")),
            "n": len(texts)}


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_policy(policy, ctx, temperature: float, with_kl: bool = True) -> dict:
    """Sample the policy on the held-out prompts and measure safety, positive rate and KL to the reference
    (``with_kl=False`` skips the reference's pass and reports NaN, for the win-rate sweep). ``policy`` is a
    causal LM or a training run's (prepared) ResponseLogProbs; ``ctx`` a ``lifecycle.RunContext``.

    The prompts are cut into fixed chunks of ``ctx.batch_size`` by their index; under several processes chunk c
    goes to process c mod k. Each prompt is sampled with its own seed (``[ctx.seed, index]``), in the same
    chunk (so with the same padding) and judged in the same batch whatever the process count: the same
    weights give the same per-prompt results on 1 process or k. The policy's log-probs are those it sampled
    with, and the reference is scored on the same path (:func:`generate` with ``forced``), so the KL estimate
    is unbiased at any precision and exactly 0 for a copy of the reference.

    Returns metrics plus ``responses``, ``texts``, ``scores`` and ``log_ratios`` (per prompt, in prompt order).
    """
    acc, tok = ctx.acc, ctx.tokenizer
    scorer = as_scorer(policy)
    lm = getattr(scorer, "module", scorer).lm
    was_training = lm.training
    lm.eval()
    synced = fsdp_world(acc)
    mine = {}
    with generation_ready(scorer):
        for idx in chunk_share(len(ctx.prompts), ctx.batch_size, acc):
            prompts = [ctx.prompts[i] for i in idx]
            responses, logps = generate(lm, tok, prompts, ctx.max_new_tokens, temperature, ctx.seed, len(idx),
                                        ctx.device, ctx.dtype, synced, prompt_ids=idx, return_logps=True)
            texts = [tok.decode(p + r, skip_special_tokens=True) for p, r in zip(prompts, responses)]
            scores = judge_scores(ctx.judge_tok, ctx.judge, texts, len(idx), ctx.device, ctx.judge_dtype).tolist()
            ratios = [float("nan")] * len(idx)
            if with_kl:
                # The reference scored at the sampling temperature on the policy's own path: sum_t log pi_T -
                # log pi_ref,T per completion, an unbiased estimate of KL(pi_T || pi_ref,T).
                _, ref_logps = generate(ctx.ref_model, tok, prompts, ctx.max_new_tokens, temperature, ctx.seed,
                                        len(idx), ctx.device, ctx.dtype, prompt_ids=idx, forced=responses,
                                        return_logps=True)
                ratios = [math.fsum(a) - math.fsum(b) for a, b in zip(logps, ref_logps)]
            mine.update({i: (r, t, sc, lr) for i, r, t, sc, lr in zip(idx, responses, texts, scores, ratios)})
    responses, texts, scores, log_ratios = (list(x) for x in zip(*gather_indexed(mine, len(ctx.prompts), acc)))
    lm.train(was_training)
    scores = np.asarray(scores)
    return {"safety_score": float(scores.mean()), "positive_rate": float((scores > 0.5).mean()),
            "kl_to_ref": float(np.mean(log_ratios)), "response_len": float(np.mean([len(r) for r in responses])),
            "responses": responses, "texts": texts, "scores": scores, "log_ratios": log_ratios}


def eval_metrics(result: dict) -> dict:
    """The ``eval/...`` keys logged in metrics.jsonl."""
    return {f"eval/{k}": result[k] for k in ("safety_score", "positive_rate", "kl_to_ref", "response_len")}


def win_rate(policy_scores, ref_scores) -> float:
    """Fraction of prompts where the policy's completion scores higher than the reference's; ties count half."""
    p, r = np.asarray(policy_scores, dtype=float), np.asarray(ref_scores, dtype=float)
    if p.shape != r.shape or p.size == 0:
        raise ValueError("win_rate needs two equally long, non-empty score arrays")
    return float(((p > r) + 0.5 * (p == r)).mean())
