"""Stage 2 of Fusion-Diff: the Control-Adapter, a ControlNet for the prior's transformer.

The prior stays frozen. The adapter holds trainable copies of the prior's first ``K`` blocks; it
reads the prior's input tokens plus the embedded control signal (the reference's fused
embedding), and returns one residual per copied block that the prior adds after its block ``i``.
The control projection and every residual projection start at zero, so a fresh adapter leaves the
prior's output bit-for-bit unchanged and training starts from the stage-1 model.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.controlnets.controlnet import zero_module
from torch import nn

from fusion_diff.errors import ConfigError
from fusion_diff.models.prior import FusionPrior, TransformerBlock

MAX_PARAMETER_FRACTION = 0.25  # default K: the largest adapter within this share of the prior's size


def _adapter_num_parameters(prior: FusionPrior, num_blocks: int) -> int:
    """Exact parameter count of ``ControlAdapter.from_prior(prior, num_blocks)`` without building it."""
    hidden, control_dim = prior.config.hidden_dim, prior.config.embedding_dim
    per_block = sum(p.numel() for p in prior.blocks[0].parameters())
    control = control_dim * hidden + hidden + control_dim  # projection + null control embedding
    residual = hidden * hidden + hidden
    return control + num_blocks * (per_block + residual)


def default_num_blocks(prior: FusionPrior) -> int:
    """The largest ``K`` whose adapter has at most 25% of the prior's parameters (at least 1)."""
    budget = MAX_PARAMETER_FRACTION * prior.num_parameters()
    fitting = [k for k in range(1, len(prior.blocks) + 1) if _adapter_num_parameters(prior, k) <= budget]
    return max(fitting, default=1)


class ControlAdapter(ModelMixin, ConfigMixin):
    """Trainable copy of the prior's first ``num_blocks`` blocks that turns a control embedding into residuals.

    Build it with ``ControlAdapter.from_prior(prior, num_blocks=K)``; the constructor alone gives
    fresh (not copied) blocks and exists for ``from_pretrained``.
    """

    @register_to_config
    def __init__(
        self,
        control_dim: int = 512,
        hidden_dim: int = 256,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_blocks: int = 2,
    ):
        super().__init__()
        self.control_proj = zero_module(nn.Linear(control_dim, hidden_dim))
        # Replaces the control of rows whose control is dropped (classifier-free guidance).
        self.null_control_embedding = nn.Parameter(torch.randn(control_dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_dim, num_heads, mlp_ratio, dropout) for _ in range(num_blocks)
        )
        self.residual_projs = nn.ModuleList(zero_module(nn.Linear(hidden_dim, hidden_dim)) for _ in range(num_blocks))

    @classmethod
    def from_prior(cls, prior: FusionPrior, num_blocks: int | None = None) -> ControlAdapter:
        """An adapter whose blocks are copies of ``prior.blocks[:num_blocks]`` (default: ``default_num_blocks``).

        The control is a joint-space embedding, so its size is the prior's ``embedding_dim``.
        """
        cfg = prior.config
        num_blocks = default_num_blocks(prior) if num_blocks is None else num_blocks
        if not 1 <= num_blocks <= cfg.num_layers:
            raise ConfigError(
                f"ControlAdapter.from_prior: num_blocks={num_blocks}; the prior has {cfg.num_layers} blocks, "
                f"so choose 1..{cfg.num_layers}."
            )
        adapter = cls(
            control_dim=cfg.embedding_dim,
            hidden_dim=cfg.hidden_dim,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            dropout=cfg.dropout,
            num_blocks=num_blocks,
        )
        for copy, original in zip(adapter.blocks, prior.blocks):
            copy.load_state_dict(original.state_dict())
        if prior.dtype != adapter.dtype:
            adapter = adapter.to(dtype=prior.dtype)
        return adapter.to(prior.device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        control: torch.Tensor,
        drop_control: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """Residuals ``[B, tokens, hidden]``, one per copied block, already times ``conditioning_scale``.

        ``hidden_states``/``attention_mask``: from ``FusionPrior.embed_tokens``; ``control [B, d]``:
        the control embedding standardised with the prior's statistics (``denoise.predict`` does it);
        ``drop_control`` (bool ``[B]``) swaps in the learned null control embedding.
        """
        if drop_control is not None:
            control = torch.where(drop_control[:, None], self.null_control_embedding.to(control.dtype), control)
        hidden_states = hidden_states + self.control_proj(control)[:, None]
        residuals = []
        for block, proj in zip(self.blocks, self.residual_projs):
            hidden_states = block(hidden_states, attention_mask)
            residuals.append(proj(hidden_states) * conditioning_scale)
        return residuals
