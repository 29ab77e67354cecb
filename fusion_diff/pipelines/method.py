"""Fusion-Diff and emb2emb as ``RetrievalMethod``s for the evaluator.

Both read only what the evaluator prepared in the ``QueryContext``: the modification-text
embeddings, and the reference's fused embedding (captioner caption) or, without a captioner,
its image embedding. ``protocol()`` names every setting that moves the numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from fusion_diff.captioning.editor import CaptionEditor, edited_caption_embeddings, load_caption_editor
from fusion_diff.errors import ConfigError, DataError
from fusion_diff.pipelines.fusion_diff import FusionDiffPipeline, FusionDiffPipelineOutput
from fusion_diff.retrieval.method import (
    GalleryMode,
    QueryContext,
    SampleReduction,
    SampleScoring,
    mix_toward_reference,
)
from fusion_diff.retrieval.rerank import standardize_rows

ControlMode = Literal["auto", "fused", "image"]
CONTROL_MODES = ("auto", "fused", "image")


class _SamplingMethod:
    """What both methods share: the pipeline, the reference embedding choice, the seed, the protocol."""

    name: str
    gallery_mode: GalleryMode

    def __init__(
        self,
        pipeline: FusionDiffPipeline,
        control_mode: ControlMode,
        seed: int,
        num_inference_steps: int,
        text_guidance: float,
        num_samples: int,
        mix_reference: float,
        gallery_mode: GalleryMode,
        batch_size: int,
        precision: str,
    ):
        if control_mode not in CONTROL_MODES:
            raise ConfigError(f"control_mode={control_mode!r}; choose one of {CONTROL_MODES}.")
        self.pipeline = pipeline
        self.control_mode = control_mode
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.text_guidance = text_guidance
        self.num_samples = num_samples
        self.mix_reference = mix_reference
        self.gallery_mode = gallery_mode
        self.batch_size = batch_size
        self.precision = precision
        self.control_used: str | None = None  # "fused" or "image", once queries have run

    def bind(self, context: QueryContext) -> None:
        """Use the evaluator's backbone, refused when the prior was trained on another one."""
        if self.pipeline.embedder is not context.embedder:
            self.pipeline.bind_embedder(context.embedder)

    def reference_embeds(self, context: QueryContext) -> torch.Tensor:
        """``f(I_ref, caption)`` when the context has it (and the mode allows), else ``f(I_ref)``."""
        fused = context.reference_fused_embeds
        if self.control_mode == "fused" and fused is None:
            raise DataError(
                f"{self.name}: control_mode='fused' needs reference_fused_embeds in the QueryContext; "
                "configure a captioner for the references (or use control_mode='image')."
            )
        use_fused = fused is not None and self.control_mode != "image"
        self.control_used = "fused" if use_fused else "image"
        return fused if use_fused else context.reference_image_embeds

    def gallery_reference(self, context: QueryContext) -> torch.Tensor:
        """The reference as the gallery embeds it, the anchor of ``mix_reference``: ``f(I_ref)`` for an
        image gallery, the control embedding for a fused one."""
        return context.reference_image_embeds if self.gallery_mode == "image" else self.reference_embeds(context)

    def mix(self, queries: torch.Tensor, context: QueryContext) -> torch.Tensor:
        return mix_toward_reference(queries, self.gallery_reference(context), self.mix_reference)

    def text_condition(
        self, context: QueryContext, texts: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embeds, mask)`` of the modification texts (or ``texts``) in the prior's kind of text condition:
        the context's pooled embeddings, or the token states of one batched text-tower forward (mask None: pooled)."""
        if texts is not None:
            return self.pipeline.text_condition(texts, context.embedder)
        return self.pipeline.text_condition(
            context.modification_texts, context.embedder, context.modification_text_embeds
        )

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)

    def protocol(self) -> dict[str, Any]:
        prior_cfg = self.pipeline.prior.config
        embedder = self.pipeline.embedder
        return {
            "method": self.name,
            "sampler": self.pipeline.sampler,
            "prediction_type": prior_cfg.prediction_type,
            "objective": prior_cfg.objective,
            "steps": self.num_inference_steps if prior_cfg.objective == "diffusion" else "1 forward (regression)",
            "text_guidance": self.text_guidance,
            "num_samples": self.num_samples,
            "mix_reference": self.mix_reference,
            "mix_anchor": "f(I_ref)" if self.gallery_mode == "image" else "control",
            "seed": self.seed,
            "precision": self.precision,
            "text_condition": f"tokens<={prior_cfg.max_text_tokens}" if self.pipeline.prior.text_tokens else "pooled",
            "control_mode": self.control_mode,
            "control_used": self.control_used,
            "gallery_mode": self.gallery_mode,
            "prior_trained_on": prior_cfg.embedder_identity,
            "embedder": embedder.identity.as_dict() if embedder is not None else None,
        }


