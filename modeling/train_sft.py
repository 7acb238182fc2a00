"""Optional supervised fine-tuning before preference learning: ``--sft_steps N``.

The DPO paper's IMDb pipeline starts from an SFT model (GPT-2-large fine-tuned on IMDb reviews); the spec
fine-tunes plain ``distilgpt2``, so the default is 0 steps. With N > 0 the base LM is fine-tuned with the
next-token loss on training-review openings and windows (the offline GPT-2's own loop,
``lm_fitting.fit_causal_lm``); the result is the frozen reference *and* the initial policy of DPO and
PPO, and the reward model's starting point. It is built once into ``models/sft/<settings hash>/`` and reused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dataset import data_fingerprint
from modeling.lm_fitting import fit_causal_lm, heldout_lm_loss, review_token_ids
from modeling.models import dtype_name, load_causal_lm, load_tokenizer, threads_key, weights_fingerprint
from runtime.artifacts import Artifact


def ensure_sft_model(cfg, train_df, eval_df, device, dtype) -> str:
    """Fine-tune ``cfg.model.policy_model`` (or reuse the result); returns the directory of the SFT model."""
    sc = cfg.sft
    base = load_causal_lm(cfg.model.policy_model, device)
    settings = {"sft": asdict(sc), "base": cfg.model.policy_model, "base_weights": weights_fingerprint(base),
                "seq_len": cfg.data.max_length, "precision": dtype_name(dtype), "seed": cfg.run.seed,
                "split_seed": cfg.data.split_seed, "n_train_reviews": len(train_df),
                "data_fingerprint": data_fingerprint(train_df), **threads_key(device)}
    art = Artifact(Path(cfg.run.cache_dir) / "sft", settings, done="sft_report.json")
    if art.exists():
        report = art.report()
        print(f"sft: reusing {art.path} (held-out loss {report['heldout_loss_before']:.2f} -> "
              f"{report['heldout_loss_after']:.2f})")
        return str(art.path)

    tok = load_tokenizer(cfg.model.policy_model)
    seq_len, pad = cfg.data.max_length, tok.pad_token_id
    train_ids, eval_ids = (review_token_ids(tok, df, 4 * seq_len) for df in (train_df, eval_df))
    t0 = time.time()
    before = heldout_lm_loss(base, eval_ids, seq_len, pad, cfg.data.split_seed + 7, dtype, device)
    torch.manual_seed(cfg.run.seed)
    fit_causal_lm(base, train_ids, steps=sc.sft_steps, batch_size=sc.sft_batch_size, seq_len=seq_len, lr=sc.sft_lr,
                  pad_id=pad, rng=np.random.default_rng([cfg.data.split_seed, 5]), dtype=dtype, device=device,
                  desc="sft", betas=(0.9, 0.999), weight_decay=0.0, lr_flag="--sft_lr")
    after = heldout_lm_loss(base, eval_ids, seq_len, pad, cfg.data.split_seed + 7, dtype, device)
    report = {"heldout_loss_before": before, "heldout_loss_after": after, "steps": sc.sft_steps,
              "tokens_seen": sc.sft_steps * sc.sft_batch_size * seq_len, "train_s": time.time() - t0}
    print(f"sft: {sc.sft_steps} steps on training reviews, held-out loss {before:.2f} -> {after:.2f} "
          f"({report['train_s']:.0f}s)")

    def write(tmp: Path):
        base.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "sft_settings.json").write_text(json.dumps(settings, indent=2))
        (tmp / "sft_report.json").write_text(json.dumps(report, indent=2))

    art.write(write)
    return str(art.path)
