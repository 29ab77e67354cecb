"""Where the library keeps its caches (world backbone, embeddings, captions)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FUSION_DIFF_CACHE"


def cache_dir(sub: str | None = None) -> Path:
    """The cache root (``$FUSION_DIFF_CACHE`` or ``~/.cache/fusion_diff``), or a folder in it."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fusion_diff")
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path
