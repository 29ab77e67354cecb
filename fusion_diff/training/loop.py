"""The one Accelerate training loop shared by stage 1 (prior), stage 2 (Control-Adapter) and FTI4CIR.

In the style of the diffusers training examples: an ``Accelerator`` with mixed precision and
gradient accumulation, AdamW over the task's trainable parameters only, a diffusers LR schedule,
gradient clipping, an EMA of the trained weights, ``save_state`` checkpoints with a limit and
``resume="latest"``, trackers plus a JSONL log, tqdm on the main process, and a validation hook.

Reproducibility: model initialisation is seeded; the data order comes from Accelerate's seedable
sampler (seed + epoch), and every step's randomness (noise, timesteps, condition dropout) from a
generator seeded by ``(seed, process, step, micro-step)``. A run stopped after a checkpoint and
resumed (``skip_first_batches`` replays the epoch's order past the seen batches) therefore ends
with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fusion_diff.errors import ConfigError, DataError, FusionDiffError, MissingFileError, TrainingDivergedError
from fusion_diff.training.config import TrainConfig, ValidationConfig, config_to_dict, save_config
from fusion_diff.training.task import TrainingTask, ValidationFn, get_task_spec
from fusion_diff.utils.io import artifact_manifest, write_json_atomic
from fusion_diff.utils.locking import exclusive_folder
from fusion_diff.utils.runtime import adamw, warn_slow_bf16_once

logger = get_logger(__name__)

CHECKPOINTS = "checkpoints"
LOGS = "logs"
TRAIN_LOG = "train_log.jsonl"
CONFIG_CHANGES = "config_changes.jsonl"  # settings changed on resume, and from which step they apply
RUN_CONFIG = "run_config.yaml"  # the config of the latest (possibly unfinished) run
FINAL_CONFIG = "training_config.yaml"
# Not training settings: may change between a run and its resumption (a run folder may move, too).
NOT_SETTINGS = {"logging", "validation", "checkpointing", "output_dir"}
MANIFEST = "training_manifest.json"  # beside the pipeline's own manifest.json


@dataclass
class TrainResult:
    """What a finished (or deliberately stopped) run reports."""

    output_dir: Path
    global_step: int
    finished: bool  # False when stopped at ``stop_at_step`` before ``max_train_steps``
    samples_per_second: float  # over all processes, from the second logged interval on when there is one
    last_loss: float | None
    validation: dict[str, float] = field(default_factory=dict)


def train(
    config: TrainConfig,
    *,
    resume: str | None = None,
    stop_at_step: int | None = None,
    validation_fn: ValidationFn | None = None,
    task: TrainingTask | None = None,
) -> TrainResult:
    """Train ``config.task`` as configured; see the module docstring for what the loop guarantees.

    ``resume``: "latest" (newest checkpoint in ``output_dir/checkpoints``, or a fresh start when
    there is none) or a checkpoint folder. ``stop_at_step``: save a checkpoint and return at this
    step (a job's time limit); continue later with ``resume="latest"``. ``validation_fn`` takes
    precedence over ``config.validation.function``. ``task``: an already built task (its builder
    then owns seeding and validation), e.g. to inspect its modules afterwards; by default it is
    built from ``config``.
    """
    if task is not None and validation_fn is not None:
        raise ValueError("train(): pass validation_fn to the task's builder when you pass a built task.")
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config)
    warn_slow_bf16_once(accelerator.device, accelerator.mixed_precision, "training (mixed_precision)")
    set_seed(config.seed)
    # One run per output folder: a second one would interleave checkpoints and log lines. The main
    # process holds the lock for all processes of this run (only it writes the folder's shared files).
    lock = exclusive_folder(output_dir, "training run") if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        if task is None:
            spec = get_task_spec(config.task)
            with accelerator.main_process_first():  # the main process fills any feature cache; the others read it
                task = spec.build(config, validation_fn or resolve_validation_fn(config.validation))
        return TrainingRun(config, task, accelerator, output_dir).run(resume, stop_at_step)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator; on a machine without a GPU it is told ``cpu=True`` so MULTI_CPU really runs N processes."""
    report_to = config.logging.report_to
    if report_to == "auto":
        report_to = (
            "tensorboard"
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
            else "none"
        )
    output_dir = Path(config.output_dir)
    return Accelerator(
        gradient_accumulation_steps=config.schedule.gradient_accumulation_steps,
        mixed_precision=config.accelerate.mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOGS)),
        cpu=config.accelerate.cpu or not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=config.accelerate.find_unused_parameters)
        ],
    )


