"""What a retrieval method is, for the evaluator: a map from queries to query embeddings.

The evaluator prepares everything a method may need in a ``QueryContext`` (reference embeddings
from the cache, captioner captions, modification-text embeddings) so that methods never touch
annotation captions and never re-encode what is cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.embedding.text_checks import warn_empty_instructions
from fusion_diff.errors import ConfigError, DataError

GalleryMode = Literal["image", "fused"]


@dataclass
class QueryContext:
    """Inputs for a batch of ``Q`` composed queries, all rows aligned."""

    embedder: JointEmbedder
    query_ids: list[str]
    modification_texts: list[str]
    modification_text_embeds: torch.Tensor  # [Q, d], f(T_mod)
    reference_image_embeds: torch.Tensor  # [Q, d], f(I_ref)
    reference_image_paths: list[Path]
    reference_captions: list[str] | None = None  # from a captioner, never from annotations
    reference_fused_embeds: torch.Tensor | None = None  # [Q, d], f(I_ref, caption) when a captioner is set
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        warn_empty_instructions(self.modification_texts)


@runtime_checkable
class RetrievalMethod(Protocol):
    """A method turns a ``QueryContext`` into ``[Q, d]`` L2-normalised query embeddings."""

    name: str
    gallery_mode: GalleryMode  # which gallery embedding the method is matched against

    def protocol(self) -> dict[str, Any]:
        """Everything that defines the numbers it produces (sampler, steps, guidance, seed, ...)."""
        ...

    def query_embeddings(self, context: QueryContext) -> torch.Tensor: ...


def check_mix_weight(weight: float) -> None:
    """Refuse a ``mix_reference`` outside [0, 1] (methods call it at construction, before any work)."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"mix_reference={weight} must be in [0, 1].")


def mix_toward_reference(queries: torch.Tensor, reference: torch.Tensor, weight: float) -> torch.Tensor:
    """``normalize((1 - w) q + w ref)``: pulls unit-norm queries toward the (normalised) reference embedding.

    The reference should live in the gallery's space (``f(I_ref)`` for an image gallery), so that the
    mixed query keeps what the target shares with the reference in the space it is matched in."""
    check_mix_weight(weight)
    if weight == 0.0:
        return queries
    mixed = (1 - weight) * queries + weight * F.normalize(reference.to(queries.device, queries.dtype), dim=-1)
    return F.normalize(mixed, dim=-1)


def run_method(method: RetrievalMethod, context: QueryContext) -> torch.Tensor:
    """``[Q, d]`` unit-norm float32 CPU query embeddings of ``method`` on ``context``, checked.

    The one place queries become embeddings: the evaluator and ``ComposedRetriever.search`` both call it.
    """
    embeds = method.query_embeddings(context)
    expected = (len(context.query_ids), context.embedder.dim)
    if embeds.ndim != 2 or tuple(embeds.shape) != expected or not torch.isfinite(embeds).all():
        raise DataError(
            f"method {method.name!r} returned {tuple(embeds.shape)} query embeddings (finite: "
            f"{bool(torch.isfinite(embeds).all())}) for {expected[0]} queries; finite [Q, {expected[1]}] expected."
        )
    return F.normalize(embeds.detach().float().cpu(), dim=-1)
