"""Gallery indexes: exact top-K by chunked matrix products, or FAISS, with per-query exclusion.

Exclusion (CIRR removes the reference from its own ranking) never touches the score matrix: the
index returns the top ``k + e`` items (``e`` = most ids excluded for any query), the excluded
ones are masked in that small candidate list, and the best ``k`` of the rest are kept. That is
exact, because at most ``e`` of the top ``k + e`` can be excluded.

Multi-sample queries ``[Q, N, d]`` (several sampled embeddings per composed query) are scored with a
``SampleScoring``: each gallery item's ``N`` similarities reduce to one score (max, log-sum-exp or mean).
Exact search computes them as one matmul per block (``(b*N) x chunk``) and reduces before the top-k;
approximate backends search the top ``k`` of every sample, take the union per query and rescore it
exactly. The union holds the exact top ``k`` under ``max`` (an item in the top ``k`` by its best sample
is in that sample's own top ``k``); under ``lse`` / ``mean`` it is an approximation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from fusion_diff.errors import ConfigError, DataError
from fusion_diff.retrieval.items import IdColumn
from fusion_diff.retrieval.method import SampleScoring
from fusion_diff.utils.checks import check_top_k, require_finite
from fusion_diff.utils.registry import Registry

T = TypeVar("T")
NAN_QUERIES = (
    "Recompute them (check the sampling settings, e.g. a NaN guidance scale): NaN/inf queries score NaN against "
    "every gallery item and rank it arbitrarily."
)
RESCORE_ROWS = 65536  # candidate vectors gathered at once when rescoring multi-sample candidates (~64 MB at d=256)


@dataclass
class SearchResult:
    """Top-k per query: ``scores`` / ``indices`` are ``[Q, k]`` (``-inf`` / ``-1`` past the valid items);
    ``items`` the hits' metadata (id, path, caption) where the index stores any."""

    scores: torch.Tensor
    indices: torch.Tensor
    ids: list[list[str]]
    items: list[list[dict]] | None = None

    def rows(self, block: slice) -> SearchResult:
        """The results of the queries in ``block``."""
        return SearchResult(self.scores[block], self.indices[block], self.ids[block],
                            None if self.items is None else self.items[block])  # fmt: skip

    def top(self, k: int) -> SearchResult:
        """The first ``k`` hits of every query."""
        return SearchResult(self.scores[:, :k], self.indices[:, :k], [row[:k] for row in self.ids],
                            None if self.items is None else [row[:k] for row in self.items])  # fmt: skip

    @staticmethod
    def concat(parts: Sequence[SearchResult]) -> SearchResult:
        """Blocks of queries' results (as ``rows`` cut them) back into one, in order."""
        items = None if any(p.items is None for p in parts) else [row for p in parts for row in p.items]
        return SearchResult(torch.cat([p.scores for p in parts]), torch.cat([p.indices for p in parts]),
                            [row for p in parts for row in p.ids], items)  # fmt: skip


