"""``fusion-diff embed images|texts|pairs``: embed files into an embedding cache (resumable, sharded by process).

Run alone, or as ``accelerate launch -m fusion_diff.cli embed ...`` on N processes/GPUs: each process
embeds its own chunks and the main one lists them (``fusion_diff.embedding.job``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion_diff.cli.arguments import finite_float, non_negative_int, positive_int
from fusion_diff.errors import ConfigError, DataError, MissingFileError
from fusion_diff.utils.image_sources import folder_images, is_tar_source, tar_images

if TYPE_CHECKING:  # torch, open_clip, transformers: imported only when a command runs
    import torch

    from fusion_diff.embedding import JointEmbedder, TextTokens


# The names of fusion_diff.embedding.factory.BACKENDS (spelt out: building the parser must not import torch).
EMBEDDER_BACKENDS = ("openclip", "vlm", "world")


def add_embedder_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags that pick an embedder; shared by every command that embeds."""
    group = parser.add_argument_group("embedder")
    group.add_argument(
        "--embedder",
        choices=EMBEDDER_BACKENDS,
        default=None,
        help="joint embedding backend (default: openclip with --model, else world: the shapes world's backbone)",
    )
    group.add_argument(
        "--model",
        required=required,
        help="open_clip architecture (e.g. ViT-L-14, a config in fusion_diff/embedding/model_configs, hf-hub:org/repo) "
        "or, for --embedder vlm, a Hugging Face id or save_pretrained folder",
    )
    group.add_argument(
        "--pretrained", default=None, help="open_clip pretrained tag or local checkpoint file (openclip only)"
    )
    group.add_argument(
        "--fusion-weight", type=finite_float, default=0.5, help="a in f(I,T) = normalize(a f(I) + (1-a) f(T)) (openclip)"
    )
    group.add_argument("--instruction", default=None, help="VLM prompt instruction; {modality} is filled in (vlm only)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    group.add_argument(
        "--precision", default=None, help="weights precision: fp32|fp16|bf16 (openclip), float32|bfloat16|float16 (vlm)"
    )


def embedder_from_args(args: argparse.Namespace) -> JointEmbedder:
    """Build the embedder named by ``add_embedder_args`` flags."""
    from fusion_diff.embedding.factory import create_embedder

    return create_embedder(embedder_spec(args))


def embedder_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The ``create_embedder`` spec of ``add_embedder_args`` flags (what a saved retriever records).

    Without ``--model`` it is the shapes world's cached backbone (``--embedder world``; the old spelling
    ``--model world`` still works, with a note).
    """
    if args.model == "world":
        print("note: --model world is now spelt --embedder world; the old spelling will go.", file=sys.stderr)
    backend = args.embedder or ("world" if args.model in (None, "world") else "openclip")
    if backend == "world":
        if args.model not in (None, "world"):
            raise ConfigError(
                f"--embedder world is the shapes world's own backbone; it takes no --model ({args.model})."
            )
        return {"backend": "world", "train_if_missing": False, "fusion_weight": args.fusion_weight}
    if not args.model:
        raise ConfigError(f"--embedder {backend} needs --model (an open_clip architecture or a model id / folder).")
    spec: dict[str, Any] = {"backend": backend, "device": args.device}
    if backend == "openclip":
        spec.update(model_name=args.model, pretrained=args.pretrained, fusion_weight=args.fusion_weight)
        if args.precision:
            spec["precision"] = args.precision
    else:
        spec["model_id_or_path"] = args.model
        if args.instruction:
            spec["instruction"] = args.instruction
        if args.precision:
            spec["dtype"] = args.precision
    return spec


def read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """JSON lines with the given keys; errors name the file and line."""
    if not path.is_file():
        raise MissingFileError(f"Input file not found: {path}.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number} is not valid JSON ({err}).") from err
        missing = [key for key in keys if key not in record]
        if missing:
            raise DataError(f"{path}:{number} lacks {missing}; each line needs {list(keys)}.")
        records.append(record)
    return records


def unique_ids(records: list[dict[str, Any]], source: Path) -> list[str]:
    """The records' ids as strings; a repeated id would silently keep one record only, so it is refused."""
    ids = [str(r["id"]) for r in records]
    repeated = sorted(item for item, n in Counter(ids).items() if n > 1)
    if repeated:
        raise DataError(f"{source}: ids repeat ({len(repeated)}, e.g. {repeated[:3]}); every line needs its own id.")
    return ids


