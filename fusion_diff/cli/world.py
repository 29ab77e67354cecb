"""``fusion-diff world``: the shapes world's backbone, image-caption pairs, captioners and CIR benchmark."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fusion_diff.cli.arguments import finite_float, non_negative_int, positive_int

QUALITY_TARGETS = {"zero_shot_colour_acc": 0.90, "zero_shot_shape_acc": 0.90, "image_to_caption_r1": 0.50}


def register(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser(
        "world",
        help="the shapes world: train its backbone, write image-caption pairs and the CIR benchmark",
        description="An offline vision-language world of coloured shapes: a small open_clip backbone trained on it, "
        "image-caption pair sets (training scenes only) and a CIR benchmark in the CIRR file format (held-out scenes).",
    )
    commands = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)

    backbone = commands.add_parser(
        "backbone",
        help="(re)train the world backbone and print its held-out quality",
        description="Train the shapes-world open_clip backbone from scratch with open_clip's ClipLoss (plus the "
        "scene-graph read-out head, see --scene-loss-weight) on fresh random training scenes, save it to the cache (checkpoint + manifest with checksum), then print held-out zero-shot "
        "colour/shape accuracy on single objects and image->caption R@1 among 1,000 held-out pairs.",
    )
    backbone.add_argument("--cache", type=Path, default=None, help="cache folder (default: $FUSION_DIFF_CACHE/shapes_backbone)")
    # Unset options keep data_synth.shapes.backbone.BackboneConfig's defaults (not repeated here).
    backbone.add_argument("--steps", type=positive_int, help="optimisation steps (default: BackboneConfig.steps)")
    backbone.add_argument("--batch-size", type=positive_int, help="pairs per step")
    backbone.add_argument("--lr", type=finite_float, help="peak AdamW learning rate")
    backbone.add_argument("--warmup-steps", type=non_negative_int, help="linear learning-rate warm-up steps")
    backbone.add_argument("--scene-loss-weight", type=finite_float, help="weight of the scene-graph read-out loss (0: ClipLoss only)")
    backbone.add_argument("--shape-loss-weight", type=finite_float, help="weight of the shape term inside the scene-graph loss")
    backbone.add_argument("--single-fraction", type=finite_float, help="share of single-object scenes among the random ones")
    backbone.add_argument("--negation-fraction", type=finite_float,
                          help="share of captions that also name a kind of object the scene lacks (0: none)")
    backbone.add_argument("--time-budget", type=finite_float, help="seconds: stop early and compress the cosine schedule to fit")
    backbone.add_argument("--seed", type=int, help="training seed")
    backbone.add_argument("--threads", type=positive_int, help="torch threads (1 is faster on a machine shared with other jobs)")
    backbone.add_argument("--data-workers", type=non_negative_int, help="processes rendering training batches")
    backbone.add_argument("--eval-only", action="store_true", help="only evaluate the cached backbone")
    backbone.set_defaults(func=_backbone)

    bench = commands.add_parser(
        "benchmark",
        help="write the world's CIR benchmark in the CIRR file format",
        description="Write captions/cap.rc2.{val,test1}.json, image_splits/split.rc2.{val,test1}.json and the images "
        "(held-out scenes only; edits worded with the benchmark's own phrasings), plus oracle captions, the same "
        "queries in the training phrasing, and per-query edit metadata.",
    )
    _benchmark_arguments(bench, "the CIRR root", val=1000, test=2000)
    bench.set_defaults(func=_benchmark)

    open_bench = commands.add_parser(
        "benchmark-open",
        help="write the world's open-edit benchmark in the CIRCO file format (several right answers per query)",
        description="Write annotations/{val,test}.json (CIRCO queries with gt_img_ids; test keeps them), the shared "
        "gallery as COCO2017_unlabeled/ (JPEG images and the image info file), oracle captions and per-query "
        "metadata. Instructions leave something open ('give the circle another colour', 'add a blue star "
        "somewhere', 'move the triangle to any corner', 'make one of the squares bigger', or a closed edit joined "
        "with an open one); every held-out right answer up to --max-targets is rendered and every gallery image "
        "that answers a query is one of its ground truths. Held-out scenes and the benchmark's phrasings only. "
        "Score it with `fusion-diff eval --benchmark shapes-open --root DIR` (mAP@5/10/25/50).",
    )
    _benchmark_arguments(open_bench, "the root", val=500, test=1000)
    open_bench.add_argument("--max-targets", type=positive_int, default=8, help="right answers rendered per query (default %(default)s)")
    open_bench.set_defaults(func=_benchmark_open)

    pairs = commands.add_parser(
        "pairs",
        help="write an image-caption pair set of training scenes",
        description="Render N training-split scenes with paraphrased captions into DIR (images/, pairs.jsonl, "
        "manifest.json). Resumable: run it again after an interruption to finish the same set.",
    )
    pairs.add_argument("--out", type=Path, required=True, help="output folder")
    pairs.add_argument("--n", type=positive_int, default=50000, help="number of pairs (default %(default)s)")
    pairs.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    pairs.add_argument("--workers", type=positive_int, default=2, help="rendering processes (default %(default)s)")
    pairs.add_argument("--embed", type=Path, default=None, help="also embed them with the world backbone into this folder")
    pairs.add_argument("--max-text-tokens", type=int, default=0, help="with --embed: also the captions' token states (text_tokens/)")
    pairs.set_defaults(func=_pairs)

    captioner = commands.add_parser(
        "captioner",
        help="train the world's scene captioner on a pair set",
        description="Train a small CNN that reads the scene graph (per grid cell: empty or shape, colour, size; the "
        "background) off an image, on a pair set's images and scene graphs (training scenes only), and save it "
        "with save_pretrained. Use it with `--captioner scene --captioner-model DIR`. Cached: the same pair set "
        "and steps reuse the folder.",
    )
    captioner.add_argument("--pairs", type=Path, required=True, help="a finished pair set (`fusion-diff world pairs`)")
    captioner.add_argument("--out", type=Path, required=True, help="output folder")
    captioner.add_argument("--steps", type=positive_int, default=None, help="training steps of batch 128 (default: the demo's)")
    captioner.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    captioner.set_defaults(func=_captioner)

    blip = commands.add_parser(
        "blip-captioner",
        help="train the world's BLIP (a generative captioner) on a pair set",
        description="Train a small transformers BlipForConditionalGeneration (its image encoder started from the world "
        "backbone's ViT, as real BLIP starts from a pretrained ViT) on a pair set's images and "
        "paraphrased captions (training scenes only), with a word-level tokenizer built from the captions and a "
        "BlipImageProcessor at the world's image size, and save model and processor with save_pretrained. Use it "
        "like any BLIP checkpoint: `--captioner generative --captioner-model DIR`. Its held-out quality (exact "
        "captions, per-attribute accuracy) is set by --steps. Cached: the same pair set and settings reuse DIR.",
    )
    blip.add_argument("--pairs", type=Path, required=True, help="a finished pair set (`fusion-diff world pairs`)")
    _model_training_arguments(blip, "data_synth.shapes.blip", "pairs", 1e-3)
    blip.add_argument("--backbone", type=Path, default=None, help="world backbone cache folder (default: the cache's)")
    blip.add_argument("--from-scratch", action="store_true", help="image encoder from random weights, not the backbone")
    blip.add_argument(
        "--eval-scenes",
        type=non_negative_int,
        default=1000,
        help="caption this many held-out scenes through the generative path and print the quality (0: skip; "
        "default %(default)s)",
    )
    blip.set_defaults(func=_blip_captioner)

    editor = commands.add_parser(
        "caption-editor",
        help="train the world's caption editor (a small T5) on a shapes triplet set",
        description="Train a small transformers T5 to edit captions as instructions say, on the (reference caption, "
        "instruction, target caption) rows of a shapes triplet set (training scenes and phrasings; captions in the "
        "canonical form the scene captioner writes), and save it with save_pretrained. Use it like any seq2seq "
        "editor: `--method edited-caption --set edited-caption.caption_editor=DIR`, or in Fusion-Diff's query "
        "(`--set fusion-diff.caption_editor=DIR --set fusion-diff.edited_caption_weight=W`). Cached: the same "
        "triplet set and settings reuse DIR.",
    )
    editor.add_argument("--triplets", type=Path, required=True, help="a shapes triplet set (`fusion-diff synth shapes`)")
    _model_training_arguments(editor, "data_synth.shapes.caption_editor", "rows", 2e-3)
    editor.add_argument(
        "--rows",
        type=non_negative_int,
        default=0,
        help="rows to train on: the set's own, topped up to this many by further items of its generator (captions "
        "only, nothing rendered; default %(default)s: the set's own rows alone)",
    )
    editor.set_defaults(func=_caption_editor)


def _model_training_arguments(parser: argparse.ArgumentParser, module: str, items: str, lr: float) -> None:
    """--out, --steps, --batch-size, --lr, --seed of a command that trains one of the world's transformers models."""
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--steps", type=positive_int, default=None, help=f"training steps (default: {module}.DEFAULT_STEPS)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help=f"{items} per step (default %(default)s)")
    parser.add_argument("--lr", type=finite_float, default=lr, help="peak AdamW learning rate (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")


