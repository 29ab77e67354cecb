"""Sampling query embeddings with Fusion-Diff: prior (+ Control-Adapter) + a diffusers scheduler.

The pipeline generates the target's fused embedding for each query: the modification text goes
in through the prior's text condition, the reference's embedding through the adapter's control.
Guidance uses two scales in the InstructPix2Pix form, and all guidance branches of a step run as
one batched forward. Every initial noise is drawn up front from the caller's generator, so
results do not depend on ``batch_size`` and are reproducible under a seed.

The text condition is the prior's: a pooled vector per text, or (a prior built with
``max_text_tokens > 1``) the text tower's token states with their mask; a dropped text is the
prior's learned null token, attended alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from fusion_diff.embedding.base import ImageInput, JointEmbedder, TextTokens, trim_tokens, upgrade_identity
from fusion_diff.errors import ConfigError, DataError, MissingFileError
from fusion_diff.models.control_adapter import ControlAdapter
from fusion_diff.models.denoise import (
    noise_scheduler, predict, regression_input, sampler_name, sampling_scheduler, training_target,
)
from fusion_diff.models.prior import FusionPrior
from fusion_diff.retrieval.method import check_mix_weight, mix_toward_reference
from fusion_diff.utils.checks import require_finite_settings
from fusion_diff.utils.io import artifact_manifest, check_safetensors, read_json, write_json_atomic
from fusion_diff.utils.runtime import warn_slow_bf16_once

# Denoiser compute precision -> autocast dtype (None: the weights' own dtype).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class FusionDiffPipelineOutput(BaseOutput):
    """``embeddings [B, d]`` unit-norm query embeddings; ``trajectory [steps, B, d]`` (unit-norm) if asked;
    ``samples [B, num_samples, d]`` (unit-norm, before averaging) if asked."""

    embeddings: torch.Tensor
    trajectory: torch.Tensor | None = None
    samples: torch.Tensor | None = None


def guidance_weights(control_guidance: float, text_guidance: float, with_control: bool) -> dict[str, float]:
    """Weights of the guidance branches whose weighted sum is the guided model output.

    With control (InstructPix2Pix): ``u + s_c (c - u) + s_t (ct - c) = (1 - s_c) u + (s_c - s_t) c + s_t ct``
    with ``u`` = (null control, null/negative text), ``c`` = (control, null/negative text),
    ``ct`` = (control, text). Without: ``u + s_t (t - u)``. Branches of weight 0 are not computed
    (all scales 1 -> a single unguided branch).
    """
    if with_control:
        weights = {"uncond": 1.0 - control_guidance, "control": control_guidance - text_guidance, "full": text_guidance}
    else:
        weights = {"uncond": 1.0 - text_guidance, "full": text_guidance}
    return {name: w for name, w in weights.items() if w != 0.0}


def _pad_tokens(
    embeds: torch.Tensor, mask: torch.Tensor | None, length: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-level text padded (masked out) to ``length`` tokens, so that two texts stack in one batch."""
    if mask is None or embeds.shape[1] == length:
        return embeds, mask
    pad = length - embeds.shape[1]
    return F.pad(embeds, (0, 0, 0, pad)), F.pad(mask, (0, pad))


