"""What a retrieval method is, for the evaluator: a map from queries to query embeddings.

The evaluator prepares everything a method may need in a ``QueryContext`` (reference embeddings
from the cache, captioner captions, modification-text embeddings) so that methods never touch
annotation captions and never re-encode what is cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.embedding.text_checks import warn_empty_instructions
from fusion_diff.errors import ConfigError, DataError

GalleryMode = Literal["image", "fused"]
SampleReduction = Literal["mean", "max", "lse"]
SAMPLE_REDUCTIONS = ("mean", "max", "lse")


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


@dataclass(frozen=True)
class SampleScoring:
    """How a query's ``N`` sampled embeddings score a gallery item: one score from ``N`` similarities.

    ``mean`` averages the samples into one query (the similarity to their mean, ranked like the mean of the
    similarities): a point estimate. ``max`` scores an item by its best sample, ``lse`` by the soft maximum
    ``T * (logsumexp(s / T) - log N)`` (``T`` -> 0: max; large ``T``: mean), so that a generative model can put
    several plausible targets at the top. With ``N = 1`` every reduction is the plain similarity.
    """

    reduction: SampleReduction = "mean"
    temperature: float = 0.05  # lse only

    def __post_init__(self) -> None:
        if self.reduction not in SAMPLE_REDUCTIONS:
            raise ConfigError(f"sample_reduction={self.reduction!r}; choose one of {SAMPLE_REDUCTIONS}.")
        if not self.temperature > 0:
            raise ConfigError(f"sample_temperature={self.temperature} must be > 0.")

    @property
    def per_sample(self) -> bool:
        """True when the samples stay apart until scoring (queries ``[Q, N, d]``), False for one averaged query."""
        return self.reduction != "mean"

    def reduce(self, scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Reduce per-sample similarities along ``dim`` (the sample axis)."""
        if self.reduction == "max":
            return scores.amax(dim)
        if self.reduction == "lse":
            t = self.temperature
            return t * (torch.logsumexp(scores / t, dim) - math.log(scores.shape[dim]))
        return scores.mean(dim)

    def describe(self) -> dict[str, Any]:
        """Protocol entries: the reduction, and the temperature where it matters."""
        return {
            "sample_reduction": self.reduction,
            **({"sample_temperature": self.temperature} if self.reduction == "lse" else {}),
        }


AVERAGED = SampleScoring()  # one averaged query per composed query: what a method without ``sample_scoring`` does


def sample_scoring(method: Any) -> SampleScoring:
    """The method's ``sample_scoring`` (averaged samples when it has none)."""
    return getattr(method, "sample_scoring", AVERAGED)


@runtime_checkable
class RetrievalMethod(Protocol):
    """A method turns a ``QueryContext`` into ``[Q, d]`` L2-normalised query embeddings.

    A method may keep ``N`` samples per query apart for scoring: it then has a ``sample_scoring``
    (``SampleScoring`` with ``per_sample`` True) and returns ``[Q, N, d]``; the gallery index reduces the
    ``N`` similarities of each item (``search(..., scoring=...)``).
    """

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
    mixed query keeps what the target shares with the reference in the space it is matched in. Queries
    ``[Q, N, d]`` (several samples per query) are each mixed toward their query's reference ``[Q, d]``."""
    check_mix_weight(weight)
    if weight == 0.0:
        return queries
    reference = F.normalize(reference.to(queries.device, queries.dtype), dim=-1)
    if queries.ndim == 3:
        reference = reference.unsqueeze(1)
    mixed = (1 - weight) * queries + weight * reference
    return F.normalize(mixed, dim=-1)


def run_method(method: RetrievalMethod, context: QueryContext) -> torch.Tensor:
    """``[Q, d]`` unit-norm float32 CPU query embeddings of ``method`` on ``context``, checked; ``[Q, N, d]`` (one
    row per sample) for a method whose ``sample_scoring`` keeps its samples apart.

    The one place queries become embeddings: the evaluator and ``ComposedRetriever.search`` both call it.
    """
    embeds = method.query_embeddings(context)
    q, d = len(context.query_ids), context.embedder.dim
    per_sample = sample_scoring(method).per_sample
    shape_ok = embeds.ndim == (3 if per_sample else 2) and embeds.shape[0] == q and embeds.shape[-1] == d
    if not shape_ok or not torch.isfinite(embeds).all():
        expected = f"[Q, N, {d}]" if per_sample else f"[Q, {d}]"
        raise DataError(
            f"method {method.name!r} returned {tuple(embeds.shape)} query embeddings (finite: "
            f"{bool(torch.isfinite(embeds).all())}) for {q} queries; finite {expected} expected."
        )
    return F.normalize(embeds.detach().float().cpu(), dim=-1)
