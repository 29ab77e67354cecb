"""The shapes world's open-edit benchmark, in the CIRCO file format: several right answers per query.

Layout of ``--out DIR`` (CIRCO's own, so its loader and metrics run on it)::

    annotations/{val,test}.json          CIRCO queries: id, reference_img_id, relative_caption, shared_concept,
                                         target_img_id, gt_img_ids (test keeps its ground truths: our own world)
    COCO2017_unlabeled/unlabeled2017/000000000001.jpg ...   one image per distinct scene: the shared gallery
    COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   the gallery's image list (COCO's info file)
    oracle/captions.{val,test1}.json     image id -> ground-truth caption (oracle rows only)
    meta/queries.{val,test}.json         per query: the open edit, scenes, counts of right answers, negatives
    meta/gallery.json                    image id -> scene graph (for checks and per-kind breakdowns)
    manifest.json                        written last

Every query is an open edit (``open_edits.py``: "give the circle another colour", "add a blue star
somewhere", "move the triangle to any corner", "make one of the squares bigger", or a closed edit joined
with an open one) of a held-out reference, worded in the benchmark's phrasing (never the training one).
Its right answers are all realisations whose scene is held out; up to ``max_targets`` of them are rendered
into the gallery (at least ``min_targets``: a query with one right answer is not open), and a query's
``gt_img_ids`` are *every* gallery image that answers it, whichever query put it there. Hard negatives come
from ``benchmark.hard_negatives`` (the right edit on the wrong object, a wrong value, another edit kind,
part of a composite), never a right answer. Images are JPEG (CIRCO's file names) at quality 100 without
chroma subsampling.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from data_synth.shapes.benchmark import hard_negatives, render_job
from data_synth.shapes.benchmark_phrasings import BENCHMARK_KINDS, describe_open_edit_benchmark
from data_synth.shapes.captions import canonical_caption
from data_synth.shapes.edits import apply_edit
from data_synth.shapes.instructions import describe_open_edit
from data_synth.shapes.open_edits import OPEN_KINDS, AnyOpenEdit, OpenComposite, sample_open_edit, satisfies
from data_synth.shapes.render import run_render_jobs, world_fingerprint
from data_synth.shapes.scene import Scene, sample_scene_in_split
from fusion_diff.benchmarks.circo import IMAGE_DIR, INFO_FILE, coco_file_name
from fusion_diff.benchmarks.shapes import oracle_captions_path
from fusion_diff.utils.checks import require_counts
from fusion_diff.utils.io import artifact_manifest, read_json, write_json_atomic

SPLITS: tuple[str, ...] = ("val", "test")
QUERY_KINDS: tuple[str, ...] = (*OPEN_KINDS, "composite")
MIN_REFERENCE_OBJECTS = 2
_MAX_TRIES = 20000  # references drawn per query: two held-out right answers are rare for some kinds


@dataclass(frozen=True)
class OpenBenchmarkConfig:
    val_queries: int = 500
    test_queries: int = 1000
    seed: int = 0
    image_size: int = 64
    min_targets: int = 2  # right answers a query must have in the gallery
    max_targets: int = 8  # right answers rendered per query (the rest of them count in the meta)
    negatives: int = 4  # hard negatives rendered per query
    world: str = field(default_factory=world_fingerprint)  # what the world looked like (not a setting)

    def __post_init__(self) -> None:
        where = "shapes open benchmark"
        require_counts(where, image_size=self.image_size, min_targets=self.min_targets, max_targets=self.max_targets)
        # a split may be empty (the demo scores the test split only), not both
        require_counts(where, minimum=0, val_queries=self.val_queries, test_queries=self.test_queries, negatives=self.negatives)
        require_counts(where, queries=self.val_queries + self.test_queries)


@dataclass(frozen=True)
class OpenQuery:
    reference: Scene
    edit: AnyOpenEdit
    targets: tuple[Scene, ...]  # rendered right answers, the annotated target first
    heldout_targets: int  # right answers that are held-out scenes (rendered or not)
    all_targets: int  # every right answer, held out or not
    negatives: tuple[tuple[Scene, str], ...]
    caption: str
    train_phrasing: str


def shared_concept(edit: AnyOpenEdit) -> str:
    """CIRCO's ``shared_concept``: what reference and targets have in common, here the thing the open part is
    about ("circle", or "star" for an added star)."""
    open_edit = edit.open if isinstance(edit, OpenComposite) else edit
    return open_edit.value[1] if open_edit.kind == "add_anywhere" else open_edit.objects[0].shape


def sample_open_query(rng: random.Random, kind: str, config: OpenBenchmarkConfig) -> OpenQuery:
    """A query whose open edit is of ``kind`` (one of ``QUERY_KINDS``) with at least ``min_targets`` held-out
    right answers; reference, right answers and negatives are all held-out scenes."""
    kinds, composite_with = (OPEN_KINDS, BENCHMARK_KINDS) if kind == "composite" else ((kind,), None)
    for _ in range(_MAX_TRIES):
        reference = sample_scene_in_split(rng, heldout=True, min_objects=MIN_REFERENCE_OBJECTS)
        edit = sample_open_edit(reference, rng, kinds, composite_with, min_realisations=config.min_targets)
        if edit is None:
            continue
        realisations = edit.realisations(reference)
        scenes = {s.key(): s for s in (apply_edit(reference, r) for r in realisations)}
        heldout = [s for s in scenes.values() if s.is_heldout()]
        if len(heldout) < config.min_targets:
            continue
        rng.shuffle(heldout)
        targets = tuple(heldout[: config.max_targets])
        chosen = next(r for r in realisations if apply_edit(reference, r) == targets[0])
        negatives = hard_negatives(
            reference, chosen, targets[0], rng, n=config.negatives, is_right=partial(satisfies, reference, edit)
        )
        return OpenQuery(
            reference=reference,
            edit=edit,
            targets=targets,
            heldout_targets=len(heldout),
            all_targets=len(scenes),
            negatives=tuple(negatives),
            caption=describe_open_edit_benchmark(reference, edit, rng),
            train_phrasing=describe_open_edit(reference, edit, rng),
        )
    raise RuntimeError(f"no held-out {kind} query with {config.min_targets} right answers in {_MAX_TRIES} references")


def _split_queries(split: str, n: int, config: OpenBenchmarkConfig) -> list[OpenQuery]:
    """Queries of one split; kinds cycle so that every kind (and the composites) gets an equal share."""
    return [
        sample_open_query(random.Random(f"{config.seed}:open:{split}:{i}"), QUERY_KINDS[i % len(QUERY_KINDS)], config)
        for i in range(n)
    ]


def write_open_benchmark(
    out_dir: str | os.PathLike,
    config: OpenBenchmarkConfig = OpenBenchmarkConfig(),
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the benchmark to ``out_dir`` (see the module docstring); return its manifest."""
    root = Path(out_dir)
    queries = {
        split: _split_queries(split, n, config) for split, n in zip(SPLITS, (config.val_queries, config.test_queries))
    }
    gallery: dict[str, int] = {}  # scene key -> image id, in order of first appearance
    scenes: dict[int, Scene] = {}
    for split in SPLITS:
        for q in queries[split]:
            for scene in (q.reference, *q.targets, *(s for s, _ in q.negatives)):
                if scene.key() not in gallery:
                    gallery[scene.key()] = len(gallery) + 1
                    scenes[gallery[scene.key()]] = scene
    counts: dict[str, Any] = {}
    first_id = 0
    for split in SPLITS:
        entries, meta = [], []
        for number, q in enumerate(queries[split]):
            answers = {apply_edit(q.reference, r).key() for r in q.edit.realisations(q.reference)}
            gt = [gallery[q.targets[0].key()]] + sorted(
                gallery[k] for k in answers & gallery.keys() if k != q.targets[0].key()
            )
            entries.append(
                {
                    "id": first_id + number,
                    "reference_img_id": gallery[q.reference.key()],
                    "relative_caption": q.caption,
                    "shared_concept": shared_concept(q.edit),
                    "target_img_id": gt[0],
                    "gt_img_ids": gt,
                }
            )
            meta.append(
                {
                    "id": first_id + number,
                    "kind": "composite" if isinstance(q.edit, OpenComposite) else q.edit.kind,
                    "kinds": list(q.edit.kinds),
                    "edit": q.edit.to_dict(),
                    "train_phrasing": q.train_phrasing,
                    "reference_scene": q.reference.to_dict(),
                    "right_answers": {"all": q.all_targets, "held_out": q.heldout_targets, "in_gallery": len(gt)},
                    "negatives": [{"id": gallery[s.key()], "reason": why} for s, why in q.negatives],
                }
            )
        first_id += len(entries)
        write_json_atomic(root / "annotations" / f"{split}.json", entries)
        write_json_atomic(root / "meta" / f"queries.{split}.json", meta)
        write_json_atomic(oracle_captions_path(root, split), {str(i): canonical_caption(s) for i, s in scenes.items()})
        counts[split] = {
            "queries": len(entries),
            "kinds": dict(Counter(m["kind"] for m in meta)),
            "ground_truths_per_query": sum(len(e["gt_img_ids"]) for e in entries) / max(len(entries), 1),
            "queries_with_capped_answers": sum(m["right_answers"]["held_out"] > config.max_targets for m in meta),
            "negatives": dict(Counter(n["reason"] for m in meta for n in m["negatives"])),
        }
    write_json_atomic(root / "meta" / "gallery.json", {str(i): s.to_dict() for i, s in scenes.items()})
    info = {
        "images": [
            {"id": i, "file_name": coco_file_name(i), "width": config.image_size, "height": config.image_size}
            for i in scenes
        ]
    }
    write_json_atomic(root / INFO_FILE, info)
    jobs = [
        (scene.to_dict(), config.image_size, f"{config.seed}:open:{i}", str(root / IMAGE_DIR / coco_file_name(i)))
        for i, scene in scenes.items()
    ]
    run_render_jobs(render_job, jobs, workers, "rendering open-edit benchmark images", progress)
    manifest = artifact_manifest(
        "shapes_open_benchmark", asdict(config), config.seed, format="CIRCO", gallery_images=len(scenes), splits=counts
    )
    write_json_atomic(root / "manifest.json", manifest)
    return manifest


def load_open_meta(root: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Per-query metadata (open edit, counts of right answers, negative reasons) for breakdowns and checks."""
    return read_json(Path(root) / "meta" / f"queries.{split}.json", "open-edit benchmark query metadata")
