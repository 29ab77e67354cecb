"""Streaming a triplet dataset into a torch training loop (kept apart from ``format`` so that the
build workers never import torch)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from data_synth.triplets.format import Triplet, iter_triplets, load_manifest


class TripletStream(torch.utils.data.IterableDataset):
    """A torch IterableDataset over a triplet dataset for training loops.

    Shards are split over distributed ranks and DataLoader workers (shard i goes to stream
    i % (world_size * num_workers)), reshuffled per epoch when ``shuffle_seed`` is set
    (call :meth:`set_epoch`); ``transform`` maps each :class:`Triplet` to what the loop needs.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        rank: int = 0,
        world_size: int = 1,
        shuffle_seed: int | None = None,
        images: bool = True,
        transform: Callable[[Triplet], Any] | None = None,
    ) -> None:
        self.root, self.rank, self.world_size = Path(root), rank, world_size
        self.shuffle_seed, self.images, self.transform = shuffle_seed, images, transform
        self.num_shards = len(load_manifest(self.root)["shards"])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        order = list(range(self.num_shards))
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed * 1_000_003 + self.epoch).shuffle(order)
        stream = self.rank * workers + worker
        for triplet in iter_triplets(self.root, self.images, rank=stream, world_size=self.world_size * workers, shard_order=order):
            yield self.transform(triplet) if self.transform else triplet
