"""FashionIQ in its official layout; one ``BenchmarkData`` per category, each ranked against its own gallery.

Layout of ``root``::

    root/captions/cap.{dress,shirt,toptee}.{val,test}.json         [{"candidate", "target" (val), "captions": [2]}]
    root/image_splits/split.{dress,shirt,toptee}.{val,test}.json   [image ids]  (the category's gallery)
    root/images/{id}.png  (or .jpg)

The gallery of a category is its split file; the reference stays in the ranking (the field's
protocol for FashionIQ). Both modification captions are kept; the engine joins them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fusion_diff.benchmarks import metrics as M
from fusion_diff.benchmarks.annotations import TITLES, check_split, read_queries_file, require_file
from fusion_diff.benchmarks.spec import BenchmarkSpec
from fusion_diff.benchmarks.types import BenchmarkData, CompositionQuery, check_images, dataset_key
from fusion_diff.errors import ConfigError, DataError
from fusion_diff.utils.io import read_json

CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")
_SPLITS = {"val": "val", "test": "test"}
IMAGE_EXTENSIONS = (".png", ".jpg")
FASHIONIQ_CAPTION_ORDERS: dict[str, str] = {
    "both": "both orders joined with 'and', query embeddings averaged (zero-shot norm)",
    "forward": "captions joined in annotation order with 'and' (single order)",
    "reverse": "captions joined in reverse order with 'and' (single order)",
}


def load_fashioniq(
    root: str | Path,
    split: str = "val",
    *,
    categories: Sequence[str] = CATEGORIES,
    image_root: str | Path | None = None,
    allow_missing: bool = False,
) -> list[BenchmarkData]:
    """Load the given FashionIQ categories of a split (``image_root`` defaults to ``root/images``)."""
    root = Path(root)
    if split not in _SPLITS:
        raise DataError(f"unknown FashionIQ split {split!r}: use val or test.")
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise DataError(f"unknown FashionIQ categories {unknown}: use some of {list(CATEGORIES)}.")
    image_root = Path(image_root) if image_root is not None else root / "images"
    return [_load_category(root, split, category, image_root, allow_missing) for category in categories]


def _load_category(root: Path, split: str, category: str, image_root: Path, allow_missing: bool) -> BenchmarkData:
    captions_path = require_file(
        root / "captions" / f"cap.{category}.{split}.json", "fashioniq", root, f"{category} {split} captions file"
    )
    split_path = require_file(
        root / "image_splits" / f"split.{category}.{split}.json",
        "fashioniq",
        root,
        f"{category} {split} image split file",
    )
    entries = read_queries_file(captions_path, "fashioniq", "captions file")
    has_targets = all("target" in e for e in entries)
    check_split(captions_path, "fashioniq", split, has_targets, expect_targets=split == "val")
    gallery = read_json(split_path, "FashionIQ image split file")
    if not isinstance(gallery, list) or not all(isinstance(i, str) for i in gallery):
        raise DataError(f"{split_path} is not a FashionIQ image split file (a list of image ids expected).")

    try:
        queries = [
            CompositionQuery(
                query_id=f"{category}/{index}",
                reference=e["candidate"],
                texts=tuple(e["captions"]),
                positives=(e["target"],) if has_targets else (),
            )
            for index, e in enumerate(entries)
        ]
    except (KeyError, TypeError) as err:
        raise DataError(f"{captions_path}: a query lacks the FashionIQ field {err} (candidate, captions).") from err
    outside = sorted({i for q in queries for i in (q.reference, *q.positives)} - set(gallery))
    if outside:
        raise DataError(
            f"{captions_path} refers to {len(outside)} images that {split_path} does not list (first: {outside[:3]}): "
            "the two files are of different categories or splits. Restore the official pair."
        )

    image_paths = {image_id: _image_file(image_root, image_id) for image_id in gallery}
    missing = check_images(
        image_paths,
        f"FashionIQ {category} {split}",
        allow_missing,
        fix=f"put the images in {image_root} as {{id}}.png or .jpg",
    )
    return BenchmarkData(
        benchmark="fashioniq",
        split=split,
        subset=category,
        queries=queries,
        gallery=list(gallery),
        image_paths=image_paths,
        annotation_files=(captions_path, split_path),
        exclude_reference=False,
        missing=missing,
        dataset_key=dataset_key(image_root),
    )


def _image_file(image_root: Path, image_id: str) -> Path:
    """``{id}.png`` or ``{id}.jpg``, whichever exists (``.png`` when neither does, for the missing list)."""
    for ext in IMAGE_EXTENSIONS:
        path = image_root / f"{image_id}{ext}"
        if path.is_file():
            return path
    return image_root / f"{image_id}{IMAGE_EXTENSIONS[0]}"


def fashioniq_join(first: str, second: str) -> str:
    """FashionIQ's two relative captions as one query text (the field's ``"{a} and {b}"`` join)."""
    return f"{first.strip('.?, ')} and {second.strip('.?, ')}"


def check_caption_order(order: str) -> None:
    if order not in FASHIONIQ_CAPTION_ORDERS:
        raise ConfigError(f"unknown FashionIQ caption order {order!r}; choose one of {list(FASHIONIQ_CAPTION_ORDERS)}.")


def fashioniq_texts(queries, fiq_order: str = "both", **options) -> tuple[list[str], list[int]]:
    """``both`` gives two rows per query (forward rows first, then reverse), a single order one row."""
    check_caption_order(fiq_order)
    n = len(queries)
    forward = [fashioniq_join(*q.texts) for q in queries]
    reverse = [fashioniq_join(*reversed(q.texts)) for q in queries]
    if fiq_order == "both":
        return forward + reverse, list(range(n)) * 2
    return (forward if fiq_order == "forward" else reverse), list(range(n))


def fashioniq_unit_metrics(relevant, subset_relevant, queries) -> dict[str, float]:
    return M.fashioniq_metrics(relevant)


SPEC = BenchmarkSpec(
    "fashioniq", TITLES["fashioniq"],
    load=lambda root, split, categories=CATEGORIES, **common: load_fashioniq(root, split, categories=categories, **common),
    metrics=fashioniq_unit_metrics, load_options=("categories",), texts=fashioniq_texts,
    protocol=lambda fiq_order="both", **options: {"fashioniq_captions": FASHIONIQ_CAPTION_ORDERS[fiq_order]},
    average=M.fashioniq_average,
)  # fmt: skip
