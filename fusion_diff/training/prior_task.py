"""Stage 1: the diffusion prior over fused embeddings, trained on image-caption pairs.

``z0 = f(I, T)`` (standardised with per-dimension statistics computed from the data and stored in
the prior), condition = the caption's text embedding ``f(T)``, dropped with probability
``text_dropout`` (the learned null text) so that classifier-free guidance works at sampling time.
The loss is the MSE on the prior's ``prediction_type`` (z0, epsilon or v) at a uniform timestep.

``objective: regression`` trains the same network as a direct regressor instead (the ablation that asks
what the generative part adds): ``z0`` from the conditions on one fixed input (no noise, fixed timestep;
``denoise.regression_input``), with an MSE or cosine loss. The objective is stored in the prior's config,
so the saved pipeline runs it as one forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from fusion_diff.embedding.base import EmbedderIdentity
from fusion_diff.errors import MissingFileError
from fusion_diff.models.denoise import noise_scheduler, regression_input, sampling_scheduler, training_target
from fusion_diff.models.prior import OBJECTIVES, FusionPrior
from fusion_diff.pipelines.fusion_diff import FusionDiffPipeline
from fusion_diff.training.config import TrainConfig, require
from fusion_diff.training.data import CachedEmbeddingDataset, PairEmbeddingDataset
from fusion_diff.training.task import TaskSpec, ValidationFn

SAVED_SAMPLER = "ddim"  # the scheduler stored with trained pipelines (swap with pipeline.set_sampler)


@dataclass
class PriorModelConfig:
    """``FusionPrior`` shape and its noise schedule; the embedding sizes come from the data."""

    hidden_dim: int = 256
    num_layers: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    prediction_type: Literal["sample", "epsilon", "v_prediction"] = "sample"
    num_train_timesteps: int = 1000  # the cosine (squaredcos_cap_v2) schedule of fusion_diff.models.denoise
    objective: Literal["diffusion", "regression"] = "diffusion"  # regression: the direct-regression ablation
    regression_loss: Literal["mse", "cosine"] = "mse"  # objective regression only
    # 0/null: the caption's pooled text embedding (one condition token, the fast default); N >= 2: the text
    # tower's token states, up to N tokens (the pair embeddings need a text_tokens/ cache of that N).
    max_text_tokens: int | None = None

    def __post_init__(self) -> None:
        require(self.objective in OBJECTIVES, "objective", f"must be one of {list(OBJECTIVES)}")
        require(
            self.objective == "diffusion" or self.prediction_type == "sample",
            "prediction_type",
            "must be 'sample' with objective: regression (the regressor outputs z0)",
        )
        require(
            not self.max_text_tokens or self.max_text_tokens >= 2,
            "max_text_tokens",
            "must be 0/null (pooled text) or >= 2 (token-level text)",
        )
        require(
            self.hidden_dim > 0 and self.num_layers > 0 and self.num_heads > 0,
            "hidden_dim",
            "num_layers and num_heads must be > 0",
        )
        require(
            self.hidden_dim % self.num_heads == 0, "hidden_dim", f"({self.hidden_dim}) must be divisible by num_heads"
        )
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        require(self.num_train_timesteps > 1, "num_train_timesteps", "must be > 1")


@dataclass
class PriorDataConfig:
    """Where the pair-set embeddings are (``embed_pair_set``'s output: caches image/, text/, fused/)."""

    pair_embeddings: str
    text_dropout: float = 0.1  # probability of replacing the caption by the null text

    def __post_init__(self) -> None:
        require(0 <= self.text_dropout < 1, "text_dropout", "must be in [0, 1)")


@dataclass
class DenoisedBatch:
    """One denoiser call at random timesteps: its output, the regression target, and where it was made."""

    output: torch.Tensor
    target: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor

    def mse(self) -> torch.Tensor:
        return F.mse_loss(self.output.float(), self.target.float())


def denoise_random_timesteps(
    scheduler: DDPMScheduler,
    z0: torch.Tensor,
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
) -> DenoisedBatch:
    """Noise standardised ``z0`` at uniform timesteps and run ``denoise(z_t, t)`` on it."""
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator, device=z0.device
    )
    noisy = scheduler.add_noise(z0, noise, timesteps)
    target = training_target(scheduler, z0, noise, timesteps)
    return DenoisedBatch(denoise(noisy, timesteps), target, noisy, timesteps)


def denoise_for_objective(
    prior: FusionPrior,
    scheduler: DDPMScheduler,
    z0: torch.Tensor,
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
) -> DenoisedBatch:
    """One training forward of ``prior``'s objective: at random timesteps (diffusion) or on the fixed input
    of a direct regressor, whose target is ``z0`` itself."""
    if prior.config.objective == "regression":
        noisy, timesteps = regression_input(prior, z0.shape[0])
        return DenoisedBatch(denoise(noisy, timesteps), z0, noisy, timesteps)
    return denoise_random_timesteps(scheduler, z0, denoise, generator)


