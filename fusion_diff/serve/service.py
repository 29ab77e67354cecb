"""The page's engine, free of Gradio: one retriever loaded once, queries answered in batches, plain data out.

The web layer (``app.py``) only turns widgets into ``SearchRequest``s and ``SearchResponse``s into
widgets; everything a query does (checking the input, grouping a batch by method and settings,
one ``ComposedRetriever.search`` call per group, the joint-space picture) lives here, where the
tests can call it without a browser.
"""

from __future__ import annotations

import inspect
import random
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion_diff.errors import ConfigError, DataError, FusionDiffError, MissingFileError
from fusion_diff.serve.inputs import check_text, read_reference

if TYPE_CHECKING:  # the retriever imports torch; the page's module loads it only when a retriever is served
    from fusion_diff.retrieval.retriever import Hit

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
DEFAULT_K = 10
DEMO_RETRIEVER = "retriever"  # the folder `fusion-diff demo` leaves its ready retriever in


@dataclass(frozen=True)
class QuerySettings:
    """The page's knobs. ``of_method`` takes them from the served retriever's method, ``library`` from
    ``FusionDiffMethod``'s defaults: the page never keeps a third copy of the query settings."""

    method: str
    k: int
    num_inference_steps: int
    control_guidance: float
    text_guidance: float
    num_samples: int
    mix_reference: float
    gallery_mode: str

    def __post_init__(self) -> None:
        if self.method not in METHOD_LABELS:
            raise ConfigError(f"Unknown method {self.method!r}; the page offers {list(METHOD_LABELS)}.")
        if not 1 <= self.k <= MAX_K:
            raise ConfigError(f"k={self.k}: ask for 1 to {MAX_K} results.")

    def options(self, method: str | None = None) -> dict[str, Any]:
        """The knobs ``method`` (default: this one) reads, as ``search`` keyword options."""
        return {knob: getattr(self, knob) for knob in METHOD_KNOBS[method or self.method]}

    @classmethod
    def library(cls, **changes: Any) -> QuerySettings:
        """Fusion-Diff with ``FusionDiffMethod``'s default settings, k = 10."""
        from fusion_diff.pipelines.method import FusionDiffMethod

        parameters = inspect.signature(FusionDiffMethod).parameters
        knobs = {knob: parameters[knob].default for knob in METHOD_KNOBS["fusion-diff"]}
        return cls(**{"method": "fusion-diff", "k": DEFAULT_K, **knobs, **changes})

    @classmethod
    def of_method(cls, method: Any, name: str, gallery_mode: str) -> QuerySettings:
        """The settings of a method object (a knob it lacks keeps the library's default)."""
        knobs = {knob: getattr(method, knob) for knob in METHOD_KNOBS["fusion-diff"] if hasattr(method, knob)}
        knobs.update(method=name if name in METHOD_LABELS else "fusion-diff", gallery_mode=gallery_mode)
        return cls.library(**knobs)


@dataclass
class SearchRequest:
    """One visitor's query. ``reference_id`` is set when the reference is a gallery item (it is then left out
    of its own ranking, as in CIRR); ``target_id`` when it is a benchmark query with a known answer."""

    reference: str | None
    text: str
    settings: QuerySettings = field(default_factory=QuerySettings.library)
    negative_text: str = ""
    compare: str | None = None  # a second method, shown in a second row
    reference_id: str | None = None
    target_id: str | None = None


@dataclass
class Ranking:
    """One method's answer: its top-k hits and the wall time of the batch it ran in."""

    method: str
    hits: list[Hit]
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
class BenchmarkQuery:
    """A benchmark query with a known answer, for the 'random test query' button."""

    query_id: str
    reference_id: str
    reference_path: Path
    text: str
    target_id: str


