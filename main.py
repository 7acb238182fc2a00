"""Entry point: ``uv run main.py [--preset paper|offline|smoke] [--dpo-only|--ppo-only] [--FIELD VALUE ...]``.

Stages: load IMDb -> (offline presets) build or reuse the self-built models -> preference pairs -> DPO ->
PPO -> final evaluation of reference, DPO and PPO on the same held-out prompts -> results.json and the
dashboard in evaluation_plots/. Exit codes: 0 done, 1 training diverged (or, under a launcher, one
process failed), 2 bad input or config, 130 interrupted by SIGINT (Ctrl-C) and 143 by SIGTERM (inside a training
loop after a checkpoint: add --resume to continue; run_log.Signals says how signals are handled).
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

from config import DEFAULT_CSV, HUB_DATASET, Config, ConfigError
from runtime.cli import parse_config
from runtime.exits import ending
from runtime.run_log import FATAL, SIGNALS, check_output_dirs


def check_outputs(cfg: Config) -> None:
    """Every output directory checked writable now, not after hours of training (``run_log.check_output_dirs``),
    and a held-out draw to evaluate (the grid scripts' ``--n_eval_prompts 0`` is refused); a word where a setting
    means less than it says (``--resume`` with nothing to resume, more jobs than cores)."""
    if cfg.eval.n_eval_prompts == 0:
        raise ConfigError("--n_eval_prompts 0 draws no held-out prompts (the tuning and probe scripts' validation-only "
                          "mode); main.py's final evaluation needs them: give 1 or more")
    dirs = {"--plots_dir": cfg.run.plots_dir}
    if not cfg.run.plots_only:
        dirs.update({"--output_dir": cfg.run.output_dir, "--cache_dir": cfg.run.cache_dir})
    try:
        check_output_dirs(dirs)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(cfg.run.output_dir)
    if cfg.run.resume and not cfg.run.plots_only and not any(
            next(out.glob(pattern), None) for pattern in ("*/train_summary.json", "runs/**/checkpoints/step-*")):
        print(f"note: --resume: nothing to resume in {out} (no checkpoint, no finished run): every run starts afresh",
              file=sys.stderr)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cfg.run.jobs > cores:
        print(f"warning: --jobs {cfg.run.jobs} on {cores} CPU cores: the worker processes share the cores, and each "
              f"is slower; --jobs {cores} gets as much through", file=sys.stderr)


def hub_preflight(cfg: Config) -> None:
    """Hub ids first: an unreachable hub is reported in seconds, before the data is read or torch imported."""
    from runtime import hub

    needed = [] if cfg.model.build_offline_models else [("model", "--policy_model", cfg.model.policy_model),
                                                        ("judge", "--judge_model", cfg.model.judge_model)]
    if cfg.data.data is None and not DEFAULT_CSV.exists():
        needed.append(("dataset", "--data", HUB_DATASET))
    hub.hub_preflight(needed)


def run(cfg: Config, argv: list[str]) -> int:
    # Imports are staged so that --help, --plots-only and bad input answer without loading the (slow to
    # import) modelling stack.
    if cfg.run.sweep:  # the study's grid, checked before anything is loaded
        from study import grid

        grid.check_coverage(cfg)
    check_outputs(cfg)
    if cfg.run.plots_only:
        from study import plots

        path = plots.draw_dashboard(cfg.run.plots_dir)
        print(f"plots: redrew {path}")
        return 0
    t_start = time.time()
    hub_preflight(cfg)

    from modeling.models import resolve_device
    from runtime.run_utils import make_accelerator

    # One process, or one of N under `accelerate launch` / `torchrun`, each with its own device; only the
    # main process prints.
    acc = make_accelerator(resolve_device(cfg.model.device), cfg.run.report_to, cfg.run.output_dir)
    if acc.num_processes > 1:  # a process killed by a fatal signal leaves its Python stack (run_log.FatalLogs)
        FATAL.arm(cfg.run.output_dir, acc.process_index)

    import dataset

    reviews = dataset.load_reviews(cfg.data.data)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
    dataset.check_usable(train_df, eval_df, cfg.data)  # before minutes of model building, not after

    import torch
    import transformers

    from modeling.models import dtype_name
    from runtime.run_utils import seed_everything
    from study import experiment, grid, plots, protocol
    from study.results import final_evaluation, provenance

    # Our own tqdm bars and log lines say what is happening; silence the library's per-load bars and notes.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # e.g. a note at every checkpoint on the tied LM head
    command = "uv run main.py " + " ".join(shlex.quote(a) for a in argv)
    code = provenance()  # the commit and the preregistration this run starts from (results.json)
    if cfg.model.threads:  # fp32 reductions depend on the thread count: reproduction commands pin it
        torch.set_num_threads(cfg.model.threads)
    seed_everything(cfg.run.seed)
    stack = experiment.load_stack(cfg, acc, train_df, eval_df)
    cfg, judge_check = stack.cfg, experiment.judge_check(stack)

    # --- the runs: the default DPO and PPO, with --sweep the grids and PPO-GT, for every seed ---
    seeds = cfg.run.seeds or [cfg.run.seed]
    specs = grid.study_runs(cfg, seeds)
    if len(specs) > 2 or len(seeds) > 1:
        print(f"study: {len(specs)} runs over seeds {seeds}")
    # --dpo-only after --ppo-only (or the reverse) on the same setup: the earlier method's runs stay in the
    # results. Checked before any training: a results.json of another setup is refused, never overwritten.
    setup = grid.run_setup(cfg, dtype_name(stack.dtype),
                            dataset.data_fingerprint(train_df) + dataset.data_fingerprint(eval_df))
    done = experiment.train_runs(stack, specs, seeds, setup)

    # --- the study: checkpoints chosen on validation, only those evaluated on held-out prompts ---
    protocol_results = protocol.study_protocol(cfg, done.runs, done.heldout) if cfg.run.sweep else None
    order = [m for m in grid.METHODS if m in done.first]  # DPO before PPO whichever ran first
    results = final_evaluation(cfg, done.heldout[seeds[0]], {m: done.first[m] for m in order}, done.runs,
                                          done.first_data, n_reviews=len(reviews), command=command, setup=setup,
                                          judge_check=judge_check, protocol=protocol_results,
                                          seen_overlap=done.seen_overlap, code=code)
    if acc.is_main_process:  # the main process alone writes results and plots
        path = plots.draw_dashboard(cfg.run.plots_dir)
        print(plots.summary_table(results))
        print(plots.examples_text(results))
        print(f"done in {time.time() - t_start:.0f}s: {path} and {os.path.join(cfg.run.plots_dir, 'results.json')}")
    acc.wait_for_everyone()  # leave together: rank 1 once aborted, leaving while rank 0 still drew the dashboard
    acc.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cfg = None
    SIGNALS.reset()
    SIGNALS.install()  # SIGTERM as SIGINT; a signal forwarded twice counts once
    try:
        cfg = parse_config(argv)
        return run(cfg, argv)
    except BaseException as e:
        # The outcome is decided: a signal from now on (under a launcher, the SIGTERM that follows a peer's death,
        # landing mid-report) must not cut the one line that says what happened. A plain store, not a call
        # (run_log.Signals.end says why).
        SIGNALS.ending = True
        if isinstance(e, SystemExit):  # --help, or argparse's own exit
            raise
        return ending(e, cfg, rank, world)
    finally:
        SIGNALS.end()


if __name__ == "__main__":
    code = main()
    FATAL.disarm()
    SIGNALS.ignore()  # a signal now (a forwarded copy, the launcher's) must not kill the exit (run_log.Signals.ignore)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or code in (130, 143):
        # Under a launcher everything is written and the process group is gone: leave without the interpreter's
        # teardown, where C++ objects of the distributed stack are destroyed in no set order (an abort there
        # would fail a finished run). Interrupted, likewise: tearing down the loaded reviews and models took over
        # a second after the one line, and a signal promises an exit within seconds.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