def resolve_validation_fn(validation: ValidationConfig) -> ValidationFn | None:
    """Import ``validation.function`` ("package.module:callable") and bind ``validation.kwargs``."""
    if validation.function is None:
        return None
    module_name, _, attr = validation.function.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"validation.function {validation.function!r} cannot be imported ({err}).") from err
    return functools.partial(fn, **validation.kwargs)


def find_checkpoint(resume: str, output_dir: Path, before: int | None = None) -> Path | None:
    """``"latest"`` -> the newest complete ``checkpoint-N`` (None if there is none; with ``before``, the newest
    with N < before); else the given folder."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir() or not path.name.removeprefix("checkpoint-").isdigit():
            raise MissingFileError(
                f"Checkpoint {path} not found. Pass --resume latest or an existing checkpoint-N folder."
            )
        return path
    root = output_dir / CHECKPOINTS
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    found = [p for p in found if before is None or int(p.name.split("-")[-1]) < before]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def unloadable_checkpoint(checkpoint: Path, err: Exception) -> FusionDiffError:
    """The error for a checkpoint ``load_state`` refused: another architecture (the config's model section
    changed) or a damaged file (offering the previous checkpoint)."""
    reason = " ".join(str(err).split())[:300]
    if isinstance(err, RuntimeError) and ("size mismatch" in reason or "key(s) in state_dict" in reason):
        return ConfigError(
            f"Checkpoint {checkpoint} was saved by another model architecture than the config's 'model' section "
            f"({reason}). Resume with the config it was trained with ({checkpoint.parents[1] / LOGS / RUN_CONFIG}), "
            "or train the new architecture into another output_dir."
        )
    previous = find_checkpoint("latest", checkpoint.parents[1], before=int(checkpoint.name.split("-")[-1]))
    fix = (
        f"Resume from the previous one with --resume {previous}"
        if previous
        else "There is no earlier checkpoint: start again without --resume"
    )
    return DataError(f"Checkpoint {checkpoint} is damaged or incomplete ({reason}). {fix} (and delete {checkpoint}).")


def step_generator(seed: int, process: int, step: int, micro_step: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on ``(seed, process, step, micro_step)``: resumed runs redraw the same noise."""
    state = int(np.random.SeedSequence([seed, process, step, micro_step]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state & 0x7FFF_FFFF_FFFF_FFFF)


class TrainingRun:
    """One run of the loop; split into small methods so each concern reads on its own."""

    def __init__(self, config: TrainConfig, task: TrainingTask, accelerator: Accelerator, output_dir: Path):
        self.config, self.task, self.accelerator, self.output_dir = config, task, accelerator, output_dir
        self.sched = config.schedule
        self.log_path = output_dir / LOGS / TRAIN_LOG
        self.global_step = 0
        self.last_validation: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        acc, cfg = self.accelerator, self.config
        model = self.task.trainable_module()
        model.train()
        for frozen in self.task.frozen_modules():
            frozen.requires_grad_(False)
            frozen.eval()
            frozen.to(acc.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError(f"Task {self.task.name!r} has no trainable parameters.")
        optimizer = adamw(
            self.params,
            lr=cfg.optim.learning_rate,
            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
            weight_decay=cfg.optim.weight_decay,
            eps=cfg.optim.adam_epsilon,
        )
        dataset = self.task.train_dataset()
        per_step = self.sched.train_batch_size * acc.num_processes
        if len(dataset) < per_step:
            raise DataError(
                f"The training set has {len(dataset)} samples, fewer than one batch over all processes "
                f"({self.sched.train_batch_size} x {acc.num_processes}). Lower schedule.train_batch_size or add data."
            )
        dataloader = DataLoader(
            dataset,
            batch_size=self.sched.train_batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.sched.dataloader_num_workers,
            collate_fn=getattr(dataset, "collate_fn", None),
            generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG out of the data order
        )
        # The prepared scheduler steps once per process per optimiser step (diffusers examples' convention).
        lr_scheduler = get_scheduler(
            self.sched.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=self.sched.lr_warmup_steps * acc.num_processes,
            num_training_steps=self.sched.max_train_steps * acc.num_processes,
        )
        self.model, self.optimizer, self.dataloader, self.lr_scheduler = acc.prepare(
            model, optimizer, dataloader, lr_scheduler
        )
        self.unwrapped = acc.unwrap_model(self.model)
        self.ema = None
        if cfg.ema.use_ema:
            self.ema = EMAModel(
                self.params,
                decay=cfg.ema.decay,
                use_ema_warmup=cfg.ema.use_warmup,
                inv_gamma=cfg.ema.inv_gamma,
                power=cfg.ema.power,
                update_after_step=cfg.ema.update_after_step,
                foreach=True,
            )
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        self.steps_per_epoch = math.ceil(len(self.dataloader) / self.sched.gradient_accumulation_steps)

    def _start_trackers(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.output_dir / LOGS / RUN_CONFIG)
            if acc.log_with:
                acc.init_trackers(f"fusion-diff-{self.task.name}", config=_flat_scalars(config_to_dict(self.config)))

    def _resume(self, resume: str | None) -> int:
        """Load the checkpoint (if any); return how many batches of the current epoch were already seen."""
        earlier = find_checkpoint("latest", self.output_dir)
        if resume is None and earlier is not None:
            raise ConfigError(
                f"{self.output_dir} holds checkpoints of an earlier run (newest: {earlier.name}); a fresh run there "
                "would mix its checkpoints with them. Continue that run with --resume latest, or train into a new "
                f"output_dir (or delete {self.output_dir / CHECKPOINTS}) to start over."
            )
        checkpoint = find_checkpoint(resume, self.output_dir) if resume is not None else None
        if checkpoint is None:
            if resume is not None:
                self.accelerator.print(f"No checkpoint in {self.output_dir / CHECKPOINTS}; starting from step 0.")
            if self.accelerator.is_main_process:  # a fresh run's logs hold its own steps only
                _truncate_log(self.log_path, 0)
                _truncate_log(self.log_path.with_name(CONFIG_CHANGES), -1)
            return 0
        changes = self._config_changes()
        try:
            self.accelerator.load_state(str(checkpoint))
        except Exception as err:  # torch, safetensors and pickle each raise their own on bad files
            raise unloadable_checkpoint(checkpoint, err) from err
        self.global_step = int(checkpoint.name.split("-")[-1])
        self._apply_loop_settings()
        self.accelerator.print(f"Resumed from {checkpoint} (step {self.global_step}).")
        if self.accelerator.is_main_process:
            _truncate_log(self.log_path, self.global_step)
            changes_log = self.log_path.with_name(CONFIG_CHANGES)
            _truncate_log(changes_log, self.global_step - 1)  # changes made at or after this step were undone
            if changes:
                logger.warning(
                    f"Resuming at step {self.global_step} with changed settings; they apply from this step on and "
                    f"are recorded in {changes_log}: "
                    + "; ".join(f"{k}: {v['before']!r} -> {v['after']!r}" for k, v in changes.items())
                )
                record = {"step": self.global_step, "checkpoint": str(checkpoint), "changed": changes}
                with changes_log.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
        return (self.global_step % self.steps_per_epoch) * self.sched.gradient_accumulation_steps

    def _config_changes(self) -> dict[str, dict[str, object]]:
        """Settings (``NOT_SETTINGS`` aside) that differ from the checkpointed run's: {key: {before, after}}."""
        path = self.output_dir / LOGS / RUN_CONFIG
        if not path.is_file():
            return {}
        before = _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, skip=NOT_SETTINGS)
        now = _flatten(config_to_dict(self.config), skip=NOT_SETTINGS)
        return {
            key: {"before": before.get(key), "after": now.get(key)}
            for key in sorted(before.keys() | now.keys())
            if before.get(key) != now.get(key)
        }

    def _apply_loop_settings(self) -> None:
        """Put this run's optimiser and EMA settings back after ``load_state``.

        ``load_state`` restores the checkpointed run's learning rate, betas, eps and weight decay (in the
        optimiser's param groups and the scheduler's base rates) and its EMA decay settings; without this,
        a resumed run would train with the old values while ``training_config.yaml`` records the new ones.
        The schedule's shape (warm-up, length) is this run's already: its scheduler was built from this config.
        """
        optim, scheduler = self.config.optim, self.lr_scheduler.scheduler
        for group, base in zip(self.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] *= optim.learning_rate / base  # keeps the schedule's factor at the resumed step
            group.update(
                initial_lr=optim.learning_rate,
                betas=(optim.adam_beta1, optim.adam_beta2),
                eps=optim.adam_epsilon,
                weight_decay=optim.weight_decay,
            )
        scheduler.base_lrs = [optim.learning_rate] * len(scheduler.base_lrs)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if self.ema is not None:
            ema = self.config.ema
            self.ema.decay, self.ema.use_ema_warmup, self.ema.inv_gamma = ema.decay, ema.use_warmup, ema.inv_gamma
            self.ema.power, self.ema.update_after_step = ema.power, ema.update_after_step

    # ------------------------------------------------------------------ the loop
    def run(self, resume: str | None, stop_at_step: int | None) -> TrainResult:
        acc, cfg = self.accelerator, self.config
        self._prepare()
        skip = self._resume(resume)
        self._start_trackers()
        max_steps = self.sched.max_train_steps
        if stop_at_step is not None and stop_at_step <= self.global_step:
            raise ConfigError(f"stop_at_step={stop_at_step} is not after the resumed step {self.global_step}.")
        progress = tqdm(
            total=max_steps,
            initial=self.global_step,
            desc=f"train {self.task.name}",
            disable=not (acc.is_local_main_process and cfg.logging.progress_bar),
        )
        self.window, self.rates = _Window(), []
        micro_step = 0
        stopped = False
        first_epoch = self.global_step // self.steps_per_epoch
        for epoch in range(first_epoch, math.ceil(max_steps / self.steps_per_epoch)):
            self.dataloader.set_epoch(epoch)
            batches = acc.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            skip = 0
            for batch in batches:
                with acc.accumulate(self.model):
                    generator = step_generator(cfg.seed, acc.process_index, self.global_step, micro_step, acc.device)
                    with acc.autocast():
                        loss, terms = self.task.compute_loss(self.model, batch, generator)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.optim.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.window.add(loss.detach(), terms, int(batch["index"].shape[0]))
                if cfg.logging.log_sample_ids:
                    self._log_sample_ids(epoch, micro_step, batch["index"])
                micro_step += 1
                if not acc.sync_gradients:
                    continue
                micro_step = 0
                progress.update(1)
                stopped = self._end_of_step(epoch, progress, stop_at_step)
                if self.global_step >= max_steps or stopped:
                    break
            if self.global_step >= max_steps or stopped:
                break
        progress.close()
        if not stopped:
            self._validate()
            self._save_final()
        acc.wait_for_everyone()
        acc.end_training()
        steady = self.rates[1:] or self.rates
        return TrainResult(
            output_dir=self.output_dir,
            global_step=self.global_step,
            finished=not stopped,
            samples_per_second=float(np.mean(steady)) if steady else 0.0,
            last_loss=self.window.last_loss,
            validation=self.last_validation,
        )

    def _end_of_step(self, epoch: int, progress: tqdm, stop_at_step: int | None) -> bool:
        """After an optimiser step: EMA, log, checkpoint, validate. True when the run stops here."""
        cfg, max_steps = self.config, self.sched.max_train_steps
        self.global_step += 1
        if self.ema is not None:
            self.ema.step(self.params)
        if self.global_step % cfg.logging.log_every_n_steps == 0 or self.global_step == max_steps:
            record = self.window.flush(self.accelerator, epoch, self.lr_scheduler.get_last_lr()[0])
            self.rates.append(record["samples_per_s"])
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            self._log(record)
            if not math.isfinite(record["loss"]):  # the same reduced value on every process: all stop together
                raise self._diverged(f"the loss is {record['loss']}")
        before_end = self.global_step < max_steps
        stopped = self.global_step == stop_at_step and before_end
        every = cfg.checkpointing.every_n_steps
        if (every and self.global_step % every == 0 and before_end) or stopped:
            self._save_checkpoint()
        every = cfg.validation.every_n_steps
        if every and self.global_step % every == 0 and before_end:
            self._validate()
        return stopped

    # ------------------------------------------------------------------ side jobs
    def _log(self, record: dict[str, float]) -> None:
        acc = self.accelerator
        if acc.log_with:
            acc.log(record, step=self.global_step)
        if acc.is_main_process:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.global_step, **record}) + "\n")

    def _log_sample_ids(self, epoch: int, micro_step: int, indices: torch.Tensor) -> None:
        path = self.output_dir / LOGS / "sample_ids" / f"rank{self.accelerator.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = {"step": self.global_step, "micro_step": micro_step, "epoch": epoch, "indices": indices.tolist()}
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def _save_checkpoint(self) -> None:
        """``save_state`` into a temporary folder renamed when complete; prune beyond ``total_limit``."""
        acc = self.accelerator
        self._check_weights()
        root = self.output_dir / CHECKPOINTS
        final = root / f"checkpoint-{self.global_step}"
        partial = root / f".partial-checkpoint-{self.global_step}"
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        acc.wait_for_everyone()
        if acc.is_main_process:
            partial.rename(final)
            limit = self.config.checkpointing.total_limit
            found = sorted(
                (p for p in root.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1])
            )
            for old in found[: max(0, len(found) - limit)] if limit else []:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    def _check_weights(self) -> None:
        """Refuse to save NaN/inf weights (the same trained and EMA weights on every process: all stop together)."""
        tensors = [*self.params, *(self.ema.shadow_params if self.ema is not None else [])]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise self._diverged("the trained weights hold NaN or inf")

    def _diverged(self, what: str) -> TrainingDivergedError:
        good = find_checkpoint("latest", self.output_dir)
        where = (
            f"The last checkpoint saved before it is {good}: continue from it with --resume {good} and a lower "
            "optim.learning_rate"
            if good is not None
            else "No checkpoint was saved before it: start again with a lower optim.learning_rate"
        )
        return TrainingDivergedError(
            f"Training {self.task.name} in {self.output_dir} diverged by step {self.global_step}: {what} "
            f"(optim.learning_rate={self.config.optim.learning_rate}). Nothing from the diverged steps was saved. "
            f"{where} (or clip gradients with optim.max_grad_norm > 0; with fp16, try bf16)."
        )

    def _validate(self) -> None:
        """Score the weights being trained (the EMA ones when EMA is on) on the main process."""
        acc = self.accelerator
        if acc.is_main_process:
            if self.ema is not None:
                self.ema.store(self.params)
                self.ema.copy_to(self.params)
            self.unwrapped.eval()
            devices = [acc.device] if acc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():  # validation never moves the training RNG
                metrics = self.task.validate(self.unwrapped)
            self.unwrapped.train()
            if self.ema is not None:
                self.ema.restore(self.params)
            if metrics:
                self.last_validation = {f"val/{k}": float(v) for k, v in metrics.items()}
                self._log(self.last_validation)
        acc.wait_for_everyone()

    def _save_final(self) -> None:
        """Final weights (EMA when on) via ``task.save_final``, the effective config and a manifest."""
        acc = self.accelerator
        self._check_weights()
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        if self.ema is not None:
            self.ema.copy_to(self.params)
        self.unwrapped.eval()
        self.task.save_final(self.unwrapped, self.output_dir)
        save_config(self.config, self.output_dir / FINAL_CONFIG)
        changes_log = self.log_path.with_name(CONFIG_CHANGES)
        changes = _read_jsonl(changes_log)
        manifest = artifact_manifest(
            f"training/{self.task.name}",
            config_to_dict(self.config),
            self.config.seed,
            global_step=self.global_step,
            config_changes=changes,  # settings changed on resume: the config above applies from each "step" on
            weights="ema" if self.ema is not None else "raw",
            num_processes=acc.num_processes,
            distributed_type=str(acc.distributed_type),
            validation=self.last_validation,
        )
        write_json_atomic(self.output_dir / MANIFEST, manifest)  # written last: marks the output complete


