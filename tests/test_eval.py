"""Win rates, the Pareto envelope and judge edge cases."""

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from eval_utils import judge_logits, judge_scores, upper_envelope, win_rate


def test_win_rate_counts_ties_half():
    assert win_rate([0.9, 0.2, 0.5, 0.7], [0.1, 0.3, 0.5, 0.7]) == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert win_rate([1.0, 1.0], [0.0, 0.0]) == 1.0
    assert win_rate([0.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        win_rate([0.1, 0.2], [0.1])


def test_upper_envelope_of_a_hand_made_point_set():
    pts = [(5.0, 0.7), (1.0, 0.5), (2.0, 0.4), (3.0, 0.8), (3.0, 0.6), (0.5, 0.55), (9.0, 0.79), (10.0, 0.9)]
    assert upper_envelope(pts) == [(0.5, 0.55), (3.0, 0.8), (10.0, 0.9)]
    assert upper_envelope([]) == []


def test_judge_scores_empty_long_and_non_ascii_texts(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=len(tiny_tokenizer), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                           max_position_embeddings=32, pad_token_id=tiny_tokenizer.pad_token_id,
                           id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    judge = DistilBertForSequenceClassification(cfg).eval()
    judge.positive_index = 1
    tiny_tokenizer.model_max_length = 32
    texts = ["", "a lovely film " * 200, "très émouvant — 映画 😀", "fine"]
    scores = judge_scores(tiny_tokenizer, judge, texts, batch_size=3, device="cpu")
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
    logits = judge_logits(tiny_tokenizer, judge, texts, batch_size=3, device="cpu")
    p = torch.tensor(scores, dtype=torch.float64)
    assert torch.allclose(logits.double(), torch.log(p) - torch.log1p(-p), atol=1e-4)
