"""CIRCO in its official layout: 220 val / 800 test queries over the COCO 2017 unlabeled images.

Layout of ``root``::

    root/annotations/{val,test}.json                        [{"id", "reference_img_id", "relative_caption",
                                                              "shared_concept", "target_img_id", "gt_img_ids"}]
    root/COCO2017_unlabeled/unlabeled2017/000000243611.jpg  (image id zero-padded to 12 digits)
    root/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json

The gallery (~123k images) comes from a configurable source: ``"coco-info"`` (the COCO image info
file), ``"folder"`` (every ``.jpg`` in the image folder) or a file listing image ids (JSON list or
one id per line); ``"auto"`` takes the info file when present, else the folder. The reference stays
in the ranking, as in the official evaluation code. Every ground truth must be in the gallery.
A benchmark written in CIRCO's format (the shapes world's open-edit benchmark, ``benchmark="shapes-open"``)
loads the same way; its test split may carry ground truths.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fusion_diff.benchmarks import metrics as M
from fusion_diff.benchmarks.annotations import TITLES, check_split, read_queries_file, require_file
from fusion_diff.benchmarks.spec import BenchmarkSpec
from fusion_diff.benchmarks.types import BenchmarkData, CompositionQuery, check_images, dataset_key
from fusion_diff.errors import DataError
from fusion_diff.utils.io import read_json

_SPLITS = {"val": "val", "test": "test"}
CIRCO_CONCEPT_TEMPLATE = "{concept} that {caption}"
INFO_FILE = Path("COCO2017_unlabeled/annotations/image_info_unlabeled2017.json")
IMAGE_DIR = Path("COCO2017_unlabeled/unlabeled2017")


def coco_file_name(image_id: str | int) -> str:
    return f"{int(image_id):012d}.jpg"


def load_circo(
    root: str | Path,
    split: str = "val",
    *,
    gallery: str | Path = "auto",
    image_root: str | Path | None = None,
    allow_missing: bool = False,
    benchmark: str = "circo",
) -> BenchmarkData:
    """Load a CIRCO-format split; ``gallery`` picks the gallery source (see the module docstring)."""
    root = Path(root)
    title = TITLES[benchmark]
    if split not in _SPLITS:
        raise DataError(f"unknown {title} split {split!r}: use val or test.")
    annotations_path = require_file(root / "annotations" / f"{split}.json", benchmark, root, f"{split} annotation file")
    entries = read_queries_file(annotations_path, benchmark, "annotation file")
    has_targets = all("gt_img_ids" in e for e in entries)
    if benchmark == "circo":  # the real CIRCO's test split has no ground truths; a synthetic one may have them
        check_split(annotations_path, benchmark, split, has_targets, expect_targets=split == "val")
    try:
        queries = [
            CompositionQuery(
                query_id=str(e["id"]),
                reference=str(e["reference_img_id"]),
                texts=(e["relative_caption"],),
                positives=tuple(str(i) for i in e["gt_img_ids"]) if has_targets else (),
                shared_concept=e.get("shared_concept"),
            )
            for e in entries
        ]
    except (KeyError, TypeError) as err:
        raise DataError(f"{annotations_path}: a query lacks the CIRCO field {err}.") from err

    image_root = Path(image_root) if image_root is not None else root / IMAGE_DIR
    gallery_ids, source = _gallery_ids(root, image_root, gallery)
    image_paths = {i: image_root / coco_file_name(i) for i in gallery_ids}
    # A ground truth that the gallery source does not list can never be retrieved: it counts as missing.
    outside = sorted({i for q in queries for i in q.positives} - image_paths.keys())
    if outside and not allow_missing:
        raise DataError(
            f"the {title} gallery ({source}) lacks {len(outside)} ground-truth images of {annotations_path} "
            f"(first: {outside[:3]}). Fix: use the full COCO 2017 unlabeled gallery, or allow_missing=True."
        )
    checked = {**image_paths, **{q.reference: image_root / coco_file_name(q.reference) for q in queries}}
    missing = check_images(
        checked, f"{title} {split}", allow_missing, fix=f"put the COCO 2017 unlabeled images in {image_root}"
    )
    missing += sorted(set(outside) - set(missing))
    return BenchmarkData(
        benchmark=benchmark,
        split=split,
        queries=queries,
        gallery=gallery_ids,
        image_paths=checked,
        annotation_files=(annotations_path,),
        exclude_reference=False,
        missing=missing,
        dataset_key=dataset_key(image_root),
        protocol_extra={"gallery_source": source},
    )


def _gallery_ids(root: Path, image_root: Path, gallery: str | Path) -> tuple[list[str], str]:
    """The gallery's image ids and a name for its source (recorded in the protocol)."""
    if gallery == "auto":
        gallery = "coco-info" if (root / INFO_FILE).is_file() else "folder"
    if gallery == "coco-info":
        info = read_json(root / INFO_FILE, "COCO 2017 unlabeled image info file")
        try:
            return [str(img["id"]) for img in info["images"]], "coco-info"
        except (KeyError, TypeError) as err:
            raise DataError(f"{root / INFO_FILE} is not a COCO image info file (no images[].id).") from err
    if gallery == "folder":
        if not image_root.is_dir():
            raise DataError(
                f"CIRCO image folder {image_root} does not exist: put the COCO 2017 unlabeled images there."
            )
        ids = sorted(str(int(p.stem)) for p in image_root.glob("*.jpg") if p.stem.isdigit())
        return ids, "folder"
    path = Path(gallery)
    if path.suffix == ".json":
        ids = read_json(path, "CIRCO gallery id list")
        if not isinstance(ids, list):
            raise DataError(f"{path} is not a gallery id list (a JSON list of COCO image ids expected).")
    elif path.is_file():
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise DataError(
            f"CIRCO gallery source {gallery!s} is neither 'coco-info', 'folder' nor an existing id list file."
        )
    try:
        return [str(int(i)) for i in ids], str(path)
    except ValueError as err:
        raise DataError(f"{path} holds a non-integer COCO image id ({err}).") from err


def circo_unit_metrics(relevant, subset_relevant, queries) -> dict[str, float]:
    """mAP@K over every ground truth of each query (their number varies by query)."""
    return M.circo_metrics(relevant, torch.tensor([len(q.positives) for q in queries]))


def circo_texts(queries, circo_shared_concept: bool = False, **options) -> tuple[list[str], list[int]]:
    """The relative caption; with ``circo_shared_concept``, ``"{concept} that {caption}"``."""
    if not circo_shared_concept:
        return [q.texts[0] for q in queries], list(range(len(queries)))
    texts = [CIRCO_CONCEPT_TEMPLATE.format(concept=q.shared_concept, caption=q.texts[0]) for q in queries]
    return texts, list(range(len(queries)))


def circo_protocol(circo_shared_concept: bool = False, **options) -> dict:
    recorded = {"circo_shared_concept": circo_shared_concept}
    return {**recorded, "circo_shared_concept_template": CIRCO_CONCEPT_TEMPLATE} if circo_shared_concept else recorded


SPEC = BenchmarkSpec(
    "circo", TITLES["circo"],
    load=lambda root, split, circo_gallery="auto", **common: [load_circo(root, split, gallery=circo_gallery, **common)],
    metrics=circo_unit_metrics, load_options=("circo_gallery",), texts=circo_texts, protocol=circo_protocol,
    submission="circo",
)  # fmt: skip
