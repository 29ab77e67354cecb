"""Embedding modes of references and gallery items: ``image`` = f(I), ``fused`` = f(I, caption).

The caption of a fused embedding always comes from a captioner (never from annotations; those are
for rows named oracle). With several candidate captions per image (retrieval top-k, beam search),
the fused embedding uses all of them:

* late-fusion backends (OpenCLIP): ``fuse(f(I), normalize(mean_j f(T_j)))``, the averaged text embedding;
* backends that fuse inside the model (VLM): ``normalize(mean_j f(I, T_j))`` (k forward passes).

With one candidate both reduce to ``f(I, T)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fusion_diff.captioning.base import Captioner
from fusion_diff.captioning.cache import CaptionCache, caption_with_cache
from fusion_diff.captioning.retrieval import RetrievalCaptioner
from fusion_diff.embedding.base import ImageInput, JointEmbedder
from fusion_diff.errors import ConfigError
from fusion_diff.retrieval.method import GalleryMode

EmbeddingMode = GalleryMode
EMBEDDING_MODES: tuple[str, ...] = ("image", "fused")


def require_captioner(mode: str, captioner: Captioner | None, role: str = "gallery") -> None:
    """Check ``mode``; a fused mode without a captioner fails here, before any work, saying how to fix it."""
    if mode not in EMBEDDING_MODES:
        raise ConfigError(f"Unknown {role} embedding mode {mode!r}; choose one of {list(EMBEDDING_MODES)}.")
    if mode == "fused" and captioner is None:
        raise ConfigError(
            f"The {role} embedding mode 'fused' embeds f(I, caption) and needs a captioner, but none was given. "
            f"Set a captioner (CLI: --captioner retrieval|generative; API: captioner=create_captioner(...)), "
            f"or use {role} mode 'image'. Annotation captions are never used here; they belong to oracle rows only."
        )


def mode_protocol(mode: str, captioner: Captioner | None) -> dict[str, Any]:
    """What a result's protocol line records about an embedding mode (the captioner's identity when fused)."""
    if mode != "fused" or captioner is None:
        return {"mode": mode, "captioner": None}
    return {"mode": mode, "captioner": captioner.describe(), "captioner_identity": captioner.identity}


def caption_text_embeddings(
    embedder: JointEmbedder, candidates: Sequence[Sequence[str]], batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """``[N, d]``: per image, the normalised mean text embedding of its candidate captions.

    Each distinct caption is embedded once; the per-image means are a masked gather, not a loop.
    """
    if not candidates:
        return torch.empty(0, embedder.dim)
    vocabulary = list(dict.fromkeys(c for caps in candidates for c in caps))
    text_embeds = embedder.embed_texts(vocabulary, batch_size=batch_size, progress=progress)
    row = {text: n for n, text in enumerate(vocabulary)}
    width = max((len(caps) for caps in candidates), default=1)
    index = torch.tensor([[row[c] for c in caps] + [0] * (width - len(caps)) for caps in candidates], dtype=torch.long)
    lengths = torch.tensor([len(caps) for caps in candidates])
    mask = (torch.arange(width) < lengths.unsqueeze(1)).float()
    summed = (text_embeds[index.view(-1)].view(*index.shape, -1) * mask.unsqueeze(-1)).sum(1)
    return F.normalize(summed, dim=-1)


def fuse_with_captions(
    embedder: JointEmbedder,
    candidates: Sequence[Sequence[str]] | Sequence[str],
    images: Sequence[ImageInput] | None = None,
    image_embeds: torch.Tensor | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Fused embeddings ``f(I, caption)`` ``[N, d]`` (see the module docstring for several candidates).

    Late-fusion backends reuse ``image_embeds`` (``f(I)``, e.g. from an embedding cache) when given;
    other backends need ``images``.
    """
    candidates = [[c] if isinstance(c, str) else list(c) for c in candidates]
    if embedder.supports_late_fusion:
        if image_embeds is None:
            if images is None:
                raise ValueError("fuse_with_captions needs images or image_embeds")
            image_embeds = embedder.embed_images(images, batch_size=batch_size, progress=progress)
        if len(image_embeds) != len(candidates):
            raise ValueError(f"{len(image_embeds)} image embeddings but {len(candidates)} caption lists")
        return embedder.fuse(image_embeds, caption_text_embeddings(embedder, candidates, progress=progress))
    if images is None:
        raise ValueError(f"{type(embedder).__name__} fuses inside the model: fuse_with_captions needs the images")
    widths = {len(c) for c in candidates}
    if len(widths) > 1:
        raise ValueError(f"every image needs the same number of candidate captions, got {sorted(widths)}")
    width = widths.pop() if widths else 1
    summed = sum(
        embedder.embed_pairs(images, [caps[j] for caps in candidates], batch_size=batch_size, progress=progress)
        for j in range(width)
    )
    return F.normalize(summed, dim=-1)


@dataclass
class ModeEmbeddings:
    """Embeddings of a set of images in one mode, and the captions used (None in image mode)."""

    embeddings: torch.Tensor  # [N, d]
    captions: list[str] | None


def embed_in_mode(
    embedder: JointEmbedder,
    mode: str,
    ids: Sequence[str],
    images: Sequence[ImageInput],
    captioner: Captioner | None = None,
    caption_cache: CaptionCache | str | os.PathLike | None = None,
    image_embeds: torch.Tensor | None = None,
    batch_size: int = 64,
    progress: bool = False,
    role: str = "gallery",
) -> ModeEmbeddings:
    """Embed images (aligned with ``ids``) in ``mode``; fused mode captions them through the cache first.

    ``image_embeds`` (``f(I)`` from the same embedder, aligned with ``ids``) skips image encoding for
    late fusion, and for a retrieval captioner built on the same backbone.
    """
    require_captioner(mode, captioner, role)
    needs_image_embeds = mode == "image" or embedder.supports_late_fusion
    if image_embeds is None and needs_image_embeds:
        image_embeds = embedder.embed_images(images, batch_size=batch_size, progress=progress)
    if mode == "image":
        return ModeEmbeddings(image_embeds, None)
    assert captioner is not None
    same_backbone = isinstance(captioner, RetrievalCaptioner) and captioner.embedder.identity == embedder.identity
    cache = (
        caption_cache
        if isinstance(caption_cache, CaptionCache)
        else CaptionCache.open(caption_cache, captioner.identity)
    )
    captions = caption_with_cache(
        captioner,
        ids,
        images,
        cache,
        batch_size=batch_size,
        progress=progress,
        image_embeds=image_embeds if same_backbone else None,
    )
    fused = fuse_with_captions(embedder, cache.candidates(ids), images, image_embeds, batch_size, progress)
    return ModeEmbeddings(fused, captions)
