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

ROOT = Path(__file__).resolve().parents[1]
IMDB_CSV = ROOT / "data" / "IMDB Dataset.csv"

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


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``main.py`` in a subprocess exactly as a user would (minus uv), from the repository root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env, capture_output=True,
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
    proc = run_main("--preset", "smoke", "--output_dir", str(out / "models"), "--plots_dir", str(out / "plots"))
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": out, "proc": proc, "results": json.loads((out / "plots" / "results.json").read_text())}
