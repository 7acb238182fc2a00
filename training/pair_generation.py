"""The DPO paper's own preference pairs (``--pair_source generated``): for each prompt, completions sampled from
the reference and labelled by the judge (the paper labels with its ground-truth sentiment classifier), the
best as y_w and the worst as y_l. Built once per seed, in data preparation, for the training, validation and
held-out prompts alike, so that DPO and PPO's reward model learn from the very same pairs; cached."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eval_utils import generate, judge_scores
from modeling.models import dtype_name, threads_key, weights_fingerprint
from runtime.artifacts import Artifact

N_HELDOUT = 512  # held-out pairs: the reward model's test (it scores at most this many)


def judged_pairs(prompts: list[list[int]], ctx, n_samples: int, response_tokens: int, seed: int,
                 desc: str) -> list[dict]:
    """``n_samples`` completions per prompt from the reference at temperature 1, each judged; the pair is the
    best and the worst (prompts whose samples all tie are dropped). Prompt i's draws come from its own seed."""
    tok, samples, scores = ctx.tokenizer, [], []
    for i in tqdm(range(n_samples), desc=desc, unit="round"):
        resp = generate(ctx.ref_model, tok, prompts, response_tokens, 1.0, [seed, 1000 + i], ctx.batch_size,
                        ctx.device, ctx.dtype)
        texts = [tok.decode(p + r, skip_special_tokens=True) for p, r in zip(prompts, resp)]
        samples.append(resp)
        scores.append(judge_scores(ctx.judge_tok, ctx.judge, texts, ctx.batch_size, ctx.device, ctx.judge_dtype))
    scores = np.stack(scores)  # (n_samples, N)
    best, worst = scores.argmax(0), scores.argmin(0)
    return [{"prompt": p, "chosen": samples[best[j]][j], "rejected": samples[worst[j]][j]}
            for j, p in enumerate(prompts) if scores[best[j], j] > scores[worst[j], j]]


def generated_data(cfg, data, ctx):
    """``data`` with its training, validation and held-out pairs replaced by judged samples of the reference
    for the same prompts (the validation and held-out evaluation prompts are unchanged)."""
    k, n_tokens, seed = cfg.dpo.n_generated_samples, cfg.data.response_tokens, cfg.run.seed
    sets = {"train": [p["prompt"] for p in data.train_pairs], "val": list(data.val_prompts),
            "heldout": [p["prompt"] for p in data.eval_pairs[:N_HELDOUT]]}
    settings = [weights_fingerprint(ctx.ref_model), weights_fingerprint(ctx.judge), dtype_name(ctx.dtype),
                dtype_name(ctx.judge_dtype), torch.device(ctx.device).type,
                k, n_tokens, seed, sets, threads_key(ctx.device)]
    art = Artifact(Path(cfg.run.cache_dir) / "cache", settings, prefix="generated_pairs-", suffix=".json", digits=16)
    if art.exists():
        pairs = json.loads(art.path.read_text())
        print(f"data: reusing the generated pairs {art.path}")
    else:
        pairs = {name: judged_pairs(prompts, ctx, k, n_tokens, seed + (0, 1, 2)[i] * 100_000,
                                    f"data: sample pairs from the reference ({name})")
                 for i, (name, prompts) in enumerate(sets.items())}
        if ctx.acc is None or ctx.acc.is_main_process:
            art.write(lambda tmp: tmp.write_text(json.dumps(pairs)))
    return dataclasses.replace(data, train_pairs=pairs["train"], val_pairs=pairs["val"], eval_pairs=pairs["heldout"])
