"""IMDb loading (every bad input), the split and the preference-pair invariants."""

import numpy as np
import pandas as pd
import pytest
from conftest import SMOKE, run_cli, run_main, synthetic_reviews

from config import ConfigError, DataConfig
from dataset import build_pairs, clean_review, load_reviews, split_reviews


def write_csv(tmp_path, df, name="reviews.csv"):
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def test_csv_loads_cleans_markup_and_maps_labels(tmp_path):
    df = pd.DataFrame({"Review": ["Great<br />film<br/>!", "bad", "ok fine", "meh"],
                       "Sentiment": ["POSITIVE", "negative", "1", "0"]})
    out = load_reviews(str(write_csv(tmp_path, df)), verbose=False)
    assert out["review"].tolist() == ["Great film !", "bad", "ok fine", "meh"]
    assert out["label"].tolist() == [1, 0, 1, 0]


def test_clean_review_strips_br_variants():
    assert clean_review("  a<br /><br />b<BR>c  ") == "a b c"


def test_aclimdb_folder(tmp_path):
    for split in ("train", "test"):
        for sub, text in (("pos", "lovely<br />film"), ("neg", "awful film")):
            d = tmp_path / "aclImdb" / split / sub
            d.mkdir(parents=True)
            (d / "0_9.txt").write_text(f"{text} ({split})", encoding="utf-8")
    out = load_reviews(str(tmp_path), verbose=False)
    assert len(out) == 4 and sorted(out["label"].tolist()) == [0, 0, 1, 1]
    assert "lovely film (train)" in out["review"].tolist()


def test_empty_reviews_are_dropped_and_counted(tmp_path, capsys):
    df = pd.DataFrame({"review": ["good", "", "<br />", "bad"], "sentiment": ["positive"] * 2 + ["negative"] * 2})
    out = load_reviews(str(write_csv(tmp_path, df)))
    assert len(out) == 2
    assert "dropped 2 empty review" in capsys.readouterr().out


@pytest.mark.parametrize("content, words", [
    (b"review,sentiment\n\xff\xfe bad bytes,positive\n", "not UTF-8"),
    (b"", "empty"),
    (b'review,sentiment\n"unterminated,positive\n', "not a valid CSV"),
    (b"text,label\nhello,positive\n", "lacks column(s) review, sentiment (found: text, label)"),
    (b"review,sentiment\nhello,positive\nbye,meh\nhi,meh\nyo,great\n", "3 row(s) have unknown sentiment labels"),
])
def test_bad_files_raise_one_line_errors(tmp_path, content, words):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_reviews(str(path), verbose=False)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unknown_labels_are_named(tmp_path):
    df = pd.DataFrame({"review": ["a", "b", "c"], "sentiment": ["positive", "meh", "great"]})
    with pytest.raises(ConfigError, match=r"'meh'.*'great'|'great'.*'meh'"):
        load_reviews(str(write_csv(tmp_path, df)), verbose=False)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_reviews(str(tmp_path / "nope.csv"))


