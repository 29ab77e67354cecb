"""``fusion-diff eval``: score retrieval methods on CIRR, FashionIQ, CIRCO or the shapes world.

Thin: it builds the backbone, the captioner and the methods from options, then hands over to
``fusion_diff.benchmarks.evaluate``. Under ``accelerate launch`` every process shares the embedding and
captioning (``Evaluator.prepare``) and the main process alone scores and writes. Also ``fusion-diff validate-submission`` for server files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fusion_diff.cli.arguments import positive_int
from fusion_diff.errors import ConfigError

SPLITS = ("val", "test")
# The names of fusion_diff.benchmarks.spec.BENCHMARK_SPECS (spelt out: building the parser must not import torch).
BENCHMARK_NAMES = ("cirr", "fashioniq", "circo", "shapes", "shapes-open")


def build_backbone(args: argparse.Namespace):
    """The joint embedder: the shapes world's own backbone (``--embedder world``, the default) or another."""
    from fusion_diff.cli.embed import embedder_spec
    from fusion_diff.embedding.factory import create_embedder

    return create_embedder(embedder_spec(args))


def build_captioner(args: argparse.Namespace, embedder):
    """The captioner of references and fused galleries (never annotation captions), or None."""
    from fusion_diff.captioning import create_captioner

    if args.captioner == "none":
        return None
    if args.captioner == "retrieval":
        if not args.caption_bank:
            raise ConfigError(
                "--captioner retrieval needs --caption-bank (a text file, a .jsonl with 'caption', "
                "or a pair-set folder)."
            )
        return create_captioner({"type": "retrieval", "bank": args.caption_bank, "top_k": args.caption_top_k}, embedder)
    if not args.captioner_model:
        raise ConfigError(
            f"--captioner {args.captioner} needs --captioner-model (a local Hugging Face id or save_pretrained folder)."
        )
    if args.captioner == "scene":
        return create_captioner({"type": "scene", "model": args.captioner_model})
    spec = {
        "type": "generative",
        "model": args.captioner_model,
        "device": args.device,
        "num_candidates": args.caption_top_k,
    }
    return create_captioner(spec)


