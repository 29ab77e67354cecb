"""A benchmark is a spec: how a split loads, which text each query row gets (and the protocol options that
choose it), how a ranking is scored, and which test-server file format it submits in.

Each benchmark module defines ``SPEC``; ``BENCHMARK_SPECS`` names them (imported when used), so the
loader, the evaluator and the submission writer ask the spec instead of switching on benchmark names,
and adding a benchmark (GeneCIS, say) is one module with a ``SPEC`` plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fusion_diff.utils.registry import Registry

if TYPE_CHECKING:
    import torch

    from fusion_diff.benchmarks.types import BenchmarkData, CompositionQuery


def first_text(queries: Sequence[CompositionQuery], **options: Any) -> tuple[list[str], list[int]]:
    """One row per query, its (only) modification text."""
    return [q.texts[0] for q in queries], list(range(len(queries)))


def no_options(**options: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the library needs to know about one benchmark."""

    name: str
    title: str
    # (root, split, *, image_root, allow_missing, **load options) -> evaluation units (one per FashionIQ category)
    load: Callable[..., list[BenchmarkData]]
    # (relevant [Q, K] bool, subset_relevant or None, queries) -> metrics of one unit
    metrics: Callable[[torch.Tensor, torch.Tensor | None, Sequence[CompositionQuery]], dict[str, float]]
    load_options: tuple[str, ...] = ()  # the load_benchmark keywords it reads (categories, circo_gallery, ...)
    # (queries, **protocol options) -> (text of each query row, the query it belongs to)
    texts: Callable[..., tuple[list[str], list[int]]] = first_text
    protocol: Callable[..., dict[str, Any]] = no_options  # (**protocol options) -> what the options recorded
    average: Callable[[Mapping[str, Mapping[str, float]]], dict[str, float]] | None = None  # over several units
    submission: str | None = None  # the test server's file format: "cirr" (two files), "circo" (one), None


BENCHMARK_SPECS = Registry(
    "benchmark",
    {
        "cirr": "fusion_diff.benchmarks.cirr:SPEC",
        "fashioniq": "fusion_diff.benchmarks.fashioniq:SPEC",
        "circo": "fusion_diff.benchmarks.circo:SPEC",
        "shapes": "fusion_diff.benchmarks.shapes:SPEC",
        "shapes-open": "fusion_diff.benchmarks.shapes:OPEN_SPEC",
    },
)


def benchmark_spec(name: str) -> BenchmarkSpec:
    return BENCHMARK_SPECS.load(name)