def test_bad_inputs_through_main_exit_2_and_keep_existing_outputs(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,positive\n")
    models, plots = tmp_path / "models", tmp_path / "plots"
    models.mkdir()
    plots.mkdir()
    (plots / "results.json").write_text('{"keep": true}')
    (models / "marker").write_text("previous run")
    # the first through the real command line (exit code, stderr), the rest in-process
    for run, args in ((run_cli, ["--data", str(bad)]), (run_main, ["--data", str(tmp_path / "missing.csv")]),
                      (run_main, ["--build_offline_models", "false", "--policy_model", str(tmp_path / "no_model")])):
        proc = run(*SMOKE, *args, "--output_dir", str(models), "--plots_dir", str(plots))
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert (plots / "results.json").read_text() == '{"keep": true}'
    assert sorted(p.name for p in models.iterdir()) == ["marker"]


def test_too_few_reviews_for_pairs(tmp_path, tiny_tokenizer):
    df = load_reviews(str(write_csv(tmp_path, synthetic_reviews(40))), verbose=False)
    with pytest.raises(ConfigError, match="preference pair"):
        build_pairs(df, tiny_tokenizer, DataConfig(), seed=0, n_pairs=1000)
    only_pos = df[df.label == 1]
    with pytest.raises(ConfigError, match="0 negative"):
        build_pairs(only_pos, tiny_tokenizer, DataConfig(), seed=0)


def test_split_is_deterministic_and_disjoint(tmp_path):
    df = load_reviews(str(write_csv(tmp_path, synthetic_reviews(100))), verbose=False)
    cfg = DataConfig(eval_fraction=0.2)
    a_train, a_eval = split_reviews(df, cfg, seed=3)
    b_train, b_eval = split_reviews(df, cfg, seed=3)
    c_train, _ = split_reviews(df, cfg, seed=4)
    assert a_train.equals(b_train) and a_eval.equals(b_eval)
    assert not a_train.equals(c_train)
    assert len(a_eval) == 20 and not set(a_train.review) & set(a_eval.review)


def test_pair_invariants(tmp_path, tiny_tokenizer):
    df = load_reviews(str(write_csv(tmp_path, synthetic_reviews(120))), verbose=False)
    cfg = DataConfig(prompt_min_tokens=2, prompt_max_tokens=8, response_tokens=10, max_length=20)
    pairs = build_pairs(df, tiny_tokenizer, cfg, seed=0)
    assert len(pairs) == 60
    ids = {r: tiny_tokenizer(r, add_special_tokens=False)["input_ids"] for r in df.review}
    pos_ids = [ids[r] for r in df.review[df.label == 1]]
    neg_ids = [ids[r] for r in df.review[df.label == 0]]
    from_pos = 0
    for p in pairs:
        k = len(p["prompt"])
        assert 2 <= k <= 8
        assert 1 <= len(p["chosen"]) <= 10 and 1 <= len(p["rejected"]) <= 10
        # winner continues a positive review after its first k tokens, loser a negative one
        assert any(t[k:k + 10] == p["chosen"] for t in pos_ids)
        assert any(t[k:k + 10] == p["rejected"] for t in neg_ids)
        # the prompt is the opening of one of the two reviews
        win_src = [t for t in pos_ids if t[k:k + 10] == p["chosen"]]
        from_pos += any(t[:k] == p["prompt"] for t in win_src)
    assert 0.2 < from_pos / len(pairs) < 0.8  # prompts come from both sentiments
    assert build_pairs(df, tiny_tokenizer, cfg, seed=0) == pairs  # deterministic


def test_duplicated_reviews_are_dropped_so_no_held_out_text_is_in_training(tmp_path, capsys):
    # Every review twice (as 410 IMDb texts are): split by row, ~half the held-out texts would be in training.
    df = synthetic_reviews(100)
    df = pd.concat([df, df, df.iloc[:1].assign(sentiment="negative")], ignore_index=True)  # + one conflict
    out = load_reviews(str(write_csv(tmp_path, df)))
    assert "dropped 99 duplicate review(s) and 3 row(s) whose text has both labels" in capsys.readouterr().out
    assert len(out) == 99 and out["review"].is_unique
    train, held_out = split_reviews(out, DataConfig(eval_fraction=0.3), seed=0)
    assert len(held_out) == 30 and not set(held_out.review) & set(train.review)


def test_eval_prompts_and_held_out_pairs_come_from_reviews_absent_from_training(tmp_path, tiny_tokenizer):
    from config import PRESETS
    from dataset import prepare

    # reviews made of random words: no two share a 3-token stretch by accident
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(3000)]
    df = pd.DataFrame({"review": [" ".join(rng.choice(words, 30)) for _ in range(200)], "label": [0, 1] * 100})
    cfg = PRESETS["smoke"].replace(data={"n_val_pairs": 10, "eval_fraction": 0.2})
    train_df, eval_df = split_reviews(df, cfg.data, seed=0)
    data = prepare(cfg, tiny_tokenizer, train_df, eval_df)
    train_ids = [tiny_tokenizer(r, add_special_tokens=False)["input_ids"] for r in train_df.review]
    eval_ids = [tiny_tokenizer(r, add_special_tokens=False)["input_ids"] for r in eval_df.review]
    assert len(data.eval_prompts) == cfg.eval.n_eval_prompts and all(2 <= len(p) <= 8 for p in data.eval_prompts)
    # every prompt is the opening of a held-out review; every held-out completion continues a held-out review
    assert all(any(o[: len(p)] == p for o in eval_ids) for p in data.eval_prompts)
    for p in data.eval_pairs:
        for key in ("chosen", "rejected"):
            k = len(p["prompt"])
            assert any(t[k:k + len(p[key])] == p[key] for t in eval_ids)
            assert not any(t[k:k + len(p[key])] == p[key] for t in train_ids)
    # validation pairs use training reviews that no training pair uses; their prompts (what every evaluation
    # during training samples from) open training reviews, never held-out ones
    used = {tuple(p[k]) for p in data.train_pairs for k in ("chosen", "rejected")}
    val = {tuple(p[k]) for p in data.val_pairs for k in ("chosen", "rejected")}
    assert len(data.val_pairs) == 10 and not val & used
    assert data.val_prompts == [p["prompt"] for p in data.val_pairs]
    assert all(any(o[: len(p)] == p for o in train_ids) for p in data.val_prompts)
    long_enough = [p for p in data.val_prompts if len(p) >= 3]  # 2 tokens may open another review by chance
    assert long_enough and not any(any(o[: len(p)] == p for o in eval_ids) for p in long_enough)


