"""top-k accuracy that a broken model cannot game (minitorch_gx/ops/loss.py):
exact ties are broken by position as a stable sort does, and a row with a
non-finite logit is never correct."""
import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx.ops.loss import accuracy, topk_correct


def stable_sort_topk_correct(logits, labels, k):
    """The reference: sort each row descending with a stable sort (so an equal
    logit with a smaller class index comes first) and look for the label in the
    first k; a row with NaN or +-inf anywhere is wrong."""
    count = 0
    for row, label in zip(logits, labels):
        if not np.isfinite(row).all():
            continue
        order = sorted(range(len(row)), key=lambda j: -row[j])  # Python's sort is stable
        count += label in order[:k]
    return count


def test_ties_are_broken_by_position_like_a_stable_sort():
    logits = np.array([[0.5, 0.5, 0.5, 0.1]] * 4)
    labels = np.array([0, 1, 2, 3])
    # class 0 is ranked first among the tied, then 1, then 2; 3 is last
    assert [topk_correct(logits, labels, k) for k in (1, 2, 3, 4)] == [1, 2, 3, 4]


def test_against_a_stable_sort_on_logits_with_many_ties():
    rng = np.random.default_rng(11)
    logits = rng.integers(0, 3, (200, 7)).astype(np.float32)  # ties everywhere
    labels = rng.integers(0, 7, 200)
    for k in (1, 2, 5, 7):
        expected = stable_sort_topk_correct(logits, labels, k)
        assert topk_correct(logits, labels, k) == expected, k
    # numpy's stable argsort agrees with the reference
    top = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    assert topk_correct(logits, labels, 5) == sum(labels[i] in top[i] for i in range(200))


def test_a_constant_model_scores_chance():
    k_classes, per_class = 10, 30
    labels = np.repeat(np.arange(k_classes), per_class)
    for value in (0.0, 3.5, -1e30):
        logits = np.full((len(labels), k_classes), value, np.float32)
        assert topk_correct(logits, labels, 1) == per_class  # 1/K
        assert topk_correct(logits, labels, 5) == 5 * per_class  # 5/K
        assert accuracy(logits, labels, topk=(1, 5)) == pytest.approx((0.1, 0.5))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_row_with_a_non_finite_logit_is_never_correct(bad):
    logits = np.array([[5.0, 1.0, 0.0],     # label 0, clearly right, but a bad entry elsewhere
                       [1.0, 2.0, 0.0],     # label 1, right and finite
                       [0.0, 1.0, 2.0]])    # label 2, the bad entry is the true class's own
    logits[0, 2] = bad
    logits[2, 2] = bad
    labels = np.array([0, 1, 2])
    for k in (1, 2, 3):
        assert topk_correct(logits, labels, k) == 1, k   # only the finite row
    assert accuracy(mt.Tensor(logits), mt.Tensor(labels), topk=(1, 3)) == (1 / 3, 1 / 3)


def test_an_all_nan_model_scores_zero_even_in_top_k_equal_k():
    logits = np.full((12, 3), np.nan, np.float32)
    labels = np.arange(12) % 3
    assert topk_correct(logits, labels, 1) == 0
    assert topk_correct(logits, labels, 3) == 0
    inf = np.full((12, 3), np.inf, np.float32)
    assert topk_correct(inf, labels, 1) == 0 and topk_correct(inf, labels, 3) == 0


def test_random_logits_with_some_bad_rows_against_the_reference():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((100, 20))
    labels = rng.integers(0, 20, 100)
    rows = rng.choice(100, 15, replace=False)
    logits[rows, rng.integers(0, 20, 15)] = rng.choice([np.nan, np.inf, -np.inf], 15)
    for k in (1, 5, 20):
        assert topk_correct(logits, labels, k) == stable_sort_topk_correct(logits, labels, k)
