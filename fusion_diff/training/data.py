"""Training datasets over precomputed embedding caches: training reads no images.

Each field (target, text condition, control) is one ``[N, d]`` tensor loaded from an
``EmbeddingCache`` (a read-only memory map when the cache is a single shard and all caches share
the id order); rows are aligned by id. Batches are gathered with one ``index_select`` per field
(``__getitems__``), not one Python call per sample. A token-level text cache gives ``text [N, L, d]``
and ``text_mask [N, L]``; each batch is trimmed to its longest text.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fusion_diff.embedding.base import EmbedderIdentity, trim_tokens
from fusion_diff.embedding.cache import EmbeddingCache
from fusion_diff.errors import CacheMismatchError, DataError, MissingFileError

Batch = dict[str, torch.Tensor]
# The token-level cache beside each pooled text cache (written when the embedding job gets max_text_tokens).
TOKEN_CACHES = {"text": "text_tokens", "instruction_text": "instruction_tokens"}
MASK_SUFFIX = "_mask"  # the field holding a token-level field's mask: "text" -> "text_mask"
NEAR_MISS_CACHE = "near_miss_fused"  # beside the triplet caches (data_synth.triplets.embed writes it)


def near_miss_ids(triplet_ids: Sequence[str], near_misses: int) -> list[str]:
    """The near-miss cache's row ids of ``triplet_ids``: ``<id>#0 .. <id>#<n-1>`` each, in order."""
    return [f"{i}#{j}" for i in triplet_ids for j in range(near_misses)]


def describe_text_condition(max_text_tokens: int | None) -> str:
    return f"token-level text (max_text_tokens={max_text_tokens})" if max_text_tokens else "pooled text (one vector)"


def check_text_condition(max_text_tokens: int | None, cache_tokens: int | None, model: str, cache: str) -> None:
    """Refuse a text cache of another kind than the model conditions on, naming both (0/None = pooled)."""
    if (max_text_tokens or None) != (cache_tokens or None):
        raise CacheMismatchError(
            f"{model} conditions on {describe_text_condition(max_text_tokens)} but the text cache {cache} holds "
            f"{describe_text_condition(cache_tokens)}. Embed the texts with the model's max_text_tokens (the embedding "
            "jobs' max_text_tokens option) or use a model trained on this kind of text."
        )


def _load_fields(name: str, cache: EmbeddingCache, ids: list[str] | None) -> dict[str, torch.Tensor]:
    """``{name: rows}``, plus ``{name_mask: mask}`` for a token-level text cache."""
    if cache.max_text_tokens is None:
        return {name: cache.load(ids)[1]}
    tokens = cache.load_tokens(ids)[1]
    return {name: tokens.states, name + MASK_SUFFIX: tokens.mask}


def load_aligned(caches: dict[str, Path]) -> tuple[list[str], dict[str, torch.Tensor], dict[str, dict]]:
    """Load several caches as ``{field: [N, d]}`` rows aligned on the first cache's ids, plus their identities.

    Every cache must hold exactly the same ids; a cache with missing or extra ids is named. A token-level
    text cache adds its mask as the field ``<name>_mask``.
    """
    for name, root in caches.items():
        if not (Path(root) / "manifest.json").is_file():
            raise MissingFileError(
                f"Embedding cache for '{name}' not found at {root}. Compute it first (fusion-diff embed-triplets / "
                "the pair-set embedding step) or fix the data path in the config."
            )
    first_name, first_root = next(iter(caches.items()))
    first_cache = EmbeddingCache.read(first_root)
    ids = first_cache.ids
    tensors = _load_fields(first_name, first_cache, None)
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
            tensors.update(_load_fields(name, cache, None))
            continue
        have = set(cache.ids)
        if have != wanted:
            lacking, extra = sorted(wanted - have), sorted(have - wanted)
            raise DataError(
                f"Embedding caches {first_root} and {root} do not hold the same ids ({len(lacking)} missing from "
                f"the second, e.g. {lacking[:3]}; {len(extra)} extra, e.g. {extra[:3]}). Re-run the embedding step "
                "so that all caches of the set are complete."
            )
        tensors.update(_load_fields(name, cache, ids))
    return ids, tensors, identities


class CachedEmbeddingDataset(Dataset):
    """Aligned embedding fields; items and batches are ``{field: tensor, "index": int64}``."""

    def __init__(self, caches: dict[str, Path]):
        self.roots = caches
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
        for name in [n for n in batch if n + MASK_SUFFIX in batch]:
            batch[name], batch[name + MASK_SUFFIX] = trim_tokens(batch[name], batch[name + MASK_SUFFIX])
        batch["index"] = rows
        return batch

    @staticmethod
    def collate_fn(batch: Batch) -> Batch:
        """``__getitems__`` already returns a collated batch; the DataLoader passes it through."""
        return batch

    @property
    def dims(self) -> dict[str, int]:
        return {name: int(tensor.shape[-1]) for name, tensor in self.tensors.items() if not name.endswith(MASK_SUFFIX)}

    def text_tokens(self, field: str = "text") -> int | None:
        """``max_text_tokens`` of ``field``'s cache (None: pooled)."""
        return self.identities[field].get("max_text_tokens")


