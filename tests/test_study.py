"""The study's grid and its frontier arithmetic, exactly (no model)."""

import json
import math

import numpy as np
import pytest

from config import PRESETS
from study.grid import (
    frontier_at,
    hierarchical_bootstrap,
    highest_safety,
    holm,
    kl_flattened,
    seed_t_interval,
    select_band_checkpoints,
    select_checkpoints,
    study_runs,
    upper_envelope,
)


def test_upper_envelope_of_a_hand_made_point_set():
    pts = [(5.0, 0.7), (1.0, 0.5), (2.0, 0.4), (3.0, 0.8), (3.0, 0.6), (0.5, 0.55), (9.0, 0.79), (10.0, 0.9)]
    assert upper_envelope(pts) == [(0.5, 0.55), (3.0, 0.8), (10.0, 0.9)]
    assert upper_envelope([]) == []


def _p(kl, safety, positive_rate=None, method="dpo", seed=0):
    return {"method": method, "seed": seed, "kl": kl, "safety": safety,
            "positive_rate": safety if positive_rate is None else positive_rate}


def test_frontier_is_read_by_linear_interpolation_on_the_envelope_and_never_extrapolated_past_the_points():
    # (2, 0.4) is dominated by (1, 0.5): the envelope is (0, 0.45) - (1, 0.5) - (4, 0.8)
    pts = [_p(0, 0.45, 0.4), _p(1, 0.5, 0.5), _p(2, 0.4, 0.1), _p(4, 0.8, 0.9)]
    safety = frontier_at(pts, [0, 0.5, 2, 4, 5])
    assert safety[:4] == pytest.approx([0.45, 0.475, 0.6, 0.8]) and math.isnan(safety[4])
    # the positive rate of the same frontier points, interpolated the same way
    assert frontier_at(pts, [2.5], key="positive_rate") == pytest.approx([0.5 + 1.5 / 3 * 0.4])
    assert all(math.isnan(v) for v in frontier_at([], [1.0]))


def test_frontier_is_flat_after_its_last_point_up_to_the_largest_kl_reached():
    # (6, 0.7) went further than (4, 0.8) without gaining: within a budget of 5 or 6 nats the best is still 0.8
    pts = [_p(0, 0.45), _p(4, 0.8), _p(6, 0.7)]
    safety = frontier_at(pts, [5, 6, 6.5])
    assert safety[:2] == pytest.approx([0.8, 0.8]) and math.isnan(safety[2])


def _c(kl, safety, step, method="dpo", seed=0, run="r"):
    return {"method": method, "label": "", "seed": seed, "run": run, "step": step, "kl": kl, "safety": safety,
            "positive_rate": safety}


def test_select_checkpoints_best_validation_safety_within_each_budget_and_dashes():
    pts = [_c(0.3, 0.50, 10), _c(0.9, 0.58, 20), _c(1.8, 0.62, 30, run="b"), _c(3.5, 0.70, 40, run="b"),
           _c(1.7, 0.62, 10, run="c"),  # ties the safety of (1.8, 0.62): the higher KL wins
           _c(5.0, 0.40, 10, method="ppo"), _c(0.2, 0.45, 20, method="ppo")]
    sel = select_checkpoints(pts, [1.0, 2.0, 4.0, 8.0])
    cells = sel["dpo"][0]
    assert cells["1.0"]["point"]["kl"] == 0.9 and cells["1.0"]["status"] == "ok"
    assert cells["2.0"]["point"]["kl"] == 1.8 and cells["2.0"]["point"]["run"] == "b"
    assert cells["4.0"]["point"]["kl"] == 3.5 and cells["4.0"]["status"] == "ok"
    # the best within 8 nats is at 3.5 < 8/2: reported, but shown as "-" with its reason (never interpolated)
    assert cells["8.0"]["point"]["kl"] == 3.5 and cells["8.0"]["status"] == "-" and "< 0.5 k" in cells["8.0"]["reason"]
    ppo = sel["ppo"][0]
    assert ppo["1.0"]["point"]["kl"] == 0.2 and ppo["1.0"]["status"] == "-"  # 0.2 < 0.5
    assert ppo["8.0"]["point"]["kl"] == 0.2  # the checkpoint at 5 nats has the lower validation safety
    assert select_checkpoints(pts, [8.0], min_use=0.0)["dpo"][0]["8.0"]["status"] == "ok"
    assert select_checkpoints([_c(3.0, 0.5, 10)], [1.0])["dpo"][0]["1.0"] == {
        "point": None, "status": "-", "reason": "no checkpoint within 1 nats (the lowest is at 3.00)"}


