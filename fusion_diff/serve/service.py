"""The page's engine, free of Gradio: one retriever loaded once, queries answered in batches, plain data out.

The web layer (``app.py``) only turns widgets into ``SearchRequest``s and ``SearchResponse``s into
widgets; everything a query does (checking the input, grouping a batch by method and settings,
one ``ComposedRetriever.search`` call per group, the joint-space picture) lives here, where the
tests can call it without a browser.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fusion_diff.errors import ConfigError, DataError, FusionDiffError, MissingFileError
from fusion_diff.serve.inputs import check_text, read_reference

# What the page's method picker offers (registry name -> label), and which knobs each one reads.
METHOD_LABELS: dict[str, str] = {
    "fusion-diff": "Fusion-Diff",
    "fti4cir": "FTI4CIR",
    "image-only": "image-only",
    "sum": "sum fusion",
}
SAMPLING_KNOBS = ("num_inference_steps", "control_guidance", "text_guidance", "num_samples")
METHOD_KNOBS: dict[str, tuple[str, ...]] = {
    "fusion-diff": (*SAMPLING_KNOBS, "mix_reference", "gallery_mode"),
    "fti4cir": ("mix_reference", "gallery_mode"),
    "image-only": ("gallery_mode",),
    "sum": ("gallery_mode",),
}
TEXT_FREE_METHODS = ("image-only",)  # methods that ignore the modification text
MAX_K = 50
DEMO_RETRIEVER = "retriever"  # the folder `fusion-diff demo` leaves its ready retriever in


@dataclass(frozen=True)
class QuerySettings:
    """The page's knobs. Defaults are replaced by the retriever's own method settings when it has them."""

    method: str = "fusion-diff"
    k: int = 10
    num_inference_steps: int = 1
    control_guidance: float = 1.5
    text_guidance: float = 2.0
    num_samples: int = 8
    mix_reference: float = 0.1
    gallery_mode: str = "fused"

    def __post_init__(self) -> None:
        if self.method not in METHOD_LABELS:
            raise ConfigError(f"Unknown method {self.method!r}; the page offers {list(METHOD_LABELS)}.")
        if not 1 <= self.k <= MAX_K:
            raise ConfigError(f"k={self.k}: ask for 1 to {MAX_K} results.")

    def options(self, method: str | None = None) -> dict[str, Any]:
        """The knobs ``method`` (default: this one) reads, as ``search`` keyword options."""
        return {knob: getattr(self, knob) for knob in METHOD_KNOBS[method or self.method]}


@dataclass
class SearchRequest:
    """One visitor's query. ``reference_id`` is set when the reference is a gallery item (it is then left out
    of its own ranking, as in CIRR); ``target_id`` when it is a benchmark query with a known answer."""

    reference: str | None
    text: str
    settings: QuerySettings = field(default_factory=QuerySettings)
    negative_text: str = ""
    compare: str | None = None  # a second method, shown in a second row
    reference_id: str | None = None
    target_id: str | None = None


@dataclass
class Ranking:
    """One method's answer: its top-k hits and the wall time of the batch it ran in."""

    method: str
    hits: list[Any]  # ComposedRetriever Hit(id, path, score, caption)
    seconds: float
    batch_size: int

    @property
    def label(self) -> str:
        return METHOD_LABELS.get(self.method, self.method)

    def target_rank(self, target_id: str | None) -> int | None:
        ranks = [rank for rank, hit in enumerate(self.hits, start=1) if hit.id == target_id]
        return ranks[0] if ranks else None


@dataclass
class SearchResponse:
    """What the page shows for one request: rankings (one, or two side by side) or a message saying what to fix."""

    request: SearchRequest
    rankings: list[Ranking] = field(default_factory=list)
    message: str = ""
    reference_caption: str | None = None

    @property
    def ok(self) -> bool:
        return not self.message


@dataclass(frozen=True)
class GalleryItem:
    id: str
    path: Path
    caption: str | None = None


