"""``fusion-diff search``: top-K of a gallery cache for cached query embeddings or free-text queries."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fusion_diff.cli.arguments import non_negative_int, positive_int
from fusion_diff.cli.embed import add_embedder_args, embedder_from_args
from fusion_diff.errors import CacheMismatchError, ConfigError
from fusion_diff.utils.io import atomic_path

logger = logging.getLogger(__name__)


def check_same_space(gallery: dict, queries: dict, where: str) -> None:
    """Refuse queries from another embedder than the gallery's, naming what differs."""
    from fusion_diff.embedding.base import EmbedderIdentity

    diffs = [
        f"{key}: gallery {gallery.get(key)!r}, queries {queries.get(key)!r}"
        for key in EmbedderIdentity.space_differences(gallery, queries)
    ]
    if diffs:
        raise CacheMismatchError(
            f"Queries and gallery {where} come from different embedders ({'; '.join(diffs)}). Embed both with one model."
        )


def run(args: argparse.Namespace) -> int:
    from fusion_diff.embedding import EmbeddingCache
    from fusion_diff.retrieval import build_index

    gallery = EmbeddingCache.read(args.gallery)
    gallery_ids, gallery_embeds = gallery.load()
    if args.queries:
        query_cache = EmbeddingCache.read(args.queries)
        check_same_space(gallery.identity, query_cache.identity, args.gallery)
        query_ids, queries = query_cache.load(args.query_ids or None)
    else:
        if not args.model:
            raise ConfigError("search --text needs the gallery's embedder: pass --model (and --pretrained).")
        embedder = embedder_from_args(args)
        check_same_space(gallery.identity, embedder.identity.as_dict(), args.gallery)
        query_ids, queries = list(args.text), embedder.embed_texts(args.text)
    kwargs = {"factory": args.faiss_factory} if args.index == "faiss" else {}
    index = build_index(gallery_embeds, gallery_ids, backend=args.index, **kwargs)
    exclude = [[item] for item in query_ids] if args.exclude_self else None
    k = min(args.k, len(gallery_ids))
    if k < args.k:
        logger.warning(
            "The gallery %s has %d items, fewer than --k %d: each query gets all of them.", args.gallery, k, args.k
        )
    result = index.search(queries, k=k, exclude=exclude)
    rows = [
        {"query": query, "ids": ids, "scores": [round(s, 6) for s in scores[: len(ids)]]}
        for query, ids, scores in zip(query_ids, result.ids, result.scores.tolist())
    ]
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"wrote top-{k} of {len(rows)} queries over {len(gallery_ids)} gallery items to {args.out}")
    for row in rows[: args.show]:
        top = ", ".join(f"{i} ({s:.3f})" for i, s in zip(row["ids"][:5], row["scores"][:5]))
        print(f"{row['query']}: {top}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="top-K gallery search for cached or free-text queries",
        description="Rank a gallery embedding cache by cosine similarity for each query. Queries come from another "
        "cache of the same embedder (--queries) or are free texts embedded on the fly (--text with the gallery's "
        "--model/--pretrained). Results: JSON lines {query, ids, scores} (--out) and a short listing.",
    )
    parser.add_argument("--gallery", type=Path, required=True, help="gallery embedding cache folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--queries", type=Path, default=None, help="query embedding cache folder")
    source.add_argument("--text", nargs="+", default=None, help="free-text queries (needs the embedder flags)")
    parser.add_argument("--query-ids", nargs="+", default=None, help="only these ids of the query cache")
    parser.add_argument(
        "--k", type=positive_int, default=50, help="results per query (>= 1; a smaller gallery gives all its items)"
    )
    parser.add_argument("--index", choices=("exact", "faiss"), default="exact", help="exact chunked matmul or FAISS")
    parser.add_argument(
        "--faiss-factory", default="Flat", help="FAISS index-factory string, e.g. Flat, IVF1024,Flat, HNSW32"
    )
    parser.add_argument("--exclude-self", action="store_true", help="drop each query's own id from its ranking")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON lines here")
    parser.add_argument("--show", type=non_negative_int, default=5, help="print the top results of this many queries")
    add_embedder_args(parser, required=False)  # the embedder is only needed for --text queries
    parser.set_defaults(func=run)
