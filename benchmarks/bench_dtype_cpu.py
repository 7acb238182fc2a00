"""bf16 autocast vs fp32 on this CPU: one training step (forward, backward, AdamW) of each model shape this
project trains, from the smoke GPT-2 to a distilgpt2-shaped model. The measurements behind ``--dtype auto``'s
CPU rule (``models.CPU_BF16_MIN_WIDTH``): see BENCHMARKS.md.

    uv run benchmarks/bench_dtype_cpu.py                  # every shape, 2 repeats of 6 timed steps
    uv run benchmarks/bench_dtype_cpu.py --shapes judge offline_lm --steps 10

Prints one line per shape and precision and a JSON summary (``--out FILE`` also writes it). Models are
random-init: the speed of a step depends on the shapes, not the weights. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from modeling.models import autocast  # noqa: E402

# name: (kind, layers, width, heads, vocab, batch, seq_len); batch and length as in the stage that trains it
SHAPES = {
    "smoke_lm": ("gpt2", 1, 32, 2, 512, 16, 64),            # smoke preset's GPT-2, pre-training step
    "judge": ("distilbert", 1, 64, 2, 16_000, 64, 256),     # offline judge, training step on whole reviews
    "quick_lm": ("gpt2", 2, 128, 4, 2_048, 32, 40),         # quick preset's GPT-2, pre-training step
    "offline_lm": ("gpt2", 4, 192, 4, 8_192, 32, 64),       # offline GPT-2, pre-training step
    "offline_dpo": ("gpt2", 4, 192, 4, 8_192, 32, 40),      # offline DPO step: 16 pairs, 8-token prompt + 32
    "gpt2_384": ("gpt2", 6, 384, 6, 8_192, 32, 64),         # between the offline GPT-2 and distilgpt2
    "distilgpt2": ("gpt2", 6, 768, 12, 50_257, 8, 64),      # distilgpt2's shape (paper preset policy)
}


def build(kind, layers, width, heads, vocab):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=width, n_layer=layers, n_head=heads,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = DistilBertConfig(vocab_size=vocab, dim=width, n_layers=layers, n_heads=heads, hidden_dim=4 * width,
                           max_position_embeddings=512, num_labels=2, dropout=0.0, attention_dropout=0.0)
    return DistilBertForSequenceClassification(cfg)


def step_time(model, kind, batch, seq_len, vocab, dtype, steps: int) -> float:
    """Median seconds of one training step over ``steps`` timed steps (after 2 untimed ones)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, seq_len), generator=g)
    mask = torch.ones_like(x)
    y = torch.randint(0, 2, (batch,), generator=g)
    model.train()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with autocast("cpu", dtype):
            out = model(input_ids=x, attention_mask=mask, labels=x if kind == "gpt2" else y)
        opt.zero_grad(set_to_none=True)
        out.loss.float().backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=2, help="alternating fp32/bf16 measurements per shape")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="time these only (fp32 alone: e.g. under pinned AVX2 kernels, where bf16 is emulated)")
    p.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = p.parse_args(argv)
    info = machine("cpu")
    print(json.dumps(info))
    rows = []
    for name in args.shapes:
        kind, layers, width, heads, vocab, batch, seq_len = SHAPES[name]
        t = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):  # alternate, so a slow spell of the machine hits both
            for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                if label not in args.precisions:
                    continue
                model = build(kind, layers, width, heads, vocab)
                t[label].append(step_time(model, kind, batch, seq_len, vocab, dtype, args.steps))
        best = {k: min(v) for k, v in t.items() if v}
        row = {"shape": name, "kind": kind, "layers": layers, "width": width, "vocab": vocab, "batch": batch,
               "seq_len": seq_len, **{f"{k}_step_s": v for k, v in best.items()}}
        line = f"{name:12s} {kind:10s} {layers}x{width:<4d}"
        line += "".join(f" {k} {v * 1e3:8.1f} ms" for k, v in best.items())
        if len(best) == 2:
            row["bf16_speedup"] = best["fp32"] / best["bf16"]
            line += f"  bf16 speed-up {row['bf16_speedup']:.2f}x"
        rows.append(row)
        print(line, flush=True)
    summary = {"machine": info, "steps": args.steps, "repeats": args.repeats, "shapes": rows}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
