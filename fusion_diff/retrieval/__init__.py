"""Retrieval: gallery indexes (in memory, persisted, Qdrant), the retrieval-method protocol and the retriever."""

from fusion_diff.retrieval.index import FaissGalleryIndex, GalleryIndex, SearchResult, build_index
from fusion_diff.retrieval.method import GalleryMode, QueryContext, RetrievalMethod

_LAZY = {  # imported on first use: the retriever imports captioning, which imports this package
    "ComposedRetriever": "fusion_diff.retrieval.retriever",
    "Hit": "fusion_diff.retrieval.retriever",
    "IndexSettings": "fusion_diff.retrieval.store",
    "PersistentIndex": "fusion_diff.retrieval.store",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ComposedRetriever",
    "FaissGalleryIndex",
    "GalleryIndex",
    "GalleryMode",
    "Hit",
    "IndexSettings",
    "PersistentIndex",
    "QueryContext",
    "RetrievalMethod",
    "SearchResult",
    "build_index",
]
