"""One entry point for every benchmark loader (what ``fusion-diff eval --benchmark`` calls)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fusion_diff.benchmarks.circo import load_circo
from fusion_diff.benchmarks.cirr import load_cirr
from fusion_diff.benchmarks.fashioniq import CATEGORIES, load_fashioniq
from fusion_diff.benchmarks.shapes import load_shapes, load_shapes_open
from fusion_diff.benchmarks.types import BENCHMARKS, BenchmarkData
from fusion_diff.errors import DataError


def load_benchmark(
    benchmark: str,
    root: str | Path,
    split: str,
    *,
    allow_missing: bool = False,
    image_root: str | Path | None = None,
    categories: Sequence[str] = CATEGORIES,
    circo_gallery: str | Path = "auto",
    phrasing: str = "benchmark",
) -> list[BenchmarkData]:
    """The evaluation units of a benchmark split: one per FashionIQ category, one otherwise.

    ``split`` is ``val`` or ``test`` (CIRR-format ``test`` is the ``test1`` files).
    """
    common = {"image_root": image_root, "allow_missing": allow_missing}
    if benchmark == "cirr":
        return [load_cirr(root, split, **common)]
    if benchmark == "shapes":
        return [load_shapes(root, split, phrasing=phrasing, **common)]
    if benchmark == "fashioniq":
        return load_fashioniq(root, split, categories=categories, **common)
    if benchmark == "circo":
        return [load_circo(root, split, gallery=circo_gallery, **common)]
    if benchmark == "shapes-open":
        return [load_shapes_open(root, split, **common)]
    raise DataError(f"unknown benchmark {benchmark!r}: use one of {list(BENCHMARKS)}.")
