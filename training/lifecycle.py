"""The lifecycle of a training run, written once for DPO, PPO and PPO's reward model (:class:`TrainingRun`), and
the context the runs of a study share (:class:`RunContext`). The offline builders' loops (the base LM's
pre-training, the judge's training) are not runs of a study: they have the non-finite guard
(``run_utils.NonFiniteGuard``) and a clean Ctrl-C, not resume.

A trainer builds its model and optimiser, then hands the loop's harness to a ``TrainingRun``:

    run = TrainingRun(cfg, ctx, name, "dpo", steps, eval_every)     # directories, seeding
    ...                                                              # the algorithm's own setup
    run.begin(policy, {"scheduler": scheduler})                     # resume, metrics log, config, step-0 eval
    for step in run.steps():                                        # progress bar, Ctrl-C turned into a flag
        ...                                                          # the algorithm's own step (run.lap(phase)
                                                                     # times its phases)
        run.end_step(step, row, nonfinite, log_line, postfix)       # eval cadence, log, checkpoint, stop
    return run.finish(summary)                                      # atomic save and summary
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config import ConfigError, eval_due
from eval_utils import eval_metrics, evaluate_policy
from modeling.models import dtype_name
from runtime.artifacts import atomic_write_dir, replace_dir
from runtime.run_log import SIGNALS, MetricsLog, StopTraining, strict_json
from runtime.run_utils import any_process, seed_everything
from runtime.settings import RETIRED_AT, retired_setting, settings_diff


@dataclass
class RunContext:
    """What the training runs of a study share: the tokenizer, the frozen reference, the device, precision and
    accelerator; for evaluation, the judge and the held-out prompts with their sampling seed. A run that is not
    evaluated (the benchmarks time training alone) leaves the judge and the prompts out."""

    tokenizer: object
    ref_model: object
    device: object
    acc: object  # the run's Accelerator (one process, or one of N)
    dtype: torch.dtype = torch.float32
    batch_size: int = 64  # of generation and judging
    judge_tok: object = None
    judge: object = None
    judge_dtype: torch.dtype | None = None  # the judge's own precision (None: ``dtype``)
    prompts: list[list[int]] = field(default_factory=list)  # the evaluation prompts
    max_new_tokens: int = 0  # completion length at evaluation
    seed: int = 0  # the evaluation's sampling seed
    _ref_results: dict = field(default_factory=dict, repr=False, init=False)

    def __post_init__(self):
        if self.judge_dtype is None:
            self.judge_dtype = self.dtype

    def on(self, prompts: list[list[int]]) -> RunContext:
        """The same context evaluating on other prompts (the held-out ones, after training on validation)."""
        if not prompts:  # the guard that keeps tuning and probes off the test set (scripts/grid.py draws none)
            raise ConfigError("no held-out prompts were drawn (--n_eval_prompts 0, the tuning and probe scripts' "
                              "validation-only mode): nothing here may evaluate the held-out prompts")
        return dataclasses.replace(self, prompts=prompts)

    def reference_result(self, temperature: float) -> dict:
        """The reference's evaluation at ``temperature``, computed once (it never changes)."""
        if temperature not in self._ref_results:
            self._ref_results[temperature] = evaluate_policy(self.ref_model, self, temperature)
        return self._ref_results[temperature]


