"""``ComposedRetriever``: reference image + modification text in, ranked gallery hits out, in one call.

It holds the parts a composed query needs (joint embedder, optional captioner, one retrieval method
of the registry, a gallery index) and persists them as a folder that names each part and its
identity, so that a retriever loaded later refuses an index made in another embedding space.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusion_diff.captioning.base import Captioner, identity_digest
from fusion_diff.captioning.cache import CaptionCache, caption_with_cache
from fusion_diff.captioning.modes import fuse_with_captions, require_captioner
from fusion_diff.captioning.retrieval import RetrievalCaptioner
from fusion_diff.embedding.base import ImageInput, JointEmbedder
from fusion_diff.embedding.cache import CACHE_KIND, EmbeddingCache, embed_with_cache
from fusion_diff.errors import CacheMismatchError, ConfigError, DataError
from fusion_diff.retrieval.index import SearchResult
from fusion_diff.retrieval.method import QueryContext, RetrievalMethod, run_method, sample_scoring
from fusion_diff.retrieval.rerank import index_embeddings, rerank_depth, rerank_hits
from fusion_diff.retrieval.sources import TAR_MEMBER, GalleryItems, gallery_items
from fusion_diff.retrieval.store import STAGING, IndexSettings, PersistentIndex, space_differences
from fusion_diff.utils.checks import check_top_k
from fusion_diff.utils.io import artifact_manifest, read_json, write_json_atomic
from fusion_diff.utils.paths import cache_dir

RETRIEVER_FILE = "retriever.json"
RETRIEVER_KIND = "composed_retriever"
INDEX_FOLDER = "index"  # where save_pretrained expects (and index build puts) the gallery index
QUERY_BLOCK = 256  # queries embedded and searched per block: bounds the images held in memory


@dataclass(frozen=True)
class Hit:
    """A gallery item: its id, where its image is, its score (cosine) when a search ranked it, and its caption
    in a fused gallery (None in an image gallery). Search results and the page's gallery strip share it."""

    id: str
    path: str | None
    score: float | None = None
    caption: str | None = None

    @classmethod
    def from_item(cls, item: dict[str, Any], score: float | None = None) -> Hit:
        """From an index row's metadata (``{"id", "path", "caption"}``; only ``id`` is required)."""
        return cls(item["id"], item.get("path"), score, item.get("caption"))


def gallery_identity(embedder: JointEmbedder, mode: str, captioner: Captioner | None) -> dict[str, Any]:
    """What the vectors of a gallery index are: the embedding space, the gallery mode, the captioner if fused."""
    return {
        "embedder": embedder.identity.as_dict(),
        "mode": mode,
        "captioner": captioner.identity if mode == "fused" and captioner is not None else None,
    }


def _spec_or_object(value: Any, build) -> tuple[Any, dict[str, Any] | None]:
    return (build(value), dict(value)) if isinstance(value, dict) else (value, None)


