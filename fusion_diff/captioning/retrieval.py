"""Retrieval captioning: the backbone itself ranks a caption bank and the nearest caption is the caption.

No extra model is needed, and the caption lives in the very space ``f`` embeds into: the shapes
world's captioner, and a cheap option for real data (bank = the captions of a training set).
With ``top_k > 1`` the captioner keeps the k nearest captions; fused embeddings then use their
averaged text embedding (see ``fusion_diff.captioning.modes``), which hedges between near ties.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fusion_diff.captioning.base import Captioner, identity_digest
from fusion_diff.embedding.base import ImageInput, JointEmbedder
from fusion_diff.embedding.cache import EmbeddingCache, embed_with_cache
from fusion_diff.errors import ConfigError, DataError, MissingFileError
from fusion_diff.retrieval.index import GalleryIndex
from fusion_diff.utils import paths

PAIR_SET_FILE = "pairs.jsonl"  # a pair-set folder (data_synth.shapes.pairs) holds its captions here
BANK_CHUNK = 8192  # bank captions per cache shard: the unit of resumption


def text_id(text: str) -> str:
    """Content id of a caption: caches of bank embeddings are shared across banks that overlap."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


def _read_jsonl_captions(path: Path) -> list[str]:
    captions = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                captions.append(json.loads(line)["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(
                    f"Caption bank {path}, line {number}: expected a JSON object with a 'caption' field ({err}). "
                    "Fix the line, or give a plain text file with one caption per line."
                ) from err
    return captions


def load_caption_bank(source: Sequence[str] | str | os.PathLike) -> tuple[list[str], str]:
    """(unique captions in first-seen order, a default bank name) from a list or a file.

    ``source`` is a list of captions; a text file (one caption per line, blank lines skipped);
    a ``.jsonl`` file whose lines carry a ``caption`` field; or a pair-set folder (its ``pairs.jsonl``).
    Duplicates are dropped: they would only tie with themselves in the ranking.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / PAIR_SET_FILE
        if not path.is_file():
            raise MissingFileError(
                f"Caption bank not found: {path}. Give a text file (one caption per line), a .jsonl file with a "
                f"'caption' field, or a pair-set folder holding {PAIR_SET_FILE}."
            )
        if path.suffix == ".jsonl":
            captions, name = _read_jsonl_captions(path), path.parent.name if path.name == PAIR_SET_FILE else path.stem
        else:
            captions, name = path.read_text(encoding="utf-8").splitlines(), path.stem
        where = str(path)
    else:
        captions, name, where = list(source), "bank", "the caption list"
    unique = list(dict.fromkeys(c.strip() for c in captions if c and c.strip()))
    if not unique:
        raise DataError(f"Caption bank {where} holds no captions. Give at least one non-empty caption.")
    return unique, name


class RetrievalCaptioner(Captioner):
    """Captions an image with the bank caption(s) whose text embedding is nearest its image embedding.

    Args:
        embedder: the joint embedder that ranks (normally the retrieval backbone itself).
        bank: captions, or a path (see ``load_caption_bank``).
        top_k: candidates kept per image; ``top_k > 1`` is the "fused top-k" mode.
        bank_name: name recorded in the identity (default: the file name, or "bank").
        cache_dir: if given, bank text embeddings are kept in an ``EmbeddingCache`` there (keyed by
            caption content, so it is resumable and shared by banks that overlap); ``"auto"`` means
            ``<cache root>/text_embeddings/<backbone hash>``.
        text_batch_size: batch size for embedding the bank.
    """

    def __init__(
        self,
        embedder: JointEmbedder,
        bank: Sequence[str] | str | os.PathLike,
        top_k: int = 1,
        bank_name: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        text_batch_size: int = 256,
    ) -> None:
        self.embedder = embedder
        self.bank, default_name = load_caption_bank(bank)
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}.")
        if top_k > len(self.bank):
            raise ConfigError(f"top_k={top_k} exceeds the caption bank's {len(self.bank)} unique captions.")
        self.num_candidates = top_k
        self.bank_name = bank_name or default_name
        if cache_dir == "auto":
            cache_dir = paths.cache_dir("text_embeddings") / identity_digest(embedder.identity.as_dict())
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.text_batch_size = text_batch_size
        self.bank_sha1 = hashlib.sha1("\n".join(self.bank).encode("utf-8")).hexdigest()
        self._index: GalleryIndex | None = None

    @property
    def identity(self) -> dict[str, Any]:
        return {
            "type": "retrieval",
            "embedder": self.embedder.identity.as_dict(),
            "bank": self.bank_name,
            "bank_size": len(self.bank),
            "bank_sha1": self.bank_sha1,
            "top_k": self.num_candidates,
        }

    def describe(self) -> str:
        return (
            f"retrieval(bank={self.bank_name}[{len(self.bank)}], top{self.num_candidates}, "
            f"{self.embedder.identity.describe()})"
        )

    def bank_embeddings(self, progress: bool = False) -> torch.Tensor:
        """``[M, d]`` text embeddings of the bank, computed once (and cached on disk with ``cache_dir``)."""
        return self._bank_index(progress).embeddings

    def _bank_index(self, progress: bool = False) -> GalleryIndex:
        if self._index is None:
            ids = [text_id(t) for t in self.bank]
            if self.cache_dir is None:
                embeds = self.embedder.embed_texts(self.bank, batch_size=self.text_batch_size, progress=progress)
            else:
                cache = EmbeddingCache.open(self.cache_dir, {**self.embedder.identity.as_dict(), "kind": "text"})
                embed = partial(self.embedder.embed_texts, batch_size=self.text_batch_size)
                embeds = embed_with_cache(cache, ids, self.bank, embed, batch_size=BANK_CHUNK, progress=progress)
            self._index = GalleryIndex(embeds, ids)
        return self._index

    def rank(self, image_embeds: torch.Tensor) -> list[list[str]]:
        """Top-k bank captions for precomputed image embeddings ``[N, d]`` of this captioner's embedder."""
        index = self._bank_index()
        if image_embeds.ndim != 2 or image_embeds.shape[1] != index.embeddings.shape[1]:
            raise DataError(
                f"Image embeddings of shape {tuple(image_embeds.shape)} do not match the bank's dimension "
                f"{index.embeddings.shape[1]}; they must come from {self.embedder.identity.describe()}."
            )
        if len(image_embeds) == 0:
            return []
        indices = index.search(image_embeds, k=self.num_candidates).indices.tolist()
        return [[self.bank[i] for i in row] for row in indices]

    def caption_candidates(
        self, images: Sequence[ImageInput], batch_size: int = 32, progress: bool = False
    ) -> list[list[str]]:
        self._bank_index(progress)
        return self.rank(self.embedder.embed_images(images, batch_size=batch_size, progress=progress))
