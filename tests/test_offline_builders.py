"""Pieces of the offline judge builder, on synthetic token ids (no data, no model)."""

import numpy as np
import torch

from modeling.offline_models import _crop, train_ngram_teacher


def test_crop_is_the_opening_or_a_window_of_the_review():
    ids, rng = list(range(100)), np.random.default_rng(0)
    assert _crop(ids, 10, 0.0, rng) == ids[:10]
    assert _crop(ids[:5], 10, 1.0, rng) == ids[:5]  # shorter than the crop: the whole review
    windows = [_crop(ids, 10, 1.0, rng) for _ in range(50)]
    assert all(len(w) == 10 and w == list(range(w[0], w[0] + 10)) for w in windows)
    assert len({w[0] for w in windows}) > 10  # starts vary


def test_ngram_teacher_learns_word_order_that_unigrams_cannot_see():
    # Positive rows contain the bigram (1, 2), negative rows (2, 1), amid random filler: the same unigrams in
    # both classes, so only the bigram features can separate them.
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(600):
        filler = [int(t) for t in rng.integers(3, 40, 12)]
        pair = [1, 2] if i % 2 else [2, 1]
        at = int(rng.integers(0, len(filler)))
        rows.append(filler[:at] + pair + filler[at:])
        labels.append(i % 2)
    y = torch.tensor(labels)
    teacher = train_ngram_teacher(rows[:400], y[:400], lambda n: np.full(n, 14), 0.0, vocab_size=40, rng=rng,
                                  epochs=20, batch_size=32, lr=0.05)
    p = teacher(rows[400:])
    assert p.shape == (200,) and ((p >= 0) & (p <= 1)).all()
    assert ((p > 0.5).long() == y[400:]).float().mean() > 0.95
