"""``fusion-diff index build|add|info|upload`` and ``fusion-diff query``: a saved ``ComposedRetriever`` from the
command line.

``index build --out DIR`` writes a retriever folder (``DIR/retriever.json`` naming embedder, captioner,
method and index) with its gallery index in ``DIR/index``; ``query --index DIR`` loads it and ranks the
gallery for a reference image and a modification text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fusion_diff.cli.arguments import positive_int
from fusion_diff.cli.caption import add_captioner_args, captioner_spec
from fusion_diff.cli.embed import add_embedder_args, embedder_spec
from fusion_diff.cli.eval import route_options
from fusion_diff.errors import ConfigError

INDEX_TYPES = ("auto", "exact", "ivf-flat", "ivf-pq", "hnsw", "hnsw-sq8")  # store.INDEX_TYPES (not imported: --help stays fast)


def _retriever(args: argparse.Namespace):
    from fusion_diff.retrieval.retriever import ComposedRetriever

    return ComposedRetriever.from_pretrained(args.index, progress=not args.quiet)


def run_build(args: argparse.Namespace) -> int:
    from fusion_diff.retrieval.retriever import INDEX_FOLDER, ComposedRetriever
    from fusion_diff.retrieval.store import IndexSettings

    options = _method_options(args.method, args.set, args.gallery_mode, args.checkpoint)
    retriever = ComposedRetriever(
        embedder_spec(args),
        args.method,
        captioner=captioner_spec(args),
        method_options=options,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    settings = IndexSettings(
        type=args.type, nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search, rerank=args.rerank
    )
    texts = Path(args.calibration_texts).read_text(encoding="utf-8").splitlines() if args.calibration_texts else None
    index = retriever.index_gallery(args.images, args.out / INDEX_FOLDER, settings=settings, calibration_texts=texts)
    retriever.save_pretrained(args.out)
    _print_info(index.describe())
    print(f"saved the retriever in {args.out} (query it: fusion-diff query --index {args.out} --image ... --text ...)")
    return 0


def _method_options(
    method: str, pairs: list[str] | None, gallery_mode: str | None = None, checkpoint: str | None = None
):
    """``--set`` / ``--gallery-mode`` / ``--checkpoint`` as the options of ``method`` (read as ``fusion-diff eval`` does)."""
    flags = argparse.Namespace(method=[method], set=pairs, gallery_mode=gallery_mode, checkpoint=checkpoint)
    return route_options(flags)[method]


def run_add(args: argparse.Namespace) -> int:
    retriever = _retriever(args)
    before = len(retriever.index)
    retriever.add(args.images)
    print(f"added {len(retriever.index) - before} images to {args.index} ({len(retriever.index)} in all)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    retriever = _retriever(args)
    index = retriever.index
    info = index.describe() if hasattr(index, "describe") else {"location": index.location, **index.manifest}
    info["method"] = retriever.method_name
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    return 0


def _print_info(info: dict) -> None:
    settings = info.get("settings") or {}
    print(
        f"index: {info.get('count')} items x {info.get('dim')}-d, type {settings.get('type')} ({info.get('factory')})"
    )
    if "bytes_on_disk" in info:
        print(f"size on disk: {info['bytes_on_disk'] / 2**20:.1f} MiB in {info.get('root')}")
    recall = info.get("recall")
    if recall:
        print(
            f"recall vs exact search: R@10 {recall['recall@10']:.3f}, R@50 {recall['recall@50']:.3f} "
            f"({recall['queries']} held-out queries; {recall['protocol']})"
        )


def run_upload(args: argparse.Namespace) -> int:
    from fusion_diff.retrieval.qdrant import QdrantIndex
    from fusion_diff.retrieval.retriever import RETRIEVER_FILE
    from fusion_diff.retrieval.store import PersistentIndex
    from fusion_diff.utils.io import read_json, write_json_atomic

    retriever = _retriever(args)
    if not isinstance(retriever.index, PersistentIndex):
        raise ConfigError(f"{args.index} does not use a FAISS index folder; nothing to upload.")
    qdrant = QdrantIndex.upload(retriever.index, args.collection, url=args.url, path=args.path)
    config = read_json(args.index / RETRIEVER_FILE, "retriever config")
    config["index"] = qdrant.reference()
    write_json_atomic(args.index / RETRIEVER_FILE, config)
    print(
        f"uploaded {len(qdrant)} items to Qdrant collection {args.collection!r} at {args.url or args.path}; "
        f"{args.index} now searches there (the FAISS folder {retriever.index.root} is kept)"
    )
    return 0


def run_query(args: argparse.Namespace) -> int:
    if len(args.image) != len(args.text):
        raise ConfigError(f"--image and --text pair up: got {len(args.image)} images and {len(args.text)} texts.")
    retriever = _retriever(args)
    if args.ef_search or args.nprobe:
        if not hasattr(retriever.index, "tune"):
            raise ConfigError(f"{args.index} does not search a FAISS index folder; --ef-search / --nprobe do not apply.")
        retriever.index.tune(ef_search=args.ef_search, nprobe=args.nprobe)
    exclude = [list(args.exclude)] * len(args.image) if args.exclude else None
    options = _method_options(args.method or retriever.method_name, args.set) if args.set else {}
    hits = retriever.search(args.image, args.text, k=args.k, exclude=exclude, method=args.method, **options)
    if args.json:
        rows = [
            {"image": str(image), "text": text, "hits": [h.__dict__ for h in row]}
            for image, text, row in zip(args.image, args.text, hits)
        ]
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return 0
    for image, text, row in zip(args.image, args.text, hits):
        print(f"{image} + {text!r}:")
        for rank, hit in enumerate(row, start=1):
            caption = f"  [{hit.caption}]" if hit.caption else ""
            print(f"{rank:4d}  {hit.score:.4f}  {hit.path or hit.id}{caption}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build, grow, inspect or upload a gallery index (a saved ComposedRetriever)",
        description="A retriever folder: retriever.json (embedder, captioner, method, index) and index/ "
        "(memory-mapped vectors, metadata, FAISS). Query it with fusion-diff query.",
    )
    commands = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    build = commands.add_parser("build", help="embed a gallery into a new retriever folder")
    build.add_argument("--out", type=Path, required=True, help="retriever folder to write")
    build.add_argument(
        "--images",
        required=True,
        help="image folder, or webdataset-style .tar shards ('shards-{0000..0099}.tar'), "
        "or an embedding cache folder of the same embedder",
    )
    build.add_argument(
        "--method", default="image-only", help="retrieval method of the registry (fusion-diff eval --help)"
    )
    build.add_argument("--checkpoint", help="Fusion-Diff pipeline folder (fusion-diff, emb2emb) or FTI4CIR checkpoint")
    build.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    build.add_argument("--gallery-mode", choices=("image", "fused"), help="gallery f(I) or f(I, caption)")
    build.add_argument("--type", choices=INDEX_TYPES, default="auto", help="index type (auto: by gallery size)")
    build.add_argument("--nlist", type=positive_int, help="IVF lists (default ~4 sqrt(N))")
    build.add_argument("--nprobe", type=positive_int, help="IVF lists searched per query (default nlist/64, >= 16)")
    build.add_argument(
        "--rerank", type=positive_int, help="ivf-pq / hnsw-sq8: rescore rerank x k candidates exactly (default 4 / 1)"
    )
    build.add_argument("--ef-search", type=positive_int, default=None, help="HNSW efSearch (default 512; hnsw-sq8 416)")
    build.add_argument(
        "--calibration-texts", help="text file of modification texts: the recall report then uses composed queries"
    )
    build.add_argument("--batch-size", type=positive_int, default=64, help="images per embedding forward pass")
    add_embedder_args(build, required=False)  # --embedder world (default): the shapes world's backbone
    add_captioner_args(build)
    build.set_defaults(func=run_build)

    add = commands.add_parser("add", help="embed new images into an existing retriever's index")
    add.add_argument("--images", required=True, help="image folder or .tar shards of the new images")
    add.set_defaults(func=run_add)

    info = commands.add_parser("info", help="what an index holds: size, type, identity, recall report")
    info.add_argument("--json", action="store_true", help="print the full record as JSON")
    info.set_defaults(func=run_info)

    upload = commands.add_parser("upload", help="copy the FAISS index into a Qdrant collection and search there")
    target = upload.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="Qdrant server or cluster, e.g. http://qdrant:6333")
    target.add_argument("--path", help="local on-disk Qdrant folder (qdrant-client local mode)")
    upload.add_argument("--collection", default="fusion-diff-gallery", help="collection name")
    upload.set_defaults(func=run_upload)
    for sub in (add, info, upload):
        sub.add_argument("--index", type=Path, required=True, help="retriever folder (fusion-diff index build --out)")
    for sub in (build, add, info, upload):
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    query = subparsers.add_parser(
        "query",
        help="composed search: reference image + modification text -> ranked gallery",
        description="Rank a saved retriever's gallery for each (--image, --text) pair; prints paths with scores.",
    )
    query.add_argument("--index", type=Path, required=True, help="retriever folder (fusion-diff index build --out)")
    query.add_argument("--image", nargs="+", required=True, help="reference image(s)")
    query.add_argument("--text", nargs="+", required=True, help="modification text(s), one per image")
    query.add_argument("-k", "--k", type=positive_int, default=10, help="hits per query")
    query.add_argument("--exclude", nargs="+", help="gallery ids to leave out of every ranking (e.g. the reference)")
    query.add_argument("--ef-search", type=positive_int, help="HNSW efSearch for this query (default: the index's)")
    query.add_argument("--nprobe", type=positive_int, help="IVF lists searched for this query (default: the index's)")
    query.add_argument("--method", help="another registry method for this query (same gallery mode)")
    query.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option for this query")
    query.add_argument("--json", action="store_true", help="print hits as JSON")
    query.add_argument("--quiet", action="store_true", help="no progress bars")
    query.set_defaults(func=run_query)
