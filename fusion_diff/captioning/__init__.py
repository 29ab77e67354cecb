"""Captioners (generative and retrieval), the caption cache, and the image / fused embedding modes."""

from fusion_diff.captioning.base import Captioner, identity_digest
from fusion_diff.captioning.cache import CaptionCache, caption_with_cache, default_caption_cache_path
from fusion_diff.captioning.factory import CAPTIONER_NAMES, CAPTIONER_TYPES, create_captioner
from fusion_diff.captioning.generative import GenerativeCaptioner
from fusion_diff.captioning.modes import (
    EMBEDDING_MODES,
    EmbeddingMode,
    ModeEmbeddings,
    caption_text_embeddings,
    embed_in_mode,
    fuse_with_captions,
    mode_protocol,
    require_captioner,
)
from fusion_diff.captioning.retrieval import RetrievalCaptioner, load_caption_bank

__all__ = [
    "CAPTIONER_NAMES",
    "CAPTIONER_TYPES",
    "EMBEDDING_MODES",
    "CaptionCache",
    "Captioner",
    "EmbeddingMode",
    "GenerativeCaptioner",
    "ModeEmbeddings",
    "RetrievalCaptioner",
    "caption_text_embeddings",
    "caption_with_cache",
    "create_captioner",
    "default_caption_cache_path",
    "embed_in_mode",
    "fuse_with_captions",
    "identity_digest",
    "load_caption_bank",
    "mode_protocol",
    "require_captioner",
]
