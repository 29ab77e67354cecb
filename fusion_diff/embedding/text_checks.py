"""Texts a CLIP tokenizer cuts, and empty instructions: warned about (with counts), never dropped.

open_clip's tokenizers cut every text at the model's context length (77 tokens for the OpenAI models, fewer for
small ones) without a word, so a long instruction silently loses its end; an empty instruction embeds as the empty
prompt (the null condition), so its query is the reference's alone. Empty *texts* in general are fine (the null
prompt is one on purpose), so emptiness is checked where instructions enter: ``QueryContext``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)
_warned_contexts: set[int] = set()  # a job embeds many batches: the cut is reported once per context length


def fits_context(tokenizer: Callable[..., torch.Tensor], texts: Sequence[str], context: int) -> list[bool]:
    """Per text, whether ``tokenizer`` keeps all of it within ``context`` tokens (start and end included)."""
    texts = list(texts)
    fits = [True] * len(texts)
    # A byte-level BPE token covers at least one UTF-8 byte: only texts with more bytes than the context can be cut.
    maybe_long = [i for i, text in enumerate(texts) if len(text.encode("utf-8")) > context - 2]
    if maybe_long:
        longer = tokenizer([texts[i] for i in maybe_long], context_length=context + 1)
        pad = tokenizer([""], context_length=context + 1)[0, -1]
        for i, row in zip(maybe_long, longer):
            fits[i] = bool(row[-1] == pad)
    return fits


def tokenize_checked(tokenizer: Callable[..., torch.Tensor], texts: Sequence[str]) -> torch.Tensor:
    """``tokenizer(texts)`` (an open_clip tokenizer), warning how many texts of the batch it cut to the context
    length: the first time in a process for each context length (a training run or an embedding job would
    otherwise repeat it for every batch)."""
    texts = list(texts)
    tokens = tokenizer(texts)
    context = tokens.shape[1]
    cut = [text for text, fits in zip(texts, fits_context(tokenizer, texts, context)) if not fits]
    if cut and context not in _warned_contexts:
        _warned_contexts.add(context)
        example = cut[0] if len(cut[0]) <= 80 else cut[0][:77] + "..."
        logger.warning(
            f"{len(cut)} of {len(texts)} texts in this batch are longer than the text encoder's {context}-token "
            f"context and were cut to it (their end does not reach the model), e.g. {example!r}. Shorten them. "
            "(Shown once: later batches are not reported again.)"
        )
    return tokens


def warn_empty_instructions(instructions: Sequence[str]) -> None:
    """One warning for a batch of queries with empty modification texts (their query is the reference alone)."""
    empty = sum(not text.strip() for text in instructions)
    if empty:
        logger.warning(
            f"{empty} of {len(instructions)} queries in this batch have an empty instruction: each is embedded as "
            "the empty prompt, so its query is the reference alone. Fill them in, or drop those queries."
        )
