"""The captioner interface: images in, captions out, with an identity that caches and protocol lines record.

Benchmarks give only images for references and gallery items, so the ``T`` of a fused embedding
``f(I, T)`` must come from a captioner; annotation captions there would be a leak. A captioner may
keep several candidate captions per image (``num_candidates``; retrieval top-k, or beam search's
best sequences): the first is *the* caption, and fused embeddings may average over all of them.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from fusion_diff.embedding.base import ImageInput


def identity_digest(identity: dict[str, Any], length: int = 10) -> str:
    """A short stable hash of an identity dict (key order does not matter), for file names."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:length]


class Captioner(ABC):
    """Maps images to ``num_candidates`` captions each, best first."""

    num_candidates: int = 1

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-able dict that changes whenever the captions could change (model, bank, settings).

        Caption caches refuse files made under another identity, and every result's protocol
        records it.
        """

    @abstractmethod
    def describe(self) -> str:
        """One short human-readable line for protocol tables, e.g. ``retrieval(bank=pairs[48k], top1, ...)``."""

    @abstractmethod
    def caption_candidates(
        self, images: Sequence[ImageInput], batch_size: int = 32, progress: bool = False
    ) -> list[list[str]]:
        """For each image, ``num_candidates`` captions, best first (batched internally)."""

    def caption(self, images: Sequence[ImageInput], batch_size: int = 32, progress: bool = False) -> list[str]:
        """The best caption of each image."""
        return [candidates[0] for candidates in self.caption_candidates(images, batch_size, progress)]
