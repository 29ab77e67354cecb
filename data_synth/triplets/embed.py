"""Precompute the embeddings stage-2 training reads, so that training never touches an image.

``embed_triplets(triplet_dir, embedder, out_dir)`` writes four :class:`EmbeddingCache` folders that
share the triplet ids::

    reference_fused/    f(I_ref, T_ref)   the Control-Adapter's control signal
    reference_image/    f(I_ref)          the control when no reference caption is used
    instruction_text/   f(instruction)    the prior's text condition
    target_fused/       f(I_tgt, T_tgt)   the denoising target z0
    instruction_tokens/ the instruction's token states and mask (only with ``max_text_tokens``: the
                        token-level text condition)
    near_miss_fused/    f(I, T) of ``near_misses`` scenes per triplet that narrowly miss its edit, rows
                        ``<id>#<j>`` (only with ``near_misses``, shapes-world triplets: stage 2's explicit negatives)

With a ``captioner``, the two fused caches use the captioner's captions instead of the triplets' own
(``T_ref``, ``T_tgt``): at test time references and gallery items are captioned, never annotated, so
training on captioned embeddings teaches the adapter what it will actually see (how far to trust the
caption inside the control, and where a captioned gallery item lies).

Each cache's identity is the embedder's identity plus the embedding kind, the triplet set it was
made from and the caption source, so a cache of another backbone, triplet set or captioner is
refused, not mixed. The job walks the dataset shard by shard and embeds only the ids a cache lacks:
an interrupted run resumes. Under ``accelerate launch`` each process takes its own triplet shards and
writes cache shards numbered after them; the main process lists and compacts them at the end
(``fusion_diff.utils.sharding``), so the caches do not depend on the number of processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from data_synth.triplets.format import SHARD_DIR, decode, load_manifest, read_shard
from data_synth.triplets.shapes_builder import near_misses_of
from fusion_diff.captioning.base import Captioner
from fusion_diff.captioning.modes import embed_in_mode
from fusion_diff.embedding.base import JointEmbedder, TextTokens
from fusion_diff.embedding.cache import EmbeddingCache
from fusion_diff.errors import DataError
from fusion_diff.training.data import NEAR_MISS_CACHE, near_miss_ids
from fusion_diff.utils.io import artifact_manifest, write_json_atomic
from fusion_diff.utils.sharding import Processes

CACHE_KINDS = {
    "reference_fused": "fused",
    "reference_image": "image",
    "instruction_text": "text",
    "target_fused": "fused",
}
TOKEN_CACHE = "instruction_tokens"


def triplet_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies the triplet set inside each cache's identity."""
    return {k: manifest.get(k) for k in ("generator", "generator_version", "seed", "num_samples")}


def caption_source(captioner: Captioner | None) -> dict[str, Any] | str:
    """What the fused caches' captions came from: ``"annotation"`` or the captioner's identity."""
    return "annotation" if captioner is None else captioner.identity


def open_triplet_caches(
    out_dir: str | os.PathLike,
    embedder: JointEmbedder,
    triplets: dict[str, Any],
    captioner: Captioner | None = None,
    max_text_tokens: int | None = None,
    near_misses: int = 0,
    **open_options: Any,
) -> dict[str, EmbeddingCache]:
    """The four caches for ``embedder`` (plus the instructions' token states with ``max_text_tokens``, the near
    misses' fused embeddings with ``near_misses``); CacheMismatchError if one was made by another backbone, set,
    captioner, token length or number of near misses.

    ``open_options`` go to ``EmbeddingCache.open`` (``repair``, ``expect_unlisted``).
    """
    base = embedder.identity.as_dict()

    def identity(name: str, kind: str) -> dict[str, Any]:
        captions = {"captions": caption_source(captioner)} if kind == "fused" else {}
        tokens = {"max_text_tokens": max_text_tokens} if name == TOKEN_CACHE else {}
        misses = {"near_misses": near_misses} if name == NEAR_MISS_CACHE else {}
        return {**base, "kind": kind, "role": name, "triplets": triplets, **captions, **tokens, **misses}

    kinds = {**CACHE_KINDS, **({TOKEN_CACHE: "text"} if max_text_tokens else {})}
    kinds.update({NEAR_MISS_CACHE: "fused"} if near_misses else {})
    return {
        name: EmbeddingCache.open(Path(out_dir) / name, identity(name, kind), **open_options)
        for name, kind in kinds.items()
    }


