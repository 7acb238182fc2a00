"""A study's runs trained in several one-thread processes (``--jobs N``; ``scripts/grid.py`` trains its grids so).

On a 2-core CPU two one-thread processes get more through than one two-thread process (BENCHMARKS.md, "Two
cores"): these models are too small for two threads to keep both cores busy. What each run computes is unchanged
but for the thread count, which fp32 numbers depend on: every worker is pinned to ``--threads`` (1 unless given).

The caller starts up to N worker processes (``python workers.py <task file>``) on one list of work items
(:func:`plan`): the self-built models when the caller has not built them, each seed's judged pairs (``--pair_source
generated``), each seed's reward model (learned-reward PPO) and DPO's reference log-probs, then every run, done
exactly as the one-process loop does it (``experiment.obtain_run``: kept when finished with ``--resume``, linked
from ``--reuse_runs_from``, else trained). Each worker takes the first item no worker has claimed yet (an exclusive
file create) whose prerequisites are done, so a long run on one process never leaves the other idle while other
items remain, and no two processes ever write one cache entry. After training, the study's protocol hands the
held-out evaluations of the chosen checkpoints to the workers the same way (``protocol.heldout_result``, cached).

Each worker's output goes to ``<output_dir>/logs/<tag>_worker<i>.log`` (``train``, ``heldout``); the caller shows
one progress bar. A worker that fails stops the study (the others checkpoint and stop) with one line naming its
log; finished runs are kept (``--resume`` continues). Ctrl-C (or SIGTERM to the caller) reaches the workers: each
checkpoints and stops.
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


def plan(cfg, specs: list, build_models: bool = False) -> list[dict]:
    """The work items for ``specs`` (``study.RunSpec``), each with ``after``: the indices of the items it waits for.
    The self-built models before everything (when asked); each seed's judged pairs (``--pair_source generated``)
    before that seed's reward model and reference log-probs; those before the seed's runs, so that no two
    processes ever write one cache entry. The runs of PPO and PPO-GT (the longest) come before DPO's, so that the
    last items, which one process may finish alone, are short."""
    items = [{"what": "models", "after": []}] if build_models and cfg.model.build_offline_models else []
    first = list(range(len(items)))
    seeds = list(dict.fromkeys(s.seed for s in specs))
    pairs = {}
    if cfg.dpo.pair_source == "generated":
        for seed in seeds:
            pairs[seed] = [len(items)]
            items.append({"what": "pairs", "seed": seed, "after": first})
    shared = {}
    for seed in seeds:
        mine = [s for s in specs if s.seed == seed]
        dpo = next((s for s in mine if s.method == "dpo"), None)
        ppo = next((s for s in mine if s.method != "dpo"  # on the learned reward: the reward model
                    and cfg.replace(**s.overrides).ppo.ppo_reward == "learned"), None)
        for what, spec in (("reference_logps", dpo), ("reward_model", ppo)):
            if spec is not None:
                shared.setdefault(seed, []).append(len(items))
                items.append({"what": what, "spec": dataclasses.asdict(spec), "after": first + pairs.get(seed, [])})
    for spec in sorted(specs, key=lambda s: s.method == "dpo"):  # stable: the study's order otherwise
        items.append({"what": "run", "spec": dataclasses.asdict(spec),
                      "after": first + pairs.get(spec.seed, []) + shared.get(spec.seed, [])})
    return items


def run_in_processes(cfg, specs: list, jobs: int, build_models: bool = False) -> None:
    """Train ``specs`` (``study.RunSpec``): every item of their :func:`plan` in up to ``jobs`` worker processes."""
    run_items(cfg, plan(cfg, specs, build_models), jobs, f"{len(specs)} runs", "train")


def run_items(cfg, items: list[dict], jobs: int, what: str, tag: str) -> None:
    """Do ``items`` (:func:`plan`'s, or ``{"what": "heldout", "seed", "run", "step"}``: a held-out evaluation for
    ``protocol.heldout_result``'s cache) in up to ``jobs`` worker processes (see the module's docstring). Raises
    ``run_log.StopTraining`` when a worker fails (the others are stopped: each checkpoints its run);
    ``KeyboardInterrupt`` after the workers stopped when interrupted."""
    from tqdm.auto import tqdm

    from run_log import StopTraining, strict_json

    logs = Path(cfg.run.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    worker_cfg = cfg.replace(model={"threads": cfg.model.threads or (1 if jobs > 1 else 0)}, run={"jobs": 1})
    threads = f"{worker_cfg.model.threads} CPU thread(s)" if worker_cfg.model.threads else "torch's default threads"
    items = [{"after": [], **item} for item in items]
    n = min(jobs, len(items))
    print(f"study: {what} in {n} process(es) of {threads} each; their logs in {logs}/", flush=True)
    claims = logs / f"claims-{os.getpid()}-{time.time_ns()}"
    claims.mkdir()
    task = claims / "task.json"
    task.write_text(strict_json({"config": worker_cfg.to_dict(), "items": items, "claims": str(claims)}))
    procs = []
    for i in range(n):
        log = logs / f"{tag}_worker{i}.log"
        with open(log, "w") as f:
            # the caller's working directory: the config's relative paths mean the same in every process
            procs.append((subprocess.Popen([sys.executable, str(ROOT / "workers.py"), str(task)], stdout=f,
                                           stderr=subprocess.STDOUT), log))
    bar = tqdm(total=len(items), desc=f"study: {what} ({n} processes)", unit="item")

    def advance():
        done = len(list(claims.glob("*.done")))
        if done > bar.n:
            bar.update(done - bar.n)

    def stop_all():  # at once: a worker that got the terminal's Ctrl-C too counts the copy once
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            p.wait()

    try:
        while None in (codes := [p.poll() for p, _ in procs]):  # every process polled, each time
            advance()
            if any(codes):  # one failed: the others would wait on its items forever
                stop_all()
            time.sleep(1)
        advance()
    except KeyboardInterrupt:
        stop_all()
        raise
    finally:
        bar.close()
        shutil.rmtree(claims, ignore_errors=True)
    failed = [(p.returncode, log) for p, log in procs if p.returncode not in (0, -signal.SIGTERM, 143)]
    failed = failed or [(p.returncode, log) for p, log in procs if p.returncode]
    if failed:
        code, log = failed[0]
        lines = [x for x in log.read_text(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
        said = next((x for x in reversed(lines) if x.startswith(("error:", "interrupted"))), lines[-1] if lines else "")
        raise StopTraining(f"study: a worker process failed (exit code {code}): {said.removeprefix('error: ')} (its "
                           f"log: {log}); finished runs are kept: rerun with --resume to continue",
                           code if code in (2, 130, 143) else 1)


def _claim(claims: Path, i: int) -> bool:
    try:
        os.close(os.open(claims / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def work(task_path: str) -> None:
    """A worker: take items one by one (:func:`_next_item`) until none is left (the models and each seed's data
    loaded once, when first needed)."""
    import torch
    import transformers

    import dataset
    import experiment
    import protocol
    import train_dpo
    from config import Config
    from logprobs import ResponseLogProbs
    from models import resolve_device, weights_fingerprint
    from reward_model import train_reward_model
    from run_utils import make_accelerator
    from study import RunSpec

    task = json.loads(Path(task_path).read_text())
    cfg, claims, items = Config.from_dict(task["config"]), Path(task["claims"]), task["items"]
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    stack, contexts = None, {}
    while (i := _next_item(claims, items)) is not None:
        item = items[i]
        if stack is None:
            reviews = dataset.load_reviews(cfg.data.data, verbose=False)
            train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
            acc = make_accelerator(resolve_device(cfg.model.device))
            stack = experiment.load_stack(cfg, acc, train_df, eval_df)  # builds the models for item "models"
        if item["what"] != "models":
            spec = RunSpec(**item["spec"]) if "spec" in item else None
            seed = spec.seed if spec else item["seed"]
            if seed not in contexts:
                contexts[seed] = experiment.seed_context(stack, stack.cfg.replace(run={"seed": seed}))
            data, ctx = contexts[seed]
            rcfg = stack.cfg.replace(run={"seed": seed}).replace(**(spec.overrides if spec else {}))
            if item["what"] == "reward_model":
                train_reward_model(rcfg, data, ctx)
            elif item["what"] == "reference_logps":  # as train_dpo.train makes them: its runs find them cached
                train_dpo.run_reference_logps(rcfg, data.train_pairs, ResponseLogProbs(stack.ref_model),
                                              weights_fingerprint(stack.ref_model), ctx)
            elif item["what"] == "run":
                experiment.obtain_run(rcfg, spec, data, ctx, resume=cfg.run.resume)
            elif item["what"] == "heldout":  # as the study's protocol evaluates it, into its cache
                protocol.heldout_result(rcfg, ctx.on(data.eval_prompts), rcfg.eval.eval_temperature, item["run"],
                                        item["step"])
        (claims / f"{i}.done").touch()


def _next_item(claims: Path, items: list[dict]) -> int | None:
    """Claim the first unclaimed item whose ``after`` items are all done; wait while every unclaimed one waits on
    another process's item; None when every item is claimed."""
    while True:
        open_ = [i for i in range(len(items)) if not (claims / str(i)).exists()]
        if not open_:
            return None
        for i in open_:
            if all((claims / f"{j}.done").exists() for j in items[i]["after"]) and _claim(claims, i):
                return i
        time.sleep(1)


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
