"""The shapes-world benchmark: CIRR's file format, read by the CIRR loader, plus its oracle captions.

Written by ``fusion-diff world benchmark --out DIR`` (``data_synth.shapes.benchmark``). Beside the
CIRR files it holds ``oracle/captions.{val,test1}.json`` ({image name: ground-truth caption}), read
ONLY by the oracle rows, and ``captions_train_phrasing/cap.rc2.test1.json`` (the same test edits in
the training generator's phrasing, for the phrasing-gap figure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fusion_diff.benchmarks.cirr import annotation_dir, cirr_split, load_cirr
from fusion_diff.benchmarks.types import BenchmarkData
from fusion_diff.errors import DataError
from fusion_diff.utils.io import read_json

PHRASINGS = {"benchmark": "captions", "training": "captions_train_phrasing"}


def load_shapes(
    root: str | Path,
    split: str = "test",
    *,
    phrasing: Literal["benchmark", "training"] = "benchmark",
    image_root: str | Path | None = None,
    allow_missing: bool = False,
) -> BenchmarkData:
    """Load a shapes-world split through the CIRR loader; ``phrasing="training"`` reads the re-phrased queries."""
    if phrasing not in PHRASINGS:
        raise DataError(f"unknown shapes phrasing {phrasing!r}: use one of {sorted(PHRASINGS)}.")
    data = load_cirr(
        root,
        split,
        image_root=image_root,
        allow_missing=allow_missing,
        benchmark="shapes",
        captions_subdir=PHRASINGS[phrasing],
    )
    data.protocol_extra["phrasing"] = phrasing
    if phrasing != "benchmark":
        data.subset = f"{phrasing}-phrasing"
    return data


def oracle_captions_path(root: str | Path, split: str) -> Path:
    """``root/oracle/captions.{val,test1}.json`` (next to the CIRR-format files)."""
    return annotation_dir(Path(root)) / "oracle" / f"captions.{cirr_split(split)}.json"


def load_oracle_captions(path: str | Path) -> dict[str, str]:
    """{image name: ground-truth caption}. Only oracle rows may read this file."""
    captions = read_json(path, "shapes-world oracle captions file")
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise DataError(f"{path} is not an oracle captions file ({{image name: caption}} expected).")
    return captions
