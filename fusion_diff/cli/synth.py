"""``fusion-diff synth shapes|corpus|realise|verify`` and ``fusion-diff embed-triplets``: synthetic triplet sets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fusion_diff.cli.arguments import finite_float, non_negative_int, positive_int, seed_int
from fusion_diff.cli.caption import add_captioner_args, captioner_from_args
from fusion_diff.errors import ConfigError

if TYPE_CHECKING:  # the embedding package imports open_clip: only load it for embed-triplets
    from fusion_diff.embedding.base import JointEmbedder


def _summary(manifest: dict, out: str) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts_per_edit_type"].items())
    dropped = {k: v for k, v in manifest.get("dropped", {}).items() if v}
    line = f"{manifest['num_samples']} triplets in {len(manifest['shards'])} shards ({manifest['bytes'] / 2**20:.1f} MiB) -> {out}\n"
    line += f"per edit type: {counts}"
    return line + (f"\ndropped: {dropped}" if dropped else "")


def run_shapes(args: argparse.Namespace) -> int:
    from data_synth.triplets.shapes_builder import ShapesTripletConfig, build_shapes_triplets

    config = ShapesTripletConfig(
        image_size=args.image_size,
        kinds=tuple(args.kinds) if args.kinds else ShapesTripletConfig().kinds,
        allow_composite=not args.no_composite,
        open_probability=args.open_probability,
        negated_removals=args.negated_removals,
    )
    manifest = build_shapes_triplets(
        args.out, args.n, seed=args.seed, config=config, shard_size=args.shard_size, workers=args.workers, overwrite=args.overwrite
    )
    print(_summary(manifest, args.out))
    return 0


def run_corpus(args: argparse.Namespace) -> int:
    from data_synth.triplets.corpus_edits import RULE_KINDS, CorpusEditConfig, build_corpus_triplets

    config = CorpusEditConfig(
        corpus=args.captions,
        caption_field=args.caption_field,
        id_field=args.id_field,
        image_field=args.image_field,
        kinds=tuple(args.kinds) if args.kinds else RULE_KINDS,
        llm_model=args.llm,
        llm_probability=args.llm_probability,
    )
    manifest = build_corpus_triplets(
        args.out, config, seed=args.seed, max_samples=args.n, shard_size=args.shard_size, workers=args.workers, overwrite=args.overwrite
    )
    print(_summary(manifest, args.out))
    return 0


def run_realise(args: argparse.Namespace) -> int:
    from data_synth.triplets.realise import RealiseConfig, realise_triplets
    from fusion_diff.utils.sharding import Processes

    processes = Processes.current()
    args.device = processes.device(args.device or ("cuda" if processes.state.device.type == "cuda" else None))

    filter_spec = json.loads(args.filter_embedder) if args.filter_embedder else RealiseConfig().filter_embedder
    config = RealiseConfig(
        text_to_image_model=args.text_to_image_model,
        edit_model=args.edit_model,
        filter_embedder=filter_spec,
        image_size=args.image_size,
        text_to_image_steps=args.text_to_image_steps,
        edit_steps=args.edit_steps,
        edit_guidance=args.edit_guidance,
        image_guidance=args.image_guidance,
        min_directional_similarity=args.min_directional_similarity,
        min_image_similarity=args.min_image_similarity,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    manifest = realise_triplets(
        args.triplets, args.out, config, seed=args.seed, overwrite=args.overwrite, processes=processes
    )
    if processes.is_main:
        print(_summary(manifest, args.out))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from data_synth.triplets.format import load_manifest, verify_dataset

    verify_dataset(args.dataset)
    print(_summary(load_manifest(args.dataset), args.dataset) + "\nall shards intact")
    return 0


def embedder_from_args(args: argparse.Namespace) -> JointEmbedder:
    """The shapes world's backbone (default) or any embedder spec given as JSON, on ``--device`` / ``--dtype``."""
    if args.embedder == "world":
        from data_synth.shapes.backbone import load_world_embedder

        return load_world_embedder(train_if_missing=False, fusion_weight=args.fusion_weight)
    from fusion_diff.embedding.factory import create_embedder, with_runtime

    try:
        spec = json.loads(Path(args.embedder).read_text() if Path(args.embedder).is_file() else args.embedder)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--embedder must be 'world', a JSON spec or a JSON file ({err}).") from err
    return create_embedder(with_runtime(spec, args.device, args.dtype))


