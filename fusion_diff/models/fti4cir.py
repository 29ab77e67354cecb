"""FTI4CIR's mapping network: an image becomes one subject pseudo-word and a few attribute pseudo-words.

Fine-grained textual inversion (Lin et al., SIGIR 2024) maps the frozen backbone's *global* image
feature to a subject word ``S*`` and its *patch tokens* to up to ``max_attributes`` attribute words
``A1* ... Ar*``: ``num_queries`` learnable queries cross-attend to the patch tokens, each resulting
local feature is scored against the global feature, and only the salient ones (softmax score above
``threshold``) are kept, so ``r`` varies from image to image. Everything here is batched: the kept
features are packed to the front of a fixed ``[B, max_attributes]`` slot tensor and ``num_attributes``
says how many slots are real, so downstream code never loops over images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class FTI4CIRMapperOutput(BaseOutput):
    """Pseudo-word embeddings (in the text tower's token-embedding space) and what selected them.

    ``attribute_embeds[b, :num_attributes[b]]`` are image ``b``'s attribute words in query order; the
    remaining slots hold unselected features and must be ignored (``attribute_mask`` is False there).
    """

    subject_embeds: torch.Tensor  # [B, token_dim]
    attribute_embeds: torch.Tensor  # [B, max_attributes, token_dim]
    num_attributes: torch.Tensor  # [B] long, 1 <= r <= max_attributes
    attribute_mask: torch.Tensor  # [B, max_attributes] bool
    local_features: torch.Tensor  # [B, num_queries, embed_dim], unit norm (all queries; for the orthogonality loss)
    scores: torch.Tensor  # [B, num_queries], softmax saliency of each local feature against the global one


def _token_mlp(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """The reference's phi network: a 3-layer GELU MLP with (heavy) dropout against over-fitting."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, hidden_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, out_dim),
    )


class FTI4CIRMapper(ModelMixin, ConfigMixin):
    """Subject mapper + attribute mapper of FTI4CIR.

    Args:
        embed_dim: the backbone's joint-space dimension (global image feature; local features live here too,
            so that they can be compared with the global feature by cosine).
        patch_dim: width of the visual tower's patch tokens.
        token_dim: width of the text tower's token embeddings (the pseudo-words' space).
        num_queries: learnable queries of the attribute transformer (reference: 24).
        max_attributes: cap on kept attribute words per image (reference: 12).
        threshold: a local feature is kept when its softmax saliency exceeds this (reference: 0.05; uniform
            saliency is ``1 / num_queries``).
        score_temperature: temperature of the saliency softmax over cosines. The reference takes a softmax
            of raw dot products; cosines make the threshold independent of the backbone's feature scale.
        hidden_dim: width of the attribute transformer (default: ``patch_dim``).
        num_layers, num_heads, mlp_ratio, attention_dropout: the attribute transformer (reference: 3, 1, 2.0, 0).
        mapper_hidden_mult, mapper_dropout: the two MLPs (reference: 4x ``embed_dim``, dropout 0.5).
        embedder_identity: the backbone the mapper was trained on (``backend``, ``model``, ``pretrained``,
            ``dim``); pseudo-words only mean something to that backbone's text tower, so loaders check it.
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 512,
        patch_dim: int = 768,
        token_dim: int = 512,
        num_queries: int = 24,
        max_attributes: int = 12,
        threshold: float = 0.05,
        score_temperature: float = 0.05,
        hidden_dim: int | None = None,
        num_layers: int = 3,
        num_heads: int = 1,
        mlp_ratio: float = 2.0,
        attention_dropout: float = 0.0,
        mapper_hidden_mult: int = 4,
        mapper_dropout: float = 0.5,
        embedder_identity: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not 1 <= max_attributes <= num_queries:
            raise ValueError(f"max_attributes must be in [1, num_queries={num_queries}], got {max_attributes}")
        hidden_dim = hidden_dim or patch_dim
        self.patch_proj = nn.Linear(patch_dim, hidden_dim)
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_dim))
        layer = nn.TransformerDecoderLayer(
            d_model=hidden_dim,
            nhead=num_heads,
            dim_feedforward=int(hidden_dim * mlp_ratio),
            dropout=attention_dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.attribute_transformer = nn.TransformerDecoder(layer, num_layers=num_layers, norm=nn.LayerNorm(hidden_dim))
        self.local_proj = nn.Linear(hidden_dim, embed_dim)
        mapper_hidden = mapper_hidden_mult * embed_dim
        self.subject_mapper = _token_mlp(embed_dim, mapper_hidden, token_dim, mapper_dropout)
        self.attribute_mapper = _token_mlp(embed_dim, mapper_hidden, token_dim, mapper_dropout)

    def local_features(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, P, patch_dim]`` patch tokens -> ``[B, num_queries, embed_dim]`` unit-norm local features."""
        memory = self.patch_proj(patch_tokens)
        queries = self.queries.expand(patch_tokens.shape[0], -1, -1)
        return F.normalize(self.local_proj(self.attribute_transformer(queries, memory)), dim=-1)

    def select_attributes(
        self, image_embeds: torch.Tensor, local_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the salient local features, packed to the front in query order.

        Returns ``(selected [B, max_attributes, embed_dim], num_attributes [B], scores [B, num_queries])``.
        At least one feature is always kept (the most salient), as in the reference.
        """
        cfg = self.config
        cosine = torch.einsum("bqd,bd->bq", local_features, F.normalize(image_embeds, dim=-1))
        scores = (cosine / cfg.score_temperature).softmax(dim=-1)
        top_scores, top_index = scores.topk(cfg.max_attributes, dim=-1)  # descending
        kept = top_scores > cfg.threshold
        kept[:, 0] = True
        # Kept slots first, in query order (stable attribute order across images); the rest after them.
        order_key = torch.where(kept, top_index, top_index + cfg.num_queries)
        slot_index = top_index.gather(1, order_key.argsort(dim=-1))
        selected = local_features.gather(1, slot_index.unsqueeze(-1).expand(-1, -1, local_features.shape[-1]))
        return selected, kept.sum(dim=-1), scores

    def forward(self, image_embeds: torch.Tensor, patch_tokens: torch.Tensor) -> FTI4CIRMapperOutput:
        """``image_embeds [B, embed_dim]`` (global, any norm) and ``patch_tokens [B, P, patch_dim]``."""
        local = self.local_features(patch_tokens)
        selected, num_attributes, scores = self.select_attributes(image_embeds, local)
        slots = torch.arange(self.config.max_attributes, device=num_attributes.device)
        return FTI4CIRMapperOutput(
            subject_embeds=self.subject_mapper(F.normalize(image_embeds, dim=-1)),
            attribute_embeds=self.attribute_mapper(selected),
            num_attributes=num_attributes,
            attribute_mask=slots.unsqueeze(0) < num_attributes.unsqueeze(1),
            local_features=local,
            scores=scores,
        )
