"""``fusion-diff serve``: a web page for composed search over a saved retriever (Gradio; the ``serve`` extra).

``service`` answers queries (no Gradio), ``app`` is the page, ``inputs`` checks what visitors send,
``offline`` keeps the page free of network requests, ``testing`` drives it from a real browser.
"""

from fusion_diff.serve.app import build_app, launch
from fusion_diff.serve.service import (
    QuerySettings,
    SearchRequest,
    SearchResponse,
    SearchService,
    service_from_demo,
    service_from_folder,
)

__all__ = [
    "QuerySettings",
    "SearchRequest",
    "SearchResponse",
    "SearchService",
    "build_app",
    "launch",
    "service_from_demo",
    "service_from_folder",
]
