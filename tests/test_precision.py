"""``--dtype auto``: the rule, the forced probe, and what each answer does to a run (recorded precision, cache
keys). The suite itself pins ``--dtype fp32`` (conftest.SMOKE), so it means the same runs on every CPU."""

import json

import pytest
import torch
from conftest import copy_offline_models, require_imdb, run_main

from modeling import models
from modeling.models import CPU_BF16_MIN_WIDTH, FORCE_CPU_BF16_ENV, auto_dtype, cpu_bf16_units, resolve_dtype


def _probe(monkeypatch, amx: bool, avx512_bf16: bool):
    monkeypatch.delenv(FORCE_CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


def test_explicit_precisions_are_taken_as_asked():
    for width in (None, 8, 4096):
        assert resolve_dtype("fp32", "cpu", width) == torch.float32
        assert resolve_dtype("bf16", "cpu", width) == torch.bfloat16


@pytest.mark.parametrize("amx, avx512_bf16", [(False, False), (True, False), (False, True), (True, True)])
def test_cpu_rule_needs_bf16_units_and_a_wide_enough_model(monkeypatch, amx, avx512_bf16):
    _probe(monkeypatch, amx, avx512_bf16)
    units = amx or avx512_bf16
    assert cpu_bf16_units() == units
    wide, narrow = CPU_BF16_MIN_WIDTH, CPU_BF16_MIN_WIDTH - 1
    assert auto_dtype("cpu", wide) == (torch.bfloat16 if units else torch.float32)
    assert auto_dtype("cpu", narrow) == torch.float32  # the 64-wide judge: bf16 measured slower on every CPU
    assert resolve_dtype("auto", "cpu", 768) == (torch.bfloat16 if units else torch.float32)


def test_the_probe_can_be_forced_either_way(monkeypatch):
    _probe(monkeypatch, False, False)
    monkeypatch.setenv(FORCE_CPU_BF16_ENV, "1")
    assert cpu_bf16_units() and auto_dtype("cpu", 192) == torch.bfloat16
    _probe(monkeypatch, True, True)
    monkeypatch.setenv(FORCE_CPU_BF16_ENV, "0")
    assert not cpu_bf16_units() and auto_dtype("cpu", 192) == torch.float32


def test_cuda_counts_only_native_bf16(monkeypatch):
    """A GPU that would emulate bf16 (T4, V100) gets fp32: the probe asks without emulation."""
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # emulation only, like a T4

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert auto_dtype("cuda", 768) == torch.float32 and calls == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert auto_dtype("cuda", 64) == torch.bfloat16  # the width rule is the CPU's alone


def test_model_width_reads_the_hidden_size(tiny_lm):
    assert models.model_width(tiny_lm) == 32 and models.model_width(tiny_lm.config) == 32
    assert models.model_width(object()) is None


def test_machine_info_names_what_kernels_depend_on():
    info = models.machine_info()
    assert info["cpu"] and info["torch"] == torch.__version__ and info["torch_threads"] >= 1
    assert isinstance(info["cpu_flags"], list) and info["torch_cpu_capability"]


@pytest.mark.parametrize("answer", ["fp32", "bf16"])
def test_auto_forced_each_way_is_recorded_and_keeps_its_own_caches(tmp_path, smoke_run, monkeypatch, answer):
    """``--dtype auto`` forced to each answer: the precision is printed and saved, and the self-built models
    and the reference log-prob cache of the other precision are not reused."""
    require_imdb()
    forced = {"fp32": torch.float32, "bf16": torch.bfloat16}[answer]
    monkeypatch.setattr(models, "auto_dtype", lambda device, width=None: forced)
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")  # built at fp32
    proc = run_main("--preset", "smoke", "--dtype", "auto", "--dpo-only", "--dpo_steps", "2", "--dpo_eval_every", "2",
                    "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"precision {answer}" in proc.stdout
    results = json.loads((tmp_path / "plots" / "results.json").read_text())
    assert results["precision"] == answer and results["machine"]["cpu"]
    summary = json.loads((tmp_path / "models" / "dpo_toxic_reduced_model" / "train_summary.json").read_text())
    assert summary["precision"] == answer
    built = {json.loads((d / "build_settings.json").read_text())["precision"]
             for d in (tmp_path / "models" / "offline").glob("base_lm-*")}
    if answer == "fp32":
        assert "offline: reusing" in proc.stdout and built == {"fp32"}
    else:  # a second model directory, under its own key, and the notice before the build
        assert built == {"fp32", "bf16"}
        assert "is built only at fp32" in proc.stdout and "--dtype fp32" in proc.stdout
    fp32_cache = {p.name for p in (smoke_run["dir"] / "models" / "cache").glob("ref_logps-*.pt")}
    mine = {p.name for p in (tmp_path / "models" / "cache").glob("ref_logps-*.pt")}
    assert mine and (mine <= fp32_cache if answer == "fp32" else not mine & fp32_cache)


def test_threads_are_pinned_and_recorded(tmp_path, smoke_run):
    """--threads sets torch's CPU threads (fp32 reductions depend on them) and results.json records them."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    before = torch.get_num_threads()
    try:
        proc = run_main("--preset", "smoke", "--dtype", "fp32", "--threads", "1", "--dpo-only", "--dpo_steps", "2",
                        "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots"))
    finally:
        torch.set_num_threads(before)  # run_main ran in this process
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 CPU threads" in proc.stdout
    assert json.loads((tmp_path / "plots" / "results.json").read_text())["machine"]["torch_threads"] == 1
    bad = run_main("--preset", "smoke", "--threads", "-1")
    assert bad.returncode == 2 and "--threads must be >= 0" in bad.stderr
