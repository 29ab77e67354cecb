"""The one denoiser call and the noise schedules that training and sampling share.

Training (``fusion_diff.training``) and sampling (``FusionDiffPipeline``) both go through
``predict``, and both build their schedulers here from one config, so that the prediction type,
the schedule and the way the control enters can never drift apart between the two.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fusion_diff.errors import ConfigError
from fusion_diff.models.control_adapter import ControlAdapter
from fusion_diff.models.prior import FusionPrior
from fusion_diff.utils.registry import Registry

BETA_SCHEDULE = "squaredcos_cap_v2"  # the cosine schedule

# Sampler name -> (scheduler class, settings on top of the shared config).
SAMPLERS = Registry(
    "sampler",
    {
        "ddim": ((DDIMScheduler, {"set_alpha_to_one": True}), "deterministic (eta = 0)"),
        "dpm++": ((DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}), "2nd order"),
        "ddpm": ((DDPMScheduler, {}), "ancestral: stochastic, needs many steps"),
    },
)


def scheduler_config(prediction_type: str = "sample", num_train_timesteps: int = 1000) -> dict[str, Any]:
    """Settings every scheduler of a prior shares.

    No sample clipping: standardised embeddings are not bounded like pixels. Timesteps are
    "trailing", so that sampling starts at the last training step, where the cosine schedule is
    pure noise and one step is the deterministic ``z0`` prediction. Epsilon models are the
    exception: recovering ``z0`` from an epsilon prediction divides by ``sqrt(a_t)`` (~5e-5 at the
    last step), which turns any model error into garbage, so they start one step-size earlier
    ("leading" spacing, as Stable Diffusion does) and cannot do one-step sampling.
    """
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": BETA_SCHEDULE,
        "prediction_type": prediction_type,
        "clip_sample": False,
        "timestep_spacing": "leading" if prediction_type == "epsilon" else "trailing",
        "steps_offset": 1 if prediction_type == "epsilon" else 0,
    }


def noise_scheduler(prior: FusionPrior) -> DDPMScheduler:
    """The training forward process ``z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps`` for ``prior``."""
    return DDPMScheduler(**scheduler_config(prior.config.prediction_type, prior.config.num_train_timesteps))


def sampling_scheduler(
    name: str, prior: FusionPrior | None = None, config: dict[str, Any] | None = None
) -> SchedulerMixin:
    """A sampler (``"ddim"``, ``"dpm++"`` or ``"ddpm"``) from the prior's schedule or an existing scheduler config."""
    cls, extra = SAMPLERS.load(name)
    if config is None:
        if prior is None:
            raise ValueError("sampling_scheduler needs a prior or a scheduler config.")
        config = scheduler_config(prior.config.prediction_type, prior.config.num_train_timesteps)
    accepted = inspect.signature(cls.__init__).parameters
    shared = {k: v for k, v in dict(config).items() if k in accepted}  # drop other samplers' settings
    return cls.from_config({**shared, **extra})


def sampler_name(scheduler: SchedulerMixin) -> str:
    """The ``SAMPLERS`` name of a scheduler instance (its class name if it is not one of ours)."""
    return next((name for name, ((cls, _), _) in SAMPLERS.items() if type(scheduler) is cls), type(scheduler).__name__)


def regression_input(prior: FusionPrior, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one fixed input of a direct-regression prior: the zero standardised embedding (the data mean) at the
    last timestep, where a diffusion prior sees pure noise. Training and the pipeline both use it."""
    weight = prior.sample_proj.weight
    sample = torch.zeros(batch_size, prior.config.embedding_dim, device=weight.device, dtype=weight.dtype)
    timesteps = torch.full((batch_size,), prior.config.num_train_timesteps - 1, device=weight.device, dtype=torch.long)
    return sample, timesteps


def training_target(
    scheduler: SchedulerMixin, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The prior's regression target for ``z_t = add_noise(sample, noise, timesteps)`` (its prediction type)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "sample":
        return sample
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(sample, noise, timesteps)
    raise ConfigError(f"Unsupported prediction_type {prediction_type!r} in the scheduler config.")


def predicted_sample(
    scheduler: SchedulerMixin, noisy: torch.Tensor, output: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The inverse of ``training_target``: the model's estimate of ``z0`` from its output at ``z_t = noisy``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "sample":
        return output
    alpha = scheduler.alphas_cumprod.to(device=noisy.device, dtype=noisy.dtype)[timesteps].unsqueeze(-1)
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha).sqrt() * output) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * output
    raise ConfigError(f"Unsupported prediction_type {prediction_type!r} in the scheduler config.")


def predict(
    prior: FusionPrior,
    adapter: ControlAdapter | None,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    text_embeds: torch.Tensor,
    control_embeds: torch.Tensor | None = None,
    drop_text: torch.Tensor | None = None,
    drop_control: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
    text_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model output (in ``prior.config.prediction_type``) for standardised noisy ``sample [B, d]``.

    ``control_embeds [B, d]`` are raw joint-space embeddings (standardised here with the prior's
    statistics); they are required when ``adapter`` is given and ignored otherwise.
    ``drop_text`` / ``drop_control``: bool ``[B]``, True where the condition is replaced by its
    learned null embedding.
    """
    hidden_states, attention_mask = prior.embed_tokens(sample, timestep, text_embeds, drop_text, text_attention_mask)
    residuals = None
    if adapter is not None:
        if control_embeds is None:
            raise ValueError("predict: an adapter needs control_embeds (use drop_control to drop them).")
        residuals = adapter(
            hidden_states, prior.standardize(control_embeds), drop_control, attention_mask, conditioning_scale
        )
    return prior.decode(hidden_states, attention_mask, residuals)
