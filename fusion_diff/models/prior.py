"""Stage 1 of Fusion-Diff: a diffusion prior over fused (image + text) embeddings.

The prior diffuses the embedding ``z`` itself (no VAE). It is a small pre-LN transformer over a
handful of tokens: the text condition (one pooled token by default, or ``L`` token-level
features), the timestep, the noisy ``z`` and a learned output query whose final state is read
out. Few tokens keep it fast on a CPU (a 77-token text sequence costs ~20x more per forward).

Embeddings are standardised per dimension with statistics stored in the model, because unit-norm
``z`` has per-dimension spread of ~1/sqrt(d): far too small for unit-variance Gaussian noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.utils import BaseOutput
from torch import nn

from fusion_diff.errors import ConfigError, DataError

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
# "diffusion": a denoiser sampled with a scheduler; "regression": the same network trained to output z0 from its
# conditions on one fixed input (the direct-regression ablation; see ``denoise.regression_input``).
OBJECTIVES = ("diffusion", "regression")

# Tokens that follow the text tokens, in order: timestep, noisy z, output query.
_NUM_EXTRA_TOKENS = 3


@dataclass
class FusionPriorOutput(BaseOutput):
    """``sample``: the model output in the prior's ``prediction_type`` (standardised space), ``[B, d]``."""

    sample: torch.Tensor


