"""PPO throughput: this project's PPO vs TRL 1.12's ``trl.experimental.ppo.PPOTrainer``, in one process.

    uv run --group bench --with "trl==1.12.*" benchmarks/bench_ppo.py [--iters 8] [--repeats 2]

TRL 1.12 is the last TRL with PPO; it is pinned for this script only (``--with``); without it only ours runs.
Both get the same work: the offline preset's base GPT-2 as the policy and the reference, the offline preset's
reward model (trained once, outside the timed region), the training pairs' prompts, 64 rollouts an iteration
sampled at temperature 1 for up to the preset's response length, 4 PPO epochs, forward and backward passes on
micro-batches of 16 (ours steps the optimiser after each; TRL 1.12, whose rollout batch is its micro-batch
times its gradient accumulation, once per epoch: the same model work, fewer optimiser steps), the same
learning rate, clip ranges, gamma and lambda, fp32 on the CPU, and the same number of iterations. TRL
adds a separate value model (its design; ours is a value head on the policy) and a fixed KL coefficient (ours
adapts; the cost is the same). Ours charges the KL as every preset does (``--kl_penalty full``: the exact KL over
the vocabulary in each token's reward, plus its gradient as a loss term; it reads both models' vocabulary
log-probs at the response tokens), or with ``--kl_penalty sampled`` as TRL does, per sampled token: TRL's work.

Timed: ours from the first iteration to the last (the reward model, trained once or reused from the offline
preset's cache ``models/reward_models/``, is not timed); TRL's
``trainer.train()``. Phases: generation, the rollout's scoring passes (log-probs, reference, values, reward:
no gradients) and the update (the rest), TRL's by wrapping its module-level ``batch_generation``,
``forward`` and ``get_reward``. Peak RSS per trainer. Prints a table and one JSON line; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import PeakMemory, machine, offline_models  # noqa: E402

import dataset  # noqa: E402
import train_ppo  # noqa: E402
from config import PRESETS  # noqa: E402
from modeling.models import load_causal_lm, load_judge, load_tokenizer  # noqa: E402
from runtime.run_log import read_metrics  # noqa: E402
from runtime.run_utils import make_accelerator  # noqa: E402
from training.lifecycle import RunContext  # noqa: E402
from training.reward_model import train_reward_model  # noqa: E402

PHASES = ("generation_s", "scoring_s", "update_s")


def run_ours(cfg, data, ctx, out: str) -> dict:
    with PeakMemory() as mem:  # the reward model comes from its cache: the iterations alone are timed
        train_ppo.train(cfg, data, ctx, name="bench", evaluate=False)
    rows = read_metrics(Path(out) / "runs" / "bench" / "metrics.jsonl")  # one row per iteration
    phases = {"generation_s": sum(r["charts/generation_s"] for r in rows),
              "scoring_s": sum(r["charts/logps_s"] + r["charts/score_s"] for r in rows),
              "update_s": sum(r["charts/update_s"] for r in rows)}
    return {"train_s": sum(phases.values()), "phases": phases, "peak_mb": mem.peak_mb, "iterations": len(rows)}


def run_trl(cfg, data, tok, policy_dir: str, rm_dir: str, iters: int) -> dict:
    import datasets
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    pc = cfg.ppo
    spent = dict.fromkeys(PHASES, 0.0)

    def timed(fn, phase):
        def wrapper(*a, **k):
            t = time.time()
            try:
                return fn(*a, **k)
            finally:
                # forward() also serves the update, with gradients: those calls are the update's
                spent[phase if phase == "generation_s" or not torch.is_grad_enabled() else "update_s"] += \
                    time.time() - t
        return wrapper

    originals = {name: getattr(trl_ppo, name) for name in ("batch_generation", "forward", "get_reward")}
    trl_ppo.batch_generation = timed(originals["batch_generation"], "generation_s")
    trl_ppo.forward = timed(originals["forward"], "scoring_s")
    trl_ppo.get_reward = timed(originals["get_reward"], "scoring_s")
    prompts = datasets.Dataset.from_dict({"input_ids": data.train_prompts[: pc.ppo_batch_size * (iters + 1)]})
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, use_cpu=True, bf16=False, fp16=False, learning_rate=pc.ppo_lr,
                         # TRL 1.12's rollout batch is per_device_train_batch_size x gradient_accumulation_steps,
                         # and an optimiser step takes gradient_accumulation_steps micro-batches: 64 rollouts an
                         # iteration, micro-batches of 16, one optimiser step per epoch (ours: one per 16).
                         per_device_train_batch_size=pc.ppo_mini_batch_size,
                         gradient_accumulation_steps=pc.ppo_batch_size // pc.ppo_mini_batch_size,
                         num_mini_batches=1, num_ppo_epochs=pc.ppo_epochs,
                         total_episodes=pc.ppo_batch_size * iters, response_length=cfg.data.response_tokens,
                         local_rollout_forward_batch_size=pc.ppo_batch_size, temperature=1.0, kl_coef=pc.init_kl_coef,
                         cliprange=pc.clip_coef, cliprange_value=pc.vf_clip_coef, vf_coef=pc.vf_coef, gamma=pc.gamma,
                         lam=pc.gae_lambda, stop_token="eos", missing_eos_penalty=None, num_sample_generations=0,
                         report_to=[], save_strategy="no", logging_steps=1, seed=cfg.run.seed)
        value = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        reward = AutoModelForSequenceClassification.from_pretrained(rm_dir)
        for m in (value, reward):
            m.config.pad_token_id = tok.pad_token_id
        trainer = PPOTrainer(args=args, processing_class=tok, model=load_causal_lm(policy_dir),
                             ref_model=load_causal_lm(policy_dir), reward_model=reward, value_model=value,
                             train_dataset=prompts, eval_dataset=prompts.select(range(8)))
        with PeakMemory() as mem:
            t0 = time.time()
            trainer.train()
            wall = time.time() - t0
    for name, fn in originals.items():
        setattr(trl_ppo, name, fn)
    spent["update_s"] += wall - sum(spent.values())  # the update is everything else
    return {"train_s": wall, "phases": spent, "peak_mb": mem.peak_mb, "iterations": iters}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--kl_penalty", choices=("full", "sampled", "loss"), default="full",
                    help="ours: full (every preset's PPO) reads the vocabulary's log-probs at the response tokens, "
                         "the reference's from one pass per rollout batch; sampled charges the KL as TRL does, per "
                         "sampled token: TRL's work; loss: the loss-term variant")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each trainer; medians are reported")
    ap.add_argument("--model_dir", help="an existing policy model directory (default: the offline preset's fp32 "
                                        "base GPT-2, built first if missing: about 14 min)")
    ap.add_argument("--judge_dir", help="an existing judge directory (default: the offline preset's)")
    ap.add_argument("--size", choices=["offline", "smoke"], default="offline",
                    help="smoke: the smoke preset's tiny models and settings (a check that the benchmark runs, not "
                         "a measurement)")
    a = ap.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    try:
        import trl

        have_trl = trl.__version__.startswith("1.12")
    except ImportError:
        have_trl = False
    if not have_trl:
        print("TRL 1.12 not importable: timing ours only (run with --with \"trl==1.12.*\" to compare)",
              file=sys.stderr)

    base = PRESETS[a.size]
    reviews = dataset.load_reviews(base.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, base.data, base.data.split_seed)
    paths = offline_models(train_df, eval_df, a.model_dir, a.judge_dir, preset=a.size)
    tok = load_tokenizer(paths["policy_model"])
    acc = make_accelerator(torch.device("cpu"))
    ref = load_causal_lm(paths["policy_model"])
    judge_tok, judge = load_judge(paths["judge_model"])
    data = dataset.prepare(base, tok, train_df, eval_df)
    ctx = RunContext(tokenizer=tok, ref_model=ref, device=torch.device("cpu"), acc=acc,
                     batch_size=base.eval.eval_batch_size, judge_tok=judge_tok, judge=judge)
    rm_root = tempfile.mkdtemp(prefix="bench_ppo_rm_")
    # The reward model is not timed: reuse (or fill) the offline preset's cache, e.g. a study's seed-0 model.
    shared_rms = Path(base.run.cache_dir) / "reward_models"
    shared_rms.mkdir(parents=True, exist_ok=True)
    (Path(rm_root) / "reward_models").symlink_to(shared_rms.resolve(), target_is_directory=True)
    cfg = base.replace(model={**paths, "build_offline_models": False, "dtype": "fp32"},
                       ppo={"ppo_steps": a.iters, "ppo_eval_steps": [], "target_kl": None,
                            "kl_penalty": a.kl_penalty},
                       run={"output_dir": rm_root, "cache_dir": rm_root, "log_every": 10**9, "save_every": 10**9})
    print("training the reward model once (not timed)", file=sys.stderr)
    _, rm_report = train_reward_model(cfg, data, ctx)
    if have_trl:  # TRL loads the same reward model from its cache directory: the one whose report this is
        timing = {"reused", "train_s", "test_s", "cached_train_s", "cached_test_s"}  # differ for a reused model

        def same(r: dict) -> dict:
            return {k: v for k, v in r.items() if k not in timing}

        # Models trained at other thread counts (cache keys differ) can share a report: any of them is the same
        # work for TRL; the newest is the one just trained or reused.
        rm_dir = max((d for d in shared_rms.iterdir() if (d / "rm_report.json").exists()
                      and same(json.loads((d / "rm_report.json").read_text())) == same(rm_report)),
                     key=lambda d: (d / "rm_report.json").stat().st_mtime)

    runs = {"ours": [], "trl_1.12": []}
    for r in range(a.repeats):
        print(f"repeat {r + 1}/{a.repeats}", file=sys.stderr)
        runs["ours"].append(run_ours(cfg, data, ctx, rm_root))
        if have_trl:
            runs["trl_1.12"].append(run_trl(cfg, data, tok, paths["policy_model"], str(rm_dir), a.iters))
    runs = {k: v for k, v in runs.items() if v}

    pc = cfg.ppo
    summary = {"machine": machine(), "iters": a.iters, "rollouts_per_iter": pc.ppo_batch_size,
               "response_tokens": cfg.data.response_tokens, "epochs": pc.ppo_epochs,
               "minibatch": pc.ppo_mini_batch_size, "precision": "fp32", "repeats": a.repeats,
               "reward_model_heldout_acc": rm_report["heldout_pair_accuracy"]}
    for name, rs in runs.items():
        train_s = statistics.median(r["train_s"] for r in rs)
        summary[name] = {"rollouts_per_s": pc.ppo_batch_size * a.iters / train_s, "train_s": train_s,
                         "phases_s": {p: statistics.median(r["phases"][p] for r in rs) for p in PHASES},
                         "peak_rss_mb": statistics.median(r["peak_mb"] for r in rs)}
    if "trl_1.12" in summary:
        summary["speedup_vs_trl_1.12"] = summary["ours"]["rollouts_per_s"] / summary["trl_1.12"]["rollouts_per_s"]

    print(f"\nPPO, {a.iters} iterations x {pc.ppo_batch_size} rollouts x <= {cfg.data.response_tokens} tokens, "
          f"{pc.ppo_epochs} epochs, fp32 on {summary['machine']['cpus']} CPUs, median of {a.repeats}")
    print(f"{'trainer':<10}{'rollouts/s':>11}{'train s':>9}{'generation':>12}{'scoring':>9}{'update':>8}"
          f"{'peak RSS MB':>13}")
    for name in runs:
        s, ph = summary[name], summary[name]["phases_s"]
        total = sum(ph.values())
        print(f"{name:<10}{s['rollouts_per_s']:>11.2f}{s['train_s']:>9.1f}" +
              "".join(f"{100 * ph[p] / total:>{w}.0f}%" for p, w in zip(PHASES, (11, 8, 7))) +
              f"{s['peak_rss_mb']:>13.0f}")
    if "speedup_vs_trl_1.12" in summary:
        print(f"ours / TRL 1.12 PPOTrainer: {summary['speedup_vs_trl_1.12']:.2f}x")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