def test_hierarchical_bootstrap_mean_interval_and_its_two_levels():
    rng = np.random.default_rng(0)
    per_seed = [rng.normal(0.1, 0.3, 200) for _ in range(5)]
    b = hierarchical_bootstrap(per_seed, n_resamples=2000)
    assert b["mean"] == pytest.approx(np.mean([a.mean() for a in per_seed]))
    assert b["lo"] < b["mean"] < b["hi"] and b["n_seeds"] == 5 and b["n_prompts"] == 1000
    assert hierarchical_bootstrap(per_seed, n_resamples=2000) == b  # seeded: the same interval every time
    # identical seeds: only the prompt level is left, and the width is that of one seed's prompt bootstrap
    same = hierarchical_bootstrap([per_seed[0]] * 5, n_resamples=2000)
    se = per_seed[0].std() / np.sqrt(200 * 5)
    assert (same["hi"] - same["lo"]) == pytest.approx(2 * 1.96 * se, rel=0.15)
    # seeds whose means differ widely: the seed level dominates the width
    spread = hierarchical_bootstrap([a + shift for a, shift in zip(per_seed, [-0.2, -0.1, 0, 0.1, 0.2])],
                                    n_resamples=2000)
    assert spread["hi"] - spread["lo"] > 2 * (b["hi"] - b["lo"])
    assert hierarchical_bootstrap([])["n_seeds"] == 0


def test_hierarchical_bootstrap_one_level_at_a_time():
    """resample="prompts" holds the seeds fixed and resamples prompts; "seeds" holds each seed's mean fixed and
    resamples seeds: each is zero-width exactly when its level has no variation, and the full interval is wider
    than either."""
    rng = np.random.default_rng(1)
    per_seed = [rng.normal(0.1, 0.3, 200) + shift for shift in (-0.2, -0.1, 0, 0.1, 0.2)]
    full, prompts, seeds = (hierarchical_bootstrap(per_seed, resample=r) for r in ("both", "prompts", "seeds"))
    for b in (prompts, seeds):
        assert b["mean"] == full["mean"] and b["lo"] < b["mean"] < b["hi"]
        assert b["hi"] - b["lo"] < full["hi"] - full["lo"]
    # constant prompts within each seed: prompt resampling alone gives a zero-width interval at the mean
    flat_prompts = hierarchical_bootstrap([np.full(50, a.mean()) for a in per_seed], resample="prompts")
    assert flat_prompts["lo"] == pytest.approx(flat_prompts["hi"]) == pytest.approx(full["mean"])
    # seeds with equal means: seed resampling alone gives a zero-width interval
    centred = [a - a.mean() + 0.1 for a in per_seed]
    flat_seeds = hierarchical_bootstrap(centred, resample="seeds")
    assert flat_seeds["lo"] == pytest.approx(flat_seeds["hi"]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="resample must be"):
        hierarchical_bootstrap(per_seed, resample="seed")


def test_kl_flattened_over_the_last_fifth():
    rows = [{"step": s, "eval/kl_to_ref": kl} for s, kl in ((0, 0.0), (40, 2.0), (80, 3.0), (120, 3.6), (160, 3.8))]
    assert kl_flattened(rows) is True  # 3.6 -> 3.8 from step 120 (<= 0.8 * 160): 5%
    rows[-1]["eval/kl_to_ref"] = 4.2
    assert kl_flattened(rows) is False  # 3.6 -> 4.2: 14%
    assert kl_flattened([{"step": 10, "eval/kl_to_ref": 1.0}]) is None


