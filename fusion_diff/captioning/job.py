"""The captioning job: caption many images into one caption cache file, sharded by process, resumable.

The images the cache lacks are cut into units of ``chunk_size``; the process that owns unit ``k``
captions it into a part file of its own (``<out>.parts/part-0000k.json``, a caption cache saved every
``save_every`` images or ``save_seconds``), and the main process merges the parts into ``<out>`` at
the end, and at the start of a rerun (what a crashed run saved is kept). One process or N give the
same batches, hence the same captions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fusion_diff.captioning.base import Captioner
from fusion_diff.captioning.cache import CaptionCache, caption_with_cache
from fusion_diff.captioning.retrieval import RetrievalCaptioner
from fusion_diff.utils.sharding import Processes

logger = logging.getLogger(__name__)


def prepare_captioner(captioner: Captioner | None, processes: Processes) -> None:
    """Fill a retrieval captioner's bank-embedding cache on the main process first, so that the processes of a
    sharded job read it instead of all writing it at once."""
    if isinstance(captioner, RetrievalCaptioner):
        with processes.main_first():
            captioner.bank_embeddings()


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def merge_parts(cache: CaptionCache) -> int:
    """Move the captions of every part file into ``cache`` (saved), then delete the parts; return how many."""
    assert cache.path is not None
    parts = sorted(parts_dir(cache.path).glob("part-*.json"))
    merged = 0
    for part in parts:
        saved = CaptionCache.open(part, cache.identity, create=False)  # another captioner's part is refused
        fresh = cache.missing(list(saved.as_dict()))
        cache.add(fresh, saved.candidates(fresh), flush=False)
        merged += len(fresh)
    cache.flush()
    for part in parts:
        part.unlink()
    if parts:
        parts_dir(cache.path).rmdir()
    return merged


def caption_sharded(
    captioner: Captioner,
    ids: Sequence[str],
    images: Sequence[Any],
    out: str | os.PathLike,
    batch_size: int = 32,
    chunk_size: int = 1024,
    save_every: int = 256,
    save_seconds: float = 60.0,
    num_workers: int = 0,
    processes: Processes | None = None,
    progress: bool = True,
    image_embeds: torch.Tensor | None = None,
) -> tuple[CaptionCache, int]:
    """Caption the ``ids`` the cache file ``out`` lacks; return the merged cache and how many were new.

    ``image_embeds`` (aligned with ``ids``): ``f(I)`` for a ``RetrievalCaptioner`` of the same backbone, which then
    ranks them instead of re-embedding the images (see ``caption_with_cache``).
    """
    out = Path(out)
    processes = processes or Processes.current()
    with processes.main_first():
        cache = CaptionCache.open(out, captioner.identity)
        if processes.is_main:
            recovered = merge_parts(cache)
            if recovered:
                logger.warning("%s: kept %d captions saved by an interrupted run.", out, recovered)
    cache = CaptionCache.open(out, captioner.identity)
    todo = cache.missing(ids)
    processes.wait()  # nobody writes a part before every process has read the cache
    position = {image_id: n for n, image_id in reversed(list(enumerate(ids)))}
    units = processes.take(range(0, len(todo), chunk_size))
    mine = sum(len(todo[start : start + chunk_size]) for start in units)
    desc = "captioning" + (f" ({processes.describe()})" if processes.world_size > 1 else "")
    with tqdm(total=mine, desc=desc, unit="img", disable=not progress or not mine) as bar:
        for start in units:
            chunk = todo[start : start + chunk_size]
            part = CaptionCache.open(parts_dir(out) / f"part-{start // chunk_size:05d}.json", captioner.identity)
            rows = [position[i] for i in chunk]
            caption_with_cache(
                captioner,
                chunk,
                [images[r] for r in rows],
                part,
                batch_size=batch_size,
                progress=bar,
                chunk_size=save_every,
                save_seconds=save_seconds,
                num_workers=num_workers,
                image_embeds=image_embeds[rows] if image_embeds is not None else None,
            )
    processes.wait()
    if processes.is_main:
        merge_parts(cache)
    processes.wait()
    return CaptionCache.open(out, captioner.identity, create=False), len(todo)
