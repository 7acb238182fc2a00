"""The one place that loads tokenizers, causal LMs and the judge, from a hub id or a local directory.

Hub ids are loaded from the local cache only (``local_files_only``) when :func:`hub.hub_preflight` found the
hub unusable.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from config import ConfigError
from runtime import hub


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
                          f"local cache; use --preset quick (small models built from IMDb here, about 2 minutes on a "
                          f"CPU), --preset offline (the full study's) or pass a local directory") from None


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


# Below this width (the model's hidden size) bf16 autocast does not pay on a CPU, even with bf16 matrix units:
# the matrices are too small for AMX / AVX512-BF16 to win back the casts autocast adds around every op. 192 is
# the smallest width measured faster on both CPUs measured (benchmarks/bench_dtype_cpu.py; BENCHMARKS.md,
# "Precision"); 128 wide was slower (0.78-0.83x) on the AMX Xeon.
CPU_BF16_MIN_WIDTH = 192
# Set to 1 or 0 to make the CPU probe report bf16 matrix units or not, whatever the CPU has: the test suite's
# way to take the bf16 branch of ``--dtype auto`` on a CPU without them (and the fp32 branch on one with them).
FORCE_CPU_BF16_ENV = "DPO_FORCE_CPU_BF16_UNITS"


def cpu_bf16_units() -> bool:
    """Whether this CPU has bf16 matrix units (AMX tiles or AVX512-BF16), asked of torch's own CPU feature
    detection, or as forced by ``$DPO_FORCE_CPU_BF16_UNITS`` (``1`` / ``0``)."""
    forced = os.environ.get(FORCE_CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def bf16_native(device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 units (emulation does not count: a T4
    or V100 would emulate it, slowly), or a CPU with AMX or AVX512-BF16 (:func:`cpu_bf16_units`). Without
    them bf16 is emulated: measured ~20x slower than fp32 for a training step on an AVX2-only CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no such argument and never counted emulation
            return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return cpu_bf16_units()
    return False


def auto_dtype(device, width: int | None = None) -> torch.dtype:
    """The rule behind ``--dtype auto``, fixed by the hardware and the model, never by a timing at run time
    (which would make the numbers depend on the machine's load):

    * CUDA: bf16 where the GPU has bf16 units (:func:`bf16_native`), else fp32;
    * CPU: bf16 where it has bf16 matrix units **and** the model is at least :data:`CPU_BF16_MIN_WIDTH` wide
      (``width``: its hidden size; None counts as wide), else fp32;
    * anything else: fp32.
    """
    dev = torch.device(device)
    if not bf16_native(dev):
        return torch.float32
    if dev.type == "cpu" and width is not None and width < CPU_BF16_MIN_WIDTH:
        return torch.float32
    return torch.bfloat16


def resolve_dtype(name: str, device, width: int | None = None) -> torch.dtype:
    """``--dtype``: ``fp32`` and ``bf16`` as asked; ``auto`` by :func:`auto_dtype` for a model ``width`` wide."""
    if name == "auto":
        return auto_dtype(device, width)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def model_width(model_or_config) -> int | None:
    """The hidden size of a model (or its config): what :func:`auto_dtype` reads on a CPU."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for attr in ("hidden_size", "n_embd", "dim", "d_model"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


def load_config(name: str):
    """A model's config alone (no weights): enough to know its width before the weights are loaded."""
    return _load(AutoConfig, name, "model config")


def threads_key(device) -> dict:
    """``{"torch_threads": n}``: the CPU thread count, on which fp32 sums depend on some CPUs (an AVX2-only EPYC
    differed in the 8th digit at 1 and 2 threads); None off the CPU. Part of every cache key whose numbers it
    changes (reference log-probs, reward models, judged pairs, SFT, held-out evaluations), so that a cached number
    is never mixed with one made at another thread count. The self-built models are the exception: built once and
    reused at any thread count, they record theirs in their report."""
    return {"torch_threads": torch.get_num_threads() if torch.device(device).type == "cpu" else None}


def machine_info(device="cpu") -> dict:
    """What a number's reproduction depends on besides the code and the data: the CPU model, the flags that
    change which kernels run, torch's CPU capability, thread count and version, and the GPU when on one."""
    import platform

    cpu, flags = "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not cpu:
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    info = {"cpu": cpu, "cpu_flags": [f for f in wanted if f in flags], "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "cpu_bf16_units": cpu_bf16_units()}
    kernel_env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR",
                                             FORCE_CPU_BF16_ENV) if k in os.environ}
    if kernel_env:
        info["kernel_env"] = kernel_env
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


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
