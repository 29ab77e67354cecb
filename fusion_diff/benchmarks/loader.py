"""One entry point for every benchmark loader (what ``fusion-diff eval --benchmark`` calls)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from fusion_diff.benchmarks.circo import load_circo
from fusion_diff.benchmarks.cirr import load_cirr
from fusion_diff.benchmarks.fashioniq import CATEGORIES, load_fashioniq
from fusion_diff.benchmarks.shapes import load_shapes, load_shapes_open
from fusion_diff.benchmarks.types import BENCHMARKS, BenchmarkData
from fusion_diff.errors import DataError

logger = logging.getLogger(__name__)


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
        units = [load_cirr(root, split, **common)]
    elif benchmark == "shapes":
        units = [load_shapes(root, split, phrasing=phrasing, **common)]
    elif benchmark == "fashioniq":
        units = load_fashioniq(root, split, categories=categories, **common)
    elif benchmark == "circo":
        units = [load_circo(root, split, gallery=circo_gallery, **common)]
    elif benchmark == "shapes-open":
        units = [load_shapes_open(root, split, **common)]
    else:
        raise DataError(f"unknown benchmark {benchmark!r}: use one of {list(BENCHMARKS)}.")
    for unit in units:  # what missing images cost, said now rather than discovered in the numbers
        line = unit.describe_missing()
        if line:
            logger.warning(line)
    return units