class TransformerBlock(nn.Module):
    """Pre-LN transformer block (attention + MLP) on ``scaled_dot_product_attention``.

    Shared by the prior and the Control-Adapter, whose blocks are weight copies of the prior's.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = hidden_states.shape
        qkv = self.qkv(self.norm1(hidden_states)).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )
        hidden_states = hidden_states + self.attn_out(attn.transpose(1, 2).reshape(b, n, c))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class FusionPrior(ModelMixin, ConfigMixin):
    """Transformer denoiser ``(noisy z_t, t, text) -> z0 | epsilon | v`` in standardised embedding space.

    Args:
        embedding_dim: size ``d`` of the joint-space embeddings it generates.
        text_embed_dim: size of the text condition (defaults to ``embedding_dim``).
        hidden_dim, num_layers, num_heads, mlp_ratio, dropout: transformer shape.
        prediction_type: ``"sample"`` (predict ``z0``, the default), ``"epsilon"`` or ``"v_prediction"``;
            the schedulers built by ``fusion_diff.models.denoise`` use the same value.
        num_train_timesteps: length of the training noise schedule.
        max_text_tokens: 1 for a pooled text embedding ``[B, dt]``; more accepts token-level text
            ``[B, L, dt]`` with ``L <= max_text_tokens`` (slower; meant for GPUs).
        embedder_identity: the ``JointEmbedder.identity`` dict of the backbone it was trained on, so
            that a pipeline refuses an embedder of another backbone.
        objective: ``"diffusion"`` (default) or ``"regression"``: trained to output ``z0`` directly from the
            fixed input of ``denoise.regression_input``; the pipeline then runs one forward, no sampler.
    """

    @register_to_config
    def __init__(
        self,
        embedding_dim: int = 512,
        text_embed_dim: int | None = None,
        hidden_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        prediction_type: str = "sample",
        num_train_timesteps: int = 1000,
        max_text_tokens: int = 1,
        embedder_identity: dict[str, Any] | None = None,
        objective: str = "diffusion",
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ConfigError(f"FusionPrior: objective={objective!r}; choose one of {OBJECTIVES}.")
        if objective == "regression" and prediction_type != "sample":
            raise ConfigError(
                f"FusionPrior: objective='regression' outputs z0, so prediction_type must be 'sample', not "
                f"{prediction_type!r}."
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"FusionPrior: prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}.")
        if hidden_dim % num_heads:
            raise ConfigError(f"FusionPrior: hidden_dim={hidden_dim} must be divisible by num_heads={num_heads}.")
        if max_text_tokens < 1:
            raise ConfigError(f"FusionPrior: max_text_tokens={max_text_tokens} must be >= 1.")
        text_dim = text_embed_dim or embedding_dim

        self.time_proj = Timesteps(hidden_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(hidden_dim, hidden_dim)
        # Text features are unit-norm (tiny per-dimension values): normalise before projecting.
        self.text_norm = nn.LayerNorm(text_dim)
        self.text_proj = nn.Linear(text_dim, hidden_dim)
        self.sample_proj = nn.Linear(embedding_dim, hidden_dim)
        self.query_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn(1, max_text_tokens + _NUM_EXTRA_TOKENS, hidden_dim) * 0.02)
        # Replaces the text of rows whose text is dropped (classifier-free guidance).
        self.null_text_embedding = nn.Parameter(torch.randn(text_dim) / math.sqrt(text_dim))

        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, embedding_dim)

        self.register_buffer("embedding_mean", torch.zeros(embedding_dim))
        self.register_buffer("embedding_std", torch.ones(embedding_dim))

    @property
    def text_tokens(self) -> int | None:
        """``max_text_tokens`` of a token-level text condition; None for pooled text (``max_text_tokens == 1``)."""
        return self.config.max_text_tokens if self.config.max_text_tokens > 1 else None

    # ---- standardisation ---------------------------------------------------------------------

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, min_std: float = 1e-6) -> None:
        """Store per-dimension statistics of the training ``z0`` (std floored at ``min_std``)."""
        d = self.config.embedding_dim
        mean, std = torch.as_tensor(mean).flatten(), torch.as_tensor(std).flatten()
        if mean.shape != (d,) or std.shape != (d,):
            raise DataError(
                f"FusionPrior.set_standardization: expected mean and std of shape ({d},), got "
                f"{tuple(mean.shape)} and {tuple(std.shape)}. Compute them over embeddings of the prior's dimension."
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise DataError(
                "FusionPrior.set_standardization: mean/std contain NaN or inf; check the training embeddings."
            )
        self.embedding_mean.copy_(mean)
        self.embedding_std.copy_(std.clamp_min(min_std))

    def standardize(self, embeds: torch.Tensor) -> torch.Tensor:
        return (embeds - self.embedding_mean) / self.embedding_std

    def destandardize(self, sample: torch.Tensor) -> torch.Tensor:
        return sample * self.embedding_std + self.embedding_mean

    # ---- forward, in two halves so that an adapter can read the input tokens -----------------

    def embed_tokens(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        text_embeds: torch.Tensor,
        drop_text: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input token sequence ``[B, L + 3, hidden]`` and the SDPA attention mask (``None`` if unmasked).

        ``drop_text`` (bool ``[B]``) swaps in the learned null text embedding; a dropped row attends
        to exactly one (null) text token, whatever its padding mask said.
        """
        b = sample.shape[0]
        text = text_embeds[:, None] if text_embeds.dim() == 2 else text_embeds
        num_text = text.shape[1]
        if num_text > self.config.max_text_tokens:
            raise ConfigError(
                f"FusionPrior: got {num_text} text tokens but the model was built with "
                f"max_text_tokens={self.config.max_text_tokens}; pass pooled text [B, dt] or rebuild the prior."
            )
        if drop_text is not None:
            text = torch.where(drop_text[:, None, None], self.null_text_embedding.to(text.dtype), text)

        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        time_token = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        tokens = torch.cat(
            [
                self.text_proj(self.text_norm(text)),
                time_token[:, None],
                self.sample_proj(sample)[:, None],
                self.query_token.expand(b, -1, -1),
            ],
            dim=1,
        )
        max_text = self.config.max_text_tokens
        if num_text == max_text:
            positions = self.positional_embedding
        else:
            positions = torch.cat([self.positional_embedding[:, :num_text], self.positional_embedding[:, max_text:]], 1)
        hidden_states = tokens + positions

        attention_mask = None
        if text_attention_mask is not None:
            keep = text_attention_mask.to(torch.bool)
            if drop_text is not None:
                only_first = torch.zeros_like(keep)
                only_first[:, 0] = True
                keep = torch.where(drop_text[:, None], only_first, keep)
            keep = torch.cat([keep, keep.new_ones(b, _NUM_EXTRA_TOKENS)], dim=1)
            attention_mask = keep[:, None, None, :]
        return hidden_states, attention_mask

    def decode(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        block_residuals: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the blocks (adding ``block_residuals[i]`` after block ``i``) and read the output query."""
        if block_residuals is not None and len(block_residuals) > len(self.blocks):
            raise ConfigError(
                f"FusionPrior: got {len(block_residuals)} block residuals for {len(self.blocks)} blocks; "
                "the Control-Adapter was built for another prior."
            )
        for i, block in enumerate(self.blocks):
            hidden_states = block(hidden_states, attention_mask)
            if block_residuals is not None and i < len(block_residuals):
                hidden_states = hidden_states + block_residuals[i]
        return self.proj_out(self.norm_out(hidden_states[:, -1]))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        text_embeds: torch.Tensor,
        drop_text: torch.Tensor | None = None,
        block_residuals: list[torch.Tensor] | None = None,
        text_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FusionPriorOutput | tuple[torch.Tensor]:
        """Predict from standardised noisy ``sample [B, d]`` at ``timestep [B]`` given ``text_embeds``.

        ``text_embeds``: pooled ``[B, dt]`` or token-level ``[B, L, dt]`` (with an optional bool
        ``text_attention_mask [B, L]``, True = real token).
        """
        hidden_states, attention_mask = self.embed_tokens(sample, timestep, text_embeds, drop_text, text_attention_mask)
        out = self.decode(hidden_states, attention_mask, block_residuals)
        return FusionPriorOutput(sample=out) if return_dict else (out,)
