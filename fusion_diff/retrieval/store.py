"""Persisted gallery indexes: a folder that is opened memory-mapped, searched, and grown atomically.

Layout of an index folder::

    manifest.json        what the vectors are (embedder identity, gallery mode, captioner identity), dim,
                         count, index type and FAISS settings, the live generation, the recall report
    gen-00003/
        embeddings.npy   float32 [N, dim], opened with numpy's memory map (paged in lazily)
        items.jsonl      one {"id", "path", "caption"} per row, in embedding order, with its columns
                         (row offsets, ids, id order: memory-mapped, see ``retrieval/items.py``)
        faiss.index      approximate types only: ``faiss.write_index``, read back with ``IO_FLAG_MMAP``
    staging/             build scratch (resumable embedding and caption caches); removed on commit

Why generations: a build or an ``add`` writes a complete new ``gen-*`` folder and only then replaces
``manifest.json`` (one atomic rename), so a killed job leaves the previous index fully usable, and
leftovers of unfinished generations are removed by the next write. Exact search runs on the memory
map itself (no second copy of the vectors); approximate types rescore their candidates against it
when their own scores are approximate (IVF-PQ, HNSW-SQ8).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_diff.errors import CacheMismatchError, ConfigError, DataError
from fusion_diff.retrieval.index import FaissGalleryIndex, GalleryIndex, SearchResult, _Index, regroup
from fusion_diff.retrieval.items import ItemTable
from fusion_diff.retrieval.method import SampleScoring
from fusion_diff.utils.checks import require_finite
from fusion_diff.utils.io import artifact_manifest, atomic_path, read_json, write_json_atomic

INDEX_KIND = "gallery_index"
MANIFEST = "manifest.json"
STAGING = "staging"
EMBEDDINGS, FAISS_FILE = "embeddings.npy", "faiss.index"
INDEX_TYPES = ("exact", "ivf-flat", "ivf-pq", "hnsw", "hnsw-sq8")
HNSW_TYPES = ("hnsw", "hnsw-sq8")
RESCORED_TYPES = ("ivf-pq", "hnsw-sq8")  # their own scores are approximate: candidates are rescored exactly
EXACT_UP_TO = 200_000  # ``auto``: exact search below this many items (1k queries stay near 1 s on 2 cores)
HNSW_UP_TO = 5_000_000  # ``auto``: HNSW-SQ8 up to here; beyond, IVF-PQ (HNSW keeps a graph per item)
# efSearch by type. At 1M clustered 768-d vectors and between-cluster queries, recall@50 of HNSW32 was 0.73 at
# 256 (FAISS's rule of thumb, from ~5k items), 0.96 at 384, 0.98 at 512; HNSW32,SQ8 with its top 64 rescored
# exactly: 0.945 at 352, 0.961 at 384, 0.972 at 416, in 0.9-1.0 s per 1,000 queries on 2 cores (README,
# "Persisted gallery indexes").
DEFAULT_EF_SEARCH = {"hnsw": 512, "hnsw-sq8": 416}
# Candidates rescored exactly, as a multiple of k (at least 64): PQ codes misorder far down the list; SQ8's
# 8-bit codes only near the cut (at 1M, rescoring 64 candidates gained as much recall as rescoring 204).
DEFAULT_RERANK = {"ivf-pq": 4, "hnsw-sq8": 1}
RECALL_QUERIES = 1000  # held-out queries of the recall report
NAN_GALLERY = "Re-embed those items: a NaN/inf vector would score NaN against every query. Nothing was written."


@dataclass
class IndexSettings:
    """How the FAISS index is built and searched; ``None`` fields follow the gallery size.

    Defaults follow the FAISS guidelines: ``nlist`` ≈ 4·sqrt(N) (a power of two), ``nprobe`` = nlist/64
    (at least 16), PQ with ``dim/16`` 8-bit sub-quantizers (trained on at least 39·256 vectors), HNSW with
    M=32 and efSearch 512; ``hnsw-sq8`` is the same graph over 8-bit scalar-quantised vectors (a quarter of
    the bytes per distance; efSearch 416). The quantized types' candidates (``rerank`` × k of them, at least
    64; ``DEFAULT_RERANK``) are rescored exactly against the memory-mapped vectors, so every returned score
    is exact.
    """

    type: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None  # 8, or 4 when fewer than 39·256 vectors could train 8-bit codebooks
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int | None = None  # None: DEFAULT_EF_SEARCH of the type
    rerank: int | None = None  # None: DEFAULT_RERANK of the type
    train_size: int | None = None  # training vectors: 39 per list (FAISS's minimum), at least 39·256 for PQ

    def resolved(self, count: int, dim: int) -> IndexSettings:
        """A copy with ``type`` and every size-dependent field decided for ``count`` vectors of ``dim``."""
        if self.type not in ("auto", *INDEX_TYPES):
            raise ConfigError(f"Unknown index type {self.type!r}; choose auto or one of {list(INDEX_TYPES)}.")
        kind = self.type
        if kind == "auto":
            kind = "exact" if count <= EXACT_UP_TO else "hnsw-sq8" if count <= HNSW_UP_TO else "ivf-pq"
        nlist = self.nlist or max(1, min(2 ** round(math.log2(max(4 * math.sqrt(count), 1))), count // 39 or 1))
        pq_m = self.pq_m or max(1, dim // 16)
        if kind == "ivf-pq" and dim % pq_m:
            raise ConfigError(f"pq_m={pq_m} must divide the embedding size {dim}.")
        return IndexSettings(
            type=kind,
            nlist=nlist,
            nprobe=min(nlist, self.nprobe or max(16, nlist // 64)),
            pq_m=pq_m,
            pq_bits=self.pq_bits or (8 if count >= 39 * 256 else 4),
            hnsw_m=self.hnsw_m,
            ef_construction=self.ef_construction,
            ef_search=self.ef_search or DEFAULT_EF_SEARCH.get(kind),
            rerank=self.rerank or DEFAULT_RERANK.get(kind),
            train_size=self.train_size or min(count, max(39 * nlist, 39 * 256)),
        )

    def factory(self) -> str | None:
        """The FAISS index-factory string (None for exact search on the memory map)."""
        return {
            "exact": None,
            "ivf-flat": f"IVF{self.nlist},Flat",
            "ivf-pq": f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_bits}",
            "hnsw": f"HNSW{self.hnsw_m},Flat",
            "hnsw-sq8": f"HNSW{self.hnsw_m},SQ8",
        }[self.type]

    def search_parameters(self) -> str | None:
        if self.type in ("ivf-flat", "ivf-pq"):
            return f"nprobe={self.nprobe}"
        return f"efSearch={self.ef_search}" if self.type in HNSW_TYPES else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown index setting(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)


def _faiss():
    try:
        import faiss
    except ImportError as err:  # a required dependency; only a broken install lacks it
        raise ConfigError("Persisted indexes need faiss: pip install faiss-cpu.") from err
    return faiss


def space_differences(stored: dict[str, Any], requested: dict[str, Any]) -> str:
    """``key: index has X, requested Y`` for every differing key (nested keys dotted: ``embedder.model``)."""

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(value, dict) or not value:
            return {prefix: value}
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}

    a = {k.rstrip("."): v for k, v in flat(json.loads(json.dumps(stored))).items()}
    b = {k.rstrip("."): v for k, v in flat(json.loads(json.dumps(requested))).items()}
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return "; ".join(f"{k}: index has {a.get(k)!r}, requested {b.get(k)!r}" for k in keys)


class _PrebuiltFaiss(FaissGalleryIndex):
    """A FAISS index read from disk, behind the common interface (exclusion, ``scores_for``)."""

    def __init__(self, index: Any, embeddings: torch.Tensor, ids: Sequence[str], rerank: int = 0) -> None:
        _Index.__init__(self, embeddings, ids)
        self.index = index
        self.rerank = rerank  # 0: FAISS's scores are exact; n: rescore max(n·k, 64) candidates exactly

    def _topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.rerank:
            return super()._topk(queries, k)
        _, candidates = super()._topk(queries, min(max(k * self.rerank, 64), len(self)))
        scores = self._score_rows(queries, candidates)
        scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
        return scores, candidates.gather(1, order)


class PersistentIndex:
    """A gallery index folder opened for search: memory-mapped vectors, ids, per-item metadata, FAISS.

    ``search`` has the in-memory indexes' interface (``SearchResult``; per-query exclusion).
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.identity: dict[str, Any] = manifest["identity"]
        self.settings = IndexSettings.from_dict(manifest["settings"])
        generation = root / manifest["generation"]
        self.items = ItemTable.open(generation)  # decoded per hit: a 1M gallery's metadata is never in RAM
        self.ids = self.items.ids
        array = np.load(generation / EMBEDDINGS, mmap_mode="c")  # copy-on-write map: writes never reach the file
        embeddings = torch.from_numpy(array)
        if embeddings.shape != (len(self.ids), manifest["dim"]):
            raise DataError(
                f"Index {root}: {generation.name}/{EMBEDDINGS} is {tuple(embeddings.shape)} but the manifest says "
                f"{len(self.ids)} x {manifest['dim']}. Rebuild it (fusion-diff index build)."
            )
        if self.settings.type == "exact":
            self.backend: _Index = GalleryIndex(embeddings, self.ids)
        else:
            faiss = _faiss()
            # IVF inverted lists map with IO_FLAG_MMAP; HNSW's vector storage (flat or SQ8 codes) with IO_FLAG_MMAP_IFC
            flag = faiss.IO_FLAG_MMAP_IFC if self.settings.type in HNSW_TYPES else faiss.IO_FLAG_MMAP
            index = faiss.read_index(str(generation / FAISS_FILE), flag)
            if index.ntotal != len(self.ids):
                raise DataError(
                    f"Index {root}: {FAISS_FILE} holds {index.ntotal} vectors for {len(self.ids)} items. Rebuild it."
                )
            self.backend = _PrebuiltFaiss(index, embeddings, self.ids)
            self.tune()

    def tune(self, ef_search: int | None = None, nprobe: int | None = None, rerank: int | None = None) -> PersistentIndex:
        """Change how this open index searches (the folder is not touched): HNSW ``ef_search``, IVF ``nprobe``,
        ``rerank`` of the quantized types. Trade recall for speed at query time, without a rebuild."""
        kind = self.settings.type
        applies = {"ef_search": HNSW_TYPES, "nprobe": ("ivf-flat", "ivf-pq"), "rerank": RESCORED_TYPES}
        for name, value in (("ef_search", ef_search), ("nprobe", nprobe), ("rerank", rerank)):
            if value is None:
                continue
            if kind not in applies[name]:  # refused, not silently ignored
                raise ConfigError(f"Index {self.root} is {kind}: {name} applies to {list(applies[name])} only.")
            if value < 1:
                raise ConfigError(f"Index {self.root}: {name} must be at least 1, got {value}.")
            setattr(self.settings, name, value)
        if kind != "exact":
            params = self.settings.search_parameters()
            if params:
                _faiss().ParameterSpace().set_index_parameters(self.backend.index, params)
            self.backend.rerank = self.settings.rerank if kind in RESCORED_TYPES else 0
        return self

    # ------------------------------------------------------------------ opening
    @classmethod
    def load(cls, root: str | os.PathLike, identity: dict[str, Any] | None = None) -> PersistentIndex:
        """Open the index at ``root``; with ``identity``, one made for anything else is refused, naming both."""
        root = Path(root)
        manifest = read_json(root / MANIFEST, "gallery index manifest")
        if manifest.get("kind") != INDEX_KIND:
            raise DataError(
                f"{root / MANIFEST} is not a gallery index manifest (kind={manifest.get('kind')!r}). "
                "Point to a folder made by fusion-diff index build."
            )
        if identity is not None and json.loads(json.dumps(identity)) != manifest["identity"]:
            raise CacheMismatchError(
                f"Gallery index {root} was built for another embedding space ({space_differences(manifest['identity'], identity)}). "
                "Rebuild the index with this embedder (fusion-diff index build), or load the retriever it was made for."
            )
        return cls(root, manifest)

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        return (Path(root) / MANIFEST).is_file()

    # ------------------------------------------------------------------ interface
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def embeddings(self) -> torch.Tensor:
        return self.backend.embeddings

    @property
    def position(self) -> dict[str, int]:
        return self.backend.position

    def search(
        self,
        queries: torch.Tensor,
        k: int = 50,
        exclude: Sequence[Sequence[str]] | None = None,
        scoring: SampleScoring | None = None,
    ) -> SearchResult:
        """Top-``k`` per query (``[Q, N, d]`` multi-sample queries with ``scoring``: see ``fusion_diff.retrieval.index``)."""
        found = self.backend.search(queries, k=k, exclude=exclude, scoring=scoring)
        valid = found.indices >= 0
        hits = self.items.rows(found.indices[valid].tolist())  # every hit's metadata in one read
        found.items = regroup(hits, valid.sum(1).tolist())
        return found

    def scores_for(
        self,
        queries: torch.Tensor,
        candidate_ids: Sequence[Sequence[str]],
        scoring: SampleScoring | None = None,
    ) -> torch.Tensor:
        return self.backend.scores_for(queries, candidate_ids, scoring)

    def describe(self) -> dict[str, Any]:
        """The manifest's summary (``fusion-diff index info``) plus the size on disk."""
        generation = self.root / self.manifest["generation"]
        size = sum(p.stat().st_size for p in generation.iterdir())
        keys = ("identity", "dim", "count", "settings", "factory", "generation", "recall", "created")
        return {**{k: self.manifest.get(k) for k in keys}, "root": str(self.root), "bytes_on_disk": size}

    # ------------------------------------------------------------------ writing
    @classmethod
    def write(
        cls,
        root: str | os.PathLike,
        identity: dict[str, Any],
        embeddings: torch.Tensor,
        items: Sequence[dict[str, Any]],
        settings: IndexSettings | None = None,
        calibration: torch.Tensor | None = None,
        calibration_protocol: str | None = None,
    ) -> PersistentIndex:
        """Write a new generation holding ``embeddings`` (rows aligned with ``items``) and commit it.

        ``calibration`` are held-out query embeddings for the recall report of an approximate type
        (composed queries from the retriever); without them, pseudo-queries are made from the gallery
        (see ``pseudo_queries``) and the report says so.
        """
        root = Path(root)
        ids = [item["id"] for item in items]
        if len(set(ids)) != len(ids):
            raise DataError(f"Index {root}: gallery ids must be unique; {len(ids) - len(set(ids))} are repeated.")
        embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
        if embeddings.ndim != 2 or embeddings.shape[0] != len(items):
            raise DataError(f"Index {root}: {tuple(embeddings.shape)} embeddings for {len(items)} items.")
        if not len(items):
            raise DataError(f"Index {root}: nothing to index (no gallery items).")
        require_finite(embeddings, f"Index {root}: gallery embeddings", NAN_GALLERY)
        resolved = (settings or IndexSettings()).resolved(len(items), embeddings.shape[1])
        generation = _new_generation(root)
        _write_vectors(generation, embeddings, items)
        recall = None
        if resolved.type != "exact":
            faiss = _faiss()
            data = embeddings.numpy()
            index = faiss.index_factory(data.shape[1], resolved.factory(), faiss.METRIC_INNER_PRODUCT)
            if resolved.type in HNSW_TYPES:
                index.hnsw.efConstruction = resolved.ef_construction
            if not index.is_trained:
                sample = np.random.default_rng(0).permutation(len(data))[: resolved.train_size]
                index.train(data[np.sort(sample)])
            index.add(data)
            faiss.write_index(index, str(generation / FAISS_FILE))
        manifest = cls._manifest(root, identity, embeddings.shape[1], len(items), resolved, generation)
        candidate = cls(root, manifest)
        if resolved.type != "exact":
            if calibration is None:
                queries, protocol = (
                    pseudo_queries(embeddings),
                    "pseudo-queries: normalize(g_a + g_b) of random gallery pairs",
                )
            else:
                queries, protocol = calibration, calibration_protocol or "held-out query embeddings given to the build"
            recall = recall_report(candidate, queries, protocol)
            candidate.manifest["recall"] = manifest["recall"] = recall
        _commit(root, manifest)
        return candidate

    def add(self, embeddings: torch.Tensor, items: Sequence[dict[str, Any]]) -> PersistentIndex:
        """A new generation with ``items`` appended (FAISS types add to a copy of the trained index)."""
        new_ids = [item["id"] for item in items]
        present = [i for i in new_ids if i in self.position]
        if present or len(set(new_ids)) != len(new_ids):
            raise DataError(
                f"Index {self.root}: refusing ids already indexed or repeated (e.g. {present[:3] or new_ids[:3]}). "
                "Give new images new ids."
            )
        embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
        if embeddings.ndim != 2 or embeddings.shape != (len(items), self.dim):
            raise DataError(
                f"Index {self.root}: {tuple(embeddings.shape)} embeddings for {len(items)} new {self.dim}-d items."
            )
        require_finite(embeddings, f"Index {self.root}: new gallery embeddings", NAN_GALLERY)
        old = self.root / self.manifest["generation"]
        generation = _new_generation(self.root)
        _write_vectors(generation, torch.cat([self.embeddings, embeddings]), items, previous=self.items)
        if self.settings.type != "exact":
            faiss = _faiss()
            index = faiss.read_index(str(old / FAISS_FILE))  # a private in-memory copy to grow
            index.add(embeddings.numpy())
            faiss.write_index(index, str(generation / FAISS_FILE))
        manifest = {**self.manifest, "count": len(self) + len(items), "generation": generation.name}
        _commit(self.root, manifest)
        return PersistentIndex(self.root, manifest)

    @staticmethod
    def _manifest(
        root: Path, identity: dict[str, Any], dim: int, count: int, settings: IndexSettings, generation: Path
    ) -> dict[str, Any]:
        return artifact_manifest(
            INDEX_KIND,
            identity=json.loads(json.dumps(identity)),
            dim=dim,
            count=count,
            dtype="float32",
            settings=asdict(settings),
            factory=settings.factory(),
            generation=generation.name,
            recall=None,
        )


