"""fusion-diff: zero-shot composed image retrieval by generating fused image+text embeddings."""

__version__ = "0.1.0"
