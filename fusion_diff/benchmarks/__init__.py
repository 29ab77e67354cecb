"""Benchmarks (CIRR, FashionIQ, CIRCO, the shapes world): loaders, metrics, submissions, evaluation."""

from fusion_diff.benchmarks.circo import load_circo
from fusion_diff.benchmarks.cirr import load_cirr
from fusion_diff.benchmarks.fashioniq import CATEGORIES, load_fashioniq
from fusion_diff.benchmarks.loader import load_benchmark
from fusion_diff.benchmarks.shapes import load_oracle_captions, load_shapes, load_shapes_open, oracle_captions_path
from fusion_diff.benchmarks.submission import circo_submission, cirr_submission, validate_submission, write_submission
from fusion_diff.benchmarks.types import BENCHMARKS, BenchmarkData, CompositionQuery

__all__ = [
    "BENCHMARKS",
    "CATEGORIES",
    "BenchmarkData",
    "CompositionQuery",
    "circo_submission",
    "cirr_submission",
    "load_benchmark",
    "load_circo",
    "load_cirr",
    "load_fashioniq",
    "load_oracle_captions",
    "load_shapes",
    "load_shapes_open",
    "oracle_captions_path",
    "validate_submission",
    "write_submission",
]
