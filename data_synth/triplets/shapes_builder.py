"""The shapes-world triplet set: ``(I_ref, T_ref, instruction, I_tgt, T_tgt)`` from scene-graph edits.

Reference and target are both training scenes (never ``Scene.is_heldout()``), so no benchmark scene
reaches training; instructions use the training phrasings of ``instructions.py`` only. Every item is
generated from its own seed (dataset seed, item index), which makes the set deterministic under a
seed whatever the number of workers, and lets a build resume shard by shard.

With ``open_probability`` > 0 a share of the items carries an *open* instruction ("give the circle
another colour", ``open_edits.py``) whose target is one of its right answers, drawn at random: stage 2
then sees that such an instruction has a distribution of targets, as the open-edit benchmark scores.

``near_misses_of(record, n)`` gives, for one triplet, ``n`` training scenes that miss its edit narrowly (the
benchmark's kinds of hard negative: the right edit on another object, another value, another edit): the
explicit negatives that stage 2's contrastive term can read (``embed_triplets(..., near_misses=n)``).
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from data_synth.shapes.benchmark import hard_negatives
from data_synth.shapes.captions import caption_scene
from data_synth.shapes.edits import ALL_KINDS, COMPOSITE_PROBABILITY, apply_edit, edit_from_dict, sample_edit
from data_synth.shapes.instructions import describe_edit, describe_open_edit
from data_synth.shapes.open_edits import OPEN_KINDS, open_edit_from_dict, sample_open_edit, satisfies
from data_synth.shapes.render import render
from data_synth.shapes.scene import MAX_OBJECTS, Scene, sample_scene_in_split
from data_synth.triplets.format import (
    RECORD,
    REFERENCE_IMAGE,
    TARGET_IMAGE,
    Sample,
    ShardResult,
    build_dataset,
    encode_png,
    encode_record,
)
from fusion_diff.errors import ConfigError, DataError
from fusion_diff.utils.io import drop_when_off

GENERATOR = "data_synth.triplets.shapes_builder"
GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class ShapesTripletConfig:
    """What a shapes triplet set is made of; stored in its manifest."""

    image_size: int = 64
    kinds: tuple[str, ...] = ALL_KINDS
    allow_composite: bool = True
    composite_probability: float = COMPOSITE_PROBABILITY
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    open_probability: float = 0.0  # share of items with an open instruction (target: one right answer)
    negated_removals: bool = False  # removals may also be worded as negations ("no more red stars")

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(ALL_KINDS)
        if unknown or not self.kinds:
            raise ConfigError(f"edit kinds {sorted(unknown) or '[]'} are not valid; choose from {', '.join(ALL_KINDS)}.")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ConfigError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {self.min_objects}, {self.max_objects}.")
        if self.image_size < 8:
            raise ConfigError(f"image_size must be at least 8 pixels, got {self.image_size}.")
        if not 0.0 <= self.open_probability <= 1.0:
            raise ConfigError(f"open_probability must be in [0, 1], got {self.open_probability}.")

    def to_dict(self) -> dict[str, Any]:
        data = drop_when_off(asdict(self), {"open_probability": 0.0, "negated_removals": False})  # older sets stay valid
        data["kinds"] = list(self.kinds)
        return data


def item_rng(seed: int, index: int) -> random.Random:
    """The item's own generator: a function of (seed, index) only."""
    return random.Random(f"shapes-triplet/{seed}/{index}")


