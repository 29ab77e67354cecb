"""Stage 2: the Control-Adapter on synthetic triplets, with the stage-1 prior frozen.

Target ``z0 = f(I_tgt, T_tgt)``; text condition = the instruction's embedding (through the prior's
own text input); control = the reference's fused embedding ``f(I_ref, T_ref)`` (or ``f(I_ref)``
with ``control_source: image``). Text and control are dropped independently, so sampling can use
two guidance scales. Only the adapter's parameters are in the optimiser; the prior is loaded with
``from_pretrained``, set to eval and ``requires_grad_(False)``, and stays bit-identical.

The objective (diffusion, or the direct-regression ablation) is the stage-1 prior's. ``prior_init: random``
is the no-stage-1 ablation: the prior at ``prior_path`` gives only the architecture (and backbone identity);
its weights are re-initialised (seeded by the run's seed), its standardisation is computed from the triplet
targets, and that frozen random prior is what the adapter is trained on and saved with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fusion_diff.embedding.base import EmbedderIdentity
from fusion_diff.errors import CacheMismatchError, ConfigError
from fusion_diff.models.control_adapter import ControlAdapter
from fusion_diff.models.denoise import predict, predicted_sample
from fusion_diff.models.prior import FusionPrior
from fusion_diff.training.config import TrainConfig, require
from fusion_diff.training.data import TripletEmbeddingDataset, check_text_condition, describe_text_condition
from fusion_diff.training.prior_task import (
    DenoisedBatch,
    build_pipeline,
    denoise_for_objective,
    dropout_mask,
    embedder_identity,
    load_stage1,
    objective_loss,
)
from fusion_diff.training.task import TaskSpec, ValidationFn


@dataclass
class AdapterModelConfig:
    """The frozen stage-1 prior, the adapter built from it, and the adapter's loss.

    ``contrastive_weight`` adds an InfoNCE term on the model's ``z0`` estimate: each fully
    conditioned row must score its own target above the batch's other targets (cosine / temperature),
    so that what the adapter learns is what retrieval rewards, not only the mean of the target
    distribution. The diffusion MSE stays the main term. Measured on the shapes world (weight 1,
    temperature 0.05, 800 steps, val R@1 with the demo's query settings): 17.4 vs 19.8 without it
    (fused gallery 12.6 vs 14.0, though R@50 82.0 vs 77.8); so it is off by default. With ``data.near_misses``
    each row's own near misses (scenes that narrowly miss its edit) join the batch's targets as negatives
    (README, "Removals: where they fail", 6.: no gain either).
    """

    prior_path: str  # a stage-1 output folder (prior/ and scheduler/)
    num_blocks: int | None = None  # prior blocks copied; null: the largest K within 25% of the prior's size
    conditioning_scale: float = 1.0
    contrastive_weight: float = 0.0  # 0: the diffusion loss alone
    contrastive_temperature: float = 0.05
    # pretrained: the stage-1 weights; random: the no-stage-1 ablation (the prior's architecture, fresh weights)
    prior_init: Literal["pretrained", "random"] = "pretrained"
    regression_loss: Literal["mse", "cosine"] = "mse"  # a regression prior (objective from stage 1) only
    # The text condition is the frozen prior's: null follows it; a value (0 = pooled) must match it.
    max_text_tokens: int | None = None

    def __post_init__(self) -> None:
        require(self.num_blocks is None or self.num_blocks > 0, "num_blocks", "must be > 0 or null")
        require(self.contrastive_weight >= 0, "contrastive_weight", "must be >= 0")
        require(self.contrastive_temperature > 0, "contrastive_temperature", "must be > 0")


@dataclass
class AdapterDataConfig:
    """Where the triplet embeddings are (``embed_triplets``' output) and how conditions are dropped."""

    triplet_embeddings: str
    control_source: Literal["fused", "image"] = "fused"  # f(I_ref, T_ref) or f(I_ref)
    text_dropout: float = 0.1
    control_dropout: float = 0.1
    # > 0: that many near misses per triplet (near_miss_fused/, embed_triplets' near_misses) join the contrastive
    # term as each row's own explicit negatives; needs model.contrastive_weight > 0
    near_misses: int = 0

    def __post_init__(self) -> None:
        require(0 <= self.text_dropout < 1, "text_dropout", "must be in [0, 1)")
        require(0 <= self.control_dropout < 1, "control_dropout", "must be in [0, 1)")
        require(self.near_misses >= 0, "near_misses", "must be >= 0")


class AdapterTask:
    """``TrainingTask`` for stage 2."""

    name = "adapter"

    def __init__(self, config: TrainConfig, validation_fn: ValidationFn | None = None):
        model_cfg: AdapterModelConfig = config.model
        self.data_cfg: AdapterDataConfig = config.data
        self.validation_fn = validation_fn
        self.conditioning_scale = model_cfg.conditioning_scale
        self.contrastive_weight = model_cfg.contrastive_weight
        self.contrastive_temperature = model_cfg.contrastive_temperature
        self.regression_loss = model_cfg.regression_loss
        self.prior, self.scheduler = load_stage1(model_cfg.prior_path)
        self._check_text_condition(model_cfg)
        if self.data_cfg.near_misses and not self.contrastive_weight:
            raise ConfigError(
                f"data.near_misses={self.data_cfg.near_misses} feeds the contrastive term, which is off "
                "(model.contrastive_weight=0). Set model.contrastive_weight > 0 (e.g. 0.1) or data.near_misses=0."
            )
        self.dataset = TripletEmbeddingDataset(
            self.data_cfg.triplet_embeddings, self.data_cfg.control_source, self.prior.text_tokens,
            self.data_cfg.near_misses,
        )  # fmt: skip
        check_text_condition(
            self.prior.text_tokens,
            self.dataset.text_tokens(),
            f"The prior at {model_cfg.prior_path}",
            str(self.dataset.roots["text"]),
        )
        self._check_backbone(model_cfg.prior_path)
        if model_cfg.prior_init == "random":
            self.prior = random_prior_like(self.prior, self.dataset.tensors["target"])
        self.prior.requires_grad_(False)
        self.prior.eval()
        self.adapter = ControlAdapter.from_prior(self.prior, num_blocks=model_cfg.num_blocks)

    def _check_text_condition(self, model_cfg: AdapterModelConfig) -> None:
        """The adapter's text goes in through the frozen prior: a stage-2 setting must agree with the prior's."""
        asked = model_cfg.max_text_tokens
        if asked is not None and (asked or None) != self.prior.text_tokens:
            raise CacheMismatchError(
                f"Stage 2 asks for {describe_text_condition(asked)} (model.max_text_tokens={asked}) but the prior at "
                f"{model_cfg.prior_path} was trained on {describe_text_condition(self.prior.text_tokens)}. Drop "
                "model.max_text_tokens (it follows the prior) or train a prior with that setting."
            )

    def _check_backbone(self, prior_path: str) -> None:
        """Refuse triplets embedded by another backbone than the prior's pairs (their spaces differ)."""
        trained_on = EmbedderIdentity.select(self.prior.config.embedder_identity)
        data = embedder_identity(self.dataset)
        differ = sorted(EmbedderIdentity.space_differences(trained_on, data))
        if trained_on and differ:
            raise CacheMismatchError(
                f"The prior at {prior_path} was trained on {trained_on} but the triplets in "
                f"{self.data_cfg.triplet_embeddings} were embedded with {data} (differing: {differ}). "
                "Embed the triplets with the prior's backbone, or train a prior on this backbone."
            )

    def trainable_module(self) -> nn.Module:
        return self.adapter

    def frozen_modules(self) -> Iterable[nn.Module]:
        return (self.prior,)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.dataset

    def compute_loss(self, trainable: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator):
        z0 = self.prior.standardize(batch["target"])
        b, device = z0.shape[0], z0.device
        drop_text = dropout_mask(self.data_cfg.text_dropout, b, generator, device)
        drop_control = dropout_mask(self.data_cfg.control_dropout, b, generator, device)

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return predict(
                self.prior, trainable, noisy, timesteps, batch["text"], batch["control"],
                drop_text, drop_control, self.conditioning_scale, batch.get("text_mask"),
            )  # fmt: skip

        denoised = denoise_for_objective(self.prior, self.scheduler, z0, denoise, generator)
        main = objective_loss(self.prior, denoised, self.regression_loss)
        if not self.contrastive_weight:
            return main, {}
        contrastive = self.contrastive_loss(
            denoised, batch["target"], ~(drop_text | drop_control), batch.get("near_miss")
        )
        main_name = (
            "cosine" if self.prior.config.objective == "regression" and self.regression_loss == "cosine" else "mse"
        )
        return main + self.contrastive_weight * contrastive, {main_name: main.item(), "contrastive": contrastive.item()}

    def contrastive_loss(
        self,
        denoised: DenoisedBatch,
        targets: torch.Tensor,
        rows: torch.Tensor,
        near_misses: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """InfoNCE of the fully conditioned ``rows``' z0 estimates against every target of the batch and, with
        ``near_misses [B, M, d]``, each row's own near misses (the scenes its instruction must not retrieve)."""
        if not rows.any():  # every row dropped a condition (tiny batches): nothing to contrast
            return denoised.output.new_zeros(())
        z0 = predicted_sample(self.scheduler, denoised.noisy, denoised.output, denoised.timesteps)
        queries = F.normalize(self.prior.destandardize(z0[rows]).float(), dim=-1)
        logits = queries @ F.normalize(targets.float(), dim=-1).T
        if near_misses is not None:
            own = F.normalize(near_misses[rows].float(), dim=-1)
            logits = torch.cat([logits, torch.einsum("rd,rmd->rm", queries, own)], dim=1)
        return F.cross_entropy(logits / self.contrastive_temperature, rows.nonzero().squeeze(1))

    def validate(self, trainable: nn.Module) -> dict[str, float]:
        if self.validation_fn is None:
            return {}
        return self.validation_fn(build_pipeline(self.prior, trainable))

    def save_final(self, trainable: nn.Module, output_dir: Path) -> None:
        build_pipeline(self.prior, trainable).save_pretrained(output_dir)


def random_prior_like(prior: FusionPrior, targets: torch.Tensor) -> FusionPrior:
    """A freshly initialised prior of ``prior``'s configuration, standardised with ``targets``' statistics."""
    fresh = FusionPrior.from_config(prior.config).to(device=prior.device, dtype=prior.dtype)
    fresh.set_standardization(targets.mean(0), targets.std(0))
    return fresh


TASK = TaskSpec(name="adapter", model_config=AdapterModelConfig, data_config=AdapterDataConfig, build=AdapterTask)