def _image_inputs(name: str) -> tuple[list[str], list[Any]]:
    """(ids, images) from a folder (``folder_images``: id = path relative to it, without suffix unless two files
    differ only in suffix), tar shards (id = sample key) or a JSONL of {"id", "image"}."""
    if is_tar_source(name):
        return tar_images(name)
    source = Path(name)
    if source.is_dir():
        return folder_images(source)
    records = read_jsonl(source, ("id", "image"))
    return unique_ids(records, source), [source.parent / r["image"] for r in records]


def _text_inputs(source: Path) -> tuple[list[str], list[str]]:
    """(ids, texts) from JSONL {"id", "text"} or a plain text file (id = 0-based line number)."""
    if source.suffix == ".jsonl":
        records = read_jsonl(source, ("id", "text"))
        return unique_ids(records, source), [r["text"] for r in records]
    if not source.is_file():
        raise MissingFileError(f"Text file not found: {source}.")
    lines = source.read_text(encoding="utf-8").splitlines()
    return [str(i) for i in range(len(lines))], lines


def run(args: argparse.Namespace) -> int:
    from fusion_diff.embedding.job import embed_sharded
    from fusion_diff.utils.sharding import Processes

    processes = Processes.current()
    args.device = processes.device(args.device)
    embedder = embedder_from_args(args)
    if args.kind == "images":
        ids, items = _image_inputs(args.images)
        kind = "image"

        def embed_batch(batch: list[Any]) -> torch.Tensor:
            return embedder.embed_images(batch, batch_size=len(batch))

    elif args.kind == "texts":
        ids, items = _text_inputs(Path(args.texts))
        kind = "text"
        tokens = {"max_text_tokens": args.max_text_tokens} if args.max_text_tokens else {}

        def embed_batch(batch: list[Any]) -> torch.Tensor | TextTokens:
            if tokens:
                return embedder.encode_text_tokens(batch, args.max_text_tokens, batch_size=len(batch))
            return embedder.embed_texts(batch, batch_size=len(batch))

    else:
        source = Path(args.pairs)
        records = read_jsonl(source, ("id", "image", "text"))
        ids, items = unique_ids(records, source), [(source.parent / r["image"], r["text"]) for r in records]
        kind = "fused"

        def embed_batch(batch: list[Any]) -> torch.Tensor:
            return embedder.embed_pairs([i for i, _ in batch], [t for _, t in batch], batch_size=len(batch))

    identity = {**embedder.identity.as_dict(), "kind": kind, **(tokens if args.kind == "texts" else {})}
    cache, new = embed_sharded(
        args.out, identity, ids, items, embed_batch, args.chunk_size, args.batch_size, args.num_workers, processes
    )
    if processes.is_main:
        print(
            f"{args.out}: {len(cache)} {kind} embeddings ({new} new, dim {cache.dim}) by "
            f"{embedder.identity.describe()} in {processes.world_size} process(es)"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed images, texts or (image, text) pairs into an embedding cache",
        description="Embed inputs into an embedding cache (safetensors shards + manifest). Re-running the same "
        "command resumes: only ids not yet in the cache are computed. A cache made by another embedder is refused.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    specs = {
        "images": (
            "--images",
            (
                "folder of images (id = relative path without suffix; files that differ only in suffix keep it), webdataset tar shards (a .tar path, glob, "
                '{000..099} range or fsspec URL; id = sample key) or JSONL of {"id", "image"}'
            ),
        ),
        "texts": ("--texts", 'JSONL of {"id", "text"} or a text file with one text per line (id = line number)'),
        "pairs": ("--pairs", 'JSONL of {"id", "image", "text"}: fused f(I, T) embeddings'),
    }
    for kind, (flag, help_text) in specs.items():
        sub = kinds.add_parser(kind, help=f"embed {kind}", description=f"Embed {kind} into an embedding cache.")
        sub.add_argument(flag, required=True, help=help_text)
        sub.add_argument("--out", required=True, help="cache folder (created, or resumed if it exists)")
        sub.add_argument("--batch-size", type=positive_int, default=64, help="model batch size")
        sub.add_argument(
            "--chunk-size", type=positive_int, default=4096, help="items per cache shard (the unit of resumption and of sharding)"
        )
        sub.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers decoding images")
        if kind == "texts":
            sub.add_argument(
                "--max-text-tokens",
                type=non_negative_int,
                default=0,
                help="0: one pooled vector per text; N: the text tower's token states, up to N tokens, with their "
                "mask (the token-level text condition)",
            )
        add_embedder_args(sub)
        sub.set_defaults(func=run)
