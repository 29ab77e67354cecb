"""Metric definitions against hand-computed values (ties, absent targets, several ground truths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_diff.benchmarks import metrics as M


def _rel(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_recall_hand_computed_with_absent_target():
    # q0: target first; q1: target 4th; q2: target not in the top-5 at all.
    relevant = _rel([[1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
    out = M.recall_at_k(relevant, (1, 3, 4, 5))
    assert out == pytest.approx({"R@1": 100 / 3, "R@3": 100 / 3, "R@4": 200 / 3, "R@5": 200 / 3})


def test_recall_k_beyond_list_uses_whole_list():
    assert M.recall_at_k(_rel([[0, 1], [0, 0]]), (50,)) == {"R@50": 50.0}


def test_ties_count_against_the_method():
    # The target (column 2) ties with a non-target at 0.5: it ranks third, not second.
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    relevant = M.ranked_relevance(scores, _rel([[0, 0, 1, 0]]))
    assert relevant.tolist() == [[False, False, True, False]]
    assert M.recall_at_k(relevant, (1, 2, 3)) == {"R@1": 0.0, "R@2": 0.0, "R@3": 100.0}
    # Given first in the input, a tied target still goes after the tied non-target.
    relevant = M.ranked_relevance(torch.tensor([[0.5, 0.5, 0.9]]), _rel([[1, 0, 0]]))
    assert relevant.tolist() == [[False, False, True]]


def test_constant_scores_give_no_free_hit():
    # A method that scores every candidate alike ranks the target last (5 subset candidates).
    relevant = M.ranked_relevance(torch.zeros(2, 5), _rel([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]]))
    assert M.recall_at_k(relevant, (1, 2, 3), prefix="Rsubset") == {
        "Rsubset@1": 0.0,
        "Rsubset@2": 0.0,
        "Rsubset@3": 0.0,
    }


def test_tie_at_the_cut_of_an_incomplete_list():
    # Top-3 of a larger gallery: a ground truth tied with the last retrieved score may have unseen
    # tied items before it, so it is not counted as retrieved; a strictly better one is.
    scores = torch.tensor([[0.9, 0.8, 0.8], [0.9, 0.8, 0.7]])
    relevant = _rel([[0, 1, 0], [0, 1, 0]])
    assert M.ranked_relevance(scores, relevant, complete=False).tolist() == [
        [False, False, False],
        [False, True, False],
    ]
    assert M.ranked_relevance(scores, relevant, complete=True).tolist() == [[False, False, True], [False, True, False]]


def test_sorting_by_score():
    scores = torch.tensor([[0.1, 0.7, 0.3]])
    assert M.ranked_relevance(scores, _rel([[1, 0, 0]])).tolist() == [[False, False, True]]


def test_is_positive_never_matches_padding():
    ranked = torch.tensor([[3, -1, 5], [2, 4, -1]])  # -1: past the valid items of a search result
    positives = M.pad_ids([[5], []])  # second query: its target is not in the gallery
    assert positives.tolist() == [[5], [-1]]
    assert M.is_positive(ranked, positives).tolist() == [[False, False, True], [False, False, False]]


def test_average_precision_one_ground_truth():
    relevant = _rel([[0, 0, 1, 0, 0, 0]])
    one = torch.tensor([1])
    assert M.average_precision_at_k(relevant, one, 5).item() == pytest.approx(1 / 3)
    assert M.average_precision_at_k(relevant, one, 2).item() == 0.0


def test_average_precision_several_ground_truths():
    # 3 ground truths found at ranks 1, 3 and 6: P@1 = 1, P@3 = 2/3, P@6 = 1/2.
    relevant = _rel([[1, 0, 1, 0, 0, 1, 0, 0, 0, 0]])
    three = torch.tensor([3])
    assert M.average_precision_at_k(relevant, three, 2).item() == pytest.approx(1 / 2)  # / min(3, 2)
    assert M.average_precision_at_k(relevant, three, 5).item() == pytest.approx((1 + 2 / 3) / 3)
    assert M.average_precision_at_k(relevant, three, 10).item() == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    # More ground truths than K: a perfect top-K scores 1.
    assert M.average_precision_at_k(torch.ones(1, 5, dtype=torch.bool), torch.tensor([14]), 5).item() == pytest.approx(
        1.0
    )


def test_map_matches_the_official_circo_formula():
    """CIRCO's server code (numpy, per query) on random rankings gives the same mAP@K."""
    rng = np.random.default_rng(0)
    rankings, gts = [], []
    for _ in range(40):
        gt = rng.choice(200, size=rng.integers(1, 15), replace=False)
        rankings.append(rng.permutation(200)[:50])
        gts.append(gt)
    expected = {}
    for k in M.CIRCO_KS:
        aps = []
        for pred, gt in zip(rankings, gts):
            labels = np.isin(pred, gt)
            precisions = np.cumsum(labels) * labels / np.arange(1, len(pred) + 1)
            aps.append(np.sum(precisions[:k]) / min(len(gt), k))
        expected[f"mAP@{k}"] = float(np.mean(aps) * 100)
    relevant = M.is_positive(torch.tensor(np.stack(rankings)), M.pad_ids([g.tolist() for g in gts]))
    got = M.circo_metrics(relevant, torch.tensor([len(g) for g in gts]))
    assert got == pytest.approx(expected)


def test_cirr_metrics_names_and_average():
    relevant = _rel([[0] * 4 + [1] + [0] * 45, [1] + [0] * 49])  # ranks 5 and 1
    subset = _rel([[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]])  # subset ranks 2 and 5
    out = M.cirr_metrics(relevant, subset)
    assert out["R@1"] == 50.0 and out["R@5"] == 100.0 and out["R@50"] == 100.0
    assert out["Rsubset@1"] == 0.0 and out["Rsubset@2"] == 50.0 and out["Rsubset@3"] == 50.0
    assert out["avg"] == pytest.approx((100.0 + 0.0) / 2)


def test_fashioniq_average_over_categories():
    per_category = {
        "dress": M.fashioniq_metrics(_rel([[1] + [0] * 49, [0] * 20 + [1] + [0] * 29])),  # R@10 50, R@50 100
        "shirt": {"R@10": 20.0, "R@50": 40.0},
        "toptee": {"R@10": 30.0, "R@50": 60.0},
    }
    out = M.fashioniq_average(per_category)
    assert out["dress/R@10"] == 50.0 and out["dress/R@50"] == 100.0
    assert out["avg/R@10"] == pytest.approx((50 + 20 + 30) / 3)
    assert out["avg/R@50"] == pytest.approx((100 + 40 + 60) / 3)
    assert out["avg"] == pytest.approx(((50 + 20 + 30) / 3 + (100 + 40 + 60) / 3) / 2)