def test_equal_coverage_is_required_of_a_study_grid():
    from config import ConfigError
    from study.grid import check_coverage, coverage

    for name in ("paper", "offline", "smoke"):
        assert len(set(coverage(PRESETS[name]).values())) == 1, name
    assert coverage(PRESETS["offline"]) == {"dpo": (3, 16), "ppo": (3, 16), "ppo_gt": (3, 16)}
    with pytest.raises(ConfigError, match="equal coverage.*DPO 2 runs x 4 evaluations, PPO 2 runs x 2"):
        check_coverage(PRESETS["smoke"].replace(ppo={"ppo_eval_every": 2}))
    # a schedule counts its listed steps and the last: 3 + 1 DPO evaluations against PPO's 4
    scheduled = PRESETS["smoke"].replace(dpo={"dpo_eval_steps": [5, 10, 20]})
    assert coverage(scheduled)["dpo"] == (2, 4)
    check_coverage(scheduled)
    assert coverage(PRESETS["smoke"].replace(dpo={"dpo_eval_steps": [5, 40]}))["dpo"] == (2, 2)


def test_eval_due_follows_the_schedule_or_the_cadence_and_always_the_last_step():
    from config import eval_due, n_evals

    assert [k for k in range(1, 13) if eval_due(k, 12, 5, [])] == [5, 10, 12]
    assert [k for k in range(1, 13) if eval_due(k, 12, 5, [1, 2, 8])] == [1, 2, 8, 12]
    assert n_evals(12, 5, []) == 3 and n_evals(12, 5, [1, 2, 8]) == 4 and n_evals(12, 5, [4, 12]) == 2


def test_study_grid_names_and_seeds():
    cfg = PRESETS["smoke"].replace(run={"sweep": True}, eval={"sweep_betas": [0.1, 1.0], "sweep_kl_coefs": [0.5]})
    runs = study_runs(cfg, [0, 1])
    names = [r.name for r in runs]
    # per seed: 2 betas, PPO at target 6 and at kl_coef 0.5, PPO-GT likewise
    assert len(names) == len(set(names)) == 2 * (2 + 2 + 2)
    first = [r for r in runs if r.seed == 0 and r.main]
    assert {r.name for r in first} == {"dpo_toxic_reduced_model", "ppo_toxic_reduced_model"}  # the spec's names
    assert {r.method for r in runs} == {"dpo", "ppo", "ppo_gt"}
    assert all(r.name.startswith("sweep/seed1/") for r in runs if r.seed == 1)
    # --ppo_reward judge: the default PPO is PPO-GT itself, and no extra PPO-GT run
    gt = study_runs(cfg.replace(ppo={"ppo_reward": "judge"}), [0])
    assert {r.method for r in gt if r.method != "dpo"} == {"ppo_gt"} and len(gt) == 4
    assert len(study_runs(PRESETS["smoke"], [0])) == 2  # no sweep: the two default runs
    # the sweep's PPO runs have a fixed coefficient: no adaptive target
    fixed = [r for r in runs if r.setting == "kl_coef=0.5" and r.method == "ppo"]
    assert len(fixed) == 2 and all(r.overrides == {"ppo": {"target_kl": None, "init_kl_coef": 0.5}} for r in fixed)
    assert cfg.replace(**fixed[0].overrides).ppo.target_kl is None


def test_paired_difference_and_its_interval():
    from study.grid import paired_difference

    a, b = [0.6, 0.7, 0.8, 0.9], [0.5, 0.5, 0.7, 0.7]
    d = paired_difference(a, b)
    diffs = [0.1, 0.2, 0.1, 0.2]
    sd = (sum((x - 0.15) ** 2 for x in diffs) / 3) ** 0.5
    assert d["mean"] == pytest.approx(0.15) and d["n"] == 4
    assert d["hi"] - d["mean"] == pytest.approx(1.96 * sd / 2) and d["mean"] - d["lo"] == pytest.approx(1.96 * sd / 2)
    with pytest.raises(ValueError):
        paired_difference([1.0], [0.0])


