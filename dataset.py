"""IMDb loading and the preference pairs (x, y_w, y_l) that DPO, the reward model and PPO all learn from.

A pair is formed in the policy tokenizer's token space:

* take one positive and one negative training review (random matching, seeded);
* the prompt x is the opening ``k`` tokens (k uniform in [prompt_min_tokens, prompt_max_tokens], 2-8 as in
  the DPO paper's IMDb task) of one of the two, picked at random so that prompts come from positive and
  negative reviews equally often;
* the winner y_w is the positive review's text after its own first ``k`` tokens, the loser y_l the
  negative review's text after its first ``k`` tokens, both truncated to ``response_tokens``.

So both completions are real review text that continues the same prompt, and the only systematic
difference between them is their sentiment -- which is the preference we want the policy to learn. Half
the time y_w is the prompt's true continuation, half the time y_l is, so the prompt never gives the answer
away. Evaluation prompts are openings of held-out reviews that no training pair has seen.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from config import DEFAULT_CSV, HUB_DATASET, ROOT, ConfigError, DataConfig

_LABELS = {"positive": 1, "negative": 0, "pos": 1, "neg": 0, "1": 1, "0": 0}
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_review(text: str) -> str:
    """Strip the ``<br />`` markup of the IMDb dump and surrounding whitespace."""
    return re.sub(r"\s+", " ", _BR.sub(" ", text)).strip()


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, encoding="utf-8", dtype=str, keep_default_na=False)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{path} is empty; expected a CSV with columns review,sentiment") from None
    except (pd.errors.ParserError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not a valid CSV ({first}); expected columns review,sentiment") from None
    cols = {c.strip().lower(): c for c in df.columns}
    missing = [c for c in ("review", "sentiment") if c not in cols]
    if missing:
        raise ConfigError(f"{path} lacks column(s) {', '.join(missing)} (found: {', '.join(map(str, df.columns))}); "
                          f"expected the IMDb layout review,sentiment")
    return df.rename(columns={cols["review"]: "review", cols["sentiment"]: "sentiment"})[["review", "sentiment"]]


def _read_aclimdb(path: Path) -> pd.DataFrame:
    root = path / "aclImdb" if (path / "aclImdb").is_dir() else path
    rows = []
    for split in ("train", "test"):
        for sub, label in (("pos", "positive"), ("neg", "negative")):
            for f in sorted((root / split / sub).glob("*.txt")):
                try:
                    rows.append((f.read_text(encoding="utf-8"), label))
                except UnicodeDecodeError:
                    raise ConfigError(f"{f} is not UTF-8 text; re-extract aclImdb_v1.tar.gz") from None
    if not rows:
        raise ConfigError(f"{path} is a folder but holds no aclImdb/{{train,test}}/{{pos,neg}}/*.txt reviews; "
                          f"pass --data a CSV, an extracted aclImdb/ folder or a hub-layout dataset directory")
    return pd.DataFrame(rows, columns=["review", "sentiment"])


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists() or any(path.rglob("*.parquet"))


def _read_hf_dataset(path: Path, source: str, notes: list[str]) -> pd.DataFrame:
    """The hub IMDb layout (``stanfordnlp/imdb``): splits with a ``text`` column and an integer ``label``
    (0 negative, 1 positive, -1 for the unlabelled ``unsupervised`` split, which is dropped). Reads a
    directory written by ``DatasetDict.save_to_disk`` or one of parquet files named ``<split>-*.parquet``
    (the hub repository's own layout, which is what a hub download gives)."""
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        import datasets

        ds = datasets.load_from_disk(str(path))
        splits = ds if isinstance(ds, datasets.DatasetDict) else {"train": ds}
        frames = {s: splits[s].to_pandas() for s in splits}
    else:
        frames = {}
        for f in sorted(path.rglob("*.parquet")):
            frames.setdefault(f.name.split("-")[0].split(".")[0], []).append(pd.read_parquet(f))
        frames = {s: pd.concat(parts, ignore_index=True) for s, parts in frames.items()}
    bad = [s for s, df in frames.items() if not {"text", "label"} <= set(df.columns)]
    if bad:
        cols = ", ".join(map(str, frames[bad[0]].columns))
        raise ConfigError(f"{source}: split {bad[0]!r} has columns {cols}; expected the hub IMDb layout text,label")
    df = pd.concat(frames.values(), ignore_index=True)
    unknown = sorted(set(df["label"].tolist()) - {-1, 0, 1})
    if unknown:
        raise ConfigError(f"{source}: labels {unknown[:5]} are not IMDb's (0 negative, 1 positive, -1 unlabelled)")
    unlabelled = df["label"] == -1
    if unlabelled.any():
        notes.append(f"data: skipped {int(unlabelled.sum())} unlabelled review(s) (label -1, the 'unsupervised' "
                     f"split) of {source}")
    df = df[~unlabelled]
    return pd.DataFrame({"review": df["text"].astype(str), "sentiment": df["label"].astype(int).astype(str)})


def _read_hub(repo_id: str, notes: list[str]) -> pd.DataFrame:
    """Download (or read from the local cache) the hub dataset's parquet files and read them as above."""
    from huggingface_hub import snapshot_download

    from runtime import hub

    try:
        path = snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.parquet", "**/*.parquet"],
                                 local_files_only=hub.LOCAL_FILES_ONLY)
    except Exception as e:  # offline, no cache, hub down: all the user can do is give a file
        raise ConfigError(f"no IMDb data: {DEFAULT_CSV.relative_to(ROOT)} is missing and the hub dataset "
                          f"{repo_id} could not be loaded ({type(e).__name__}); put 'IMDB Dataset.csv' (Kaggle's "
                          f"'IMDB Dataset of 50K Movie Reviews', columns review,sentiment) in data/, or pass "
                          f"--data PATH (that CSV, an extracted aclImdb/ folder or the hub dataset saved to disk)"
                          ) from None
    return _read_hf_dataset(Path(path), repo_id, notes)


_PARSED: dict[tuple, tuple[pd.DataFrame, list[str]]] = {}  # CSV file (path, size, mtime) -> parsed reviews


def load_reviews(path: str | None = None, verbose: bool = True) -> pd.DataFrame:
    """Load labelled IMDb reviews as a DataFrame with columns ``review`` (clean text) and ``label`` (1/0).

    Sources in order: ``path`` (a CSV, an extracted aclImdb folder, or a directory in the hub dataset's layout:
    ``save_to_disk`` or parquet files), ``data/IMDB Dataset.csv``, the hub dataset ``stanfordnlp/imdb``.
    Raises :class:`ConfigError` (one line for the user) on any bad input. A CSV file is parsed once per process
    (while its size and modification time stay the same): the runs of a study share it.
    """
    file = Path(path) if path is not None else DEFAULT_CSV
    key = None
    if file.is_file():
        st = file.stat()
        key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _PARSED:
        notes: list[str] = []
        parsed = _parse_reviews(path, notes)
        if key is None:
            for note in notes if verbose else []:
                print(note)
            return parsed
        _PARSED[key] = (parsed, notes)
    parsed, notes = _PARSED[key]
    for note in notes if verbose else []:
        print(note)
    return parsed.copy()


def _parse_reviews(path: str | None, notes: list[str]) -> pd.DataFrame:
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"data file {path} does not exist; pass --data a CSV (review,sentiment), an "
                              f"extracted aclImdb/ folder or a hub-layout dataset directory")
        source = str(p)
        if p.is_dir():
            df = _read_hf_dataset(p, source, notes) if _is_hf_dataset_dir(p) else _read_aclimdb(p)
        else:
            df = _read_csv(p)
    elif DEFAULT_CSV.exists():
        df, source = _read_csv(DEFAULT_CSV), str(DEFAULT_CSV.relative_to(ROOT))
    else:
        df, source = _read_hub(HUB_DATASET, notes), HUB_DATASET

    labels = df["sentiment"].astype(str).str.strip().str.lower()
    unknown = labels[~labels.isin(_LABELS)]
    if len(unknown):
        shown = ", ".join(repr(v) for v in unknown.value_counts().index[:5])
        raise ConfigError(f"{source}: {len(unknown)} row(s) have unknown sentiment labels ({shown}); use "
                          f"positive/negative (or 1/0)")
    reviews = df["review"].astype(str).map(clean_review)
    out = pd.DataFrame({"review": reviews, "label": labels.map(_LABELS).astype(int)})
    empty = out["review"].str.len() == 0
    if empty.any():
        notes.append(f"data: dropped {int(empty.sum())} empty review(s) from {source}")
        out = out[~empty].reset_index(drop=True)
    out = _dedupe(out, source, notes)
    notes.append(f"data: {len(out)} reviews from {source} ({int(out.label.sum())} positive)")
    return out


def _dedupe(df: pd.DataFrame, source: str, notes: list[str]) -> pd.DataFrame:
    """One row per review text (the IMDb CSV repeats 410 texts in 422 extra rows): split by row, a held-out
    review's exact copy could sit in the training set. A text given both labels is dropped altogether."""
    conflicting = df.groupby("review")["label"].transform("nunique") > 1
    repeated = df.duplicated("review", keep="first") & ~conflicting
    if repeated.any() or conflicting.any():
        notes.append(f"data: dropped {int(repeated.sum())} duplicate review(s) and {int(conflicting.sum())} row(s) "
                     f"whose text has both labels, from {source}")
    return df[~(repeated | conflicting)].reset_index(drop=True)


def data_fingerprint(train_df) -> str:
    """A cheap hash of the training reviews (every ~1/500th of them, and their number is kept beside it)."""
    h = hashlib.sha256()
    for text in train_df["review"].iloc[:: max(1, len(train_df) // 500)]:
        h.update(text.encode())
    return h.hexdigest()[:16]


def split_reviews(df: pd.DataFrame, cfg: DataConfig, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic (by ``seed``, the study's split seed) optional subsample, then train / held-out split.
    Reviews are unique texts (:func:`load_reviews` dedupes), so no held-out text is also a training text."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(df))
    if cfg.max_reviews is not None:
        order = order[: cfg.max_reviews]
    n_eval = max(1, int(round(len(order) * cfg.eval_fraction)))
    return df.iloc[order[n_eval:]].reset_index(drop=True), df.iloc[order[:n_eval]].reset_index(drop=True)


CHARS_PER_TOKEN = 8  # a generous bound: IMDb text averages about 4.5 characters per BPE or WordPiece token


def encode_openings(tokenizer, texts, max_tokens: int) -> list[list[int]]:
    """The first ``max_tokens`` token ids of each text (no special tokens), without tokenizing all of every
    long review. Each text is first cut at the last space before ``CHARS_PER_TOKEN * max_tokens`` characters:
    byte-level BPE and WordPiece both split words at whitespace before anything else, so a cut between words
    leaves every token before it unchanged. The few texts whose cut leaves fewer than ``max_tokens`` tokens
    are tokenized whole. Identical to ``tokenizer(texts, truncation=True, max_length=max_tokens)``; a third
    of its time on IMDb reviews at 56 tokens (none at 256: most reviews are shorter than the cut)."""
    texts = [str(t) for t in texts]
    limit = CHARS_PER_TOKEN * max_tokens
    cut = [t if len(t) <= limit or t.rfind(" ", 0, limit) <= 0 else t[:t.rfind(" ", 0, limit)] for t in texts]
    enc = lambda batch: tokenizer(batch, add_special_tokens=False, truncation=True,  # noqa: E731
                                  max_length=max_tokens)["input_ids"]
    ids = enc(cut)
    short = [i for i, (c, t, x) in enumerate(zip(cut, texts, ids)) if len(c) < len(t) and len(x) < max_tokens]
    for i, x in zip(short, enc([texts[i] for i in short]) if short else []):
        ids[i] = x
    return ids


def build_pairs(df: pd.DataFrame, tokenizer, cfg: DataConfig, seed: int, n_pairs: int | None = None,
                what: str = "training") -> list[dict]:
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` (token id lists) as described in the module doc."""
    rng = np.random.default_rng(seed + 1)
    ids = encode_openings(tokenizer, df["review"], cfg.prompt_max_tokens + cfg.response_tokens)
    # A review must have at least one completion token after the longest prompt.
    ok = np.array([len(t) > cfg.prompt_max_tokens for t in ids])
    labels = df["label"].to_numpy()
    pos = rng.permutation(np.flatnonzero(ok & (labels == 1)))
    neg = rng.permutation(np.flatnonzero(ok & (labels == 0)))
    possible = min(len(pos), len(neg))
    if possible == 0 or (n_pairs is not None and n_pairs > possible):
        want = n_pairs if n_pairs is not None else 1
        raise ConfigError(f"{what} data allows {possible} preference pair(s) ({len(pos)} positive, {len(neg)} "
                          f"negative usable reviews) but {want} are needed; use more reviews "
                          f"(--max_reviews / --data) or lower --n_pairs")
    n = possible if n_pairs is None else n_pairs
    ks = rng.integers(cfg.prompt_min_tokens, cfg.prompt_max_tokens + 1, size=n)
    from_pos = rng.random(n) < 0.5
    pairs = []
    for i in range(n):
        p, q, k = ids[pos[i]], ids[neg[i]], int(ks[i])
        prompt = (p if from_pos[i] else q)[:k]
        pairs.append({"prompt": prompt, "chosen": p[k:k + cfg.response_tokens],
                      "rejected": q[k:k + cfg.response_tokens]})
    return pairs


# The held-out prompt draws that commands before the sealed test set evaluated (docs/preregistration.md): the
# per-seed draw [split_seed, seed, 2] at seeds 0-4 (the four committed studies, the default runs, the quick preset's
# first prompts) and 100 (docs/grid_history.md's probes), and the first code's draw that every seed shared
# (default_rng(split_seed)), each of at most 1,024 prompts (no study took more). A draw's first n prompts are the
# first n reviews of its permutation, so these are every review they could have used.
SEEN_DRAW_SEEDS = ((0, 2), (1, 2), (2, 2), (3, 2), (4, 2), (100, 2), None)
SEEN_DRAW_PROMPTS = 1024


def seen_draws(split_seed: int) -> list:
    """The seeds of :data:`SEEN_DRAW_SEEDS` at ``split_seed`` (None: the shared draw, seeded with the split's)."""
    return [split_seed if s is None else [split_seed, *s] for s in SEEN_DRAW_SEEDS]


def build_prompts(df: pd.DataFrame, tokenizer, cfg: DataConfig, seed, n: int, avoid: list | None = None
                  ) -> tuple[list[list[int]], int]:
    """``n`` prompts: openings (2-8 tokens) of the reviews in ``df`` (cycled if there are fewer reviews), a sample
    drawn with ``seed`` (an int or a seed sequence), and how many of them open a review that ``avoid`` uses.

    ``avoid``: the seeds of earlier draws (of :data:`SEEN_DRAW_PROMPTS` prompts each, without ``avoid``); their
    reviews come after every other, so the sample takes reviews no earlier draw used first (the sealed test set)."""
    rng = np.random.default_rng(seed)
    ids = [t for t in encode_openings(tokenizer, df["review"], cfg.prompt_max_tokens)
           if len(t) >= cfg.prompt_min_tokens]
    if not ids:
        raise ConfigError("no held-out review is long enough for a prompt; use more reviews")
    order = rng.permutation(len(ids))
    seen = np.zeros(len(ids), dtype=bool)
    for s in avoid or []:
        seen[np.random.default_rng(s).permutation(len(ids))[:SEEN_DRAW_PROMPTS]] = True
    order = order[np.argsort(seen[order], kind="stable")]  # stable: the fresh reviews first, each part in its order
    ks = rng.integers(cfg.prompt_min_tokens, cfg.prompt_max_tokens + 1, size=n)
    taken = order[np.arange(n) % len(ids)]
    return [ids[i][: int(k)] for i, k in zip(taken, ks)], int(seen[taken].sum())


def check_usable(train_df: pd.DataFrame, eval_df: pd.DataFrame, cfg: DataConfig) -> None:
    """Fail fast, before any model is built or loaded, on data that cannot make the preference pairs.

    A review needs more than ``prompt_max_tokens`` tokens; it has at least one token per word in any
    tokenizer this project uses, so counting words gives a lower bound that needs no tokenizer yet. The
    exact check runs again in :func:`build_pairs`.
    """
    need = cfg.prompt_max_tokens + 1
    for what, df, want in (("training", train_df, (cfg.n_pairs or 1) + cfg.n_val_pairs), ("held-out", eval_df, 1)):
        usable = df[df["review"].str.split().str.len() >= need]
        pos, neg = int((usable.label == 1).sum()), int((usable.label == 0).sum())
        if min(pos, neg) < want:
            raise ConfigError(f"{what} reviews allow at most {min(pos, neg)} preference pair(s) ({pos} positive, "
                              f"{neg} negative reviews of {need}+ words) but {want} are needed; use more reviews of "
                              f"both sentiments (--data / --max_reviews) or lower --n_pairs / --n_val_pairs")


@dataclass
class StudyData:
    """Everything the training and evaluation stages share, in the policy tokenizer's token space."""

    train_pairs: list[dict]
    val_pairs: list[dict]
    eval_pairs: list[dict]
    eval_prompts: list[list[int]]
    # The prompts of every evaluation during training: the validation pairs' openings, of training reviews no
    # training pair uses (so choosing checkpoints never looks at the held-out reviews).
    val_prompts: list[list[int]]
    train_reviews: pd.DataFrame = field(repr=False)
    eval_reviews: pd.DataFrame = field(repr=False)
    # PPO's rollout prompts: the prompts of the training pairs as prepared here. Kept when --pair_source generated
    # replaces the pairs (which drops a prompt whose samples the judge scores alike), so that PPO-GT, which reads
    # no pairs, is the same run in both settings of the study.
    train_prompts: list[list[int]] = field(default_factory=list, repr=False)
    # With --sealed_prompts: how many held-out prompts open a review that an earlier draw used (None without).
    eval_seen_overlap: int | None = None


def prepare(cfg, tokenizer, train_df: pd.DataFrame, eval_df: pd.DataFrame) -> StudyData:
    """Training and validation pairs from the training reviews (sampled with the run's seed: each seed of a
    study sees a different pair sample), held-out pairs from the held-out reviews (the same for every seed) and
    held-out evaluation prompts (each seed its own sample of the held-out reviews' openings). Runs are evaluated
    on the validation prompts while they train and on the held-out prompts only at the end."""
    dc, n_val = cfg.data, cfg.data.n_val_pairs
    pairs = build_pairs(train_df, tokenizer, dc, cfg.run.seed, None if dc.n_pairs is None else dc.n_pairs + n_val)
    if len(pairs) <= n_val:
        raise ConfigError(f"training data allows {len(pairs)} preference pair(s), not enough for {n_val} validation "
                          f"pairs plus training pairs; use more reviews or lower --n_val_pairs")
    # Pairs come in random order and no review is in two pairs: the last n_val are a disjoint validation set.
    train_pairs, val_pairs = pairs[:-n_val], pairs[-n_val:]
    eval_pairs = build_pairs(eval_df, tokenizer, dc, dc.split_seed + 100, what="held-out")
    # Each seed draws its own held-out prompts, so that a study's seeds also sample the prompts. The sealed draw
    # (--sealed_prompts) is another stream, which takes the reviews that no earlier draw used first.
    sealed = cfg.eval.sealed_prompts
    eval_prompts, overlap = build_prompts(eval_df, tokenizer, dc, [dc.split_seed, cfg.run.seed, 3 if sealed else 2],
                                          cfg.eval.n_eval_prompts, seen_draws(dc.split_seed) if sealed else None)
    return StudyData(train_pairs, val_pairs, eval_pairs, eval_prompts, [p["prompt"] for p in val_pairs], train_df,
                     eval_df, [p["prompt"] for p in train_pairs], overlap if sealed else None)
