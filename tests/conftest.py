"""Shared fixtures. Everything here is offline: tiny synthetic data and models, or the smoke preset."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# The suite forks subprocesses after tokenizing in-process: keep the tokenizers single-threaded, as a parallel
# tokenizer warns in every forked child (on its stderr, which tests read).
os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = Path(__file__).resolve().parents[1]
IMDB_CSV = ROOT / "data" / "IMDB Dataset.csv"
# Every run of the suite pins its precision: ``--dtype auto`` is bf16 on a CPU with bf16 matrix units and fp32
# elsewhere, and a test that compares numbers must mean the same run on every machine.
SMOKE = ("--preset", "smoke", "--dtype", "fp32")

POS = ["a wonderful film with great acting and a lovely story", "brilliant and moving, I loved every minute",
       "one of the best movies of the year, superb cast", "delightful, funny and warm, highly recommended"]
NEG = ["a terrible film with awful acting and a boring story", "dreadful and dull, I hated every minute",
       "one of the worst movies of the year, wooden cast", "painful, stupid and cold, avoid it at all costs"]


def synthetic_reviews(n: int = 80) -> pd.DataFrame:
    rows = []
    for i in range(n):
        text = (POS if i % 2 == 0 else NEG)[i % 4] + f" review number {i} <br /><br />the end of it"
        rows.append((text, "positive" if i % 2 == 0 else "negative"))
    return pd.DataFrame(rows, columns=["review", "sentiment"])


@pytest.fixture(scope="session")
def tiny_tokenizer():
    bpe = ByteLevelBPETokenizer()
    texts = synthetic_reviews(200)["review"].tolist()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])
    tok.padding_side = "left"
    return tok


@pytest.fixture()
def tiny_lm(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.eos_token_id)
    return GPT2LMHeadModel(cfg).eval()


@torch.no_grad()
def summed_response_logps(lm, prompts, responses, pad_id: int, batch_size: int, device="cpu",
                          temperature: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Test oracle: (N,) summed log-probs of each response given its prompt under ``softmax(logits / T)``, from
    the causal LM's whole (B, T, V) log-softmax (the code under test never builds it). The transformer runs at
    ``dtype``, the LM head in fp32."""
    from modeling.batching import response_batch
    from modeling.models import autocast

    out = []
    for s in range(0, len(prompts), batch_size):
        b = {k: v.to(device) for k, v in response_batch(prompts[s:s + batch_size], responses[s:s + batch_size],
                                                        pad_id).items()}
        with autocast(device, dtype):
            hidden = lm.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        logits = lm.get_output_embeddings()(hidden.float())
        # the state at t predicts token t + 1
        logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
        token = logp.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
        out.append((token * b["response_mask"][:, 1:]).sum(-1).cpu())
    return torch.cat(out)


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 300, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run ``main.py`` in a subprocess exactly as a user would (minus uv), from the repository root (or ``cwd``,
    where its default relative paths then land)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_main(*args: str) -> subprocess.CompletedProcess:
    """Run ``main.main(args)`` in this process (the modelling stack is imported once for the whole suite)
    and capture what it prints; same result fields as :func:`run_cli`."""
    import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main.main(list(args))
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["main.py", *args], code, out.getvalue(), err.getvalue())


def copy_offline_models(src_models: Path, dst_models: Path) -> None:
    """Reuse already built smoke models (same settings) instead of building them again."""
    shutil.copytree(Path(src_models) / "offline", Path(dst_models) / "offline")


def require_imdb():
    if not IMDB_CSV.exists():
        pytest.fail(f"{IMDB_CSV} is missing: link ../shared/data/IMDB Dataset.csv into data/ (.ci/run does)")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One full ``--preset smoke`` run shared by the end-to-end tests."""
    require_imdb()
    out = tmp_path_factory.mktemp("smoke")
    proc = run_main(*SMOKE, "--output_dir", str(out / "models"), "--plots_dir", str(out / "plots"))
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": out, "proc": proc, "results": json.loads((out / "plots" / "results.json").read_text())}


# ------------------------------------------------------------------ hub-format fixtures (the paper path)
EOT = "<|endoftext|>"


def _fixture_reviews(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """Distinct, long enough reviews of both sentiments (random words around sentiment words)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    filler = ["the", "film", "plot", "actor", "scene", "story", "music", "and", "it", "was", "a", "this"]
    rows = []
    for i in range(n):
        words = list(rng.choice(filler, 20)) + [f"w{i}"]
        mood = (POS if i % 2 == 0 else NEG)[i % 4].split()
        rows.append((" ".join(mood[:4] + words + mood[4:]), i % 2 == 0))
    return pd.DataFrame(rows, columns=["text", "positive"])


def build_hub_fixtures(root: Path) -> dict[str, Path]:
    """Tiny models and data saved exactly in the hub's formats, offline, in a second or two:

    * ``gpt2``: like ``distilgpt2`` -- byte-level BPE ``GPT2TokenizerFast`` with ``<|endoftext|>`` as bos, eos
      and unk, **no pad token**, and a config without ``pad_token_id``;
    * ``judge``: like the SST-2 DistilBERT -- uncased WordPiece tokenizer, ``{0: NEGATIVE, 1: POSITIVE}``;
    * ``imdb_disk`` / ``imdb_parquet``: IMDb in the hub dataset's layout (``text``, integer ``label``;
      ``train``, ``test`` and an ``unsupervised`` split labelled -1), written by ``save_to_disk`` and as the hub
      repository's own parquet files.
    """
    import datasets
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizerFast,
        GPT2TokenizerFast,
    )

    reviews = _fixture_reviews()
    texts = reviews["text"].tolist()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=[EOT], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                    bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    assert lm.config.pad_token_id is None and tok.pad_token is None
    tok.save_pretrained(root / "gpt2")
    lm.save_pretrained(root / "gpt2")

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=300, min_frequency=1, show_progress=False)
    jtok = DistilBertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True,
                                   model_max_length=512)
    judge = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(jtok), dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=128,
        pad_token_id=jtok.pad_token_id, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    jtok.save_pretrained(root / "judge")
    judge.save_pretrained(root / "judge")

    half = len(reviews) // 2
    labelled = reviews.assign(label=reviews["positive"].astype(int))[["text", "label"]]
    splits = {"train": labelled.iloc[:half], "test": labelled.iloc[half:],
              "unsupervised": pd.DataFrame({"text": [f"an unlabelled review number {i}" for i in range(30)],
                                            "label": -1})}
    dd = datasets.DatasetDict({name: datasets.Dataset.from_pandas(df, preserve_index=False)
                               for name, df in splits.items()})
    dd.save_to_disk(str(root / "imdb_disk"))
    (root / "imdb_parquet" / "plain_text").mkdir(parents=True)
    for name, df in splits.items():
        df.to_parquet(root / "imdb_parquet" / "plain_text" / f"{name}-00000-of-00001.parquet", index=False)
    return {name: root / name for name in ("gpt2", "judge", "imdb_disk", "imdb_parquet")}


def put_in_hub_cache(cache: Path, repo_id: str, files_from: Path) -> None:
    """Lay ``files_from`` out as a downloaded snapshot of ``repo_id`` in a Hugging Face hub cache."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)


@pytest.fixture(scope="session")
def hub_fixtures(tmp_path_factory):
    return build_hub_fixtures(tmp_path_factory.mktemp("hub_fixtures"))
