"""Training datasets over precomputed embedding caches: training reads no images.

Each field (target, text condition, control) is one ``[N, d]`` tensor loaded from an
``EmbeddingCache`` (a read-only memory map when the cache is a single shard and all caches share
the id order); rows are aligned by id. Batches are gathered with one ``index_select`` per field
(``__getitems__``), not one Python call per sample.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fusion_diff.embedding.base import EmbedderIdentity
from fusion_diff.embedding.cache import EmbeddingCache
from fusion_diff.errors import CacheMismatchError, DataError, MissingFileError

Batch = dict[str, torch.Tensor]


def load_aligned(caches: dict[str, Path]) -> tuple[list[str], dict[str, torch.Tensor], dict[str, dict]]:
    """Load several caches as ``{field: [N, d]}`` rows aligned on the first cache's ids, plus their identities.

    Every cache must hold exactly the same ids; a cache with missing or extra ids is named.
    """
    for name, root in caches.items():
        if not (Path(root) / "manifest.json").is_file():
            raise MissingFileError(
                f"Embedding cache for '{name}' not found at {root}. Compute it first (fusion-diff embed-triplets / "
                "the pair-set embedding step) or fix the data path in the config."
            )
    first_name, first_root = next(iter(caches.items()))
    first_cache = EmbeddingCache.read(first_root)
    ids, first = first_cache.load()
    tensors = {first_name: first}
    identities = {first_name: first_cache.identity}
    if not ids:
        raise DataError(f"Embedding cache {first_root} is empty; nothing to train on. Re-run the embedding step.")
    wanted = set(ids)
    for name, root in list(caches.items())[1:]:
        cache = EmbeddingCache.read(root)
        identities[name] = cache.identity
        differ = EmbedderIdentity.space_differences(cache.identity, first_cache.identity)
        if differ:
            raise CacheMismatchError(
                f"Embedding caches {first_root} and {root} come from different backbones (differing: {differ}). "
                "Embed every part of the training set with the same embedder."
            )
        if cache.ids == ids:
            tensors[name] = cache.load()[1]
            continue
        have = set(cache.ids)
        if have != wanted:
            lacking, extra = sorted(wanted - have), sorted(have - wanted)
            raise DataError(
                f"Embedding caches {first_root} and {root} do not hold the same ids ({len(lacking)} missing from "
                f"the second, e.g. {lacking[:3]}; {len(extra)} extra, e.g. {extra[:3]}). Re-run the embedding step "
                "so that all caches of the set are complete."
            )
        tensors[name] = cache.load(ids)[1]
    return ids, tensors, identities


class CachedEmbeddingDataset(Dataset):
    """Aligned embedding fields; items and batches are ``{field: tensor, "index": int64}``."""

    def __init__(self, caches: dict[str, Path]):
        self.ids, self.tensors, self.identities = load_aligned(caches)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Batch:
        item = {name: tensor[index] for name, tensor in self.tensors.items()}
        item["index"] = torch.tensor(index, dtype=torch.long)
        return item

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        rows = torch.as_tensor(indices, dtype=torch.long)
        batch = {name: tensor.index_select(0, rows) for name, tensor in self.tensors.items()}
        batch["index"] = rows
        return batch

    @staticmethod
    def collate_fn(batch: Batch) -> Batch:
        """``__getitems__`` already returns a collated batch; the DataLoader passes it through."""
        return batch

    @property
    def dims(self) -> dict[str, int]:
        return {name: int(tensor.shape[1]) for name, tensor in self.tensors.items()}


class PairEmbeddingDataset(CachedEmbeddingDataset):
    """Stage 1: ``target`` = fused ``f(I, T)`` (the diffused ``z0``), ``text`` = the caption's ``f(T)``.

    ``pair_dir`` is what ``embed_pair_set`` writes: caches ``image/``, ``text/``, ``fused/``.
    """

    def __init__(self, pair_dir: str | os.PathLike):
        pair_dir = Path(pair_dir)
        super().__init__({"target": pair_dir / "fused", "text": pair_dir / "text"})


class TripletEmbeddingDataset(CachedEmbeddingDataset):
    """Stage 2: ``target`` = ``f(I_tgt, T_tgt)``, ``text`` = the instruction, ``control`` = the reference.

    ``triplet_dir`` is what ``embed_triplets`` writes: caches ``reference_fused/``, ``reference_image/``,
    ``instruction_text/``, ``target_fused/``. ``control_source`` picks the fused reference
    ``f(I_ref, T_ref)`` or the image-only ``f(I_ref)``.
    """

    def __init__(self, triplet_dir: str | os.PathLike, control_source: str = "fused"):
        if control_source not in ("fused", "image"):
            raise ValueError(f"control_source must be 'fused' or 'image', got {control_source!r}.")
        triplet_dir = Path(triplet_dir)
        super().__init__(
            {
                "target": triplet_dir / "target_fused",
                "text": triplet_dir / "instruction_text",
                "control": triplet_dir / f"reference_{control_source}",
            }
        )


PAIR_FIELDS = ("image", "text", "fused")
TRIPLET_FIELDS = ("reference_fused", "reference_image", "instruction_text", "target_fused")


def write_random_caches(
    out_dir: str | os.PathLike,
    fields: Sequence[str],
    num: int,
    dim: int,
    seed: int = 0,
    embedder_identity: dict[str, Any] | None = None,
) -> list[str]:
    """Unit-norm Gaussian embeddings in one cache per field (shared ids): for tests and throughput benchmarks.

    ``fields`` is ``PAIR_FIELDS`` for a stage-1 set or ``TRIPLET_FIELDS`` for a stage-2 set.
    ``embedder_identity``: label the caches as that embedder's (the smoke run's random stand-ins for its
    embeddings, so that the trained pipeline evaluates with it); default a ``random`` backend.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = [f"rand-{i:07d}" for i in range(num)]
    base = embedder_identity or {"backend": "random", "model": "gaussian", "pretrained": None}
    for name in fields:
        identity = {**base, "dim": dim, "kind": name}
        cache = EmbeddingCache.open(Path(out_dir) / name, identity)
        embeds = torch.randn(num, dim, generator=generator)
        cache.append(ids, torch.nn.functional.normalize(embeds, dim=-1))
    return ids