class ComposedRetriever:
    """Composed image retrieval over a gallery index.

    Build it from parts (objects, or spec dicts that ``save_pretrained`` can record), index a gallery,
    search::

        retriever = ComposedRetriever({"backend": "openclip", "model_name": "ViT-L-14", "pretrained": ckpt},
                                      method="fusion-diff", method_options={"pipeline": "runs/stage2/pipeline"},
                                      captioner={"type": "retrieval", "bank": "captions.txt"})
        retriever.index_gallery("catalogue/", "my-retriever/index")
        retriever.save_pretrained("my-retriever")
        hits = ComposedRetriever.from_pretrained("my-retriever").search([ref], ["this dress, but red"], k=10)

    ``search(reference_images, texts, k=10, exclude=None, method=None, **method_options)`` returns one list
    of ``Hit`` per query; ``method`` / ``method_options`` pick another registry method or settings for that
    call (the method's gallery mode must match the index's). ``index`` may be a ``PersistentIndex`` (FAISS
    folder), a ``QdrantIndex`` or an in-memory index of ``fusion_diff.retrieval.index``.
    """

    def __init__(
        self,
        embedder: JointEmbedder | dict[str, Any],
        method: str | RetrievalMethod = "image-only",
        index: Any = None,
        captioner: Captioner | dict[str, Any] | None = None,
        *,
        method_options: dict[str, Any] | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> None:
        from fusion_diff.captioning import create_captioner
        from fusion_diff.embedding.factory import create_embedder

        self.embedder, self.embedder_spec = _spec_or_object(embedder, create_embedder)
        self.captioner, self.captioner_spec = _spec_or_object(captioner, lambda s: create_captioner(s, self.embedder))
        self.method_name = method if isinstance(method, str) else None
        self.method_options = dict(method_options or {})
        self.method = self._create_method(method, self.method_options) if isinstance(method, str) else method
        if method_options and not isinstance(method, str):
            raise ConfigError("method_options go with a method name; a method object carries its own settings.")
        require_captioner(self.method.gallery_mode, self.captioner)
        self.batch_size = batch_size
        self.progress = progress
        self._variants: dict[str, RetrievalMethod] = {}
        self.index = None
        if index is not None:
            self.attach(index)

    # ------------------------------------------------------------------ parts
    def _create_method(self, name: str, options: dict[str, Any]) -> RetrievalMethod:
        """A registry method; a sampling method's prior is checked against this retriever's embedder."""
        from fusion_diff.baselines import create_method

        return create_method(name, embedder=self.embedder, **options)

    @property
    def gallery_mode(self) -> str:
        return self.method.gallery_mode

    def index_identity(self) -> dict[str, Any]:
        return gallery_identity(self.embedder, self.gallery_mode, self.captioner)

    def attach(self, index: Any) -> None:
        """Use ``index`` for search; one made for another embedding space, mode or captioner is refused."""
        stored = getattr(index, "identity", None)
        if stored is not None and json.loads(json.dumps(stored)) != json.loads(json.dumps(self.index_identity())):
            where = getattr(index, "root", None) or getattr(index, "location", "")
            raise CacheMismatchError(
                f"Gallery index {where} does not fit this retriever ({space_differences(stored, self.index_identity())}). "
                "Rebuild the index with this retriever (fusion-diff index build) or load the retriever it was made for."
            )
        if index.dim != self.embedder.dim:
            raise CacheMismatchError(
                f"The gallery index is {index.dim}-d but the embedder gives {self.embedder.dim}-d."
            )
        self.index = index

    def method_for(self, method: str | None = None, **options: Any) -> RetrievalMethod:
        """The retriever's method, or registry method ``method`` / other ``options`` (built once, then reused)."""
        if method is None and not options:
            return self.method
        name = method or self.method_name
        if name is None:
            raise ConfigError("This retriever was given a method object; pass method=<registry name> to change it.")
        if name == self.method_name:
            options = {**self.method_options, **options}
        key = json.dumps([name, options], sort_keys=True, default=str)
        if key not in self._variants:
            self._variants[key] = self._create_method(name, options)
        chosen = self._variants[key]
        if chosen.gallery_mode != self.gallery_mode:
            raise ConfigError(
                f"Method {name!r} matches a {chosen.gallery_mode} gallery but this retriever's index holds a "
                f"{self.gallery_mode} gallery; pass gallery_mode={self.gallery_mode!r} or build another index."
            )
        return chosen

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``retriever.json`` naming each part (how to rebuild it, and its identity) and the index location.

        Parts given as objects are recorded by identity only; ``from_pretrained`` then needs them passed in.
        The index is referenced, not copied: by a path relative to the folder when it lies inside it.
        """
        root = Path(save_directory)
        if self.method_name is None:
            raise ConfigError(
                "Only a retriever built with a registry method name can be saved (method='fusion-diff', ...)."
            )
        try:
            options = json.loads(json.dumps(self.method_options, default=_path_only))
        except TypeError as err:
            raise ConfigError(
                f"Method option values must be JSON or paths to be saved ({err}); pass e.g. pipeline as a folder path."
            ) from err
        config = artifact_manifest(
            RETRIEVER_KIND,
            embedder={"spec": self.embedder_spec, "identity": self.embedder.identity.as_dict()},
            captioner=None
            if self.captioner is None
            else {"spec": self.captioner_spec, "identity": self.captioner.identity},
            method={"name": self.method_name, "options": options, "gallery_mode": self.gallery_mode},
            index=self._index_reference(root),
            batch_size=self.batch_size,
        )
        write_json_atomic(root / RETRIEVER_FILE, config)

    def _index_reference(self, root: Path) -> dict[str, Any] | None:
        if self.index is None:
            return None
        if isinstance(self.index, PersistentIndex):
            where = self.index.root.resolve()
            inside = where.is_relative_to(root.resolve())
            return {"backend": "faiss", "path": str(where.relative_to(root.resolve()) if inside else where)}
        reference = getattr(self.index, "reference", None)
        if reference is None:
            raise ConfigError("An in-memory index cannot be saved; build a persisted one with index_gallery(...).")
        return reference()

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        embedder: JointEmbedder | None = None,
        captioner: Captioner | None = None,
        progress: bool = False,
    ) -> ComposedRetriever:
        """Load a saved retriever; parts passed in replace the recorded ones but must have the recorded identity."""
        root = Path(directory)
        config = read_json(root / RETRIEVER_FILE, "retriever config")
        if not isinstance(config, dict) or config.get("kind") != RETRIEVER_KIND:
            raise DataError(
                f"{root / RETRIEVER_FILE} is not a saved ComposedRetriever. Point to a save_pretrained folder."
            )
        embedder = _restore(config["embedder"], embedder, "embedder", root)
        if config["captioner"] is not None:
            captioner = _restore(config["captioner"], captioner, "captioner", root, embedder)
        method = config["method"]
        retriever = cls(
            embedder,
            method["name"],
            captioner=captioner,
            method_options=method["options"],
            batch_size=config.get("batch_size", 64),
            progress=progress,
        )
        if config["index"] is not None:
            retriever.attach(open_index(config["index"], root))
        return retriever

    # ------------------------------------------------------------------ indexing
    def index_gallery(
        self,
        source: Any,
        root: str | os.PathLike,
        *,
        ids: Sequence[str] | None = None,
        settings: IndexSettings | str | None = None,
        calibration_texts: Sequence[str] | None = None,
    ) -> PersistentIndex:
        """Embed (and, for a fused gallery, caption) ``source`` into a new index folder ``root`` and use it.

        ``source``: an image folder, a list of image paths, webdataset-style ``.tar`` shards
        (``"shards-{0000..0099}.tar"``), or an ``EmbeddingCache`` (folder) of this embedder. Work is kept in
        ``root/staging`` until the index is committed, so an interrupted build resumes where it stopped
        and the previous index in ``root`` stays usable. ``calibration_texts`` (modification texts) make
        the recall report of an approximate index use real composed queries of this method.
        """
        settings = IndexSettings(type=settings) if isinstance(settings, str) else settings
        if _is_embedding_cache(source):
            embeds, items = self._cache_items(source)
        else:
            gallery = gallery_items(source, ids)
            embeds, captions = self._embed(gallery, Path(root) / STAGING)
            items = _items(gallery, captions)
        calibration, protocol = self._calibration(embeds, items, calibration_texts)
        index = PersistentIndex.write(root, self.index_identity(), embeds, items, settings, calibration, protocol)
        self.attach(index)
        return index

    def add(self, source: Any, ids: Sequence[str] | None = None) -> None:
        """Embed new images into the attached index (a new generation, committed atomically)."""
        if self.index is None or not hasattr(self.index, "add"):
            raise ConfigError("add() needs a persisted index: call index_gallery(...) or load one first.")
        gallery = gallery_items(source, ids)
        if isinstance(self.index, PersistentIndex):
            staging = self.index.root / STAGING  # removed when the new generation is committed
        else:  # a Qdrant collection: resumable work kept in the user cache until the upload is done
            staging = cache_dir("index-staging") / identity_digest(self.index.reference())
        embeds, captions = self._embed(gallery, staging)
        self.attach(self.index.add(embeds, _items(gallery, captions)))
        shutil.rmtree(staging, ignore_errors=True)

    def _embed(self, gallery: GalleryItems, staging: Path) -> tuple[torch.Tensor, list[str] | None]:
        """Gallery embeddings in the method's mode (resumable caches under ``staging``) and the captions used."""
        identity = self.embedder.identity.as_dict()
        image_cache = EmbeddingCache.open(staging / "image", {**identity, "kind": "image"})
        image = embed_with_cache(
            image_cache,
            gallery.ids,
            gallery.images,
            lambda images: self.embedder.embed_images(images, batch_size=self.batch_size),
            batch_size=4 * self.batch_size,  # one cache shard per 4 batches: what a killed build can lose
            progress=self.progress,
        )
        if self.gallery_mode == "image":
            return image, None
        captioner = self.captioner
        assert captioner is not None
        cache = CaptionCache.open(staging / "captions.json", captioner.identity)
        same_backbone = (
            isinstance(captioner, RetrievalCaptioner) and captioner.embedder.identity == self.embedder.identity
        )
        caption_with_cache(
            captioner,
            gallery.ids,
            gallery.images,
            cache,
            batch_size=self.batch_size,
            progress=self.progress,
            image_embeds=image if same_backbone else None,
        )
        candidates = dict(zip(gallery.ids, cache.candidates(gallery.ids)))
        row = {item: n for n, item in enumerate(gallery.ids)}
        fused_cache = EmbeddingCache.open(
            staging / "fused", {**identity, "kind": "fused", "captioner": captioner.identity}
        )

        def fuse(chunk: list[str]) -> torch.Tensor:
            rows = torch.tensor([row[i] for i in chunk], dtype=torch.long)
            late = self.embedder.supports_late_fusion
            images = None if late else [gallery.images[row[i]] for i in chunk]
            return fuse_with_captions(
                self.embedder, [candidates[i] for i in chunk], images, image[rows] if late else None, self.batch_size
            )

        fused = embed_with_cache(fused_cache, gallery.ids, gallery.ids, fuse, progress=self.progress)
        return fused, [candidates[i][0] for i in gallery.ids]

    def _cache_items(self, source: Any) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Embeddings and ids of an existing cache; it must hold this embedder's vectors in the gallery's mode."""
        cache = source if isinstance(source, EmbeddingCache) else EmbeddingCache.read(source)
        wanted = {**self.embedder.identity.as_dict(), "kind": self.gallery_mode}
        differs = {k: (cache.identity.get(k), v) for k, v in wanted.items() if cache.identity.get(k) != v}
        if self.gallery_mode == "fused" and cache.identity.get("captioner") != self.captioner.identity:
            differs["captioner"] = (cache.identity.get("captioner"), self.captioner.identity)
        if differs:
            raise CacheMismatchError(
                f"Embedding cache {cache.root} does not hold this retriever's gallery vectors ("
                + "; ".join(f"{k}: cache has {a!r}, retriever needs {b!r}" for k, (a, b) in differs.items())
                + "). Index images instead, or embed them with this embedder."
            )
        ids, embeds = cache.load()
        return embeds, [{"id": i, "path": None, "caption": None} for i in ids]

    def _calibration(
        self, embeds: torch.Tensor, items: list[dict[str, Any]], texts: Sequence[str] | None
    ) -> tuple[torch.Tensor | None, str | None]:
        """Held-out composed queries for the recall report: random gallery items as references, ``texts`` as
        modifications, through this retriever's method (None: the index falls back to pseudo-queries)."""
        paths = [item["path"] for item in items]
        if not texts or any(p is None or TAR_MEMBER in p for p in paths):
            return None, None
        gen = torch.Generator().manual_seed(0)
        rows = torch.randint(len(items), (min(len(texts), 1000),), generator=gen).tolist()
        context = self.query_context([Path(paths[r]) for r in rows], list(texts)[: len(rows)])
        queries = run_method(self.method, context).flatten(0, -2)  # multi-sample methods: every sample is a query
        return queries, f"composed queries of {self.method.name}: gallery references + given texts"

    # ------------------------------------------------------------------ search
    def query_context(self, reference_images: Sequence[ImageInput], texts: Sequence[str]) -> QueryContext:
        """Everything a method needs for these queries: f(I_ref), f(T_mod), and with a captioner the reference
        captions and f(I_ref, caption)."""
        references, texts = list(reference_images), list(texts)
        if len(references) != len(texts):
            raise DataError(f"{len(references)} reference images for {len(texts)} texts; give one text per image.")
        ref_embeds = self.embedder.embed_images(references, batch_size=self.batch_size)
        captions = fused = None
        if self.captioner is not None:
            same_backbone = (
                isinstance(self.captioner, RetrievalCaptioner)
                and self.captioner.embedder.identity == self.embedder.identity
            )
            candidates = (
                self.captioner.rank(ref_embeds)
                if same_backbone
                else self.captioner.caption_candidates(references, batch_size=self.batch_size)
            )
            fused = fuse_with_captions(self.embedder, candidates, references, ref_embeds, self.batch_size)
            captions = [c[0] for c in candidates]
        return QueryContext(
            embedder=self.embedder,
            query_ids=[str(n) for n in range(len(texts))],
            modification_texts=texts,
            modification_text_embeds=self.embedder.embed_texts(texts),
            reference_image_embeds=ref_embeds,
            reference_image_paths=references,
            reference_captions=captions,
            reference_fused_embeds=fused,
        )

    def search(
        self,
        reference_images: Sequence[ImageInput] | ImageInput,
        texts: Sequence[str] | str,
        k: int = 10,
        exclude: Sequence[Sequence[str]] | None = None,
        method: str | None = None,
        **method_options: Any,
    ) -> list[list[Hit]]:
        """Top-``k`` hits per query (``reference_images[i]`` modified by ``texts[i]``), ``exclude[i]`` ids removed.

        A single image and a single text also work (still one list of hits per query). Queries run in
        blocks of ``QUERY_BLOCK``: every method batches inside a block, the index searches a block at once.
        """
        if isinstance(texts, str):
            reference_images, texts = [reference_images], [texts]  # type: ignore[list-item]
        check_top_k(k)
        if self.index is None:
            raise ConfigError("This retriever has no gallery index: call index_gallery(...) or attach(index) first.")
        chosen = self.method_for(method, **method_options)
        references = list(reference_images)  # type: ignore[arg-type]
        if exclude is not None and len(exclude) != len(references):
            raise DataError(f"exclude needs one list per query: {len(exclude)} lists for {len(references)} queries.")
        hits: list[list[Hit]] = []
        for start in range(0, len(references), QUERY_BLOCK):
            stop = start + QUERY_BLOCK
            context = self.query_context(references[start:stop], list(texts)[start:stop])
            queries = run_method(chosen, context)
            depth = rerank_depth(chosen)  # a re-ranking method sees its first `depth` hits, whatever k is
            found = self.index.search(
                queries,
                k=max(k, depth),
                exclude=None if exclude is None else exclude[start:stop],
                scoring=sample_scoring(chosen),
            )
            if depth:
                found = rerank_hits(chosen, context, found, index_embeddings(self.index)).top(k)
            hits += self.hits(found)
        return hits

    def hits(self, found: SearchResult) -> list[list[Hit]]:
        """``Hit`` lists of a search result (metadata from the index when it has any)."""
        items = found.items or [[{"id": i} for i in ids] for ids in found.ids]
        return [
            [Hit.from_item(item, float(score)) for item, score in zip(row, scores)]
            for row, scores in zip(items, found.scores.tolist())
        ]


def open_index(reference: dict[str, Any], root: Path) -> Any:
    """The index a saved retriever names: a FAISS folder (path relative to the retriever folder) or Qdrant."""
    backend = reference.get("backend")
    if backend == "faiss":
        return PersistentIndex.load(root / reference["path"])
    if backend == "qdrant":
        from fusion_diff.retrieval.qdrant import QdrantIndex

        return QdrantIndex.open(**{k: v for k, v in reference.items() if k != "backend"})
    raise DataError(f"{root / RETRIEVER_FILE}: unknown index backend {backend!r}; expected 'faiss' or 'qdrant'.")


def _restore(record: dict[str, Any], given: Any, part: str, root: Path, embedder: JointEmbedder | None = None) -> Any:
    """A part of a saved retriever: ``given`` (checked against the recorded identity) or rebuilt from its spec."""
    if given is None:
        if record.get("spec") is None:
            raise ConfigError(
                f"{root / RETRIEVER_FILE} records the {part} by identity only ({record['identity']}); pass {part}=... "
                "to from_pretrained."
            )
        if part == "embedder":
            from fusion_diff.embedding.factory import create_embedder

            given = create_embedder(record["spec"])
        else:
            from fusion_diff.captioning import create_captioner

            given = create_captioner(record["spec"], embedder)
    identity = given.identity.as_dict() if part == "embedder" else given.identity
    if json.loads(json.dumps(identity)) != record["identity"]:
        raise CacheMismatchError(
            f"The {part} does not match the one {root} was saved with ({space_differences(record['identity'], identity)})."
        )
    return given


def _items(gallery: GalleryItems, captions: list[str] | None) -> list[dict[str, Any]]:
    return [
        {"id": i, "path": p, "caption": captions[n] if captions else None}
        for n, (i, p) in enumerate(zip(gallery.ids, gallery.paths))
    ]


def _is_embedding_cache(source: Any) -> bool:
    if isinstance(source, EmbeddingCache):
        return True
    if not isinstance(source, (str, os.PathLike)) or not (Path(source) / "manifest.json").is_file():
        return False
    return read_json(Path(source) / "manifest.json").get("kind") == CACHE_KIND


def _path_only(value: Any) -> str:
    if isinstance(value, (Path, os.PurePath)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
