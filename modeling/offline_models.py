"""Self-built models for the ``offline`` and ``smoke`` presets (no model hub needed).

From the IMDb *training* reviews we build, once, and cache under ``models/offline/``:

* ``base_lm-<hash>/`` -- a byte-level BPE tokenizer (``tokenizers``) and a small ``GPT2LMHeadModel`` pre-trained as a
  causal LM on reviews of both sentiments. It is the reference and the initial policy, as the SFT model is
  in the DPO paper. Its held-out loss is reported.
* ``judge-<hash>/`` -- an uncased WordPiece tokenizer and a ``DistilBertForSequenceClassification`` with labels
  ``NEGATIVE/POSITIVE`` like the SST-2 judge, trained on the training labels through a bag-of-n-grams teacher
  (``train_ngram_teacher``). Its held-out accuracy on full reviews and on 64-token openings is printed and
  saved in ``accuracy.json`` beside it.

Both are written with ``save_pretrained``, so the rest of the code loads them exactly like hub models. A
directory is built in ``<name>.tmp-<pid>`` and renamed into place, so an interrupted build leaves nothing half
written; a build with the same settings is reused.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import ByteLevelBPETokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from tqdm.auto import tqdm
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from dataset import data_fingerprint
from modeling.batching import pad_sequences
from modeling.lm_fitting import fit_causal_lm, heldout_lm_loss, review_token_ids, warmup_cosine
from modeling.models import autocast, dtype_name, machine_info, resolve_dtype
from runtime.artifacts import Artifact
from runtime.run_utils import NonFiniteGuard

EOS = "<|endoftext|>"
OPENING_TOKENS = 64  # generations are short: the judge must also be right on review openings
# Bump a builder's version when its code changes, so that its cached models are rebuilt (and only its own).
BUILDER_VERSION = {"lm_": 3, "judge_": 4}


UNSET_OK = ("lm_max_reviews",)  # builder options that are not part of the key while None


def builder_dtype(cfg, prefix: str) -> torch.dtype:
    """The precision a builder trains at (on the CPU): ``--dtype``, where ``auto`` decides by the model's width
    (the narrow judge stays fp32 on every CPU)."""
    width = cfg.offline.lm_n_embd if prefix == "lm_" else cfg.offline.judge_dim
    return resolve_dtype(cfg.model.dtype, "cpu", width)


def build_settings(cfg, train_df, prefix: str) -> dict:
    """Everything one built model depends on: its builder settings (the ``OfflineConfig`` fields starting with
    ``prefix``), seed, precision and the training reviews. Changing the judge never rebuilds the LM."""
    # Options added later are left out while unset, so that models built before them keep their keys.
    own = {k: v for k, v in asdict(cfg.offline).items() if k.startswith(prefix) and not (k in UNSET_OK and v is None)}
    if prefix == "lm_":  # the tokenizer and the context length belong to the LM
        own.update(vocab_size=cfg.offline.vocab_size, max_length=cfg.data.max_length)
    return {"builder_version": BUILDER_VERSION[prefix], "settings": own, "seed": cfg.data.split_seed,
            "precision": dtype_name(builder_dtype(cfg, prefix)),
            "n_train_reviews": len(train_df), "data_fingerprint": data_fingerprint(train_df)}


def _sample_texts(df, n: int, seed: int) -> list[str]:
    return df["review"].sample(n=min(n, len(df)), random_state=seed).tolist()


# --------------------------------------------------------------------------------------------- base LM
def build_base_lm(out: Path, cfg, train_df, eval_df) -> dict:
    dtype = builder_dtype(cfg, "lm_")  # the builders run on the CPU
    oc, rng = cfg.offline, np.random.default_rng(cfg.data.split_seed)
    torch.manual_seed(cfg.data.split_seed)
    t0 = time.time()
    bpe = ByteLevelBPETokenizer()
    # A seeded sample of 10k reviews gives the same frequent merges in a quarter of the time of all 45k.
    bpe.train_from_iterator(_sample_texts(train_df, 10_000, cfg.data.split_seed), vocab_size=oc.vocab_size,
                            min_frequency=2, special_tokens=[EOS], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                  unk_token=EOS, pad_token=EOS, model_input_names=["input_ids", "attention_mask"])
    # Reviews are cut to a few windows' worth of tokens.
    lm_df = train_df if oc.lm_max_reviews is None else train_df.sample(n=min(oc.lm_max_reviews, len(train_df)),
                                                                         random_state=cfg.data.split_seed)
    train_ids, eval_ids = (review_token_ids(tok, df, 4 * oc.lm_seq_len) for df in (lm_df, eval_df))
    print(f"offline: tokenizer ({len(tok)} tokens) in {time.time() - t0:.0f}s")

    config = GPT2Config(vocab_size=len(tok), n_positions=max(oc.lm_seq_len, cfg.data.max_length), n_embd=oc.lm_n_embd,
                        n_layer=oc.lm_n_layer, n_head=oc.lm_n_head, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, tie_word_embeddings=True,
                        # No dropout: the model is far from overfitting in this budget, and DPO/PPO run it
                        # with dropout off anyway. Attention dropout alone cost ~40% of each CPU step.
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    fit_causal_lm(model, train_ids, steps=oc.lm_steps, batch_size=oc.lm_batch_size, seq_len=oc.lm_seq_len,
                  lr=oc.lm_lr, pad_id=tok.eos_token_id, rng=rng, dtype=dtype, desc="offline: pre-train GPT-2")
    loss = heldout_lm_loss(model, eval_ids, oc.lm_seq_len, tok.eos_token_id, cfg.data.split_seed + 7, dtype)
    report = {"heldout_loss": loss, "n_params": sum(p.numel() for p in model.parameters()),
              "tokens_seen": oc.lm_steps * oc.lm_batch_size * oc.lm_seq_len, "build_s": time.time() - t0,
              "machine": machine_info()}  # provenance: the weights' low bits depend on the CPU and threads
    print(f"offline: GPT-2 ({report['n_params'] / 1e6:.1f}M params) held-out loss {report['heldout_loss']:.2f} "
          f"after {report['tokens_seen'] / 1e6:.2f}M tokens, {report['build_s']:.0f}s")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "build_report.json").write_text(json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------------------------- judge
N_BIGRAM_BUCKETS = 2**20


def _crop(ids: list[int], n: int, window_fraction: float, rng) -> list[int]:
    """``n`` tokens of a review: its opening, or (with probability ``window_fraction``, for crops shorter than
    the review) a window from a random place in it."""
    if len(ids) > n and rng.random() < window_fraction:
        start = int(rng.integers(0, len(ids) - n + 1))
        return ids[start:start + n]
    return ids[:n]


def train_ngram_teacher(train_ids: list[list[int]], labels: torch.Tensor, crop_lengths, window_fraction: float,
                        vocab_size: int, rng, epochs: int = 2, batch_size: int = 256, lr: float = 5e-3):
    """Logistic regression on the presence of word pieces and of hashed word-piece bigrams (a seconds-long fit).

    Bag-of-n-grams models are hard to beat on IMDb with 45k reviews and no pre-training: this one is right on
    ~82% of 64-token openings where a 1-layer transformer trained on the labels alone plateaus near 78%. The
    judge learns from its soft labels (knowledge distillation, Hinton et al. 2015, arXiv:1503.02531), which
    also say how much sentiment a short crop carries where the review's label alone does not.

    It trains on the crops the judge trains on: ``crop_lengths(n)`` draws ``n`` lengths, ``window_fraction``
    as in ``_crop``. Returns ``teacher(rows) -> P(positive)`` of shape (len(rows),).
    """
    def features(rows):
        idx, offsets = [], []
        for t in rows:
            offsets.append(len(idx))
            idx.extend(set(t) | {vocab_size + (a * 7919 + b) % N_BIGRAM_BUCKETS for a, b in zip(t, t[1:])})
        return torch.tensor(idx, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)

    weights = torch.nn.EmbeddingBag(vocab_size + N_BIGRAM_BUCKETS, 1, mode="sum")
    torch.nn.init.zeros_(weights.weight)
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([weights.weight, bias], lr=lr)
    for _ in range(epochs):
        order = rng.permutation(len(train_ids))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            rows = [_crop(train_ids[i], n, window_fraction, rng) for i, n in zip(idx, crop_lengths(len(idx)))]
            logits = weights(*features(rows)).squeeze(-1) + bias
            loss = F.binary_cross_entropy_with_logits(logits, labels[idx].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def teacher(rows: list[list[int]]) -> torch.Tensor:
        return torch.sigmoid(weights(*features(rows)).squeeze(-1) + bias)

    return teacher


def _judge_tokenizer(train_df, oc, split_seed: int) -> PreTrainedTokenizerFast:
    """The judge's lowercase WordPiece tokenizer, trained on 15,000 training reviews."""
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(_sample_texts(train_df, 15_000, split_seed), vocab_size=oc.judge_vocab_size,
                           min_frequency=2, show_progress=False)
    # The WordPiece trainer numbers tokens in a run-dependent order (hash-map ties); renumber them in sorted
    # order so that the same settings give the same judge, bit for bit.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ordered = specials + sorted(t for t in wp.get_vocab() if t not in specials)
    wp = BertWordPieceTokenizer(vocab={t: i for i, t in enumerate(ordered)}, lowercase=True)
    return PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=oc.judge_max_length,
                                   model_input_names=["input_ids", "attention_mask"])


