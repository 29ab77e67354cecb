"""A Qdrant collection behind the gallery-index interface: the same code searches a local on-disk collection
(``path=``, qdrant-client's local mode: tests, small galleries) or a cluster (``url=``).

Points are numbered by gallery row; the payload is the item metadata (``id``, ``path``, ``caption``). The
index manifest (embedding-space identity, dim, count) lives as the one point of a companion collection
``<collection>-manifest``, so a retriever refuses a collection made for another embedder as it refuses a
FAISS folder. Per-query exclusion is a ``must_not`` filter on the payload ``id``; queries go in one batch
request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fusion_diff.errors import CacheMismatchError, ConfigError, DataError, MissingFileError
from fusion_diff.retrieval.index import NAN_QUERIES, SearchResult
from fusion_diff.retrieval.method import SampleScoring
from fusion_diff.retrieval.store import INDEX_KIND, NAN_GALLERY, PersistentIndex, space_differences
from fusion_diff.utils.checks import check_top_k, require_finite
from fusion_diff.utils.io import artifact_manifest

UPLOAD_BATCH = 1024
UPLOAD_CHUNK = 65536  # index rows whose metadata is decoded per upload call


def _client(url: str | None, path: str | None, api_key: str | None = None) -> Any:
    try:
        from qdrant_client import QdrantClient
    except ImportError as err:
        raise ConfigError("The Qdrant backend needs qdrant-client: pip install 'fusion-diff[qdrant]'.") from err
    if (url is None) == (path is None):
        raise ConfigError("A Qdrant index needs exactly one of url= (a server or cluster) or path= (local mode).")
    return QdrantClient(url=url, api_key=api_key) if url else QdrantClient(path=str(path))


class QdrantIndex:
    """Search a Qdrant collection like a ``PersistentIndex`` (``search``, ``add``, ``identity``, ``dim``)."""

    def __init__(self, client: Any, collection: str, manifest: dict[str, Any], url: str | None, path: str | None):
        self.client = client
        self.collection = collection
        self.manifest = manifest
        self.identity: dict[str, Any] = manifest["identity"]
        self.url, self.path = url, path

    @property
    def location(self) -> str:
        return f"{self.url or self.path}#{self.collection}"

    @classmethod
    def open(
        cls,
        collection: str,
        url: str | None = None,
        path: str | None = None,
        identity: dict[str, Any] | None = None,
        api_key: str | None = None,
    ) -> QdrantIndex:
        """Connect to an uploaded collection; with ``identity``, one made for another space is refused."""
        client = _client(url, path, api_key)
        if not client.collection_exists(collection) or not client.collection_exists(f"{collection}-manifest"):
            raise MissingFileError(
                f"No fusion-diff collection {collection!r} at {url or path}. Upload an index first "
                "(fusion-diff index upload --index DIR ...)."
            )
        (record,) = client.retrieve(f"{collection}-manifest", ids=[0], with_payload=True)
        manifest = record.payload
        if manifest.get("kind") != INDEX_KIND:
            raise DataError(f"Collection {collection!r} at {url or path} was not written by fusion-diff.")
        if identity is not None and identity != manifest["identity"]:
            raise CacheMismatchError(
                f"Qdrant collection {collection!r} was built for another embedding space "
                f"({space_differences(manifest['identity'], identity)})."
            )
        return cls(client, collection, manifest, url, path)

    @classmethod
    def upload(
        cls,
        index: PersistentIndex,
        collection: str,
        url: str | None = None,
        path: str | None = None,
        api_key: str | None = None,
    ) -> QdrantIndex:
        """Copy a FAISS index folder (vectors + metadata + identity) into a new collection (replaced if present)."""
        from qdrant_client import models

        client = _client(url, path, api_key)
        for name in (collection, f"{collection}-manifest"):
            if client.collection_exists(name):
                client.delete_collection(name)
        client.create_collection(
            collection, vectors_config=models.VectorParams(size=index.dim, distance=models.Distance.DOT)
        )
        if url:  # exclusion filters on the id payload; local mode ignores payload indexes
            client.create_payload_index(collection, "id", models.PayloadSchemaType.KEYWORD)
        manifest = artifact_manifest(
            INDEX_KIND, identity=index.identity, dim=index.dim, count=0, source=str(index.root), backend="qdrant"
        )
        qdrant = cls(client, collection, manifest, url, path)
        for start in range(0, len(index), UPLOAD_CHUNK):  # metadata decoded a chunk at a time, not all at once
            qdrant.add(index.embeddings[start : start + UPLOAD_CHUNK], index.items[start : start + UPLOAD_CHUNK])
        return qdrant

    def _write_manifest(self) -> None:
        from qdrant_client import models

        name = f"{self.collection}-manifest"
        if not self.client.collection_exists(name):
            self.client.create_collection(
                name, vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT)
            )
        self.client.upsert(name, points=[models.PointStruct(id=0, vector=[1.0], payload=self.manifest)])

    def reference(self) -> dict[str, Any]:
        """How a saved retriever names this index (no credentials are written)."""
        return {"backend": "qdrant", "collection": self.collection, "url": self.url, "path": self.path}

    # ------------------------------------------------------------------ interface
    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def add(self, embeddings: torch.Tensor, items: Sequence[dict[str, Any]]) -> QdrantIndex:
        """Upload new items (numbered after the existing ones), then record the new count."""
        if embeddings.shape != (len(items), self.dim):
            raise DataError(f"{tuple(embeddings.shape)} embeddings for {len(items)} new {self.dim}-d items.")
        require_finite(embeddings, f"Qdrant collection {self.collection!r}: new gallery embeddings", NAN_GALLERY)
        start = len(self)
        self.client.upload_collection(
            self.collection,
            vectors=np.ascontiguousarray(embeddings.detach().cpu().float().numpy()),
            payload=list(items),
            ids=list(range(start, start + len(items))),
            batch_size=UPLOAD_BATCH,
            wait=True,
        )
        self.manifest["count"] = start + len(items)
        self._write_manifest()
        return self

    def search(
        self,
        queries: torch.Tensor,
        k: int = 50,
        exclude: Sequence[Sequence[str]] | None = None,
        scoring: SampleScoring | None = None,
    ) -> SearchResult:
        """Top-``k`` by inner product for each query in one batch request; ``exclude[q]`` ids filtered out.

        Multi-sample queries ``[Q, N, d]`` are refused: their exact rescoring needs the vectors at hand."""
        from qdrant_client import models

        if queries.ndim == 3:
            raise ConfigError(
                f"Qdrant index {self.location}: multi-sample scoring (sample_reduction "
                f"{scoring.reduction if scoring else None!r}) rescores candidates against the gallery vectors, which "
                "this index keeps remotely; use sample_reduction='mean', or a FAISS folder index (fusion-diff index build)."
            )
        k = check_top_k(k)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DataError(f"Queries of shape {tuple(queries.shape)} do not match the {self.dim}-d collection.")
        require_finite(queries, "Search queries", NAN_QUERIES)
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude needs one list per query: {len(exclude)} lists for {len(queries)} queries.")
        requests = [
            models.QueryRequest(
                query=vector,
                limit=k,
                with_payload=True,
                filter=models.Filter(must_not=[models.FieldCondition(key="id", match=models.MatchAny(any=list(ids)))])
                if exclude is not None and len(exclude[n])
                else None,
            )
            for n, (vector, ids) in enumerate(
                zip(queries.detach().cpu().float().tolist(), exclude or [[]] * len(queries))
            )
        ]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        width = min(k, len(self))
        scores = torch.full((len(queries), width), float("-inf"))
        indices = torch.full((len(queries), width), -1, dtype=torch.long)
        items = []
        for n, response in enumerate(responses):  # unpacking the client's reply objects; no per-vector work
            points = response.points[:width]
            if points:
                scores[n, : len(points)] = torch.tensor([p.score for p in points])
                indices[n, : len(points)] = torch.tensor([int(p.id) for p in points])
            items.append([dict(p.payload) for p in points])
        return SearchResult(scores=scores, indices=indices, ids=[[i["id"] for i in row] for row in items], items=items)
