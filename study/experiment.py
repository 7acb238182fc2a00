"""The study's runs, between main.py's checks and its report: the models every run shares (:func:`load_stack`),
each seed's data and evaluation context (:func:`seed_context`), and the loop over seeds and runs
(:func:`train_runs`), and what a worker process does with each item of ``jobs.plan`` (:func:`make_worker`).
``scripts/grid.py`` trains its grids on the same stack and contexts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

import dataset
import eval_utils
import train_dpo
import train_ppo
from config import ConfigError
from modeling import train_sft
from modeling.models import (
    bf16_native,
    dtype_name,
    load_causal_lm,
    load_config,
    load_judge,
    load_tokenizer,
    max_positions,
    model_width,
    resolve_dtype,
)
from modeling.offline_models import ensure_offline_models
from study import grid, results
from training import pair_generation
from training.lifecycle import RunContext


@dataclass
class Stack:
    """What every run of a study shares: the config with the built models' paths filled in, the accelerator,
    the precision, the tokenizer, the frozen reference and the judge, and the review split."""

    cfg: object
    acc: object
    dtype: torch.dtype
    tokenizer: object
    ref_model: torch.nn.Module
    judge_tok: object
    judge: torch.nn.Module
    judge_dtype: torch.dtype
    train_df: object
    eval_df: object

    @property
    def device(self) -> torch.device:
        return self.acc.device


def load_stack(cfg, acc, train_df, eval_df) -> Stack:
    """Build or reuse the self-built models (offline presets) and the SFT model, then load the tokenizer, the
    frozen reference and the judge. The main process builds first; the others then find and reuse its result."""
    device = acc.device
    with acc.main_process_first():
        if cfg.model.build_offline_models:
            cfg = cfg.replace(model=ensure_offline_models(cfg, train_df, eval_df))
    # --dtype auto: by the hardware and the policy's width (models.auto_dtype), read from its config alone.
    dtype = resolve_dtype(cfg.model.dtype, device, model_width(load_config(cfg.model.policy_model)))
    if dtype == torch.bfloat16 and not bf16_native(device):
        print(f"note: --dtype bf16 on a {device.type} without bf16 matrix units is emulated and slow; --dtype auto "
              f"picks fp32 here")
    with acc.main_process_first():
        if cfg.sft.sft_steps > 0:  # the fine-tuned LM becomes the reference and the initial policy
            cfg = cfg.replace(model={"policy_model": train_sft.ensure_sft_model(cfg, train_df, eval_df, device,
                                                                                dtype)})
    tokenizer = load_tokenizer(cfg.model.policy_model)
    ref_model = load_causal_lm(cfg.model.policy_model, device)
    for p in ref_model.parameters():  # the reference is frozen
        p.requires_grad_(False)
    if cfg.data.max_length > max_positions(ref_model):
        raise ConfigError(f"--max_length {cfg.data.max_length} exceeds the model's {max_positions(ref_model)} "
                          f"positions; lower it")
    judge_tok, judge = load_judge(cfg.model.judge_model, device)
    judge_dtype = resolve_dtype(cfg.model.dtype, device, model_width(judge))  # a narrow judge stays fp32 under auto
    return Stack(cfg, acc, dtype, tokenizer, ref_model, judge_tok, judge, judge_dtype, train_df, eval_df)


def judge_check(stack: Stack) -> dict:
    """Is the judge worth reading? Its accuracy on held-out openings as long as prompt + completion, as it sees
    them; printed, with a warning below 0.6."""
    cfg = stack.cfg
    judged = cfg.data.prompt_max_tokens + cfg.data.response_tokens
    check = {**eval_utils.judge_accuracy(stack.judge_tok, stack.judge, stack.tokenizer, stack.eval_df, judged,
                                         stack.device, stack.judge_dtype), "tokens": judged}
    print(f"judge: held-out accuracy {check['accuracy']:.3f} on review openings of {judged} tokens "
          f"(prompt + completion; {check['n']} reviews); the second judge, VADER, {check['vader_accuracy']:.3f} "
          f"on the same texts (correlation with the judge {check['vader_correlation']:.2f})")
    if check["accuracy"] < 0.6:
        print(f"warning: a judge right on only {check['accuracy']:.2f} of such texts gives safety scores that "
              f"carry no signal" + (" (the smoke preset's models exist to test the code; uv run main.py --preset "
                                    "quick is the short run worth looking at)" if cfg.run.preset == "smoke" else ""))
    return check


def seed_context(stack: Stack, scfg):
    """One seed's data (its pair sample; with ``--pair_source generated`` the judge labels the reference's
    samples) and the evaluation context of its validation prompts, on which its runs are evaluated as they
    train: ``(data, ctx)``."""
    data = dataset.prepare(scfg, stack.tokenizer, stack.train_df, stack.eval_df)
    ctx = RunContext(tokenizer=stack.tokenizer, ref_model=stack.ref_model, device=stack.device, acc=stack.acc,
                     dtype=stack.dtype, batch_size=scfg.eval.eval_batch_size, judge_tok=stack.judge_tok,
                     judge=stack.judge, judge_dtype=stack.judge_dtype, prompts=val_prompts(scfg, data),
                     max_new_tokens=scfg.data.response_tokens, seed=scfg.run.seed)
    if scfg.dpo.pair_source == "generated":
        data = pair_generation.generated_data(scfg, data, ctx)
    return data, ctx


def val_prompts(cfg, data) -> list:
    """The prompts of the evaluations during training: the first ``--n_val_prompts`` of the validation pairs'
    prompts (which come in random order), all of them when 0."""
    return data.val_prompts[:cfg.eval.n_val_prompts or None]


def obtain_run(rcfg, spec, data, ctx, resume: bool, kept: str = "finished earlier with the same settings: skipped"
               ) -> dict:
    """One run of the study, its summary: linked from ``--reuse_runs_from`` where it finished there with every
    setting it depends on equal, kept when ``resume`` and finished here with the same settings (saying ``kept``),
    else trained."""
    if rcfg.run.reuse_runs_from and (done := grid.reuse_run(rcfg, spec, rcfg.run.reuse_runs_from)):
        print(f"study: {spec.name} reused from {rcfg.run.reuse_runs_from} (finished there with every setting it "
              f"depends on equal; linked, not retrained)")
        return done
    done = grid.finished(rcfg, spec) if resume else None
    if done is not None:  # an interrupted study continues where it stopped
        print(f"study: {spec.name} {kept}")
        return {**done, "model_dir": str(Path(rcfg.run.output_dir) / spec.name)}
    return (train_dpo if spec.method == "dpo" else train_ppo).train(rcfg, data, ctx, name=spec.name)


@dataclass
class StudyRuns:
    """Every run's record (``{"spec", "summary"}``), the first seed's default policies (for the final
    evaluation) and data, each seed's held-out evaluation context and, with --sealed_prompts, how many of its
    held-out prompts open a review that an earlier draw used."""

    runs: list
    first: dict
    first_data: object
    heldout: dict
    seen_overlap: dict = field(default_factory=dict)


def train_runs(stack: Stack, specs: list, seeds: list[int], setup: dict) -> StudyRuns:
    """Train (or, with ``--resume``, reuse when finished with the same settings) every run of ``specs``, seed by
    seed; with --dpo-only or --ppo-only, the other method's runs already in results.json are carried over. With
    ``--jobs`` > 1 the runs are trained first in worker processes (``study/jobs.py``), then read back here."""
    cfg, device, acc = stack.cfg, stack.device, stack.acc
    out = StudyRuns(runs=[], first={}, first_data=None, heldout={})
    in_processes = cfg.run.jobs > 1 and len(specs) > 1
    if in_processes and acc.num_processes > 1:
        raise ConfigError(f"--jobs {cfg.run.jobs} starts processes of its own; under a launcher (accelerate launch, "
                          f"torchrun) leave it at 1")
    # Another setup's results.json is refused here, before any training, the worker processes' too.
    kept = grid.carried_over(cfg, setup)
    if in_processes:
        from runtime.workers import worker_threads
        from study import jobs

        jobs.run_in_processes(cfg, specs, cfg.run.jobs)
        # What this process computes from here (judged pairs read back, held-out evaluations, the final
        # evaluation) at the workers' thread count: their cached numbers are found, and none is mixed with another
        # thread count's (fp32 sums depend on it).
        torch.set_num_threads(worker_threads(cfg, cfg.run.jobs))
    for r in kept:
        model_dir = str(Path(r["metrics"]).parent)
        out.runs.append({"spec": grid.RunSpec(r["method"], r["label"], r["seed"], r["name"], {}, r["main"]),
                         "summary": {"model_dir": model_dir, **results.run_record(r)}})
        if r["main"] and r["seed"] == seeds[0]:
            out.first[r["method"]] = {**out.runs[-1]["summary"], "policy": load_causal_lm(model_dir, device)}
            print(f"results: keeping {r['method']} from {cfg.run.plots_dir}/results.json ({model_dir})")
    for seed in seeds:
        scfg = cfg.replace(run={"seed": seed})
        data, ctx = seed_context(stack, scfg)
        out.heldout[seed] = ctx.on(data.eval_prompts)  # evaluated on validation prompts while training, these after
        out.seen_overlap[seed] = data.eval_seen_overlap
        print(f"data: {len(data.train_pairs)} {cfg.dpo.pair_source} training pairs, {len(data.val_pairs)} validation "
              f"pairs ({len(ctx.prompts)} validation prompts), {len(data.eval_pairs)} held-out pairs, "
              f"{len(data.eval_prompts)} held-out prompts (seed {seed}); "
              f"device {device}{f' x {acc.num_processes} processes' if acc.num_processes > 1 else ''}, "
              f"precision {dtype_name(stack.dtype)} (judge {dtype_name(stack.judge_dtype)}; --dtype "
              f"{cfg.model.dtype}), {torch.get_num_threads()} CPU threads")
        for spec in (s for s in specs if s.seed == seed):
            # after the worker processes every run is finished: read back as --resume reads a finished one
            done = obtain_run(scfg.replace(**spec.overrides), spec, data, ctx, cfg.run.resume or in_processes,
                              *(["finished (worker processes)"] if in_processes else []))
            out.runs.append({"spec": spec, "summary": {k: v for k, v in done.items() if k != "policy"}})
            if seed == seeds[0] and spec.main:
                out.first[spec.method] = {**done, "policy": done.get("policy") or load_causal_lm(done["model_dir"],
                                                                                                 device)}
        if seed == seeds[0]:
            out.first_data = data
    return out


def make_worker(cfg):
    """The function a worker process calls on each item of ``jobs.plan`` or the protocol's held-out evaluations
    (``runtime.workers.work``): the models and each seed's data loaded once, when first needed."""
    import transformers

    from modeling.logprobs import ResponseLogProbs
    from modeling.models import resolve_device, weights_fingerprint
    from runtime.run_utils import make_accelerator
    from study import protocol
    from training.reward_model import train_reward_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    stack, contexts = None, {}

    def do(item: dict) -> None:
        nonlocal stack
        if stack is None:
            reviews = dataset.load_reviews(cfg.data.data, verbose=False)
            train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
            acc = make_accelerator(resolve_device(cfg.model.device))
            stack = load_stack(cfg, acc, train_df, eval_df)  # builds the models for item "models"
        if item["what"] == "models":
            return
        spec = grid.RunSpec(**item["spec"]) if "spec" in item else None
        seed = spec.seed if spec else item["seed"]
        if seed not in contexts:
            contexts[seed] = seed_context(stack, stack.cfg.replace(run={"seed": seed}))
        data, ctx = contexts[seed]
        rcfg = stack.cfg.replace(run={"seed": seed}).replace(**(spec.overrides if spec else {}))
        if item["what"] == "reward_model":
            train_reward_model(rcfg, data, ctx)
        elif item["what"] == "reference_logps":  # as train_dpo.train makes them: its runs find them cached
            train_dpo.run_reference_logps(rcfg, data.train_pairs, ResponseLogProbs(stack.ref_model),
                                          weights_fingerprint(stack.ref_model), ctx)
        elif item["what"] == "run":
            obtain_run(rcfg, spec, data, ctx, resume=cfg.run.resume)
        elif item["what"] == "heldout":  # as the study's protocol evaluates it, into its cache
            protocol.heldout_result(rcfg, ctx.on(data.eval_prompts), rcfg.eval.eval_temperature, item["run"],
                                    item["step"])

    return do