def test_the_split_follows_the_split_seed_and_each_run_seed_draws_its_own_pairs_and_prompts(tmp_path, tiny_tokenizer):
    from config import PRESETS
    from dataset import prepare

    df = load_reviews(str(write_csv(tmp_path, synthetic_reviews(200))), verbose=False)
    runs = {}
    for seed in (0, 1):
        cfg = PRESETS["smoke"].replace(data={"n_val_pairs": 10}, run={"seed": seed})
        train_df, eval_df = split_reviews(df, cfg.data, cfg.data.split_seed)
        runs[seed] = prepare(cfg, tiny_tokenizer, train_df, eval_df)
    assert runs[0].eval_pairs == runs[1].eval_pairs  # the held-out pairs (the reward model's test) are shared
    assert runs[0].train_pairs != runs[1].train_pairs  # a different pair sample per seed ...
    assert runs[0].eval_prompts != runs[1].eval_prompts  # ... and held-out prompt sample: seeds sample prompts too


def test_the_sealed_draw_takes_the_reviews_no_earlier_draw_used_first(tiny_tokenizer, monkeypatch):
    """--sealed_prompts: the held-out reviews that the earlier draws' prompts opened come after every other, and the
    overlap is counted; without it the draw is the one every earlier study made, unchanged."""
    import dataset

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(3000)]
    df = pd.DataFrame({"review": [" ".join(rng.choice(words, 30)) for _ in range(100)], "label": [0, 1] * 50})
    dc = DataConfig(prompt_min_tokens=8, prompt_max_tokens=8)  # whole 8-token openings: each names its review
    openings = [tuple(t) for t in dataset.encode_openings(tiny_tokenizer, df.review, 8)]
    assert len(set(openings)) == 100

    def reviews(prompts):
        return [openings.index(tuple(p)) for p in prompts]

    old, overlap = dataset.build_prompts(df, tiny_tokenizer, dc, [0, 0, 2], 20)
    assert reviews(old) == list(np.random.default_rng([0, 0, 2]).permutation(100)[:20]) and overlap == 0
    monkeypatch.setattr(dataset, "SEEN_DRAW_PROMPTS", 20)
    avoid = [[0, 0, 2], [0, 1, 2], 0]
    seen = {r for s in avoid for r in reviews(dataset.build_prompts(df, tiny_tokenizer, dc, s, 20)[0])}
    fresh = set(range(100)) - seen
    assert 20 < len(fresh) < 80
    new, overlap = dataset.build_prompts(df, tiny_tokenizer, dc, [0, 0, 3], 20, avoid)
    assert overlap == 0 and set(reviews(new)) <= fresh
    new, overlap = dataset.build_prompts(df, tiny_tokenizer, dc, [0, 0, 3], len(fresh) + 7, avoid)
    assert set(reviews(new)[:len(fresh)]) == fresh and set(reviews(new)[len(fresh):]) <= seen and overlap == 7

    # through prepare(): the sealed stream and its count with --sealed_prompts, the draw of every study without
    from config import PRESETS

    cfg = PRESETS["smoke"].replace(data={"n_val_pairs": 10, "eval_fraction": 0.5}, eval={"n_eval_prompts": 8})
    train_df, eval_df = split_reviews(df, cfg.data, seed=0)
    plain = dataset.prepare(cfg, tiny_tokenizer, train_df, eval_df)
    sealed = dataset.prepare(cfg.replace(eval={"sealed_prompts": True}), tiny_tokenizer, train_df, eval_df)
    assert plain.eval_seen_overlap is None and sealed.eval_prompts != plain.eval_prompts
    assert sealed.eval_seen_overlap == dataset.build_prompts(eval_df, tiny_tokenizer, cfg.data, [0, 0, 3], 8,
                                                             dataset.seen_draws(0))[1]


