"""Entry point: ``uv run main.py [--preset paper|offline|smoke] [--dpo-only|--ppo-only] [--FIELD VALUE ...]``.

Stages: load IMDb -> (offline presets) build or reuse the self-built models -> preference pairs -> DPO ->
PPO -> final evaluation of reference, DPO and PPO on the same held-out prompts -> results.json and the
dashboard in evaluation_plots/. Exit codes: 0 done, 1 training diverged, 2 bad input or config,
130 interrupted (a checkpoint is saved; add --resume to continue).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path

# Encoding 45k reviews on every core halves its time (measured: 41 s -> 21 s on 2 cores). main.py forks no
# workers (launchers start their processes before), so the tokenizers' fork warning cannot arise here.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from config import DEFAULT_CSV, HUB_DATASET, Config, ConfigError, parse_config
from run_log import StopTraining


def run(cfg: Config, argv: list[str]) -> int:
    # Imports are staged so that --help, --plots-only and bad input answer without loading the (slow to
    # import) modelling stack.
    if cfg.run.sweep:  # the study's grid, checked before anything is loaded
        import study

        study.check_coverage(cfg)
    if cfg.run.plots_only:
        import plots

        path = plots.draw_dashboard(cfg.run.plots_dir)
        print(f"plots: redrew {path}")
        return 0
    t_start = time.time()
    import hub

    # Hub ids first: an unreachable hub is reported in seconds, before the data is read or torch imported.
    needed = [] if cfg.model.build_offline_models else [("model", "--policy_model", cfg.model.policy_model),
                                                        ("judge", "--judge_model", cfg.model.judge_model)]
    if cfg.data.data is None and not DEFAULT_CSV.exists():
        needed.append(("dataset", "--data", HUB_DATASET))
    hub.hub_preflight(needed)

    from models import resolve_device
    from run_utils import make_accelerator

    # One process, or one of N under `accelerate launch` / `torchrun`, each with its own device; only the
    # main process prints.
    acc = make_accelerator(resolve_device(cfg.model.device), cfg.run.report_to, cfg.run.output_dir)

    import dataset

    reviews = dataset.load_reviews(cfg.data.data)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
    dataset.check_usable(train_df, eval_df, cfg.data)  # before minutes of model building, not after

    import torch
    import transformers

    import eval_utils
    import pair_generation
    import plots
    import protocol
    import study
    import train_dpo
    import train_ppo
    import train_sft
    from lifecycle import RunContext
    from models import (
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
    from offline_models import ensure_offline_models
    from run_utils import seed_everything

    # Our own tqdm bars and log lines say what is happening; silence the library's per-load bars and notes.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # e.g. a note at every checkpoint on the tied LM head
    command = "uv run main.py " + " ".join(shlex.quote(a) for a in argv)
    if cfg.model.threads:  # fp32 reductions depend on the thread count: reproduction commands pin it
        torch.set_num_threads(cfg.model.threads)
    seed_everything(cfg.run.seed)
    device = acc.device
    # The main process builds (or fine-tunes) first; the others then find the result and reuse it.
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
    # Is the judge worth reading? Its accuracy on held-out openings as long as prompt + completion, as it sees them.
    judged = cfg.data.prompt_max_tokens + cfg.data.response_tokens
    judge_check = {"accuracy": eval_utils.judge_accuracy(judge_tok, judge, tokenizer, eval_df, judged, device,
                                                         judge_dtype), "tokens": judged,
                   "n": min(1000, len(eval_df))}
    print(f"judge: held-out accuracy {judge_check['accuracy']:.3f} on review openings of {judged} tokens "
          f"(prompt + completion; {judge_check['n']} reviews)")
    if judge_check["accuracy"] < 0.6:
        print(f"warning: a judge right on only {judge_check['accuracy']:.2f} of such texts gives safety scores that "
              f"carry no signal" + (" (the smoke preset's models exist to test the code; uv run main.py --preset "
                                    "quick is the short run worth looking at)" if cfg.run.preset == "smoke" else ""))

    # --- the runs: the default DPO and PPO, with --sweep the grids and PPO-GT, for every seed ---
    seeds = cfg.run.seeds or [cfg.run.seed]
    specs = study.study_runs(cfg, seeds)
    if len(specs) > 2 or len(seeds) > 1:
        print(f"study: {len(specs)} runs over seeds {seeds}")
    runs, first = [], {}  # every run's record; the first seed's default policies, for the final evaluation
    heldout = {}  # seed -> the evaluation context of its held-out prompts
    # --dpo-only after --ppo-only (or the reverse) on the same setup: the earlier method's runs stay in the
    # results. Checked before any training: a results.json of another setup is refused, never overwritten.
    fingerprint = dataset.data_fingerprint(train_df) + dataset.data_fingerprint(eval_df)
    setup = study.run_setup(cfg, dtype_name(dtype), fingerprint)
    for r in study.carried_over(cfg, setup):
        model_dir = str(Path(r["metrics"]).parent)
        runs.append({"spec": study.RunSpec(r["method"], r["label"], r["seed"], r["name"], {}, r["main"]),
                     "summary": {"model_dir": model_dir, **eval_utils.run_record(r)}})
        if r["main"] and r["seed"] == seeds[0]:
            first[r["method"]] = {**runs[-1]["summary"], "policy": load_causal_lm(model_dir, device)}
            print(f"results: keeping {r['method']} from {cfg.run.plots_dir}/results.json ({model_dir})")
    for seed in seeds:
        scfg = cfg.replace(run={"seed": seed})
        data = dataset.prepare(scfg, tokenizer, train_df, eval_df)  # this seed's pair sample
        # Runs are evaluated on the validation prompts while they train, on this seed's held-out prompts after.
        ctx = RunContext(tokenizer=tokenizer, ref_model=ref_model, device=device, acc=acc, dtype=dtype,
                         batch_size=cfg.eval.eval_batch_size, judge_tok=judge_tok, judge=judge, judge_dtype=judge_dtype,
                         prompts=data.val_prompts, max_new_tokens=cfg.data.response_tokens, seed=seed)
        heldout[seed] = ctx.on(data.eval_prompts)
        if cfg.dpo.pair_source == "generated":  # the paper's setting: the judge labels the reference's samples
            data = pair_generation.generated_data(scfg, data, ctx)
        print(f"data: {len(data.train_pairs)} {cfg.dpo.pair_source} training pairs, {len(data.val_pairs)} validation "
              f"pairs ({len(data.val_prompts)} validation prompts), {len(data.eval_pairs)} held-out pairs, "
              f"{len(data.eval_prompts)} held-out prompts (seed {seed}); "
              f"device {device}{f' x {acc.num_processes} processes' if acc.num_processes > 1 else ''}, "
              f"precision {dtype_name(dtype)} (judge {dtype_name(judge_dtype)}; --dtype {cfg.model.dtype}), "
              f"{torch.get_num_threads()} CPU threads")
        for spec in (s for s in specs if s.seed == seed):
            rcfg = scfg.replace(**spec.overrides)
            trainer = train_dpo if spec.method == "dpo" else train_ppo
            out = study.finished(rcfg, spec) if cfg.run.resume else None
            if out is not None:  # an interrupted study continues where it stopped
                print(f"study: {spec.name} finished earlier with the same settings: skipped")
                out = {**out, "model_dir": str(Path(rcfg.run.output_dir) / spec.name)}
            else:
                out = trainer.train(rcfg, data, ctx, name=spec.name)
            runs.append({"spec": spec, "summary": {k: v for k, v in out.items() if k != "policy"}})
            if seed == seeds[0] and spec.main:
                first[spec.method] = {**out, "policy": out.get("policy") or load_causal_lm(out["model_dir"], device)}
        if seed == seeds[0]:
            first_data = data

    # --- the study: checkpoints chosen on validation, only those evaluated on held-out prompts ---
    protocol_results = protocol.study_protocol(cfg, runs, heldout) if cfg.run.sweep else None
    order = [m for m in study.METHODS if m in first]  # DPO before PPO whichever ran first
    results = eval_utils.final_evaluation(cfg, heldout[seeds[0]], {m: first[m] for m in order}, runs, first_data,
                                          n_reviews=len(reviews), command=command, setup=setup,
                                          judge_check=judge_check, protocol=protocol_results)
    if acc.is_main_process:  # the main process alone writes results and plots
        path = plots.draw_dashboard(cfg.run.plots_dir)
        print(plots.summary_table(results))
        print(plots.examples_text(results))
        print(f"done in {time.time() - t_start:.0f}s: {path} and {os.path.join(cfg.run.plots_dir, 'results.json')}")
    acc.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Under a launcher every process meets the same error: the first one alone reports it.
    report = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    try:
        cfg = parse_config(argv)
        return run(cfg, argv)
    except ConfigError as e:
        report(f"error: {e}", file=sys.stderr)
        return 2
    except StopTraining as e:
        report(f"error: {e}" if e.code != 130 else str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        report("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