def _option_value(value: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true/false, lists), else the text itself."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def route_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each ``--method``'s options, so that one command compares baselines and trained methods.

    ``--set KEY=VALUE`` goes to every method that takes KEY, ``--set METHOD.KEY=VALUE`` to METHOD alone (and
    wins over the former); ``--gallery-mode`` likewise to every method that takes it. ``--checkpoint`` goes to
    the methods that take trained weights (``pipeline`` of fusion-diff / emb2emb, ``checkpoint`` of fti4cir).
    An option that no method takes fails, named, rather than being dropped.
    """
    from fusion_diff.baselines.registry import PIPELINE_METHODS, check_method_options, method_options
    from fusion_diff.training.config import did_you_mean

    methods = list(dict.fromkeys(args.method))
    accepted = {name: method_options(name) for name in methods}

    def takers(key: str) -> list[str]:
        return [name for name in methods if accepted[name] is None or key in accepted[name]]

    shared: list[tuple[str, str, Any]] = []  # (the flag as written, key, value): to every method taking key
    specific: list[tuple[str, str, Any]] = []  # (method, key, value)
    for pair in args.set or []:
        key, sep, value = pair.partition("=")
        target, dot, key = key.rpartition(".")
        key = key.replace("-", "_")
        if not sep or not key or (dot and not target):
            raise ConfigError(f"--set expects KEY=VALUE or METHOD.KEY=VALUE, got {pair!r}.")
        if not dot:
            shared.append((f"--set {pair}", key, _option_value(value)))
        elif target not in methods:
            raise ConfigError(f"--set {pair}: {target!r} is not one of the evaluated methods {methods} (--method).")
        elif target not in takers(key):
            raise ConfigError(
                f"--set {pair}: method {target!r} does not take {key!r}; it takes {sorted(accepted[target])}."
            )
        else:
            specific.append((target, key, _option_value(value)))
    if args.gallery_mode:
        shared.append(("--gallery-mode", "gallery_mode", args.gallery_mode))

    routed: dict[str, dict[str, Any]] = {name: {} for name in methods}
    if args.checkpoint:
        weights = {name: "pipeline" if name in PIPELINE_METHODS else "checkpoint" for name in methods}
        trained = [name for name in methods if not name.startswith("oracle") and name in takers(weights[name])]
        if not trained:
            raise ConfigError(f"--checkpoint: none of {methods} takes trained weights (fusion-diff, emb2emb, fti4cir).")
        if len({weights[name] for name in trained}) > 1:
            raise ConfigError(
                f"--checkpoint is ambiguous for {trained}: give each its own, e.g. "
                "--set fusion-diff.pipeline=DIR --set fti4cir.checkpoint=DIR."
            )
        for name in trained:
            routed[name][weights[name]] = args.checkpoint
    for flag, key, value in shared:
        if not takers(key):
            known = set().union(*(accepted[name] or () for name in methods))
            raise ConfigError(f"{flag}: none of the methods {methods} takes {key!r}{did_you_mean(key, known)}.")
        for name in takers(key):
            routed[name][key] = value
    for name, key, value in specific:
        routed[name][key] = value
    return {name: check_method_options(name, options, "--set") for name, options in routed.items()}


def build_method(name: str, options: dict[str, Any], args: argparse.Namespace, units, embedder):
    """Method ``name`` with its routed ``options``; sampling methods check their prior against ``embedder``."""
    from fusion_diff.baselines import create_method

    options = dict(options)
    if name.startswith("oracle"):
        options["data"] = units[0]
        if args.oracle_captions:
            options["captions_file"] = args.oracle_captions
    return create_method(name, embedder=embedder, **options)


def run(args: argparse.Namespace) -> int:
    from fusion_diff.benchmarks import load_benchmark
    from fusion_diff.benchmarks.evaluate import Evaluator
    from fusion_diff.benchmarks.report import markdown_table, write_rankings, write_results
    from fusion_diff.benchmarks.spec import benchmark_spec
    from fusion_diff.benchmarks.submission import write_result_submissions
    from fusion_diff.utils.sharding import Processes

    options = route_options(args)  # bad options fail before any data or model loads
    processes = Processes.current()
    args.device = processes.device(args.device)
    units = load_benchmark(
        args.benchmark,
        args.root,
        args.split,
        allow_missing=args.allow_missing,
        image_root=args.image_root,
        categories=args.categories,
        circo_gallery=args.circo_gallery,
        phrasing=args.phrasing,
    )
    embedder = build_backbone(args)
    # Before anything is embedded: a pipeline trained on another backbone is refused here.
    methods = [build_method(name, options[name], args, units, embedder) for name in args.method]
    for method in methods:  # sampling methods run their pipeline on --device, like every model of the job
        if getattr(method, "pipeline", None) is not None:
            method.pipeline.to(args.device)
    evaluator = Evaluator(
        units,
        embedder,
        captioner=build_captioner(args, embedder),
        cache_root=args.cache_dir,
        fashioniq_caption_order=args.fiq_caption_order,
        circo_shared_concept=args.circo_shared_concept,
        index_backend=args.index,
        batch_size=args.batch_size,
        device=args.device,
        chunk_size=args.chunk_size,
        processes=processes,
    )
    evaluator.prepare(methods)  # every process embeds and captions its own units
    if not processes.is_main:
        return 0
    out = Path(args.out)
    stem = f"{args.benchmark}-{units[0].split}" + (f"-{args.phrasing}-phrasing" if args.phrasing != "benchmark" else "")
    results = []
    for method in methods:  # written after each method, so a later failure loses nothing done
        results.append(evaluator.evaluate(method))
        json_path, md_path = write_results(results, out, stem)
        rankings_path = write_rankings(results, out, stem)
    print(markdown_table(results))
    print(f"wrote {json_path}, {md_path} and {rankings_path}")
    if not units[0].has_ground_truth:
        print(f"{units[0].name} has no ground truth here: no metrics; the rankings are in {rankings_path}.")
    server_format = benchmark_spec(args.benchmark).submission
    if server_format and not units[0].has_ground_truth and not args.no_submission:
        for result in results:
            for written in write_result_submissions(result, units, out):
                print(written.describe())
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from fusion_diff.benchmarks import load_benchmark, validate_submission
    from fusion_diff.utils.io import read_json

    (unit,) = load_benchmark(
        args.benchmark, args.root, args.split, allow_missing=True, circo_gallery=args.circo_gallery
    )
    validate_submission(args.file, unit, partial=args.partial)
    entries = read_json(args.file, "submission file")
    answered = sum(q.query_id in entries for q in unit.queries)
    if answered < len(unit.queries):
        print(
            f"{args.file}: valid PARTIAL {unit.name} submission: {answered} of {len(unit.queries)} queries; the server "
            f"will score the other {len(unit.queries) - answered} (images missing here) as misses"
        )
    else:
        print(f"{args.file}: valid {unit.name} submission ({len(unit.queries)} queries)")
    return 0


def _data_arguments(parser: argparse.ArgumentParser, benchmarks: tuple[str, ...]) -> None:
    parser.add_argument(
        "--benchmark",
        required=True,
        choices=benchmarks,
        help="benchmark; 'shapes' is the shapes world's benchmark in CIRR's format, 'shapes-open' its open-edit "
        "benchmark in CIRCO's (several ground truths, mAP@K)",
    )
    parser.add_argument("--split", required=True, choices=SPLITS, help="val, or test (CIRR's test1)")
    parser.add_argument(
        "--root",
        required=True,
        help="benchmark folder in its official layout (CIRR: NLVR2 image folders + cirr/ annotations; "
        "FashionIQ: captions/, image_splits/, images/; CIRCO: annotations/ + COCO2017_unlabeled/)",
    )
    parser.add_argument(
        "--circo-gallery",
        default="auto",
        help="CIRCO gallery source: 'coco-info' (COCO's image info file), 'folder' (every .jpg of the "
        "image folder), a file of image ids, or 'auto' (info file if present, else folder)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    from fusion_diff.baselines.registry import METHODS
    from fusion_diff.cli.embed import add_embedder_args

    methods_help = "; ".join(f"{name}: {summary}" for name, (_, summary) in METHODS.items())
    parser = subparsers.add_parser(
        "eval",
        help="evaluate retrieval methods on CIRR, FashionIQ, CIRCO or the shapes world",
        description=(
            "Embed the benchmark's images (cached per backbone), build each method's query embeddings, rank the "
            "gallery and score it exactly as the benchmark does: CIRR R@1/5/10/50 (reference removed) and "
            "Recall_subset@1/2/3; FashionIQ R@10/50 per category and averaged; CIRCO mAP@5/10/25/50. Writes a JSON "
            "record and a markdown table whose every row names its protocol; on CIRR/CIRCO test splits also the "
            "test-server files. References and fused galleries are captioned by --captioner, never from annotations; "
            "only methods named oracle-* read ground-truth captions. The backbone is --model (open_clip name or VLM "
            "id); --embedder world, the default, is the shapes world's own backbone (fusion-diff world backbone). "
            "`accelerate launch -m fusion_diff.cli eval ...` shares the embedding and captioning among the processes "
            "(the caches equal one process's); the main process scores and writes."
        ),
    )
    _data_arguments(parser, BENCHMARK_NAMES)
    parser.add_argument(
        "--method",
        action="append",
        required=True,
        choices=sorted(METHODS),
        metavar="METHOD",
        help=f"method to evaluate (repeat for a table of several). {methods_help}",
    )
    parser.add_argument("--image-root", help="where image paths start, if not under --root")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="evaluate without missing images instead of failing (every result records the count)",
    )
    parser.add_argument("--categories", nargs="+", default=["dress", "shirt", "toptee"], help="FashionIQ categories")
    parser.add_argument(
        "--phrasing",
        choices=("benchmark", "training"),
        default="benchmark",
        help="shapes world: the benchmark's held-out phrasing, or the same edits in the training phrasing",
    )
    add_embedder_args(parser, required=False)  # --embedder world (default): the shapes world's backbone
    captioning = parser.add_argument_group("captioner (reference control and fused galleries)")
    captioning.add_argument(
        "--captioner",
        choices=("none", "retrieval", "generative", "scene"),
        default="none",
        help="retrieval: the backbone ranks --caption-bank; generative: a BLIP-class model; scene: the shapes "
        "world's trained captioner (--captioner-model: the demo's captioner/ folder)",
    )
    captioning.add_argument("--caption-bank", help="retrieval captioner's bank: text file, .jsonl, or pair-set folder")
    captioning.add_argument(
        "--captioner-model", help="generative / scene captioner: local Hugging Face id or save_pretrained folder"
    )
    captioning.add_argument(
        "--caption-top-k", type=positive_int, default=1, help="candidate captions per image (fused embeddings average them)"
    )
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument(
        "--gallery-mode",
        choices=("image", "fused"),
        help="gallery embedding f(I) or f(I, caption) (default: each method's own)",
    )
    protocol.add_argument(
        "--fiq-caption-order",
        choices=("both", "forward", "reverse"),
        default="both",
        help="FashionIQ: join the two captions in both orders and average (default), or one order",
    )
    protocol.add_argument(
        "--circo-shared-concept",
        action="store_true",
        help="CIRCO: put the annotated shared concept into the query text ('{concept} that {caption}')",
    )
    options = parser.add_argument_group("method options")
    options.add_argument(
        "--checkpoint",
        help="trained weights for the methods that take them: a Fusion-Diff pipeline folder (fusion-diff, emb2emb) "
        "or an FTI4CIR checkpoint (baselines ignore it; for both kinds use --set METHOD.pipeline/checkpoint=...)",
    )
    options.add_argument(
        "--oracle-captions",
        help="oracle rows: {image: ground-truth caption} file (default: ROOT/oracle/captions.SPLIT.json)",
    )
    options.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="method option, repeatable: KEY=VALUE goes to every --method that takes KEY, METHOD.KEY=VALUE to "
        "that method alone, e.g. --set fusion-diff.pipeline=DIR --set fusion-diff.num_inference_steps=10 --set "
        "sum.image_weight=0.7",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", default="runs/eval", help="folder for the JSON record, markdown table and submission files"
    )
    output.add_argument("--cache-dir", help="embedding/caption cache root (default: the fusion_diff cache, eval/)")
    output.add_argument("--index", choices=("exact", "faiss"), default="exact", help="gallery search backend")
    output.add_argument("--batch-size", type=positive_int, default=64, help="images per embedding forward pass")
    output.add_argument(
        "--chunk-size",
        type=positive_int,
        default=4096,
        help="images (or texts) per cache shard: the unit of resumption and, under accelerate launch, of sharding",
    )
    output.add_argument("--no-submission", action="store_true", help="do not write test-server files on test splits")
    parser.set_defaults(func=run)

    validate = subparsers.add_parser(
        "validate-submission",
        help="check a CIRR or CIRCO test-server file before uploading it",
        description=(
            "Checks keys (every test query, nothing else), list lengths, unique and valid ids, "
            "and CIRR's version/metric fields."
        ),
    )
    validate.add_argument("file", help="submission JSON file")
    validate.add_argument(
        "--partial",
        action="store_true",
        help="accept a file without the queries whose images are missing under --root (as `eval --allow-missing` "
        "writes it); the server scores those as misses",
    )
    _data_arguments(validate, ("cirr", "circo", "shapes"))  # FashionIQ has no test server
    validate.set_defaults(func=run_validate)
