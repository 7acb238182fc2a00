"""``--jobs``: a study's runs trained in worker processes (workers.py) compute what one process computes."""

import json

from conftest import SMOKE, copy_offline_models, require_imdb, run_main

from config import PRESETS
from study.grid import study_runs
from study.jobs import plan


def test_the_plan_makes_what_runs_share_before_the_runs_that_share_it():
    """The models first (when asked), each seed's judged pairs before its reward model and reference log-probs,
    those before the seed's runs (so no two processes write one cache entry); PPO's runs before DPO's."""
    cfg = PRESETS["smoke"].replace(run={"sweep": True}, dpo={"pair_source": "generated"})
    specs = study_runs(cfg, [0, 1])
    items = plan(cfg, specs, build_models=True)

    def seed(i):
        return i.get("seed", i.get("spec", {}).get("seed"))

    def where(what, s=None):  # the indices of the items of a kind (and seed)
        return [k for k, i in enumerate(items) if i["what"] == what and (s is None or seed(i) == s)]

    models = where("models")
    assert models == [0] and items[0]["after"] == []
    for s in (0, 1):
        pairs, shared = where("pairs", s), where("reference_logps", s) + where("reward_model", s)
        assert len(pairs) == 1 and len(shared) == 2 and items[pairs[0]]["after"] == models
        for k in shared:  # what the seed's runs share waits for the models and the seed's own pairs, no more
            assert items[k]["after"] == models + pairs
        for k in where("run", s):  # a run waits for all that, and comes after it in the list
            assert sorted(items[k]["after"]) == sorted(models + pairs + shared) and k > max(items[k]["after"])
    runs = [items[k] for k in where("run")]
    assert sorted(i["spec"]["name"] for i in runs) == sorted(s.name for s in specs)
    methods = [i["spec"]["method"] for i in runs]
    assert "dpo" in methods and set(methods[methods.index("dpo"):]) == {"dpo"}  # DPO's runs (the shortest) last
    # review pairs, PPO-GT alone (--ppo-only --ppo_reward judge): no pairs, no reward model, nothing to wait for
    cfg = PRESETS["smoke"].replace(run={"ppo_only": True}, ppo={"ppo_reward": "judge"})
    assert [(i["what"], i["after"]) for i in plan(cfg, study_runs(cfg, [0, 1]))] == [("run", [])] * 2


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
    # what the runs share was made once, before them: every DPO run found its reference log-probs, every PPO run its
    # reward model, in the cache
    summaries = {r["name"]: json.loads((tmp_path / "jobs2" / "models" / r["name"] / "train_summary.json").read_text())
                 for r in two["runs"]}
    assert all(s["ref_logps_cached"] for n, s in summaries.items() if "dpo" in n)
    assert all(s["reward_model"]["reused"] for n, s in summaries.items() if "ppo" in n and "ppo_gt" not in n)
    logs = tmp_path / "jobs2" / "models" / "logs"
    for i in (0, 1):
        assert "saved" in (logs / f"train_worker{i}.log").read_text(), f"worker {i} trained no run"
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
    assert len(lines) == 1 and "a worker process failed" in lines[0] and "worker" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "plots" / "results.json").exists()


def test_stopping_workers_has_a_limit():
    """A worker that does not leave on SIGTERM (stuck in native code, say) is killed after the grace period:
    the caller never waits on a worker without a limit (it waited forever)."""
    import subprocess
    import sys
    import time

    from runtime.workers import stop

    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)")
    stuck = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert stuck.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    stop([stuck], grace_s=0.5)
    assert stuck.returncode == -9 and time.monotonic() - t0 < 10
