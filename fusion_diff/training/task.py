"""The contract between the shared Accelerate training loop and what it trains.

Stage 1 (prior), stage 2 (Control-Adapter) and FTI4CIR are each a ``TrainingTask``; the loop in
``fusion_diff.training.loop`` owns everything else (Accelerate, accumulation, clipping, EMA,
checkpoints, resume, logging, validation).

A task module (registered in ``TASK_MODULES`` below) exposes ``TASK = TaskSpec(...)``: the dataclasses of its YAML
``model:`` and ``data:`` sections, and ``build(config, validation_fn)`` that returns the task. The
loop seeds every RNG before calling ``build``, so model initialisation is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from fusion_diff.utils.registry import Registry

if TYPE_CHECKING:
    from fusion_diff.training.config import TrainConfig

# What a task hands to a validation callable (a pipeline, a model) -> named float metrics.
ValidationFn = Callable[[Any], dict[str, float]]


class TrainingTask(Protocol):
    name: str

    def trainable_module(self) -> nn.Module:
        """The module whose parameters the optimiser updates (and EMA tracks, and checkpoints hold)."""
        ...

    def frozen_modules(self) -> Iterable[nn.Module]:
        """Modules used in the forward but never updated (moved to the device, kept in eval mode)."""
        ...

    def train_dataset(self) -> torch.utils.data.Dataset:
        """Map-style dataset of precomputed tensors; the loop shards it across processes.

        Items (or ``__getitems__`` batches, with a ``collate_fn`` attribute) are dicts of tensors and
        carry an integer ``"index"`` so the loop can log which samples each process saw.
        """
        ...

    def compute_loss(
        self, trainable: nn.Module, batch: Any, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to back-propagate and named float terms to log.

        ``trainable`` is the module as prepared by Accelerate (possibly DDP-wrapped): the forward
        must go through it, or gradients are not synchronised across processes. Draw all randomness
        from ``generator`` (seeded per step and process by the loop), so a resumed run repeats it.
        """
        ...

    def validate(self, trainable: nn.Module) -> dict[str, float]:
        """Metrics on a validation split (never a test split); empty dict when there is none.

        ``trainable`` is unwrapped and holds the weights to evaluate (the EMA weights when EMA is on).
        Tasks forward their model to the ``validation_fn`` given to ``build``.
        """
        ...

    def save_final(self, trainable: nn.Module, output_dir: Path) -> None:
        """Write the trained weights with ``save_pretrained`` (and anything needed to load them)."""
        ...


@dataclass(frozen=True)
class TaskSpec:
    """How the config loader and the loop find a task: its config sections and its builder."""

    name: str
    model_config: type  # dataclass of the YAML ``model:`` section
    data_config: type  # dataclass of the YAML ``data:`` section
    build: Callable[[TrainConfig, ValidationFn | None], TrainingTask]


# Task name -> its module's ``TASK: TaskSpec``; imported only when that task is used.
TASK_MODULES = Registry(
    "training task",
    {
        "prior": ("fusion_diff.training.prior_task:TASK", "stage 1: the fusion prior"),
        "adapter": ("fusion_diff.training.adapter_task:TASK", "stage 2: the Control-Adapter"),
        "fti4cir": ("fusion_diff.training.fti4cir_task:TASK", "the FTI4CIR mapper"),
    },
)


def get_task_spec(name: str) -> TaskSpec:
    return TASK_MODULES.load(name)
