"""fusion-diff: zero-shot composed image retrieval by generating fused image+text embeddings."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``fusion_diff.ComposedRetriever`` / ``fusion_diff.Hit``, imported on first use (keeps ``import fusion_diff`` light)."""
    if name in ("ComposedRetriever", "Hit"):
        from fusion_diff.retrieval import retriever

        return getattr(retriever, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
