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

from fusion_diff.benchmarks.metrics import CIRCO_KS
from fusion_diff.benchmarks.spec import BENCHMARK_SPECS
from fusion_diff.errors import MissingFileError

BENCHMARKS: tuple[str, ...] = tuple(BENCHMARK_SPECS)  # every benchmark's name (its spec: benchmarks/spec.py)
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

    def evaluable_queries(self) -> list[CompositionQuery]:
        """The queries whose reference image is there (the others are dropped and counted)."""
        missing = set(self.missing)
        return [q for q in self.queries if q.reference not in missing]

    def target_coverage(self) -> dict[str, Any]:
        """What missing ground-truth images take from the evaluable queries: how many lose a ground truth, and
        the best score each metric can still reach (%). Empty without ground truth or when nothing is lost.

        A query whose only target is missing is a certain miss, so recalls cannot exceed the share of
        queries with their target; CIRCO's AP@K of a query is at most ``min(K, #present) / min(K, #gt)``.
        """
        missing = set(self.missing)
        queries = self.evaluable_queries()
        if not missing or not queries or not self.has_ground_truth:
            return {}
        present = [sum(p not in missing for p in q.positives) for q in queries]
        lost = sum(n < len(q.positives) for n, q in zip(present, queries))
        if not lost:
            return {}
        if self.benchmark == "circo":
            totals = [len(q.positives) for q in queries]
            best = {
                f"mAP@{k}": 100 * sum(min(k, n) / min(k, t) for n, t in zip(present, totals)) / len(totals)
                for k in CIRCO_KS
            }
        else:
            best = {"recall": 100 * sum(n > 0 for n in present) / len(queries)}
        return {"queries_missing_targets": lost, "queries_evaluable": len(queries), "best_possible": best}

    def summary(self) -> dict[str, Any]:
        """Counts for the result's protocol record."""
        return {
            "name": self.name,
            "queries": len(self.queries),
            "gallery_size": len(self.gallery),
            "missing_images": len(self.missing),
            **self.target_coverage(),
            "annotation_files": [str(p) for p in self.annotation_files],
            **self.protocol_extra,
        }

    def describe_missing(self) -> str | None:
        """One line on what missing images cost this split (None when nothing is missing)."""
        if not self.missing:
            return None
        dropped = len(self.queries) - len(self.evaluable_queries())
        line = (
            f"{self.name}: {len(self.missing)} images missing; {dropped} of {len(self.queries)} queries dropped "
            "(reference missing)"
        )
        coverage = self.target_coverage()
        if coverage:
            best = ", ".join(f"{name} {value:.1f}%" for name, value in coverage["best_possible"].items())
            line += (
                f"; {coverage['queries_missing_targets']} of the {coverage['queries_evaluable']} evaluated queries "
                f"have a missing ground truth, so no method can exceed: {best}"
            )
        return line


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
