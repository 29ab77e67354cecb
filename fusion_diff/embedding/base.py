"""The one interface every joint vision-language backend implements.

Everything downstream (caches, the prior, retrieval, benchmarks) sees only ``JointEmbedder``:
images, texts and (image, text) pairs all map to L2-normalised float32 vectors of size ``dim``.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple, Union

import torch
from PIL import Image

from fusion_diff.errors import ConfigError

ImageInput = Union[Image.Image, str, os.PathLike]

# Before issue 20 a local checkpoint's id was "<file name>@sha256:<hex>" (VLMs: "...;prompt=<hex>").
_LEGACY_CHECKPOINT_ID = re.compile(r"^[^@;]+@(sha256:[0-9a-f]{16}(?:;.*)?)$", re.DOTALL)


@dataclass(frozen=True)
class EmbedderIdentity:
    """What makes two embedders interchangeable; caches and checkpoints compare it."""

    backend: str
    model: str
    pretrained: str | None
    dim: int
    fusion_weight: float | None = None

    # The keys that name the space itself (the backbone); ``fusion_weight`` only changes how pairs are fused.
    SPACE_KEYS: ClassVar[tuple[str, ...]] = ("backend", "model", "pretrained", "dim")
    KEYS: ClassVar[tuple[str, ...]] = (*SPACE_KEYS, "fusion_weight")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def select(cls, identity: Mapping[str, Any] | None, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The embedder's entries of a stored identity (a cache's or a prior's record holds more), ``KEYS`` by default."""
        return {k: v for k, v in (identity or {}).items() if k in (keys or cls.KEYS)}

    @classmethod
    def space_differences(cls, a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> list[str]:
        """The ``SPACE_KEYS`` on which two stored identities differ (different backbones, different spaces)."""
        return [k for k in cls.SPACE_KEYS if (a or {}).get(k) != (b or {}).get(k)]

    def describe(self) -> str:
        tag = f":{self.pretrained}" if self.pretrained else ""
        return f"{self.backend}/{self.model}{tag}"


def upgrade_identity(identity: Any) -> Any:
    """An identity (or any JSON value holding one) as written today, for comparing it with one read from disk.

    Local checkpoints are identified by their content hash alone (``sha256:<hex>``); caches, priors
    and mappers written when the file name came first (``name@sha256:<hex>``) name the same weights,
    so they keep matching after the upgrade, and a renamed file still cannot pass for other weights.
    """
    if isinstance(identity, dict):
        return {key: upgrade_identity(value) for key, value in identity.items()}
    if isinstance(identity, list):
        return [upgrade_identity(value) for value in identity]
    if isinstance(identity, str):
        return _LEGACY_CHECKPOINT_ID.sub(r"\1", identity)
    return identity


class TextTokens(NamedTuple):
    """Token-level text features: ``states [B, L, D]`` float32 (zeros where masked) and ``mask [B, L]`` bool
    (True = a real token of the text, from its first token through its end-of-text token)."""

    states: torch.Tensor
    mask: torch.Tensor


def trim_tokens(states: torch.Tensor, mask: torch.Tensor) -> TextTokens:
    """Drop the trailing columns that no row uses: a batch of short instructions costs its longest one, not
    ``max_text_tokens`` (the prior's cost grows with the number of tokens)."""
    length = max(int(mask.sum(1).max()), 1) if mask.numel() else 1
    return TextTokens(states[:, :length], mask[:, :length])


class JointEmbedder(ABC):
    """Maps images, texts and (image, text) pairs into one normalised joint space."""

    @property
    @abstractmethod
    def identity(self) -> EmbedderIdentity: ...

    @property
    def dim(self) -> int:
        return self.identity.dim

    @abstractmethod
    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """``[N, dim]`` float32 CPU tensor, rows of unit norm."""

    @abstractmethod
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """``[N, dim]`` float32 CPU tensor, rows of unit norm."""

    @abstractmethod
    def embed_pairs(
        self, images: Sequence[ImageInput], texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> torch.Tensor:
        """Fused ``f(I, T)``: ``[N, dim]`` float32 CPU tensor, rows of unit norm."""

    def encode_text_tokens(self, texts: Sequence[str], max_tokens: int, batch_size: int = 256) -> TextTokens:
        """The text tower's per-token states before pooling, for a token-level text condition.

        ``states [N, max_tokens, D]`` (``D`` = the backend's text feature size) and ``mask [N, max_tokens]``;
        a text longer than ``max_tokens`` is truncated (counted in a warning). Backends that cannot expose
        their token states say so.
        """
        raise ConfigError(
            f"{type(self).__name__} does not expose token-level text states; use pooled text (max_text_tokens: 0)."
        )

    def encode_image_tokens(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        """The image tower's per-patch states before pooling, in the joint space's coordinates: ``[N, P, D]``
        float32 (``P`` patches in raster order). For a reference control that sees *where* things are, which
        one pooled vector hides. Backends that cannot expose their patch states say so.
        """
        raise ConfigError(f"{type(self).__name__} does not expose per-patch image states; use pooled image embeddings.")

    @property
    def supports_late_fusion(self) -> bool:
        """True when ``f(I, T)`` can be computed from cached ``f(I)`` and ``f(T)`` (see ``fuse``)."""
        return False

    def fuse(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Fused embeddings from already-computed tower outputs (late-fusion backends only)."""
        raise NotImplementedError(f"{type(self).__name__} fuses inside the model; call embed_pairs instead.")
