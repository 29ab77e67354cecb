"""What every benchmark loader returns: composed queries, a gallery, image paths and what is missing.

CIRR, FashionIQ (one ``BenchmarkData`` per category: each category is ranked against its own
gallery), CIRCO and the shapes world all load into the same structure, so that the evaluation
engine and the metrics never branch on file formats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_diff.errors import MissingFileError

BENCHMARKS: tuple[str, ...] = ("cirr", "fashioniq", "circo", "shapes", "shapes-open")
MISSING_SHOWN = 10  # how many missing paths an error message lists


@dataclass(frozen=True)
class CompositionQuery:
    """One composed query as annotated: a reference image id plus modification text(s).

    ``texts`` holds the annotation's modification captions (FashionIQ has two per query; the
    engine joins them). ``positives`` are the ground-truth gallery ids (CIRR: the hard target;
    CIRCO: all ground truths, the annotated target first); empty on splits without ground truth.
    """

    query_id: str
    reference: str
    texts: tuple[str, ...]
    positives: tuple[str, ...] = ()
    group: tuple[str, ...] = ()  # CIRR img_set members (reference included), for Recall_subset
    shared_concept: str | None = None  # CIRCO only


@dataclass
class BenchmarkData:
    """A loaded benchmark split (one FashionIQ category): queries, gallery ids and image files.

    ``image_paths`` maps every id the split refers to (gallery, references, ground truths, group
    members) to its file; ``missing`` lists the ids whose file is absent (the loader refuses them
    unless ``allow_missing``). ``exclude_reference`` is the protocol's answer to whether the query's
    own reference image is removed from its ranking.
    """

    benchmark: str
    split: str
    queries: list[CompositionQuery]
    gallery: list[str]
    image_paths: dict[str, Path]
    annotation_files: tuple[Path, ...]
    exclude_reference: bool
    subset: str | None = None  # FashionIQ category
    missing: list[str] = field(default_factory=list)
    dataset_key: str = ""  # identifies the image files (cache key), see ``dataset_key``
    protocol_extra: dict[str, Any] = field(default_factory=dict)  # loader settings that change the numbers

    @property
    def name(self) -> str:
        parts = [self.benchmark, self.split] + ([self.subset] if self.subset else [])
        return "/".join(parts)

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.queries) and all(q.positives for q in self.queries)

    @property
    def has_groups(self) -> bool:
        return bool(self.queries) and all(q.group for q in self.queries)

    def summary(self) -> dict[str, Any]:
        """Counts for the result's protocol record."""
        return {
            "name": self.name,
            "queries": len(self.queries),
            "gallery_size": len(self.gallery),
            "missing_images": len(self.missing),
            "annotation_files": [str(p) for p in self.annotation_files],
            **self.protocol_extra,
        }


def check_images(
    image_paths: dict[str, Path], where: str, allow_missing: bool, fix: str = "point --root at the image folder"
) -> list[str]:
    """Ids whose image file does not exist; raise ``MissingFileError`` listing the first ones unless allowed."""
    missing = [image_id for image_id, path in image_paths.items() if not path.is_file()]
    if missing and not allow_missing:
        shown = "\n  ".join(str(image_paths[i]) for i in missing[:MISSING_SHOWN])
        raise MissingFileError(
            f"{len(missing)} of {len(image_paths)} images of {where} are missing, first ones:\n  {shown}\n"
            f"Fix: {fix}, or pass allow_missing=True (--allow-missing) to evaluate without them; every result "
            "then carries the missing count."
        )
    return missing


def dataset_key(image_root: Path, extra_files: Sequence[Path] = ()) -> str:
    """A short key for a set of image files: their resolved root plus the content of manifest-like files.

    Embedding caches are keyed by it, so that a benchmark regenerated in place (the shapes world
    writes a ``manifest.json``) never reuses the embeddings of the old images.
    """
    digest = hashlib.sha256(str(Path(image_root).resolve()).encode())
    for path in extra_files:
        if Path(path).is_file():
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]
