"""``--jobs``: a study's runs trained in worker processes (workers.py) compute what one process computes."""

import json

from conftest import SMOKE, copy_offline_models, require_imdb, run_main

from config import PRESETS
from study import study_runs
from workers import phases


def test_phases_order_what_runs_share_before_the_runs():
    """One item per seed for the judged pairs, then per seed the reward model and DPO's reference log-probs (so
    no two processes write one cache entry), then every run; the models first only when asked."""
    cfg = PRESETS["smoke"].replace(run={"sweep": True}, dpo={"pair_source": "generated"})
    specs = study_runs(cfg, [0, 1])
    got = phases(cfg, specs, build_models=True)
    assert [name for name, _ in got] == ["models", "pairs", "shared", "runs"]
    assert got[1][1] == [{"what": "pairs", "seed": 0}, {"what": "pairs", "seed": 1}]
    assert [(i["what"], i["spec"]["seed"]) for i in got[2][1]] == [
        ("reference_logps", 0), ("reward_model", 0), ("reference_logps", 1), ("reward_model", 1)]
    assert [i["spec"]["name"] for i in got[3][1]] == [s.name for s in specs]
    # review pairs: no pairs phase; PPO-GT alone (--ppo-only --ppo_reward judge) needs no reward model
    cfg = PRESETS["smoke"].replace(run={"ppo_only": True}, ppo={"ppo_reward": "judge"})
    assert [name for name, _ in phases(cfg, study_runs(cfg, [0, 1]))] == ["runs"]


def _points(res):
    return sorted((p["run"], p["step"], p["kl"], p["safety"]) for p in res["protocol"]["validation_points"])


def test_a_study_in_two_processes_computes_what_one_process_computes(smoke_run, tmp_path):
    """`--jobs 2` against one process at the same thread count: every run's validation points, every choice and
    every held-out per-prompt score are the same; both workers trained runs."""
    require_imdb()
    out = {}
    for jobs in ("1", "2"):
        d = tmp_path / f"jobs{jobs}"
        copy_offline_models(smoke_run["dir"] / "models", d / "models")
        proc = run_main(*SMOKE, "--sweep", "--seeds", "0", "--threads", "1", "--jobs", jobs,
                        "--output_dir", str(d / "models"), "--plots_dir", str(d / "plots"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[jobs] = json.loads((d / "plots" / "results.json").read_text())
    one, two = out["1"], out["2"]
    assert len(_points(two)) > 0 and _points(two) == _points(one)
    assert two["protocol"]["checkpoints"] == one["protocol"]["checkpoints"]  # choices, held-out per-prompt scores
    assert two["protocol"]["bands"] == one["protocol"]["bands"]
    logs = tmp_path / "jobs2" / "models" / "logs"
    for i in (0, 1):
        assert "saved" in (logs / f"runs_worker{i}.log").read_text(), f"worker {i} trained no run"
    assert not list(logs.glob("claims-*")), "the claim files are removed after each phase"


def test_a_failing_worker_stops_the_study_in_one_line_naming_its_log(smoke_run, tmp_path):
    """A worker's run that diverges (the non-finite guard stops it, exit 1): the study stops with one line that
    names the phase, the worker's own error and its log; no traceback."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    proc = run_main(*SMOKE, "--sweep", "--seeds", "0", "--jobs", "2", "--debug_nan_steps", *map(str, range(1, 9)),
                    "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "a worker process of the" in lines[0] and "_worker" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "plots" / "results.json").exists()