@pytest.mark.parametrize("rows, words", [
    ([("a lovely film to watch again and again " * 3, "positive"), ("awful " * 30, "negative")], "preference pair"),
    ([(f"great film number {i} and so on and on", "positive") for i in range(300)], "0 negative"),
    ([(f"great {i}", "positive" if i % 2 else "negative") for i in range(300)], "of 9+ words"),
])
def test_degenerate_data_is_caught_before_any_model_is_built(tmp_path, rows, words):
    """Too few, one-sided or too short reviews: exit 2 in seconds, before the offline builders start."""
    csv = write_csv(tmp_path, pd.DataFrame(rows, columns=["review", "sentiment"]).drop_duplicates())
    proc = run_main("--preset", "offline", "--dtype", "fp32", "--data", str(csv),
                    "--output_dir", str(tmp_path / "models"), "--plots_dir", str(tmp_path / "plots"))
    assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "models").exists()


def test_encode_openings_equals_tokenizing_whole_texts(tiny_tokenizer):
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    from dataset import encode_openings

    rng = np.random.default_rng(0)
    words = ["a", "film", "wonderful,", "terrible!", "x" * 40, "(great)", "don't", "é", "12345", "the"]
    texts = [" ".join(rng.choice(words, n)) for n in rng.integers(1, 400, 60)]
    texts += ["nospace" * 300, "", "short", "word " * 500, " leading space and " * 40]
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=120, min_frequency=1, show_progress=False)
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]")
    for tok in (tiny_tokenizer, wordpiece):
        for n in (1, 8, 56):
            full = tok(texts, add_special_tokens=False, truncation=True, max_length=n)["input_ids"]
            assert encode_openings(tok, texts, n) == full, (type(tok).__name__, n)


def test_without_the_csv_or_the_hub_the_error_says_where_the_data_comes_from(monkeypatch, tmp_path):
    import dataset
    from config import ConfigError
    from runtime import hub

    monkeypatch.setattr(hub, "LOCAL_FILES_ONLY", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ConfigError) as e:
        dataset._read_hub("stanfordnlp/imdb", [])
    msg = str(e.value)
    assert "IMDB Dataset of 50K Movie Reviews" in msg and "data/" in msg and "--data PATH" in msg
