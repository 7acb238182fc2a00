"""The one place that loads tokenizers, causal LMs and the judge, from a hub id or a local directory.

Hub ids are loaded from the local cache only (``local_files_only``) when :func:`hub.hub_preflight` found the
hub unusable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import hub
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


def _load(loader, name: str, what: str, **kw):
    if hub.looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{what} path {name} does not exist; pass an existing directory saved with "
                              f"save_pretrained, or a hub id")
        name = str(path)
    if hub.LOCAL_FILES_ONLY:
        kw = {**kw, "local_files_only": True}
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


def bf16_native(device) -> bool:
    """Whether ``device`` has bf16 matrix units: a CUDA GPU that supports bf16, or a CPU with AMX or
    AVX512-BF16 (asked of torch's own CPU feature detection, not guessed from the model name). Without
    them bf16 is emulated: measured ~20x slower than fp32 for a training step on an AVX2-only CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_dtype(name: str, device) -> torch.dtype:
    """``--dtype``: ``auto`` is bf16 autocast where :func:`bf16_native` says so, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if bf16_native(device) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def autocast(device, dtype: torch.dtype):
    """Mixed precision for forward passes: bf16 autocast when ``dtype`` is bf16, a no-op for fp32. Weights,
    optimiser states and the log-prob sums stay fp32 either way."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


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