def make_triplet_record(seed: int, index: int, config: ShapesTripletConfig) -> tuple[dict[str, Any], Scene, Scene]:
    """(record, reference scene, target scene) of item ``index``; both scenes are training scenes."""
    rng = item_rng(seed, index)
    is_open = config.open_probability > 0 and rng.random() < config.open_probability  # no draw when off: old sets stay
    while True:
        reference = sample_scene_in_split(rng, heldout=False, min_objects=config.min_objects, max_objects=config.max_objects)
        if is_open:
            composite = config.allow_composite and rng.random() < config.composite_probability
            open_edit = sample_open_edit(reference, rng, OPEN_KINDS, config.kinds if composite else None)
            right = [] if open_edit is None else open_edit.realisations(reference)
            right = [e for e in right if not apply_edit(reference, e).is_heldout()]
            if not right:
                continue
            edit = rng.choice(right)
        else:
            edit = sample_edit(reference, rng, config.kinds, config.allow_composite, config.composite_probability)
            if edit is None:
                continue
        target = apply_edit(reference, edit)
        if not target.is_heldout():
            break
    record = {
        "id": f"{index:09d}",
        "source": "shapes",
        "reference_caption": caption_scene(reference, rng),
        "instruction": describe_open_edit(reference, open_edit, rng) if is_open else describe_edit(reference, edit, rng, config.negated_removals),
        "target_caption": caption_scene(target, rng),
        "edit": edit.to_dict(),  # an open instruction: the right answer this target realises
        "edit_label": open_edit.kind if is_open else edit.kind,  # "recolour", "composite:recolour+move", "recolour_any"
        "reference_scene": reference.to_dict(),
        "target_scene": target.to_dict(),
        "render_seeds": [rng.getrandbits(63), rng.getrandbits(63)],
    }
    if is_open:
        record["open_edit"] = open_edit.to_dict()
    return record, reference, target


@dataclass(frozen=True)
class NearMiss:
    """A training scene that narrowly misses a triplet's edit, with what the embedding job needs to show it."""

    scene: Scene
    why: str  # as the benchmark names it: wrong_object, wrong_value, wrong_edit (or a neighbour / random filler)
    caption: str  # its annotation caption (used only when no captioner captions the image)
    render_seed: int

    def render(self, image_size: int) -> Image.Image:
        return render(self.scene, image_size, self.render_seed)


def near_misses_of(record: dict[str, Any], n: int) -> list[NearMiss]:
    """``n`` distinct training scenes that narrowly miss the triplet's edit of its reference (never the target,
    nor another right answer of an open instruction); a function of the record alone, so a resumed job renders
    the same images."""
    if "reference_scene" not in record or "edit" not in record:
        raise DataError(
            f"triplet {record.get('id')} has no scene graph (reference_scene, edit): near misses are made from the "
            "shapes world's edits only. Leave near_misses at 0 for this triplet set."
        )
    reference, target = Scene.from_dict(record["reference_scene"]), Scene.from_dict(record["target_scene"])
    rng = random.Random(f"shapes-near-miss/{record['id']}/{record['render_seeds'][0]}")
    is_right = None
    if "open_edit" in record:
        is_right = functools.partial(satisfies, reference, open_edit_from_dict(record["open_edit"]))
    misses = hard_negatives(reference, edit_from_dict(record["edit"]), target, rng, n, is_right, heldout=False)
    return [NearMiss(scene, why, caption_scene(scene, rng), rng.getrandbits(63)) for scene, why in misses]


def make_shapes_shard(items: range, seed: int, config: ShapesTripletConfig) -> ShardResult:
    """All samples of one shard (picklable via functools.partial for worker processes)."""
    samples = []
    for index in items:
        record, reference, target = make_triplet_record(seed, index, config)
        ref_seed, tgt_seed = record["render_seeds"]
        files = {
            RECORD: encode_record(record),
            REFERENCE_IMAGE: encode_png(render(reference, config.image_size, ref_seed)),
            TARGET_IMAGE: encode_png(render(target, config.image_size, tgt_seed)),
        }
        samples.append(Sample(record["id"], files, record["edit_label"]))
    return ShardResult(samples)


def build_shapes_triplets(
    out_dir: str | os.PathLike,
    num_samples: int,
    seed: int = 0,
    config: ShapesTripletConfig | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or resume) a shapes triplet set in ``out_dir``; returns its manifest."""
    if num_samples < 1 or shard_size < 1:
        raise ConfigError(f"--n and --shard-size must be positive, got {num_samples} and {shard_size}.")
    config = config or ShapesTripletConfig()
    return build_dataset(
        out_dir,
        functools.partial(make_shapes_shard, seed=seed, config=config),
        num_samples=num_samples,
        shard_size=shard_size,
        generator=GENERATOR,
        generator_version=GENERATOR_VERSION,
        seed=seed,
        config=config.to_dict(),
        source="shapes-world",
        workers=workers,
        overwrite=overwrite,
        progress=progress,
    )