class SearchService:
    """Holds the served ``ComposedRetriever``s (loaded once; one per gallery mode, usually one) and answers
    batches of page queries with them.

    ``method_options`` adds per-method options the retriever folder does not hold (FTI4CIR's
    ``checkpoint``); ``test_queries`` feeds the 'random test query' button.
    """

    def __init__(
        self,
        retrievers: Any,
        source: str | Path,
        *,
        method_options: dict[str, dict[str, Any]] | None = None,
        test_queries: list[BenchmarkQuery] | None = None,
    ) -> None:
        self.method_options = method_options or {}
        self.test_queries = test_queries or []
        self._lock = threading.Lock()  # one model, one caller at a time: batching, not threads, gives throughput
        self._figures = Path(tempfile.mkdtemp(prefix="fusion-diff-serve-"))
        self._use(retrievers, source)

    def _use(self, retrievers: Any, source: str | Path) -> None:
        retrievers = list(retrievers) if isinstance(retrievers, (list, tuple)) else [retrievers]
        by_mode = {r.gallery_mode: r for r in retrievers}
        if len(by_mode) != len(retrievers):
            raise ConfigError("Serve at most one retriever per gallery mode (fused, image).")
        primary = retrievers[0]
        options = {k: dict(v) for k, v in self.method_options.items() if k != "fusion-diff"}
        if primary.method_name == "fusion-diff":  # share its loaded pipeline: other knobs must not reload it
            # and one noise block for every query: an answer must not depend on who else asked at that moment
            options["fusion-diff"] = {"pipeline": primary.method.pipeline, "shared_noise": True}
        if primary.method_name == "fti4cir":  # its own checkpoint, unless another was given
            options.setdefault("fti4cir", {"checkpoint": str(primary.method.checkpoint)})
        self.retrievers, self.primary, self.source = by_mode, primary, str(source)
        self.method_options = {**self.method_options, **options}
        self.defaults = QuerySettings.of_method(primary.method, primary.method_name or "", primary.gallery_mode)
        self._gallery: list[Hit] | None = None

    # ------------------------------------------------------------------ what the page shows around the queries
    def methods(self) -> dict[str, str]:
        """Methods the page can run, name -> label: FTI4CIR only with a checkpoint, Fusion-Diff with a pipeline."""
        needs = {"fti4cir": "checkpoint", "fusion-diff": "pipeline"}
        return {
            name: label
            for name, label in METHOD_LABELS.items()
            if name not in needs or needs[name] in self.method_options.get(name, {})
        }

    def gallery_modes(self) -> list[str]:
        return list(self.retrievers)

    def gallery_items(self) -> list[Hit]:
        """The primary retriever's gallery items with an image file, in index order (the strip shows the first)."""
        if self._gallery is None:
            from fusion_diff.retrieval.retriever import Hit

            items = getattr(self.primary.index, "items", None) or []  # a remote (Qdrant) index lists nothing
            self._gallery = [Hit.from_item(item) for item in items if item.get("path") and Path(item["path"]).is_file()]
        return self._gallery

    def file_roots(self) -> list[Path]:
        """Folders the server may send files from: the gallery's images and the test queries' references."""
        paths = [item.path for item in self.gallery_items()] + [q.reference_path for q in self.test_queries]
        return sorted({Path(p).resolve().parent for p in paths})

    def load(self, folder: str | Path) -> None:
        """Serve another retriever folder instead; on any error the current one keeps serving."""
        retriever = load_retriever(folder)
        with self._lock:
            self._use(retriever, folder)
            self.test_queries = [q for q in self.test_queries if q.reference_id in self._gallery_ids()]

    def _gallery_ids(self) -> set[str]:
        return {item.id for item in self.gallery_items()}

    def random_test_query(self, rng: random.Random | None = None) -> BenchmarkQuery:
        if not self.test_queries:
            raise ConfigError("This page has no benchmark queries; start it with --benchmark DIR or --demo-dir.")
        return (rng or random).choice(self.test_queries)

    def describe(self) -> str:
        """Markdown naming the retriever folder, its parts, its index and the default query settings."""
        lines = [f"**Retriever** `{self.source}`"]
        for mode, retriever in self.retrievers.items():
            embedder = retriever.embedder.identity.describe()
            captioner = retriever.captioner.describe() if retriever.captioner is not None else "none"
            index = retriever.index
            summary = index.describe() if hasattr(index, "describe") else {}
            settings = summary.get("settings") or {}
            kind = settings.get("type") if isinstance(settings, dict) else getattr(settings, "type", None)
            lines.append(
                f"**{mode} gallery** {len(index)} items, index `{kind or type(index).__name__}` "
                f"at `{getattr(index, 'root', '')}` · embedder `{embedder}` · captioner `{captioner}` · "
                f"method `{retriever.method_name}`"
            )
        knobs = ", ".join(f"{k} {v}" for k, v in asdict(self.defaults).items() if k not in ("method", "k"))
        lines.append(f"**Default query** {METHOD_LABELS[self.defaults.method]}: {knobs}")
        return "  \n".join(lines)

    # ------------------------------------------------------------------ queries
    def search(self, requests: list[SearchRequest]) -> list[SearchResponse]:
        """Answer a batch: each request is checked on its own (a bad one gets its message, the others still
        run); the valid ones are grouped by (gallery, method, settings, k) and each group is one
        ``ComposedRetriever.search`` call."""
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
                    options = tuple(sorted(self._options(request, method).items()))
                    groups[(request.settings.gallery_mode, method, options, request.settings.k)].append(i)
            for (mode, method, options, k), members in groups.items():
                self._run_group(responses, images, members, self.retrievers[mode], method, dict(options), k)
        return responses

    def _check(self, request: SearchRequest) -> Any:
        methods = self.methods()
        for name in filter(None, (request.settings.method, request.compare)):
            if name not in methods:
                raise ConfigError(f"Method {name!r} is not available on this page; use one of {list(methods)}.")
        if request.settings.gallery_mode not in self.retrievers:
            raise ConfigError(
                f"No {request.settings.gallery_mode} gallery is served here; choose {self.gallery_modes()}."
            )
        image = read_reference(request.reference)
        needs_text = {request.settings.method, request.compare or request.settings.method} - set(TEXT_FREE_METHODS)
        request.text = check_text(request.text, required=bool(needs_text))
        request.negative_text = check_text(request.negative_text, "negative text", required=False)
        return image

    def _options(self, request: SearchRequest, method: str) -> dict[str, Any]:
        options = request.settings.options(method)
        if method == "fusion-diff" and request.negative_text:
            options["negative_text"] = request.negative_text
        return options

    def _run_group(self, responses, images, members, retriever, method, options, k) -> None:
        requests = [responses[i].request for i in members]
        exclude = [[r.reference_id] if r.reference_id else [] for r in requests]
        start = time.perf_counter()
        try:
            hits = retriever.search(
                [images[i] for i in members], [r.text for r in requests], k=k, exclude=exclude, method=method,
                **self.method_options.get(method, {}), **options,
            )  # fmt: skip
        except FusionDiffError as err:
            for i in members:
                responses[i].message = f"{METHOD_LABELS[method]}: {err}"
            return
        seconds = time.perf_counter() - start
        for i, row in zip(members, hits, strict=True):
            responses[i].rankings.append(Ranking(method, list(row), seconds, len(members)))

    def _caption_references(self, responses: list[SearchResponse], images: dict[int, Any]) -> None:
        captioner = self.primary.captioner
        if captioner is None:
            return
        order = list(images)
        for i, caption in zip(order, captioner.caption([images[i] for i in order])):
            responses[i].reference_caption = caption

    # ------------------------------------------------------------------ the joint-space picture
    def joint_space_figure(self, response: SearchResponse) -> Path:
        """PNG of where the response's first query landed: reference, sampling walk, query, top hits, target."""
        import torch.nn.functional as F

        from fusion_diff.retrieval.method import run_method
        from fusion_diff.viz import plot_query_walk

        request, ranking = response.request, response.rankings[0]
        retriever = self.retrievers[request.settings.gallery_mode]
        index = retriever.index
        if not hasattr(index, "embeddings"):
            raise ConfigError("this index keeps its vectors remotely, so the page cannot place its hits")
        with self._lock:
            method = retriever.method_for(
                ranking.method, **self.method_options.get(ranking.method, {}), **self._options(request, ranking.method)
            )
            context = retriever.query_context([read_reference(request.reference)], [request.text])
            walk = (
                method.sample(context, return_trajectory=True).trajectory[:, 0] if hasattr(method, "sample") else None
            )
            query = run_method(method, context)[0]
            if query.ndim == 2:  # a multi-sample method: the figure places the samples' mean direction
                query = F.normalize(query.mean(0), dim=-1)
        reference = (
            context.reference_image_embeds if retriever.gallery_mode == "image" else context.reference_fused_embeds
        )[0]
        ids = [hit.id for hit in ranking.hits] + ([request.target_id] if request.target_id else [])
        gallery = index.embeddings[[index.position[i] for i in ids]].float()
        k = len(ranking.hits)
        return plot_query_walk(
            reference, query, gallery[:k], self._figures / f"walk-{time.time_ns()}.png", walk=walk,
            target=gallery[k] if request.target_id else None, target_rank=ranking.target_rank(request.target_id),
            title=f"{ranking.label}: where the query landed",
        )  # fmt: skip