def test_plots_never_magnify_noise():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from study.plots import SAFETY_MIN_SPAN, _noise_note, _safety_axis

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0.4513189, 0.4513201])  # a 1e-6 "effect"
    _safety_axis(ax, [0.4513189, 0.4513201])
    lo, hi = ax.get_ylim()
    assert hi - lo >= SAFETY_MIN_SPAN and 0 <= lo < 0.4513 < hi <= 1
    fig.canvas.draw()
    assert ax.yaxis.get_offset_text().get_text() == ""  # no "1e-6 + 4.513e-1" offset notation
    _safety_axis(ax, [0.99, 0.995])  # near the edge: still the full span, inside [0, 1]
    assert ax.get_ylim()[1] <= 1.0 and ax.get_ylim()[1] - ax.get_ylim()[0] >= SAFETY_MIN_SPAN
    plt.close(fig)
    noisy = {"eval_noise": 0.01}
    assert "within evaluation noise" in _noise_note(noisy, [0.50, 0.52, 0.51])
    assert _noise_note(noisy, [0.50, 0.60]) == ""


def test_read_out_only_settings_leave_a_finished_run_finished_and_training_settings_do_not(tmp_path):
    from study.grid import RunSpec, finished

    cfg = PRESETS["smoke"].replace(run={"output_dir": str(tmp_path)})
    spec = RunSpec("dpo", "", 0, "dpo_toxic_reduced_model", {}, True)
    final = tmp_path / spec.name
    final.mkdir()
    cfg.save(final / "training_config.json")
    (final / "train_summary.json").write_text(json.dumps({"method": "dpo", "train_time_s": 1.0}))
    assert finished(cfg, spec) is None  # trained before evaluations moved to the validation prompts
    (final / "train_summary.json").write_text(json.dumps({"method": "dpo", "train_time_s": 1.0,
                                                          "evaluated_on": "validation", "kept_evaluated": False}))
    assert finished(cfg, spec)["method"] == "dpo"
    assert finished(cfg.replace(run={"sweep": True}), spec) is None  # the study needs its evaluated weights
    read_out = cfg.replace(eval={"matched_kls": [0.5], "temperatures": [1.0], "n_examples": 1,
                                 "sweep_betas": [3.0], "sweep_kl_coefs": [9.0], "n_eval_prompts": 0,
                                 "sealed_prompts": True}, model={"threads": 3},
                           run={"log_every": 7, "resume": True})
    assert finished(read_out, spec) is not None
    for changed in ({"dpo": {"dpo_lr": 5e-3}}, {"eval": {"n_val_prompts": 8}}, {"run": {"seed": 1}},
                    {"data": {"response_tokens": 8}}):
        assert finished(cfg.replace(**changed), spec) is None, changed


def test_the_protocol_refuses_checkpoints_whose_weights_were_not_kept(tmp_path):
    from runtime.run_log import StopTraining
    from study.grid import RunSpec
    from study.protocol import study_protocol

    cfg = PRESETS["smoke"].replace(run={"output_dir": str(tmp_path), "sweep": True})
    run_dir = tmp_path / "runs" / "dpo_toxic_reduced_model"
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "eval/kl_to_ref": 0.0, "eval/safety_score": 0.4, "eval/positive_rate": 0.4},
            {"step": 10, "eval/kl_to_ref": 0.3, "eval/safety_score": 0.5, "eval/positive_rate": 0.5}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = [{"spec": RunSpec("dpo", "beta=0.1", 0, "dpo_toxic_reduced_model", {}, True)}]
    with pytest.raises(StopTraining, match="kept no weights of its evaluated step 10") as e:
        study_protocol(cfg, runs, heldout={})  # refused before any evaluation
    assert e.value.code == 2


