"""Re-ranking a search's first hits with a method's own scorer (Fusion-Diff: the diffusion loss as a likelihood).

A method that re-ranks has ``rerank_top_k`` > 0 and ``rerank_scores(context, candidates, scores)``: given the
first ``K`` hits of each query (their gallery embeddings ``[Q, K, d]`` and first-stage scores ``[Q, K]``) it
returns new scores, higher = better. Only those ``K`` hits move; the rest of the ranking is the first stage's.
The evaluator and ``ComposedRetriever.search`` both call ``rerank_hits``, so a method ranks the same way in a
benchmark table and in a served search.
"""

from __future__ import annotations

from typing import Any

import torch

from fusion_diff.errors import ConfigError
from fusion_diff.retrieval.index import SearchResult
from fusion_diff.retrieval.method import QueryContext


def rerank_depth(method: Any) -> int:
    """How many first hits ``method`` re-ranks (0: none)."""
    return int(getattr(method, "rerank_top_k", 0) or 0)


def index_embeddings(index: Any) -> torch.Tensor | None:
    """The gallery embeddings a local index keeps (a persisted index: its backend's); None for a remote one."""
    return getattr(getattr(index, "backend", index), "embeddings", None)


def standardize_rows(scores: torch.Tensor) -> torch.Tensor:
    """Each row to zero mean and unit spread (over its finite entries), so that two scorers can be added."""
    finite = torch.isfinite(scores)
    filled = torch.where(finite, scores, torch.zeros_like(scores))
    count = finite.sum(1, keepdim=True).clamp(min=1)
    mean = filled.sum(1, keepdim=True) / count
    spread = (torch.where(finite, scores - mean, torch.zeros_like(scores)).pow(2).sum(1, keepdim=True) / count).sqrt()
    return torch.where(finite, (scores - mean) / spread.clamp(min=1e-6), scores)


def rerank_hits(
    method: Any,
    context: QueryContext,
    found: SearchResult,
    embeddings: torch.Tensor | None,
    position_scores: bool = False,
) -> SearchResult:
    """``found`` with each row's first ``rerank_depth(method)`` hits re-ordered by ``method.rerank_scores``.

    ``embeddings`` are the gallery rows ``found.indices`` point into; padding (index -1) stays last. Each hit keeps
    its own first-stage score, or with ``position_scores`` each position keeps its score while the hits move between
    them: what a metric reading the scores needs (the re-ranked order, ties and cut-offs as before).
    """
    depth = min(rerank_depth(method), found.indices.shape[1])
    if depth < 2:
        return found
    if embeddings is None:
        raise ConfigError(
            f"{method.name}: rerank_top_k needs the gallery's embeddings next to the index (an exact or FAISS index "
            "folder); this index keeps them remote (Qdrant). Search without rerank_top_k, or index the gallery locally."
        )
    top = found.indices[:, :depth]
    valid = top >= 0
    rows = top.clamp(min=0).flatten().to(embeddings.device)
    candidates = embeddings.index_select(0, rows).view(*top.shape, -1).float().cpu()
    first = torch.where(valid, found.scores[:, :depth], torch.full_like(found.scores[:, :depth], float("-inf")))
    new = method.rerank_scores(context, candidates, first)
    new = torch.where(valid, new, torch.full_like(new, float("-inf")))
    order = torch.argsort(new, dim=1, descending=True, stable=True)
    indices = found.indices.clone()
    indices[:, :depth] = top.gather(1, order)

    def moved(rows: list[list[Any]]) -> list[list[Any]]:  # rows hold the valid hits only (padding is last)
        return [[row[j] for j in perm if j < len(row)] + row[depth:] for row, perm in zip(rows, order.tolist())]

    scores = found.scores
    if not position_scores:
        scores = scores.clone()
        scores[:, :depth] = first.gather(1, order)
    return SearchResult(
        scores=scores,
        indices=indices,
        ids=moved(found.ids),
        items=None if found.items is None else moved(found.items),
    )
