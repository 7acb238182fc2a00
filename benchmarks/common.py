"""What the benchmark scripts share: peak-memory measurement and the machine's description."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch


class PeakMemory:
    """Peak memory while the block runs: ``torch.cuda.max_memory_allocated`` on a GPU, else this process's
    resident set size (RSS) sampled every 10 ms. ``.peak_mb`` after the block."""

    def __init__(self, device="cpu"):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._peak, self._proc.memory_info().rss) / 2**20


# The offline preset's models, built from scratch on this project's 2-core machines (docs/method.md: about 14 minutes).
OFFLINE_BUILD_MIN = 14


def offline_models(train_df, eval_df, policy_model: str | None = None, judge_model: str | None = None,
                   preset: str = "offline") -> dict:
    """The offline preset's ``{"policy_model": dir, "judge_model": dir}``: the directories given, else the
    ones ``uv run main.py --preset offline --dtype fp32`` builds (models/offline/), reused when built and
    otherwise built now, after one line that says how long that takes and how to avoid it. ``preset="smoke"``:
    the smoke preset's tiny models instead (built in seconds: the benchmarks' own smoke test)."""
    from config import PRESETS
    from modeling import offline_models as om

    cfg = PRESETS[preset].replace(model={"dtype": "fp32"})
    given = {"policy_model": policy_model, "judge_model": judge_model}
    needed = {name: art.path for name, art in om.offline_artifacts(cfg, train_df).items()}
    missing = [str(p) for name, p in needed.items() if given[name] is None and not p.is_dir()]
    if missing and preset == "offline":
        print(f"benchmark: the offline models are not built ({', '.join(missing)}): building them first at fp32, "
              f"about {OFFLINE_BUILD_MIN} min on 2 cores. To skip that, pass --model_dir (and --judge_dir) with "
              f"existing model directories", file=sys.stderr, flush=True)
    built = om.ensure_offline_models(cfg, train_df, eval_df) if missing else {k: str(v) for k, v in needed.items()}
    return {k: given[k] or built[k] for k in given}


def machine(device="cpu") -> dict:
    """The machine a number was measured on (:func:`models.machine_info`: CPU model and flags, torch's CPU
    capability, threads and version, the GPU when on one)."""
    from modeling.models import machine_info

    return machine_info(device)


DISTILGPT2 = {"n_layer": 6, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
SST2_JUDGE = {"n_layers": 6, "dim": 768, "n_heads": 12, "hidden_dim": 3072, "vocab_size": 30522,
              "max_position_embeddings": 512}


# --tiny: the same code paths at toy shapes (a check that a benchmark runs, not a measurement)
TINY_GPT2 = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 1000, "n_positions": 256}
TINY_JUDGE = {"n_layers": 1, "dim": 32, "n_heads": 2, "hidden_dim": 64, "vocab_size": 1000,
              "max_position_embeddings": 512}


def build_standins(root: Path, train_df, lm_shape: dict = DISTILGPT2, judge_shape: dict = SST2_JUDGE
                   ) -> tuple[str, str]:
    """Random-init models of the paper's shapes (or ``lm_shape``, ``judge_shape``), saved like hub models, with
    tokenizers trained on reviews."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizerFast,
        GPT2Config,
        GPT2LMHeadModel,
        GPT2TokenizerFast,
    )

    texts = train_df["review"].sample(n=min(8000, len(train_df)), random_state=0).tolist()
    eot = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=lm_shape["vocab_size"], min_frequency=2, special_tokens=[eot],
                            show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eot, eos_token=eot, unk_token=eot)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(**lm_shape, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    tok.save_pretrained(root / "policy")
    lm.save_pretrained(root / "policy")

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=judge_shape["vocab_size"], min_frequency=2, show_progress=False)
    jtok = DistilBertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True,
                                   model_max_length=512)
    judge = DistilBertForSequenceClassification(DistilBertConfig(
        **judge_shape, pad_token_id=jtok.pad_token_id, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    jtok.save_pretrained(root / "judge")
    judge.save_pretrained(root / "judge")
    return str(root / "policy"), str(root / "judge")
