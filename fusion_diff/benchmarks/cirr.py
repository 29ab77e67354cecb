"""CIRR (rc2) in its official layout, and any benchmark written in CIRR's file format (the shapes world).

Layout of ``root`` (as the CIRR README describes it; annotations may also sit directly in ``root``)::

    root/dev/dev-244-0-img0.png, root/test1/..., root/train/34/...   (NLVR2 images; paths from the split file)
    root/cirr/captions/cap.rc2.{val,test1}.json
    root/cirr/image_splits/split.rc2.{val,test1}.json                 ({image name: "./dev/....png"})

The gallery of a split is every image of its split file; the query's reference is removed from its
ranking (the official protocol).
"""

from __future__ import annotations

from pathlib import Path

from fusion_diff.benchmarks import metrics as M
from fusion_diff.benchmarks.annotations import TITLES, check_split, read_queries_file, require_file
from fusion_diff.benchmarks.spec import BenchmarkSpec
from fusion_diff.benchmarks.types import BenchmarkData, CompositionQuery, check_images, dataset_key
from fusion_diff.errors import DataError
from fusion_diff.utils.io import read_json

_SPLITS = {"val": "val", "dev": "val", "test": "test1", "test1": "test1"}
_NAME_PREFIX = {"val": "dev-", "test1": "test1-"}  # CIRR image names encode their split


def cirr_split(split: str) -> str:
    """The file-name split of CIRR-format benchmarks: ``val`` or ``test1`` (``test`` and ``dev`` accepted)."""
    try:
        return _SPLITS[split]
    except KeyError:
        raise DataError(f"unknown CIRR split {split!r}: use val or test (test1).") from None


def annotation_dir(root: Path) -> Path:
    """Where the caption and split files are: ``root/cirr`` (official layout) or ``root`` itself."""
    nested = Path(root) / "cirr"
    return nested if (nested / "captions").is_dir() else Path(root)


def load_cirr(
    root: str | Path,
    split: str = "val",
    *,
    image_root: str | Path | None = None,
    allow_missing: bool = False,
    benchmark: str = "cirr",
    captions_subdir: str = "captions",
) -> BenchmarkData:
    """Load a CIRR-format split: queries with their 6-image groups, the split's gallery, image paths.

    ``image_root`` (default ``root``) is where the split file's relative paths start. Missing
    images raise ``MissingFileError`` listing the first ones, unless ``allow_missing``.
    """
    root = Path(root)
    split = cirr_split(split)
    title = TITLES[benchmark]
    ann = annotation_dir(root)
    captions_path = require_file(
        ann / captions_subdir / f"cap.rc2.{split}.json", benchmark, root, f"{split} captions file"
    )
    split_path = require_file(
        ann / "image_splits" / f"split.rc2.{split}.json", benchmark, root, f"{split} image split file"
    )
    entries = read_queries_file(captions_path, benchmark, "captions file")
    has_targets = all("target_hard" in e for e in entries)
    if benchmark == "cirr":  # the real CIRR's test split has no targets; a synthetic one may have them
        check_split(captions_path, benchmark, split, has_targets, expect_targets=split == "val")
        _check_name_prefix(captions_path, split, [e["reference"] for e in entries])

    image_split = read_json(split_path, f"{title} image split file")
    if not isinstance(image_split, dict) or not all(isinstance(v, str) for v in image_split.values()):
        raise DataError(f"{split_path} is not a {title} image split file ({{image name: relative path}} expected).")
    if benchmark == "cirr":
        _check_name_prefix(split_path, split, list(image_split))

    try:
        queries = [
            CompositionQuery(
                query_id=str(e["pairid"]),
                reference=e["reference"],
                texts=(e["caption"],),
                positives=(e["target_hard"],) if has_targets else (),
                group=tuple(e["img_set"]["members"]),
            )
            for e in entries
        ]
    except (KeyError, TypeError) as err:
        raise DataError(
            f"{captions_path}: a query lacks the CIRR field {err} (pairid, reference, caption, img_set)."
        ) from err
    referenced = {i for q in queries for i in (q.reference, *q.positives, *q.group)}
    unknown = sorted(referenced - image_split.keys())
    if unknown:
        raise DataError(
            f"{captions_path} refers to {len(unknown)} images that {split_path} does not list (first: {unknown[:3]}). "
            "The captions and split files come from different splits or versions; restore the official pair."
        )

    image_root = Path(image_root) if image_root is not None else root
    image_paths = {name: image_root / rel for name, rel in image_split.items()}
    missing = check_images(
        image_paths,
        f"{title} {split}",
        allow_missing,
        fix=f"point --root (or image_root) at the folder holding the split file's paths ({image_root})",
    )
    return BenchmarkData(
        benchmark=benchmark,
        split=split,
        queries=queries,
        gallery=list(image_split),
        image_paths=image_paths,
        annotation_files=(captions_path, split_path),
        exclude_reference=True,
        missing=missing,
        dataset_key=dataset_key(image_root, (captions_path, split_path)),
    )


def _check_name_prefix(path: Path, split: str, names: list[str]) -> None:
    prefix = _NAME_PREFIX[split]
    wrong = [n for n in names if not n.startswith(prefix)]
    if wrong:
        raise DataError(
            f"{path} holds images of another CIRR split (e.g. {wrong[0]!r}; {split} names start with {prefix!r}). "
            "Fix: pass the matching --split, or restore the official file."
        )


def cirr_unit_metrics(relevant, subset_relevant, queries) -> dict[str, float]:
    """Recall@K over the gallery and Recall_subset@K over each query's group."""
    return M.cirr_metrics(relevant, subset_relevant)


SPEC = BenchmarkSpec(
    "cirr", TITLES["cirr"], load=lambda root, split, **common: [load_cirr(root, split, **common)],
    metrics=cirr_unit_metrics, submission="cirr",
)  # fmt: skip