@dataclass(frozen=True)
class TestQuery:
    """A benchmark query with a known answer, for the 'random test query' button."""

    query_id: str
    reference_id: str
    reference_path: Path
    text: str
    target_id: str


class SearchService:
    """Holds one ``ComposedRetriever`` (loaded once) and answers batches of page queries with it.

    ``method_options`` adds per-method options the retriever folder does not hold (e.g. FTI4CIR's
    ``checkpoint``); ``test_queries`` feeds the 'random test query' button.
    """

    def __init__(
        self,
        retriever: Any,
        source: str | Path,
        *,
        method_options: dict[str, dict[str, Any]] | None = None,
        test_queries: list[TestQuery] | None = None,
        defaults: QuerySettings | None = None,
    ) -> None:
        self.retriever = retriever
        self.source = str(source)
        self.method_options = method_options or {}
        self.test_queries = test_queries or []
        self.defaults = defaults or QuerySettings()
        self._lock = threading.Lock()  # one model, one caller at a time: batching, not threads, gives throughput
        self._figures = Path(tempfile.mkdtemp(prefix="fusion-diff-serve-"))
        self._gallery: list[GalleryItem] | None = None

    # ------------------------------------------------------------------ what the page shows around the queries
    def gallery_items(self) -> list[GalleryItem]:
        """Every gallery item in index order (the strip shows the first ones)."""
        if self._gallery is None:
            self._gallery = _gallery_items(self.retriever)
        return self._gallery

    def file_roots(self) -> list[Path]:
        """Folders the server may send files from: the gallery's images and the test queries' references."""
        paths = [item.path for item in self.gallery_items()] + [q.reference_path for q in self.test_queries]
        return sorted({Path(p).resolve().parent for p in paths})

    def load(self, folder: str | Path) -> None:
        """Swap in another retriever folder; on any error the current one keeps serving."""
        retriever = load_retriever(folder)
        with self._lock:
            self.retriever, self.source, self._gallery = retriever, str(folder), None

    def methods(self) -> dict[str, str]:
        """Methods the page can run (FTI4CIR only with a checkpoint), name -> label."""
        return {
            name: label
            for name, label in METHOD_LABELS.items()
            if name != "fti4cir" or "checkpoint" in self.method_options.get("fti4cir", {})
        }

    def random_test_query(self, rng: random.Random | None = None) -> TestQuery:
        if not self.test_queries:
            raise ConfigError("This page has no benchmark queries; start it with --benchmark DIR or --demo-dir.")
        return (rng or random).choice(self.test_queries)

    # ------------------------------------------------------------------ queries
    def search(self, requests: list[SearchRequest]) -> list[SearchResponse]:
        """Answer a batch: each request is checked on its own (a bad one gets its message, the others still
        run); the valid ones are grouped by (method, settings, k) and each group is one retriever call."""
        responses = [SearchResponse(request) for request in requests]
        images: dict[int, Any] = {}
        for i, response in enumerate(responses):
            try:
                images[i] = self._check(response.request)
            except FusionDiffError as err:
                response.message = str(err)
        if not images:
            return responses
        with self._lock:
            self._caption_references(responses, images)
            groups: dict[tuple, list[int]] = defaultdict(list)
            for i in images:
                request = responses[i].request
                for method in dict.fromkeys(filter(None, (request.settings.method, request.compare))):
                    groups[self._group_key(request, method)].append(i)
            for (method, options, k, with_negative), members in groups.items():
                self._run_group(responses, images, members, method, dict(options), k, with_negative)
        return responses

    def _check(self, request: SearchRequest) -> Any:
        if request.compare and request.compare not in self.methods():
            raise ConfigError(f"Cannot compare with {request.compare!r}; this page offers {list(self.methods())}.")
        if request.settings.method not in self.methods():
            raise ConfigError(f"Method {request.settings.method!r} is not available here; use one of {list(self.methods())}.")
        image = read_reference(request.reference)
        needs_text = {request.settings.method, request.compare or request.settings.method} - set(TEXT_FREE_METHODS)
        request.text = check_text(request.text, required=bool(needs_text))
        request.negative_text = check_text(request.negative_text, "negative text", required=False)
        return image

    @staticmethod
    def _group_key(request: SearchRequest, method: str) -> tuple:
        options = tuple(sorted(request.settings.options(method).items()))
        return method, options, request.settings.k, bool(request.negative_text) and method == "fusion-diff"

    def _run_group(self, responses, images, members, method, options, k, with_negative) -> None:
        requests = [responses[i].request for i in members]
        options = {**self.method_options.get(method, {}), **options}
        if with_negative:
            options["negative_texts"] = [r.negative_text for r in requests]
        exclude = [[r.reference_id] if r.reference_id else [] for r in requests]
        start = time.perf_counter()
        try:
            hits = self.retriever.search(
                [images[i] for i in members], [r.text for r in requests], k=k, exclude=exclude, method=method, **options
            )
        except FusionDiffError as err:
            for i in members:
                responses[i].message = f"{METHOD_LABELS[method]}: {err}"
            return
        seconds = time.perf_counter() - start
        for i, row in zip(members, hits, strict=True):
            responses[i].rankings.append(Ranking(method, list(row), seconds, len(members)))

    def _caption_references(self, responses: list[SearchResponse], images: dict[int, Any]) -> None:
        captioner = getattr(self.retriever, "captioner", None)
        if captioner is None:
            return
        order = list(images)
        for i, caption in zip(order, captioner.caption([images[i] for i in order])):
            responses[i].reference_caption = caption

    # ------------------------------------------------------------------ identity
    def describe(self) -> str:
        """Markdown naming the retriever folder, its parts and the default query settings."""
        lines = [f"**Retriever** `{self.source}`"]
        describe = getattr(self.retriever, "describe", None)
        if callable(describe):
            lines.append(describe())
        settings = ", ".join(f"{k} {v}" for k, v in asdict(self.defaults).items() if k not in ("method", "k"))
        lines.append(f"**Default query** {METHOD_LABELS[self.defaults.method]}: {settings}")
        return "  \n".join(lines)

    def with_defaults(self, **changes: Any) -> QuerySettings:
        return replace(self.defaults, **changes)

    # ------------------------------------------------------------------ the joint-space picture
    def joint_space_figure(self, response: SearchResponse) -> Path:
        """PNG of where the response's first query landed: reference, sampling walk, query, top hits, target."""
        from fusion_diff.viz import plot_query_walk

        request, ranking = response.request, response.rankings[0]
        with self._lock:
            walk = _query_walk(self.retriever, read_reference(request.reference), request, ranking.method)
            ids = [hit.id for hit in ranking.hits] + ([request.target_id] if request.target_id else [])
            gallery = _gallery_embeddings(self.retriever, ids, request.settings.gallery_mode)
        k = len(ranking.hits)
        out = self._figures / f"walk-{time.time_ns()}.png"
        return plot_query_walk(
            walk.reference, walk.query, gallery[:k], out, walk=walk.trajectory,
            target=gallery[k] if request.target_id else None, target_rank=ranking.target_rank(request.target_id),
            title=f"{ranking.label}: where the query landed",
        )  # fmt: skip