class TrainingRun:
    """One training run's harness around a trainer's own loop: its directories (``<output_dir>/runs/<name>/``
    while training, ``<output_dir>/<name>/`` once saved), seeding, resume, ``metrics.jsonl`` and the trackers,
    the step-0 and periodic evaluations, the non-finite counter, checkpoints, interrupts and divergence, the
    training and evaluation timers, and the final atomic save.

    Args:
        method: ``dpo`` or ``ppo``: the prefix of log lines and messages (and of the learning-rate flag named
            when a run diverges).
        steps, eval_every: the run's length and evaluation cadence (the last step is always evaluated).
        eval_steps: the steps to evaluate at instead of every ``eval_every`` (``config.eval_due``), when given.
        evaluate: False skips every evaluation (benchmarks time the training alone); a function ``evaluate(step)
            -> dict`` replaces the policy's evaluation (the reward model's validation pair accuracy): no step-0
            evaluation of the reference then, and nothing kept for a study.
        unit: what one step is called in messages (``step``, ``iteration``).
        desc: the progress bar's label (default ``method``).
        final_dir: where the finished run is saved (default ``<output_dir>/<name>``).
        per_process: batch-size flags whose values must divide by the number of processes.
    """

    def __init__(self, cfg, ctx: RunContext, name: str, method: str, steps: int, eval_every: int,
                 evaluate=True, unit: str = "step", per_process: dict | None = None, desc: str | None = None,
                 final_dir: Path | None = None, eval_steps: list[int] | None = None):
        acc = ctx.acc
        for flag, value in (per_process or {}).items():
            if value % acc.num_processes:
                raise ConfigError(f"{flag} {value} must be a multiple of the {acc.num_processes} processes")
        self.cfg, self.ctx, self.name, self.method, self.unit = cfg, ctx, name, method, unit
        self.total, self.eval_every, self.evaluate, self.desc = steps, eval_every, evaluate, desc or method
        self.eval_steps = list(eval_steps or [])
        out = Path(cfg.run.output_dir)
        self.run_dir, self.final_dir = out / "runs" / name, Path(final_dir) if final_dir else out / name
        self.stopped_at = None  # the step whose validation KL passed --max_kl, if one did
        if cfg.run.resume:  # before any of the run's work
            self.check_resumable()
        seed_everything(cfg.run.seed)
        self.t_setup = time.time()

    def begin(self, policy, state: dict, setup_s: float | None = None) -> int:
        """Resume from the run's latest checkpoint (with ``--resume``) or start afresh; open metrics.jsonl, save
        the config beside it and evaluate the starting point (step 0). ``policy`` is the prepared model;
        ``state`` the objects checkpointed besides it and the optimiser (scheduler, KL controller).
        ``setup_s``: the training seconds spent before the first step (default: since the run was created).
        Returns the last step already done."""
        acc, rc = self.ctx.acc, self.cfg.run
        self.policy, self.state = policy, state
        setup_s = time.time() - self.t_setup if setup_s is None else setup_s
        self.start, self.timer, self.consecutive_bad, resumed = resume_or_start(acc, self.run_dir, rc.resume, setup_s,
                                                                                self.name, state)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.start if resumed else None, acc, self.name,
                                  self.cfg.to_dict())
        if acc.is_main_process:
            self.cfg.save(self.run_dir / "training_config.json")
        if self.start == 0 and self.evaluate is True:
            with self.timer.evaluating():
                result = self.ctx.reference_result(self.cfg.eval.eval_temperature)
                self.metrics.log({"step": 0, "time_s": 0.0, **eval_metrics(result)})
        return self.start

    def check_resumable(self) -> None:
        """Refuse (exit 2, before any training) to resume a checkpoint written with other settings than this
        run's: it would continue the old run and save it under the new config. The checkpoint's own config is
        compared (older checkpoints: the one saved beside them by the run that wrote them)."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return
        saved = next((p for p in (ckpt / "training_config.json", self.run_dir / "training_config.json") if p.exists()),
                     None)
        saved = json.loads(saved.read_text()) if saved else None
        if saved and (retired := retired_setting(saved)):
            raise StopTraining(f"{self.name}: the checkpoint {ckpt} was written with {retired}, which this code no "
                               f"longer runs; drop --resume to train it again, or resume it at commit {RETIRED_AT}", 2)
        diff = settings_diff(saved, self.cfg.to_dict(), self.method) if saved else []
        if diff:
            more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
            raise StopTraining(f"{self.name}: the checkpoint {ckpt} was written with other settings ({diff[0]}{more}); "
                               f"resume with the settings it was written with, or drop --resume to train from "
                               f"scratch", 2)

    def steps(self):
        """The steps still to run (1-based), under a progress bar; SIGINT/SIGTERM meanwhile only set a flag that
        :meth:`end_step` acts on after the step (a checkpoint, then exit 130 or 143: ``run_log.Signals``)."""
        self.bar = tqdm(range(self.start + 1, self.total + 1), desc=self.desc, unit=self.unit,
                        initial=self.start, total=self.total)
        with SIGNALS.collecting() as self.interrupted:
            for step in self.bar:
                self._t_step = self._t_lap = time.time()
                self._laps = {}
                yield step
                if self.stopped_at is not None:
                    break

    def lap(self, phase: str) -> None:
        """Time the phase of this step that just ended (since the step began or the last lap): logged as
        ``charts/<phase>_s``."""
        now = time.time()
        self._laps[f"charts/{phase}_s"], self._t_lap = now - self._t_lap, now

    def step_seconds(self) -> float:
        """Seconds since this step began."""
        return time.time() - self._t_step

    def end_step(self, step: int, row: dict, nonfinite: bool, log_line: str, postfix: dict) -> None:
        """After the update of ``step``: evaluate when due, append ``row`` (the step's metrics) to metrics.jsonl,
        print ``log_line`` every ``--log_every`` steps and at evaluations, checkpoint every ``--save_every``
        steps, and stop (after a checkpoint) on an interrupt or after ``--max_nonfinite_skips`` consecutive
        non-finite steps. A non-finite step must have left the weights untouched."""
        acc, rc = self.ctx.acc, self.cfg.run
        self.consecutive_bad = self.consecutive_bad + 1 if nonfinite else 0
        row = {"step": step, **row, **self._laps, "nonfinite_skipped": int(nonfinite), "time_s": self.timer.elapsed}
        if self.evaluate and eval_due(step, self.total, self.eval_every, self.eval_steps):
            with self.timer.evaluating():
                if callable(self.evaluate):
                    row.update(self.evaluate(step))
                else:
                    row.update(eval_metrics(evaluate_policy(self.policy, self.ctx, self.cfg.eval.eval_temperature)))
                    if self.cfg.run.sweep:  # the study chooses among the evaluated checkpoints: keep their weights
                        save_lm(acc, self.policy, evaluated_dir(self.run_dir, step))
        self.metrics.log(row)
        self.bar.set_postfix(postfix)
        max_kl = self.cfg.eval.max_kl
        if max_kl is not None and row.get("eval/kl_to_ref", 0.0) > max_kl and step < self.total:
            # Nothing the study reads lies past it: every process read the same (all-gathered) evaluation.
            self.stopped_at = step
            tqdm.write(f"{self.method}: validation KL {row['eval/kl_to_ref']:.2f} > --max_kl {max_kl:g} at "
                       f"{self.unit} {step}: stopped, {self.total - step} {self.unit}s early")
        if step % rc.log_every == 0 or any(k.startswith("eval/") for k in row):
            extra = (f" | safety {row['eval/safety_score']:.3f} kl {row['eval/kl_to_ref']:.2f}"
                     if "eval/safety_score" in row else
                     "".join(f" | {k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval/")))
            tqdm.write(log_line + extra)

        # Skipped steps leave the weights untouched, so after too many of them the current weights are still
        # the last good ones: save them, then stop. Every process stops at the same step.
        diverged = self.consecutive_bad >= rc.max_nonfinite_skips
        stop = any_process(self.interrupted.signum is not None, acc)
        if step % rc.save_every == 0 or stop or diverged:
            ckpt = checkpoint(acc, self.run_dir, step, self.timer, 0 if diverged else self.consecutive_bad,
                              rc.keep_checkpoints, self.state, self.cfg)
            if diverged:
                raise StopTraining(f"{self.method}: {self.consecutive_bad} consecutive {self.unit}s had a non-finite "
                                   f"loss or gradient (last at {self.unit} {step}); the last good weights are in "
                                   f"{ckpt}; lower --{self.method}_lr and add --resume", 1)
            if stop:
                raise StopTraining(f"{self.method}: interrupted ({SIGNALS.name}) at {self.unit} {step}; checkpoint "
                                   f"saved in {ckpt}. Resume with the same command plus --resume", SIGNALS.exit_code)

    def finish(self, summary: dict, note: str = "", save=None) -> dict:
        """Save the policy atomically (a crash here never leaves a half-written model nor destroys the previous
        one) with its config, metrics and summary; returns the train() output: ``model_dir``, ``policy`` and the
        summary. ``save(summary)`` replaces the policy's save (the reward model writes its cached artifact)."""
        self.bar.close()
        summary = {"method": self.method, "precision": dtype_name(self.ctx.dtype), "train_time_s": self.timer.elapsed,
                   "eval_time_s": self.timer.eval_s,
                   # what its metrics.jsonl evaluations were on, and whether their weights were kept (the study's)
                   "evaluated_on": "validation", "kept_evaluated": bool(self.cfg.run.sweep),
                   "stopped_above_max_kl_at": self.stopped_at, **summary}
        if save is None:
            save_policy(self.ctx.acc, self.policy, self.ctx.tokenizer, self.cfg, self.run_dir, self.final_dir, summary)
        else:
            save(summary)
        self.metrics.close()
        print(f"{self.method}: saved {self.final_dir} ({summary['train_time_s']:.0f}s of training{note}; "
              f"{summary['eval_time_s']:.0f}s of evaluation)")
        return {"model_dir": str(self.final_dir), "policy": self.policy, **summary}


# ------------------------------------------------------------------------------------------ the pieces
def evaluated_dir(run_dir: Path, step: int) -> Path:
    """Where a study run keeps the weights of its evaluated step ``step`` (the checkpoints the study chooses
    among)."""
    return Path(run_dir) / "evaluated" / f"step-{step:07d}"


def save_lm(acc, policy, final_dir: Path, also=None) -> None:
    """Write the LM of a (prepared) :class:`logprobs.ResponseLogProbs` atomically into ``final_dir`` with
    ``save_pretrained``, then ``also(tmp_dir, model, state)`` if given. Every process takes part in gathering the
    weights (FSDP shards them); the main process writes."""
    state = acc.get_state_dict(policy)
    if acc.is_main_process:
        model = acc.unwrap_model(policy)

        def write(tmp: Path):
            model.lm.save_pretrained(tmp, state_dict={k[3:]: v for k, v in state.items() if k.startswith("lm.")})
            if also is not None:
                also(tmp, model, state)

        atomic_write_dir(final_dir, write)
    acc.wait_for_everyone()


def save_policy(acc, policy, tok, cfg, run_dir: Path, final_dir: Path, summary: dict) -> None:
    """Write a trained policy atomically into ``final_dir``: the LM (:func:`save_lm`), ``value_head.pt`` if it
    has one, its tokenizer, the resolved config, the run's metrics and its summary."""
    def also(tmp: Path, model, state):
        if model.v_head is not None:
            torch.save({k[7:]: v for k, v in state.items() if k.startswith("v_head.")}, tmp / "value_head.pt")
        tok.save_pretrained(tmp)
        cfg.save(tmp / "training_config.json")
        (tmp / "metrics.jsonl").write_text((Path(run_dir) / "metrics.jsonl").read_text())
        (tmp / "train_summary.json").write_text(strict_json(summary, indent=2))

    save_lm(acc, policy, final_dir, also)
    acc.free_memory()  # forget this run's prepared model and optimiser: the next run's save_state is its own


def checkpoint(acc, run_dir: Path, step: int, timer: Timer, consecutive_bad: int, keep: int,
               extra: dict | None = None, cfg=None) -> Path:
    """Atomically write ``checkpoints/step-N``: accelerate's ``save_state`` (the prepared model and optimiser,
    sharded or gathered as the FSDP config says, and every process's RNG states) plus ``meta.pt`` (step,
    timer, non-finite counter and the state dicts of ``extra``: scheduler, KL controller) and the run's config
    ``cfg`` (``training_config.json``). Every process calls it; the main one renames the finished directory
    into place and deletes all but the last ``keep``."""
    with SIGNALS.critical():  # a forcing Ctrl-C waits for the checkpoint to be whole
        root = Path(run_dir) / "checkpoints"
        final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        # Every process writes its own part (its RNG state; its shard under FSDP) and save_state does not wait for
        # the others: the main process must not rename the directory before they are done (a slower process then
        # found its directory gone and failed, and the other one died on the broken connection).
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {"step": step, "elapsed": timer.elapsed, "eval_s": timer.eval_s, "consecutive_bad": consecutive_bad,
                    **{k: obj.state_dict() for k, obj in (extra or {}).items()}}
            torch.save(meta, tmp / "meta.pt")
            if cfg is not None:  # what the checkpoint was trained with: a resume checks it
                cfg.save(tmp / "training_config.json")
            replace_dir(tmp, final)
            for old in sorted(root.glob("step-???????"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
    return final


def resume_or_start(acc, run_dir: Path, resume: bool, setup_s: float = 0.0, name: str = "run",
                    extra: dict | None = None):
    """With ``resume`` and a checkpoint: load it into the prepared model and optimiser (accelerate's
    ``load_state``, which also restores each process's RNG) and into the objects of ``extra``; returns
    ``(start_step, timer, consecutive_bad, resumed)``. Otherwise step 0, with a timer that already counts
    ``setup_s`` of training."""
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is None:
        if resume:  # say so: a mistyped --output_dir would otherwise retrain silently
            print(f"{name}: nothing to resume in {Path(run_dir) / 'checkpoints'}; starting from scratch")
        return 0, Timer(setup_s), 0, False
    acc.load_state(str(ckpt))
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    for key, obj in (extra or {}).items():
        obj.load_state_dict(meta[key])
    print(f"{name}: resuming from {ckpt} (step {meta['step']})")
    return meta["step"], Timer(meta["elapsed"], meta["eval_s"]), meta["consecutive_bad"], True


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-???????"))
    return ckpts[-1] if ckpts else None


class Timer:
    """Training wall time of a run, without its evaluations, surviving resumes (both sums are checkpointed).

    Time spent inside ``with timer.evaluating():`` is counted in ``eval_s`` and left out of ``elapsed``.
    """

    def __init__(self, already: float = 0.0, eval_s: float = 0.0):
        self.start, self.already, self.eval_s, self._paused = time.time(), already, eval_s, 0.0

    @property
    def elapsed(self) -> float:
        return self.already + time.time() - self.start - self._paused

    @contextmanager
    def evaluating(self):
        t0 = time.time()
        try:
            yield
        finally:
            self._paused += time.time() - t0
            self.eval_s += time.time() - t0
