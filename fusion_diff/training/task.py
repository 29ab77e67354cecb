"""The contract between the shared Accelerate training loop and what it trains.

Stage 1 (prior), stage 2 (Control-Adapter) and FTI4CIR are each a ``TrainingTask``; the loop in
``fusion_diff.training.loop`` owns everything else (Accelerate, accumulation, clipping, EMA,
checkpoints, resume, logging, validation).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class TrainingTask(Protocol):
    name: str

    def trainable_module(self) -> nn.Module:
        """The module whose parameters the optimiser updates (and EMA tracks, and checkpoints hold)."""
        ...

    def frozen_modules(self) -> Iterable[nn.Module]:
        """Modules used in the forward but never updated (moved to the device, kept in eval mode)."""
        ...

    def train_dataset(self) -> torch.utils.data.Dataset:
        """Map-style dataset of precomputed tensors; the loop shards it across processes."""
        ...

    def compute_loss(self, batch: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to back-propagate and named float terms to log."""
        ...

    def validate(self, trainable: nn.Module) -> dict[str, float]:
        """Metrics on a validation split (never a test split); empty dict when there is none."""
        ...

    def save_final(self, trainable: nn.Module, output_dir: Path) -> None:
        """Write the trained weights with ``save_pretrained`` (and anything needed to load them)."""
        ...
