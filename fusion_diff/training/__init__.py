"""Training with Accelerate: one shared loop (``loop.train``) for the prior (stage 1), the
Control-Adapter (stage 2) and FTI4CIR, strict YAML configs, and datasets over embedding caches."""

from fusion_diff.training.config import TrainConfig, config_from_dict, load_config, save_config
from fusion_diff.training.task import TASK_MODULES, TaskSpec, TrainingTask, get_task_spec

__all__ = [
    "TASK_MODULES",
    "TaskSpec",
    "TrainConfig",
    "TrainingTask",
    "config_from_dict",
    "get_task_spec",
    "load_config",
    "save_config",
    "train",
]


def __getattr__(name: str):
    """``train`` imports Accelerate and diffusers' training utilities: only when asked for."""
    if name == "train":
        from fusion_diff.training.loop import train

        return train
    raise AttributeError(name)