def _caption_editor(args: argparse.Namespace) -> int:
    from data_synth.shapes.caption_editor import DEFAULT_STEPS, build_world_caption_editor

    out = build_world_caption_editor(
        args.triplets, args.out, steps=args.steps or DEFAULT_STEPS, seed=args.seed, batch_size=args.batch_size,
        learning_rate=args.lr, rows=args.rows,
    )  # fmt: skip
    print(f"world caption editor: {out} (use it: --method edited-caption --set edited-caption.caption_editor={out})")
    return 0


def _benchmark_arguments(parser: argparse.ArgumentParser, root: str, val: int, test: int) -> None:
    """The options every world benchmark writer takes."""
    parser.add_argument("--out", type=Path, required=True, help=f"output folder ({root} for `fusion-diff eval`)")
    parser.add_argument("--val", type=positive_int, default=val, help="validation queries (default %(default)s)")
    parser.add_argument("--test", type=positive_int, default=test, help="test queries (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=64, help="rendered image size in pixels (default %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=2, help="rendering processes (default %(default)s)")


def _backbone(args: argparse.Namespace) -> int:
    from data_synth.shapes.backbone import (
        BackboneCache,
        BackboneConfig,
        build_backbone,
        evaluate_backbone,
        load_world_embedder,
    )

    if args.eval_only:
        embedder = load_world_embedder(args.cache, train_if_missing=False)
        metrics = evaluate_backbone(embedder)
        training = BackboneCache.at(args.cache).manifest().get("training", {})
    else:
        options = {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "scene_loss_weight": args.scene_loss_weight,
            "shape_loss_weight": args.shape_loss_weight,
            "single_fraction": args.single_fraction,
            "negation_fraction": args.negation_fraction,
            "seed": args.seed,
            "threads": args.threads,
            "data_workers": args.data_workers,
            "time_budget_s": args.time_budget,
        }
        config = BackboneConfig(**{k: v for k, v in options.items() if v is not None})
        manifest = build_backbone(config, cache=args.cache)
        metrics, training = manifest["heldout_quality"], manifest["training"]
        print(f"saved to {BackboneCache.at(args.cache).root}")
    print(f"training: {json.dumps(training)}")
    print("held-out quality (single objects: 1,000 scenes, prompt ensembles; R@1 among 1,000 distinct scenes):")
    failed = False
    for name, value in metrics.items():
        target = QUALITY_TARGETS.get(name)
        verdict = "" if target is None else ("  ok" if value >= target else f"  BELOW target {target:.0%}")
        failed |= target is not None and value < target
        print(f"  {name:24s} {value:7.2%}{verdict}")
    return 1 if failed else 0


def _benchmark(args: argparse.Namespace) -> int:
    from data_synth.shapes.benchmark import BenchmarkConfig, write_benchmark

    config = BenchmarkConfig(val_queries=args.val, test_queries=args.test, seed=args.seed, image_size=args.image_size)
    manifest = write_benchmark(args.out, config, workers=args.workers)
    for split, counts in manifest["splits"].items():
        print(f"{split}: {counts['queries']} queries over {counts['images']} images; kinds {counts['kinds']}")
        print(f"  negatives by reason: {counts['negatives']}")
    print(f"written to {args.out}")
    return 0


def _benchmark_open(args: argparse.Namespace) -> int:
    from data_synth.shapes.benchmark_open import OpenBenchmarkConfig, write_open_benchmark

    config = OpenBenchmarkConfig(
        val_queries=args.val, test_queries=args.test, seed=args.seed, image_size=args.image_size,
        max_targets=args.max_targets,
    )  # fmt: skip
    manifest = write_open_benchmark(args.out, config, workers=args.workers)
    for split, counts in manifest["splits"].items():
        print(f"{split}: {counts['queries']} queries, {counts['ground_truths_per_query']:.2f} ground truths per query "
              f"({counts['queries_with_capped_answers']} capped at {config.max_targets}); kinds {counts['kinds']}")  # fmt: skip
        print(f"  negatives by reason: {counts['negatives']}")
    print(f"{manifest['gallery_images']} gallery images; written to {args.out}")
    return 0


def _pairs(args: argparse.Namespace) -> int:
    from data_synth.shapes.pairs import embed_pair_set, write_pair_set

    root = write_pair_set(args.out, args.n, seed=args.seed, workers=args.workers)
    print(f"pair set: {root}")
    if args.embed is not None:
        from data_synth.shapes.backbone import load_world_embedder

        caches = embed_pair_set(root, load_world_embedder(), args.embed, max_text_tokens=args.max_text_tokens or None)
        print("embeddings: " + ", ".join(f"{kind}={cache.root}" for kind, cache in caches.items()))
    return 0


def _captioner(args: argparse.Namespace) -> int:
    from data_synth.shapes.captioner import DEFAULT_STEPS, build_scene_captioner

    out = build_scene_captioner(args.pairs, args.out, steps=args.steps or DEFAULT_STEPS, seed=args.seed)
    print(f"scene captioner: {out} (score it: python scripts/eval_captioner.py --scene-captioner {out})")
    return 0


def _blip_captioner(args: argparse.Namespace) -> int:
    from data_synth.shapes.backbone import BackboneCache
    from data_synth.shapes.blip import DEFAULT_STEPS, build_blip_captioner

    backbone = None if args.from_scratch else BackboneCache.at(args.backbone).root
    out = build_blip_captioner(
        args.pairs, args.out, steps=args.steps or DEFAULT_STEPS, seed=args.seed, batch_size=args.batch_size,
        learning_rate=args.lr, backbone=backbone,
    )  # fmt: skip
    print(f"world BLIP: {out} (use it: --captioner generative --captioner-model {out})")
    if args.eval_scenes > 0:
        from data_synth.shapes.caption_quality import HELDOUT_SEED, evaluate_captioner, format_quality, heldout_scenes
        from fusion_diff.captioning import create_captioner

        captioner = create_captioner({"type": "generative", "model": str(out)})
        print(format_quality(evaluate_captioner(captioner, *heldout_scenes(args.eval_scenes, HELDOUT_SEED), HELDOUT_SEED)))
    return 0