def build_judge(out: Path, cfg, train_df, eval_df) -> dict:
    dtype = builder_dtype(cfg, "judge_")  # the builders run on the CPU
    oc, rng = cfg.offline, np.random.default_rng(cfg.data.split_seed + 1)
    torch.manual_seed(cfg.data.split_seed + 1)
    t0 = time.time()
    tok = _judge_tokenizer(train_df, oc, cfg.data.split_seed)
    L = oc.judge_max_length
    cls_id, sep_id, pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id

    def encode(df):  # bodies without [CLS]/[SEP]; batches add them after cropping
        return tok(df["review"].tolist(), add_special_tokens=False, truncation=True, max_length=L - 2)["input_ids"]

    train_ids, y_train = encode(train_df), torch.tensor(train_df["label"].to_numpy())
    n_eval = min(oc.judge_eval_size, len(eval_df))
    eval_ids, y_eval = encode(eval_df.iloc[:n_eval]), torch.tensor(eval_df["label"].to_numpy()[:n_eval])

    def crop_lengths(n):  # body lengths: mostly short crops (generations are short), some whole reviews
        return np.where(rng.random(n) < oc.judge_full_fraction, L - 2, rng.integers(14, 94, n))

    def batch(bodies):
        x = pad_sequences([[cls_id] + b + [sep_id] for b in bodies], pad_id)
        return x, (x != pad_id).long()

    teacher = None
    if oc.judge_distill_weight > 0:
        teacher = train_ngram_teacher(train_ids, y_train, crop_lengths, oc.judge_window_fraction, len(tok), rng)
        t_acc = float(((teacher([t[: OPENING_TOKENS - 2] for t in eval_ids]) > 0.5).long() == y_eval).float().mean())
        print(f"offline: n-gram teacher held-out accuracy {t_acc:.3f} on {OPENING_TOKENS}-token openings "
              f"({time.time() - t0:.0f}s)")

    config = DistilBertConfig(vocab_size=len(tok), dim=oc.judge_dim, n_layers=oc.judge_n_layers, n_heads=4,
                              hidden_dim=2 * oc.judge_dim, max_position_embeddings=L, pad_token_id=pad_id,
                              # attention dropout samples a (B, heads, L, L) mask: over half the CPU time of a
                              # 256-token step, for little regularisation in a 1-layer model
                              attention_dropout=0.0,
                              id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = DistilBertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=oc.judge_lr, weight_decay=0.01)
    sched = warmup_cosine(opt, oc.judge_steps, warmup_frac=0.1)
    model.train()
    guard = NonFiniteGuard("offline: train judge", "--judge_lr")
    bar = tqdm(range(1, oc.judge_steps + 1), desc="offline: train judge", unit="step")
    for step in bar:
        idx = rng.integers(0, len(train_ids), oc.judge_batch_size)
        lens = crop_lengths(len(idx))
        opt.zero_grad(set_to_none=True)
        total = 0.0
        # Whole reviews and short crops go through the model separately: padding every short crop to a whole
        # review's length would double the cost of a step. The loss is still the mean over the whole batch.
        for part in (lens == L - 2, lens < L - 2):
            if not part.any():
                continue
            bodies = [_crop(train_ids[i], n, oc.judge_window_fraction, rng) for i, n in zip(idx[part], lens[part])]
            target = F.one_hot(y_train[idx[part]], 2).float()
            if teacher is not None:
                p = teacher(bodies)
                target = (1 - oc.judge_distill_weight) * target + oc.judge_distill_weight * torch.stack([1 - p, p], -1)
            x, mask = batch(bodies)
            with autocast("cpu", dtype):
                logits = model(input_ids=x, attention_mask=mask).logits
            loss = F.cross_entropy(logits.float(), target, reduction="sum")
            (loss / len(idx)).backward()
            total += loss.item() / len(idx)
        # The gradient's norm, unclipped (max_norm inf scales by exactly 1): the guard's second check.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
        if guard.finite(total, grad_norm, step):
            opt.step()
        sched.step()
        bar.set_postfix(loss=f"{total:.3f}")
    model.eval()

    def accuracy(n_tokens):
        hits = []
        with torch.no_grad(), autocast("cpu", dtype):
            for s in range(0, n_eval, 100):
                x, mask = batch([t[: n_tokens - 2] for t in eval_ids[s:s + 100]])
                hits.append(model(input_ids=x, attention_mask=mask).logits.argmax(-1) == y_eval[s:s + 100])
        return float(torch.cat(hits).float().mean())

    report = {"accuracy_full_reviews": accuracy(L),
              f"accuracy_{OPENING_TOKENS}_token_openings": accuracy(OPENING_TOKENS),
              "n_heldout": n_eval, "max_length": L, "build_s": time.time() - t0, "machine": machine_info()}
    if teacher is not None:
        report[f"teacher_accuracy_{OPENING_TOKENS}_token_openings"] = t_acc
    print(f"offline: judge held-out accuracy {report['accuracy_full_reviews']:.3f} on full reviews (first {L} "
          f"tokens), {report[f'accuracy_{OPENING_TOKENS}_token_openings']:.3f} on {OPENING_TOKENS}-token openings "
          f"({n_eval} reviews, {report['build_s']:.0f}s)")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "accuracy.json").write_text(json.dumps(report, indent=2))
    return report


