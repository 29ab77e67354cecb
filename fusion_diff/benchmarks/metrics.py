"""Retrieval metrics of CIRR, FashionIQ and CIRCO, as pure tensor functions (percentages, batched).

All metrics start from a *relevance matrix*: ``relevant[q, j]`` is True when the item ranked at
position ``j`` for query ``q`` is a ground truth. ``ranked_relevance`` builds it from scores with one
tie rule for every benchmark: **ties count against the method** (a ground truth that scores exactly
as much as a non-ground-truth item is ranked after it), so a method that scores everything alike
gets no free hits. The reference code of the field sorts with ``argsort`` and breaks ties
arbitrarily; with continuous scores ties do not occur and both agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

CIRR_KS: tuple[int, ...] = (1, 5, 10, 50)
CIRR_SUBSET_KS: tuple[int, ...] = (1, 2, 3)
FASHIONIQ_KS: tuple[int, ...] = (10, 50)
CIRCO_KS: tuple[int, ...] = (5, 10, 25, 50)


def pad_ids(rows: Sequence[Sequence[int]], fill: int = -1) -> torch.Tensor:
    """``[Q, max_len]`` long tensor of ragged integer rows, padded with ``fill`` (one scatter, no per-row tensors)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = max(int(lengths.max()) if len(rows) else 0, 1)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    out[torch.arange(width) < lengths.unsqueeze(1)] = torch.tensor([x for r in rows for x in r], dtype=torch.long)
    return out


def is_positive(ranked: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``[Q, K]`` bool: is ``ranked[q, j]`` (gallery index) one of ``positives[q]`` (padded with -1)?"""
    hit = ranked.unsqueeze(-1) == positives.unsqueeze(1)
    return (hit & (positives.unsqueeze(1) >= 0)).any(-1)


def ranked_relevance(scores: torch.Tensor, relevant: torch.Tensor, complete: bool = True) -> torch.Tensor:
    """Relevance in ranking order: sort each row by score, descending, ties against the method.

    ``scores``/``relevant`` are ``[Q, M]`` (any order). Within a group of equal scores the
    non-relevant items come first. With ``complete=False`` the rows are a top-M cut of a larger
    gallery: a ground truth scoring exactly as the last retrieved item could be preceded by unseen
    tied items, so it counts as not retrieved in the list.
    """
    order = torch.argsort(relevant.to(torch.int8), dim=1, stable=True)  # non-relevant first ...
    scores, relevant = scores.gather(1, order), relevant.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # ... then by score, keeping that order in ties
    scores, relevant = scores.gather(1, order), relevant.gather(1, order)
    if not complete:
        relevant = relevant & (scores > scores[:, -1:])
    return relevant


def recall_at_k(relevant: torch.Tensor, ks: Sequence[int], prefix: str = "R") -> dict[str, float]:
    """Recall@K in %: the share of queries with a ground truth among the first K ranked items.

    With one ground truth per query (CIRR, FashionIQ) this is the usual hit rate. A K beyond the
    list length uses the whole list.
    """
    hits = relevant.cumsum(1).clamp(max=1)
    return {f"{prefix}@{k}": float(hits[:, min(k, relevant.shape[1]) - 1].float().mean() * 100) for k in ks}


def average_precision_at_k(relevant: torch.Tensor, num_positives: torch.Tensor, k: int) -> torch.Tensor:
    """AP@K per query (CIRCO's definition): ``sum_{j<=K} P@j * rel_j / min(#gt, K)``, in [0, 1].

    ``P@j`` is the precision of the first ``j`` items; normalising by ``min(#gt, K)`` makes a
    perfect top-K score 1 even when a query has more ground truths than K.
    """
    k = min(k, relevant.shape[1])
    rel = relevant[:, :k].float()
    precision = rel.cumsum(1) / torch.arange(1, k + 1, dtype=torch.float32)
    return (precision * rel).sum(1) / num_positives.clamp(max=k).clamp(min=1).float()


def mean_average_precision(
    relevant: torch.Tensor, num_positives: torch.Tensor, ks: Sequence[int] = CIRCO_KS
) -> dict[str, float]:
    """mAP@K in %: the mean over queries of ``average_precision_at_k``."""
    return {f"mAP@{k}": float(average_precision_at_k(relevant, num_positives, k).mean() * 100) for k in ks}


def cirr_metrics(relevant: torch.Tensor, subset_relevant: torch.Tensor | None = None) -> dict[str, float]:
    """CIRR: Recall@1/5/10/50 over the split's gallery with the reference removed from the ranking,
    and Recall_subset@1/2/3 over the query's 6-image group with the reference removed (5 candidates);
    ``avg`` is (R@5 + Recall_subset@1) / 2, the summary number CIRR papers report.

    ``relevant`` ranks the gallery, ``subset_relevant`` ranks the group (both from ``ranked_relevance``).
    """
    out = recall_at_k(relevant, CIRR_KS)
    if subset_relevant is not None:
        out.update(recall_at_k(subset_relevant, CIRR_SUBSET_KS, prefix="Rsubset"))
        out["avg"] = (out["R@5"] + out["Rsubset@1"]) / 2
    return out


def fashioniq_metrics(relevant: torch.Tensor) -> dict[str, float]:
    """FashionIQ, one category: Recall@10/50 over the category's gallery (reference not removed)."""
    return recall_at_k(relevant, FASHIONIQ_KS)


def fashioniq_average(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per-category Recall@10/50 (keys ``"{category}/R@10"``), their means over categories
    (``"avg/R@10"``, ``"avg/R@50"``) and the mean of those two (``"avg"``), as the field reports."""
    out: dict[str, float] = {}
    for category, metrics in per_category.items():
        out.update({f"{category}/{name}": value for name, value in metrics.items()})
    for k in FASHIONIQ_KS:
        out[f"avg/R@{k}"] = sum(m[f"R@{k}"] for m in per_category.values()) / len(per_category)
    out["avg"] = sum(out[f"avg/R@{k}"] for k in FASHIONIQ_KS) / len(FASHIONIQ_KS)
    return out


def circo_metrics(relevant: torch.Tensor, num_positives: torch.Tensor) -> dict[str, float]:
    """CIRCO: mAP@5/10/25/50 over all ground truths of each query (see ``average_precision_at_k``)."""
    return mean_average_precision(relevant, num_positives, CIRCO_KS)
