"""Interruption, resume, atomic saves, the non-finite guard and determinism."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, copy_offline_models, require_imdb, run_cli, run_main
from transformers import AutoModelForCausalLM

from runtime.artifacts import atomic_write_dir
from runtime.run_log import read_metrics
from training.lifecycle import latest_checkpoint

TIMING_KEYS = {"pairs_per_s", "time_s", "charts/tokens_per_s", "charts/generation_s", "charts/logps_s",
               "charts/score_s", "charts/update_s"}


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _args(out, *extra, dtype="fp32"):
    """A smoke run's arguments at a pinned precision (``--dtype auto`` would differ between CPUs)."""
    return ["--preset", "smoke", "--dtype", dtype, "--output_dir", str(out / "models"),
            "--plots_dir", str(out / "plots"), *extra]


def _weights(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


@pytest.mark.parametrize("method, steps", [("dpo", ["--dpo_steps", "150", "--dpo_eval_every", "50"]),
                                           ("ppo", ["--ppo_steps", "24", "--ppo_eval_every", "8"])])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, smoke_run, method, steps):
    require_imdb()
    only = "--dpo-only" if method == "dpo" else "--ppo-only"
    args = [only, *steps, "--save_every", "3"]
    for d in ("full", "killed"):
        copy_offline_models(smoke_run["dir"] / "models", tmp_path / d / "models")
    # All three runs are fresh main.py processes, as a user's would be: a run inside the long-lived pytest
    # process can differ in the last float32 bit (MKL's kernels depend on memory alignment), which this
    # bit-exact comparison would take for a resume bug.
    full = run_cli(*_args(tmp_path / "full", *args))
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    run_dir = out / "models" / "runs" / f"{method}_toxic_reduced_model"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *_args(out, *args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(run_dir) is None or int(latest_checkpoint(run_dir).name[5:]) < 6:
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final_dir = out / "models" / f"{method}_toxic_reduced_model"
    assert not final_dir.exists(), "the run finished before the kill: make it longer"

    ckpt = latest_checkpoint(run_dir)
    resumed = run_cli(*_args(out, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{method}_toxic_reduced_model: resuming from {ckpt} (step {int(ckpt.name[5:])})" in resumed.stdout
    a = _strip(read_metrics(tmp_path / "full" / "models" / f"{method}_toxic_reduced_model" / "metrics.jsonl"))
    b = _strip(read_metrics(final_dir / "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6, nan_ok=True), (ra["step"], k)
    wa, wb = _weights(tmp_path / "full" / "models" / f"{method}_toxic_reduced_model"), _weights(final_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_reward_model_resumes_after_sigkill_with_the_same_per_step_losses(tmp_path, smoke_run):
    """The reward model's loop runs under the lifecycle: killed mid-training, ``--resume`` continues from its
    checkpoint (early stopping's memory included) to the same per-step losses, evaluations and weights."""
    require_imdb()
    from safetensors.torch import load_file

    args = ["--ppo-only", "--rm_steps", "240", "--rm_eval_every", "20", "--rm_patience", "100", "--save_every", "3"]
    for d in ("full", "killed"):
        copy_offline_models(smoke_run["dir"] / "models", tmp_path / d / "models")
    full = run_cli(*_args(tmp_path / "full", *args))
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    runs = out / "models" / "runs" / "reward_model"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *_args(out, *args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240

    def last_step():
        ckpts = [latest_checkpoint(d) for d in runs.glob("*")] if runs.exists() else []
        return max([int(c.name[5:]) for c in ckpts if c is not None] or [0])

    while last_step() < 30:
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((out / "models").glob("reward_models/*/rm_report.json")), "finished before the kill"
    step = last_step()
    assert step < 240

    resumed = run_cli(*_args(out, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from " in resumed.stdout and f"(step {step})" in resumed.stdout
    (a_dir,), (b_dir,) = (list((tmp_path / d / "models").glob("reward_models/*")) for d in ("full", "killed"))
    a, b = _strip(read_metrics(a_dir / "metrics.jsonl")), _strip(read_metrics(b_dir / "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 241))
    assert sum("eval/val_pair_accuracy" in r for r in b) == 12
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, abs=1e-6), ra["step"]
    ra, rb = (json.loads((d / "rm_report.json").read_text()) for d in (a_dir, b_dir))
    assert ra["curve"] == rb["curve"] and ra["best_step"] == rb["best_step"]
    wa, wb = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, smoke_run):
    require_imdb()
    out = tmp_path / "int"
    copy_offline_models(smoke_run["dir"] / "models", out / "models")
    run_dir = out / "models" / "runs" / "dpo_toxic_reduced_model"
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"),
                             *_args(out, "--dpo-only", "--dpo_steps", "100000", "--save_every", "100000")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir / "metrics.jsonl")) < 5:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    ckpt = latest_checkpoint(run_dir)
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    # accelerate's save_state: the policy's weights (the LM inside the log-prob wrapper), optimiser, RNG
    from safetensors.torch import load_file

    state = {k[len("lm."):]: v for k, v in load_file(ckpt / "model.safetensors").items()}
    model = AutoModelForCausalLM.from_pretrained(next((out / "models" / "offline").glob("base_lm-*")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings, saved once
    assert meta["step"] >= 4 and (ckpt / "optimizer.bin").exists() and (ckpt / "random_states_0.pkl").exists()


def test_atomic_write_keeps_the_previous_directory_on_failure(tmp_path):
    final = tmp_path / "model"
    atomic_write_dir(final, lambda d: (d / "weights.bin").write_text("good"))

    def crash(d):
        (d / "weights.bin").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_dir(final, crash)
    assert (final / "weights.bin").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_nan_loss_is_skipped_and_counted_and_repeated_nans_stop_the_run(tmp_path, smoke_run):
    require_imdb()
    for d in ("one", "many"):
        copy_offline_models(smoke_run["dir"] / "models", tmp_path / d / "models")
    ok = run_main(*_args(tmp_path / "one", "--dpo-only", "--debug_nan_steps", "3"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    rows = read_metrics(tmp_path / "one" / "models" / "dpo_toxic_reduced_model" / "metrics.jsonl")
    skipped = {r["step"]: r["nonfinite_skipped"] for r in rows if "nonfinite_skipped" in r}
    assert skipped[3] == 1 and sum(skipped.values()) == 1
    weights = _weights(tmp_path / "one" / "models" / "dpo_toxic_reduced_model")
    assert all(torch.isfinite(p).all() for p in weights.values())

    bad = run_main(*_args(tmp_path / "many", "--dpo-only", "--debug_nan_steps", "2", "3", "4",
                          "--max_nonfinite_skips", "3"))
    assert bad.returncode == 1
    assert "3 consecutive steps had a non-finite loss" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "many" / "models" / "dpo_toxic_reduced_model").exists()


def test_same_seed_smoke_runs_are_identical(tmp_path, smoke_run):
    again = run_main(*_args(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-2000:]
    first, second = smoke_run["dir"], tmp_path / "again"
    for name in ("dpo_toxic_reduced_model", "ppo_toxic_reduced_model"):
        assert _strip(read_metrics(first / "models" / name / "metrics.jsonl")) == \
            _strip(read_metrics(second / "models" / name / "metrics.jsonl"))
    r1 = json.loads((first / "plots" / "results.json").read_text())
    r2 = json.loads((second / "plots" / "results.json").read_text())
    for name in ("reference", "dpo", "ppo"):
        for key in ("safety_score", "positive_rate", "kl_to_ref", "win_rate_vs_ref", "examples"):
            assert r1[name][key] == r2[name][key], (name, key)


def test_same_seed_bf16_runs_are_identical_too(tmp_path, smoke_run):
    """Determinism holds per precision: two bf16 runs agree with each other (not with fp32)."""
    runs = []
    for d in ("a", "b"):
        copy_offline_models(smoke_run["dir"] / "models", tmp_path / d / "models")
        proc = run_main(*_args(tmp_path / d, "--dpo-only", "--dpo_steps", "12", "--dpo_eval_every", "6",
                               dtype="bf16"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(tmp_path / d / "models" / "dpo_toxic_reduced_model")
    assert _strip(read_metrics(runs[0] / "metrics.jsonl")) == _strip(read_metrics(runs[1] / "metrics.jsonl"))
    assert json.loads((runs[0] / "train_summary.json").read_text())["precision"] == "bf16"
    fp32 = _strip(read_metrics(smoke_run["dir"] / "models" / "dpo_toxic_reduced_model" / "metrics.jsonl"))
    assert _strip(read_metrics(runs[0] / "metrics.jsonl"))[5]["loss"] != fp32[5]["loss"]  # step 5: policy != ref


def test_timer_leaves_evaluation_out_of_training_time():
    from training.lifecycle import Timer

    timer = Timer(already=5.0)
    time.sleep(0.05)
    with timer.evaluating():
        time.sleep(0.3)
    assert 5.04 < timer.elapsed < 5.25 and 0.3 <= timer.eval_s < 0.45
    resumed = Timer(timer.elapsed, timer.eval_s)  # what a checkpoint restores
    with resumed.evaluating():
        time.sleep(0.1)
    assert resumed.eval_s >= 0.4 and resumed.elapsed < 5.3


def test_step_indices_walk_seeded_epochs_without_state():
    from runtime.run_utils import step_indices

    n, batch = 10, 4
    seen = [i for step in range(1, 6) for i in step_indices(step, batch, n, [0])]  # 20 items = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # each epoch reshuffles
    assert step_indices(3, batch, n, [0]) == seen[8:12]  # crosses the epoch boundary
    assert step_indices(3, batch, n, [1]) != seen[8:12]


def test_resume_with_nothing_to_resume_says_so(tmp_path, smoke_run):
    """A --resume that finds no checkpoint (a mistyped --output_dir, say) says where it looked."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    proc = run_main(*_args(tmp_path, "--dpo-only", "--dpo_steps", "2", "--resume"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    where = tmp_path / "models" / "runs" / "dpo_toxic_reduced_model" / "checkpoints"
    assert f"dpo_toxic_reduced_model: nothing to resume in {where}; starting from scratch" in proc.stdout


def test_resume_refuses_a_checkpoint_written_with_other_settings(tmp_path, smoke_run):
    # A finished run keeps its last checkpoints; --resume with another learning rate must not continue them
    # (and save the old run under the new config): one line, exit 2, before any work, nothing overwritten.
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    args = _args(tmp_path, "--dpo-only", "--dpo_steps", "6", "--save_every", "3")
    first = run_main(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    final = tmp_path / "models" / "dpo_toxic_reduced_model"
    before = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    ckpt = latest_checkpoint(tmp_path / "models" / "runs" / "dpo_toxic_reduced_model")
    assert (ckpt / "training_config.json").exists()

    other = run_main(*args, "--dpo_lr", "0.002", "--resume")
    assert other.returncode == 2
    err = other.stderr.strip().splitlines()
    assert len(err) == 1 and "written with other settings (dpo.dpo_lr: 0.001 -> 0.002)" in err[0], err
    assert "dpo: saved" not in other.stdout and "Traceback" not in other.stderr
    assert {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()} == before

    same = run_main(*args, "--resume", "--log_every", "2")  # run-control flags are not settings: still finished
    assert same.returncode == 0 and "finished earlier with the same settings: skipped" in same.stdout


def test_resume_refuses_a_ppo_run_saved_under_the_retired_kl_penalty_name(tmp_path, smoke_run):
    """--kl_penalty exact once meant the KL as a loss term summed over the response; the name is gone (full, sampled
    and loss now), so a checkpoint saved under it is refused in one line that says where it can still run."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    args = _args(tmp_path, "--ppo-only", "--ppo_steps", "2", "--save_every", "1")
    first = run_main(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    # every copy of the run's settings: the finished model's, the run's, its checkpoints'
    for saved in (tmp_path / "models").glob("**/ppo_toxic_reduced_model/**/training_config.json"):
        old = json.loads(saved.read_text())
        assert old["ppo"]["kl_penalty"] == "full"  # every preset's default
        old["ppo"]["kl_penalty"] = "exact"
        saved.write_text(json.dumps(old))
    proc = run_main(*args, "--resume")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "--kl_penalty exact" in err[0] and "resume it at commit" in err[0] and "Traceback" not in proc.stderr


def test_a_metrics_file_whose_last_line_was_cut_is_read_without_it(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert capsys.readouterr().err.count("cut mid-write") == 1  # said once
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # not a cut: a damaged file is an error
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(path)


def _unwritable_dir(tmp_path):
    """A directory this process cannot create files in: permission bits for a user; root writes through
    those, so for root sysfs, which refuses new files to everyone."""
    import os
    from pathlib import Path

    if os.geteuid() != 0:
        d = tmp_path / "read_only"
        d.mkdir()
        d.chmod(0o555)
        return d
    return Path("/sys")


@pytest.mark.parametrize("flag, where", [("--plots_dir", "read_only"), ("--plots_dir", "file"),
                                         ("--output_dir", "file"), ("--output_dir", "under_file"),
                                         ("--cache_dir", "read_only")])
def test_an_output_that_cannot_be_written_is_one_line_and_exit_2_before_any_work(tmp_path, flag, where):
    """Checked at start-up, before the data is read (not after training, hours later); nothing is left behind
    in the other output directories but what they held."""
    (tmp_path / "a_file").write_text("kept\n")
    path = {"read_only": _unwritable_dir(tmp_path), "file": tmp_path / "a_file",
            "under_file": tmp_path / "a_file" / "models"}[where]
    dirs = {"--output_dir": tmp_path / "models", "--plots_dir": tmp_path / "plots", "--cache_dir": tmp_path / "cache",
            flag: path}
    proc = run_cli("--preset", "smoke", "--dtype", "fp32", *[str(a) for kv in dirs.items() for a in kv])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith(f"error: {flag} {path}") and flag in err[0]
    assert "data:" not in proc.stdout and "offline:" not in proc.stdout  # before the data and the models
    assert (tmp_path / "a_file").read_text() == "kept\n"


def test_plots_only_checks_its_directory_too(tmp_path):
    proc = run_cli("--plots-only", "--plots_dir", str(tmp_path / "f"))  # writable, but no results.json in it
    assert proc.returncode == 2 and "results.json" in proc.stderr
    (tmp_path / "g").write_text("")
    proc = run_cli("--plots-only", "--plots_dir", str(tmp_path / "g"))
    assert proc.returncode == 2 and "is a file, not a directory" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture()
def signals():
    """A fresh process-wide signal policy, the test process's own handlers restored afterwards."""
    from runtime.run_log import Signals

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sig = Signals()
    sig.window_s = 0.3
    sig.install()
    yield sig
    for s, h in old.items():
        signal.signal(s, h)


def _send(signum):
    import os

    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # the handler runs in the main thread at the next bytecode


def test_one_interrupt_is_one_interrupt_in_a_loop_and_a_later_one_forces_but_not_mid_checkpoint(signals):
    with signals.collecting():
        _send(signal.SIGTERM)  # the loop's flag, no exception
        assert signals.signum == signal.SIGTERM and signals.exit_code == 143
        _send(signal.SIGINT)  # within the window: the same interrupt forwarded, ignored
        time.sleep(signals.window_s)
        wrote = []
        with pytest.raises(KeyboardInterrupt):
            with signals.critical():  # a later signal forces the exit, after the checkpoint is written
                _send(signal.SIGINT)
                wrote.append("whole")
        assert wrote == ["whole"]
    assert signals.exit_code == 143  # the first signal names the exit


def test_a_signal_while_the_process_reports_how_it_ended_cuts_nothing(signals):
    """Under a launcher, the SIGTERM that follows a peer's death can land while main.py prints the line that
    reports it: once the outcome is decided (Signals.end) no signal raises, even a first one; reset() rearms."""
    signals.end()
    _send(signal.SIGTERM)  # would raise KeyboardInterrupt outside a loop
    _send(signal.SIGINT)
    assert signals.signum is None
    signals.reset()
    with pytest.raises(KeyboardInterrupt):
        _send(signal.SIGTERM)


def test_outside_a_loop_the_first_signal_stops_at_once_and_its_forwarded_copy_is_ignored(signals):
    with pytest.raises(KeyboardInterrupt):
        _send(signal.SIGTERM)
    _send(signal.SIGTERM)  # the copy a launcher forwards, while the first is being handled: ignored
    assert signals.exit_code == 143


@pytest.mark.parametrize("signums, code", [((signal.SIGTERM,), 143), ((signal.SIGINT, signal.SIGINT), 130)])
def test_sigterm_and_a_forwarded_double_sigint_during_ppo_leave_a_checkpoint_resume_accepts(tmp_path, smoke_run,
                                                                                          signums, code):
    require_imdb()
    out = tmp_path / "sig"
    copy_offline_models(smoke_run["dir"] / "models", out / "models")
    run_dir = out / "models" / "runs" / "ppo_toxic_reduced_model"
    args = _args(out, "--ppo-only", "--ppo_steps", "100000", "--save_every", "100000", "--ppo_eval_every", "100000")
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir / "metrics.jsonl")) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    for s in signums:  # Ctrl-C twice in quick succession: the group's copy and the one uv run forwards
        proc.send_signal(s)
        time.sleep(0.1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert err.count("ppo: interrupted") == 1 and "Traceback" not in err and "--resume" in err
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and (ckpt / "meta.pt").exists()
    step = int(ckpt.name[5:])
    resumed = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args, "--resume"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while max([r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] or [0]) < step + 2:
        assert resumed.poll() is None and time.time() < deadline, resumed.communicate()[1][-2000:]
        time.sleep(0.05)
    resumed.send_signal(signal.SIGINT)
    out_text, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 130 and f"resuming from {ckpt}" in out_text, err[-2000:]


_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from runtime.artifacts import Artifact
art = Artifact({root_dir!r}, {{"kind": "judge"}}, prefix="judge-")
with art.building("test") as mine:
    print(mine, flush=True)
    time.sleep({sleep})
    if mine and {write}:
        art.write(lambda tmp: (tmp / "config.json").write_text("{{}}"))
"""


def _holder(tmp_path, sleep: float, write: bool = False) -> subprocess.Popen:
    """Another process that takes the artifact's lock (as a run building it does) and holds it ``sleep`` s."""
    code = _HOLDER.format(root=str(ROOT), root_dir=str(tmp_path / "offline"), sleep=sleep, write=write)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _lock_taken(art, proc) -> None:
    deadline = time.time() + 60
    while art.builder() is None:
        assert proc.poll() is None and time.time() < deadline, "the holder never took the lock"
        time.sleep(0.05)


def test_a_run_needing_a_model_another_run_is_building_says_so_once_and_waits_for_it(tmp_path, capsys):
    from runtime.artifacts import Artifact

    art = Artifact(tmp_path / "offline", {"kind": "judge"}, prefix="judge-")
    builder = _holder(tmp_path, 1.5)
    _lock_taken(art, builder)
    art.wait_for_builder("offline", poll_s=0.1)
    assert builder.wait(timeout=60) == 0  # returned once the builder was gone, not before
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and f"process {builder.pid}" in out[0] and str(art.path) in out[0] and ".tmp" not in out[0]
    art.lock_path.write_text(str(os.getppid()))  # a lock file left by a killed run, its pid now another process's
    art.wait_for_builder("offline")  # nobody holds it: no wait, nothing said
    assert art.builder() is None and capsys.readouterr().out == ""
    with art.building() as mine:  # this process's own lock is not another builder
        assert mine and art.lock_path.read_text() == str(os.getpid()) and art.builder() is None
        art.write(lambda tmp: (tmp / "config.json").write_text("{}"))
    assert not art.lock_path.exists() and art.exists()
    assert sorted(p.name for p in art.path.parent.iterdir()) == [art.path.name]  # no .tmp-<pid> nor .old left


def test_two_runs_started_together_build_once(tmp_path):
    """The lock is taken atomically (flock): of two processes that start building the same artifact at once,
    one builds and the other waits for it and reuses it (each wrote its pid into the lock file, and both built)."""
    procs = [_holder(tmp_path, 1.0, write=True) for _ in range(2)]
    said = sorted(p.communicate(timeout=120)[0].split()[-1] for p in procs)  # after the waiter's line
    assert said == ["False", "True"] and all(p.returncode == 0 for p in procs)


def test_a_killed_builder_holds_nobody_up_and_a_live_one_is_waited_for_with_a_limit(tmp_path):
    from config import ConfigError
    from runtime.artifacts import Artifact

    art = Artifact(tmp_path / "offline", {"kind": "judge"}, prefix="judge-")
    holder = _holder(tmp_path, 60)
    _lock_taken(art, holder)
    with pytest.raises(ConfigError, match=r"held .*\.lock for over"):  # never a wait without a limit
        art.wait_for_builder("offline", poll_s=0.05, limit_s=0.3)
    holder.kill()  # SIGKILL: no finally, the lock file stays, its lock goes with the process
    holder.wait()
    assert art.lock_path.exists() and art.builder() is None
    with art.building() as mine:
        assert mine


@pytest.mark.parametrize("to", ["process", "another thread"])
def test_a_signal_between_replace_dirs_two_renames_leaves_the_new_version_whole(tmp_path, monkeypatch, to):
    """``replace_dir`` renames the old version away, then the new one into place: a signal that lands between the
    two is held back until both are done (it landed at once, and no version was left at the path). Also when the
    kernel hands it to another thread (torch's, tqdm's: a process-directed signal goes to any thread that does not
    block it, and Python then runs its handler in the main thread at once): blocking it in the main thread alone
    let it through there, one CI run in many."""
    import threading

    from runtime.artifacts import replace_dir

    final, tmp = tmp_path / "model", tmp_path / "model.tmp"
    for d, text in ((final, "old"), (tmp, "new")):
        d.mkdir()
        (d / "weights").write_text(text)
    rename = Path.rename
    done = threading.Event()
    other = threading.Thread(target=done.wait, daemon=True)
    other.start()

    def rename_then_signal(self, target):
        out = rename(self, target)
        if self == final:  # the first rename: the old version moved away, the new one not yet in place
            if to == "process":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                signal.pthread_kill(other.ident, signal.SIGINT)
                time.sleep(0.05)  # the other thread's C handler has run: the main thread's Python handler is due
        return out

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", rename_then_signal)
    before = signal.signal(signal.SIGINT, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):  # delivered, after the renames
            replace_dir(tmp, final)
    finally:
        signal.signal(signal.SIGINT, before)
        done.set()
    assert (final / "weights").read_text() == "new" and not tmp.exists()


def test_every_cached_number_is_keyed_by_the_thread_count(tmp_path, smoke_run, monkeypatch):
    """fp32 sums depend on the CPU thread count on some CPUs, so every cache whose numbers they change keys on
    it: the SFT model, the judged pairs, the reference log-probs, the reward model and the held-out evaluations
    (their keys left it out, and one results.json could mix 1- and 2-thread numbers). The self-built models alone
    are built once and reused at any count."""
    from runtime.artifacts import Artifact

    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    made = []
    init = Artifact.__init__

    def record(self, root, settings, prefix="", *args, **kwargs):
        init(self, root, settings, prefix, *args, **kwargs)
        made.append((Path(root).name, prefix, json.dumps(settings)))

    monkeypatch.setattr(Artifact, "__init__", record)
    before = torch.get_num_threads()
    try:
        proc = run_main("--preset", "smoke", "--dtype", "fp32", "--sweep", "--seeds", "0", "--threads", "1",
                        "--pair_source", "generated", "--sft_steps", "2",
                        "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots"))
    finally:
        torch.set_num_threads(before)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kinds = {(root, prefix) for root, prefix, _ in made}
    for kind in (("sft", ""), ("cache", "generated_pairs-"), ("cache", "heldout-"), ("reward_models", "")):
        assert kind in kinds, f"no {kind} artifact made: the check below would check nothing"
    assert any(prefix == "ref_logps-" for _, prefix, _ in made)
    for root, prefix, settings in made:
        if prefix in ("base_lm-", "judge-"):
            assert "torch_threads" not in settings
        else:
            assert '"torch_threads": 1' in settings, (root, prefix)


def test_a_signal_during_the_offline_build_stops_it_in_one_line_within_2_seconds(tmp_path):
    """SIGTERM while the self-built models are being built (the tokenizer's and the LM's training run in native
    code, where Python's handler waits for the call to end: 11 of 13 such signals went unanswered for seconds):
    one line, exit 143 within 2 s, no traceback, and no model left in place."""
    require_imdb()
    import os

    offline = tmp_path / "models" / "offline"
    # the offline preset: its tokenizer trains for seconds in native code on 15,000 reviews, where the signal lands
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--preset", "offline", "--dtype", "fp32",
                             "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots")],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(offline.glob("*.tmp-*")):  # a build under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    time.sleep(1.0)  # inside the tokenizer's training
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    lines = [x for x in err.splitlines() if x.strip() and "%|" not in x]
    assert proc.returncode == 143 and took < 2.0, (proc.returncode, took, err[-2000:])
    assert len([x for x in lines if x.startswith("interrupted (SIGTERM)")]) == 1 and "Traceback" not in err
    assert not [d for d in offline.iterdir() if re.fullmatch(r"(base_lm|judge)-[0-9a-f]{12}", d.name)]


def test_a_cut_build_is_never_read_as_a_model(tmp_path):
    """A build killed before its rename leaves ``<kind>-<key>.tmp-<pid>`` with its settings written first: the
    search for the same model at another precision skips it (it offered it as a model to reuse)."""
    from modeling.offline_models import _built_at_other_precision

    settings = {"vocab_size": 64, "precision": "fp32"}
    cut = tmp_path / "base_lm-0123456789ab.tmp-4242"
    cut.mkdir()
    (cut / "build_settings.json").write_text(json.dumps(settings))
    assert _built_at_other_precision(tmp_path, "base_lm", {**settings, "precision": "bf16"}) is None
    whole = tmp_path / "base_lm-0123456789ab"
    cut.rename(whole)
    found = _built_at_other_precision(tmp_path, "base_lm", {**settings, "precision": "bf16"})
    assert found is not None and found[0] == whole and found[1] == "fp32"


def test_a_resume_trims_metrics_whole_or_not_at_all_and_refuses_a_bad_line(tmp_path, monkeypatch):
    """On resume metrics.jsonl is trimmed to the checkpoint's step: written to a file of its own and renamed, so a
    kill mid-write leaves the old file whole (it was truncated in place: the file selection reads emptied); one
    rule for bad lines, read_metrics': a cut last line is skipped, a bad line elsewhere stops the resume in one line
    naming it (it was skipped silently)."""
    from runtime.run_log import MetricsLog, StopTraining

    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5))
    path.write_text(rows + '{"step": 5, "lo')  # the last line cut by a kill
    MetricsLog(path, resume_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]

    path.write_text(rows)
    write_text = Path.write_text

    def killed_mid_write(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, resume_step=2)
    monkeypatch.undo()
    assert path.read_text() == rows  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # and no temporary file left

    path.write_text(rows.replace('{"step": 2,', '{"step": 2 oops,'))
    with pytest.raises(StopTraining, match=r"line 2 is not JSON") as e:
        MetricsLog(path, resume_step=3)
    assert e.value.code == 2 and path.read_text() == rows.replace('{"step": 2,', '{"step": 2 oops,')


def test_a_killed_writers_temporary_directory_is_removed_by_the_next_write(tmp_path):
    """A writer killed outright (SIGKILL, or the signal watchdog's exit) leaves ``<name>.tmp-<pid>``; the next
    atomic write of the same path removes it when that process is gone, and leaves a live writer's alone."""
    from runtime.artifacts import atomic_write_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"model.tmp-{dead.pid}").mkdir()
    (tmp_path / f"model.tmp-{os.getppid()}").mkdir()  # a live process's write in progress
    atomic_write_dir(tmp_path / "model", lambda d: (d / "weights").write_text("w"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", f"model.tmp-{os.getppid()}"]
