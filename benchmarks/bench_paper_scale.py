"""How long, and how much memory, would the paper preset (``uv run main.py``) take on this machine?

    uv run --group bench benchmarks/bench_paper_scale.py [--steps 3] [--device auto] [--dtype auto]

No hub needed: it builds random-init stand-ins with exactly the shapes of ``distilgpt2`` (GPT-2: 6 layers,
768 wide, 12 heads, vocabulary 50,257, 1,024 positions) and of the SST-2 judge (DistilBERT: 6 x 768,
12 heads, FFN 3,072, vocabulary 30,522, 512 positions), with tokenizers trained on IMDb (byte-level BPE and
uncased WordPiece). Then it runs the paper preset's own code -- ``train_dpo.train``, ``train_reward_model``,
``train_ppo.train``, ``evaluate_policy`` -- at the preset's batch sizes and lengths for a few steps and times

* one DPO step (the reference log-prob pass timed apart, per pair),
* one reward-model step and one scoring of the 512 validation pairs,
* one PPO iteration, phase by phase,
* one evaluation (the 512 held-out prompts: sampling, judge, the two KL passes),

with the peak memory of each (RSS on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU), and projects the
preset's total wall time from them. Random weights sample random text, so generation runs to the full
48 tokens, as a trained model mostly does. Prints a table and one JSON line; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DISTILGPT2, SST2_JUDGE, TINY_GPT2, TINY_JUDGE, PeakMemory, build_standins, machine  # noqa: E402

import dataset  # noqa: E402
import train_dpo  # noqa: E402
import train_ppo  # noqa: E402
from config import PRESETS  # noqa: E402
from eval_utils import evaluate_policy  # noqa: E402
from modeling.models import dtype_name, load_causal_lm, load_judge, load_tokenizer, resolve_device, resolve_dtype  # noqa: E402
from runtime.run_log import read_metrics  # noqa: E402
from runtime.run_utils import make_accelerator  # noqa: E402
from training.lifecycle import RunContext  # noqa: E402
from training.reward_model import train_reward_model  # noqa: E402


def step_times(rows: list[dict]) -> list[float]:
    """Training seconds of each step after the first (the first carries warm-up and set-up)."""
    t = [r["time_s"] for r in rows if r["step"] >= 1]
    return [b - a for a, b in zip(t, t[1:])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed DPO steps and PPO iterations (after one warm-up)")
    ap.add_argument("--rm_steps", type=int, default=3, help="timed reward-model steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--data", default=None, help="IMDb data (default: data/IMDB Dataset.csv)")
    ap.add_argument("--max_reviews", type=int, default=None, help="use a sample (the projection still assumes "
                    "the full data's pair count, --full_pairs)")
    ap.add_argument("--full_pairs", type=int, default=None, help="training pairs of the full data, for the "
                    "projection (default: those of the data used)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes instead of the paper's: a check that the "
                    "benchmark runs (its smoke test), not a measurement")
    a = ap.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()  # e.g. the reward model's new scalar head, reported at load
    device = resolve_device(a.device)
    acc = make_accelerator(device)
    device, dtype = acc.device, resolve_dtype(a.dtype, acc.device)
    # a sample (--max_reviews) is too small for the paper preset's 512 validation pairs: a token validation split
    small = {"n_val_pairs": 16} if a.max_reviews else {}
    paper = PRESETS["paper"].replace(model={"dtype": a.dtype},
                                     data={"data": a.data, "max_reviews": a.max_reviews, **small},
                                     eval={"n_val_prompts": 0} if small else {})
    reviews = dataset.load_reviews(paper.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, paper.data, paper.data.split_seed)
    out = Path(tempfile.mkdtemp(prefix="bench_paper_"))
    t0 = time.time()
    shapes = {"policy": TINY_GPT2, "judge": TINY_JUDGE} if a.tiny else {"policy": DISTILGPT2, "judge": SST2_JUDGE}
    policy_dir, judge_dir = build_standins(out, train_df, shapes["policy"], shapes["judge"])
    print(f"stand-ins built in {time.time() - t0:.0f}s (not timed below)", file=sys.stderr)

    cfg = paper.replace(model={"policy_model": policy_dir, "judge_model": judge_dir},
                        run={"output_dir": str(out / "models"), "cache_dir": str(out / "models"), "log_every": 10**9,
                             "save_every": 10**9})
    tok = load_tokenizer(policy_dir)
    ref = load_causal_lm(policy_dir, device)
    judge_tok, judge = load_judge(judge_dir, device)
    data = dataset.prepare(cfg, tok, train_df, eval_df)
    full_pairs = a.full_pairs or len(data.train_pairs)
    ctx = RunContext(tokenizer=tok, ref_model=ref, device=device, acc=acc, dtype=dtype,
                     batch_size=cfg.eval.eval_batch_size, judge_tok=judge_tok, judge=judge, prompts=data.eval_prompts,
                     max_new_tokens=cfg.data.response_tokens, seed=cfg.run.seed)
    res = {"machine": machine(device), "device": str(device), "precision": dtype_name(dtype),
           "shapes": shapes, "full_pairs": full_pairs}

    # --- DPO: a few steps on just enough pairs (their reference pass is timed per pair) ---
    dc = cfg.dpo
    n = (a.steps + 1) * dc.dpo_batch_size
    with PeakMemory(device) as mem:
        dpo = train_dpo.train(cfg.replace(dpo={"dpo_steps": a.steps + 1}),
                              dataclasses.replace(data, train_pairs=data.train_pairs[:n]), ctx, name="dpo",
                              evaluate=False)
    rows = read_metrics(out / "models" / "runs" / "dpo" / "metrics.jsonl")
    res["dpo"] = {"step_s": statistics.median(step_times(rows)), "ref_logps_s_per_pair": dpo["ref_logps_s"] / n,
                  "peak_mb": mem.peak_mb}

    # --- reward model: a few steps, one scoring of the validation pairs at the end ---
    rcfg = cfg.replace(ppo={"rm_steps": a.rm_steps + 1, "rm_eval_every": a.rm_steps + 1})
    with PeakMemory(device) as mem:
        _, rm = train_reward_model(rcfg, data, ctx)
    val_s = rm["test_s"] * len(data.val_pairs) / rm["n_heldout_pairs"]  # the same scoring, on the validation pairs
    res["rm"] = {"step_s": (rm["train_s"] - val_s) / (a.rm_steps + 1), "val_s": val_s, "test_s": rm["test_s"],
                 "peak_mb": mem.peak_mb}

    # --- PPO: a few iterations (the reward model above is reused from its cache) ---
    with PeakMemory(device) as mem:
        train_ppo.train(rcfg.replace(ppo={"ppo_steps": a.steps + 1}), data, ctx, name="ppo", evaluate=False)
    rows = [r for r in read_metrics(out / "models" / "runs" / "ppo" / "metrics.jsonl") if r["step"] >= 2]
    phases = {p: statistics.median(r[f"charts/{p}"] for r in rows) for p in ("generation_s", "logps_s", "score_s",
                                                                          "update_s")}
    res["ppo"] = {"iteration_s": sum(phases.values()), "phases": phases, "peak_mb": mem.peak_mb}

    # --- one evaluation: 512 held-out prompts (the second of two: the first warms up) ---
    with PeakMemory(device) as mem:
        evaluate_policy(ref, ctx, 1.0)
        t = time.time()
        evaluate_policy(ref, ctx, 1.0)
        eval_s = time.time() - t
    res["eval"] = {"eval_s": eval_s, "n_prompts": len(ctx.prompts), "peak_mb": mem.peak_mb}

    # --- projection of the whole paper preset (upper bound: the reward model never stops early) ---
    p = paper.ppo
    stages = {
        "dpo_reference_pass": res["dpo"]["ref_logps_s_per_pair"] * full_pairs,
        "dpo_steps": paper.dpo.dpo_steps * res["dpo"]["step_s"],
        "dpo_evaluations": (paper.dpo.dpo_steps // paper.dpo.dpo_eval_every + 1) * eval_s,
        "reward_model": p.rm_steps * res["rm"]["step_s"] + (p.rm_steps // p.rm_eval_every) * val_s + rm["test_s"],
        "ppo_iterations": p.ppo_steps * res["ppo"]["iteration_s"],
        "ppo_evaluations": (p.ppo_steps // p.ppo_eval_every + 1) * eval_s,
        # reference, DPO and PPO at every temperature of the win-rate sweep
        "final_evaluation": 3 * len(paper.eval.temperatures) * eval_s,
    }
    res["projection_s"] = {**stages, "total": sum(stages.values())}
    res["peak_mb"] = max(res[k]["peak_mb"] for k in ("dpo", "rm", "ppo", "eval"))

    where = res["machine"].get("gpu", res["machine"]["cpu"])
    mem_kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
    print(f"\npaper preset on random-init stand-ins, {where} ({device}, {res['precision']})")
    print(f"  DPO step ({paper.dpo.dpo_batch_size} pairs)           {res['dpo']['step_s']:8.3f} s   "
          f"peak {res['dpo']['peak_mb']:7.0f} MB")
    print(f"  DPO reference pass, per pair        {res['dpo']['ref_logps_s_per_pair'] * 1e3:8.2f} ms")
    print(f"  reward-model step ({p.rm_batch_size} pairs)     {res['rm']['step_s']:8.3f} s   "
          f"peak {res['rm']['peak_mb']:7.0f} MB")
    print(f"  PPO iteration ({p.ppo_batch_size} rollouts)       {res['ppo']['iteration_s']:8.3f} s   "
          f"peak {res['ppo']['peak_mb']:7.0f} MB")
    for name, s in phases.items():
        print(f"    {name[:-2]:<32}{s:8.3f} s")
    print(f"  evaluation ({len(ctx.prompts)} prompts)           {eval_s:8.3f} s   "
          f"peak {res['eval']['peak_mb']:7.0f} MB")
    print(f"projected paper preset ({paper.dpo.dpo_steps} DPO steps, <= {p.rm_steps} reward-model steps, "
          f"{p.ppo_steps} PPO iterations, {full_pairs} pairs):")
    for name, s in stages.items():
        print(f"  {name:<24}{s / 60:8.1f} min")
    print(f"  {'total':<24}{sum(stages.values()) / 60:8.1f} min; peak memory {res['peak_mb']:.0f} MB ({mem_kind})")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