class FusionDiffMethod(_SamplingMethod):
    """Prior + Control-Adapter: text = modification text, control = the reference's embedding.

    ``sample_reduction``: ``mean`` averages the ``num_samples`` samples into one query; ``max`` / ``lse`` keep
    them apart and score each gallery item by its best / soft-best sample (``SampleScoring``), so that
    several plausible targets can all rank high.

    ``caption_editor`` + ``edited_caption_weight`` w: the query becomes ``normalize(q + w f(edited caption))``, the
    reference's captioner caption edited as the instruction says (``fusion_diff.captioning.editor``): what the
    target's caption should say, which a removal needs and the sampled embedding keeps wrong (issue 18).

    ``rerank_top_k`` K > 0 re-ranks each query's first K hits by the diffusion loss of each candidate under the
    query's conditions (``FusionDiffPipeline.denoising_error`` at ``rerank_timesteps``, ``rerank_draws`` noises
    each): new score = z(first-stage score) - ``rerank_weight`` * z(error), z standardising over the K. The prior
    then scores how likely each candidate is as the target, which a regressor cannot (``retrieval.rerank``).
    """

    def __init__(
        self,
        pipeline: FusionDiffPipeline,
        num_inference_steps: int = 10,
        control_guidance: float = 1.5,
        text_guidance: float = 1.5,
        num_samples: int = 1,
        mix_reference: float = 0.0,
        seed: int = 0,
        control_mode: ControlMode = "auto",
        conditioning_scale: float = 1.0,
        gallery_mode: GalleryMode = "fused",
        batch_size: int = 1024,
        precision: str = "fp32",
        name: str = "fusion-diff",
        negative_text: str = "",
        shared_noise: bool = False,
        sample_reduction: SampleReduction = "mean",
        sample_temperature: float = 0.05,
        caption_editor: str | os.PathLike | CaptionEditor | None = None,
        edited_caption_weight: float = 0.0,
        rerank_top_k: int = 0,
        rerank_weight: float = 4.0,
        rerank_timesteps: Sequence[int] = (300, 600),
        rerank_draws: int = 2,
    ):
        self.sample_scoring = SampleScoring(sample_reduction, sample_temperature)
        if not isinstance(rerank_top_k, int) or rerank_top_k == 1 or rerank_top_k < 0:
            raise ConfigError(f"rerank_top_k={rerank_top_k!r}: 0 (off) or how many first hits to re-rank, >= 2.")
        if not (math.isfinite(rerank_weight) and rerank_weight >= 0):
            raise ConfigError(f"rerank_weight={rerank_weight} must be a finite number >= 0.")
        if rerank_top_k:
            pipeline.check_denoising_settings(rerank_timesteps, rerank_draws)
        self.rerank_top_k, self.rerank_weight = rerank_top_k, rerank_weight
        self.rerank_timesteps, self.rerank_draws = tuple(rerank_timesteps), rerank_draws
        if not (math.isfinite(edited_caption_weight) and edited_caption_weight >= 0):
            raise ConfigError(f"edited_caption_weight={edited_caption_weight} must be a finite number >= 0.")
        if (caption_editor is None) != (edited_caption_weight == 0):
            raise ConfigError(
                "fusion-diff: caption_editor and edited_caption_weight go together: give both (a caption editor folder "
                "and a weight > 0, e.g. `--set fusion-diff.caption_editor=DIR --set fusion-diff.edited_caption_weight=1`) "
                "or neither."
            )
        self.caption_editor = None if caption_editor is None else load_caption_editor(caption_editor)
        self.edited_caption_weight = edited_caption_weight
        if pipeline.adapter is None:
            raise ConfigError(
                "FusionDiffMethod needs a pipeline with a Control-Adapter; for the prior alone use Emb2EmbMethod."
            )
        super().__init__(
            pipeline,
            control_mode,
            seed,
            num_inference_steps,
            text_guidance,
            num_samples,
            mix_reference,
            gallery_mode,
            batch_size,
            precision,
        )
        pipeline.check_sampling_settings(
            num_inference_steps,
            num_samples,
            batch_size,
            precision,
            mix_reference=mix_reference,
            text_guidance=text_guidance,
            control_guidance=control_guidance,
            conditioning_scale=conditioning_scale,
        )
        self.name = name
        self.control_guidance = control_guidance
        self.conditioning_scale = conditioning_scale
        self.negative_text = negative_text  # replaces the null text of the unconditional branches ("" = none)
        self.shared_noise = shared_noise  # one noise block for all queries: answers independent of the batch

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "control_guidance": self.control_guidance,
            "conditioning_scale": self.conditioning_scale,
            "adapter_blocks": self.pipeline.adapter.config.num_blocks,
            "negative_text": self.negative_text,
            "shared_noise": self.shared_noise,
            **self.sample_scoring.describe(),
            **(
                {"caption_editor": self.caption_editor.identity, "edited_caption_weight": self.edited_caption_weight}
                if self.caption_editor
                else {}  # off: earlier protocols (and the query caches keyed by them) stay as they were
            ),
            **(
                {
                    "rerank": f"top {self.rerank_top_k} by z(score) - {self.rerank_weight} z(diffusion loss at t="
                    f"{list(self.rerank_timesteps)}, {self.rerank_draws} noises each)"
                }
                if self.rerank_top_k
                else {}
            ),
        }

    def sample(self, context: QueryContext, return_trajectory: bool = False) -> FusionDiffPipelineOutput:
        """The pipeline's output for ``context`` before the mix toward the reference; with ``return_trajectory``
        also z after every step (the web page draws that walk)."""
        self.bind(context)
        text, text_mask = self.text_condition(context)
        negative, negative_mask = self.negative_condition(context)
        return self.pipeline.sample(
            text,
            control_embeds=self.reference_embeds(context),
            negative_text_embeds=negative,
            text_attention_mask=text_mask,
            negative_text_attention_mask=negative_mask,
            num_inference_steps=self.num_inference_steps,
            control_guidance=self.control_guidance,
            text_guidance=self.text_guidance,
            num_samples=self.num_samples,
            generator=self.generator(),
            batch_size=self.batch_size,
            precision=self.precision,
            conditioning_scale=self.conditioning_scale,
            return_trajectory=return_trajectory,
            shared_noise=self.shared_noise,
            return_samples=self.sample_scoring.per_sample,
        )

    def rerank_scores(self, context: QueryContext, candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """New scores ``[Q, K]`` of each query's first hits ``candidates [Q, K, d]`` (first-stage ``scores``)."""
        self.bind(context)
        text, text_mask = self.text_condition(context)
        negative, negative_mask = self.negative_condition(context)
        error = self.pipeline.denoising_error(
            candidates, text, self.reference_embeds(context), self.rerank_timesteps, self.rerank_draws,
            self.control_guidance, self.text_guidance,
            generator=torch.Generator(device="cpu").manual_seed(self.seed + 1),  # not the sampler's noise
            conditioning_scale=self.conditioning_scale, text_attention_mask=text_mask,
            negative_text_embeds=negative, negative_text_attention_mask=negative_mask, precision=self.precision,
        )  # fmt: skip
        error = torch.where(torch.isfinite(scores), error, torch.full_like(error, float("nan")))  # padding: no say
        return standardize_rows(scores) - self.rerank_weight * standardize_rows(error)

    def negative_condition(self, context: QueryContext) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``negative_text`` as a text condition for every query of ``context`` (None, None without one)."""
        if not self.negative_text:
            return None, None
        negative, negative_mask = self.text_condition(context, [self.negative_text])
        rows = len(context.query_ids)
        negative = negative.expand(rows, *negative.shape[1:])
        return negative, None if negative_mask is None else negative_mask.expand(rows, -1)

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        """``[Q, d]``, or every sample ``[Q, num_samples, d]`` when ``sample_reduction`` keeps them apart."""
        output = self.sample(context)
        queries = self.mix(output.samples if self.sample_scoring.per_sample else output.embeddings, context)
        if self.caption_editor is None:
            return queries
        edited = edited_caption_embeddings(
            self.caption_editor, context.reference_captions, context.modification_texts, context.embedder, self.name
        ).to(queries.device, queries.dtype)
        edited = edited.unsqueeze(1) if queries.ndim == 3 else edited
        return F.normalize(queries + self.edited_caption_weight * edited, dim=-1)


class Emb2EmbMethod(_SamplingMethod):
    """Training-free baseline with the prior alone: noise the reference's embedding, denoise with the text."""

    def __init__(
        self,
        pipeline: FusionDiffPipeline,
        strength: float = 0.5,
        num_inference_steps: int = 10,
        text_guidance: float = 1.5,
        num_samples: int = 1,
        mix_reference: float = 0.0,
        seed: int = 0,
        control_mode: ControlMode = "auto",
        gallery_mode: GalleryMode = "fused",
        batch_size: int = 1024,
        precision: str = "fp32",
        name: str = "emb2emb",
    ):
        super().__init__(
            pipeline,
            control_mode,
            seed,
            num_inference_steps,
            text_guidance,
            num_samples,
            mix_reference,
            gallery_mode,
            batch_size,
            precision,
        )
        pipeline.check_sampling_settings(
            num_inference_steps,
            num_samples,
            batch_size,
            precision,
            strength=strength,
            mix_reference=mix_reference,
            text_guidance=text_guidance,
        )
        self.name = name
        self.strength = strength

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "strength": self.strength}

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        self.bind(context)
        text, text_mask = self.text_condition(context)
        queries = self.pipeline.emb2emb(
            self.reference_embeds(context),
            text,
            text_attention_mask=text_mask,
            strength=self.strength,
            num_inference_steps=self.num_inference_steps,
            text_guidance=self.text_guidance,
            num_samples=self.num_samples,
            generator=self.generator(),
            batch_size=self.batch_size,
            precision=self.precision,
        ).embeddings
        return self.mix(queries, context)
