"""The evaluation engine: embed (cached), build query contexts, call the method, rank, score.

For a benchmark split it

1. embeds every usable image ``f(I)`` once per backbone into an ``EmbeddingCache`` (resumable);
2. when a captioner is configured, captions the images it needs through a ``CaptionCache`` and
   embeds them fused ``f(I, caption)`` (cached too): gallery items when the method's gallery mode
   is ``fused``, references always (the method may use them as control). Annotation captions never
   enter here: only oracle rows read ground-truth captions, on their own;
3. embeds the modification texts (cached by content), builds ``QueryContext`` batches and calls
   the method (FashionIQ: both caption orders in one batch, then averaged);
4. ranks with the gallery index (the reference removed where the protocol says so) and computes
   the benchmark's metrics, ties counted against the method.

Under ``accelerate launch -m fusion_diff.cli eval ...`` every process runs ``Evaluator.prepare``: steps 1-3's
embeddings and captions are cut into the same numbered units whatever the number of processes and each process
fills its own (``fusion_diff.utils.sharding``), so the caches equal a single process's; the main process then
scores the methods alone, reading them.

Every result carries the full protocol: benchmark, split, backbone, gallery mode, captioner,
method settings, FashionIQ caption joining, CIRCO ``shared_concept`` use, missing images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fusion_diff.benchmarks import metrics as M
from fusion_diff.benchmarks.fashioniq import check_caption_order
from fusion_diff.benchmarks.report import EvalResult
from fusion_diff.benchmarks.spec import benchmark_spec
from fusion_diff.benchmarks.types import BenchmarkData, CompositionQuery
from fusion_diff.captioning.base import Captioner, identity_digest
from fusion_diff.captioning.job import caption_sharded, prepare_captioner
from fusion_diff.captioning.modes import fuse_with_captions, require_captioner
from fusion_diff.captioning.retrieval import RetrievalCaptioner, text_id
from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.embedding.job import embed_sharded
from fusion_diff.errors import ConfigError, DataError
from fusion_diff.retrieval.index import SearchResult, build_index
from fusion_diff.retrieval.method import QueryContext, RetrievalMethod, run_method, sample_scoring
from fusion_diff.retrieval.rerank import rerank_depth, rerank_hits
from fusion_diff.utils.paths import cache_dir
from fusion_diff.utils.sharding import Processes

IMAGE_TABLE = "image_table"  # QueryContext.extra key: an ``EmbeddingTable`` of f(I) for every usable image
TOP_K = 50  # the longest ranking any metric or submission reads
@dataclass
class EmbeddingTable:
    """Embeddings of a set of ids, looked up in bulk (one gather, no loop over embeddings)."""

    ids: list[str]
    embeds: torch.Tensor

    def __post_init__(self) -> None:
        self._row = {item: row for row, item in enumerate(self.ids)}

    def lookup(self, ids: Sequence[str]) -> torch.Tensor:
        absent = [i for i in ids if i not in self._row]
        if absent:
            raise DataError(f"no embedding for {len(absent)} ids (first: {absent[:3]}): missing images?")
        return self.embeds.index_select(0, torch.tensor([self._row[i] for i in ids], dtype=torch.long))


def modification_texts(
    queries: Sequence[CompositionQuery], benchmark: str, fiq_order: str = "both", circo_shared_concept: bool = False
) -> tuple[list[str], list[int]]:
    """The text of each query row and the query it belongs to (the benchmark's spec decides: FashionIQ ``both``
    gives two rows per query, forward rows first; CIRCO with ``circo_shared_concept`` names the concept)."""
    return benchmark_spec(benchmark).texts(queries, fiq_order=fiq_order, circo_shared_concept=circo_shared_concept)


class Evaluator:
    """Evaluates methods on the units of one benchmark split (one per FashionIQ category, else one).

    Embeddings are cached on disk under ``cache_root`` (default ``cache_dir("eval")``), keyed by
    backbone identity, captioner identity and the image set, so a second method (or a second run)
    re-embeds nothing. Each cache is written in numbered units of ``chunk_size`` items (the unit of
    sharding across ``processes`` in ``prepare``, and of resumption).
    """

    def __init__(
        self,
        data: BenchmarkData | Sequence[BenchmarkData],
        embedder: JointEmbedder,
        *,
        captioner: Captioner | None = None,
        cache_root: str | Path | None = None,
        fashioniq_caption_order: str = "both",
        circo_shared_concept: bool = False,
        index_backend: str = "exact",
        batch_size: int = 64,
        query_batch_size: int | None = None,
        progress: bool = True,
        device: str = "cpu",
        chunk_size: int = 4096,
        processes: Processes | None = None,
    ) -> None:
        self.units = [data] if isinstance(data, BenchmarkData) else list(data)
        if not self.units or len({(u.benchmark, u.split) for u in self.units}) != 1:
            raise ConfigError("An Evaluator takes the units of exactly one benchmark split.")
        self.benchmark, self.split = self.units[0].benchmark, self.units[0].split
        check_caption_order(fashioniq_caption_order)
        self.embedder = embedder
        self.captioner = captioner
        self.cache_root = Path(cache_root) if cache_root is not None else cache_dir("eval")
        self.fiq_order = fashioniq_caption_order
        self.circo_shared_concept = circo_shared_concept
        self.index_backend = index_backend
        self.batch_size = batch_size
        self.query_batch_size = query_batch_size  # None: all queries in one call (methods batch internally)
        self.progress = progress
        self.device = device  # where the exact gallery search runs (faiss searches on the CPU)
        self.chunk_size = chunk_size
        self.processes = processes or Processes.single()  # the processes that share ``prepare``
        self._filling = Processes.single()  # who fills a cache now: every process inside ``prepare``, else this one
        self._backbone_key = identity_digest(embedder.identity.as_dict())
        self._image_tables: dict[str, EmbeddingTable] = {}

    # ------------------------------------------------------------------ embeddings
    def _unit_dir(self, unit: BenchmarkData) -> Path:
        return self.cache_root / f"{unit.benchmark}-{unit.dataset_key}" / self._backbone_key

    def _identity(self, kind: str, **extra: Any) -> dict[str, Any]:
        return {**self.embedder.identity.as_dict(), "kind": kind, **extra}

    def image_table(self, unit: BenchmarkData) -> EmbeddingTable:
        """``f(I)`` of every usable image of ``unit`` (gallery and references), cached on disk and in memory."""
        key = f"{unit.name}|{unit.dataset_key}"
        if key not in self._image_tables:
            missing = set(unit.missing)
            ids = [i for i in unit.image_paths if i not in missing]
            embeds = self._fill(
                self._unit_dir(unit) / "image",
                self._identity("image", dataset=unit.dataset_key),
                ids,
                [unit.image_paths[i] for i in ids],
                lambda images: self.embedder.embed_images(images, batch_size=self.batch_size),
            )
            self._image_tables[key] = EmbeddingTable(ids, embeds)
        return self._image_tables[key]

    def captions(self, unit: BenchmarkData, ids: Sequence[str]) -> list[list[str]]:
        """The configured captioner's candidate captions of ``ids`` (cached per captioner identity)."""
        assert self.captioner is not None
        identity = self.captioner.identity
        same_backbone = (
            isinstance(self.captioner, RetrievalCaptioner)
            and self.captioner.embedder.identity == self.embedder.identity
        )
        cache, _ = caption_sharded(
            self.captioner,
            ids,
            [unit.image_paths[i] for i in ids],
            self._unit_dir(unit).parent / f"captions-{identity_digest(identity)}.json",
            batch_size=self.batch_size,
            chunk_size=self.chunk_size,
            processes=self._filling,
            progress=self.progress,
            image_embeds=self.image_table(unit).lookup(ids) if same_backbone else None,
        )
        return cache.candidates(ids)

    def fused(self, unit: BenchmarkData, ids: Sequence[str]) -> torch.Tensor:
        """``f(I, caption)`` of ``ids`` (rows aligned, repeats allowed) with captioner captions, cached per
        backbone + captioner."""
        require_captioner("fused", self.captioner)
        assert self.captioner is not None
        ids = list(ids)
        candidates = dict(zip(ids, self.captions(unit, ids)))
        table = self.image_table(unit)
        identity = self._identity("fused", captioner=self.captioner.identity, dataset=unit.dataset_key)

        def embed(chunk: list[str]) -> torch.Tensor:
            image_embeds = table.lookup(chunk) if self.embedder.supports_late_fusion else None
            images = [unit.image_paths[i] for i in chunk]
            return fuse_with_captions(
                self.embedder, [candidates[i] for i in chunk], images, image_embeds, self.batch_size
            )

        root = self._unit_dir(unit) / f"fused-{identity_digest(self.captioner.identity)}"
        return self._fill(root, identity, ids, ids, embed)

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``f(T)`` of ``texts`` (rows aligned), cached by content per backbone."""
        return self._fill(
            self.cache_root / "texts" / self._backbone_key / "text",
            self._identity("text"),
            [text_id(t) for t in texts],
            list(texts),
            lambda chunk: self.embedder.embed_texts(chunk, batch_size=256),
            batch_size=256,
        )

    def _fill(
        self,
        root: Path,
        identity: dict[str, Any],
        ids: Sequence[str],
        items: Sequence[Any],
        embed_batch: Callable[[list[Any]], torch.Tensor],
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """The embeddings of ``ids`` (rows aligned, repeats allowed) from the cache at ``root``, the missing ones
        computed in numbered units by the filling processes (the same units, hence values, for 1 or N)."""
        cache, _ = embed_sharded(
            root, identity, ids, items, embed_batch, self.chunk_size, batch_size or self.batch_size,
            processes=self._filling, progress=self.progress,
        )  # fmt: skip
        return cache.load(ids)[1]

    def prepare(self, methods: Iterable[RetrievalMethod]) -> None:
        """Fill every cache that evaluating ``methods`` reads, shared by ``processes`` (every process calls this,
        then the main process alone calls ``evaluate``): ``f(I)`` of every usable image, the captions and
        ``f(I, caption)`` of the references (and of the gallery for a fused-gallery method), the query texts."""
        methods = list(methods)
        for method in methods:
            self._check(method)
        fused_gallery = any(method.gallery_mode == "fused" for method in methods)
        prepare_captioner(self.captioner, self.processes)
        self._filling = self.processes
        try:
            for unit in self.units:
                self.image_table(unit)
                missing = set(unit.missing)
                queries = [q for q in unit.queries if q.reference not in missing]
                if self.captioner is not None:
                    gallery = [g for g in unit.gallery if g not in missing] if fused_gallery else []
                    self.fused(unit, [q.reference for q in queries] + gallery)
                texts, _ = modification_texts(queries, unit.benchmark, self.fiq_order, self.circo_shared_concept)
                self.text_embeddings(texts)
        finally:
            self._filling = Processes.single()

    # ------------------------------------------------------------------ queries
    def contexts(
        self, method: RetrievalMethod, unit: BenchmarkData, queries: list[CompositionQuery]
    ) -> Iterator[tuple[slice, QueryContext]]:
        """The ``QueryContext`` of each block of query rows (FashionIQ ``both``: forward rows, then reversed)."""
        texts, rows = modification_texts(queries, unit.benchmark, self.fiq_order, self.circo_shared_concept)
        text_embeds = self.text_embeddings(texts)
        table = self.image_table(unit)
        references = [q.reference for q in queries]
        ref_images = table.lookup(references)
        ref_fused = self.fused(unit, references) if self.captioner is not None else None
        ref_captions = [c[0] for c in self.captions(unit, references)] if self.captioner is not None else None
        step = self.query_batch_size or len(rows)
        for start in tqdm(
            range(0, len(rows), step),
            desc=f"{method.name} on {unit.name}",
            disable=not self.progress,
            unit="batch",
        ):
            chunk = rows[start : start + step]
            index = torch.tensor(chunk, dtype=torch.long)
            yield slice(start, start + len(chunk)), QueryContext(
                embedder=self.embedder,
                query_ids=[queries[i].query_id for i in chunk],
                modification_texts=texts[start : start + len(chunk)],
                modification_text_embeds=text_embeds[start : start + len(chunk)],
                reference_image_embeds=ref_images.index_select(0, index),
                reference_image_paths=[unit.image_paths[references[i]] for i in chunk],
                reference_captions=[ref_captions[i] for i in chunk] if ref_captions is not None else None,
                reference_fused_embeds=ref_fused.index_select(0, index) if ref_fused is not None else None,
                extra={IMAGE_TABLE: table, "benchmark": unit.name},
            )

    def rerank(
        self, method: RetrievalMethod, unit: BenchmarkData, queries: list[CompositionQuery], found: SearchResult,
        gallery_embeds: torch.Tensor,
    ) -> SearchResult:  # fmt: skip
        """``found`` with each query's first hits re-ranked by the method (``retrieval.rerank``), block by block."""
        parts = [
            rerank_hits(method, context, found.rows(block), gallery_embeds, position_scores=True)
            for block, context in self.contexts(method, unit, queries)
        ]
        return SearchResult.concat(parts)

    def query_embeddings(
        self, method: RetrievalMethod, unit: BenchmarkData, queries: list[CompositionQuery]
    ) -> torch.Tensor:
        """``[Q, d]`` unit-norm query embeddings of ``method`` (FashionIQ ``both``: mean of the two orders); ``[Q, N, d]``
        for a multi-sample method (FashionIQ ``both``: the samples of both orders, ``2N``)."""
        out = [run_method(method, context) for _, context in self.contexts(method, unit, queries)]
        embeds = torch.cat(out)
        if embeds.shape[0] != len(queries):  # both FashionIQ orders
            first, second = embeds[: len(queries)], embeds[len(queries) :]
            if embeds.ndim == 3:  # multi-sample: every sample of either order scores the gallery
                return torch.cat([first, second], dim=1)
            embeds = first + second  # the mean of the normalised embeddings
        return F.normalize(embeds, dim=-1)

    # ------------------------------------------------------------------ scoring
    def evaluate(self, method: RetrievalMethod) -> EvalResult:
        """Run ``method`` on every unit and return metrics (FashionIQ: per category and averaged) + protocol."""
        self._check(method)
        per_unit: dict[str, dict[str, float]] = {}
        result = EvalResult(method=method.name, metrics={}, protocol={})
        dropped = 0
        for unit in self.units:
            metrics, ranking, subset_ranking, n_dropped = self._evaluate_unit(method, unit)
            per_unit[unit.subset or unit.name] = metrics
            result.rankings[unit.name] = ranking
            if subset_ranking:
                result.subset_rankings[unit.name] = subset_ranking
            dropped += n_dropped
        average = benchmark_spec(self.benchmark).average
        if average is not None:
            result.metrics = average(per_unit) if all(per_unit.values()) else {}
        else:
            result.metrics = next(iter(per_unit.values()))
        result.protocol = self.protocol(method, dropped)
        return result

    def _check(self, method: RetrievalMethod) -> None:
        """A method that needs captions (fused gallery or reference) fails, named, without a captioner."""
        require_captioner(method.gallery_mode, self.captioner, role="gallery")
        if getattr(method, "control_mode", None) == "fused":  # a method that insists on f(I_ref, caption)
            require_captioner("fused", self.captioner, role="reference")
        if rerank_depth(method) and self.benchmark == "fashioniq" and self.fiq_order == "both":
            raise ConfigError(
                f"{method.name}: rerank_top_k re-ranks with one modification text per query, but FashionIQ's 'both' "
                "caption order gives two; evaluate with --fiq-caption-order forward (or reverse)."
            )

    def _evaluate_unit(
        self, method: RetrievalMethod, unit: BenchmarkData
    ) -> tuple[dict[str, float], dict[str, list[str]], dict[str, list[str]], int]:
        missing = set(unit.missing)
        queries = [q for q in unit.queries if q.reference not in missing]
        if not queries:
            raise DataError(f"{unit.name}: every query's reference image is missing; nothing to evaluate.")
        gallery = [g for g in unit.gallery if g not in missing]
        if method.gallery_mode == "fused":
            gallery_embeds = self.fused(unit, gallery)
        else:
            gallery_embeds = self.image_table(unit).lookup(gallery)
        if self.index_backend == "exact":
            gallery_embeds = gallery_embeds.to(self.device)
        index = build_index(gallery_embeds, gallery, backend=self.index_backend)
        query_embeds = self.query_embeddings(method, unit, queries)

        k_fetch = min(max(TOP_K + 1, rerank_depth(method)), len(gallery))  # one past the cut: ties at the cut are seen
        exclude = [[q.reference] for q in queries] if unit.exclude_reference else None
        scoring = sample_scoring(method)
        found = index.search(query_embeds, k=k_fetch, exclude=exclude, scoring=scoring)
        if rerank_depth(method):
            found = self.rerank(method, unit, queries, found, gallery_embeds)
        ranking = {q.query_id: ids[:TOP_K] for q, ids in zip(queries, found.ids)}

        subset_ranking: dict[str, list[str]] = {}
        subset_relevant = None
        if unit.has_groups:
            candidates = [[m for m in q.group if m != q.reference and m not in missing] for q in queries]
            scores = index.scores_for(query_embeds, candidates, scoring)
            order = torch.argsort(scores, dim=1, descending=True, stable=True)
            subset_ranking = {
                q.query_id: [c[j] for j in row[: min(3, len(c))]]
                for q, c, row in zip(queries, candidates, order.tolist())
            }
            if unit.has_ground_truth:
                targets = M.pad_ids(
                    [[c.index(q.positives[0])] if q.positives[0] in c else [] for q, c in zip(queries, candidates)]
                )
                positions = torch.arange(scores.shape[1]).expand_as(scores)
                subset_relevant = M.ranked_relevance(scores, M.is_positive(positions, targets))

        metrics: dict[str, float] = {}
        if unit.has_ground_truth:
            positives = M.pad_ids([[index.position[p] for p in q.positives if p in index.position] for q in queries])
            relevant = M.ranked_relevance(
                found.scores, M.is_positive(found.indices, positives), complete=k_fetch >= len(gallery)
            )
            metrics = benchmark_spec(unit.benchmark).metrics(relevant, subset_relevant, queries)
        return metrics, ranking, subset_ranking, len(unit.queries) - len(queries)

    def protocol(self, method: RetrievalMethod, dropped: int) -> dict[str, Any]:
        """Everything that defines the numbers (recorded with every result)."""
        identity = self.embedder.identity
        protocol: dict[str, Any] = {
            "benchmark": self.benchmark,
            "split": self.split,
            "units": [u.summary() for u in self.units],
            "backbone": {**identity.as_dict(), "name": identity.describe()},
            "gallery_mode": method.gallery_mode,
            "captioner": self.captioner.describe() if self.captioner else None,
            "captioner_identity": self.captioner.identity if self.captioner else None,
            "reference_inputs": ["image", "fused"] if self.captioner else ["image"],
            "method": method.protocol(),
            "ranking": {
                "reference_removed": self.units[0].exclude_reference,
                "ties": "against the method (a ground truth tied with another item ranks after it)",
                "index": self.index_backend,
                "top_k": TOP_K,
            },
            "missing_images": sum(len(u.missing) for u in self.units),
            "queries_dropped": dropped,
            "queries_evaluated": sum(len(u.queries) for u in self.units) - dropped,
            **self._target_coverage(),
        }
        protocol.update(
            benchmark_spec(self.benchmark).protocol(fiq_order=self.fiq_order, circo_shared_concept=self.circo_shared_concept)
        )
        return protocol

    def _target_coverage(self) -> dict[str, Any]:
        """Evaluated queries that lost a ground truth to missing images, and the best score left to each metric
        (FashionIQ: the mean over categories, as the averaged metrics are)."""
        coverage = [unit.target_coverage() for unit in self.units]
        lost = sum(c.get("queries_missing_targets", 0) for c in coverage)
        if not lost:
            return {}
        best = {
            name: sum(c.get("best_possible", {}).get(name, 100.0) for c in coverage) / len(coverage)
            for name in dict.fromkeys(name for c in coverage for name in c.get("best_possible", {}))
        }
        return {"queries_missing_targets": lost, "best_possible": best}


def evaluate(
    method: RetrievalMethod, data: BenchmarkData | Sequence[BenchmarkData], embedder: JointEmbedder, **options: Any
) -> EvalResult:
    """Evaluate one method on one benchmark split (``options``: see ``Evaluator``)."""
    return Evaluator(data, embedder, **options).evaluate(method)