def _built_at_other_precision(root: Path, kind: str, settings: dict) -> tuple[Path, str, float | None] | None:
    """A built ``kind`` whose settings equal ``settings`` but for the precision: (its directory, its precision,
    its build seconds or None)."""
    same = {k: v for k, v in settings.items() if k != "precision"}
    for d in sorted(root.glob(f"{kind}-*")):
        if not re.fullmatch(rf"{kind}-[0-9a-f]{{12}}", d.name):  # a build in progress or cut (.tmp-<pid>), a lock
            continue
        try:
            theirs = json.loads((d / "build_settings.json").read_text())
        except (OSError, ValueError):
            continue
        if {k: v for k, v in theirs.items() if k != "precision"} == same:
            report = next((d / f for f in ("build_report.json", "accuracy.json") if (d / f).exists()), None)
            build_s = json.loads(report.read_text()).get("build_s") if report else None
            return d, theirs.get("precision", "?"), build_s
    return None


KINDS = (("policy_model", "base_lm", "lm_"), ("judge_model", "judge", "judge_"))  # config field, directory, options


def offline_artifacts(cfg, train_df) -> dict[str, Artifact]:
    """``{"policy_model": ..., "judge_model": ...}``: where each model with these settings is (or will be) built,
    ``<cache_dir>/offline/<kind>-<settings hash>/``."""
    root = Path(cfg.run.cache_dir) / "offline"
    return {name: Artifact(root, build_settings(cfg, train_df, prefix), prefix=f"{kind}-")
            for name, kind, prefix in KINDS}