class GuidedDenoiser:
    """The guided model output for one chunk of rows: every branch stacked into one ``predict`` call.

    Token-level text (``text_mask`` given) stacks too: the texts of all branches are padded to one length.
    """

    def __init__(
        self,
        prior: FusionPrior,
        adapter: ControlAdapter | None,
        text_embeds: torch.Tensor,
        control_embeds: torch.Tensor | None = None,
        negative_text_embeds: torch.Tensor | None = None,
        control_guidance: float = 1.5,
        text_guidance: float = 1.5,
        conditioning_scale: float = 1.0,
        text_mask: torch.Tensor | None = None,
        negative_text_mask: torch.Tensor | None = None,
    ):
        if adapter is not None and control_embeds is None:
            raise ValueError("GuidedDenoiser: an adapter needs control_embeds.")
        self.prior, self.adapter, self.conditioning_scale = prior, adapter, conditioning_scale
        weights = guidance_weights(control_guidance, text_guidance, with_control=adapter is not None)
        n, device = text_embeds.shape[0], text_embeds.device
        unconditional_text, unconditional_mask = text_embeds, text_mask
        if negative_text_embeds is not None:
            unconditional_text, unconditional_mask = negative_text_embeds, negative_text_mask
        if text_mask is not None:
            length = max(text_embeds.shape[1], unconditional_text.shape[1])
            text_embeds, text_mask = _pad_tokens(text_embeds, text_mask, length)
            unconditional_text, unconditional_mask = _pad_tokens(unconditional_text, unconditional_mask, length)

        def flags(value: bool) -> torch.Tensor:
            return torch.full((n,), value, dtype=torch.bool, device=device)

        self.num_branches = len(weights)
        self.text = torch.cat([text_embeds if b == "full" else unconditional_text for b in weights])
        self.text_mask = None
        if text_mask is not None:
            self.text_mask = torch.cat([text_mask if b == "full" else unconditional_mask for b in weights])
        self.drop_text = torch.cat([flags(b != "full" and negative_text_embeds is None) for b in weights])
        self.drop_control = torch.cat([flags(b == "uncond") for b in weights])
        self.control = None if control_embeds is None else control_embeds.repeat(self.num_branches, 1)
        self.weights = torch.tensor(list(weights.values()), dtype=text_embeds.dtype, device=device).view(-1, 1, 1)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """Guided output for ``sample [n, d]`` at a scalar ``timestep`` or per-row timesteps ``[n]``."""
        timestep = torch.as_tensor(timestep, device=sample.device)
        out = predict(
            self.prior,
            self.adapter,
            sample.repeat(self.num_branches, 1),
            timestep.repeat(self.num_branches) if timestep.dim() else timestep,
            self.text,
            self.control,
            drop_text=self.drop_text,
            drop_control=self.drop_control if self.adapter is not None else None,
            conditioning_scale=self.conditioning_scale,
            text_attention_mask=self.text_mask,
        )
        return (self.weights * out.view(self.num_branches, *sample.shape)).sum(0)