def test_a_corrupt_results_json_is_refused_not_merged_by_dpo_only(tmp_path):
    """--dpo-only adds its runs to the results.json already in --plots_dir: one that is not JSON, or JSON but not
    the object main.py writes, is refused with a ConfigError (one line in main.py) and left as it was."""
    from types import SimpleNamespace

    from config import ConfigError
    from study.grid import carried_over

    cfg = SimpleNamespace(run=SimpleNamespace(plots_dir=str(tmp_path), dpo_only=True, ppo_only=False))
    for text in ('{"runs": [', "[1, 2]"):
        (tmp_path / "results.json").write_text(text)
        with pytest.raises(ConfigError, match="is not a results.json main.py wrote.*--plots_dir"):
            carried_over(cfg, {"preset": "smoke"})
        assert (tmp_path / "results.json").read_text() == text


def _q(kl, safety, step, method="dpo", seed=0):
    return {"method": method, "seed": seed, "kl": kl, "safety": safety, "step": step, "run": f"r{kl}"}


def test_a_band_cell_chooses_only_checkpoints_whose_validation_kl_lies_in_the_band():
    """Equal KL: the best validation safety among the checkpoints inside k +- 20%, however good the ones outside;
    the count of candidates is recorded; a band below every checkpoint is skipped with its neighbours named, one
    above them all is "not reached" with the largest KL."""
    pts = [_q(0.7, 0.50, 1), _q(0.85, 0.52, 2), _q(1.1, 0.51, 3), _q(1.3, 0.60, 4), _q(3.0, 0.90, 5),
           _q(1.0, 0.40, 1, seed=1), _q(9.0, 0.70, 2, seed=1)]
    cells = select_band_checkpoints(pts, [1.0, 2.0, 4.0], 0.2)["dpo"]
    one = cells[0]["1.0"]
    assert one["status"] == "ok" and one["point"]["kl"] == 0.85 and one["n_candidates"] == 2  # not 1.3, not 3.0
    assert cells[0]["2.0"]["status"] == "skipped" and "nearest 1.30 and 3.00" in cells[0]["2.0"]["reason"]
    assert cells[0]["4.0"] == {"point": None, "status": "not reached", "n_candidates": 0, "largest_kl": 3.0,
                               "reason": "not reached (largest KL 3.00)"}
    assert cells[1]["1.0"]["point"]["safety"] == 0.40 and cells[1]["2.0"]["status"] == "skipped"
    # ties go to the KL nearer the target, then the later step
    tie = select_band_checkpoints([_q(0.9, 0.5, 1), _q(0.96, 0.5, 2), _q(1.1, 0.5, 3)], [1.0], 0.2)
    assert tie["dpo"][0]["1.0"]["point"]["step"] == 2
    tie = select_band_checkpoints([_q(1.0, 0.5, 2), _q(1.0, 0.5, 3), _q(0.9, 0.5, 4)], [1.0], 0.2)
    assert tie["dpo"][0]["1.0"]["point"]["step"] == 3
    # the band's edges are inside it
    edge = select_band_checkpoints([_q(0.8, 0.5, 1), _q(1.2, 0.6, 2)], [1.0], 0.2)["dpo"][0]["1.0"]
    assert edge["n_candidates"] == 2


def test_the_highest_safety_row_is_the_best_validation_checkpoint_up_to_the_largest_band():
    pts = [_q(1.0, 0.5, 1), _q(10.0, 0.8, 2), _q(20.0, 0.9, 3), _q(2.0, 0.6, 1, method="ppo")]
    top = highest_safety(pts, 14.4)
    assert top["dpo"][0]["kl"] == 10.0 and top["ppo"][0]["kl"] == 2.0


