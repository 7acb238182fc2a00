"""A study's runs trained in several one-thread processes (``--jobs N``; ``scripts/grid.py`` trains its grids so).

On a 2-core CPU two one-thread processes get more through than one two-thread process: 1.27x for DPO's training
steps and 1.12-1.22x for the validation evaluations (BENCHMARKS.md, "Two cores"); these models are too small for
two threads to keep both cores busy. What each run computes is unchanged but for the thread count, which fp32
numbers depend on: every worker is pinned to ``--threads`` (1 unless given).

The work goes in phases, each a launch of up to N worker processes (``python workers.py <task file>``). A phase
lists its items; each worker takes the next item no worker has claimed yet (an exclusive file create), so a long
run on one process never leaves the other idle while items remain. The phases are ordered so that no two processes
ever write the same cache entry:

1. ``models``: the self-built models (offline presets), by one process (only when the caller has not built them);
2. ``pairs``: each seed's judged preference pairs (``--pair_source generated``), one seed per item;
3. ``shared``: each seed's reward model (learned-reward PPO) and DPO's reference log-probs, one per item;
4. ``runs``: every run, exactly as the one-process loop does it (``experiment.obtain_run``: kept when finished
   with ``--resume``, linked from ``--reuse_runs_from``, else trained).

Each worker's output goes to ``<output_dir>/logs/<phase>_worker<i>.log``; the caller shows one progress bar per
phase. A worker that fails stops the study with one line naming it and its log; finished runs are kept
(``--resume`` continues). Ctrl-C (or SIGTERM to the caller) reaches the workers: each checkpoints and stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def phases(cfg, specs: list, build_models: bool = False) -> list[tuple[str, list[dict]]]:
    """The phases and their items for ``specs`` (``study.RunSpec``), in order; empty phases left out."""
    seeds = list(dict.fromkeys(s.seed for s in specs))
    out = [("models", [{"what": "models"}])] if build_models and cfg.model.build_offline_models else []
    if cfg.dpo.pair_source == "generated":
        out.append(("pairs", [{"what": "pairs", "seed": s} for s in seeds]))
    shared = []
    for seed in seeds:
        mine = [s for s in specs if s.seed == seed]
        dpo = next((s for s in mine if s.method == "dpo"), None)
        ppo = next((s for s in mine if s.method == "ppo"), None)  # learned reward: the reward model
        shared += [{"what": what, "spec": dataclasses.asdict(s)}
                   for what, s in (("reference_logps", dpo), ("reward_model", ppo)) if s is not None]
    if shared:
        out.append(("shared", shared))
    out.append(("runs", [{"what": "run", "spec": dataclasses.asdict(s)} for s in specs]))
    return out


def run_in_processes(cfg, specs: list, jobs: int, build_models: bool = False) -> None:
    """Do every phase of ``specs`` in up to ``jobs`` worker processes (see the module's docstring). Raises
    ``run_log.StopTraining`` when a worker fails; ``KeyboardInterrupt`` after the workers stopped when
    interrupted."""
    logs = Path(cfg.run.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    worker_cfg = cfg.replace(model={"threads": cfg.model.threads or 1}, run={"jobs": 1})
    print(f"study: {len(specs)} runs in {jobs} processes of {worker_cfg.model.threads} CPU thread(s) each; their "
          f"logs in {logs}/", flush=True)
    for phase, items in phases(cfg, specs, build_models):
        _phase(worker_cfg, phase, items, min(jobs, len(items)), logs)


def _phase(cfg, phase: str, items: list[dict], n: int, logs: Path) -> None:
    from tqdm.auto import tqdm

    from run_log import StopTraining, strict_json

    claims = logs / f"claims-{phase}-{os.getpid()}-{time.time_ns()}"
    claims.mkdir()
    task = claims / "task.json"
    task.write_text(strict_json({"config": cfg.to_dict(), "phase": phase, "items": items, "claims": str(claims)}))
    procs = []
    for i in range(n):
        log = logs / f"{phase}_worker{i}.log"
        with open(log, "w") as f:
            # the caller's working directory: the config's relative paths mean the same in every process
            procs.append((subprocess.Popen([sys.executable, str(ROOT / "workers.py"), str(task)], stdout=f,
                                           stderr=subprocess.STDOUT), log))
    unit = {"runs": "run", "pairs": "seed"}.get(phase, "item")
    bar = tqdm(total=len(items), desc=f"study: {phase} ({n} processes)", unit=unit)
    def advance():
        done = len(list(claims.glob("*.done")))
        if done > bar.n:
            bar.update(done - bar.n)

    try:
        while any(p.poll() is None for p, _ in procs):
            advance()
            time.sleep(1)
        advance()
    except KeyboardInterrupt:  # forwarded at once: a worker that got the terminal's Ctrl-C too counts it once
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            p.wait()
        raise
    finally:
        bar.close()
        shutil.rmtree(claims, ignore_errors=True)
    failed = [(p.returncode, log) for p, log in procs if p.returncode]
    if failed:
        code, log = failed[0]
        lines = [x for x in log.read_text(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
        said = next((x for x in reversed(lines) if x.startswith(("error:", "interrupted"))), lines[-1] if lines else "")
        raise StopTraining(f"study: a worker process of the {phase} phase failed (exit code {code}): "
                           f"{said.removeprefix('error: ')} (its "
                           f"log: {log}); finished runs are kept: rerun with --resume to continue",
                           code if code in (2, 130, 143) else 1)


def _claim(claims: Path, i: int) -> bool:
    try:
        os.close(os.open(claims / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def work(task_path: str) -> None:
    """A worker: take the phase's unclaimed items one by one until none is left (the models and each seed's data
    loaded once, when first needed)."""
    import torch
    import transformers

    import dataset
    import experiment
    import train_dpo
    from config import Config
    from logprobs import ResponseLogProbs
    from models import resolve_device, weights_fingerprint
    from reward_model import train_reward_model
    from run_utils import make_accelerator
    from study import RunSpec

    task = json.loads(Path(task_path).read_text())
    cfg, claims = Config.from_dict(task["config"]), Path(task["claims"])
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(cfg.model.threads)
    stack, contexts = None, {}
    for i, item in enumerate(task["items"]):
        if not _claim(claims, i):
            continue
        if stack is None:
            reviews = dataset.load_reviews(cfg.data.data, verbose=False)
            train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
            acc = make_accelerator(resolve_device(cfg.model.device))
            stack = experiment.load_stack(cfg, acc, train_df, eval_df)  # builds the models in phase "models"
        if item["what"] != "models":
            spec = RunSpec(**item["spec"]) if "spec" in item else None
            seed = spec.seed if spec else item["seed"]
            if seed not in contexts:
                contexts[seed] = experiment.seed_context(stack, stack.cfg.replace(run={"seed": seed}))
            data, ctx = contexts[seed]
            rcfg = stack.cfg.replace(run={"seed": seed}).replace(**(spec.overrides if spec else {}))
            if item["what"] == "reward_model":
                train_reward_model(rcfg, data, ctx)
            elif item["what"] == "reference_logps":
                train_dpo.reference_logps(ResponseLogProbs(stack.ref_model), data.train_pairs,
                                          stack.tokenizer.pad_token_id, rcfg.dpo.dpo_batch_size, stack.device,
                                          Path(rcfg.run.cache_dir), weights_fingerprint(stack.ref_model), stack.dtype)
            elif item["what"] == "run":
                experiment.obtain_run(rcfg, spec, data, ctx, resume=cfg.run.resume)
        (claims / f"{i}.done").touch()


def main(argv: list[str]) -> int:
    from main import ending
    from run_log import SIGNALS

    SIGNALS.install()  # as main.py: a signal inside a training loop checkpoints and stops it
    try:
        work(argv[0])
        return 0
    except BaseException as e:
        SIGNALS.end()
        return ending(e, None, 0, 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
