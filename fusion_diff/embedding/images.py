"""Model inputs: image loading with errors that name the file, and batched encoding of any input list."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from fusion_diff.embedding.base import ImageInput, TextTokens
from fusion_diff.errors import DataError, MissingFileError

T = TypeVar("T")
logger = logging.getLogger(__name__)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` fully decoded as RGB; ``MissingFileError`` / ``DataError`` name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"Image file not found: {path}. Check the image root / split file, or pass --allow-missing where offered."
        )
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated files fail here, not later inside a batch
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Image file {path} is corrupt or not an image ({err}). Re-download or regenerate it.") from err


def as_rgb(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image or a path (paths go through ``load_image``)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return load_image(image)


def embed_in_batches(
    encode: Callable[[Sequence[T]], torch.Tensor],
    items: Sequence[T],
    batch_size: int,
    dim: int,
    progress: bool = False,
    desc: str = "embedding",
) -> torch.Tensor:
    """Run ``encode`` over ``items`` in batches; one ``[N, d]`` float32 CPU tensor with unit-norm rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(items), batch_size)
    chunks = [
        encode(items[i : i + batch_size]).float().cpu()
        for i in tqdm(starts, desc=desc, disable=not progress, unit="batch")
    ]
    if not chunks:
        return torch.empty(0, dim)
    return F.normalize(torch.cat(chunks), dim=-1)


def tokens_in_batches(
    encode: Callable[[Sequence[str], int], tuple[torch.Tensor, torch.Tensor, int]],
    texts: Sequence[str],
    max_tokens: int,
    batch_size: int,
    name: str,
) -> TextTokens:
    """Run a backend's token-level text ``encode(batch, max_tokens) -> (states, mask, truncated)`` over ``texts``;
    every batch is padded to ``max_tokens`` columns, and the truncated texts are counted in one warning."""
    if max_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_tokens and batch_size must be >= 1, got {max_tokens} and {batch_size}.")
    states, masks, truncated = [], [], 0
    for start in range(0, len(texts), batch_size):
        batch_states, batch_mask, cut = encode(texts[start : start + batch_size], max_tokens)
        pad = max_tokens - batch_states.shape[1]
        states.append(F.pad(batch_states.float().cpu(), (0, 0, 0, pad)))
        masks.append(F.pad(batch_mask.cpu(), (0, pad)))
        truncated += cut
    if truncated:
        logger.warning(
            "%s: %d of %d texts are longer than max_text_tokens=%d and were truncated (end-of-text token kept); "
            "raise max_text_tokens to keep all of them.",
            name, truncated, len(texts), max_tokens,
        )  # fmt: skip
    if not states:
        return TextTokens(torch.empty(0, max_tokens, 0), torch.zeros(0, max_tokens, dtype=torch.bool))
    return TextTokens(torch.cat(states), torch.cat(masks))
