"""The embedding cache: ids + embeddings in safetensors shards, described by a JSON manifest.

Layout of a cache folder::

    manifest.json               identity (backend, model, pretrained, dim, fusion weight, kind, ...),
                                dim, count, shard list, versions
    shard-00000.safetensors     tensor "embeddings" [n, dim] float32; the shard's ids in its metadata

A token-level text cache (identity key ``max_text_tokens: L``, what ``JointEmbedder.encode_text_tokens``
gives) holds ``embeddings [n, L, dim]`` and a bool ``mask [n, L]`` in each shard; its identity differs
from the pooled text cache's, so neither can be opened as the other.

Why safetensors shards: each append writes one new self-contained file (temp name, then rename),
so an interrupted job loses at most the chunk in flight and never leaves a torn file; reading
goes through safetensors' mmap backend, so ``load()`` of a single-shard cache is zero-copy and
pages in lazily (``compact()`` merges shards into one). A shard that was renamed into place but
not yet listed in the manifest (a crash between the two writes) is complete by construction and is
adopted on the next ``open``.

One writing job at a time per cache folder: jobs hold the folder's lock (``writing()``, see
``fusion_diff.utils.locking``) and a second one is refused, naming the first. Several processes of
one sharded job (``fusion_diff.embedding.job``) write shards of their own numbers with
``write_shard`` under the lock of their main process, which then lists them all by re-opening the
cache. NaN or infinite embeddings are refused at every write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fusion_diff.embedding.base import TextTokens, upgrade_identity
from fusion_diff.errors import CacheMismatchError, DataError, MissingFileError
from fusion_diff.utils.checks import require_finite
from fusion_diff.utils.io import artifact_manifest, atomic_path, read_json, write_json_atomic
from fusion_diff.utils.locking import exclusive_folder

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_KIND = "embedding_cache"
_TENSOR = "embeddings"
_MASK = "mask"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
T = TypeVar("T")


def _canonical(identity: dict[str, Any]) -> dict[str, Any]:
    """JSON round-trip so that tuples/lists and int/float spellings compare as they are stored, in
    today's identity form (see ``upgrade_identity``)."""
    return upgrade_identity(json.loads(json.dumps(identity, sort_keys=True)))


