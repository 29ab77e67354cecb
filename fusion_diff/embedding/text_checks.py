"""Texts a CLIP tokenizer cuts, or that say nothing: warned about (once per batch, with counts), never dropped.

open_clip's tokenizers cut every text at the model's context length (77 tokens for the OpenAI models, fewer for
small ones) without a word, so a long instruction silently loses its end; an empty one embeds as the empty prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


def tokenize_checked(tokenizer: Callable[..., torch.Tensor], texts: Sequence[str]) -> torch.Tensor:
    """``tokenizer(texts)`` (an open_clip tokenizer), warning once for the batch how many texts were cut to the
    context length and how many are empty."""
    texts = list(texts)
    tokens = tokenizer(texts)
    context = tokens.shape[1]
    # A byte-level BPE token covers at least one UTF-8 byte: only texts with more bytes than the context can be cut.
    maybe_long = [text for text in texts if len(text.encode("utf-8")) > context - 2]
    cut = []
    if maybe_long:
        longer = tokenizer(maybe_long, context_length=context + 1)
        pad = tokenizer([""], context_length=context + 1)[0, -1]
        cut = [text for text, row in zip(maybe_long, longer) if row[-1] != pad]
    empty = sum(not text.strip() for text in texts)
    if cut or empty:
        notes = []
        if cut:
            example = cut[0] if len(cut[0]) <= 80 else cut[0][:77] + "..."
            notes.append(
                f"{len(cut)} longer than the text encoder's {context}-token context, cut to it (their end does not "
                f"reach the model; e.g. {example!r})"
            )
        if empty:
            notes.append(f"{empty} empty (embedded as the empty prompt)")
        logger.warning(f"Of {len(texts)} texts in this batch, {' and '.join(notes)}. Shorten or fill them in.")
    return tokens