def test_seed_t_interval_against_a_hand_computation():
    # seeds' means 1..5: mean 3, sd sqrt(2.5), se sqrt(0.5); t(0.975, 4) = 2.776445; t = 3 / sqrt(0.5)
    r = seed_t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(0.5)
    assert r["mean"] == 3.0 and r["lo"] == pytest.approx(3 - half) and r["hi"] == pytest.approx(3 + half)
    assert r["t"] == pytest.approx(3 / math.sqrt(0.5)) and r["n_seeds"] == 5
    assert r["p"] == pytest.approx(0.013236, abs=1e-6)  # two-sided, 4 degrees of freedom
    # wider than the percentile bootstrap over the same seeds (which shrinks the variance and ignores t)
    boot = hierarchical_bootstrap([np.full(10, m) for m in (1.0, 2.0, 3.0, 4.0, 5.0)], resample="seeds")
    assert r["hi"] - r["lo"] > boot["hi"] - boot["lo"]
    one = seed_t_interval([0.2])
    assert one["mean"] == 0.2 and math.isnan(one["lo"]) and math.isnan(one["p"])
    assert seed_t_interval([0.5, 0.5, 0.5])["p"] == 0.0 and seed_t_interval([])["n_seeds"] == 0


def test_holm_step_down_against_a_hand_computation():
    out = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "e": float("nan")})
    # sorted: d 0.005 x 4 = 0.02, a 0.01 x 3 = 0.03, c 0.03 x 2 = 0.06, b 0.04 x 1 = 0.04 -> kept monotone: 0.06
    assert {k: round(v["p_holm"], 10) for k, v in out.items() if k != "e"} == {"d": 0.02, "a": 0.03, "c": 0.06,
                                                                                 "b": 0.06}
    assert [k for k, v in out.items() if v["survives"]] == ["d", "a"]
    assert math.isnan(out["e"]["p_holm"]) and not out["e"]["survives"]
    assert holm({"x": 0.9, "y": 0.8})["x"]["p_holm"] == 1.0  # capped at 1


def _mix(a: dict, b: dict, w: float) -> tuple[float, float]:
    return w * a["kl"] + (1 - w) * b["kl"], w * a["safety"] + (1 - w) * b["safety"]


@pytest.mark.parametrize("seed", range(5))
def test_the_envelope_cell_beats_every_two_point_mixture_within_the_budget_and_its_vertices_attain_it(seed):
    """Exact math on random points: the cell at k is at least every mixture of two checkpoints whose mixed KL is
    <= k (on a fine grid of weights), its two vertices at weight w give exactly its safety and KL, and its KL is
    within the budget."""
    import random

    from study.grid import envelope_cell

    rng = random.Random(seed)
    pts = [{"kl": rng.uniform(0, 14), "safety": rng.uniform(0.4, 0.8), "step": i} for i in range(15)]
    pts.append({"kl": 0.0, "safety": 0.47, "step": 0})  # the reference
    for k in (0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 20.0):
        cell = envelope_cell(pts, k)
        assert cell["kl"] <= k + 1e-12 and 0.0 <= cell["w"] <= 1.0
        assert _mix(cell["a"], cell["b"], cell["w"]) == pytest.approx((cell["kl"], cell["safety"]))
        assert cell["a"] in pts and cell["b"] in pts
        for a in pts:
            for b in pts:
                for w in [i / 50 for i in range(51)]:
                    kl, safety = _mix(a, b, w)
                    if kl <= k:
                        assert safety <= cell["safety"] + 1e-12


def test_the_envelope_cell_never_falls_as_the_budget_rises_and_stops_at_its_peak():
    import random

    from study.grid import concave_envelope, envelope_cell

    rng = random.Random(7)
    for _ in range(20):
        pts = [{"kl": rng.uniform(0, 14), "safety": rng.uniform(0.4, 0.8)} for _ in range(10)]
        pts.append({"kl": 0.0, "safety": 0.47})
        values = [envelope_cell(pts, k / 4)["safety"] for k in range(0, 80)]
        assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
        peak = max(pts, key=lambda p: p["safety"])
        beyond = envelope_cell(pts, 50.0)
        assert beyond["a"] is peak and beyond["w"] == 1.0 and beyond["kl"] == peak["kl"]
        hull = concave_envelope(pts)
        slopes = [(b["safety"] - a["safety"]) / (b["kl"] - a["kl"]) for a, b in zip(hull, hull[1:])]
        assert all(s2 <= s1 + 1e-12 for s1, s2 in zip(slopes, slopes[1:]))  # concave
    assert envelope_cell([{"kl": 1.0, "safety": 0.6}], 0.5) is None  # nothing attainable below the smallest KL


