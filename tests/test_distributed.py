"""Data parallelism under ``accelerate launch`` on the CPU (2 processes, gloo). ``uv run pytest -m distributed``.

Two processes must reproduce one process at the same global batch, write everything once, stop together on
Ctrl-C and resume under the launcher.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOKE, copy_offline_models, require_imdb, run_main
from transformers import AutoModelForCausalLM

from runtime.run_log import read_metrics
from training.lifecycle import latest_checkpoint

pytestmark = pytest.mark.distributed
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


EVAL_SPLIT = ("--n_eval_prompts", "25", "--eval_batch_size", "4")


def launch(out: Path, *args: str, script: Path = ROOT / "main.py", env: dict | None = None,
           **popen) -> subprocess.Popen:
    """``accelerate launch --multi_gpu --num_processes 2 main.py --preset smoke ...`` (on a CPU: two gloo processes)."""
    # configs/multi_gpu.yaml sets every launcher default, so accelerate prints no warnings about them
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs" / "multi_gpu.yaml"), "--num_processes", "2",
           str(script), *SMOKE,
           "--output_dir", str(out / "models"), "--plots_dir", str(out / "plots"), *args]
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def test_two_processes_reproduce_one_process_and_ppo_completes(tmp_path, smoke_run):
    """The smoke DPO at the same global batch: the same per-step losses and final weights as one process
    (smoke_run), within float32 reduction-order noise; PPO (its reward model too) runs data-parallel and writes
    a loadable model; outputs are written once."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    # 25 prompts in chunks of 4: 7 chunks, unevenly shared by 2 processes
    proc = launch(tmp_path, *EVAL_SPLIT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "x 2 processes" in out and out.count("dpo: saved") == 1  # the main process alone prints
    lines = [line for line in out.splitlines() if line.startswith(("dpo step ", "ppo iter ", "data: ", "offline: "))]
    single = [line for line in smoke_run["proc"].stdout.splitlines() if line.startswith("dpo step ")]
    assert len(lines) == len(set(lines)) and sum(line.startswith("dpo step ") for line in lines) == len(single) > 0
    assert "had defaults used instead" not in err and "were not passed to `accelerate launch`" not in err
    assert not list((tmp_path / "models" / "logs").glob("rank*-fatal.log"))  # armed, then removed: none died
    one = [r for r in read_metrics(smoke_run["dir"] / "models" / "dpo_toxic_reduced_model" / "metrics.jsonl")
           if "loss" in r]
    two = [r for r in read_metrics(tmp_path / "models" / "dpo_toxic_reduced_model" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(two) == 40
    for a, b in zip(one, two):  # stated tolerance: 1e-5 on the loss, 1e-4 on the gradient norm
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4, a["step"]
    w1 = AutoModelForCausalLM.from_pretrained(smoke_run["dir"] / "models" / "dpo_toxic_reduced_model").state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "dpo_toxic_reduced_model").state_dict()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    ppo = tmp_path / "models" / "ppo_toxic_reduced_model"
    AutoModelForCausalLM.from_pretrained(ppo)
    rows = [r for r in read_metrics(ppo / "metrics.jsonl") if "objective/kl" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["objective/kl"])) for r in rows)
    # both processes used the same KL coefficient and the same whitening statistics at every iteration
    assert all(r["sync/spread"] == 0.0 for r in rows)

    # The same weights (the reference) evaluated by one process at the thread count of each launched process (1):
    # identical per-prompt results. fp32 reductions depend on the thread count on some CPUs (an AVX2-only EPYC
    # differed in the 8th digit of one judge score at 2 threads against 1), so the promise is at equal threads.
    one_dir = tmp_path / "one"
    copy_offline_models(smoke_run["dir"] / "models", one_dir / "models")
    before = torch.get_num_threads()
    try:
        single = run_main(*SMOKE, *EVAL_SPLIT, "--dpo-only", "--dpo_steps", "2", "--threads", "1",
                          "--output_dir", str(one_dir / "models"), "--plots_dir", str(one_dir / "plots"))
    finally:
        torch.set_num_threads(before)  # run_main ran in this process
    assert single.returncode == 0, single.stderr[-2000:]
    res_one, res_two = (json.loads((d / "plots" / "results.json").read_text()) for d in (one_dir, tmp_path))
    assert res_one["machine"]["torch_threads"] == res_two["machine"]["torch_threads"] == 1  # the condition, as run
    ref_one, ref_two = res_one["reference"], res_two["reference"]
    assert len(ref_one["per_prompt"]["scores"]) == 25
    assert ref_one["per_prompt"] == ref_two["per_prompt"]  # bit for bit, prompt by prompt
    assert ref_one["win_rate_vs_ref"] == ref_two["win_rate_vs_ref"] and ref_one["examples"] == ref_two["examples"]
    for name in ("results.json", "dpo_results_dashboard.png"):
        assert (tmp_path / "plots" / name).exists()