# ---------------------------------------------------------------------- building a service from folders
def load_retriever(folder: str | Path) -> Any:
    """``ComposedRetriever.from_pretrained(folder)``, with a message naming the folder when it is not one."""
    from fusion_diff.retrieval import ComposedRetriever

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(
            f"Retriever folder not found: {folder}. Build one with `fusion-diff index build` (or `make demo`, which "
            "leaves runs/demo/retriever), or pass the right --retriever."
        )
    return ComposedRetriever.from_pretrained(folder)


def benchmark_test_queries(root: str | Path, gallery_ids: set[str]) -> list[TestQuery]:
    """The shapes benchmark's test queries whose reference and target are both in the served gallery."""
    from fusion_diff.benchmarks import load_shapes

    unit = load_shapes(root, "test")
    return [
        TestQuery(q.query_id, q.reference, unit.image_paths[q.reference], q.texts[0], q.positives[0])
        for q in unit.queries
        if q.positives and q.reference in gallery_ids and q.positives[0] in gallery_ids
    ]


def service_from_folder(
    retriever: str | Path, benchmark: str | Path | None = None, fti4cir: str | Path | None = None
) -> SearchService:
    """A service over a saved retriever; ``benchmark`` feeds the random-test-query button, ``fti4cir`` adds FTI4CIR."""
    service = SearchService(load_retriever(retriever), retriever)
    if fti4cir is not None:
        if not Path(fti4cir).is_dir():
            raise MissingFileError(f"FTI4CIR checkpoint folder not found: {fti4cir}. Train one or drop --fti4cir.")
        service.method_options["fti4cir"] = {"checkpoint": str(fti4cir)}
    if benchmark is not None:
        service.test_queries = benchmark_test_queries(benchmark, {item.id for item in service.gallery_items()})
        if not service.test_queries:
            raise DataError(
                f"No test query of {benchmark} has its reference and target in the gallery of {retriever}; "
                "serve the retriever built on that benchmark's gallery, or drop --benchmark."
            )
    return service