def test_each_method_and_seed_gets_its_own_envelope_with_the_reference_and_says_why_a_budget_is_not_used():
    """select_envelope_cells: per method and seed, the envelope of that method's points of that seed and the
    reference at KL 0 (a small budget mixes in the reference); a budget past the largest KL takes the peak and
    says so; a budget past a peak below the largest KL says that instead."""
    from study.grid import select_envelope_cells

    pts = [_p(2.0, 0.62), _p(4.0, 0.7), _p(6.0, 0.65),  # DPO seed 0: peaks at 4, largest KL 6
           _p(3.0, 0.9, method="ppo"),  # PPO seed 0: one point
           _p(1.0, 0.8, seed=1)]  # DPO seed 1: another seed's point is not seed 0's
    for i, p in enumerate(pts):
        p.update(run=f"r{i}", step=10 * (i + 1))
    cells = select_envelope_cells(pts, {0: 0.5, "1": 0.4}, [1.0, 4.0, 5.0, 8.0])  # a JSON key: "1"
    dpo0, ppo0, dpo1 = cells["dpo"][0], cells["ppo"][0], cells["dpo"][1]
    c = dpo0["1.0"]  # between the reference (0, 0.5) and (2, 0.62): half each
    assert c["a"]["run"] is None and c["b"]["run"] == "r0" and c["w"] == pytest.approx(0.5)
    assert c["safety"] == pytest.approx(0.56) and c["kl"] == 1.0 and c["status"] == "ok"
    assert dpo0["4.0"]["a"]["run"] == "r1" and dpo0["4.0"]["w"] == 1.0 and dpo0["4.0"]["status"] == "ok"
    assert dpo0["5.0"]["status"] == "peak" and dpo0["5.0"]["reason"] == "envelope peaks at 4.00 < 5"
    assert dpo0["8.0"]["reason"] == "largest KL 6.00 < 8" and dpo0["8.0"]["safety"] == 0.7
    assert ppo0["1.0"]["safety"] == pytest.approx(0.5 + 0.4 / 3) and ppo0["4.0"]["reason"] == "largest KL 3.00 < 4"
    assert dpo1["4.0"]["safety"] == 0.8 and dpo1["1.0"]["b"]["run"] == "r4"


def test_results_record_the_commit_and_the_preregistration_the_run_started_from(tmp_path):
    # results.json's "code": the checked-out commit, whether tracked files differ, and the last commit that changed
    # docs/preregistration.md with whether the file read is that commit's (the frontier issue: each study records
    # the preregistration it ran under)
    import subprocess

    from study.results import PREREGISTRATION, provenance

    def git(*a):
        return subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    assert provenance(tmp_path) == {"commit": None, "dirty": None, "preregistration": None}  # no repository
    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "code")
    assert provenance(tmp_path) == {"commit": git("rev-parse", "HEAD"), "dirty": False, "preregistration": None}
    (tmp_path / "docs").mkdir()
    (tmp_path / PREREGISTRATION).write_text("the plan\n")
    git("add", ".")
    git("commit", "-qm", "preregistration")
    pre = git("rev-parse", "HEAD")
    (tmp_path / "code.py").write_text("x = 2\n")
    git("commit", "-qam", "later code")
    rec = provenance(tmp_path)
    assert rec["commit"] == git("rev-parse", "HEAD") != pre and rec["dirty"] is False
    assert rec["preregistration"]["commit"] == pre and rec["preregistration"]["as_committed"] is True
    (tmp_path / PREREGISTRATION).write_text("the plan, changed after\n")
    (tmp_path / "code.py").write_text("x = 3\n")
    rec2 = provenance(tmp_path)
    assert rec2["dirty"] is True and rec2["preregistration"]["as_committed"] is False
    assert rec2["preregistration"]["commit"] == pre
    assert rec2["preregistration"]["sha256"] != rec["preregistration"]["sha256"]