def text_cache(root: Path, pooled: str, max_text_tokens: int | None) -> Path:
    """The text cache a model of ``max_text_tokens`` reads under ``root``; a missing token cache says how to make it."""
    if not max_text_tokens:
        return root / pooled
    tokens = TOKEN_CACHES[pooled]
    if not (root / tokens / "manifest.json").is_file():
        raise MissingFileError(
            f"No token-level text cache at {root / tokens}: the model conditions on token-level text "
            f"(max_text_tokens={max_text_tokens}) but {root} was embedded with pooled text only. Re-run the "
            "embedding step with max_text_tokens set (the demo does it when the stage-1 config sets it)."
        )
    return root / tokens


class PairEmbeddingDataset(CachedEmbeddingDataset):
    """Stage 1: ``target`` = fused ``f(I, T)`` (the diffused ``z0``), ``text`` = the caption's ``f(T)``
    (or, with ``max_text_tokens``, its token states ``text_tokens/``).

    ``pair_dir`` is what ``embed_pair_set`` writes: caches ``image/``, ``text/``, ``fused/`` (and ``text_tokens/``).
    """

    def __init__(self, pair_dir: str | os.PathLike, max_text_tokens: int | None = None):
        pair_dir = Path(pair_dir)
        text = text_cache(pair_dir, "text", max_text_tokens)
        super().__init__({"target": pair_dir / "fused", "text": text})
        check_text_condition(max_text_tokens, self.text_tokens(), "The prior being trained", str(text))


class TripletEmbeddingDataset(CachedEmbeddingDataset):
    """Stage 2: ``target`` = ``f(I_tgt, T_tgt)``, ``text`` = the instruction, ``control`` = the reference.

    ``triplet_dir`` is what ``embed_triplets`` writes: caches ``reference_fused/``, ``reference_image/``,
    ``instruction_text/``, ``target_fused/`` (and ``instruction_tokens/``, read with ``max_text_tokens``).
    ``control_source`` picks the fused reference ``f(I_ref, T_ref)`` or the image-only ``f(I_ref)``.
    ``near_misses`` > 0 adds ``near_miss [N, near_misses, d]``: the first that many rows per triplet of
    ``near_miss_fused/`` (scenes that narrowly miss the edit), the contrastive term's explicit negatives.
    """

    def __init__(
        self,
        triplet_dir: str | os.PathLike,
        control_source: str = "fused",
        max_text_tokens: int | None = None,
        near_misses: int = 0,
    ):
        if control_source not in ("fused", "image"):
            raise ValueError(f"control_source must be 'fused' or 'image', got {control_source!r}.")
        triplet_dir = Path(triplet_dir)
        text = text_cache(triplet_dir, "instruction_text", max_text_tokens)
        super().__init__(
            {
                "target": triplet_dir / "target_fused",
                "text": text,
                "control": triplet_dir / f"reference_{control_source}",
            }
        )
        if near_misses:
            self.tensors["near_miss"] = self._near_misses(triplet_dir / NEAR_MISS_CACHE, near_misses)

    def _near_misses(self, root: Path, n: int) -> torch.Tensor:
        """``[N, n, d]`` near-miss rows aligned with the triplets; a cache with fewer per triplet, or made by
        another backbone, is refused with the command that makes the right one."""
        fix = f"Re-embed the triplets with near_misses >= {n} (fusion-diff embed-triplets --near-misses {n})."
        if not (root / "manifest.json").is_file():
            raise MissingFileError(f"data.near_misses={n} but there is no near-miss cache at {root}. {fix}")
        cache = EmbeddingCache.read(root)
        have = int(cache.identity.get("near_misses", 0))
        differ = EmbedderIdentity.space_differences(cache.identity, self.identities["target"])
        if have < n or differ:
            why = f"it holds {have} per triplet" if have < n else f"it was embedded by another backbone ({differ})"
            raise CacheMismatchError(f"data.near_misses={n} but the near-miss cache {root} cannot serve: {why}. {fix}")
        self.identities["near_miss"] = cache.identity
        ids = near_miss_ids(self.ids, n)
        missing = cache.missing(ids)
        if missing:
            raise DataError(f"The near-miss cache {root} lacks {len(missing)} rows (e.g. {missing[:3]}). {fix}")
        return cache.load(ids)[1].view(len(self.ids), n, -1)


PAIR_FIELDS = ("image", "text", "fused")
TRIPLET_FIELDS = ("reference_fused", "reference_image", "instruction_text", "target_fused")


def write_random_caches(
    out_dir: str | os.PathLike,
    fields: Sequence[str],
    num: int,
    dim: int,
    seed: int = 0,
    embedder_identity: dict[str, Any] | None = None,
    max_text_tokens: int | None = None,
    max_length: int | None = None,
) -> list[str]:
    """Unit-norm Gaussian embeddings in one cache per field (shared ids): for tests and throughput benchmarks.

    ``fields`` is ``PAIR_FIELDS`` for a stage-1 set or ``TRIPLET_FIELDS`` for a stage-2 set.
    ``max_text_tokens``: also the text field's token-level cache (``TOKEN_CACHES``), Gaussian token states of
    random lengths 2..``max_length`` (default ``max_text_tokens``).
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
    for name in [TOKEN_CACHES[f] for f in fields if f in TOKEN_CACHES and max_text_tokens]:
        cache = EmbeddingCache.open(
            Path(out_dir) / name, {**base, "dim": dim, "kind": "text", "max_text_tokens": max_text_tokens}
        )
        lengths = torch.randint(2, (max_length or max_text_tokens) + 1, (num, 1), generator=generator)
        mask = torch.arange(max_text_tokens)[None] < lengths
        cache.append(ids, torch.randn(num, max_text_tokens, dim, generator=generator) * mask[..., None], mask)
    return ids