def test_ctrl_c_stops_both_processes_at_one_step_and_resume_works_under_the_launcher(tmp_path, smoke_run):
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    args = ["--dpo-only", "--dpo_steps", "400", "--dpo_eval_every", "1000", "--save_every", "1000"]
    proc = launch(tmp_path, *args, start_new_session=True)
    metrics = tmp_path / "models" / "runs" / "dpo_toxic_reduced_model" / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.exists() or len(read_metrics(metrics)) < 10:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the launcher and both processes
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert err.count("dpo: interrupted (SIGINT) at step") == 1 and "--resume" in err  # one report, from rank 0
    ckpt = latest_checkpoint(metrics.parent)
    assert ckpt is not None and all((ckpt / f"random_states_{i}.pkl").exists() for i in (0, 1))
    step = int(ckpt.name[5:])
    assert step < 400 and not (tmp_path / "models" / "dpo_toxic_reduced_model").exists()

    resumed = launch(tmp_path, *args, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from {ckpt}" in out
    rows = [r for r in read_metrics(tmp_path / "models" / "dpo_toxic_reduced_model" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 401))  # nothing lost, nothing repeated


def test_an_error_on_rank_1_alone_reaches_the_user_with_its_rank_and_traceback(tmp_path, smoke_run):
    """Rank 1's output is silenced (stdout) and its reports of shared errors left to rank 0; its own error must
    still reach the user: one line naming the rank and the error, the traceback in the run's logs."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    proc = launch(tmp_path, "--dpo-only", script=ROOT / "tests" / "rank_fault.py")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    line = [x for x in err.splitlines() if x.startswith("error: rank 1: ")]
    assert len(line) == 1 and "ValueError: a bad input that only rank 1 sees" in line[0], err[-3000:]
    log = tmp_path / "models" / "logs" / "rank1-error.log"
    assert str(log) in line[0] and "_bad_input" in log.read_text() and "Traceback" in log.read_text()


def test_a_process_killed_by_a_fatal_signal_is_reported_in_one_line_by_the_survivor(tmp_path, smoke_run):
    """Rank 1 dies by SIGABRT (an abort inside C++ code: no Python except runs): the launcher stops rank 0, which
    names the dead process and its fatal error in one line, with the Python stack in the run's logs; no
    'interrupted' or 'rank 0' line to mislead."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    proc = launch(tmp_path, "--dpo-only", script=ROOT / "tests" / "rank_fault.py",
                  env={**os.environ, "HF_HUB_OFFLINE": "1", "RANK_FAULT": "abort"})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    log = tmp_path / "models" / "logs" / "rank1-fatal.log"
    line = [x for x in err.splitlines() if x.startswith("error: rank ")]
    assert len(line) == 1 and line[0].startswith("error: rank 1 died: Fatal Python error: Aborted"), err[-3000:]
    assert str(log) in line[0] and "_bad_input" in log.read_text()
    assert not [x for x in err.splitlines() if x.startswith("interrupted")], err[-3000:]
    # the launcher's SIGTERM, landing while the survivor reports, cut nothing (it once escaped as KeyboardInterrupt)
    assert "KeyboardInterrupt" not in err, err[-3000:]
    assert not (tmp_path / "models" / "logs" / "rank0-fatal.log").exists()  # the survivor's empty log is removed


