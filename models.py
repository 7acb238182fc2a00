"""The one place that loads tokenizers, causal LMs and the judge, from a hub id or a local directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from config import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    return torch.device(name)


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else (./x, /abs, a/b/c, ~) is meant as a directory.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def _load(loader, name: str, what: str, **kw):
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{what} path {name} does not exist; pass an existing directory saved with "
                              f"save_pretrained, or a hub id")
        name = str(path)
    try:
        return loader.from_pretrained(name, **kw)
    except OSError as e:
        if Path(name).is_dir():
            raise ConfigError(f"{what} at {name} cannot be loaded ({str(e).splitlines()[0]}); point to a "
                              f"directory written by save_pretrained") from None
        raise ConfigError(f"cannot load {what} {name!r}: the model hub is unreachable and it is not in the "
                          f"local cache; use --preset offline (models built from IMDb here) or pass a local "
                          f"directory") from None


def load_tokenizer(name: str):
    """GPT-2 style tokenizer set up for this project.

    GPT-2 has no pad token: we reuse EOS, and we never let padding reach a loss because every batch carries
    an explicit mask. Padding is on the left so that batched generation continues right after each prompt.
    """
    tok = _load(AutoTokenizer, name, "model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(name: str, device: torch.device | str = "cpu"):
    model = _load(AutoModelForCausalLM, name, "model", dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    return model.to(device).eval()  # eval(): dropout off, as DPO/PPO assume deterministic log-probs


def load_judge(name: str, device: torch.device | str = "cpu"):
    """(tokenizer, model) of a sentiment classifier with a ``POSITIVE`` label (like the SST-2 DistilBERT)."""
    tok = _load(AutoTokenizer, name, "judge tokenizer")
    model = _load(AutoModelForSequenceClassification, name, "judge", dtype=torch.float32).to(device).eval()
    labels = {v.upper(): int(k) for k, v in model.config.id2label.items()}
    if "POSITIVE" not in labels:
        raise ConfigError(f"judge {name} has labels {sorted(labels)}; it needs a POSITIVE label (an SST-2 style "
                          f"sentiment classifier)")
    model.positive_index = labels["POSITIVE"]
    return tok, model


def autocast_dtype(device) -> torch.dtype:
    """The compute precision of forward passes on ``device``: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def autocast(device):
    """bf16 autocast where :func:`autocast_dtype` says bf16; a no-op (fp32) elsewhere."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=autocast_dtype(device) == torch.bfloat16)


def weights_fingerprint(model) -> str:
    """Hash of every parameter and buffer (names, dtypes, values): a cache key that changes when the weights
    do, whatever path or hub id they were loaded from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def max_positions(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 1024))
