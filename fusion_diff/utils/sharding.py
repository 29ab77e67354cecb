"""Batch jobs sharded by process: the same command runs alone or under ``accelerate launch``.

A job cuts its work into units (chunks of ids, triplet tar shards) numbered the same way whatever
the number of processes. Each process takes a contiguous run of units (Accelerate's
``split_between_processes``), writes each unit's output as a file of its own (atomically), and the
main process merges them after a barrier. Because units, and the batches inside them, do not depend
on the number of processes, neither does the merged output; a rerun after a crash finds the
finished units' files and redoes only the rest.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place in the job (rank, number of processes) and the barrier between them."""

    state: Any  # accelerate.PartialState; None for one process without Accelerate (``single``)

    @classmethod
    def current(cls) -> Processes:
        """The processes ``accelerate launch`` / ``torchrun`` started (one when run without a launcher)."""
        import torch
        from accelerate import PartialState

        # On a machine without a GPU a torchrun launch must still run N processes (over gloo).
        return cls(PartialState(cpu=not torch.cuda.is_available()))

    @classmethod
    def single(cls) -> Processes:
        """One process, without Accelerate (library calls that are not launched jobs)."""
        return cls(None)

    @property
    def rank(self) -> int:
        return self.state.process_index if self.state is not None else 0

    @property
    def world_size(self) -> int:
        return self.state.num_processes if self.state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def device(self, requested: str | None) -> str | None:
        """``cuda`` under a multi-GPU launch means this process's own GPU (``cuda:<local rank>``)."""
        if requested == "cuda" and self.state is not None and self.state.device.type == "cuda":
            return str(self.state.device)
        return requested

    def take(self, units: Sequence[T]) -> list[T]:
        """This process's contiguous run of ``units`` (all of them in a single process)."""
        if self.state is None:
            return list(units)
        with self.state.split_between_processes(list(units)) as mine:
            return list(mine)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on the main process first (e.g. repairing an output folder), then on the others."""
        if self.state is None:
            yield
            return
        with self.state.main_process_first():
            yield
        self.wait()

    def exclusive(self, folder: str | os.PathLike, job: str) -> contextlib.AbstractContextManager:
        """The output folder's writer lock (``fusion_diff.utils.locking``), held by the main process for the
        whole job: a second job into the folder is refused, while this job's processes write under it."""
        from fusion_diff.utils.locking import exclusive_folder

        return exclusive_folder(folder, job) if self.is_main else contextlib.nullcontext()

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def describe(self) -> str:
        return f"process {self.rank + 1}/{self.world_size}"


class SaveClock:
    """When to save partial work: every ``every`` items or every ``seconds``, whichever comes first."""

    def __init__(self, every: int, seconds: float) -> None:
        if every < 1 or seconds <= 0:
            raise ValueError(f"save every >= 1 items and > 0 seconds, got {every} and {seconds}")
        self.every, self.seconds = every, seconds
        self._pending, self._last = 0, time.monotonic()

    def tick(self, items: int) -> bool:
        """Count ``items`` done; True when it is time to save (and the clock restarts)."""
        self._pending += items
        if self._pending >= self.every or time.monotonic() - self._last >= self.seconds:
            self._pending, self._last = 0, time.monotonic()
            return True
        return False
