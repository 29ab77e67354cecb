"""Image-caption pair sets of the shapes world (stage-1 training data and the retrieval captioner's bank).

Layout of a pair set folder::

    images/0000/pair-0000000.png ...   rendered training scenes (never held-out ones)
    parts/part-00000.jsonl ...         one finished chunk each (written after its images: resume unit)
    pairs.jsonl                        {"id", "image", "caption", "canonical_caption", "scene", "subject", "attributes"}
    manifest.json                      written last: its presence means the set is complete

Record ``i`` depends only on (seed, i), so a set is deterministic for any number of workers and an
interrupted build resumes chunk by chunk to the same bytes.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_synth.shapes.captions import canonical_caption, caption_scene, subject_attribute_split
from data_synth.shapes.render import render, run_render_jobs, world_fingerprint
from data_synth.shapes.scene import Scene, sample_scene_in_split
from fusion_diff.embedding.base import JointEmbedder
from fusion_diff.embedding.cache import EmbeddingCache, embed_with_cache
from fusion_diff.errors import CacheMismatchError, DataError, MissingFileError
from fusion_diff.utils.checks import require_counts
from fusion_diff.utils.io import artifact_manifest, atomic_path, build_cached_folder, read_json, write_json_atomic

PAIRS_FILE = "pairs.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_KIND = "shapes_pair_set"
CHUNK = 1000  # default records per resume unit and per image folder


@dataclass(frozen=True)
class PairSetConfig:
    n: int
    seed: int = 0
    image_size: int = 64
    chunk_size: int = CHUNK
    world: str = field(default_factory=world_fingerprint)  # what the world looked like (not a setting)

    def __post_init__(self) -> None:
        require_counts("pair set", n=self.n, image_size=self.image_size, chunk_size=self.chunk_size)


@dataclass(frozen=True)
class PairRecord:
    """One pair; ``image`` is an absolute path (the jsonl stores it relative to the set's folder)."""

    id: str
    image: Path
    caption: str
    canonical_caption: str
    scene: Scene
    subject: str
    attributes: str


def pair_id(index: int) -> str:
    return f"pair-{index:07d}"


def _make_record(config: PairSetConfig, index: int) -> tuple[dict[str, Any], Any]:
    """The jsonl row and the PIL image of record ``index`` (a pure function of seed and index)."""
    rng = random.Random(f"{config.seed}:pair:{index}")
    scene = sample_scene_in_split(rng, heldout=False)
    caption = caption_scene(scene, rng)
    image = render(scene, config.image_size, rng)
    subject, attributes = subject_attribute_split(scene)
    row = {
        "id": pair_id(index),
        "image": f"images/{index // config.chunk_size:04d}/{pair_id(index)}.png",
        "caption": caption,
        "canonical_caption": canonical_caption(scene),
        "scene": scene.to_dict(),
        "subject": subject,
        "attributes": attributes,
    }
    return row, image


def _part_path(root: Path, chunk: int) -> Path:
    return root / "parts" / f"part-{chunk:05d}.jsonl"


def _write_chunk(job: tuple[str, PairSetConfig, int]) -> int:
    """Write one chunk's images, then its part file (atomically): the part marks the chunk done."""
    root, config, chunk = Path(job[0]), job[1], job[2]
    rows = []
    for index in range(chunk * config.chunk_size, min(config.n, (chunk + 1) * config.chunk_size)):
        row, image = _make_record(config, index)
        with atomic_path(root / row["image"]) as tmp:
            image.save(tmp, format="PNG")
        rows.append(json.dumps(row))
    with atomic_path(_part_path(root, chunk)) as tmp:
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(rows)


def write_pair_set(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    workers: int = 2,
    image_size: int = 64,
    chunk_size: int = CHUNK,
    progress: bool = True,
) -> Path:
    """Build (or finish building) a pair set of ``n`` training-split scenes in ``out_dir``.

    Finished chunks of an interrupted build are kept; a folder built with another config is refused.
    """
    root = Path(out_dir)
    config = PairSetConfig(n=n, seed=seed, image_size=image_size, chunk_size=chunk_size)
    n_chunks = (n + chunk_size - 1) // chunk_size
    settings = root / "parts" / "config.json"
    if (root / MANIFEST_FILE).is_file() or settings.is_file():
        stored = read_json(settings, "pair set config")
        if stored != asdict(config):
            raise CacheMismatchError(
                f"Pair set {root} was built with {stored}, not {asdict(config)}. Use another --out folder or delete {root}."
            )
        if (root / MANIFEST_FILE).is_file():
            return root
    write_json_atomic(settings, asdict(config))
    chunks = [c for c in range(n_chunks) if not _part_path(root, c).is_file()]
    jobs = [(str(root), config, c) for c in chunks]
    run_render_jobs(_write_chunk, jobs, workers, "rendering pair set (chunks)", progress)
    with atomic_path(root / PAIRS_FILE) as tmp, tmp.open("w", encoding="utf-8") as out:
        for chunk in range(n_chunks):
            out.write(_part_path(root, chunk).read_text(encoding="utf-8"))
    write_json_atomic(root / MANIFEST_FILE, artifact_manifest(MANIFEST_KIND, asdict(config), seed, count=n, split="train"))
    return root


def read_pair_set(pair_dir: str | os.PathLike) -> list[PairRecord]:
    """All records of a finished pair set, in id order."""
    root = Path(pair_dir)
    manifest = read_json(root / MANIFEST_FILE, "pair set manifest")
    if manifest.get("kind") != MANIFEST_KIND:
        raise DataError(f"{root / MANIFEST_FILE} is not a shapes pair-set manifest. Point to a folder made by write_pair_set.")
    path = root / PAIRS_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} is missing although {root} has a manifest. Delete {root} and rebuild the pair set.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            records.append(
                PairRecord(
                    id=row["id"],
                    image=root / row["image"],
                    caption=row["caption"],
                    canonical_caption=row["canonical_caption"],
                    scene=Scene.from_dict(row["scene"]),
                    subject=row["subject"],
                    attributes=row["attributes"],
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path} line {number} is not a pair record ({err}). Delete {root} and rebuild.") from err
    if len(records) != manifest.get("count"):
        raise DataError(f"{path} has {len(records)} records, its manifest says {manifest.get('count')}. Rebuild {root}.")
    return records


def embed_pair_set(
    pair_dir: str | os.PathLike,
    embedder: JointEmbedder,
    out_dir: str | os.PathLike,
    batch_size: int = 256,
    progress: bool = True,
    max_text_tokens: int | None = None,
) -> dict[str, EmbeddingCache]:
    """Embed a pair set into ``out_dir/{image,text,fused}`` EmbeddingCaches keyed by pair id (resumable).

    The fused cache is late fusion of the other two when the embedder supports it, else ``embed_pairs``.
    ``max_text_tokens``: also the captions' token states (``text_tokens/``), for a token-level prior.
    """
    records = read_pair_set(pair_dir)
    ids = [r.id for r in records]
    source = {"source": MANIFEST_KIND, "pair_set": read_json(Path(pair_dir) / MANIFEST_FILE)["config"]}
    base = embedder.identity.as_dict() | source
    out = Path(out_dir)
    caches = {kind: EmbeddingCache.open(out / kind, base | {"kind": kind}) for kind in ("image", "text", "fused")}
    images = embed_with_cache(caches["image"], ids, [r.image for r in records], embedder.embed_images, batch_size, progress)
    texts = embed_with_cache(caches["text"], ids, [r.caption for r in records], embedder.embed_texts, batch_size, progress)
    if embedder.supports_late_fusion:

        def fuse(rows: list[int]) -> torch.Tensor:
            return embedder.fuse(images[rows], texts[rows])

        embed_with_cache(caches["fused"], ids, list(range(len(ids))), fuse, batch_size, progress)
    else:
        pairs = [(r.image, r.caption) for r in records]
        embed_with_cache(caches["fused"], ids, pairs, lambda chunk: _embed_pairs(embedder, chunk), batch_size, progress)
    if max_text_tokens:
        tokens_identity = base | {"kind": "text", "max_text_tokens": max_text_tokens}
        caches["text_tokens"] = EmbeddingCache.open(out / "text_tokens", tokens_identity)
        captions = [r.caption for r in records]
        embed_with_cache(
            caches["text_tokens"],
            ids,
            captions,
            lambda chunk: embedder.encode_text_tokens(chunk, max_text_tokens, batch_size),
            batch_size,
            progress,
        )
    return caches


def _embed_pairs(embedder: JointEmbedder, pairs: Sequence[tuple[Path, str]]) -> torch.Tensor:
    return embedder.embed_pairs([p[0] for p in pairs], [p[1] for p in pairs])


def build_from_pair_set(
    pair_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str,
    config: dict[str, Any],
    seed: int,
    write: Callable[[list[PairRecord], Path], None],
) -> Path:
    """A model trained on a pair set, as a cached folder: ``write(records, folder)`` fills ``folder``.

    The folder's manifest names the pair set (its manifest) and ``config``: a folder made from the same
    pair set with the same config is reused, any other is replaced. ``write`` works in a temporary folder
    renamed into place, so an interrupted run leaves nothing half-written.
    """
    pairs_manifest = Path(pair_dir) / MANIFEST_FILE
    if not pairs_manifest.is_file():
        raise MissingFileError(
            f"{kind}: {pair_dir} is not a finished pair set ({MANIFEST_FILE} missing). "
            "Write one with `fusion-diff world pairs --out DIR`."
        )
    pair_set = {k: v for k, v in read_json(pairs_manifest, "pair set manifest").items() if k != "created"}

    def fill(folder: Path) -> dict[str, Any]:
        records = read_pair_set(pair_dir)
        write(records, folder)
        return {"pairs": len(records)}

    return build_cached_folder(out_dir, kind, {**config, "pair_set": pair_set}, seed, fill)
