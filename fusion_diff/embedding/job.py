"""The embedding job: fill an embedding cache from many inputs, sharded by process, resumable.

Work units are chunks of ``chunk_size`` of the ids the cache lacks, numbered from the cache's next
shard number; each becomes one shard file written by the process that owns it, and the main
process lists them all at the end (see ``fusion_diff.utils.sharding``). One process or N give the
same shards, rows and values.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fusion_diff.embedding.base import TextTokens
from fusion_diff.embedding.cache import EmbeddingCache
from fusion_diff.utils.image_sources import batches_of, loaded_batches
from fusion_diff.utils.sharding import Processes


def embed_sharded(
    root: str | os.PathLike,
    identity: dict[str, Any],
    ids: Sequence[str],
    items: Sequence[Any],
    embed_batch: Callable[[list[Any]], torch.Tensor],
    chunk_size: int = 4096,
    batch_size: int = 64,
    num_workers: int = 0,
    processes: Processes | None = None,
    progress: bool = True,
) -> tuple[EmbeddingCache, int]:
    """Embed the ids of ``ids`` the cache at ``root`` lacks; return the cache and how many ids were new.

    ``items[i]`` is the input of ``ids[i]`` (a path, a ``TarMember``, a text, an (image, text)
    tuple); images are decoded by ``num_workers`` DataLoader workers and ``embed_batch`` maps one
    decoded batch to ``[n, dim]`` (or to ``TextTokens`` for a token-level text cache: ``max_text_tokens``
    in ``identity``).
    """
    if len(ids) != len(items):
        raise ValueError(f"embed_sharded needs one item per id, got {len(ids)} ids and {len(items)} items.")
    processes = processes or Processes.current()
    with processes.exclusive(root, "embedding job"):
        with processes.main_first():  # the main process repairs and lists leftovers of a crashed run first
            cache = EmbeddingCache.open(root, identity, repair=True)
        todo = cache.missing(ids)
        base = cache.next_shard_number()
        processes.wait()  # nobody writes a shard before every process has read the folder
        first = {item: position for position, item in reversed(list(enumerate(ids)))}
        units = processes.take(range(0, len(todo), chunk_size))
        unit_batches = [batches_of([first[i] for i in todo[start : start + chunk_size]], batch_size) for start in units]
        batches = loaded_batches(items, [b for bs in unit_batches for b in bs], num_workers)
        mine = sum(len(b) for bs in unit_batches for b in bs)
        desc = f"embedding into {cache.root.name}" + (f" ({processes.describe()})" if processes.world_size > 1 else "")
        with tqdm(total=mine, desc=desc, disable=not progress or not mine, unit="item") as bar:
            for start, batches_of_unit in zip(units, unit_batches, strict=True):
                parts = []
                for _ in batches_of_unit:
                    batch = next(batches)
                    parts.append(embed_batch(batch))
                    bar.update(len(batch))
                unit_ids, number = todo[start : start + chunk_size], base + start // chunk_size
                if isinstance(parts[0], TextTokens):  # token-level text: states and their masks
                    states, mask = torch.cat([p.states for p in parts]), torch.cat([p.mask for p in parts])
                    cache.write_shard(number, unit_ids, states, mask)
                else:
                    cache.write_shard(number, unit_ids, torch.cat([p.float().cpu() for p in parts]))
        processes.wait()
        if processes.is_main:
            EmbeddingCache.open(root, identity, expect_unlisted=True)  # lists every process's shards in the manifest
        processes.wait()
        return EmbeddingCache.open(root, identity, create=False), len(todo)
