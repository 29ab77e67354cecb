"""Joint vision-language embeddings: backends, late fusion, image loading and the embedding cache."""

from fusion_diff.embedding.base import EmbedderIdentity, ImageInput, JointEmbedder, TextTokens, trim_tokens
from fusion_diff.embedding.cache import EmbeddingCache, embed_with_cache
from fusion_diff.embedding.factory import create_embedder
from fusion_diff.embedding.images import load_image
from fusion_diff.embedding.openclip import OpenCLIPEmbedder, save_checkpoint
from fusion_diff.embedding.registry import list_model_configs, register_model_configs, write_model_config

__all__ = [
    "EmbedderIdentity",
    "EmbeddingCache",
    "ImageInput",
    "JointEmbedder",
    "OpenCLIPEmbedder",
    "TextTokens",
    "create_embedder",
    "embed_with_cache",
    "list_model_configs",
    "load_image",
    "register_model_configs",
    "save_checkpoint",
    "trim_tokens",
    "write_model_config",
]