def _sigterm_during(tmp_path, smoke_run, phase: str, *args: str):
    """Launch the smoke DPO through tests/slow_phase.py, send SIGTERM to the process group (a scheduler
    stopping the job: the launcher forwards its own copy) once both processes are inside ``phase``; returns
    (returncode, stderr, the run's directory)."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    mark = tmp_path / "in_phase"
    proc = launch(tmp_path, "--dpo-only", *args, script=ROOT / "tests" / "slow_phase.py", start_new_session=True,
                  env={**os.environ, "HF_HUB_OFFLINE": "1", "SLOW_PHASE": phase, "SLOW_MARK": str(mark)})
    deadline = time.time() + 300
    while not all(Path(f"{mark}.rank{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err, tmp_path / "models" / "runs" / "dpo_toxic_reduced_model"


def test_sigterm_during_the_reference_pass_ends_both_processes_with_one_line_and_resume_starts_over(
        tmp_path, smoke_run):
    code, err, run_dir = _sigterm_during(tmp_path, smoke_run, "reference")
    assert code != 0
    ours = [x for x in err.splitlines() if "interrupted" in x and "SignalException" not in x]
    assert len(ours) == 1 and "interrupted (SIGTERM) outside a training step" in ours[0], err[-3000:]
    assert "error: rank" not in err, err[-3000:]
    # nothing half-written: no checkpoint, no metrics, no model, no cached reference log-probs
    assert latest_checkpoint(run_dir) is None and not (run_dir / "metrics.jsonl").exists()
    assert not (tmp_path / "models" / "dpo_toxic_reduced_model").exists()
    assert not list((tmp_path / "models" / "cache").glob("ref_logps-*"))
    resumed = launch(tmp_path, "--dpo-only", "--dpo_steps", "2", "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"nothing to resume in {run_dir / 'checkpoints'}; starting from scratch" in out


def test_sigterm_during_an_evaluation_ends_both_processes_after_it_with_a_checkpoint_and_one_message(
        tmp_path, smoke_run):
    code, err, run_dir = _sigterm_during(tmp_path, smoke_run, "evaluation", "--dpo_steps", "400",
                                         "--dpo_eval_every", "5", "--save_every", "1000")
    assert code != 0
    assert err.count("dpo: interrupted (SIGTERM) at step 5;") == 1 and "--resume" in err, err[-3000:]
    assert "error: rank" not in err, err[-3000:]
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "step-0000005"
    assert all((ckpt / f"random_states_{i}.pkl").exists() for i in (0, 1)) and (ckpt / "meta.pt").exists()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 5 and "eval/safety_score" in rows[-1]  # the evaluation finished, then the stop


def test_a_slow_process_finishes_its_part_of_a_checkpoint_before_the_main_one_renames_it(tmp_path, smoke_run):
    """Rank 1's part of every checkpoint (its RNG state) is written 3 s late, as on a loaded machine: the main
    process waits for it before renaming the directory into place (it did not, and rank 1 then failed to write
    into a directory that was gone: the flaky failures of CI's multi-process tests)."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    proc = launch(tmp_path, "--dpo-only", "--dpo_steps", "8", "--save_every", "4", "--keep_checkpoints", "2",
                  script=ROOT / "tests" / "slow_phase.py",
                  env={**os.environ, "HF_HUB_OFFLINE": "1", "SLOW_PHASE": "rank1_save"})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    ckpts = sorted((tmp_path / "models" / "runs" / "dpo_toxic_reduced_model" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-0000004", "step-0000008"]
    assert all((c / f"random_states_{i}.pkl").exists() for c in ckpts for i in (0, 1))
