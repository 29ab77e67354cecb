"""The caption cache: one JSON file per (image set, captioner), keyed by image id, resumable.

File layout (``CAPTION_CACHE_KIND``)::

    {"kind": "fusion_diff.captions", "version": 1, "captioner": {...identity...},
     "manifest": {...artifact_manifest...}, "count": N,
     "captions": {image id: caption},
     "candidates": {image id: [caption, ...]}}      # only when the captioner keeps several

Every flush rewrites the file atomically (temp file + rename), so an interrupted run leaves the
last complete state, and ``caption_with_cache`` resumes from it. Captioning dominates the cost by
orders of magnitude (a model forward per image versus a few bytes of JSON), so rewriting is cheap.
A cache written by another captioner is refused, never mixed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fusion_diff.captioning.base import Captioner, identity_digest
from fusion_diff.captioning.retrieval import RetrievalCaptioner
from fusion_diff.embedding.base import ImageInput, upgrade_identity
from fusion_diff.errors import CacheMismatchError, DataError, MissingFileError
from fusion_diff.utils.image_sources import batches_of, loaded_batches
from fusion_diff.utils.io import artifact_manifest, read_json, write_json_atomic
from fusion_diff.utils.paths import cache_dir
from fusion_diff.utils.sharding import SaveClock

CAPTION_CACHE_KIND = "fusion_diff.captions"
CAPTION_CACHE_VERSION = 1


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def canonical_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity as it reads back from JSON (tuples become lists, ...), so stored and live ones compare,
    in today's form (see ``upgrade_identity``)."""
    return upgrade_identity(json.loads(json.dumps(identity, sort_keys=True, default=str)))


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two (nested) identity dicts."""
    fa, fb = _flatten(canonical_identity(a)), _flatten(canonical_identity(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def default_caption_cache_path(dataset: str, captioner: Captioner) -> Path:
    """``<cache root>/captions/<dataset>/<type>-<identity hash>.json``: one file per captioner."""
    identity = captioner.identity
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset)
    return cache_dir("captions") / safe / f"{identity['type']}-{identity_digest(identity)}.json"


class CaptionCache:
    """Captions (and candidate lists) of one captioner, keyed by image id; in memory when ``path`` is None."""

    def __init__(self, path: Path | None, identity: dict[str, Any], manifest: dict[str, Any] | None = None) -> None:
        self.path = path
        self.identity = canonical_identity(identity)
        self.manifest = manifest or artifact_manifest("captions", config={"captioner": identity})
        self._candidates: dict[str, list[str]] = {}

    @classmethod
    def open(cls, path: str | os.PathLike | None, identity: dict[str, Any], create: bool = True) -> CaptionCache:
        """Open (or create) the cache at ``path`` for a captioner of ``identity``.

        Raises ``CacheMismatchError`` naming the file, the differing keys and the fix when the file was
        written by another captioner; ``DataError`` when the file is not a caption cache.
        """
        if path is None:
            return cls(None, identity)
        path = Path(path)
        if not path.exists():
            if not create:
                raise MissingFileError(f"Caption cache not found: {path}. Run `fusion-diff caption` to write it.")
            return cls(path, identity)
        data = read_json(path, what="Caption cache")
        if not isinstance(data, dict) or data.get("kind") != CAPTION_CACHE_KIND:
            raise DataError(
                f"{path} is not a fusion-diff caption cache (no kind={CAPTION_CACHE_KIND!r}). "
                "Point to a file written by `fusion-diff caption`, or to a new path."
            )
        if data.get("version") != CAPTION_CACHE_VERSION:
            raise DataError(
                f"Caption cache {path} has version {data.get('version')}; expected {CAPTION_CACHE_VERSION}. "
                "Delete it to rebuild."
            )
        differing = identity_differences(data.get("captioner", {}), identity)
        if differing:
            raise CacheMismatchError(
                f"Caption cache {path} was written by another captioner (differs in: {', '.join(differing)}). "
                "Captions of different captioners are never mixed: delete the file to recaption with this "
                "captioner, or use another path (default_caption_cache_path gives each captioner its own file)."
            )
        cache = cls(path, identity, manifest=data.get("manifest"))
        captions, candidates = data.get("captions", {}), data.get("candidates", {})
        cache._candidates = {i: candidates.get(i, [c]) for i, c in captions.items()}
        return cache

    def __len__(self) -> int:
        return len(self._candidates)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._candidates

    def missing(self, ids: Sequence[str]) -> list[str]:
        """Ids (unique, in first-seen order) that have no caption yet."""
        return [i for i in dict.fromkeys(ids) if i not in self._candidates]

    def add(self, ids: Sequence[str], candidates: Sequence[Sequence[str]], flush: bool = True) -> None:
        """Store captions for new ids (an id already present is refused), then write the file atomically."""
        if len(ids) != len(candidates):
            raise ValueError(f"{len(ids)} ids but {len(candidates)} caption lists")
        duplicates = [i for i in ids if i in self._candidates]
        if duplicates or len(set(ids)) != len(ids):
            raise DataError(
                f"Caption cache {self.path or '(memory)'}: ids captioned twice, e.g. {duplicates[:3] or list(ids)[:3]}."
            )
        for image_id, caps in zip(ids, candidates, strict=True):
            if not caps:
                raise DataError(f"Captioner returned no caption for image {image_id!r}.")
            self._candidates[image_id] = list(caps)
        if flush:
            self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        several = any(len(c) > 1 for c in self._candidates.values())
        payload: dict[str, Any] = {
            "kind": CAPTION_CACHE_KIND,
            "version": CAPTION_CACHE_VERSION,
            "captioner": self.identity,
            "manifest": self.manifest,
            "count": len(self._candidates),
            "captions": {i: c[0] for i, c in self._candidates.items()},
        }
        if several:
            payload["candidates"] = self._candidates
        write_json_atomic(self.path, payload, indent=1)

    def _lookup(self, ids: Sequence[str]) -> list[list[str]]:
        absent = [i for i in ids if i not in self._candidates]
        if absent:
            raise DataError(
                f"Caption cache {self.path or '(memory)'} has no caption for {len(absent)} ids, e.g. {absent[:3]}. "
                "Run caption_with_cache (or `fusion-diff caption`) over these images first."
            )
        return [self._candidates[i] for i in ids]

    def captions(self, ids: Sequence[str]) -> list[str]:
        return [c[0] for c in self._lookup(ids)]

    def candidates(self, ids: Sequence[str]) -> list[list[str]]:
        return self._lookup(ids)

    def as_dict(self) -> dict[str, str]:
        """``{image id: caption}`` for every cached image."""
        return {i: c[0] for i, c in self._candidates.items()}


def caption_with_cache(
    captioner: Captioner,
    ids: Sequence[str],
    images: Sequence[ImageInput],
    cache: CaptionCache | str | os.PathLike | None = None,
    batch_size: int = 32,
    progress: bool | tqdm = False,
    chunk_size: int = 256,
    image_embeds: torch.Tensor | None = None,
    save_seconds: float = 60.0,
    num_workers: int = 0,
) -> list[str]:
    """Captions of ``images`` (aligned with ``ids``), computing only those the cache lacks.

    The cache file is saved every ``chunk_size`` new captions or every ``save_seconds``, whichever
    comes first, so an interrupted run loses at most that much and resumes where it stopped.
    ``cache`` may be a ``CaptionCache``, a path, or None (in memory). ``images`` are decoded by
    ``num_workers`` DataLoader workers. ``image_embeds`` (aligned with ``ids``) may pass precomputed
    ``f(I)`` of the captioner's own embedder to a ``RetrievalCaptioner``, which then skips
    re-embedding. ``progress``: show a bar (with the remaining time), or update the given one.
    """
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids but {len(images)} images")
    if not isinstance(cache, CaptionCache):
        cache = CaptionCache.open(cache, captioner.identity)
    elif identity_differences(cache.identity, captioner.identity):
        raise CacheMismatchError(
            f"Caption cache {cache.path or '(memory)'} belongs to another captioner "
            f"(differs in: {', '.join(identity_differences(cache.identity, captioner.identity))}). "
            "Open a cache for this captioner."
        )
    use_embeds = image_embeds is not None and isinstance(captioner, RetrievalCaptioner)
    position: dict[str, int] = {}
    for n, image_id in enumerate(ids):
        position.setdefault(image_id, n)  # an id seen twice is captioned from its first image
    todo = cache.missing(ids)
    clock = SaveClock(chunk_size, save_seconds)
    own_bar = not isinstance(progress, tqdm)
    bar = tqdm(total=len(todo), desc="captioning", unit="img", disable=not progress) if own_bar else progress
    try:
        if use_embeds:  # no images to read: rank chunk by chunk
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start : start + chunk_size]
                cache.add(chunk, captioner.rank(image_embeds[torch.tensor([position[i] for i in chunk])]))
                bar.update(len(chunk))
        else:
            rows = [position[i] for i in todo]  # batches never straddle a save point
            batches = [b for start in range(0, len(rows), chunk_size) for b in batches_of(rows[start : start + chunk_size], batch_size)]
            done = 0
            if getattr(captioner, "reads_paths", False):  # looks images up by file name: give it the paths
                loaded = ([images[r] for r in batch] for batch in batches)
            else:
                loaded = loaded_batches(images, batches, num_workers)
            for batch in loaded:
                chunk = todo[done : done + len(batch)]
                cache.add(chunk, captioner.caption_candidates(batch, batch_size=batch_size), flush=False)
                done += len(batch)
                bar.update(len(batch))
                if clock.tick(len(batch)):
                    cache.flush()  # atomic: the unit of resumption
            cache.flush()
    finally:
        if own_bar:
            bar.close()
    return cache.captions(ids)