def ensure_offline_models(cfg, train_df, eval_df) -> dict[str, str]:
    """Build (or reuse) the offline models; returns ``{"policy_model": dir, "judge_model": dir}``. Each has its
    settings in ``build_settings.json``."""
    builders = {"base_lm": build_base_lm, "judge": build_judge}
    arts = offline_artifacts(cfg, train_df)
    for name, kind, _ in KINDS:
        art, settings = arts[name], arts[name].settings
        art.wait_for_builder("offline")  # another run building the same model: wait, then reuse it
        if art.exists():
            print(f"offline: reusing {art.path}")
            continue
        other = _built_at_other_precision(art.path.parent, kind, settings)
        if other is not None:
            dir_, precision, build_s = other
            took = f"about {build_s / 60:.0f} min" if build_s else "minutes"
            print(f"offline: {kind} is built only at {precision} ({dir_}); building it at {settings['precision']} "
                  f"now takes {took} (that build's time). To reuse it instead, pass --dtype {precision}")

        def build(tmp, b=builders[kind], settings=settings):
            (tmp / "build_settings.json").write_text(json.dumps(settings, indent=2))
            return b(tmp, cfg, train_df, eval_df)

        with art.building("offline") as mine:
            if mine:
                art.write(build)
            else:
                print(f"offline: reusing {art.path} (built meanwhile by another run)")
    return {name: str(art.path) for name, art in arts.items()}