class FusionDiffPipeline(DiffusionPipeline):
    """Generates fused query embeddings from (reference, modification text) with a prior and an optional adapter.

    Components saved by ``save_pretrained``: ``prior/``, ``adapter/`` (if any), ``scheduler/``.
    The embedder is not saved (it is the backbone, loaded by its own means); pass it to
    ``from_pretrained(path, embedder=...)`` to use ``__call__`` on images and texts.
    """

    _optional_components = ["adapter"]

    def __init__(
        self,
        prior: FusionPrior,
        scheduler: SchedulerMixin,
        adapter: ControlAdapter | None = None,
        embedder: JointEmbedder | None = None,
    ):
        super().__init__()
        _check_components(prior, scheduler, adapter, embedder)
        self.register_modules(prior=prior, scheduler=scheduler, adapter=adapter)
        self.embedder = embedder

    # ---- persistence -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> FusionDiffPipeline:
        """diffusers' loader, after ``check_pipeline_folder``: a wrong path, a missing component or truncated
        weights are named instead of surfacing as a loader error deep inside diffusers."""
        check_pipeline_folder(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' layout (safetensors) plus a ``manifest.json`` written last, once the rest is complete."""
        super().save_pretrained(save_directory, **kwargs)
        config = {
            "prior": dict(self.prior.config),
            "adapter": dict(self.adapter.config) if self.adapter is not None else None,
            "scheduler": dict(self.scheduler.config),
        }
        write_json_atomic(Path(save_directory) / "manifest.json", artifact_manifest("fusion_diff_pipeline", config))

    def bind_embedder(self, embedder: JointEmbedder) -> None:
        """Attach the backbone after loading, refused (as in ``from_pretrained(path, embedder=...)``) when it is
        not the one the prior was trained on."""
        _check_embedder(self.prior, embedder)
        self.embedder = embedder

    def set_sampler(self, name: str) -> None:
        """Swap the scheduler for another sampler (``"ddim"``, ``"dpm++"``, ``"ddpm"``) on the same schedule."""
        self.scheduler = sampling_scheduler(name, config=self.scheduler.config)

    @property
    def sampler(self) -> str:
        return sampler_name(self.scheduler)

    def encode_text(self, texts: Sequence[str], embedder: JointEmbedder | None = None) -> TextTokens | torch.Tensor:
        """The prior's text condition for ``texts``: pooled ``[B, dt]``, or token states and mask (trimmed to
        the longest text) for a token-level prior; one batched forward of the text tower."""
        embedder = embedder or self.embedder
        if embedder is None:
            raise ConfigError("FusionDiffPipeline.encode_text needs an embedder (bind_embedder or pass one).")
        if self.prior.text_tokens is None:
            return embedder.embed_texts(list(texts))
        tokens = embedder.encode_text_tokens(list(texts), self.prior.text_tokens, batch_size=max(len(texts), 1))
        return trim_tokens(*tokens)

    def text_condition(
        self, texts: Sequence[str], embedder: JointEmbedder | None = None, pooled: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(text_embeds, text_attention_mask)`` for ``sample``: ``pooled`` (already computed ``f(T)``) when the
        prior takes pooled text and it is given, else ``encode_text`` (mask None for pooled text)."""
        if self.prior.text_tokens is None and pooled is not None:
            return pooled, None
        text = self.encode_text(texts, embedder)
        return (text.states, text.mask) if isinstance(text, TextTokens) else (text, None)

    # ---- sampling ----------------------------------------------------------------------------

    def sample(
        self,
        text_embeds: torch.Tensor,
        control_embeds: torch.Tensor | None = None,
        negative_text_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 10,
        control_guidance: float = 1.5,
        text_guidance: float = 1.5,
        num_samples: int = 1,
        mix_reference: float = 0.0,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        batch_size: int = 1024,
        conditioning_scale: float = 1.0,
        precision: str = "fp32",
        shared_noise: bool = False,
        return_samples: bool = False,
        text_attention_mask: torch.Tensor | None = None,
        negative_text_attention_mask: torch.Tensor | None = None,
    ) -> FusionDiffPipelineOutput:
        """Query embeddings ``[B, d]`` from modification-text embeddings and reference (control) embeddings.

        A prior trained with ``objective="regression"`` (the direct-regression ablation) runs one forward on
        its fixed input instead of the sampler loop: ``num_inference_steps`` and the noise do not apply.

        Args:
            text_embeds: ``f(T_mod)``, ``[B, dt]``; for a token-level prior its token states ``[B, L, dt]``
                with ``text_attention_mask [B, L]`` (``encode_text`` gives both).
            control_embeds: the reference's joint-space embedding ``[B, d]`` (fused or image-only);
                required with an adapter; without one it is only used by ``mix_reference``.
            negative_text_embeds: replaces the null text in the unconditional branches.
            num_inference_steps: sampler steps; 1 is the deterministic ``z0`` prediction from pure noise.
            control_guidance, text_guidance: the two guidance scales (prior-only: ``text_guidance`` only).
            num_samples: samples per query, averaged (on the unit sphere) into one embedding.
            return_samples: also return every sample ``[B, num_samples, d]`` (multi-sample scoring).
            mix_reference: ``normalize((1 - m) z + m ref)`` pulls the result toward the reference.
            generator: makes the result reproducible; results do not depend on ``batch_size``.
            shared_noise: every query starts from the same ``num_samples`` noise draws, so that a query's result
                does not depend on the other queries of the call (a served page batches whoever asks at once;
                deterministic samplers such as DDIM). Off: independent noise per query, as evaluated.
            return_trajectory: also return the (sample-averaged, unit-norm) latent after every step.
            batch_size: rows (queries x samples) per chunk, before the guidance branches multiply it.
            conditioning_scale: scales the adapter's residuals.
            precision: ``"fp32"``, or ``"bf16"`` to run the denoiser under bfloat16 autocast (about 2x
                faster on CPUs with AVX512-BF16 / AMX; scheduler arithmetic stays in float32).
            text_attention_mask, negative_text_attention_mask: the masks of token-level text (True = real token).
        """
        text_embeds, text_mask = self._prepare_text(text_embeds, text_attention_mask, "text_embeds")
        b = text_embeds.shape[0]
        if self.adapter is not None and control_embeds is None:
            raise ValueError(
                "FusionDiffPipeline.sample: this pipeline has a Control-Adapter, so pass control_embeds "
                "(the reference's embedding), or build the pipeline without an adapter for prior-only sampling."
            )
        control = self._prepare(control_embeds, "control_embeds", self.prior.config.embedding_dim, b)
        negative, negative_mask = self._prepare_text(
            negative_text_embeds, negative_text_attention_mask, "negative_text_embeds", b
        )
        return self._generate(
            text_embeds,
            control,
            negative,
            text_mask=text_mask,
            negative_mask=negative_mask,
            adapter=self.adapter,
            num_inference_steps=num_inference_steps,
            control_guidance=control_guidance,
            text_guidance=text_guidance,
            num_samples=num_samples,
            mix_reference=mix_reference,
            generator=generator,
            return_trajectory=return_trajectory,
            batch_size=batch_size,
            conditioning_scale=conditioning_scale,
            precision=precision,
            shared_noise=shared_noise,
            return_samples=return_samples,
        )

    def emb2emb(
        self,
        reference_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        strength: float = 0.5,
        negative_text_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 10,
        text_guidance: float = 1.5,
        num_samples: int = 1,
        mix_reference: float = 0.0,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        batch_size: int = 1024,
        precision: str = "fp32",
        text_attention_mask: torch.Tensor | None = None,
        negative_text_attention_mask: torch.Tensor | None = None,
    ) -> FusionDiffPipelineOutput:
        """Training-free edit with the prior alone: noise the reference's embedding to ``strength``, denoise with text.

        ``strength`` in [0, 1]: the share of the schedule that is re-run (0 returns the reference,
        1 samples from pure noise). The adapter, if any, is not used. Text as in ``sample``.
        """
        d = self.prior.config.embedding_dim
        reference = self._prepare(reference_embeds, "reference_embeds", d)
        b = reference.shape[0]
        text_embeds, text_mask = self._prepare_text(text_embeds, text_attention_mask, "text_embeds", b)
        negative, negative_mask = self._prepare_text(
            negative_text_embeds, negative_text_attention_mask, "negative_text_embeds", b
        )
        return self._generate(
            text_embeds,
            reference,
            negative,
            text_mask=text_mask,
            negative_mask=negative_mask,
            init=reference,
            strength=strength,
            adapter=None,
            num_inference_steps=num_inference_steps,
            text_guidance=text_guidance,
            num_samples=num_samples,
            mix_reference=mix_reference,
            generator=generator,
            return_trajectory=return_trajectory,
            batch_size=batch_size,
            precision=precision,
        )

    def denoising_error(
        self,
        candidates: torch.Tensor,
        text_embeds: torch.Tensor,
        control_embeds: torch.Tensor,
        timesteps: Sequence[int] = (300, 600),
        num_draws: int = 2,
        control_guidance: float = 1.5,
        text_guidance: float = 2.0,
        generator: torch.Generator | None = None,
        batch_size: int = 8192,
        conditioning_scale: float = 1.0,
        text_attention_mask: torch.Tensor | None = None,
        negative_text_embeds: torch.Tensor | None = None,
        negative_text_attention_mask: torch.Tensor | None = None,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """How badly the guided model denoises each candidate target: ``[Q, K]``, lower = more likely.

        Candidate ``k`` of query ``q`` (a unit gallery embedding, ``candidates [Q, K, d]``) is noised to each of
        ``timesteps`` with ``num_draws`` noises and denoised under the query's text and control; the error is the
        training loss of that prediction (its prediction type's target), averaged. This is the diffusion loss as a
        likelihood estimate (a diffusion classifier): a score a regressor cannot give. A query's candidates share
        every noise draw, so their errors differ by the candidates alone; draws are made query by query, so a
        query's errors do not depend on the other queries of the call. Text, negative text and ``precision`` as in
        ``sample``.
        """
        self.check_denoising_settings(timesteps, num_draws, batch_size, control_guidance, text_guidance, precision)
        d = self.prior.config.embedding_dim
        candidates = torch.as_tensor(candidates)
        if candidates.dim() != 3 or candidates.shape[-1] != d:
            raise DataError(f"denoising_error: candidates have shape {tuple(candidates.shape)}, expected [Q, K, {d}].")
        q, k = candidates.shape[:2]
        text, mask = self._prepare_text(text_embeds, text_attention_mask, "text_embeds", q)
        control = self._prepare(control_embeds, "control_embeds", d, q)
        negative, negative_mask = self._prepare_text(
            negative_text_embeds, negative_text_attention_mask, "negative_text_embeds", q
        )
        autocast = torch.autocast(self.device.type, dtype=PRECISIONS[precision], enabled=PRECISIONS[precision] is not None)
        clean = self.prior.standardize(self._prepare(candidates.reshape(q * k, d), "candidates", d))
        noise = randn_tensor((q, len(timesteps) * num_draws, d), generator=generator, device=self.device,
                             dtype=self.prior.dtype)  # fmt: skip
        noise = noise.transpose(0, 1).repeat_interleave(k, dim=1)  # one draw per query, shared by its candidates

        def rows_of(x: torch.Tensor | None, query_rows: slice) -> torch.Tensor | None:
            return None if x is None else x[query_rows].repeat_interleave(k, 0)

        forward = noise_scheduler(self.prior)  # the training forward process, whichever sampler is set
        per_query = max(1, batch_size // k)
        errors = []
        with torch.inference_mode():
            for start in range(0, q, per_query):
                rows = slice(start * k, min(q, start + per_query) * k)
                query_rows = slice(start, start + per_query)
                denoiser = GuidedDenoiser(
                    self.prior, self.adapter, rows_of(text, query_rows), rows_of(control, query_rows),
                    rows_of(negative, query_rows), control_guidance, text_guidance, conditioning_scale,
                    rows_of(mask, query_rows), rows_of(negative_mask, query_rows),
                )  # fmt: skip
                error = torch.zeros(rows.stop - rows.start, device=self.device, dtype=clean.dtype)
                for draw, t in enumerate(t for t in timesteps for _ in range(num_draws)):
                    step = torch.full((error.shape[0],), t, device=self.device, dtype=torch.long)
                    eps = noise[draw, rows]
                    noisy = forward.add_noise(clean[rows], eps, step)
                    target = training_target(forward, clean[rows], eps, step)
                    with autocast:
                        output = denoiser(noisy, step).to(clean.dtype)
                    error += (output - target).pow(2).mean(-1)
                errors.append(error / noise.shape[0])
        return torch.cat(errors).view(q, k).float().cpu()

    def __call__(
        self,
        reference_images: Sequence[ImageInput],
        instructions: Sequence[str],
        reference_captions: Sequence[str] | None = None,
        negative_instructions: Sequence[str] | None = None,
        **sample_kwargs,
    ) -> FusionDiffPipelineOutput:
        """End to end from images and texts: embed with the pipeline's embedder, then ``sample``.

        The control is ``f(I_ref, caption)`` when ``reference_captions`` (from a captioner) are
        given, else ``f(I_ref)``. ``sample_kwargs`` go to ``sample``.
        """
        if self.embedder is None:
            raise ConfigError(
                "FusionDiffPipeline has no embedder; load it with FusionDiffPipeline.from_pretrained(path, "
                "embedder=...) or call .sample() with precomputed embeddings."
            )
        for name, seq in (
            ("instructions", instructions),
            ("reference_captions", reference_captions),
            ("negative_instructions", negative_instructions),
        ):
            if seq is not None and len(seq) != len(reference_images):
                raise DataError(f"FusionDiffPipeline: {len(reference_images)} reference images but {len(seq)} {name}.")
        if reference_captions is not None:
            control = self.embedder.embed_pairs(reference_images, list(reference_captions))
        else:
            control = self.embedder.embed_images(reference_images)
        text, text_mask = self.text_condition(instructions)
        negative, negative_mask = None, None
        if negative_instructions is not None:
            negative, negative_mask = self.text_condition(negative_instructions)
        return self.sample(
            text,
            control,
            negative,
            text_attention_mask=text_mask,
            negative_text_attention_mask=negative_mask,
            **sample_kwargs,
        )

    # ---- internals ---------------------------------------------------------------------------

    def _prepare_text(
        self, embeds: torch.Tensor | None, mask: torch.Tensor | None, name: str, rows: int | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Check that text is of the kind the prior was trained on (pooled vs token-level), then ``_prepare`` it."""
        if embeds is None:
            return None, None
        tokens = self.prior.text_tokens
        embeds = torch.as_tensor(embeds)
        given = "token-level" if embeds.dim() == 3 or mask is not None else "pooled"
        if (tokens is None) != (given == "pooled"):
            kind = f"token-level text (max_text_tokens={tokens})" if tokens else "pooled text"
            raise DataError(
                f"FusionDiffPipeline: {name} is {given} text {tuple(embeds.shape)} but the prior was trained on {kind}. "
                "Encode the texts with pipeline.encode_text(texts) (it follows the prior)."
            )
        dim = self.prior.config.text_embed_dim or self.prior.config.embedding_dim
        if tokens is None:
            return self._prepare(embeds, name, dim, rows), None
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        if embeds.dim() != 3 or embeds.shape[1] > tokens or mask.shape != embeds.shape[:2] or not mask.any(1).all():
            raise DataError(
                f"FusionDiffPipeline: {name} {tuple(embeds.shape)} with mask {tuple(mask.shape)} is not token-level "
                f"text of at most {tokens} tokens with at least one real token per row; use pipeline.encode_text."
            )
        return self._prepare(embeds, name, dim, rows), mask.to(self.device)

    def _prepare(
        self, embeds: torch.Tensor | None, name: str, dim: int, rows: int | None = None
    ) -> torch.Tensor | None:
        """Move to the pipeline's device/dtype after checking the shape, naming the argument on error."""
        if embeds is None:
            return None
        embeds = torch.as_tensor(embeds)
        token_level = name.endswith("text_embeds") and self.prior.text_tokens is not None and embeds.dim() == 3
        if (
            (embeds.dim() != 2 and not token_level)
            or embeds.shape[-1] != dim
            or (rows is not None and embeds.shape[0] != rows)
        ):
            expected = f"[{rows if rows is not None else 'B'}, {dim}]"
            raise DataError(
                f"FusionDiffPipeline: {name} has shape {tuple(embeds.shape)}, expected {expected}. Embeddings "
                "must come from the backbone the prior was trained on (see prior.config.embedder_identity)."
            )
        if not torch.isfinite(embeds).all():
            raise DataError(f"FusionDiffPipeline: {name} contains NaN or inf; recompute the embeddings.")
        return embeds.to(device=self.device, dtype=self.prior.dtype)

    def _generate(
        self,
        text: torch.Tensor,
        control: torch.Tensor | None,
        negative: torch.Tensor | None,
        *,
        adapter: ControlAdapter | None,
        num_inference_steps: int,
        text_guidance: float,
        num_samples: int,
        mix_reference: float,
        generator: torch.Generator | None,
        return_trajectory: bool,
        batch_size: int,
        precision: str,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        control_guidance: float = 1.0,
        conditioning_scale: float = 1.0,
        shared_noise: bool = False,
        return_samples: bool = False,
        text_mask: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
    ) -> FusionDiffPipelineOutput:
        """Shared loop of ``sample`` (``init`` None: start from noise) and ``emb2emb`` (start from noised ``init``)."""
        self.check_sampling_settings(
            num_inference_steps,
            num_samples,
            batch_size,
            precision,
            strength=None if init is None else strength,
            mix_reference=mix_reference,
            text_guidance=text_guidance,
            control_guidance=control_guidance,
            conditioning_scale=conditioning_scale,
        )
        regression = self.prior.config.objective == "regression"
        run_steps = 1 if regression else num_inference_steps
        if mix_reference > 0 and control is None:
            raise ValueError("mix_reference > 0 needs the reference: pass control_embeds.")
        warn_slow_bf16_once(self.device, precision, "Fusion-Diff sampling")
        autocast = torch.autocast(
            self.device.type, dtype=PRECISIONS[precision], enabled=PRECISIONS[precision] is not None
        )
        b, d = text.shape[0], self.prior.config.embedding_dim

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat_interleave(num_samples, dim=0)

        text_r, control_r, negative_r = rows(text), rows(control), rows(negative)
        text_mask_r, negative_mask_r = rows(text_mask), rows(negative_mask)
        init_r = None if init is None else self.prior.standardize(rows(init))
        draws = num_samples if shared_noise else b * num_samples  # rows are query-major: repeat the shared block
        noise = randn_tensor((draws, d), generator=generator, device=self.device, dtype=self.prior.dtype)
        noise = noise.repeat(b, 1) if shared_noise else noise

        chunks = range(0, b * num_samples, batch_size)
        outputs, trajectories = [], []
        with torch.inference_mode(), self.progress_bar(total=len(chunks) * run_steps) as bar:
            for start in chunks:
                sl = slice(start, start + batch_size)
                scheduler = type(self.scheduler).from_config(self.scheduler.config)  # fresh state per chunk
                scheduler.set_timesteps(num_inference_steps, device=self.device)
                timesteps = scheduler.timesteps
                if regression:
                    latents, timesteps = regression_input(self.prior, noise[sl].shape[0])
                    timesteps = timesteps[:1]
                elif init_r is None:
                    latents = noise[sl] * scheduler.init_noise_sigma
                else:
                    timesteps, latents = self._noised_start(
                        scheduler, init_r[sl], noise[sl], num_inference_steps, strength
                    )
                denoiser = GuidedDenoiser(
                    self.prior,
                    adapter,
                    text_r[sl],
                    None if control_r is None or adapter is None else control_r[sl],
                    None if negative_r is None else negative_r[sl],
                    control_guidance,
                    text_guidance,
                    conditioning_scale,
                    None if text_mask_r is None else text_mask_r[sl],
                    None if negative_mask_r is None else negative_mask_r[sl],
                )
                steps = []
                for t in timesteps:
                    with autocast:
                        model_input = latents if regression else scheduler.scale_model_input(latents, t)
                        model_output = denoiser(model_input, t).to(latents.dtype)
                    if regression:  # the prediction is z0 itself: no scheduler step
                        latents = model_output
                    else:
                        latents = scheduler.step(model_output, t, latents, generator=generator).prev_sample
                    if return_trajectory:
                        steps.append(self._to_unit(latents))
                    bar.update()
                outputs.append(self._to_unit(latents))
                if return_trajectory:
                    trajectories.append(torch.stack(steps) if steps else torch.empty(0, latents.shape[0], d))
            unit = torch.cat(outputs)
            embeddings = self._average_samples(unit, b, num_samples)
            samples = unit.view(b, num_samples, d).float().cpu().clone() if return_samples else None
            if mix_reference > 0:
                embeddings = mix_toward_reference(embeddings, control, mix_reference)
            trajectory = None
            if return_trajectory:
                traj = torch.cat(trajectories, dim=1)
                trajectory = self._average_samples(traj.flatten(0, 1), traj.shape[0] * b, num_samples).view(-1, b, d)
        # Clones leave inference mode, so callers may use the results in autograd or in-place ops.
        return FusionDiffPipelineOutput(
            embeddings=embeddings.float().cpu().clone(),
            trajectory=None if trajectory is None else trajectory.float().cpu().clone(),
            samples=samples,
        )

    def check_denoising_settings(
        self,
        timesteps: Sequence[int],
        num_draws: int,
        batch_size: int = 1,
        control_guidance: float = 1.0,
        text_guidance: float = 1.0,
        precision: str = "fp32",
    ) -> None:
        """Refuse what ``denoising_error`` cannot run with, before any work (methods call it when built)."""
        if self.prior.config.objective == "regression":
            raise ConfigError(
                "denoising_error scores candidates by the diffusion loss, but this prior was trained as a direct "
                "regressor (objective='regression'), which has no denoising path; use a diffusion prior."
            )
        if self.adapter is None:
            raise ConfigError("denoising_error needs a pipeline with a Control-Adapter (the reference conditions it).")
        limit = self.prior.config.num_train_timesteps
        timesteps = list(timesteps)
        if not timesteps or any(type(t) is not int or not 0 <= t < limit for t in timesteps):  # no bools
            raise ConfigError(f"denoising_error: timesteps {timesteps} must be integers in [0, {limit}).")
        if not isinstance(num_draws, int) or num_draws < 1 or batch_size < 1:
            raise ConfigError(f"denoising_error: num_draws={num_draws!r} and batch_size={batch_size!r} must be >= 1.")
        if precision not in PRECISIONS:
            raise ConfigError(f"denoising_error: precision={precision!r}; choose one of {sorted(PRECISIONS)}.")
        require_finite_settings("denoising_error", control_guidance=control_guidance, text_guidance=text_guidance)

    def check_sampling_settings(
        self,
        num_inference_steps: int,
        num_samples: int,
        batch_size: int,
        precision: str,
        strength: float | None = None,
        mix_reference: float = 0.0,
        **scales: float,
    ) -> None:
        """Refuse settings that sampling cannot run with, before any work: counts below 1, one step from noise
        with an epsilon prior, an unknown precision, ``strength`` (emb2emb; None: from noise) or ``mix_reference``
        outside [0, 1], and NaN/inf guidance scales (they would give NaN queries that rank arbitrarily).
        Methods call it when they are built."""
        counts = {"num_inference_steps": num_inference_steps, "num_samples": num_samples, "batch_size": batch_size}
        low = [f"{name}={value!r}" for name, value in counts.items() if not isinstance(value, int) or value < 1]
        if low:
            raise ConfigError(f"FusionDiffPipeline: {', '.join(low)}; each must be an integer >= 1.")
        regression = self.prior.config.objective == "regression"
        if regression and strength is not None:
            raise ConfigError(
                "emb2emb noises the reference and denoises it, but this prior was trained as a direct regressor "
                "(objective='regression'), which has no denoising path; use a diffusion prior."
            )
        one_step_from_noise = num_inference_steps == 1 and strength is None and not regression
        if one_step_from_noise and self.prior.config.prediction_type == "epsilon":
            raise ConfigError(
                "One-step sampling predicts z0 from pure noise, which an epsilon-prediction prior cannot do; "
                "use >= 10 steps, or a prior trained with prediction_type='sample' or 'v_prediction'."
            )
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}; choose one of {sorted(PRECISIONS)}.")
        if strength is not None and not 0.0 <= strength <= 1.0:
            raise ConfigError(f"emb2emb: strength={strength} must be in [0, 1].")
        check_mix_weight(mix_reference)
        require_finite_settings("FusionDiffPipeline sampling", **scales)

    @staticmethod
    def _noised_start(
        scheduler: SchedulerMixin, x0: torch.Tensor, noise: torch.Tensor, num_inference_steps: int, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The img2img start: the last ``strength`` share of the timesteps, and ``x0`` noised to the first of them."""
        num_run = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = num_inference_steps - num_run
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        if len(timesteps) == 0:
            return timesteps, x0
        return timesteps, scheduler.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))

    def _to_unit(self, latents: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.prior.destandardize(latents), dim=-1)

    @staticmethod
    def _average_samples(embeds: torch.Tensor, b: int, num_samples: int) -> torch.Tensor:
        """Mean of each query's ``num_samples`` consecutive unit vectors, renormalised."""
        return F.normalize(embeds.view(b, num_samples, -1).mean(1), dim=-1)


# Files each saved component needs (diffusers' layout): its config and, for models, safetensors weights.
COMPONENT_FILES = {"prior": ("config.json", "diffusion_pytorch_model.safetensors"),
                   "adapter": ("config.json", "diffusion_pytorch_model.safetensors"),
                   "scheduler": ("scheduler_config.json",)}  # fmt: skip


def check_pipeline_folder(path: str | Path) -> None:
    """Refuse a path that is not a complete ``FusionDiffPipeline.save_pretrained`` folder, naming what is missing."""
    path = Path(path)
    fix = "Pass the folder a training run wrote (its output_dir) or re-save the pipeline with save_pretrained."
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise MissingFileError(f"Pipeline folder {path} {what}. {fix}")
    index = read_json(path / "model_index.json", "The pipeline index (model_index.json)")
    for name, files in COMPONENT_FILES.items():
        if name not in index or index[name] in (None, [None, None]):
            if name != "adapter":
                raise DataError(f"Pipeline {path}: model_index.json lists no '{name}' component. {fix}")
            continue
        for file in files:
            if not (path / name / file).is_file():
                missing = path / name / file
                raise MissingFileError(f"Pipeline {path} lacks its '{name}' component: {missing} is missing. {fix}")
            if file.endswith(".safetensors"):
                check_safetensors(path / name / file, fix)


def _check_components(
    prior: FusionPrior, scheduler: SchedulerMixin, adapter: ControlAdapter | None, embedder: JointEmbedder | None
) -> None:
    """Refuse parts that do not belong together, saying which and how to fix it."""
    pcfg = prior.config
    if scheduler.config.prediction_type != pcfg.prediction_type:
        raise ConfigError(
            f"FusionDiffPipeline: scheduler prediction_type={scheduler.config.prediction_type!r} but the prior "
            f"predicts {pcfg.prediction_type!r}; build the scheduler with "
            "fusion_diff.models.denoise.sampling_scheduler(name, prior)."
        )
    if adapter is not None:
        acfg = adapter.config
        if (
            acfg.hidden_dim != pcfg.hidden_dim
            or acfg.num_blocks > pcfg.num_layers
            or acfg.control_dim != pcfg.embedding_dim
        ):
            raise ConfigError(
                f"FusionDiffPipeline: the Control-Adapter (hidden {acfg.hidden_dim}, {acfg.num_blocks} blocks, control "
                f"dim {acfg.control_dim}) does not fit the prior (hidden {pcfg.hidden_dim}, {pcfg.num_layers} blocks, "
                f"dim {pcfg.embedding_dim}); use the adapter trained from this prior (ControlAdapter.from_prior)."
            )
    if embedder is not None:
        _check_embedder(prior, embedder)


def _check_embedder(prior: FusionPrior, embedder: JointEmbedder) -> None:
    """Refuse a backbone other than the one the prior was trained on, naming the differing keys."""
    pcfg = prior.config
    if embedder.dim != pcfg.embedding_dim:
        raise ConfigError(
            f"FusionDiffPipeline: the embedder gives {embedder.dim}-d embeddings but the prior generates "
            f"{pcfg.embedding_dim}-d ones; use the backbone the prior was trained on."
        )
    if pcfg.embedder_identity is not None:
        trained_on = upgrade_identity(dict(pcfg.embedder_identity))
        current = embedder.identity.as_dict()
        differing = sorted(k for k in set(trained_on) | set(current) if trained_on.get(k) != current.get(k))
        if differing:
            raise ConfigError(
                f"FusionDiffPipeline: the prior was trained on {trained_on} but the embedder is {current} "
                f"(differing: {differing}); load the embedder the prior was trained with."
            )