# ---------------------------------------------------------------------- building a service from folders
def load_retriever(folder: str | Path, embedder: Any = None) -> Any:
    """``ComposedRetriever.from_pretrained(folder)``, with a message naming the folder when it is not one."""
    from fusion_diff.retrieval import ComposedRetriever

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(
            f"Retriever folder not found: {folder}. Build one with `fusion-diff index build` (or `make demo`, which "
            f"leaves runs/demo/{DEMO_RETRIEVER}), or pass the right --retriever."
        )
    return ComposedRetriever.from_pretrained(folder, embedder=embedder)


def benchmark_test_queries(root: str | Path, gallery_ids: set[str]) -> list[BenchmarkQuery]:
    """The shapes benchmark's test queries whose reference and target are both in the served gallery."""
    from fusion_diff.benchmarks import load_shapes

    unit = load_shapes(root, "test")
    return [
        BenchmarkQuery(q.query_id, q.reference, unit.image_paths[q.reference], q.texts[0], q.positives[0])
        for q in unit.queries
        if q.positives and q.reference in gallery_ids and q.positives[0] in gallery_ids
    ]


def service_from_folder(
    retrievers: str | Path | list[str | Path],
    benchmark: str | Path | None = None,
    fti4cir: str | Path | None = None,
) -> SearchService:
    """A service over saved retriever folder(s) (one per gallery mode; they share the first one's embedder);
    ``benchmark`` feeds the random-test-query button, ``fti4cir`` adds FTI4CIR to the method picker."""
    folders = [Path(p) for p in (retrievers if isinstance(retrievers, (list, tuple)) else [retrievers])]
    loaded = [load_retriever(folders[0])]
    loaded += [load_retriever(folder, embedder=loaded[0].embedder) for folder in folders[1:]]
    options = {}
    if fti4cir is not None:
        if not Path(fti4cir).is_dir():
            raise MissingFileError(f"FTI4CIR checkpoint folder not found: {fti4cir}. Train one or drop --fti4cir.")
        options["fti4cir"] = {"checkpoint": str(fti4cir)}
    service = SearchService(loaded, " + ".join(map(str, folders)), method_options=options)
    if benchmark is not None:
        service.test_queries = benchmark_test_queries(benchmark, service._gallery_ids())
        if not service.test_queries:
            raise DataError(
                f"No test query of {benchmark} has its reference and target in the gallery of {folders[0]}; "
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
            f"{retriever} not found: run `make demo` first (it leaves the shapes gallery's retriever there), or "
            "pass --retriever DIR for a retriever of your own gallery."
        )
    trained_fti4cir = demo_dir / "fti4cir"
    return service_from_folder(
        retriever,
        benchmark or demo_dir / "benchmark",
        fti4cir or (trained_fti4cir if trained_fti4cir.is_dir() else None),
    )
