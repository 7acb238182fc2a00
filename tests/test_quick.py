"""The quick preset: the first run a CPU user should make (README's quick start). Its time is measured, not
asserted (README); what it must show is tested here, from scratch (model builds included)."""

import json

from conftest import require_imdb, run_main


def test_quick_preset_shows_a_real_effect_with_a_meaningful_judge(tmp_path):
    require_imdb()
    proc = run_main("--preset", "quick", "--dtype", "fp32", "--output_dir", str(tmp_path / "models"),
                    "--plots_dir", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "plots" / "results.json").read_text())
    # the judge is right on at least 3 in 4 held-out texts as long as what it judges (prompt + completion)
    check = results["judge_accuracy"]
    assert check["tokens"] == 8 + 48 and check["n"] == 1000 and check["accuracy"] >= 0.75, check
    # the second judge, a lexicon nobody here trained, reads real review openings above chance, and agrees with
    # the first one in direction
    assert check["vader_accuracy"] > 0.55 and check["vader_correlation"] > 0.2, check
    # DPO moves the judge above the reference by more than the paired 95% interval it prints
    dpo = results["dpo"]["safety_vs_reference"]
    assert dpo["lo"] > 0 and dpo["n"] == 384, dpo
    assert f"{dpo['mean']:+.3f} [{dpo['lo']:+.3f}, {dpo['hi']:+.3f}]" in proc.stdout
    assert "ppo_gt" in results  # PPO ran too (on the judge's reward: PPO-GT)
    # the KL and a few example completions are printed, so a degenerate policy is visible
    assert "| kl_to_ref |" in proc.stdout and "example completions" in proc.stdout
    assert proc.stdout.count("prompt: ") == 3 and "warning" not in proc.stdout
