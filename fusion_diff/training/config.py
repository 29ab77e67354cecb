"""Training configs: YAML files loaded into dataclasses, strictly.

An unknown key, a wrong type or an impossible value raises ``ConfigError`` naming the key and the
file *before* anything is trained, so a typo never silently falls back to a default. The ``model:``
and ``data:`` sections belong to the task (``TaskSpec``); every other section is shared by all tasks.
The effective config (defaults filled in, overrides applied) is saved with the trained weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from fusion_diff.errors import ConfigError, MissingFileError
from fusion_diff.utils.io import atomic_path

T = TypeVar("T")


class FieldError(ConfigError):
    """A value check inside a section's ``__post_init__``; the loader adds the section and the file."""

    def __init__(self, key: str, message: str):
        super().__init__(f"'{key}' {message}")
        self.key = key
        self.message = message


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``FieldError(key, message)`` unless ``condition``: the value checks of config sections."""
    if not condition:
        raise FieldError(key, message)


@dataclass
class OptimConfig:
    """AdamW over the trainable module's parameters, with gradient clipping."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1", "and adam_beta2 must be in [0, 1)")
        require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")


@dataclass
class ScheduleConfig:
    """How long, in which batches, and the learning-rate schedule (a diffusers ``get_scheduler`` name)."""

    max_train_steps: int = 10_000  # optimiser steps
    train_batch_size: int = 256  # per process; effective batch = this x processes x accumulation
    gradient_accumulation_steps: int = 1
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    lr_warmup_steps: int = 200
    dataloader_num_workers: int = 0

    def __post_init__(self) -> None:
        require(self.max_train_steps > 0, "max_train_steps", "must be > 0")
        require(self.train_batch_size > 0, "train_batch_size", "must be > 0")
        require(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0")
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
        require(self.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights (diffusers ``EMAModel``); the final weights are the EMA."""

    use_ema: bool = True
    decay: float = 0.999  # the cap; with warm-up the decay ramps 1 - (1 + step / inv_gamma) ** -power up to it
    use_warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 2 / 3
    update_after_step: int = 0

    def __post_init__(self) -> None:
        require(0 <= self.decay < 1, "decay", "must be in [0, 1)")


@dataclass
class CheckpointConfig:
    """``accelerator.save_state`` checkpoints under ``output_dir/checkpoints`` for ``--resume latest``."""

    every_n_steps: int = 500  # 0: no intermediate checkpoints
    total_limit: int | None = 3  # keep at most this many (oldest removed first); null keeps all

    def __post_init__(self) -> None:
        require(self.every_n_steps >= 0, "every_n_steps", "must be >= 0")
        require(self.total_limit is None or self.total_limit > 0, "total_limit", "must be > 0 or null")


@dataclass
class AccelerateConfig:
    """Settings passed to ``Accelerator``; ``null`` leaves them to the ``accelerate launch`` config."""

    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    cpu: bool = False  # force CPU even when a GPU is present (without a GPU the loop always uses the CPU)
    find_unused_parameters: bool = False  # DDP option, for modules with branches unused in some steps


@dataclass
class LoggingConfig:
    """Trackers (tensorboard when installed) plus a JSONL log that is always written."""

    log_every_n_steps: int = 10
    report_to: Literal["auto", "tensorboard", "none"] = "auto"  # auto: tensorboard if installed
    log_sample_ids: bool = False  # write which dataset indices each process saw, per step
    progress_bar: bool = True

    def __post_init__(self) -> None:
        require(self.log_every_n_steps > 0, "log_every_n_steps", "must be > 0")


@dataclass
class ValidationConfig:
    """A validation hook on a *val* split, every N steps and at the end.

    ``function`` ("package.module:callable") receives what the task validates (for the prior and the
    adapter: a ``FusionDiffPipeline``) plus ``kwargs``, and returns ``{metric: float}``. A callable
    passed to ``train(validation_fn=...)`` takes precedence.
    """

    every_n_steps: int = 0  # 0: only at the end (when a function is set)
    function: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.every_n_steps >= 0, "every_n_steps", "must be >= 0")
        require(self.function is None or ":" in self.function, "function", "must look like 'package.module:callable'")


@dataclass
class TrainConfig:
    """One training run: the task's ``model`` and ``data`` sections plus the shared loop sections."""

    task: str
    output_dir: str
    model: Any
    data: Any
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    accelerate: AccelerateConfig = field(default_factory=AccelerateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32) (numpy's seed range)")


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, task: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML training config, apply ``key.sub=value`` overrides, and validate it strictly.

    ``task`` (from the command line) must agree with the file's ``task:`` key when both are given.
    """
    raw = apply_overrides(read_yaml(path), overrides, source=str(path))
    return config_from_dict(raw, source=str(path), task=task)


def load_dataclass(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Any config dataclass (e.g. the demo's) from YAML, with the same strictness and overrides."""
    raw = apply_overrides(read_yaml(path), overrides, source=str(path))
    return build_dataclass(cls, raw, str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad YAML or a non-mapping is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Config not found: {path}. Pass an existing YAML file (see configs/).")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}.")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """``["optim.learning_rate=3e-4", "schedule.max_train_steps=100"]`` applied to a copy of ``raw``.

    Values are parsed as YAML scalars; the keys are checked like the file's keys afterwards.
    """
    raw = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override {item!r} (for {source}) must look like 'section.key=value'.")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"Override {item!r}: '{part}' in {source} is not a section.")
            node = child
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<dict>", task: str | None = None) -> TrainConfig:
    """Build a ``TrainConfig`` from a plain mapping; errors name ``source`` and the dotted key."""
    from fusion_diff.training.task import get_task_spec

    raw = dict(raw)
    file_task = raw.get("task")
    if task is not None and file_task is not None and file_task != task:
        raise ConfigError(
            f"{source}: 'task' is {file_task!r} but the command asks for {task!r}; use the matching config."
        )
    raw["task"] = task or file_task
    if raw["task"] is None:
        raise ConfigError(f"{source}: missing key 'task' (one of prior, adapter, fti4cir).")
    if not isinstance(raw["task"], str):
        raise ConfigError(f"{source}: 'task' must be a string, got {type(raw['task']).__name__}.")
    try:
        spec = get_task_spec(raw["task"])
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    hints = {"model": spec.model_config, "data": spec.data_config}
    return build_dataclass(TrainConfig, raw, source, prefix="", hint_overrides=hints)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The effective config as plain data (what ``save_config`` writes and trackers record)."""
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the effective config as YAML (atomically), loadable again with ``load_config``."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Strict conversion


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


def build_dataclass(
    cls: type[T], raw: Any, source: str, prefix: str = "", hint_overrides: dict[str, type] | None = None
) -> T:
    """``cls`` from a mapping: unknown keys, wrong types and failed value checks name ``source`` and the key."""
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    hints.update(hint_overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}'{did_you_mean(unknown[0], fields)}. "
                          f"Known keys in '{where}': {', '.join(sorted(fields))}.")  # fmt: skip
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in raw:
            kwargs[name] = convert_value(raw[name], hints[name], source, key)
        elif (
            dataclasses.is_dataclass(hints[name])
            and f.default is dataclasses.MISSING
            and (f.default_factory is dataclasses.MISSING)
        ):
            kwargs[name] = build_dataclass(hints[name], {}, source, f"{key}.")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{key}'.")
    try:
        return cls(**kwargs)
    except FieldError as err:
        raise ConfigError(f"{source}: '{prefix}{err.key}' {err.message}.") from err


def did_you_mean(key: str, known: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known key to a misspelt one, or an empty string."""
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def convert_value(value: Any, hint: Any, source: str, key: str) -> Any:
    """``value`` checked against the type ``hint``; a float field also accepts ints and '1e-4' strings."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, source, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert_value(value, arg, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{source}: '{key}' must be {_describe(hint)}, got {value!r}."
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin in (list, Sequence) or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__}.")
        item = args[0] if args else Any
        return [convert_value(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}.")
        item = args[1] if args else Any
        return {str(k): convert_value(v, item, source, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}.")
        return value
    if hint is float:
        number = value
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}.")
        if not math.isfinite(number):  # .nan / .inf parse as floats but no setting means them
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}.")
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}.")
        return value
    raise ConfigError(f"{source}: '{key}' has an unsupported type {hint!r} (a bug in the config dataclass).")


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(hint) else "")
