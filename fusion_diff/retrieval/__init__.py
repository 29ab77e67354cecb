"""Retrieval: gallery indexes (exact and FAISS) and the retrieval-method protocol."""

from fusion_diff.retrieval.index import FaissGalleryIndex, GalleryIndex, SearchResult, build_index
from fusion_diff.retrieval.method import GalleryMode, QueryContext, RetrievalMethod

__all__ = [
    "FaissGalleryIndex",
    "GalleryIndex",
    "GalleryMode",
    "QueryContext",
    "RetrievalMethod",
    "SearchResult",
    "build_index",
]
