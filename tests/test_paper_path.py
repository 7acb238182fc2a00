"""The default ``paper`` path without the hub: fast failure, hub-format fixtures, the hub cache offline."""

import json
import time

import pytest
from conftest import SMOKE, put_in_hub_cache, run_cli, run_main
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dataset import load_reviews
from modeling.models import load_causal_lm, load_judge, load_tokenizer


def test_fixtures_have_the_hub_formats(hub_fixtures):
    raw = AutoTokenizer.from_pretrained(hub_fixtures["gpt2"])
    assert type(raw).__name__ == "GPT2Tokenizer" and raw.pad_token is None
    assert raw.bos_token == raw.eos_token == raw.unk_token == "<|endoftext|>"
    assert AutoConfig.from_pretrained(hub_fixtures["gpt2"]).pad_token_id is None
    # what this project makes of them: EOS doubles as padding, left padding for generation
    tok, lm = load_tokenizer(str(hub_fixtures["gpt2"])), load_causal_lm(str(hub_fixtures["gpt2"]))
    assert tok.pad_token_id == tok.eos_token_id == lm.config.pad_token_id and tok.padding_side == "left"
    _, judge = load_judge(str(hub_fixtures["judge"]))
    assert judge.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"} and judge.positive_index == 1


@pytest.mark.parametrize("layout", ["imdb_disk", "imdb_parquet"])
def test_imdb_in_the_hub_layout_loads_and_drops_the_unlabelled_split(hub_fixtures, layout, capsys):
    df = load_reviews(str(hub_fixtures[layout]))
    assert len(df) == 240 and sorted(df["label"].unique()) == [0, 1] and df["label"].sum() == 120
    assert not df["review"].str.contains("unlabelled").any()
    assert "skipped 30 unlabelled review(s)" in capsys.readouterr().out


def test_imdb_hub_layout_with_wrong_columns_is_a_one_line_error(tmp_path):
    import pandas as pd

    (tmp_path / "d").mkdir()
    pd.DataFrame({"sentence": ["x"], "label": [1]}).to_parquet(tmp_path / "d" / "train-0.parquet")
    proc = run_main(*SMOKE, "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "m"))
    assert proc.returncode == 2 and "expected the hub IMDb layout text,label" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


TINY = ["--device", "cpu", "--dpo_steps", "4", "--dpo_batch_size", "4", "--dpo_warmup_steps", "1",
        "--dpo_eval_every", "2", "--rm_steps", "4", "--rm_batch_size", "4", "--rm_eval_every", "2", "--ppo_steps", "2",
        "--ppo_batch_size", "8", "--ppo_mini_batch_size", "4", "--ppo_eval_every", "1", "--n_eval_prompts", "8",
        "--eval_batch_size", "8", "--n_val_pairs", "8", "--response_tokens", "8", "--max_length", "16",
        "--temperatures", "0.5", "1.0", "--save_every", "1000"]


def test_paper_preset_end_to_end_from_the_hub_cache_offline(hub_fixtures, tmp_path):
    """``--preset paper`` with hub ids, the hub unusable (HF_HUB_OFFLINE=1) and the models in the local hub
    cache, as for a user who downloaded them once; IMDb from a save_to_disk directory. The paper preset's
    code path (no offline builders), tiny sizes."""
    cache = tmp_path / "hf_cache"
    put_in_hub_cache(cache, "fixture-org/tiny-gpt2", hub_fixtures["gpt2"])
    put_in_hub_cache(cache, "fixture-org/tiny-sst2", hub_fixtures["judge"])
    out = tmp_path / "run"
    proc = run_cli("--preset", "paper", "--dtype", "fp32", "--policy_model", "fixture-org/tiny-gpt2", "--judge_model",
                   "fixture-org/tiny-sst2", "--data", str(hub_fixtures["imdb_disk"]), *TINY,
                   "--output_dir", str(out / "models"), "--plots_dir", str(out / "plots"),
                   env_extra={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "offline:" not in proc.stdout  # no self-built models on the paper path
    res = json.loads((out / "plots" / "results.json").read_text())
    assert res["preset"] == "paper" and res["policy_model"] == "fixture-org/tiny-gpt2" and res["n_reviews"] == 240
    for name in ("reference", "dpo", "ppo"):
        assert 0 <= res[name]["safety_score"] <= 1 and set(res[name]["win_rate_vs_ref"]) == {"0.5", "1.0"}
    saved = out / "models" / "dpo_toxic_reduced_model"
    AutoModelForCausalLM.from_pretrained(saved)
    assert AutoTokenizer.from_pretrained(saved).eos_token == "<|endoftext|>"
    assert (out / "plots" / "dpo_results_dashboard.png").stat().st_size > 10_000


def test_without_the_hub_the_default_command_fails_fast_in_one_line(tmp_path):
    """``uv run main.py`` on a machine without the hub and an empty cache: exit 2 in seconds, one line that
    names the model and both ways out, no retry chatter, nothing written."""
    t0 = time.time()
    proc = run_cli("--output_dir", str(tmp_path / "m"), "--plots_dir", str(tmp_path / "p"),
                   env_extra={"HF_HUB_CACHE": str(tmp_path / "empty_cache")})
    elapsed = time.time() - t0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert "'distilgpt2'" in lines[0] and "--preset offline" in lines[0] and "--policy_model PATH" in lines[0]
    assert lines[0].index("--preset quick") < lines[0].index("--preset offline")  # the 2-minute way out first
    assert "Retrying" not in proc.stderr and not (tmp_path / "m").exists() and not (tmp_path / "p").exists()
    print(f"failed in {elapsed:.1f}s")  # seconds (the 10 s bound is checked by hand, not asserted: timing)
