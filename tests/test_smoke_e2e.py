"""End-to-end runs of ``main.py --preset smoke`` (real IMDb data, self-built tiny models)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE, copy_offline_models, require_imdb, run_main
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from runtime.run_log import read_metrics
from study.grid import METHOD_SHORT

DPO_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "grad_norm", "lr", "pairs_per_s"}
PPO_KEYS = {"losses/policy_loss", "losses/value_loss", "losses/approx_kl", "losses/clipfrac", "objective/kl",
            "objective/kl_coef", "objective/score", "objective/rlhf_reward", "charts/tokens_per_s"}
EVAL_KEYS = {"eval/safety_score", "eval/positive_rate", "eval/kl_to_ref"}
MODEL_KEYS = {"safety_score", "positive_rate", "kl_to_ref", "train_time_s", "eval_time_s", "win_rate_vs_ref"}


def test_offline_builders_write_loadable_models(smoke_run):
    offline = smoke_run["dir"] / "models" / "offline"
    (lm_dir,), (judge_dir,) = offline.glob("base_lm-*"), offline.glob("judge-*")
    AutoModelForCausalLM.from_pretrained(lm_dir)
    judge = AutoModelForSequenceClassification.from_pretrained(judge_dir)
    assert set(judge.config.id2label.values()) == {"NEGATIVE", "POSITIVE"}
    assert json.loads((lm_dir / "build_report.json").read_text())["heldout_loss"] > 0
    acc = json.loads((judge_dir / "accuracy.json").read_text())
    assert 0 <= acc["accuracy_full_reviews"] <= 1 and "accuracy_64_token_openings" in acc
    assert "held-out loss" in smoke_run["proc"].stdout and "judge held-out accuracy" in smoke_run["proc"].stdout


def test_dpo_model_metrics_and_learning(smoke_run):
    d = smoke_run["dir"] / "models" / "dpo_toxic_reduced_model"
    AutoModelForCausalLM.from_pretrained(d)
    assert (d / "training_config.json").exists() and (d / "train_summary.json").exists()
    rows = read_metrics(d / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert all(DPO_KEYS <= set(r) for r in steps)
    assert any(EVAL_KEYS <= set(r) for r in rows) and rows[0]["step"] == 0
    last = steps[-10:]
    assert sum(r["rewards/accuracies"] for r in last) / len(last) > 0.5
    assert last[-1]["rewards/margins"] > 0
    # the logged lr is the rate the step used: linear warmup from 1 / (warmup + 1) of the peak
    cfg = json.loads((d / "training_config.json").read_text())["dpo"]
    warm = cfg["dpo_warmup_steps"]
    assert steps[0]["lr"] == cfg["dpo_lr"] / (warm + 1) and steps[warm]["lr"] == cfg["dpo_lr"]


def test_ppo_model_and_metrics(smoke_run):
    d = smoke_run["dir"] / "models" / "ppo_toxic_reduced_model"
    AutoModelForCausalLM.from_pretrained(d)
    rows = [r for r in read_metrics(d / "metrics.jsonl") if "objective/kl" in r]
    assert rows and all(PPO_KEYS <= set(r) for r in rows)
    summary = json.loads((d / "train_summary.json").read_text())
    rm = summary["reward_model"]
    n = rm["n_heldout_pairs"]  # an accuracy is a count of pairs out of n: a fraction that is not one is a bug
    assert n > 0 and abs(rm["heldout_pair_accuracy"] * n - round(rm["heldout_pair_accuracy"] * n)) < 1e-6
    assert rm["curve"] and rm["best_step"] >= 1
    assert len(list((smoke_run["dir"] / "models" / "reward_models").glob("*/rm_report.json"))) == 1
    # training time counts the reward model's training, not its held-out scoring nor PPO's evaluations
    assert summary["rm_train_s"] == rm["train_s"] and summary["train_time_s"] >= summary["rm_train_s"]
    assert summary["eval_time_s"] > 0


def test_results_json_and_dashboard(smoke_run):
    res = smoke_run["results"]
    for key in ("preset", "policy_model", "judge_model", "n_reviews", "seed", "frontier"):
        assert key in res
    for name in ("reference", "dpo", "ppo"):
        assert MODEL_KEYS <= set(res[name])
        assert set(res[name]["win_rate_vs_ref"]) == {str(t) for t in res["temperatures"]}
    assert res["reference"]["kl_to_ref"] == 0.0 and res["dpo"]["kl_to_ref"] > 0
    # training and evaluation time apart, the reference pass and the reward model itemised
    assert res["dpo"]["eval_time_s"] > 0 and 0 < res["dpo"]["ref_logps_s"] <= res["dpo"]["train_time_s"]
    assert 0 <= res["ppo"]["rm_train_s"] <= res["ppo"]["train_time_s"]
    for row in ("| train_time_s |", "| eval_time_s |", "| ref_logps_s |", "| rm_train_s |"):
        assert row in smoke_run["proc"].stdout
    assert res["frontier"]["points"] and set(res["frontier"]["curves"]) == {"dpo", "ppo"}
    assert {p["seed"] for p in res["frontier"]["points"]} == {0} and res["seeds"] == [0]
    png = smoke_run["dir"] / "plots" / "dpo_results_dashboard.png"
    w, h = Image.open(png).size
    assert w >= 1000 and h >= 700
    for name in ("learning_curve", "pareto_frontier", "temperature_robustness", "final_metrics"):
        assert (smoke_run["dir"] / "plots" / f"{name}.png").exists()


def test_plots_only_redraws_from_files(smoke_run):
    plots = smoke_run["dir"] / "plots"
    png = plots / "dpo_results_dashboard.png"
    os.utime(png, (0, 0))
    proc = run_main("--plots-only", "--plots_dir", str(plots))
    assert proc.returncode == 0, proc.stderr
    assert png.stat().st_mtime > 0
    empty = smoke_run["dir"] / "no_plots"
    proc = run_main("--plots-only", "--plots_dir", str(empty))
    assert proc.returncode == 2 and "results.json" in proc.stderr


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_results_and_summaries_are_strict_json_and_empty_cells_are_null(smoke_run, smoke_study):
    """Every parser reads them (Python's json would write NaN); the study's empty cells, the std of a cell's
    one seed, are null, and the tables and plots read null as a missing number."""
    from runtime.run_log import strict_json

    assert strict_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}}) == \
        '{"a": null, "b": [null, 1.5], "c": {"d": null}}'
    for run in (smoke_run, smoke_study):
        _strict((run["dir"] / "plots" / "results.json").read_text())
        for path in (run["dir"] / "models").rglob("train_summary.json"):
            _strict(path.read_text())
        for path in (run["dir"] / "models").rglob("metrics.jsonl"):
            [_strict(line) for line in path.read_text().splitlines() if line.strip()]
    text = (smoke_study["dir"] / "plots" / "results.json").read_text()
    assert "null" in text  # the study has empty cells (a std over one seed, a budget no checkpoint meets)
    from study import plots

    plots.summary_table(json.loads(text))  # reads null where NaN was


def test_the_dashboard_invites_no_wrong_comparison(smoke_run, smoke_study):
    """Bars at different KLs say so and carry their KL; the reference has no interval against itself; learning
    curves run over training progress, not seconds; a frontier of a few points is points; the reference is drawn
    at its validation safety beside validation points, and labelled held-out where it is; titles name PPO-GT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from study import plots
    from study.grid import upper_envelope

    for res in (smoke_run["results"], smoke_study["results"]):
        fig, axes = plt.subplots(1, 3)
        plots.plot_final(axes[0], res)
        plots.plot_learning_curve(axes[1], res)
        plots.plot_pareto(axes[2], res)
        final, curve, pareto = axes
        bars = [t.get_text() for t in final.texts if t.get_text().startswith("KL")]
        assert len(bars) == len(final.patches) >= 3 and "not comparable" in final.get_title()
        error_xs = {round(x, 6) for coll in final.collections for seg in coll.get_segments() for x, _ in seg}
        assert error_xs and 0.0 not in error_xs  # whiskers on the methods' bars only, none on the reference's
        assert "progress" in curve.get_xlabel() and "seconds" not in curve.get_xlabel()
        assert all(0 <= x <= 1 for line in curve.lines[:-1] for x in line.get_xdata())
        labels = pareto.get_legend_handles_labels()[1]
        assert "reference (validation)" in labels
        assert ("reference (held-out)" in labels) == bool(res.get("protocol", {}).get("cells"))
        for method in ("dpo", "ppo"):
            mine = [p for p in res["frontier"]["points"] if p["method"] == method]
            sizes = [len(upper_envelope([(p["kl"], p["safety"]) for p in mine if p["seed"] == sd]))
                     for sd in {p["seed"] for p in mine}]
            drawn = [ln for ln in pareto.lines if ln.get_label().startswith(plots.LABELS[method] + ": validation")]
            assert drawn, method
            few = float(np.median(sizes)) < plots.FEW_POINTS
            assert (drawn[0].get_linestyle() == "None") == few, (method, sizes)
        plt.close(fig)
    gt = {**smoke_run["results"], "ppo_gt": smoke_run["results"]["ppo"]}
    gt.pop("ppo")
    gt["runs"] = [{**r, "method": "ppo_gt" if r["method"] == "ppo" else r["method"]} for r in gt["runs"]]
    assert plots.dashboard_title(gt).startswith("DPO vs PPO-GT on IMDb")
    assert plots.dashboard_title(smoke_run["results"]).startswith("DPO vs PPO on IMDb")


def test_the_study_dashboard_shows_the_paired_differences_and_the_band_cells(smoke_study):
    """A study's panels: the forest plot of the primary reading's paired differences (survivors of Holm filled);
    the band cells, titled as the secondary reading (per band and method the held-out safety of the band's chosen
    checkpoints, mean over seeds with its t interval; a cell missing seeds hollow and labelled); each saved alone
    too, with the over-optimisation panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from study import plots

    res = smoke_study["results"]
    cells = [c for by_band in res["protocol"]["bands"]["cells"].values() for c in by_band.values()]
    fig, ax = plt.subplots()
    plots.plot_bands(ax, res)
    assert ax.get_title().startswith("Secondary reading, in KL bands")
    assert len(ax.patches) == sum(c["n_seeds"] > 0 for c in cells)
    hollow = [p for p in ax.patches if p.get_facecolor()[3] == 0]
    assert len(hollow) == sum(0 < c["n_seeds"] < len(c["per_seed"]) for c in cells)
    whiskers = sum(len(coll.get_segments()) for coll in ax.collections)
    assert whiskers == sum(c["n_seeds"] >= 2 for c in cells)
    plt.close(fig)
    # the forest plot: one row per pair and budget, hollow without a family (Holm not yet applied), filled with
    # one where the comparison survives it
    fig, ax = plt.subplots()
    plots.plot_forest(ax, res)
    e = res["protocol"]["envelope"]
    assert len(ax.get_yticks()) == 3 * len(e["budgets"]) and "Holm not yet applied" in ax.get_title()
    key = plots.family_key(res["setup"]["pair_source"], next(iter(e["differences"])), e["budgets"][0])
    plt.close(fig)
    fig, ax = plt.subplots()
    plots.plot_forest(ax, {**res, "family": {"holm": {key: {"survives": True, "p_holm": 0.01}}}})
    filled = [ln for ln in ax.get_lines() if ln.get_marker() == "o" and ln.get_markerfacecolor() != "white"]
    assert len(filled) == 1 and "filled: survives Holm" in ax.get_title()
    plt.close(fig)
    for name in ("paired_differences", "equal_kl_bands", "overoptimisation"):
        assert (smoke_study["dir"] / "plots" / f"{name}.png").exists()
    assert not (smoke_study["dir"] / "plots" / "final_metrics.png").exists()


def test_dpo_only_and_ppo_only_produce_their_dashboard(tmp_path, smoke_run):
    require_imdb()
    for flag, present, absent in (("--dpo-only", "dpo", "ppo"), ("--ppo-only", "ppo", "dpo")):
        plots = tmp_path / flag.strip("-")
        # reuse the smoke run's offline models (same settings: no rebuild)
        proc = run_main(*SMOKE, flag, "--output_dir", str(smoke_run["dir"] / "models"),
                        "--plots_dir", str(plots))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "reusing" in proc.stdout
        res = json.loads((plots / "results.json").read_text())
        assert present in res and absent not in res
        assert Path(plots / "dpo_results_dashboard.png").stat().st_size > 10_000


def _study_args(out):
    return [*SMOKE, "--sweep", "--seeds", "0", "1", "--output_dir", str(out / "models"),
            "--plots_dir", str(out / "plots")]


@pytest.fixture(scope="module")
def smoke_study(smoke_run, tmp_path_factory):
    """`uv run main.py --preset smoke --sweep --seeds 0 1`, once for the tests of the study's protocol."""
    out = tmp_path_factory.mktemp("smoke_study")
    copy_offline_models(smoke_run["dir"] / "models", out / "models")
    proc = run_main(*_study_args(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"dir": out, "proc": proc, "results": json.loads((out / "plots" / "results.json").read_text())}


def _chosen(results) -> dict:
    """(method, budget, seed) -> the checkpoint the protocol chose within a budget (None for none); ("band",
    method, band, seed) the one at equal KL; ("highest", method, seed) the highest validation safety."""
    p = results["protocol"]
    out = {(m, k, r["seed"]): r["checkpoint"] for m, cells in p["cells"].items()
           for k, c in cells.items() for r in c["per_seed"]}
    out.update({("band", m, k, r["seed"]): r["checkpoint"] for m, cells in p["bands"]["cells"].items()
                for k, c in cells.items() for r in c["per_seed"]})
    out.update({("highest", m, int(s)): r["checkpoint"] for m, by_seed in p["highest"]["per_method"].items()
                for s, r in by_seed.items()})
    out.update({("envelope", m, k, r["seed"]): (r["a"], r["b"], round(r["w"], 12))
                for m, cells in p["envelope"]["cells"].items() for k, c in cells.items() for r in c["per_seed"]})
    return out


def _check_envelope_cells(res) -> None:
    """The primary reading: per method, seed and budget, the best mixture at KL <= k of the envelope of the
    method's validation points and the reference, re-derived here; at least every checkpoint within the budget; its
    held-out safety the w-mix of its vertices' per-prompt means; a cell below its budget says why; the paired
    comparisons carry the seeds' signs."""
    from study.grid import envelope_cell, reference_vertex

    p, seeds = res["protocol"], res["study"]["seeds"]
    e = p["envelope"]
    assert e["budgets"] == [0.2, 0.5] and set(e["cells"]) == {"dpo", "ppo", "ppo_gt"}

    def heldout_mean(name, seed):
        ck = p["reference"][str(seed)] if name == "reference" else p["checkpoints"][name]
        return float(np.mean(ck["per_prompt"]["scores"]))

    for m, cells in e["cells"].items():
        for k, c in cells.items():
            assert [r["seed"] for r in c["per_seed"]] == seeds
            for r in c["per_seed"]:
                s, budget = r["seed"], float(k)
                pts = [q for q in p["validation_points"] if q["method"] == m and q["seed"] == s]
                best = envelope_cell([reference_vertex(m, s, e["reference_validation"][str(s)]), *pts], budget)
                assert r["validation"]["safety"] == pytest.approx(best["safety"]) and r["validation"]["kl"] <= budget
                assert r["validation"]["safety"] >= max([q["safety"] for q in pts if q["kl"] <= budget], default=0)
                assert (r["status"] == "ok") == (r["validation"]["kl"] == pytest.approx(budget)) and \
                    (r["status"] == "ok" or r["reason"])
                mix = r["w"] * heldout_mean(r["a"], s) + (1 - r["w"]) * heldout_mean(r["b"], s)
                assert r["heldout"]["safety"] == pytest.approx(mix) and 0 <= r["w"] <= 1
                assert r["heldout"]["kl_over"] == (r["heldout"]["kl"] > 1.2 * budget)
    for cells in e["differences"].values():
        for d in cells.values():
            assert d["signs"]["n"] == len(seeds) == len(d["judge_seed_means"])
            assert d["signs"]["positive"] == sum(x > 0 for x in d["judge_seed_means"])


def _check_band_cells(res) -> None:
    """Band cells for every method, band and seed; each chosen checkpoint's validation KL inside its band, its
    held-out numbers, per-prompt judge and VADER scores stored; paired comparisons with t intervals."""
    p, seeds = res["protocol"], res["study"]["seeds"]
    b = p["bands"]
    assert set(b["cells"]) == {"dpo", "ppo", "ppo_gt"} and b["targets"] == [0.2, 0.5] and b["width"] == 0.2
    n = res["n_eval_prompts"]
    for method, cells in b["cells"].items():
        assert set(cells) == {"0.2", "0.5"}
        for k, c in cells.items():
            assert [r["seed"] for r in c["per_seed"]] == seeds
            for r in c["per_seed"]:
                assert r["status"] in ("ok", "not reached", "skipped") and r["n_candidates"] >= (r["status"] == "ok")
                if r["status"] == "ok":
                    assert 0.8 * float(k) <= r["validation"]["kl"] <= 1.2 * float(k)
                    ck = p["checkpoints"][r["checkpoint"]]
                    assert len(ck["per_prompt"]["vader"]) == len(ck["per_prompt"]["scores"]) == n
                    assert all(-1 <= v <= 1 for v in ck["per_prompt"]["vader"])
                    assert ck["heldout"]["vader"] == pytest.approx(np.mean(ck["per_prompt"]["vader"]))
                else:
                    assert r["checkpoint"] is None and r["reason"]
    assert set(b["differences"]) == {"dpo-ppo", "dpo-ppo_gt", "ppo-ppo_gt"}
    for cells in b["differences"].values():
        for d in cells.values():
            assert {"judge", "vader", "judge_bootstrap", "kl", "kl_mismatch", "n_candidates", "seeds"} <= set(d)
            assert len(d["judge_seed_means"]) == len(d["seeds"]) == d["judge"]["n_seeds"]
    top = p["highest"]["max_kl"]
    for m in ("dpo", "ppo", "ppo_gt"):  # the highest validation safety of every method and seed that went below
        below = sorted({q["seed"] for q in p["validation_points"] if q["method"] == m and q["kl"] <= top})
        assert sorted(int(s) for s in p["highest"].get("per_method", {}).get(m, {})) == below


def test_smoke_study_chooses_on_validation_reports_held_out_with_paired_intervals(smoke_study):
    """Every run of the grid for both seeds, equal coverage, the chosen checkpoints' held-out numbers with their
    per-prompt scores, paired differences with bootstrap intervals, and at least one reported cell per method."""
    res, proc = smoke_study["results"], smoke_study["proc"]
    finals = res["study"]["final_points"]
    grid = {(f["method"], f["label"], f["seed"]) for f in finals}
    # per seed: betas 0.1 and 1; PPO and PPO-GT each at target 6 and kl_coef 0.5
    assert len(finals) == len(grid) == 2 * (2 + 2 + 2) and res["study"]["seeds"] == [0, 1]
    runs_per = {m: sum(f["method"] == m for f in finals) for m in ("dpo", "ppo", "ppo_gt")}
    assert len(set(runs_per.values())) == 1  # equal coverage: runs ...
    evals = {m: {len([p for p in res["protocol"]["validation_points"] if p["run"] == r["name"]])
                 for r in res["runs"] if r["method"] == m} for m in runs_per}
    assert all(v == {4} for v in evals.values()), evals  # ... and evaluations per run
    assert all(isinstance(r["kl_flattened"], bool) for r in res["runs"])

    p = res["protocol"]
    assert p["n_resamples"] >= 2000 and p["matched_kls"] == [0.2, 0.5]
    for method, cells in p["cells"].items():
        reported = [r for c in cells.values() for r in c["per_seed"] if r["status"] == "ok"]
        assert reported, method  # at least one cell per method is not "-"
        for k, c in cells.items():
            for r in c["per_seed"]:
                if r["checkpoint"]:
                    ck = p["checkpoints"][r["checkpoint"]]
                    assert r["validation"]["kl"] <= float(k)
                    n = res["n_eval_prompts"]
                    assert len(ck["per_prompt"]["scores"]) == len(ck["per_prompt"]["log_ratios"]) == n
                    assert ck["heldout"]["safety"] == pytest.approx(np.mean(ck["per_prompt"]["scores"]))
    for name in ("dpo-ppo", "dpo-ppo_gt", "ppo-ppo_gt"):
        for d in p["differences"][name].values():
            assert {"mean", "lo", "hi", "n_seeds", "seeds"} <= set(d)
    assert any(d["n_seeds"] for d in p["differences"]["dpo-ppo"].values())
    assert "checkpoints chosen on validation" in proc.stdout and "paired differences" in proc.stdout
    _check_band_cells(res)
    _check_envelope_cells(res)
    assert "equal KL (checkpoints chosen on validation inside each KL band" in proc.stdout
    assert "equal KL budgets (per method and seed, the validation envelope" in proc.stdout
    assert "secondary reading, within a KL budget" in proc.stdout

    # Each seed's reward model is trained once and its time charged once: to the run that trained it.
    for seed in (0, 1):
        learned = [r for r in res["runs"] if r["method"] == "ppo" and r["seed"] == seed]
        assert len(learned) == 2 and all(r["reward_model"]["n_heldout_pairs"] > 0 for r in learned)
        for r in learned:  # a count of pairs out of n_heldout_pairs
            acc = r["reward_model"]["heldout_pair_accuracy"] * r["reward_model"]["n_heldout_pairs"]
            assert abs(acc - round(acc)) < 1e-6
        assert [r["reward_model"]["reused"] for r in learned] == [False, True]
        assert learned[0]["rm_train_s"] > 0 and learned[1]["rm_train_s"] == 0.0
        assert len({r["reward_model"]["heldout_pair_accuracy"] for r in learned}) == 1
    assert proc.stdout.count("count for the run that trained it, 0s for this one") == 2


def test_validation_and_held_out_prompts_come_from_disjoint_reviews(smoke_study):
    import dataset
    from modeling.models import load_tokenizer
    from runtime.cli import parse_config

    res = smoke_study["results"]
    cfg = parse_config(_study_args(smoke_study["dir"]))
    reviews = dataset.load_reviews(cfg.data.data, verbose=False)
    train_df, eval_df = dataset.split_reviews(reviews, cfg.data, cfg.data.split_seed)
    assert not set(train_df["review"]) & set(eval_df["review"])
    tok = load_tokenizer(res["policy_model"])
    for seed in (0, 1):
        data = dataset.prepare(cfg.replace(run={"seed": seed}), tok, train_df, eval_df)
        train_ids = dataset.encode_openings(tok, train_df["review"], cfg.data.prompt_max_tokens)
        eval_ids = dataset.encode_openings(tok, eval_df["review"], cfg.data.prompt_max_tokens)
        # every validation prompt opens a training review, every held-out prompt a held-out one
        assert all(any(o[: len(p)] == p for o in train_ids) for p in data.val_prompts)
        assert all(any(o[: len(p)] == p for o in eval_ids) for p in data.eval_prompts)
    # what the runs were evaluated on during training: the validation prompts (their count), not the held-out
    rows = read_metrics(smoke_study["dir"] / "models" / "runs" / "dpo_toxic_reduced_model" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "eval/safety_score" in rows[0]
    assert res["n_eval_prompts"] == cfg.eval.n_eval_prompts


def test_selection_never_looks_at_held_out_numbers(smoke_study, monkeypatch):
    """Through the pipeline (main.py with --resume: every run finished, so only the protocol runs again):
    scrambling every held-out score leaves every choice unchanged; changing one validation score changes it.
    (In the study's own directory: its saved configs name the model directories, so a copy would retrain.)"""
    from study import protocol

    out = smoke_study["dir"]
    before = _chosen(smoke_study["results"])
    real = protocol.evaluate_policy

    def scrambled(policy, ctx, temperature, with_kl=True):
        res = real(policy, ctx, temperature, with_kl)
        rng = np.random.default_rng(len(ctx.prompts))
        res["scores"] = 1.0 - rng.permutation(np.asarray(res["scores"])) * rng.random()
        res["safety_score"] = float(np.mean(res["scores"]))
        return res

    def forget_heldout():  # the held-out evaluations are cached (protocol.heldout_result): evaluate afresh
        for f in (out / "models" / "cache").glob("heldout-*.json"):
            f.unlink()

    forget_heldout()
    monkeypatch.setattr(protocol, "evaluate_policy", scrambled)
    proc = run_main(*_study_args(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((out / "plots" / "results.json").read_text())
    assert _chosen(again) == before
    assert [c["heldout"]["safety"] for c in again["protocol"]["checkpoints"].values()] != \
        [c["heldout"]["safety"] for c in smoke_study["results"]["protocol"]["checkpoints"].values()]
    monkeypatch.setattr(protocol, "evaluate_policy", real)
    forget_heldout()  # the scrambled scores must not be read back by the runs below

    # raise the validation safety of a DPO checkpoint of seed 0 that was not chosen at the larger budget
    k = str(smoke_study["results"]["protocol"]["matched_kls"][-1])
    was = before[("dpo", k, 0)]
    pts = [p for p in smoke_study["results"]["protocol"]["validation_points"]
           if p["method"] == "dpo" and p["seed"] == 0 and p["kl"] <= float(k) and f"{p['run']}@{p['step']}" != was]
    target = pts[0]
    path = out / "models" / "runs" / target["run"] / "metrics.jsonl"
    saved = path.read_text()
    rows = read_metrics(path)
    for r in rows:
        if r["step"] == target["step"]:
            r["eval/safety_score"] = 0.99
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        proc = run_main(*_study_args(out), "--resume")
    finally:
        path.write_text(saved)
    assert proc.returncode == 0, proc.stderr[-2000:]
    changed = _chosen(json.loads((out / "plots" / "results.json").read_text()))
    assert changed[("dpo", k, 0)] == f"{target['run']}@{target['step']}" != was
    def method_seed(key):
        if key[0] in ("band", "envelope"):
            return key[1], key[3]
        return (key[1], key[2]) if key[0] == "highest" else (key[0], key[2])

    others = [key for key in before if method_seed(key) != ("dpo", 0)]  # every other method and seed: as before
    assert [changed[key] for key in others] == [before[key] for key in others]


@pytest.fixture(scope="module")
def smoke_study_generated(smoke_run, smoke_study, tmp_path_factory):
    """The smoke study in the second setting: `--sweep --seeds 0 1 --pair_source generated`, taking the first
    setting's PPO-GT runs (`--reuse_runs_from`), as the study's second setting does."""
    out = tmp_path_factory.mktemp("smoke_study_generated")
    # the same cache (so the same model paths), as the two settings of the real study share models/
    cache = smoke_study["dir"] / "models"
    proc = run_main(*_study_args(out), "--pair_source", "generated", "--cache_dir", str(cache),
                    "--reuse_runs_from", str(cache))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"dir": out, "proc": proc}


def test_smoke_study_in_the_papers_generated_pair_setting(smoke_study_generated, smoke_study):
    """`--sweep --seeds 0 1 --pair_source generated`: pairs sampled from the reference and labelled by the judge,
    made once per seed in data preparation; DPO and the reward model learn from the very same pairs; the same
    protocol and structure as the review-pair study, with a reported cell per method."""
    import hashlib

    proc, tmp_path = smoke_study_generated["proc"], smoke_study_generated["dir"]
    cache = smoke_study["dir"] / "models"
    # PPO-GT reads no pairs: its 4 runs (2 seeds x 2 settings) are the first setting's, linked; DPO and PPO train
    assert proc.stdout.count("reused from") == 4 and proc.stdout.count("ppo: saved") == 4, proc.stdout[-3000:]
    from config import PRESETS

    (coef,) = PRESETS["smoke"].eval.sweep_kl_coefs
    assert all((tmp_path / "models" / "runs" / r).is_symlink()
               for r in ("sweep/seed0/ppo_gt", f"sweep/seed1/ppo_gt_klcoef{coef:g}"))
    assert proc.stdout.count("generated training pairs") == 2 and "sample pairs from the reference" in proc.stderr
    res = json.loads((tmp_path / "plots" / "results.json").read_text())
    assert res["setup"]["pair_source"] == "generated"
    for method, cells in res["protocol"]["cells"].items():
        assert any(r["status"] == "ok" for c in cells.values() for r in c["per_seed"]), method
    assert set(res["protocol"]["differences"]) == {"dpo-ppo", "dpo-ppo_gt", "ppo-ppo_gt"}
    _check_band_cells(res)
    review = json.loads((smoke_study["dir"] / "plots" / "results.json").read_text())

    def gt_points(r):
        return [(p["run"], p["step"], p["kl"], p["safety"]) for p in r["protocol"]["validation_points"]
                if p["method"] == "ppo_gt"]
    assert gt_points(res) == gt_points(review) and gt_points(res)
    # one cached pair set per seed, and each seed's reward model trained on exactly those pairs
    sets = [json.loads(p.read_text()) for p in (cache / "cache").glob("generated_pairs-*.json")]
    assert len(sets) == 2
    rm_settings = (cache / "reward_models").glob("*/rm_settings.json")
    rm_pairs = {json.loads(p.read_text())["pairs"] for p in rm_settings}  # the review study's two, and these two
    generated = {hashlib.sha256(json.dumps([s["train"], s["val"]]).encode()).hexdigest()[:16] for s in sets}
    assert len(rm_pairs) == 4 and generated < rm_pairs
    for s in sets:
        assert all(p["chosen"] != p["rejected"] for p in s["train"])


def test_study_resume_skips_finished_runs_even_with_other_read_out_settings(smoke_study):
    out = smoke_study["dir"]
    again = run_main(*_study_args(out), "--resume", "--matched_kls", "0.3", "--temperatures", "1.0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished earlier with the same settings: skipped") == 12
    assert "dpo: saved" not in again.stdout and "ppo: saved" not in again.stdout
    assert json.loads((out / "plots" / "results.json").read_text())["protocol"]["matched_kls"] == [0.3]


def test_generated_pairs_and_judge_reward_options(tmp_path, smoke_run):
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    common = [*SMOKE, "--output_dir", str(tmp_path / "models")]
    dpo = run_main(*common, "--plots_dir", str(tmp_path / "plots_generated"), "--dpo-only", "--pair_source",
                   "generated", "--dpo_steps", "4", "--loss_type", "ipo")
    assert dpo.returncode == 0, dpo.stderr[-2000:]
    assert "sample pairs from the reference" in dpo.stderr
    # another setup (review pairs): its own results.json (the generated one's is refused, never mixed in)
    ppo = run_main(*common, "--plots_dir", str(tmp_path / "plots"), "--ppo-only", "--ppo_reward", "judge",
                   "--ppo_steps", "2")
    assert ppo.returncode == 0, ppo.stderr[-2000:]
    summary = json.loads((tmp_path / "models" / "ppo_toxic_reduced_model" / "train_summary.json").read_text())
    assert summary["reward"] == "judge" and summary["reward_model"] is None


def test_sft_stage_fine_tunes_the_base_lm_and_becomes_the_reference(tmp_path, smoke_run):
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    args = [*SMOKE, "--dpo-only", "--dpo_steps", "2", "--sft_steps", "20", "--sft_lr", "3e-3",
            "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots")]
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sft_dir,) = (tmp_path / "models" / "sft").iterdir()
    report = json.loads((sft_dir / "sft_report.json").read_text())
    assert report["steps"] == 20 and report["heldout_loss_after"] < report["heldout_loss_before"]
    cfg = json.loads((tmp_path / "models" / "dpo_toxic_reduced_model" / "training_config.json").read_text())
    assert cfg["model"]["policy_model"] == str(sft_dir)  # the reference and the initial policy
    (base_dir,) = (tmp_path / "models" / "offline").glob("base_lm-*")
    base, sft = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (base_dir, sft_dir))
    assert any(not torch.equal(base[k], sft[k]) for k in base)
    again = run_main(*args)  # the same settings reuse the fine-tuned model
    assert again.returncode == 0 and "sft: reusing" in again.stdout


def test_report_to_tensorboard_writes_the_metrics_jsonl_names(tmp_path, smoke_run):
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    proc = run_main(*SMOKE, "--report_to", "tensorboard", "--dpo_steps", "10", "--ppo_steps", "2",
                    "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = {}
    for run in ("dpo_toxic_reduced_model", "ppo_toxic_reduced_model"):
        events[run] = EventAccumulator(str(tmp_path / "models" / "tracking" / run))  # the scalars' event file
        events[run].Reload()
    dpo_tags, ppo_tags = (set(events[r].Tags()["scalars"]) for r in events)
    assert {"rewards/margins", "loss", "eval/safety_score", "eval/kl_to_ref"} <= dpo_tags
    assert {"objective/kl", "losses/policy_loss", "eval/safety_score"} <= ppo_tags
    # the same numbers as metrics.jsonl, at the same steps
    rows = {r["step"]: r for r in read_metrics(tmp_path / "models" / "dpo_toxic_reduced_model" / "metrics.jsonl")}
    for ev in events["dpo_toxic_reduced_model"].Scalars("rewards/margins"):
        assert abs(ev.value - rows[ev.step]["rewards/margins"]) < 1e-6
    assert "wandb" not in sys.modules  # W&B is imported only when asked for


def test_report_to_a_missing_tracker_is_a_one_line_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    proc = run_main(*SMOKE, "--report_to", "wandb", "--output_dir", str(tmp_path / "m"))
    assert proc.returncode == 2 and "uv sync --group wandb" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_outputs_default_to_per_preset_directories():
    from runtime.cli import parse_config

    run = parse_config(["--preset", "smoke"]).run
    assert (run.output_dir, run.plots_dir, run.cache_dir) == ("models/smoke", "evaluation_plots/smoke", "models")
    run = parse_config(["--preset", "offline"]).run
    assert (run.output_dir, run.plots_dir, run.cache_dir) == ("models/offline", "evaluation_plots/offline", "models")
    run = parse_config(["--preset", "smoke", "--output_dir", "x"]).run  # a given --output_dir holds the caches too
    assert (run.output_dir, run.cache_dir, run.plots_dir) == ("x", "x", "evaluation_plots/smoke")
    # the paper's generated-pair setting: its own directories, the caches shared
    run = parse_config(["--preset", "offline", "--pair_source", "generated"]).run
    assert (run.output_dir, run.plots_dir, run.cache_dir) == ("models/offline-generated",
                                                              "evaluation_plots/offline-generated", "models")
    cfg = parse_config(["--preset", "offline"])  # a resolved config keeps its paths when copied
    assert cfg.replace(dpo={"beta": 0.5}).run.output_dir == "models/offline"


def test_a_smoke_run_leaves_another_presets_results_alone(tmp_path):
    """Run from an empty directory with the default paths: smoke writes under models/smoke and
    evaluation_plots/smoke only, and the offline preset's --plots-only neither sees nor touches them."""
    require_imdb()
    from conftest import IMDB_CSV, run_cli

    other = tmp_path / "evaluation_plots" / "offline"
    other.mkdir(parents=True)
    (other / "results.json").write_text("{}")  # stands for an earlier offline study's results
    proc = run_cli(*SMOKE, "--dpo-only", "--dpo_steps", "2", "--data", str(IMDB_CSV), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "evaluation_plots" / "smoke" / "dpo_results_dashboard.png").exists()
    assert (tmp_path / "models" / "smoke" / "dpo_toxic_reduced_model" / "train_summary.json").exists()
    assert list((tmp_path / "models" / "offline").glob("base_lm-*"))  # the shared cache of self-built models
    assert (other / "results.json").read_text() == "{}" and sorted(p.name for p in other.iterdir()) == ["results.json"]


def test_a_run_stops_at_the_first_evaluation_past_max_kl(tmp_path, smoke_run):
    """--max_kl: nothing a study reads lies past it, so the run stops there, saves, and says so."""
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    proc = run_main(*SMOKE, "--dpo-only", "--max_kl", "0.001", "--output_dir", str(tmp_path / "models"),
                    "--plots_dir", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = tmp_path / "models" / "dpo_toxic_reduced_model"
    rows = read_metrics(final / "metrics.jsonl")
    assert rows[-1]["step"] == 10 and rows[-1]["eval/kl_to_ref"] > 0.001  # the first evaluation, of 4
    assert json.loads((final / "train_summary.json").read_text())["stopped_above_max_kl_at"] == 10
    assert "> --max_kl 0.001 at step 10: stopped, 30 steps early" in proc.stdout + proc.stderr


def test_an_evaluation_schedule_evaluates_at_its_steps_and_the_last(tmp_path, smoke_run):
    """--dpo_eval_steps / --ppo_eval_steps: evaluations where the KL moves fast, not every N steps."""
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    proc = run_main(*SMOKE, "--dpo_steps", "12", "--dpo_eval_steps", "2", "3", "7", "--ppo_steps", "3",
                    "--ppo_eval_steps", "2", "--output_dir", str(tmp_path / "models"), "--plots_dir",
                    str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, expected in (("dpo", [0, 2, 3, 7, 12]), ("ppo", [0, 2, 3])):
        rows = read_metrics(tmp_path / "models" / f"{name}_toxic_reduced_model" / "metrics.jsonl")
        assert [r["step"] for r in rows if "eval/kl_to_ref" in r] == expected, name


def test_dpo_only_then_ppo_only_keeps_both_and_refuses_another_setup(tmp_path, smoke_run):
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    common = [*SMOKE, "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots")]
    dpo = run_main(*common, "--dpo-only", "--dpo_steps", "4")
    assert dpo.returncode == 0, dpo.stderr[-2000:]
    ppo = run_main(*common, "--ppo-only", "--ppo_steps", "2")
    assert ppo.returncode == 0, ppo.stderr[-2000:]
    assert "results: keeping dpo from" in ppo.stdout
    results = json.loads((tmp_path / "plots" / "results.json").read_text())
    assert "dpo" in results and "ppo" in results
    assert sorted(r["method"] for r in results["runs"]) == ["dpo", "ppo"]
    assert {p["method"] for p in results["frontier"]["points"]} == {"dpo", "ppo"}
    before = (tmp_path / "plots" / "results.json").read_bytes()
    other = run_main(*common, "--ppo-only", "--ppo_steps", "2", "--seed", "1")  # another pair sample
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "another setup (seeds: [0] there, [1] now)" in other.stderr and "--plots_dir" in other.stderr
    assert (tmp_path / "plots" / "results.json").read_bytes() == before  # nothing overwritten


def test_a_judge_at_chance_is_called_out(smoke_run):
    """The smoke judge exists to test the code: the run says its scores carry no signal and names the quick
    preset, and results.json keeps the judge's accuracy on completion-length texts."""
    out = smoke_run["proc"].stdout
    acc = smoke_run["results"]["judge_accuracy"]["accuracy"]
    assert acc < 0.6 and f"judge: held-out accuracy {acc:.3f}" in out
    vader = smoke_run["results"]["judge_accuracy"]["vader_accuracy"]
    assert 0 <= vader <= 1 and f"VADER, {vader:.3f} on the same texts" in out
    assert "carry no signal" in out and "--preset quick" in out


def test_the_family_script_recomputes_both_settings_and_applies_holm_over_them(smoke_study, smoke_study_generated,
                                                                               tmp_path):
    """scripts/study_family.py re-derives every band choice and comparison of both settings from the stored
    validation points and per-prompt scores ("all equal"), applies Holm over the fixed family (3 pairs x 2 bands x
    2 settings), stores it with --write, and fails on a tampered number or a family of one setting."""
    paths = []
    for name, d in (("review", smoke_study["dir"]), ("generated", smoke_study_generated["dir"])):
        paths.append(tmp_path / f"{name}.json")
        shutil.copy(d / "plots" / "results.json", paths[-1])

    def script(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "study_family.py"), *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    proc = script(*paths)
    assert proc.returncode == 0 and "all equal (no family stored yet" in proc.stdout, proc.stdout + proc.stderr
    assert "family of 12 comparisons" in proc.stdout
    proc = script(*paths, "--write")
    assert proc.returncode == 0 and proc.stdout.count("family written") == 2, proc.stdout + proc.stderr
    res = json.loads(paths[0].read_text())
    fam = res["family"]
    assert fam["m"] == 12 and fam["settings"] == ["dataset", "generated"] and len(fam["holm"]) == 12
    assert all(h["p_holm"] >= h["p"] for h in fam["holm"].values())
    assert script(*paths).stdout.strip().endswith("all equal")
    assert script(paths[0]).returncode == 1  # one setting alone is not the family stored
    typo = script(*paths, "--tabels")  # a mistyped flag is named, not read as a missing file
    assert typo.returncode == 2
    assert typo.stdout.strip() == "error: unknown flag --tabels: the flags are --write and --tables"
    # --tables: each setting's equal-KL tables (README's Key Results) carry the family's Holm-adjusted p-values
    proc = script(*paths, "--tables")
    assert proc.returncode == 0 and proc.stdout.count("| comparison | k | seeds > 0 | judge | p | p (Holm) |") == 2
    shown = {}
    for setting, part in zip(("dataset", "generated"), proc.stdout.split(" pairs):\n")[1:]):
        for r in part.splitlines():
            if r.startswith(("| DPO - ", "| PPO - ")):
                c = r.split(" | ")
                a, b = (name.lower().replace("-", "_") for name in c[0][2:].split(" - "))
                shown[f"{setting}|{a}-{b}|{c[1]}"] = (c[2], c[5])
    made = {k: holm for k, (signs, holm) in shown.items() if not signs.endswith("/0")}
    assert len(shown) == 12 and len(made) == 12, proc.stdout  # the envelope makes every comparison, each with its Holm
    assert all(holm.split()[0] == f"{fam['holm'][k]['p_holm']:.3f}" for k, holm in made.items()), proc.stdout

    d = next(d for cells in res["protocol"]["envelope"]["differences"].values() for d in cells.values())
    d["judge"]["p"] = 0.5 * (d["judge"]["p"] or 1.0) + 1e-3
    paths[0].write_text(json.dumps(res))
    proc = script(*paths)
    assert proc.returncode == 1 and "DIFFERS FROM STORED" in proc.stdout


def test_study_scripts_recompute_the_intervals_and_the_flattened_table(smoke_study, tmp_path):
    """README's two study scripts on a study's results.json: interval_levels recomputes every stored interval
    from the per-prompt scores (and fails on a tampered one); flattened agrees with results.json per run."""
    path = smoke_study["dir"] / "plots" / "results.json"

    def script(name, results):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / name), str(results)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    proc = script("interval_levels.py", path)
    assert proc.returncode == 0 and "all equal the stored ones" in proc.stdout, proc.stdout + proc.stderr
    res = json.loads(path.read_text())
    cell = next(c for c in res["protocol"]["differences"]["dpo-ppo"].values() if c["n_seeds"])
    cell["hi"] += 1e-6
    (tmp_path / "tampered.json").write_text(json.dumps(res))
    proc = script("interval_levels.py", tmp_path / "tampered.json")
    assert proc.returncode == 1 and "DIFFERS FROM STORED" in proc.stdout

    proc = script("flattened.py", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_flat = sum(bool(r["kl_flattened"]) for r in res["runs"])
    assert f"{n_flat} of {len(res['runs'])} runs flat" in proc.stdout
    table = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("| "))
    assert table.count(" flat (") + table.count(" moving (") == len(res["runs"])  # one entry per run
    # the runs past the top budget, counted here from each run's own metrics: at the study's top budget, and at
    # one that some runs pass and others do not (the median of the runs' largest validation KLs)
    seeds = sorted({r["seed"] for r in res["runs"]})
    largest = {r["name"]: max(row.get("eval/kl_to_ref", 0.0) for row in read_metrics(ROOT / r["metrics"]))
               for r in res["runs"]}
    middle = float(np.median(list(largest.values())))
    res["protocol"]["envelope"]["budgets"] = [middle]
    (tmp_path / "middle.json").write_text(json.dumps(res))
    for top, results in ((max(json.loads(path.read_text())["protocol"]["envelope"]["budgets"]), path),
                         (middle, tmp_path / "middle.json")):
        past = {}
        for r in res["runs"]:
            past.setdefault(r["method"], dict.fromkeys(seeds, 0))[r["seed"]] += largest[r["name"]] >= top
        said = next(line for line in script("flattened.py", results).stdout.splitlines()
                    if line.startswith(f"runs past {top:g} nats"))
        assert said.endswith("; ".join(f"{METHOD_SHORT[m]} {'/'.join(str(n[s]) for s in seeds)}"
                                       for m, n in past.items())), said
    assert 0 < sum(v >= middle for v in largest.values()) < len(largest)  # the second check has both kinds


def test_the_ppo_kl_and_tuning_scripts_train_their_grids_and_reuse_finished_runs(smoke_run, tmp_path):
    """scripts/ppo_kl_control.py and scripts/tune_lr.py on the smoke preset: two worker processes train the grid,
    the tables come out with a row per setting, the JSON holds every run's validation points, and a second call
    trains nothing (every run is finished with the same settings)."""
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "cache")
    common = ["--preset", "smoke", "--cache_dir", str(tmp_path / "cache"), "--jobs", "2"]

    def script(name, *args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *common, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)

    out = tmp_path / "kl.json"
    proc = script("ppo_kl_control.py", "--seeds", "0", "--coefs", "0.1", "1", "--targets", "1", "--output_dir",
                  str(tmp_path / "kl"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for row in ("| coefficient 0.1 |", "| coefficient 1 |", "| adaptive, target 1 |"):
        assert row in proc.stdout
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"seed0/klcoef0.1", "seed0/klcoef1", "seed0/target1"}
    assert all(len(r["points"]) == 4 for r in res["runs"].values())  # the smoke preset evaluates every iteration
    finals = [res["runs"][f"seed0/klcoef{c}"]["final_kl"] for c in ("0.1", "1")]
    assert res["checks"]["coefficients_order_the_kl_on_every_seed"] == (finals[0] > finals[1])
    again = script("ppo_kl_control.py", "--seeds", "0", "--coefs", "0.1", "1", "--targets", "1", "--output_dir",
                   str(tmp_path / "kl"))
    logs = "".join(p.read_text() for p in (tmp_path / "kl" / "logs").glob("train_worker*.log"))
    assert again.returncode == 0 and logs.count("finished earlier with the same settings: skipped") == 3

    # the tuning trains the study's own grid (here: DPO at two betas, PPO and PPO-GT at the default target and
    # one fixed coefficient) at each candidate rate
    proc = script("tune_lr.py", "--dpo_lrs", "1e-3", "3e-3", "--ppo_lrs", "1e-3", "3e-3", "--ppo_gt_lrs", "1e-3",
                  "3e-3", "--sweep_betas", "0.1", "1", "--sweep_kl_coefs", "0.1", "--output_dir",
                  str(tmp_path / "tune"), "--out", str(tmp_path / "tune.json"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "tune.json").read_text())
    assert set(res["candidates"]) == {f"{m}/lr{lr}" for m in ("dpo", "ppo", "ppo_gt") for lr in ("0.001", "0.003")}
    assert res["bands"] == [0.2, 0.5] and res["runs"][:6] == [  # the smoke preset's bands; the study's runs
        "dpo/lr0.001/beta=0.1", "dpo/lr0.001/beta=1.0", "dpo/lr0.003/beta=0.1", "dpo/lr0.003/beta=1.0",
        "ppo/lr0.001/target_kl=6.0", "ppo/lr0.001/kl_coef=0.1"]
    # the choice between two rates, recomputed from each candidate's stored validation points by the rule
    from scripts.tune_lr import choose, criterion

    for method in ("dpo", "ppo", "ppo_gt"):
        rows = [c for c in res["candidates"].values() if c["method"] == method]
        for c in rows:
            points = [p for pts in c["runs"].values() for p in pts]
            assert criterion(points, res["reference_safety"], res["bands"], res["band_width"], res["rule"])[0] \
                == c["criterion"]
        assert res["chosen"][method] == choose(rows)
    gt = json.loads((tmp_path / "tune" / "ppo_gt" / "lr0.001" / "kl_coef=0.1" / "training_config.json").read_text())
    assert gt["ppo"]["ppo_reward"] == "judge" and gt["ppo"]["ppo_gt_lr"] == 1e-3 and gt["ppo"]["init_kl_coef"] == 0.1
    assert gt["eval"]["n_eval_prompts"] == 0  # validation only: the tuning drew no held-out prompt
    bad = script("tune_lr.py", "--dpo_lrs", "1e-3", "2e-3", "--ppo_lrs", "1e-3", "--report")
    assert bad.returncode == 2 and "same number of candidate rates" in bad.stderr
    bad = script("tune_lr.py", "--ppo_eval_every", "2", "--report")  # PPO 2 evaluations, DPO 4
    assert bad.returncode == 2 and "equal coverage" in bad.stderr and "Traceback" not in bad.stderr


def test_jobs_refuse_another_setup_before_any_worker_trains(tmp_path, smoke_run):
    """``--jobs 2`` with ``--ppo-only``: a results.json of another setup is refused in one line before the worker
    processes start (they trained the whole grid first, and the refusal came after)."""
    require_imdb()
    copy_offline_models(smoke_run["dir"] / "models", tmp_path / "models")
    common = [*SMOKE, "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots")]
    dpo = run_main(*common, "--dpo-only", "--dpo_steps", "4")
    assert dpo.returncode == 0, dpo.stderr[-2000:]
    before = (tmp_path / "plots" / "results.json").read_bytes()
    other = run_main(*common, "--ppo-only", "--sweep", "--seeds", "1", "--jobs", "2")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr[-2000:]
    assert "another setup" in other.stderr
    assert not list((tmp_path / "models" / "logs").glob("train_worker*.log")), "no worker was started"
    assert (tmp_path / "plots" / "results.json").read_bytes() == before


def test_runs_at_different_kls_side_by_side_are_said_not_to_be_a_comparison(smoke_run):
    from study.plots import KL_NOTE

    out = smoke_run["proc"].stdout
    assert "| kl_to_ref |" in out and out.count(KL_NOTE) == 1