class _Index:
    """What every backend shares: ids, query checks, exclusion and candidate scoring."""

    def __init__(self, embeddings: torch.Tensor, ids: Sequence[str]) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
            raise DataError(
                f"A gallery needs [len(ids), dim] embeddings, got {tuple(embeddings.shape)} for {len(ids)} ids."
            )
        if isinstance(ids, IdColumn):  # an index folder's memory-mapped ids: looked up, never copied into a dict
            self.ids: Sequence[str] = ids
            self.position: Mapping[str, int] = ids.positions()
        else:
            self.ids = list(ids)
            self.position = {item: row for row, item in enumerate(self.ids)}
            if len(self.position) != len(self.ids):
                raise DataError(f"Gallery ids must be unique; {len(self.ids) - len(self.position)} are repeated.")
        self.embeddings = embeddings if embeddings.dtype == torch.float32 else embeddings.float()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def _check_queries(self, queries: torch.Tensor, scoring: SampleScoring | None = None) -> torch.Tensor:
        if queries.ndim not in (2, 3) or queries.shape[-1] != self.dim:
            raise DataError(
                f"Queries of shape {tuple(queries.shape)} do not match the {self.dim}-d gallery: queries and gallery "
                "must come from the same embedder."
            )
        require_finite(queries, "Search queries", NAN_QUERIES)
        if queries.ndim == 3 and scoring is None:
            raise ConfigError(
                f"Queries of shape {tuple(queries.shape)} hold several samples per query; pass scoring=SampleScoring(...) "
                "to say how their similarities reduce (or average them into [Q, d])."
            )
        return queries.detach().to(self.embeddings.device, torch.float32).contiguous()

    def _exclusion(self, exclude: Sequence[Sequence[str]] | None, num_queries: int) -> torch.Tensor:
        """``[Q, e]`` gallery rows to drop per query, ``-1``-padded; ids not in the gallery are ignored."""
        if exclude is None:
            return torch.empty(num_queries, 0, dtype=torch.long)
        if len(exclude) != num_queries:
            raise ValueError(f"exclude needs one list per query: {len(exclude)} lists for {num_queries} queries.")
        found = regroup(self._rows([item for items in exclude for item in items]), map(len, exclude))  # one lookup
        rows = [[row for row in part if row >= 0] for part in found]
        width = max(map(len, rows), default=0)
        return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long).reshape(
            num_queries, width
        )

    def _rows(self, ids: Sequence[str]) -> list[int]:
        """Gallery rows of ``ids`` (``-1`` where absent): one binary search on an index folder's id column."""
        if isinstance(self.ids, IdColumn):
            return self.ids.rows(ids).tolist()
        return [self.position.get(item, -1) for item in ids]

    def _topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _topk_samples(self, queries: torch.Tensor, k: int, scoring: SampleScoring) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` for ``[Q, N, d]`` queries: every sample's top ``k``, merged per query, rescored exactly
        (in blocks of queries, so the gathered candidate vectors stay within ``RESCORE_ROWS`` rows)."""
        q, n, d = queries.shape
        _, candidates = self._topk(queries.reshape(q * n, d), k)
        candidates = unique_rows(candidates.reshape(q, -1).cpu())
        block = max(1, RESCORE_ROWS // candidates.shape[1])
        scores = torch.cat(
            [self._score_rows(queries[i : i + block], candidates[i : i + block], scoring) for i in range(0, q, block)]
        )
        scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
        return scores, candidates.gather(1, order)

    def _score_rows(
        self, queries: torch.Tensor, rows: torch.Tensor, scoring: SampleScoring | None = None
    ) -> torch.Tensor:
        """``[Q, m]`` scores of each query (``[Q, d]``, or ``[Q, N, d]`` reduced by ``scoring``) against its own
        gallery ``rows [Q, m]`` (``-1`` = padding, scored ``-inf``)."""
        flat = rows.clamp(min=0).flatten()
        if self.embeddings.device.type == "cpu":  # numpy's gather from a memory map: ~2x torch's index_select
            candidates = torch.from_numpy(np.take(self.embeddings.numpy(), flat.numpy(), axis=0))
        else:
            candidates = self.embeddings.index_select(0, flat.to(self.embeddings.device))
        candidates = candidates.view(*rows.shape, self.dim)
        if queries.ndim == 3:
            scores = scoring.reduce(torch.einsum("qnd,qmd->qnm", queries, candidates), dim=1)
        else:
            scores = torch.einsum("qd,qmd->qm", queries, candidates)
        return scores.cpu().masked_fill(rows.cpu() < 0, float("-inf"))

    def search(
        self,
        queries: torch.Tensor,
        k: int = 50,
        exclude: Sequence[Sequence[str]] | None = None,
        scoring: SampleScoring | None = None,
    ) -> SearchResult:
        """Top-``k`` gallery items by inner product (cosine for unit-norm inputs), ``exclude[q]`` removed.

        ``queries``: ``[Q, d]``, or ``[Q, N, d]`` with ``scoring`` reducing each item's ``N`` similarities.
        ``k`` must be >= 1; a gallery smaller than ``k`` returns all of its items (``SearchResult`` is then
        ``len(self)`` wide)."""
        k = check_top_k(k)
        queries = self._check_queries(queries, scoring)
        banned = self._exclusion(exclude, queries.shape[0])
        k = min(k, len(self))
        fetch = min(k + banned.shape[1], len(self))
        if queries.ndim == 3:
            scores, indices = self._topk_samples(queries, fetch, scoring)
        else:
            scores, indices = self._topk(queries, fetch)
        scores, indices = scores.cpu(), indices.cpu()
        scores = scores.masked_fill(indices < 0, float("-inf"))
        if banned.numel():
            hit = (indices.unsqueeze(-1) == banned.unsqueeze(1)).any(-1)
            scores = scores.masked_fill(hit, float("-inf"))
        scores, order = scores.topk(k, dim=1)
        indices = indices.gather(1, order).masked_fill(scores == float("-inf"), -1)
        return SearchResult(scores=scores, indices=indices, ids=self._ids_of(indices))

    def _ids_of(self, indices: torch.Tensor) -> list[list[str]]:
        """Each row's ids (``-1`` padding dropped), looked up in one gather rather than one call per hit."""
        valid = indices >= 0
        rows = indices[valid].numpy()
        flat = self.ids.take(rows) if isinstance(self.ids, IdColumn) else [self.ids[j] for j in rows.tolist()]
        return regroup(flat, valid.sum(1).tolist())

    def scores_for(
        self,
        queries: torch.Tensor,
        candidate_ids: Sequence[Sequence[str]],
        scoring: SampleScoring | None = None,
    ) -> torch.Tensor:
        """``[Q, m]`` scores of each query against its own candidates (CIRR's subset recall); ragged rows pad ``-inf``.

        ``queries [Q, N, d]`` need ``scoring``, as in ``search``."""
        queries = self._check_queries(queries, scoring)
        if len(candidate_ids) != queries.shape[0]:
            raise ValueError(f"candidate_ids needs one list per query: {len(candidate_ids)} for {queries.shape[0]}.")
        absent = sorted({item for items in candidate_ids for item in items if item not in self.position})
        if absent:
            raise DataError(
                f"{len(absent)} candidate ids are not in the gallery (e.g. {absent[:5]}). Embed them into the gallery."
            )
        width = max(map(len, candidate_ids), default=0)
        rows = torch.tensor(
            [[self.position[i] for i in items] + [-1] * (width - len(items)) for items in candidate_ids],
            dtype=torch.long,
        )
        return self._score_rows(queries, rows.reshape(queries.shape[0], width), scoring)


FAISS_KNN_MIN_QUERIES = 256  # from 256 queries on, faiss.knn beats torch on CPU (measured at 1 thread)


class GalleryIndex(_Index):
    """Exact search: blocks of queries times chunks of the gallery, a running top-k merged per chunk.

    Memory stays at ``query_block × chunk_size`` scores whatever the gallery size; the only Python
    loops are over blocks and chunks, never over items. The search runs on the gallery tensor's
    device (move ``embeddings`` to CUDA for large galleries); results come back on CPU. On CPU, for
    ``FAISS_KNN_MIN_QUERIES`` queries or more, the same blocked product and top-k run inside FAISS
    (``faiss.knn``: BLAS blocks, a heap per query, straight on the memory map without a copy), 15-20% less
    CPU time than matmul + ``topk`` in torch; with fewer queries faiss.knn is several times slower
    (100 x 200k: 3.8 vs 0.5 CPU-s, 1 thread), so they stay in torch.
    """

    def __init__(
        self, embeddings: torch.Tensor, ids: Sequence[str], chunk_size: int = 32768, query_block: int = 1024
    ) -> None:
        super().__init__(embeddings, ids)
        self.chunk_size = chunk_size
        self.query_block = query_block

    def _topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.embeddings.device.type == "cpu" and queries.shape[0] >= FAISS_KNN_MIN_QUERIES:
            import faiss

            gallery = np.ascontiguousarray(self.embeddings.numpy())  # a memory map stays mapped (no copy)
            scores, indices = faiss.knn(queries.numpy(), gallery, k, metric=faiss.METRIC_INNER_PRODUCT)
            return torch.from_numpy(scores), torch.from_numpy(indices)
        return self._chunked_topk(queries, k, self.query_block, lambda block, chunk: block @ chunk.T)

    def _topk_samples(self, queries: torch.Tensor, k: int, scoring: SampleScoring) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact: ``(b*N) x chunk`` similarities in one matmul, reduced over the samples, then the running top-k."""
        block = max(1, self.query_block // queries.shape[1])  # the same score memory as single queries
        return self._chunked_topk(queries, k, block, lambda b, chunk: scoring.reduce(b @ chunk.T, dim=1))

    def _chunked_topk(
        self,
        queries: torch.Tensor,
        k: int,
        query_block: int,
        score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Running top-``k`` over gallery chunks; ``score(query block, gallery chunk)`` gives ``[b, chunk]``."""
        all_scores, all_indices = [], []
        for q0 in range(0, queries.shape[0], query_block):
            block = queries[q0 : q0 + query_block]
            best_scores = block.new_empty(block.shape[0], 0)
            best_indices = torch.empty(block.shape[0], 0, dtype=torch.long, device=block.device)
            for g0 in range(0, len(self), self.chunk_size):
                scores = score(block, self.embeddings[g0 : g0 + self.chunk_size])
                top_scores, top_indices = scores.topk(min(k, scores.shape[1]), dim=1)
                merged_scores = torch.cat([best_scores, top_scores], dim=1)
                merged_indices = torch.cat([best_indices, top_indices + g0], dim=1)
                best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
                best_indices = merged_indices.gather(1, order)
            all_scores.append(best_scores)
            all_indices.append(best_indices)
        return torch.cat(all_scores), torch.cat(all_indices)


class FaissGalleryIndex(_Index):
    """FAISS search with the same interface; ``factory`` is a FAISS index-factory string.

    ``"Flat"`` (default) is exact inner product (``IndexFlatIP``); ``"IVF1024,Flat"`` or
    ``"HNSW32"`` trade recall for speed on large galleries, tuned by ``search_params`` (e.g.
    ``"nprobe=32"`` or ``"efSearch=128"``).
    """

    def __init__(
        self, embeddings: torch.Tensor, ids: Sequence[str], factory: str = "Flat", search_params: str | None = None
    ) -> None:
        super().__init__(embeddings, ids)
        try:
            import faiss
        except ImportError as err:
            raise ConfigError(
                "The FAISS backend needs faiss: pip install 'fusion-diff[faiss]' (or use backend='exact')."
            ) from err
        data = np.ascontiguousarray(self.embeddings.cpu().numpy())
        self.factory = factory
        self.index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not self.index.is_trained:
            self.index.train(data)
        self.index.add(data)
        if search_params:
            faiss.ParameterSpace().set_index_parameters(self.index, search_params)

    def _topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, indices = self.index.search(np.ascontiguousarray(queries.cpu().numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(indices).long()


def regroup(flat: Iterable[T], sizes: Iterable[int]) -> list[list[T]]:
    """``flat`` cut into consecutive lists of ``sizes``: the per-query rows of one batched lookup."""
    values = iter(flat)
    return [list(itertools.islice(values, n)) for n in sizes]


def unique_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows [Q, m]`` of gallery indices with repeats within a row (and ``-1`` padding) turned into ``-1``."""
    ordered, _ = rows.sort(dim=1)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return ordered.masked_fill(repeat, -1)


def build_index(embeddings: torch.Tensor, ids: Sequence[str], backend: str = "exact", **kwargs) -> _Index:
    """A gallery index by backend name: ``"exact"`` (GalleryIndex) or ``"faiss"`` (FaissGalleryIndex).

    The gallery's vectors must be finite (one pass over them): a NaN row would score NaN for every query."""
    require_finite(embeddings, "Gallery embeddings", "Re-embed those items (delete the cache and rebuild it).")
    return SEARCH_BACKENDS.load(backend)(embeddings, ids, **kwargs)


SEARCH_BACKENDS = Registry(
    "search backend",
    {"exact": (GalleryIndex, "chunked matrix products (faiss.knn on CPU)"), "faiss": (FaissGalleryIndex, "an index")},
)