def embed_triplets(
    triplet_dir: str | os.PathLike,
    embedder: JointEmbedder,
    out_dir: str | os.PathLike,
    batch_size: int = 256,
    progress: bool = True,
    captioner: Captioner | None = None,
    processes: Processes | None = None,
    max_text_tokens: int | None = None,
    near_misses: int = 0,
) -> dict[str, EmbeddingCache]:
    """Embed every triplet of ``triplet_dir`` into the four caches under ``out_dir`` (resumable, sharded by process).

    ``captioner``: caption references and targets with it for the fused caches (see the module docstring).
    ``max_text_tokens``: also the instructions' token states (``instruction_tokens/``), for a token-level prior.
    ``near_misses``: also that many rendered near misses per triplet (``near_miss_fused/``, captioned like the
    targets), for stage 2's contrastive term (``data.near_misses``).
    """
    triplet_dir = Path(triplet_dir)
    manifest = load_manifest(triplet_dir)
    triplets = triplet_identity(manifest)
    processes = processes or Processes.current()
    with processes.exclusive(out_dir, "triplet embedding job"):
        with processes.main_first():  # the main process repairs and lists what a crashed run left first
            caches = open_triplet_caches(
                out_dir, embedder, triplets, captioner, max_text_tokens, near_misses, repair=True
            )
        base = {name: cache.next_shard_number() for name, cache in caches.items()}
        processes.wait()  # nobody writes a shard before every process has read the folders
        units = processes.take(range(len(manifest["shards"])))
        mine = sum(int(manifest["shards"][k]["count"]) for k in units)
        desc = "embed triplets" + (f" ({processes.describe()})" if processes.world_size > 1 else "")
        with tqdm(total=mine, unit="triplet", desc=desc, disable=not progress) as bar:
            for k in units:
                shard = manifest["shards"][k]
                path = triplet_dir / SHARD_DIR / shard["name"]
                samples = list(read_shard(path, shard["sha256"]))
                ids = [sample.key for sample in samples]
                todo = {name: _missing(cache, name, ids, near_misses) for name, cache in caches.items()}
                wanted = [s for s in samples if any(s.key in missing for missing in todo.values())]
                if wanted:
                    numbers = {name: base[name] + k for name in caches}
                    chunk = [decode(s) for s in wanted]
                    _embed_chunk(
                        embedder, caches, numbers, todo, chunk, batch_size, path, captioner, max_text_tokens,
                        near_misses,
                    )  # fmt: skip
                bar.update(len(samples))
        processes.wait()
        if processes.is_main:
            caches = open_triplet_caches(
                out_dir, embedder, triplets, captioner, max_text_tokens, near_misses, expect_unlisted=True
            )
            for cache in caches.values():
                cache.compact()  # one shard per cache: training memory-maps it without a copy
            write_json_atomic(
                Path(out_dir) / "manifest.json",
                artifact_manifest(
                    "triplet_embeddings",
                    triplets=str(triplet_dir),
                    triplet_set=triplets,
                    embedder=embedder.identity.as_dict(),
                    captions=caption_source(captioner),
                    caches={name: len(cache) for name, cache in caches.items()},
                ),
            )
        processes.wait()
        return open_triplet_caches(out_dir, embedder, triplets, captioner, max_text_tokens, near_misses)


def _missing(cache: EmbeddingCache, name: str, ids: list[str], near_misses: int) -> set[str]:
    """The triplet ids whose rows ``cache`` lacks (a triplet's near misses are written together, in one shard)."""
    if name != NEAR_MISS_CACHE:
        return set(cache.missing(ids))
    return {row.rpartition("#")[0] for row in cache.missing(near_miss_ids(ids, near_misses))}


