"""``fusion-diff sample``: query embeddings from a saved Fusion-Diff pipeline, into an embedding cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fusion_diff.cli.arguments import finite_float, positive_int
from fusion_diff.cli.embed import add_embedder_args, embedder_from_args, read_jsonl, unique_ids
from fusion_diff.errors import DataError

if TYPE_CHECKING:  # the pipelines import torch and diffusers: only when the command runs
    import torch

    from fusion_diff.embedding import JointEmbedder
    from fusion_diff.pipelines import Emb2EmbMethod, FusionDiffMethod, FusionDiffPipeline


def _method(args: argparse.Namespace, pipeline: FusionDiffPipeline) -> FusionDiffMethod | Emb2EmbMethod:
    from fusion_diff.pipelines import Emb2EmbMethod, FusionDiffMethod

    shared = dict(
        num_inference_steps=args.steps,
        text_guidance=args.text_guidance,
        num_samples=args.num_samples,
        mix_reference=args.mix_reference,
        seed=args.seed,
        control_mode=args.control,
        batch_size=args.batch_size,
        precision=args.sampling_precision,
    )
    if args.emb2emb is not None:
        return Emb2EmbMethod(pipeline, strength=args.emb2emb, **shared)
    return FusionDiffMethod(pipeline, control_guidance=args.control_guidance, **shared)


def run(args: argparse.Namespace) -> int:
    """Check every setting and input first; the cache folder is created only when there is something to store."""
    from fusion_diff.embedding import EmbeddingCache
    from fusion_diff.pipelines import FusionDiffPipeline
    from fusion_diff.utils.locking import exclusive_folder

    embedder = embedder_from_args(args)
    pipeline = FusionDiffPipeline.from_pretrained(args.pipeline, embedder=embedder)
    if args.sampler:
        pipeline.set_sampler(args.sampler)
    method = _method(args, pipeline)  # refuses impossible settings before anything is written

    records = read_jsonl(args.queries, ("id", "reference", "instruction"))
    with_caption = sum("caption" in r for r in records)
    if 0 < with_caption < len(records):
        raise DataError(
            f"{args.queries}: {with_caption} of {len(records)} queries have a 'caption'; give every reference a "
            "captioner caption, or none (image-only control)."
        )
    ids = unique_ids(records, args.queries)
    identity = {**embedder.identity.as_dict(), "kind": "query", "protocol": method.protocol()}
    with exclusive_folder(args.out, "sampling job"):  # removed again if nothing gets written
        cache = EmbeddingCache.open(args.out, identity, create=False) if EmbeddingCache.exists(args.out) else None
        missing = set(cache.missing(ids) if cache is not None else ids)
        todo = [r for r, i in zip(records, ids, strict=True) if i in missing]
        if not todo:
            print(f"all {len(records)} queries are already in {args.out}")
            return 0
        queries = _sample(args, embedder, method, todo, with_caption > 0)
        cache = cache or EmbeddingCache.open(args.out, identity)
        cache.append([str(r["id"]) for r in todo], queries)
    print(f"sampled {len(todo)} query embeddings ({method.name}, control: {method.control_used}) into {args.out}")
    return 0


def _sample(
    args: argparse.Namespace,
    embedder: JointEmbedder,
    method: FusionDiffMethod | Emb2EmbMethod,
    todo: list[dict],
    with_caption: bool,
) -> torch.Tensor:
    """The query embeddings of the ``todo`` records."""
    from fusion_diff.retrieval.method import QueryContext

    paths = [(args.queries.parent / r["reference"]) for r in todo]
    texts = [r["instruction"] for r in todo]
    image = embedder.embed_images(paths, progress=True)
    captions = [r["caption"] for r in todo] if with_caption and args.control != "image" else None
    fused = None
    if captions is not None:
        if embedder.supports_late_fusion:
            fused = embedder.fuse(image, embedder.embed_texts(captions, progress=True))
        else:
            fused = embedder.embed_pairs(paths, captions, progress=True)
    context = QueryContext(
        embedder=embedder,
        query_ids=[str(r["id"]) for r in todo],
        modification_texts=texts,
        modification_text_embeds=embedder.embed_texts(texts, progress=True),
        reference_image_embeds=image,
        reference_image_paths=paths,
        reference_captions=captions,
        reference_fused_embeds=fused,
    )
    return method.query_embeddings(context)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate query embeddings with a trained Fusion-Diff pipeline",
        description="Generate the target's fused embedding for each composed query (reference image + modification "
        "text) with a pipeline folder written by FusionDiffPipeline.save_pretrained (prior/, adapter/, scheduler/). "
        "Queries: JSON lines {id, reference (image path, relative to the file), instruction, optional caption (a "
        "captioner's caption of the reference: the control is then the fused f(I, caption), else f(I))}. The "
        "embeddings go into an embedding cache (--out) that `fusion-diff search --queries` reads; queries already "
        "in the cache are skipped. --emb2emb S runs the training-free prior-only baseline instead.",
    )
    parser.add_argument("--pipeline", type=Path, required=True, help="folder written by save_pretrained")
    parser.add_argument("--queries", type=Path, required=True, help="JSON lines file of queries")
    parser.add_argument("--out", type=Path, required=True, help="embedding cache folder for the query embeddings")
    parser.add_argument("--sampler", choices=("ddim", "dpm++", "ddpm"), default=None, help="default: the saved one")
    parser.add_argument(
        "--steps", type=positive_int, default=10, help="sampler steps (1 = z0 from pure noise in one step)"
    )
    parser.add_argument("--control-guidance", type=finite_float, default=1.5, help="guidance scale of the reference")
    parser.add_argument(
        "--text-guidance", type=finite_float, default=1.5, help="guidance scale of the modification text"
    )
    parser.add_argument("--num-samples", type=positive_int, default=1, help="samples averaged per query (less noise)")
    parser.add_argument(
        "--mix-reference", type=finite_float, default=0.0, help="weight m of normalize((1-m) z + m ref)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--batch-size", type=positive_int, default=1024, help="rows per sampling chunk")
    parser.add_argument(
        "--sampling-precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="denoiser precision: bf16 autocast is ~2x faster on CPUs with AVX512-BF16/AMX",
    )
    parser.add_argument(
        "--control",
        choices=("auto", "fused", "image"),
        default="auto",
        help="reference embedding: fused with the caption (needs captions), image-only, or auto (fused if captioned)",
    )
    parser.add_argument(
        "--emb2emb",
        type=finite_float,
        default=None,
        metavar="STRENGTH",
        help="prior-only emb2emb baseline: noise the reference to this strength in [0, 1], denoise with the text",
    )
    add_embedder_args(parser, required=True)
    parser.set_defaults(func=run)