def objective_loss(prior: FusionPrior, denoised: DenoisedBatch, regression_loss: str = "mse") -> torch.Tensor:
    """MSE on the prediction type's target; a regressor with ``regression_loss="cosine"`` uses
    ``1 - cos(z0_hat, z0)`` on the embeddings (what retrieval ranks by) instead."""
    if prior.config.objective == "regression" and regression_loss == "cosine":
        output, target = (prior.destandardize(x.float()) for x in (denoised.output, denoised.target))
        return 1 - F.cosine_similarity(output, target, dim=-1).mean()
    return denoised.mse()


def dropout_mask(probability: float, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Bool ``[B]``: which rows drop their condition this step."""
    return torch.rand(batch_size, generator=generator, device=device) < probability


def embedder_identity(dataset: CachedEmbeddingDataset, field: str = "target") -> dict[str, Any]:
    """The backbone identity of the cache behind ``field`` (without its kind), stored in the prior."""
    return EmbedderIdentity.select(dataset.identities[field])


def build_pipeline(prior: FusionPrior, adapter: nn.Module | None = None) -> FusionDiffPipeline:
    """A ``FusionDiffPipeline`` (DDIM sampler on the prior's schedule) over the weights being trained."""
    return FusionDiffPipeline(prior=prior, scheduler=sampling_scheduler(SAVED_SAMPLER, prior), adapter=adapter)


def load_stage1(path: str | Path) -> tuple[FusionPrior, DDPMScheduler]:
    """The prior of a stage-1 output (a pipeline folder with ``prior/``) and its training noise scheduler."""
    path = Path(path)
    if not (path / "prior" / "config.json").is_file():
        raise MissingFileError(
            f"No trained prior at {path} (expected {path / 'prior'}/config.json). Train stage 1 first "
            "(fusion-diff train prior ...) or fix model.prior_path."
        )
    prior = FusionPrior.from_pretrained(str(path), subfolder="prior")  # str: configs record it as JSON
    return prior, noise_scheduler(prior)


class PriorTask:
    """``TrainingTask`` for stage 1."""

    name = "prior"

    def __init__(self, config: TrainConfig, validation_fn: ValidationFn | None = None):
        model_cfg: PriorModelConfig = config.model
        self.data_cfg: PriorDataConfig = config.data
        self.validation_fn = validation_fn
        self.dataset = PairEmbeddingDataset(self.data_cfg.pair_embeddings, model_cfg.max_text_tokens)
        dims = self.dataset.dims
        self.prior = FusionPrior(
            embedding_dim=dims["target"],
            text_embed_dim=dims["text"],
            hidden_dim=model_cfg.hidden_dim,
            num_layers=model_cfg.num_layers,
            num_heads=model_cfg.num_heads,
            mlp_ratio=model_cfg.mlp_ratio,
            dropout=model_cfg.dropout,
            prediction_type=model_cfg.prediction_type,
            num_train_timesteps=model_cfg.num_train_timesteps,
            max_text_tokens=model_cfg.max_text_tokens or 1,
            embedder_identity=embedder_identity(self.dataset),
            objective=model_cfg.objective,
        )
        self.regression_loss = model_cfg.regression_loss
        target = self.dataset.tensors["target"]
        self.prior.set_standardization(target.mean(0), target.std(0))
        self.scheduler = noise_scheduler(self.prior)

    def trainable_module(self) -> nn.Module:
        return self.prior

    def frozen_modules(self) -> Iterable[nn.Module]:
        return ()

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.dataset

    def compute_loss(self, trainable: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator):
        z0 = self.prior.standardize(batch["target"])
        drop_text = dropout_mask(self.data_cfg.text_dropout, z0.shape[0], generator, z0.device)

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            # The prior's forward is ``denoise.predict(prior, None, ...)`` (embed_tokens + decode); it is
            # called through the prepared module so that DDP synchronises the gradients.
            return trainable(
                noisy, timesteps, batch["text"], drop_text=drop_text, text_attention_mask=batch.get("text_mask")
            ).sample

        denoised = denoise_for_objective(self.prior, self.scheduler, z0, denoise, generator)
        return objective_loss(self.prior, denoised, self.regression_loss), {}

    def validate(self, trainable: nn.Module) -> dict[str, float]:
        if self.validation_fn is None:
            return {}
        return self.validation_fn(build_pipeline(trainable))

    def save_final(self, trainable: nn.Module, output_dir: Path) -> None:
        build_pipeline(trainable).save_pretrained(output_dir)


TASK = TaskSpec(name="prior", model_config=PriorModelConfig, data_config=PriorDataConfig, build=PriorTask)
