"""Reading official annotation files, and saying so when a file belongs to another benchmark or split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusion_diff.errors import DataError, MissingFileError
from fusion_diff.utils.io import read_json

TITLES = {
    "cirr": "CIRR",
    "fashioniq": "FashionIQ",
    "circo": "CIRCO",
    "shapes": "shapes-world",
    "shapes-open": "shapes-world open-edit",
}
FILE_FORMATS = {"shapes": "cirr", "shapes-open": "circo"}  # benchmarks written in another one's file format

# Files whose presence identifies a benchmark's folder (relative to the folder given as --root).
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "cirr": ("captions/cap.rc2.*.json", "cirr/captions/cap.rc2.*.json"),
    "fashioniq": ("captions/cap.dress.*.json", "captions/cap.shirt.*.json", "captions/cap.toptee.*.json"),
    "circo": ("annotations/val.json", "annotations/test.json"),
}


def sniff_benchmark(entries: Any) -> str | None:
    """Which benchmark's query schema a parsed caption/annotation file follows (None when unknown).

    The shapes world writes CIRR's and CIRCO's schemas, so its files read as ``"cirr"`` / ``"circo"``.
    """
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return None
    keys = set(entries[0])
    if {"pairid", "reference", "caption"} <= keys:
        return "cirr"
    if {"candidate", "captions"} <= keys:
        return "fashioniq"
    if {"reference_img_id", "relative_caption"} <= keys:
        return "circo"
    return None


def guess_root_benchmark(root: Path) -> str | None:
    """The benchmark whose files lie in ``root`` (for error messages), or None."""
    for name, patterns in _SIGNATURES.items():
        if any(next(Path(root).glob(p), None) is not None for p in patterns):
            return name
    return None


def require_file(path: Path, benchmark: str, root: Path, what: str) -> Path:
    """``path`` if it exists; otherwise an error that says which benchmark ``root`` looks like instead."""
    if path.is_file():
        return path
    other = guess_root_benchmark(root)
    hint = (
        f" {root} looks like a {TITLES[other]} folder: use --benchmark {other}."
        if other and other != FILE_FORMATS.get(benchmark, benchmark)
        else f" Point --root at the {TITLES[benchmark]} folder (the one holding the official annotation files)."
    )
    raise MissingFileError(f"{TITLES[benchmark]} {what} not found: {path}.{hint}")


def read_queries_file(path: Path, benchmark: str, what: str) -> list[dict[str, Any]]:
    """The list of query records in an official annotation file, checked to be ``benchmark``'s schema."""
    entries = read_json(path, f"{TITLES[benchmark]} {what}")
    expected = FILE_FORMATS.get(benchmark, benchmark)
    found = sniff_benchmark(entries)
    if found != expected:
        kind = f"a {TITLES[found]} annotation file" if found else "not an annotation file of any known benchmark"
        fix = f"pass --benchmark {found} for this file, or point" if found else "point"
        raise DataError(
            f"{path} is {kind}, but a {TITLES[benchmark]} {what} was expected. "
            f"Fix: {fix} --root at the {TITLES[benchmark]} folder."
        )
    return entries


def check_split(path: Path, benchmark: str, split: str, has_targets: bool, expect_targets: bool) -> None:
    """Refuse a file of another split: val files carry ground truth, test files do not."""
    if has_targets == expect_targets:
        return
    actual = "val/train" if has_targets else "test"
    raise DataError(
        f"{path} is a {TITLES[benchmark]} {actual} file ({'with' if has_targets else 'without'} ground-truth "
        f"targets), but split {split!r} was asked for. Fix: pass the matching --split, or restore the official file."
    )