def run_embed(args: argparse.Namespace) -> int:
    import time

    from data_synth.triplets.embed import embed_triplets
    from fusion_diff.captioning.job import prepare_captioner
    from fusion_diff.utils.sharding import Processes

    processes = Processes.current()
    args.device = processes.device(args.device)
    embedder = embedder_from_args(args)
    captioner = captioner_from_args(args, embedder)
    prepare_captioner(captioner, processes)
    start = time.perf_counter()
    caches = embed_triplets(
        args.triplets,
        embedder,
        args.out,
        batch_size=args.batch_size,
        captioner=captioner,
        processes=processes,
        max_text_tokens=args.max_text_tokens or None,
        near_misses=args.near_misses,
    )
    sizes = ", ".join(f"{name} {len(cache)}" for name, cache in caches.items())
    if processes.is_main:
        print(
            f"embedded with {embedder.identity.describe()} in {processes.world_size} process(es), "
            f"{time.perf_counter() - start:.1f} s: {sizes} -> {args.out}"
        )
    return 0


def _common(parser: argparse.ArgumentParser, n_help: str) -> None:
    parser.add_argument("--out", required=True, help="dataset directory (created; re-running the same command resumes)")
    parser.add_argument("--n", type=positive_int, default=None, help=n_help)
    parser.add_argument("--seed", type=seed_int, default=0, help="dataset seed: same seed, same bytes, whatever --workers")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="triplets per tar shard")
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes writing shards in parallel")
    parser.add_argument("--overwrite", action="store_true", help="replace a different build found in --out")


