"""Realise caption-edit triplets as images with diffusers, and keep only the edits that worked.

For each ``(T_ref, instruction, T_tgt)`` of a corpus triplet set: the reference image is the
corpus's own image when it has one, otherwise a text-to-image pipeline draws ``T_ref``; an
instruction-editing pipeline (InstructPix2Pix class) applies ``instruction`` to it. A CLIP filter
then drops failed edits, as InstructPix2Pix's own data pipeline does: the *directional similarity*
``cos(E(I_tgt) - E(I_ref), E(T_tgt) - E(T_ref))`` must reach a threshold (the image moved the way
the captions did), and the two images must stay similar (an edit, not a new picture). Drops are
counted in the manifest. Every model is a setting: any diffusers pipeline id or path, and any
``create_embedder`` spec for the filter.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from data_synth.triplets.format import (
    RECORD,
    REFERENCE_IMAGE,
    SHARD_DIR,
    TARGET_IMAGE,
    Sample,
    ShardResult,
    build_dataset,
    encode_png,
    encode_record,
    load_manifest,
    read_shard,
)
from fusion_diff.errors import ConfigError
from fusion_diff.utils.sharding import Processes

if TYPE_CHECKING:  # torch is imported where it runs: `fusion-diff synth --help` reads RealiseConfig's defaults
    import torch

GENERATOR = "data_synth.triplets.realise"
GENERATOR_VERSION = "1"
# 512 px like InstructPix2Pix (an SD 1.5 fine-tune); the hub ids checked, and when, are in the README.
DEFAULT_TEXT_TO_IMAGE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class RealiseConfig:
    """Models and thresholds of the realisation; stored in the manifest."""

    text_to_image_model: str = DEFAULT_TEXT_TO_IMAGE
    edit_model: str = "timbrooks/instruct-pix2pix"
    filter_embedder: dict[str, Any] = field(
        default_factory=lambda: {"backend": "openclip", "model_name": "ViT-L-14", "pretrained": "openai"}
    )
    image_size: int = 512
    text_to_image_steps: int = 30
    text_to_image_guidance: float = 7.5
    edit_steps: int = 20
    edit_guidance: float = 7.5
    image_guidance: float = 1.5
    min_directional_similarity: float = 0.2
    min_image_similarity: float = 0.75
    batch_size: int = 8
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # default: float16 on cuda, float32 on cpu

    def __post_init__(self) -> None:
        if self.image_size % 8:
            raise ConfigError(f"image_size must be a multiple of 8 (latent diffusion), got {self.image_size}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}.")

    def runtime(self) -> tuple[str, torch.dtype]:
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        name = self.dtype or ("float16" if device.startswith("cuda") else "float32")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ConfigError(f"unknown dtype {name!r}; use float32, float16 or bfloat16.")
        return device, getattr(torch, name)


@functools.lru_cache(maxsize=4)
def _pipeline(model_id: str, device: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_id, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=2)
def _filter_embedder(spec_json: str):
    from fusion_diff.embedding.factory import create_embedder

    return create_embedder(json.loads(spec_json))


def clip_scores(embedder, ref_images, tgt_images, ref_captions, tgt_captions) -> tuple[torch.Tensor, torch.Tensor]:
    """(directional similarity, image-image similarity) per triplet, from one joint embedder."""
    import torch

    images = embedder.embed_images(list(ref_images) + list(tgt_images))
    texts = embedder.embed_texts(list(ref_captions) + list(tgt_captions))
    n = len(ref_images)
    image_delta, text_delta = images[n:] - images[:n], texts[n:] - texts[:n]
    directional = torch.nn.functional.cosine_similarity(image_delta, text_delta, dim=-1)
    return directional, (images[:n] * images[n:]).sum(-1)


def _generators(device: str, seed: int, indices: list[int]) -> list[torch.Generator]:
    import torch

    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for i in indices]


def realise_batch(records: list[dict[str, Any]], indices: list[int], seed: int, config: RealiseConfig):
    """Images and CLIP scores for a batch of caption-edit records; deterministic under ``seed``."""
    from fusion_diff.embedding.images import load_image

    device, dtype = config.runtime()
    size = config.image_size
    references: list[Image.Image | None] = [
        load_image(r["reference_image_path"]).resize((size, size)) if r.get("reference_image_path") else None for r in records
    ]
    missing = [i for i, image in enumerate(references) if image is None]
    if missing:
        drawn = _pipeline(config.text_to_image_model, device, dtype)(
            prompt=[records[i]["reference_caption"] for i in missing],
            height=size,
            width=size,
            num_inference_steps=config.text_to_image_steps,
            guidance_scale=config.text_to_image_guidance,
            generator=_generators(device, seed, [indices[i] for i in missing]),
        ).images
        for i, image in zip(missing, drawn):
            references[i] = image
    targets = _pipeline(config.edit_model, device, dtype)(
        prompt=[r["instruction"] for r in records],
        image=references,
        num_inference_steps=config.edit_steps,
        guidance_scale=config.edit_guidance,
        image_guidance_scale=config.image_guidance,
        generator=_generators(device, seed + 1, indices),
    ).images
    from fusion_diff.embedding.factory import with_runtime

    spec = with_runtime(config.filter_embedder, device, str(dtype).removeprefix("torch."))  # the filter follows the job
    embedder = _filter_embedder(json.dumps(spec, sort_keys=True))
    directional, image_similarity = clip_scores(
        embedder, references, targets, [r["reference_caption"] for r in records], [r["target_caption"] for r in records]
    )
    return references, targets, directional.tolist(), image_similarity.tolist()


def make_realised_shard(shards: range, source: str, source_shards: list[dict[str, Any]], seed: int, config: RealiseConfig) -> ShardResult:
    """Output shard ``i`` realises source shard ``i`` (each "item" of this build is a source shard)."""
    samples: list[Sample] = []
    dropped = {"clip_directional_similarity": 0, "clip_image_similarity": 0}
    for shard_index in shards:
        shard = source_shards[shard_index]
        records = [json.loads(s.files[RECORD]) for s in read_shard(Path(source) / SHARD_DIR / shard["name"], shard["sha256"])]
        for start in range(0, len(records), config.batch_size):
            batch = records[start : start + config.batch_size]
            indices = [int(r["id"]) for r in batch]
            refs, tgts, directional, image_sim = realise_batch(batch, indices, seed, config)
            for record, ref, tgt, d, s in zip(batch, refs, tgts, directional, image_sim):
                if d < config.min_directional_similarity:
                    dropped["clip_directional_similarity"] += 1
                    continue
                if s < config.min_image_similarity:
                    dropped["clip_image_similarity"] += 1
                    continue
                record = {**record, "clip_directional_similarity": round(d, 6), "clip_image_similarity": round(s, 6)}
                files = {RECORD: encode_record(record), REFERENCE_IMAGE: encode_png(ref), TARGET_IMAGE: encode_png(tgt)}
                samples.append(Sample(record["id"], files, record["edit_label"]))
    return ShardResult(samples, dropped)


def realise_triplets(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: RealiseConfig | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    processes: Processes | None = None,
) -> dict[str, Any]:
    """Realise a caption-edit triplet set (``synth corpus`` output) into a triplet set with images.

    ``processes``: under ``accelerate launch``, each process (one per GPU) realises its own source shards.
    """
    config = config or RealiseConfig()
    source_dir = Path(source_dir).resolve()
    source = load_manifest(source_dir)
    shards = source["shards"]
    return build_dataset(
        out_dir,
        functools.partial(make_realised_shard, source=str(source_dir), source_shards=shards, seed=seed, config=config),
        num_samples=len(shards),
        shard_size=1,
        generator=GENERATOR,
        generator_version=GENERATOR_VERSION,
        seed=seed,
        config={
            **asdict(config),
            "source_generator": source.get("generator"),
            "source_shards_sha256": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
        },
        source=str(source_dir),
        workers=1,  # one process owns the accelerator
        overwrite=overwrite,
        progress=progress,
        unit="shard",
        processes=processes,
    )
