"""Sampling pipelines and the retrieval methods built on them."""

from fusion_diff.pipelines.fti4cir import FTI4CIRMethod, FTI4CIRPipeline
from fusion_diff.pipelines.fusion_diff import (
    FusionDiffPipeline,
    FusionDiffPipelineOutput,
    GuidedDenoiser,
    guidance_weights,
)
from fusion_diff.pipelines.method import Emb2EmbMethod, FusionDiffMethod

__all__ = [
    "Emb2EmbMethod",
    "FTI4CIRMethod",
    "FTI4CIRPipeline",
    "FusionDiffMethod",
    "FusionDiffPipeline",
    "FusionDiffPipelineOutput",
    "GuidedDenoiser",
    "guidance_weights",
]