def register(subparsers: argparse._SubParsersAction) -> None:
    synth = subparsers.add_parser(
        "synth",
        help="build synthetic (reference, instruction, target) triplet sets",
        description=(
            "Synthetic triplet sets for stage-2 (Control-Adapter) training, written as webdataset-style tar shards "
            "with a manifest (generator, seed, counts per edit type, checksums). Builds are deterministic under "
            "--seed, parallel, and resumable: re-run an interrupted command to finish it."
        ),
    )
    sub = synth.add_subparsers(dest="synth_command", metavar="SOURCE", required=True)

    from data_synth.shapes.edits import ALL_KINDS
    from data_synth.triplets.corpus_edits import RULE_KINDS
    from data_synth.triplets.realise import RealiseConfig

    shapes = sub.add_parser(
        "shapes",
        help="shapes-world triplets from scene-graph edits (images + captions + instruction + edit JSON)",
        description=(
            "Sample a training scene (never a held-out benchmark scene), apply a random edit (or a composite of two), "
            "keep it if the target is a training scene too, and write the rendered images, captions, a "
            "training-phrasing instruction and the structured edit."
        ),
    )
    _common(shapes, "number of triplets (default 200000)")
    shapes.add_argument("--image-size", type=positive_int, default=64, help="rendered image size in pixels")
    shapes.add_argument("--kinds", nargs="+", choices=ALL_KINDS, help="edit kinds to sample (default: all)")
    shapes.add_argument("--no-composite", action="store_true", help="only single edits, no two-edit compositions")
    shapes.add_argument(
        "--open-probability",
        type=float,
        default=0.0,
        help="share of triplets with an open instruction ('give the circle another colour'); the target is one of "
        "its right answers, drawn at random (default %(default)s)",
    )
    shapes.add_argument("--negated-removals", action="store_true",
                        help="word some removals as negations ('no more red stars'; the world backbone needs negation captions to read them)")
    shapes.set_defaults(func=run_shapes, n=200_000)

    corpus = sub.add_parser(
        "corpus",
        help="caption-edit triplets (T_ref, instruction, T_tgt) from a real caption corpus",
        description=(
            "Edit each caption of a .txt/.jsonl/.csv corpus with keyword rules (colour, object, count, material, size, "
            "style, add/remove clause) or, with --llm, an instruction-following text-generation model. Captions no rule "
            "applies to are dropped and counted. Images are drawn later by `synth realise`."
        ),
    )
    _common(corpus, "use at most this many captions (default: all)")
    corpus.add_argument("--captions", required=True, help="caption corpus: .txt (one per line), .jsonl or .csv")
    corpus.add_argument("--caption-field", default="caption", help="caption field/column of .jsonl/.csv")
    corpus.add_argument("--id-field", default="id", help="id field/column (default: line number)")
    corpus.add_argument("--image-field", default="image", help="image path field/column; such references are not redrawn")
    corpus.add_argument("--kinds", nargs="+", choices=RULE_KINDS, help="rule kinds to use (default: all)")
    corpus.add_argument("--llm", default=None, help="transformers text-generation model id or path for free-form edits")
    corpus.add_argument("--llm-probability", type=finite_float, default=1.0, help="share of captions edited by the LLM")
    corpus.set_defaults(func=run_corpus)

    realise = sub.add_parser(
        "realise",
        help="draw the images of a corpus triplet set with diffusers and drop failed edits (CLIP filter)",
        description=(
            "Reference: the corpus image, or a text-to-image pipeline on T_ref. Target: an InstructPix2Pix-class "
            "editing pipeline applied with the instruction. Triplets whose CLIP directional similarity or "
            "reference-target image similarity is below threshold are dropped and counted in the manifest. "
            "Meant for a GPU; every model is a setting."
        ),
    )
    realise.add_argument("--triplets", required=True, help="a `synth corpus` output directory")
    realise.add_argument("--out", required=True, help="output dataset directory (resumable)")
    realise.add_argument("--seed", type=seed_int, default=0, help="generation seed")
    realise.add_argument("--overwrite", action="store_true", help="replace a different build found in --out")
    defaults = RealiseConfig()
    realise.add_argument("--text-to-image-model", default=defaults.text_to_image_model, help="diffusers pipeline id or path")
    realise.add_argument("--edit-model", default=defaults.edit_model, help="InstructPix2Pix-class diffusers pipeline id or path")
    realise.add_argument("--filter-embedder", default=None, help="JSON embedder spec for the CLIP filter (default: open_clip ViT-L-14 openai)")
    realise.add_argument("--image-size", type=positive_int, default=defaults.image_size, help="reference image size (multiple of 8)")
    realise.add_argument("--text-to-image-steps", type=positive_int, default=defaults.text_to_image_steps, help="denoising steps for references")
    realise.add_argument("--edit-steps", type=positive_int, default=defaults.edit_steps, help="denoising steps for edits")
    realise.add_argument("--edit-guidance", type=finite_float, default=defaults.edit_guidance, help="text guidance of the edit")
    realise.add_argument("--image-guidance", type=finite_float, default=defaults.image_guidance, help="image guidance of the edit")
    realise.add_argument("--min-directional-similarity", type=finite_float, default=defaults.min_directional_similarity,
                         help="drop edits whose CLIP directional similarity is below this")
    realise.add_argument("--min-image-similarity", type=finite_float, default=defaults.min_image_similarity,
                         help="drop edits whose reference/target CLIP image similarity is below this")
    realise.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="triplets per pipeline call")
    realise.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    realise.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: float16 on cuda)")
    realise.set_defaults(func=run_realise)

    verify = sub.add_parser("verify", help="check every shard of a triplet set against the manifest's checksums")
    verify.add_argument("dataset", help="triplet dataset directory")
    verify.set_defaults(func=run_verify)

    embed = subparsers.add_parser(
        "embed-triplets",
        help="precompute the embeddings stage-2 training reads (fused ref/target, image ref, instruction)",
        description=(
            "Write four embedding caches under --out (reference_fused, reference_image, instruction_text, target_fused) "
            "sharing the triplet ids. Resumable; a cache made by another backbone, triplet set or caption source is "
            "refused. With --captioner, the fused caches use the captioner's captions of the reference and target "
            "images (as at test time) instead of the triplets' own captions."
        ),
    )
    embed.add_argument("--triplets", required=True, help="triplet dataset directory (with images)")
    embed.add_argument("--out", required=True, help="folder of the four caches")
    embed.add_argument("--embedder", default="world",
                       help="'world' (the shapes world backbone) or a JSON embedder spec / file, e.g. "
                            '\'{"backend": "openclip", "model_name": "ViT-L-14", "pretrained": "openai"}\'')
    embed.add_argument("--fusion-weight", type=finite_float, default=0.5, help="image weight a of the world backbone's fusion")
    embed.add_argument("--batch-size", type=positive_int, default=256, help="items per forward pass")
    embed.add_argument("--max-text-tokens", type=non_negative_int, default=0,
                       help="also the instructions' token states up to N tokens (instruction_tokens/), for a prior "
                            "trained with model.max_text_tokens=N; 0: pooled only")
    embed.add_argument("--near-misses", type=non_negative_int, default=0,
                       help="also N rendered scenes per triplet that narrowly miss its edit (near_miss_fused/, "
                            "shapes-world triplets), the negatives of stage 2's data.near_misses; 0: none")
    embed.add_argument("--device", default="cpu", help="torch device of the embedder and the captioner (cpu, cuda)")
    embed.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="precision of the embedder and the captioner"
    )
    add_captioner_args(embed)
    embed.set_defaults(func=run_embed)
