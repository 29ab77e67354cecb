"""The shapes-world CIR benchmark, written in the CIRR (rc2) file format so the CIRR evaluator runs on it.

Layout of ``--out DIR``::

    captions/cap.rc2.{val,test1}.json       CIRR queries; test1 keeps target_hard/target_soft (our own world)
    image_splits/split.rc2.{val,test1}.json  image name -> "./dev/<name>.png" | "./test1/<name>.png"
    dev/*.png, test1/*.png                   one image per distinct scene
    oracle/captions.{val,test1}.json         image name -> ground-truth caption (oracle rows only)
    captions_train_phrasing/cap.rc2.{val,test1}.json  the same queries in the training generator's phrasing
    meta/queries.{val,test1}.json            per query: edit kind(s), edit, scenes, why each negative is hard
    manifest.json                            written last

Every query is an edit of a held-out reference scene whose target is held out too (so is every other
image), worded with ``benchmark_phrasings`` (never the training templates). Each 6-image group holds the
reference, the target and four hard negatives: the right edit on the wrong object, the wrong value or the
wrong edit on the right object, only part of a two-edit composite; one-edit neighbours fill a group when
too few of those are held out (counted in the manifest).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from data_synth.shapes.benchmark_phrasings import BENCHMARK_KINDS, describe_edit_benchmark
from data_synth.shapes.captions import canonical_caption
from data_synth.shapes.edits import ATTRIBUTE_KINDS, AnyEdit, CompositeEdit, Edit, apply_edit, sample_edit
from data_synth.shapes.instructions import describe_edit
from data_synth.shapes.render import render, run_render_jobs, world_fingerprint
from data_synth.shapes.scene import COLOURS, SHAPES, SIZES, Scene, SceneObject, sample_scene, sample_scene_in_split
from fusion_diff.utils.checks import require_counts
from fusion_diff.utils.io import artifact_manifest, atomic_path, write_json_atomic

SPLITS: dict[str, str] = {"val": "dev", "test1": "test1"}  # CIRR split -> image folder and name prefix
GROUP_SIZE = 6
QUERY_KINDS: tuple[str, ...] = (*BENCHMARK_KINDS, "composite")
_ATTRIBUTE_VALUES = {"colour": tuple(COLOURS), "size": SIZES, "shape": SHAPES}
_MAX_TRIES = 400
FILLER_REASONS = ("neighbour", "random")  # group members that are not near misses of the edit itself
MIN_REFERENCE_OBJECTS = 2  # richer scenes: more near-miss negatives, and every edit kind applies


@dataclass(frozen=True)
class BenchmarkConfig:
    val_queries: int = 1000
    test_queries: int = 2000
    seed: int = 0
    image_size: int = 64
    world: str = field(default_factory=world_fingerprint)  # what the world looked like (not a setting)

    def __post_init__(self) -> None:
        require_counts(
            "shapes benchmark", val_queries=self.val_queries, test_queries=self.test_queries, image_size=self.image_size
        )


@dataclass(frozen=True)
class Query:
    """One benchmark query before naming: scenes, the edit and its two wordings."""

    reference: Scene
    edit: AnyEdit
    target: Scene
    negatives: tuple[tuple[Scene, str], ...]  # (scene, why it is a hard negative)
    caption: str
    train_phrasing: str


# --------------------------------------------------------------------------- hard negatives


def _with(obj: SceneObject, **changes: Any) -> SceneObject:
    return SceneObject(**{**asdict(obj), **changes})


def _wrong_object(scene: Scene, edit: Edit) -> Iterator[Edit]:
    """The same kind of change applied to another object (any value; ``add``: another cell)."""
    others = [o for o in scene.objects if o not in edit.objects]
    if edit.kind in ATTRIBUTE_KINDS:
        attr = ATTRIBUTE_KINDS[edit.kind]
        yield from (Edit(edit.kind, (o,), v) for o in others for v in _ATTRIBUTE_VALUES[attr] if v != getattr(o, attr))
    elif edit.kind == "move":
        yield from (Edit("move", (o,), cell) for o in others for cell in scene.free_cells())
    elif edit.kind == "remove":
        yield from (Edit("remove", (o,)) for o in others)
    elif edit.kind == "add":
        yield from (Edit("add", (), _with(edit.value, position=cell)) for cell in scene.free_cells() if cell != edit.value.position)


def _wrong_value(scene: Scene, edit: Edit) -> Iterator[Edit]:
    """Another value for the same object (or the same cell, for ``add``)."""
    if edit.kind in ("recolour", "replace_shape"):
        obj, attr = edit.objects[0], ATTRIBUTE_KINDS[edit.kind]
        yield from (Edit(edit.kind, (obj,), v) for v in _ATTRIBUTE_VALUES[attr] if v not in (edit.value, getattr(obj, attr)))
    elif edit.kind == "move":
        yield from (Edit("move", edit.objects, cell) for cell in scene.free_cells() if cell != edit.value)
    elif edit.kind == "add":
        new = edit.value
        yield from (Edit("add", (), _with(new, colour=c)) for c in COLOURS if c != new.colour)
        yield from (Edit("add", (), _with(new, shape=s)) for s in SHAPES if s != new.shape)


def _wrong_kind(scene: Scene, edit: Edit) -> Iterator[Edit]:
    """Another kind of edit on the same object (size has only two values, removal none)."""
    if not edit.objects:
        return
    obj = edit.objects[0]
    for kind, attr in ATTRIBUTE_KINDS.items():
        if kind != edit.kind:
            yield from (Edit(kind, (obj,), v) for v in _ATTRIBUTE_VALUES[attr] if v != getattr(obj, attr))
    if edit.kind != "remove" and len(scene.objects) > 1:
        yield Edit("remove", (obj,))


def _negative_edits(scene: Scene, edit: AnyEdit) -> list[tuple[AnyEdit, str]]:
    """Candidate near-miss edits of ``scene``, each with the reason it is a hard negative."""
    if isinstance(edit, CompositeEdit):
        middle = apply_edit(scene, edit.first)
        out: list[tuple[AnyEdit, str]] = [(edit.first, "partial_edit"), (edit.second, "partial_edit")]
        out += [(CompositeEdit(edit.first, e), f"second_{why}") for e, why in _negative_edits(middle, edit.second)]
        out += [(e, "first_edit_only_variant") for e, _ in _negative_edits(scene, edit.first)]
        return out
    return (
        [(e, "wrong_object") for e in _wrong_object(scene, edit)]
        + [(e, "wrong_value") for e in _wrong_value(scene, edit)]
        + [(e, "wrong_edit") for e in _wrong_kind(scene, edit)]
    )


def hard_negatives(
    reference: Scene,
    edit: AnyEdit,
    target: Scene,
    rng: random.Random,
    n: int = GROUP_SIZE - 2,
    is_right: Callable[[Scene], bool] | None = None,
    heldout: bool = True,
) -> list[tuple[Scene, str]]:
    """``n`` distinct scenes of the held-out (benchmark) or, with ``heldout=False``, the training split that miss
    ``edit`` narrowly, spread over the reasons; then one-edit neighbours of the reference or target
    ("neighbour"), then random scenes of the split ("random").

    ``is_right``: for an open instruction (``edit`` one of its realisations), the scenes that also answer it,
    never taken as negatives."""
    seen = {reference.key(), target.key()}

    def usable(scene: Scene) -> bool:
        return (
            scene.is_heldout() == heldout
            and scene.key() not in seen
            and not (is_right is not None and is_right(scene))
        )

    by_reason: dict[str, list[Scene]] = {}
    for candidate, why in _negative_edits(reference, edit):
        try:
            scene = apply_edit(reference, candidate)
        except ValueError:  # e.g. the second part of a composite does not fit the reference
            continue
        if usable(scene):
            seen.add(scene.key())
            by_reason.setdefault(why, []).append(scene)
    for scenes in by_reason.values():
        rng.shuffle(scenes)
    chosen: list[tuple[Scene, str]] = []
    reasons = sorted(by_reason)
    while len(chosen) < n and any(by_reason.values()):  # round-robin over reasons
        for why in reasons:
            if by_reason[why] and len(chosen) < n:
                chosen.append((by_reason[why].pop(), why))
    for _ in range(_MAX_TRIES):
        if len(chosen) >= n:
            break
        base = rng.choice((reference, target))
        step = sample_edit(base, rng, kinds=BENCHMARK_KINDS, allow_composite=False)
        scene = apply_edit(base, step) if step is not None else sample_scene(rng)
        if usable(scene):
            seen.add(scene.key())
            chosen.append((scene, "neighbour"))
    while len(chosen) < n:
        scene = sample_scene_in_split(rng, heldout=heldout)
        if usable(scene):
            seen.add(scene.key())
            chosen.append((scene, "random"))
    return chosen


# --------------------------------------------------------------------------- queries


def sample_query(rng: random.Random, kind: str) -> Query:
    """A query whose edit is of ``kind`` (one of ``QUERY_KINDS``), reference and target held out."""
    for _ in range(_MAX_TRIES):
        reference = sample_scene_in_split(rng, heldout=True, min_objects=MIN_REFERENCE_OBJECTS)
        for _ in range(20):
            if kind == "composite":
                edit = sample_edit(reference, rng, kinds=BENCHMARK_KINDS, allow_composite=True, composite_probability=1.0)
                edit = edit if isinstance(edit, CompositeEdit) else None
            else:
                edit = sample_edit(reference, rng, kinds=(kind,), allow_composite=False)
            if edit is None:
                break  # this kind does not fit this reference: draw another
            target = apply_edit(reference, edit)
            if target.is_heldout():
                return Query(
                    reference=reference,
                    edit=edit,
                    target=target,
                    negatives=tuple(hard_negatives(reference, edit, target, rng)),
                    caption=describe_edit_benchmark(reference, edit, rng),
                    train_phrasing=describe_edit(reference, edit, rng),
                )
    raise RuntimeError(f"no held-out {kind} query found in {_MAX_TRIES} references")


def _split_queries(split: str, n: int, seed: int) -> list[Query]:
    """Queries of one split; kinds cycle so every kind (and the composites) gets an equal share."""
    return [sample_query(random.Random(f"{seed}:{split}:{i}"), QUERY_KINDS[i % len(QUERY_KINDS)]) for i in range(n)]


# --------------------------------------------------------------------------- writing


@dataclass
class _SplitFiles:
    captions: list[dict[str, Any]]
    train_captions: list[dict[str, Any]]
    images: dict[str, Scene]  # name -> scene, one per distinct scene
    meta: list[dict[str, Any]]


def _name_split(split: str, queries: list[Query], first_pairid: int, rng: random.Random) -> _SplitFiles:
    prefix = SPLITS[split]
    names: dict[str, str] = {}  # scene key -> image name
    files = _SplitFiles([], [], {}, [])

    def name_of(scene: Scene, group: int, member: int) -> str:
        if scene.key() not in names:
            names[scene.key()] = f"{prefix}-{group}-{member}-img0"
            files.images[names[scene.key()]] = scene
        return names[scene.key()]

    for group, query in enumerate(queries):
        scenes = [query.reference, query.target, *(s for s, _ in query.negatives)]
        members = [name_of(scene, group, m) for m, scene in enumerate(scenes)]
        order = list(range(GROUP_SIZE))
        rng.shuffle(order)
        shuffled = [members[i] for i in order]
        reference, target = members[0], members[1]
        entry = {
            "pairid": first_pairid + group,
            "reference": reference,
            "target_hard": target,
            "target_soft": {target: 1.0},
            "caption": query.caption,
            "img_set": {
                "id": group,
                "members": shuffled,
                "reference_rank": shuffled.index(reference),
                "target_rank": shuffled.index(target),
            },
        }
        files.captions.append(entry)
        files.train_captions.append({**entry, "caption": query.train_phrasing})
        files.meta.append(
            {
                "pairid": entry["pairid"],
                "kind": query.edit.kind,
                "kinds": list(query.edit.kinds),
                "edit": query.edit.to_dict(),
                "reference_scene": query.reference.to_dict(),
                "target_scene": query.target.to_dict(),
                "negatives": [{"name": members[2 + i], "reason": why} for i, (_, why) in enumerate(query.negatives)],
            }
        )
    return files


def render_job(job: tuple[dict[str, Any], int, str, str]) -> None:
    """Render one scene to ``path`` (PNG; ``.jpg``: JPEG at quality 100 without chroma subsampling, the
    CIRCO-format benchmark's files), atomically."""
    scene, size, seed, path = job
    image = render(Scene.from_dict(scene), size, random.Random(seed))
    with atomic_path(path) as tmp:
        if str(path).endswith(".jpg"):
            image.save(tmp, format="JPEG", quality=100, subsampling=0)
        else:
            image.save(tmp, format="PNG")


def write_benchmark(
    out_dir: str | os.PathLike, config: BenchmarkConfig = BenchmarkConfig(), workers: int = 2, progress: bool = True
) -> dict[str, Any]:
    """Write the benchmark to ``out_dir`` (see the module docstring); return its manifest."""
    root = Path(out_dir)
    counts: dict[str, Any] = {}
    first_pairid = 0
    jobs = []
    for split, n in (("val", config.val_queries), ("test1", config.test_queries)):
        queries = _split_queries(split, n, config.seed)
        files = _name_split(split, queries, first_pairid, random.Random(f"{config.seed}:{split}:groups"))
        first_pairid += n
        folder = SPLITS[split]
        write_json_atomic(root / "captions" / f"cap.rc2.{split}.json", files.captions)
        write_json_atomic(root / "captions_train_phrasing" / f"cap.rc2.{split}.json", files.train_captions)
        write_json_atomic(root / "image_splits" / f"split.rc2.{split}.json", {name: f"./{folder}/{name}.png" for name in files.images})
        write_json_atomic(root / "oracle" / f"captions.{split}.json", {name: canonical_caption(s) for name, s in files.images.items()})
        write_json_atomic(root / "meta" / f"queries.{split}.json", files.meta)
        jobs += [(s.to_dict(), config.image_size, f"{config.seed}:{name}", str(root / folder / f"{name}.png")) for name, s in files.images.items()]
        counts[split] = {
            "queries": n,
            "images": len(files.images),
            "kinds": dict(Counter(m["kind"] if ":" not in m["kind"] else "composite" for m in files.meta)),
            "negatives": dict(Counter(neg["reason"] for m in files.meta for neg in m["negatives"])),
        }
    run_render_jobs(render_job, jobs, workers, "rendering benchmark images", progress)
    manifest = artifact_manifest("shapes_cir_benchmark", asdict(config), config.seed, format="CIRR rc2", splits=counts)
    write_json_atomic(root / "manifest.json", manifest)
    return manifest


def load_meta(root: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Per-query edit metadata (kind, edit, scenes, negative reasons) for per-kind breakdowns."""
    return json.loads((Path(root) / "meta" / f"queries.{split}.json").read_text(encoding="utf-8"))