def _embed_chunk(
    embedder,
    caches,
    numbers,
    todo,
    triplets,
    batch_size: int,
    shard: Path,
    captioner: Captioner | None,
    max_text_tokens: int | None = None,
    near_misses: int = 0,
) -> None:
    """Embed one shard's triplets into the caches that lack them (each cache gets its own subset), as cache
    shards ``numbers[name]``."""
    if any(t.reference_image is None or t.target_image is None for t in triplets):
        raise DataError(
            f"triplets in {shard} have no images (a caption-only corpus set); realise them first with "
            "`fusion-diff synth realise`, then embed the realised set."
        )

    def rows(name: str) -> list[int]:
        return [i for i, t in enumerate(triplets) if t.id in todo[name]]

    def images(which: str, idx: list[int]) -> torch.Tensor:
        return embedder.embed_images([getattr(triplets[i], which) for i in idx], batch_size=batch_size)

    def texts(which: str, idx: list[int]) -> torch.Tensor:
        return embedder.embed_texts([getattr(triplets[i], which) for i in idx], batch_size=batch_size)

    def fused_of(
        ids: list[str], pictures: list, captions: list[str], role: str, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """f(I, T): T the captioner's caption of I (as at test time), else the given caption."""
        if captioner is not None:
            return embed_in_mode(
                embedder, "fused", ids, pictures, captioner, image_embeds=image_embeds, batch_size=batch_size, role=role
            ).embeddings
        if embedder.supports_late_fusion:
            if image_embeds is None:
                image_embeds = embedder.embed_images(pictures, batch_size=batch_size)
            return embedder.fuse(image_embeds, embedder.embed_texts(captions, batch_size=batch_size))
        return embedder.embed_pairs(pictures, captions, batch_size=batch_size)

    def fused(image: str, text: str, idx: list[int], image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        ids = [f"{triplets[i].id}/{image}" for i in idx]
        pictures = [getattr(triplets[i], image) for i in idx]
        return fused_of(ids, pictures, [getattr(triplets[i], text) for i in idx], image, image_embeds)

    def near_miss_fused(idx: list[int]) -> torch.Tensor:
        size = triplets[idx[0]].reference_image.size[0]  # type: ignore[union-attr]
        misses = [m for i in idx for m in near_misses_of(triplets[i].record, near_misses)]
        ids = near_miss_ids([triplets[i].id for i in idx], near_misses)
        return fused_of(ids, [m.render(size) for m in misses], [m.caption for m in misses], "near miss")

    ref_image_rows, ref_fused_rows = rows("reference_image"), rows("reference_fused")
    ref_union = sorted(set(ref_image_rows) | set(ref_fused_rows))
    ref_image_embeds = images("reference_image", ref_union) if ref_union else None
    where = {row: k for k, row in enumerate(ref_union)}

    def ref_subset(idx: list[int]) -> torch.Tensor:
        return ref_image_embeds[[where[i] for i in idx]]  # type: ignore[index]

    outputs = {
        "reference_image": lambda idx: ref_subset(idx),
        "instruction_text": lambda idx: texts("instruction", idx),
        "reference_fused": lambda idx: fused("reference_image", "reference_caption", idx, ref_subset(idx)),
        "target_fused": lambda idx: fused("target_image", "target_caption", idx),
        TOKEN_CACHE: lambda idx: embedder.encode_text_tokens(
            [triplets[i].instruction for i in idx], max_text_tokens, batch_size=batch_size
        ),
        NEAR_MISS_CACHE: near_miss_fused,
    }
    for name in caches:
        idx = rows(name)
        if idx:
            out = outputs[name](idx)
            parts = (out.states, out.mask) if isinstance(out, TextTokens) else (out,)
            ids = [triplets[i].id for i in idx]
            row_ids = near_miss_ids(ids, near_misses) if name == NEAR_MISS_CACHE else ids
            caches[name].write_shard(numbers[name], row_ids, *parts)
