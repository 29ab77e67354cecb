"""The reference rows of every CIR table: image-only, text-only and sum fusion, as ``RetrievalMethod``s.

They read only what the evaluator already embedded (``QueryContext``), so they cost nothing
beyond the shared caches and show what the joint space gives for free.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fusion_diff.captioning.editor import CaptionEditor, edited_caption_embeddings, load_caption_editor
from fusion_diff.errors import ConfigError
from fusion_diff.retrieval.method import GalleryMode, QueryContext

GALLERY_MODES: tuple[str, ...] = ("image", "fused")


class Baseline:
    """What the baselines share: a checked gallery mode and a protocol record naming their settings."""

    name: str = "baseline"

    def __init__(self, gallery_mode: GalleryMode = "image") -> None:
        if gallery_mode not in GALLERY_MODES:
            raise ConfigError(
                f"{self.name}: unknown gallery mode {gallery_mode!r}; choose one of {list(GALLERY_MODES)}."
            )
        self.gallery_mode = gallery_mode

    def settings(self) -> dict[str, Any]:
        return {}

    def protocol(self) -> dict[str, Any]:
        return {"method": self.name, "gallery_mode": self.gallery_mode, **self.settings()}


class ImageOnly(Baseline):
    """Query = the reference image's embedding ``f(I_ref)``: how far plain visual similarity gets."""

    name = "image-only"

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        return F.normalize(context.reference_image_embeds.float(), dim=-1)


class TextOnly(Baseline):
    """Query = the modification text's embedding ``f(T_mod)``, ignoring the reference image."""

    name = "text-only"

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        return F.normalize(context.modification_text_embeds.float(), dim=-1)


class SumFusion(Baseline):
    """Query = ``normalize(w f(I_ref) + (1 - w) f(T_mod))``, the training-free fusion baseline (w = 0.5)."""

    name = "sum"

    def __init__(self, gallery_mode: GalleryMode = "image", image_weight: float = 0.5) -> None:
        super().__init__(gallery_mode)
        if not 0.0 <= image_weight <= 1.0:
            raise ConfigError(f"sum: image_weight must be in [0, 1], got {image_weight}.")
        self.image_weight = image_weight

    def settings(self) -> dict[str, Any]:
        return {"image_weight": self.image_weight}

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        w = self.image_weight
        return F.normalize(
            w * context.reference_image_embeds.float() + (1 - w) * context.modification_text_embeds.float(), dim=-1
        )


class EditedCaption(Baseline):
    """Query = ``f(edit(T_ref, T_mod))``: the reference's captioner caption, edited by a caption editor as the
    instruction says, embedded as text (the text-centric route of CIReVL / LDRE, in the joint space)."""

    name = "edited-caption"

    def __init__(
        self, caption_editor: str | CaptionEditor | None = None, gallery_mode: GalleryMode = "fused", batch_size: int = 256
    ):
        super().__init__(gallery_mode)
        if caption_editor is None:
            raise ConfigError(
                "edited-caption needs a caption editor: `--set edited-caption.caption_editor=DIR` (a folder from "
                "`fusion-diff world caption-editor`, or a seq2seq model id such as google/flan-t5-large)."
            )
        self.editor = load_caption_editor(caption_editor)
        self.batch_size = batch_size

    def settings(self) -> dict[str, Any]:
        return {"caption_editor": self.editor.identity}

    def query_embeddings(self, context: QueryContext) -> torch.Tensor:
        return edited_caption_embeddings(
            self.editor,
            context.reference_captions,
            context.modification_texts,
            context.embedder,
            self.name,
            self.batch_size,
        )
