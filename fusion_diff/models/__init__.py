"""Networks: the fused-embedding diffusion prior, its Control-Adapter, and the shared denoiser call."""

from fusion_diff.models.control_adapter import ControlAdapter, default_num_blocks
from fusion_diff.models.denoise import (
    SAMPLERS,
    noise_scheduler,
    predict,
    predicted_sample,
    sampler_name,
    sampling_scheduler,
    scheduler_config,
    training_target,
)
from fusion_diff.models.fti4cir import FTI4CIRMapper, FTI4CIRMapperOutput
from fusion_diff.models.prior import FusionPrior, FusionPriorOutput

__all__ = [
    "SAMPLERS",
    "ControlAdapter",
    "FTI4CIRMapper",
    "FTI4CIRMapperOutput",
    "FusionPrior",
    "FusionPriorOutput",
    "default_num_blocks",
    "noise_scheduler",
    "predict",
    "predicted_sample",
    "sampler_name",
    "sampling_scheduler",
    "scheduler_config",
    "training_target",
]
