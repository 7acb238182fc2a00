"""Where one DPO optimiser step spends its time: torch.profiler over a few steps of this project's update.

    uv run benchmarks/profile_dpo_step.py [--batch 16] [--steps 5]

Uses the offline preset's base GPT-2 (built if missing) and its first training pairs; prints the top
operators by self CPU time and the share of forward, backward and optimiser. Prints numbers only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import dataset  # noqa: E402
from config import PRESETS  # noqa: E402
from dpo_utils import concatenated_forward, dpo_loss  # noqa: E402
from modeling.batching import concatenated_batch  # noqa: E402
from modeling.logprobs import ResponseLogProbs  # noqa: E402
from modeling.models import load_causal_lm, load_tokenizer  # noqa: E402
from modeling.offline_models import ensure_offline_models  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", choices=["offline", "smoke"], default="offline",
                    help="smoke: the smoke preset's tiny GPT-2 (a check that the profile runs, not a measurement)")
    a = ap.parse_args()
    cfg = PRESETS[a.size]
    reviews = dataset.load_reviews(cfg.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
    path = ensure_offline_models(cfg, train_df, eval_df)["policy_model"]
    tok = load_tokenizer(path)
    policy = ResponseLogProbs(load_causal_lm(path))  # the training loop's own log-prob head
    pairs = dataset.build_pairs(train_df, tok, cfg.data, cfg.run.seed, n_pairs=a.batch * (a.steps + 1))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)
    batches = [concatenated_batch(pairs[i * a.batch:(i + 1) * a.batch], tok.pad_token_id) for i in range(a.steps + 1)]
    with torch.no_grad():
        refs = [concatenated_forward(policy, b) for b in batches]

    def step(b, ref):
        with record_function("forward"):
            c, r = concatenated_forward(policy, b)
            loss = dpo_loss(c, r, ref[0], ref[1], beta=0.1)[0].mean()
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    step(batches[0], refs[0])  # warm-up
    t0 = time.time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b, ref in zip(batches[1:], refs[1:]):
            step(b, ref)
    wall = (time.time() - t0) / a.steps
    tokens = int(batches[1]["attention_mask"].sum())
    print(f"one step: {wall * 1000:.0f} ms for {a.batch} pairs ({tokens} tokens, {a.batch / wall:.1f} pairs/s; "
          f"profiler overhead included)")
    events = {e.key: e for e in prof.key_averages()}
    total = sum(events[k].cpu_time_total for k in ("forward", "backward", "optimizer") if k in events)
    for k in ("forward", "backward", "optimizer"):
        if k in events:
            print(f"  {k:<10}{events[k].cpu_time_total / 1000 / a.steps:>8.1f} ms  "
                  f"{100 * events[k].cpu_time_total / total:>5.1f}%")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