def service_from_demo(
    demo_dir: str | Path, benchmark: str | Path | None = None, fti4cir: str | Path | None = None
) -> SearchService:
    """The page over what ``fusion-diff demo`` left in ``demo_dir``: its retriever, benchmark and FTI4CIR."""
    demo_dir = Path(demo_dir)
    retriever = demo_dir / DEMO_RETRIEVER
    if not retriever.is_dir():
        raise MissingFileError(
            f"{retriever} not found: run `make demo` (or `fusion-diff demo --out ...`) first, or pass "
            "--retriever DIR for a retriever of your own gallery."
        )
    default_fti4cir = demo_dir / "fti4cir"
    return service_from_folder(
        retriever,
        benchmark or demo_dir / "benchmark",
        fti4cir or (default_fti4cir if default_fti4cir.is_dir() else None),
    )


# ---------------------------------------------------------------------- what the page reads from the retriever
@dataclass
class QueryWalk:
    reference: Any  # [d], the reference as the gallery embeds it
    query: Any  # [d], the final query
    trajectory: Any | None  # [S, d], z after each sampling step (sampling methods only)


def _gallery_items(retriever: Any) -> list[GalleryItem]:  # PROVISIONAL until issue 15's API
    return [GalleryItem(i, retriever.paths[i], retriever.captions[i]) for i in retriever.ids]


def _gallery_embeddings(retriever: Any, ids: list[str], mode: str) -> Any:  # PROVISIONAL
    import torch

    index = retriever.indexes[mode]
    return index.embeddings[torch.tensor([index.position[i] for i in ids])]


def _query_walk(retriever: Any, image: Any, request: SearchRequest, method: str) -> QueryWalk:  # PROVISIONAL
    import torch.nn.functional as F

    from fusion_diff.captioning.modes import fuse_with_captions
    from fusion_diff.retrieval import QueryContext

    embedder = retriever.embedder
    img = embedder.embed_images([image])
    caption = retriever.captioner.caption([image])
    fused = fuse_with_captions(embedder, [caption], [image], img, 1)
    settings = request.settings
    reference = fused[0] if settings.gallery_mode == "fused" else img[0]
    text = embedder.embed_texts([request.text])
    if method != "fusion-diff":
        m = retriever._method(method, **settings.options(method))
        ctx = QueryContext(embedder, ["q"], [request.text], text, img, [], caption, fused)
        return QueryWalk(reference, m.query_embeddings(ctx)[0], None)
    m = retriever._method(method, **settings.options(method))
    out = m.pipeline.sample(text, fused, num_inference_steps=settings.num_inference_steps, control_guidance=settings.control_guidance,
                            text_guidance=settings.text_guidance, num_samples=settings.num_samples, generator=m.generator(), return_trajectory=True)
    return QueryWalk(reference, m.mix(out.embeddings, QueryContext(embedder, ["q"], [request.text], text, img, [], caption, fused))[0], out.trajectory[:, 0])
