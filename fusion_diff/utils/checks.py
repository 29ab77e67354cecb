"""Checks at the library's boundaries: NaN/inf vectors and settings, and counts such as top-k.

A NaN in a query vector or a guidance scale does not fail by itself: it flows on into NaN scores
and an arbitrary ranking. So every boundary that takes vectors or numeric settings refuses
non-finite ones here, naming what and how to fix it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fusion_diff.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch


def require_finite(vectors: torch.Tensor, what: str, fix: str) -> None:
    """Raise ``DataError`` when ``vectors`` (rows = items) hold NaN or inf, naming how many rows and the first."""
    import torch

    bad = ~torch.isfinite(vectors)
    if not bad.any():
        return
    rows = bad.reshape(len(bad), -1).any(1).nonzero().flatten().tolist()
    raise DataError(f"{what}: {len(rows)} row(s) hold NaN or inf (first rows: {rows[:5]}). {fix}")


def require_finite_settings(where: str, **settings: float) -> None:
    """Raise ``ConfigError`` naming every setting that is NaN or infinite (guidance scales, weights, ...)."""
    bad = [f"{name}={value}" for name, value in settings.items() if not math.isfinite(float(value))]
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)} must be finite number(s).")


def require_counts(where: str, minimum: int = 1, **counts: int) -> None:
    """Raise ``ConfigError`` naming every count that is not an integer >= ``minimum`` (items, queries, sizes)."""
    bad = [
        f"{name}={value!r}"
        for name, value in counts.items()
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum
    ]
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)}; each must be an integer >= {minimum}.")


def check_top_k(k: int) -> int:
    """``k`` of a top-k search: an integer >= 1 (a gallery smaller than k gives all of it)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r}: the number of results per query must be an integer >= 1.")
    return k