def pseudo_queries(embeddings: torch.Tensor, count: int = RECALL_QUERIES, seed: int = 0) -> torch.Tensor:
    """Stand-ins for composed queries when none are given: ``normalize(g_a + g_b)`` for random pairs.

    They lie between gallery items, not on them, which is where composed queries fall; they are still
    not real queries (the recall report names which kind it used).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(embeddings), (2, min(count, len(embeddings))), generator=gen)
    return torch.nn.functional.normalize(embeddings[rows[0]] + embeddings[rows[1]], dim=-1)


def recall_report(index: PersistentIndex, queries: torch.Tensor, protocol: str) -> dict[str, Any]:
    """recall@10/50 of ``index`` against exact search on the same vectors (the share of exact top-k found)."""
    k = min(50, len(index))
    exact = GalleryIndex(index.embeddings, index.ids).search(queries, k=k).indices
    approx = index.search(queries, k=k).indices
    report: dict[str, Any] = {"queries": len(queries), "protocol": protocol}
    for cut in (10, 50):
        cut = min(cut, k)
        found = (approx[:, :cut].unsqueeze(-1) == exact[:, :cut].unsqueeze(1)).any(1).float()
        report[f"recall@{cut}"] = round(float(found.mean()), 4)
    return report


def _new_generation(root: Path) -> Path:
    """A fresh ``gen-*`` folder; unfinished generations of killed jobs (not in the manifest) are removed."""
    root.mkdir(parents=True, exist_ok=True)
    live = read_json(root / MANIFEST).get("generation") if (root / MANIFEST).is_file() else None
    numbers = [int(p.name[4:]) for p in root.glob("gen-*") if p.name[4:].isdigit()]
    for path in root.glob("gen-*"):
        if path.name != live:
            shutil.rmtree(path)
    generation = root / f"gen-{max(numbers, default=0) + 1:05d}"
    generation.mkdir()
    return generation


def _write_vectors(
    generation: Path, embeddings: torch.Tensor, items: Sequence[dict[str, Any]], previous: ItemTable | None = None
) -> None:
    with atomic_path(generation / EMBEDDINGS) as tmp, open(tmp, "wb") as handle:
        np.save(handle, embeddings.numpy())
    ItemTable.write(generation, items, previous)


def _commit(root: Path, manifest: dict[str, Any]) -> None:
    """Point the manifest at the new generation (the one atomic step), then drop the old one and staging."""
    previous = read_json(root / MANIFEST).get("generation") if (root / MANIFEST).is_file() else None
    write_json_atomic(root / MANIFEST, manifest)
    if previous and previous != manifest["generation"]:
        shutil.rmtree(root / previous, ignore_errors=True)
    shutil.rmtree(root / STAGING, ignore_errors=True)
