"""``fusion-diff caption``: caption a folder of images into a resumable caption cache file.

Also the captioner flags shared by every command that captions (``add_captioner_args`` /
``captioner_from_args``), so that ``caption``, ``eval`` and ``demo`` spell them the same way.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from fusion_diff.cli.arguments import finite_float, non_negative_int, positive_int
from fusion_diff.cli.embed import add_embedder_args
from fusion_diff.errors import ConfigError, DataError, MissingFileError
from fusion_diff.utils.image_sources import IMAGE_SUFFIXES, is_tar_source, tar_images

if TYPE_CHECKING:  # the captioners import torch and transformers: only when a command runs
    from fusion_diff.captioning import Captioner
    from fusion_diff.embedding.base import JointEmbedder


def add_captioner_args(parser: argparse.ArgumentParser, allow_none: bool = True) -> None:
    """The flags that pick and configure a captioner (``--captioner`` and the ``--caption*`` options)."""
    group = parser.add_argument_group("captioner")
    group.add_argument(
        "--captioner",
        choices=(("none",) if allow_none else ()) + ("retrieval", "generative", "scene"),
        default="none" if allow_none else None,
        required=not allow_none,
        help="retrieval: the backbone ranks --caption-bank; generative: a BLIP-class transformers model "
        "(--captioner-model); scene: the shapes world's trained captioner (--captioner-model: its folder)",
    )
    group.add_argument("--caption-bank", help="retrieval: text file (a caption per line), .jsonl, or pair-set folder")
    group.add_argument("--caption-bank-cache", help="retrieval: folder caching the bank's text embeddings (resumable)")
    group.add_argument(
        "--captioner-model", help="generative: Hugging Face id in the local cache, or save_pretrained dir; scene: its folder"
    )
    group.add_argument(
        "--caption-top-k",
        type=positive_int,
        default=1,
        help="candidate captions per image (retrieval: k nearest; generative: beams kept); fused embeddings average "
        "their text embeddings",
    )
    group.add_argument("--caption-prompt", help="generative: text prefix, e.g. 'a photography of'")
    group.add_argument(
        "--caption-max-new-tokens",
        type=positive_int,
        help="generative: longest caption, in tokens (default: the checkpoint's generation config, else 30)",
    )
    group.add_argument(
        "--caption-num-beams", type=positive_int, help="generative: beam width (default: the checkpoint's, else 3)"
    )
    group.add_argument(
        "--caption-dtype",
        choices=("fp32", "fp16", "bf16"),
        default=None,
        help="generative: precision (default: the command's --dtype where it has one, else fp32)",
    )


def captioner_from_args(args: argparse.Namespace, embedder: JointEmbedder | None) -> Captioner | None:
    """The captioner named by ``add_captioner_args`` flags (None for ``--captioner none``)."""
    from fusion_diff.captioning import create_captioner

    return create_captioner(captioner_spec(args), embedder)


def captioner_spec(args: argparse.Namespace) -> dict | None:
    """The ``create_captioner`` spec of ``add_captioner_args`` flags (what a saved retriever records)."""
    if args.captioner in (None, "none"):
        return None
    if args.captioner == "retrieval":
        if not args.caption_bank:
            raise ConfigError(
                "--captioner retrieval needs --caption-bank (a text file, a .jsonl, or a pair-set folder)."
            )
        spec = {
            "type": "retrieval",
            "bank": args.caption_bank,
            "top_k": args.caption_top_k,
            "cache_dir": args.caption_bank_cache,
        }
        return spec
    if not args.captioner_model:
        raise ConfigError(
            f"--captioner {args.captioner} needs --captioner-model (a Hugging Face id in the local cache, or a "
            "save_pretrained folder)."
        )
    if args.captioner == "scene":
        return {"type": "scene", "model": args.captioner_model}
    spec = {
        "type": "generative",
        "model": args.captioner_model,
        "device": getattr(args, "device", "cpu"),
        "dtype": args.caption_dtype or getattr(args, "dtype", None) or "fp32",
        "prompt": args.caption_prompt,
        "num_candidates": args.caption_top_k,
        "generation": {
            k: v
            for k, v in (("max_new_tokens", args.caption_max_new_tokens), ("num_beams", args.caption_num_beams))
            if v is not None
        },
    }
    return spec


def image_folder(root: Path) -> tuple[list[str], list[Path]]:
    """(ids, paths) of the images under ``root``, recursively, sorted; id = file stem, as benchmarks name images."""
    if not root.is_dir():
        raise MissingFileError(f"Image folder not found: {root}. Pass the folder that holds the images with --images.")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {root}.")
    repeated = [stem for stem, n in Counter(p.stem for p in paths).items() if n > 1]
    if repeated:
        raise DataError(
            f"Image ids (file stems) repeat under {root}, e.g. {repeated[:3]}; give each image a unique name."
        )
    return [p.stem for p in paths], paths


def run(args: argparse.Namespace) -> int:
    from fusion_diff.captioning.job import caption_sharded, prepare_captioner
    from fusion_diff.cli.eval import build_backbone  # --embedder world (default) or any embedder
    from fusion_diff.utils.sharding import Processes

    processes = Processes.current()
    args.device = processes.device(args.device)
    ids, images = tar_images(args.images) if is_tar_source(args.images) else image_folder(Path(args.images))
    captioner = captioner_from_args(args, build_backbone(args) if args.captioner == "retrieval" else None)
    assert captioner is not None
    prepare_captioner(captioner, processes)
    _, new = caption_sharded(
        captioner,
        ids,
        images,
        args.out,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        save_every=args.save_every,
        save_seconds=args.save_seconds,
        num_workers=args.num_workers,
        processes=processes,
    )
    if processes.is_main:
        print(
            f"{len(ids)} images captioned ({new} new) by {captioner.describe()} in {processes.world_size} "
            f"process(es) -> {args.out}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="caption a folder of images (retrieval over a caption bank, or a BLIP-class model)",
        description=(
            "Caption every image under --images into a caption cache (JSON: {image id (file stem): caption}, plus "
            "the captioner's identity). The file is rewritten atomically after each chunk; running the command "
            "again resumes, and a file made by another captioner is refused. The retrieval captioner ranks the "
            "bank with the embedder (--embedder world, the default, is the shapes world's backbone). Under "
            "`accelerate launch -m fusion_diff.cli caption ...` each process captions its own chunks into "
            "<out>.parts/ and the main process merges them; work saved before a crash is kept."
        ),
    )
    parser.add_argument(
        "--images",
        required=True,
        help="folder of images (searched recursively; id = file stem) or webdataset tar shards (a .tar path, glob, "
        "{000..099} range or fsspec URL; id = sample key)",
    )
    parser.add_argument("--out", required=True, help="caption cache file to write or resume (.json)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    parser.add_argument(
        "--chunk-size", type=positive_int, default=1024, help="images per work unit (the unit of sharding between processes)"
    )
    parser.add_argument("--save-every", type=positive_int, default=256, help="save the work done every this many images...")
    parser.add_argument("--save-seconds", type=finite_float, default=60.0, help="...or every this many seconds")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers decoding images")
    add_captioner_args(parser, allow_none=False)
    add_embedder_args(parser, required=False)
    parser.set_defaults(func=run)