class EmbeddingCache:
    """Append-only, resumable store of ``id -> embedding`` for one embedder identity."""

    def __init__(self, root: Path, identity: dict[str, Any], dim: int | None, shards: list[dict[str, Any]]) -> None:
        self.root = root
        self.identity = identity
        self._dim = dim
        self._shards = shards  # [{"file": name, "count": n}]
        self._shard_ids: list[list[str]] = [self._read_ids(self.root / shard["file"]) for shard in shards]
        self._index: dict[str, tuple[int, int]] = {}  # id -> (shard number, row)
        self.max_text_tokens: int | None = identity.get("max_text_tokens")  # token-level text cache: L
        for number, ids in enumerate(self._shard_ids):
            self._index.update({item: (number, row) for row, item in enumerate(ids)})

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        identity: dict[str, Any],
        create: bool = True,
        repair: bool = False,
        expect_unlisted: bool = False,
    ) -> EmbeddingCache:
        """Open (or create) the cache at ``root`` for ``identity``; a cache made by anything else is refused.

        ``identity`` is the embedder's ``identity.as_dict()`` plus what else defines the vectors
        (``kind``: "image" / "text" / "fused", a captioner id, ...). Its ``dim`` key, when present,
        fixes the embedding size. ``repair`` (for the jobs that write the cache): drop missing or
        corrupt shards from the manifest, with a warning, so that their ids are computed again;
        readers keep ``repair=False`` and are refused such a cache. ``expect_unlisted``: the shards
        that the manifest does not list were written by the processes of a job (``write_shard``),
        not left by a crash, so adopting them is not worth a warning.
        """
        root = Path(root)
        identity = _canonical(identity)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            if not create:
                raise MissingFileError(
                    f"No embedding cache at {root} ({MANIFEST} missing). Build it first (fusion-diff embed ...)."
                )
            if any(root.glob("shard-*.safetensors")):
                raise DataError(
                    f"{root} holds embedding shards but no {MANIFEST}; it cannot be trusted. Delete {root}."
                )
            cache = cls(root, identity, identity.get("dim"), [])
            cache._write_manifest()
            return cache
        manifest = read_json(manifest_path, "embedding cache manifest")
        if manifest.get("kind") != CACHE_KIND:
            raise DataError(f"{manifest_path} is not an embedding cache manifest (kind={manifest.get('kind')!r}).")
        stored = _canonical(manifest["identity"])
        if stored != identity:
            keys = sorted(k for k in stored.keys() | identity.keys() if stored.get(k) != identity.get(k))
            diffs = ", ".join(f"{k}: cache has {stored.get(k)!r}, requested {identity.get(k)!r}" for k in keys)
            raise CacheMismatchError(
                f"Embedding cache {root} was made by another embedder or setting ({diffs}). Delete {root} to rebuild "
                "it, or point to a cache directory of its own for this embedder."
            )
        shards = manifest["shards"]
        if repair:
            shards = cls._readable(root, shards)
        cache = cls(root, stored, manifest.get("dim"), shards)
        if cache._adopt_orphans(repair, quiet=expect_unlisted) or len(shards) != len(manifest["shards"]):
            cache._write_manifest()
        return cache

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        """True when ``root`` holds a cache (its manifest)."""
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def read(cls, root: str | os.PathLike) -> EmbeddingCache:
        """Open an existing cache with whatever identity it was made with (for readers such as search)."""
        manifest = read_json(Path(root) / MANIFEST, "embedding cache manifest")
        if not isinstance(manifest, dict) or "identity" not in manifest:
            raise DataError(
                f"{Path(root) / MANIFEST} is not an embedding cache manifest. Point to a folder made by fusion-diff embed."
            )
        return cls.open(root, manifest["identity"], create=False)

    @classmethod
    def _readable(cls, root: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The listed shards that can be read; the others are named in a warning and left out."""
        kept = []
        for shard in shards:
            try:
                cls._read_ids(root / shard["file"])
            except DataError as err:
                logger.warning("%s Its ids will be computed again.", err)
                (root / shard["file"]).unlink(missing_ok=True)
                continue
            kept.append(shard)
        return kept

    @staticmethod
    def _read_ids(path: Path) -> list[str]:
        if not path.is_file():
            raise DataError(
                f"Embedding cache shard {path} listed in the manifest is missing. Delete {path.parent} and rebuild."
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                return json.loads(handle.metadata()["ids"])
        except Exception as err:  # header / JSON corruption comes in several exception types
            raise DataError(
                f"Embedding cache shard {path} is corrupt ({err}). Delete {path.parent} and rebuild."
            ) from err

    def _adopt_orphans(self, repair: bool = False, quiet: bool = False) -> int:
        """Reconcile shards the manifest does not list, left by a crash between two atomic writes.

        A shard whose ids are all cached already is a leftover of ``compact`` (its rows live on in
        another shard) and is removed; a shard of new ids was appended just before the crash (or
        written by a process of a sharded job) and is adopted, in shard-number order. With
        ``repair``, an unreadable one is removed (it was never listed: nothing is lost). Anything
        else cannot be explained and is refused.
        """
        listed = {shard["file"] for shard in self._shards}
        orphans = sorted(
            p for p in self.root.glob("shard-*.safetensors") if _SHARD_RE.match(p.name) and p.name not in listed
        )
        adopted = 0
        for path in orphans:
            try:
                ids = self._read_ids(path)
            except DataError as err:
                if not repair:
                    raise
                logger.warning("%s Removed; its ids will be computed again.", err)
                path.unlink()
                continue
            if self._index.keys() >= set(ids):
                path.unlink()
                continue
            with safe_open(str(path), framework="pt") as handle:
                shape = handle.get_slice(_TENSOR).get_shape()
            fits = self._dim in (None, shape[-1]) and len(ids) == shape[0] and self._index.keys().isdisjoint(ids)
            if not fits:
                raise DataError(
                    f"Shard {path} is not listed in {self.root / MANIFEST} and does not fit the cache. Delete it."
                )
            self._dim = shape[-1]
            self._register(path.name, ids)
            adopted += 1
        if orphans and not quiet:
            logger.warning(
                "%s: adopted %d shard(s) of an interrupted append, removed %d leftover(s) of an interrupted compact.",
                self.root,
                adopted,
                len(orphans) - adopted,
            )
        return len(orphans)

    def _register(self, name: str, ids: list[str]) -> None:
        number = len(self._shards)
        self._shards.append({"file": name, "count": len(ids)})
        self._shard_ids.append(ids)
        self._index.update({item: (number, row) for row, item in enumerate(ids)})

    def _write_manifest(self) -> None:
        manifest = artifact_manifest(
            CACHE_KIND,
            identity=self.identity,
            dim=self._dim,
            count=len(self),
            dtype="float32",
            max_text_tokens=self.max_text_tokens,  # null: one vector per id
            shards=self._shards,
        )
        write_json_atomic(self.root / MANIFEST, manifest)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, item: str) -> bool:
        return item in self._index

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def ids(self) -> list[str]:
        return [item for ids in self._shard_ids for item in ids]

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids not yet cached, in first-seen order, without repeats."""
        return [item for item in dict.fromkeys(ids) if item not in self._index]

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def writing(self, job: str = "embedding job") -> Iterator[EmbeddingCache]:
        """Hold the folder's writer lock for the block, and see what other writers appended before it.

        A second job writing the same cache at once is refused (``FolderInUseError`` naming the holder):
        two writers would pick the same shard numbers and list only part of each other's rows.
        """
        with exclusive_folder(self.root, job):
            vars(self).update(vars(type(self).open(self.root, self.identity, create=False)))
            yield self

    def append(self, ids: Sequence[str], embeds: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Store one chunk as a new shard (atomic), then list it in the manifest (atomic).

        A token-level text cache takes ``embeds [n, L, dim]`` with their ``mask [n, L]``; any other ``[n, dim]``.
        """
        ids = [str(item) for item in ids]
        self._check_rows(ids, embeds, mask)
        if self._dim is not None and embeds.shape[-1] != self._dim:
            raise CacheMismatchError(
                f"Embedding cache {self.root} holds {self._dim}-d embeddings; refusing {embeds.shape[-1]}-d ones. "
                "Use a cache directory of their own."
            )
        repeated = [item for item, n in Counter(ids).items() if n > 1]
        present = [item for item in ids if item in self._index]
        if repeated or present:
            raise DataError(
                f"Refusing duplicate ids in embedding cache {self.root}: {len(present)} already cached (e.g. "
                f"{present[:3]}), {len(repeated)} repeated in the chunk (e.g. {repeated[:3]}). Append only cache.missing(ids)."
            )
        if not ids:
            return
        name = self.write_shard(self.next_shard_number(), ids, embeds, mask)
        self._dim = embeds.shape[-1]
        self._register(name, ids)
        self._write_manifest()

    def _check_rows(self, ids: Sequence[str], embeds: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Refuse rows of the wrong layout: pooled vectors for a token-level cache, tokens for a pooled one."""
        tokens = self.max_text_tokens
        if tokens is None:
            if embeds.ndim != 2 or embeds.shape[0] != len(ids) or mask is not None:
                raise CacheMismatchError(
                    f"Embedding cache {self.root} holds one vector per id ([len(ids), dim], no mask); got "
                    f"{tuple(embeds.shape)} for {len(ids)} ids{' with a token mask' if mask is not None else ''}. "
                    "Token-level text goes into a cache opened with max_text_tokens in its identity."
                )
            return
        if embeds.ndim != 3 or embeds.shape[:2] != (len(ids), tokens) or mask is None or mask.shape != embeds.shape[:2]:
            raise CacheMismatchError(
                f"Embedding cache {self.root} holds token-level text (max_text_tokens={tokens}): it needs "
                f"[{len(ids)}, {tokens}, dim] states and a [{len(ids)}, {tokens}] mask, got {tuple(embeds.shape)} "
                f"and {None if mask is None else tuple(mask.shape)}."
            )

    def write_shard(
        self, number: int, ids: Sequence[str], embeds: torch.Tensor, mask: torch.Tensor | None = None
    ) -> str:
        """Write shard ``number`` (atomically) without listing it: the next ``open`` adopts it.

        This is how the processes of a sharded job write side by side: each writes the numbers of
        its own work units and only the main process touches the manifest.
        """
        self._check_rows(ids, embeds, mask)
        name = f"shard-{number:05d}.safetensors"
        tensors = {_TENSOR: embeds.detach().to("cpu", torch.float32).contiguous()}
        if mask is not None:
            tensors[_MASK] = mask.detach().to("cpu", torch.bool).contiguous()
        require_finite(
            tensors[_TENSOR],
            f"Embeddings for {self.root / name} (ids {list(ids)[:3]}...)",
            "Refusing to cache them: a NaN/inf vector scores NaN against everything and ranks arbitrarily. Check "
            "the model's inputs and settings (e.g. a NaN guidance scale) and recompute.",
        )
        with atomic_path(self.root / name) as tmp:
            save_file(tensors, str(tmp), metadata={"ids": json.dumps([str(i) for i in ids])})
        return name

    def next_shard_number(self) -> int:
        numbers = [int(m.group(1)) for p in self.root.glob("shard-*.safetensors") if (m := _SHARD_RE.match(p.name))]
        return max(numbers, default=-1) + 1

    def compact(self) -> None:
        """Merge all shards into one, so that ``load()`` is a zero-copy memory map of a single file."""
        if len(self._shards) <= 1:
            return
        ids, embeds = self.load()
        mask = self._gather(_MASK, None) if self.max_text_tokens is not None else None
        old = [self.root / shard["file"] for shard in self._shards]
        self._shards, self._shard_ids, self._index = [], [], {}
        name = self.write_shard(self.next_shard_number(), ids, embeds, mask)
        self._register(name, ids)
        self._write_manifest()
        for path in old:
            path.unlink()

    # ------------------------------------------------------------------ reading
    def _shard_tensors(self, name: str = _TENSOR) -> list[torch.Tensor]:
        tensors = []
        for shard in self._shards:
            with safe_open(str(self.root / shard["file"]), framework="pt") as handle:  # mmap backend: no copy
                tensors.append(handle.get_tensor(name))
        return tensors

    def _empty(self, name: str) -> torch.Tensor:
        rows = () if self.max_text_tokens is None else (self.max_text_tokens,)
        if name == _MASK:
            return torch.zeros(0, *rows, dtype=torch.bool)
        return torch.empty(0, *rows, self._dim or 0)

    def _gather(self, name: str, ids: list[str] | None) -> torch.Tensor:
        """Rows of tensor ``name`` of every shard: all of them in insertion order, or those of ``ids`` in order."""
        tensors = self._shard_tensors(name)
        if ids is None:
            if not tensors:
                return self._empty(name)
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        if not ids:
            return self._empty(name)
        where = torch.tensor([self._index[item] for item in ids], dtype=torch.long)  # [N, 2]: (shard, row)
        if len(tensors) == 1:
            return tensors[0].index_select(0, where[:, 1])
        out = tensors[0].new_empty(len(ids), *tensors[0].shape[1:])
        for number, tensor in enumerate(tensors):  # gather shard by shard: no copy of the whole table
            take = where[:, 0] == number
            if take.any():
                out[take] = tensor.index_select(0, where[take, 1])
        return out

    def _check_present(self, ids: Sequence[str] | None) -> list[str] | None:
        if ids is None:
            return None
        ids = list(ids)
        absent = [item for item in ids if item not in self._index]
        if absent:
            raise DataError(
                f"{len(absent)} ids are not in embedding cache {self.root} (e.g. {absent[:5]}). Embed them first."
            )
        return ids

    def load(self, ids: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """``(ids, [N, dim] float32)`` (token-level text: ``[N, L, dim]``); all of the cache (in insertion order)
        or the given ids, in their order.

        A single-shard cache loaded whole is a copy-on-write memory map of the shard (zero-copy, paged
        in lazily; writes never reach the file); anything else is gathered into memory.
        """
        wanted = self._check_present(ids)
        return (self.ids if wanted is None else wanted), self._gather(_TENSOR, wanted)

    def load_tokens(self, ids: Sequence[str] | None = None) -> tuple[list[str], TextTokens]:
        """``(ids, TextTokens(states [N, L, dim], mask [N, L]))`` of a token-level text cache (memory-mapped as ``load``)."""
        if self.max_text_tokens is None:
            raise CacheMismatchError(
                f"Embedding cache {self.root} holds one pooled vector per id, not token-level text; embed the texts "
                "with max_text_tokens set (a cache of its own) or use pooled text (max_text_tokens: 0)."
            )
        wanted = self._check_present(ids)
        return (self.ids if wanted is None else wanted), TextTokens(
            self._gather(_TENSOR, wanted), self._gather(_MASK, wanted)
        )


def embed_with_cache(
    cache: EmbeddingCache,
    ids: Sequence[str],
    items: Sequence[T],
    embed_fn: Callable[[list[T]], torch.Tensor],
    batch_size: int = 1024,
    progress: bool = True,
) -> torch.Tensor:
    """Embed only the ids the cache lacks, one appended shard per ``batch_size`` items; return all in ``ids`` order.

    ``items[i]`` is the input for ``ids[i]`` (an image path, a text, an (image, text) pair, ...);
    ``embed_fn`` maps a list of items to ``[n, dim]`` (or, for a token-level text cache, to ``TextTokens``). Interrupt it at any point and call it again:
    finished chunks are kept, the rest is computed, nothing is duplicated.
    """
    if len(ids) != len(items):
        raise ValueError(f"embed_with_cache needs one item per id, got {len(ids)} ids and {len(items)} items.")
    first = {item: position for position, item in reversed(list(enumerate(ids)))}
    if cache.missing(ids):  # a cache that has everything is only read: no lock needed
        with cache.writing():
            todo = cache.missing(ids)
            desc = f"embedding into {cache.root.name}"
            with tqdm(total=len(todo), desc=desc, disable=not progress, unit="item") as bar:
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start : start + batch_size]
                    out = embed_fn([items[first[item]] for item in chunk])
                    if isinstance(out, TextTokens):
                        cache.append(chunk, out.states, out.mask)
                    else:
                        cache.append(chunk, out)
                    bar.update(len(chunk))
    return cache.load(ids)[1]