class _Window:
    """Loss and terms accumulated between two log lines (averaged across processes when logged)."""

    def __init__(self) -> None:
        self.last_loss: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.terms: dict[str, float] = {}
        self.count = 0
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, terms: dict[str, float], samples: int) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        for key, value in terms.items():
            self.terms[key] = self.terms.get(key, 0.0) + float(value)
        self.count += 1
        self.samples += samples

    def flush(self, acc: Accelerator, epoch: int, lr: float) -> dict[str, float]:
        keys = sorted(self.terms)
        local = torch.stack(
            [self.loss_sum.float()] + [torch.tensor(self.terms[k], device=self.loss_sum.device) for k in keys]
        )
        mean = acc.reduce(local / self.count, reduction="mean").tolist()
        elapsed = time.perf_counter() - self.start
        record = {"loss": mean[0], **dict(zip(keys, mean[1:], strict=True)), "lr": lr, "epoch": epoch}
        record["samples_per_s"] = self.samples * acc.num_processes / max(elapsed, 1e-9)
        self.last_loss = mean[0]
        self._reset()
        return record


def _flatten(tree: dict, prefix: str = "", skip: frozenset[str] | set[str] = frozenset()) -> dict[str, object]:
    """``{"optim": {"learning_rate": x}}`` -> ``{"optim.learning_rate": x}`` (lists and scalars are leaves);
    top-level sections in ``skip`` are left out."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key in skip:
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _flat_scalars(tree: dict) -> dict[str, int | float | str | bool]:
    """Flatten a nested config for trackers, which accept scalar hyper-parameters only."""
    return {k: v for k, v in _flatten(tree).items() if isinstance(v, (int, float, str, bool))}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (the resumed one; 0 for a fresh run): the log reads like one uninterrupted run."""
    if not path.is_file():
        return
    kept = [record for record in _read_jsonl(path) if record.get("step", 0) <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
