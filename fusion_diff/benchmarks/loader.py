"""One entry point for every benchmark loader (what ``fusion-diff eval --benchmark`` calls)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from fusion_diff.benchmarks.fashioniq import CATEGORIES
from fusion_diff.benchmarks.spec import BENCHMARK_SPECS, benchmark_spec
from fusion_diff.benchmarks.types import BenchmarkData
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
    if benchmark not in BENCHMARK_SPECS:
        raise DataError(f"unknown benchmark {benchmark!r}: use one of {list(BENCHMARK_SPECS)}.")
    spec = benchmark_spec(benchmark)
    offered = {"categories": categories, "circo_gallery": circo_gallery, "phrasing": phrasing}
    options = {name: offered[name] for name in spec.load_options}
    units = spec.load(root, split, image_root=image_root, allow_missing=allow_missing, **options)
    for unit in units:  # what missing images cost, said now rather than discovered in the numbers
        line = unit.describe_missing()
        if line:
            logger.warning(line)
    return units
