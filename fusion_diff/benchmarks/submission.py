"""Test-server submission files of CIRR and CIRCO, and a validator to run before uploading.

- CIRR (https://github.com/Cuberick-Orion/CIRR/blob/main/Test-split_server.md): two JSON files,
  ``{"version": "rc2", "metric": "recall", "<pairid>": [top-50 image names]}`` and the same with
  ``"metric": "recall_subset"`` and the top-3 of the query's group (reference excluded). At most 5 MB.
- CIRCO (https://circo.micc.unifi.it/): ``{"<query id>": [50 unique COCO image ids]}`` covering every
  test query.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion_diff.benchmarks.report import EvalResult
from fusion_diff.benchmarks.spec import benchmark_spec
from fusion_diff.benchmarks.types import BenchmarkData, CompositionQuery
from fusion_diff.errors import DataError
from fusion_diff.utils.io import read_json, write_json_atomic

CIRR_VERSION = "rc2"
CIRR_LIST_LENGTH = {"recall": 50, "recall_subset": 3}
CIRR_MAX_BYTES = 5 * 1024 * 1024
CIRCO_LIST_LENGTH = 50
PROBLEMS_SHOWN = 10


def cirr_submission(metric: str, query_ids: Sequence[str], rankings: Sequence[Sequence[str]]) -> dict[str, Any]:
    """One CIRR server file: ``metric`` is ``"recall"`` (top-50) or ``"recall_subset"`` (top-3)."""
    length = CIRR_LIST_LENGTH[metric]
    return {
        "version": CIRR_VERSION,
        "metric": metric,
        **{str(q): list(r[:length]) for q, r in zip(query_ids, rankings)},
    }


def circo_submission(query_ids: Sequence[str], rankings: Sequence[Sequence[str]]) -> dict[str, list[int]]:
    """The CIRCO server file: top-50 COCO image ids (integers) per query id."""
    return {str(q): [int(i) for i in r[:CIRCO_LIST_LENGTH]] for q, r in zip(query_ids, rankings)}


@dataclass(frozen=True)
class WrittenSubmission:
    """A server file written from an evaluation, and the queries it leaves out (their images are missing)."""

    path: Path
    queries: int
    unanswered: int

    def describe(self) -> str:
        if not self.unanswered:
            return f"wrote test-server file {self.path} ({self.queries} queries)"
        return (
            f"wrote PARTIAL test-server file {self.path}: {self.queries - self.unanswered} of {self.queries} queries; "
            f"the other {self.unanswered} have missing images and the server will score them as misses"
        )


def list_length(data: BenchmarkData, query: CompositionQuery, metric: str | None) -> int:
    """How many ids the server expects for ``query``: CIRR ``recall`` top-50 of the gallery (reference removed),
    ``recall_subset`` top-3 of the group (reference removed); CIRCO top-50."""
    if benchmark_spec(data.benchmark).submission == "circo":
        return CIRCO_LIST_LENGTH
    candidates = len(query.group) if metric == "recall_subset" else len(data.gallery)
    return min(CIRR_LIST_LENGTH[metric], candidates - 1)


def unanswerable(data: BenchmarkData, metric: str | None = None) -> set[str]:
    """Ids of the queries that cannot get a full list because images are missing: the reference, or so many
    candidates (CIRR ``recall_subset``: the group; else the gallery) that fewer than ``list_length`` are left."""
    missing = set(data.missing)
    if not missing:
        return set()
    gallery_left = sum(g not in missing for g in data.gallery)
    out = set()
    for query in data.queries:
        if metric == "recall_subset":
            left = sum(m not in missing and m != query.reference for m in query.group)
        else:
            left = gallery_left - (data.exclude_reference and query.reference not in missing)
        if query.reference in missing or left < list_length(data, query, metric):
            out.add(query.query_id)
    return out


def write_submission(
    path: str | Path, submission: dict[str, Any], data: BenchmarkData, partial: bool = False
) -> Path:
    """Validate ``submission`` against ``data`` and write it atomically (compact JSON, as the servers expect)."""
    validate_submission(submission, data, source=str(path), partial=partial)
    write_json_atomic(path, submission, indent=None)
    return Path(path)


def validate_submission(
    submission: dict[str, Any] | str | Path, data: BenchmarkData, source: str | None = None, partial: bool = False
) -> None:
    """Raise ``DataError`` listing every problem a test server would reject (or that breaks the protocol).

    ``submission`` is a parsed file or a path. CIRR-format benchmarks and CIRCO are supported. With
    ``partial``, queries that ``unanswerable`` names (images missing from ``data``) may be absent; the
    server scores them as misses.
    """
    if isinstance(submission, (str, os.PathLike)):
        source = source or str(submission)
        submission = read_json(submission, "submission file", unique_keys=True)
    source = source or "submission"
    if not isinstance(submission, dict):
        raise DataError(
            f"{source} is not a valid {data.name} submission: the file must hold one JSON object mapping each query "
            f"id to its ranked list, found a JSON {type(submission).__name__}."
        )
    server_format = benchmark_spec(data.benchmark).submission
    if server_format == "circo":
        problems = _circo_problems(submission, data, unanswerable(data) if partial else set())
    elif server_format == "cirr":
        metric = submission.get("metric")
        problems = _cirr_problems(submission, data, unanswerable(data, metric) if partial else set())
    else:
        raise DataError(f"{data.benchmark} has no test server submission format (CIRR and CIRCO do).")
    if problems:
        shown = "\n  ".join(problems[:PROBLEMS_SHOWN])
        raise DataError(f"{source} is not a valid {data.name} submission ({len(problems)} problems):\n  {shown}")


def _cirr_problems(submission: dict[str, Any], data: BenchmarkData, may_be_absent: set[str]) -> list[str]:
    problems = []
    if submission.get("version") != CIRR_VERSION:
        problems.append(f'"version" must be "{CIRR_VERSION}", found {submission.get("version")!r}')
    metric = submission.get("metric")
    if metric not in CIRR_LIST_LENGTH:
        return problems + [f'"metric" must be "recall" or "recall_subset", found {metric!r}']
    entries = {k: v for k, v in submission.items() if k not in ("version", "metric")}
    problems += _key_problems(entries, [q.query_id for q in data.queries], may_be_absent)
    gallery = set(data.gallery)
    for query in data.queries:
        ranking = entries.get(query.query_id)
        if ranking is None:
            continue
        allowed = set(query.group) if metric == "recall_subset" else gallery
        problems += _list_problems(query.query_id, ranking, list_length(data, query, metric), allowed, str)
        if query.reference in ranking:
            problems.append(f"{query.query_id}: lists its own reference {query.reference} (CIRR removes it)")
    size = len(json.dumps(submission))
    if size > CIRR_MAX_BYTES:
        problems.append(f"{size} bytes: larger than the 5 MB upload limit")
    return problems


def _circo_problems(submission: dict[str, Any], data: BenchmarkData, may_be_absent: set[str]) -> list[str]:
    problems = _key_problems(submission, [q.query_id for q in data.queries], may_be_absent)
    gallery = {int(i) for i in data.gallery}
    for query in data.queries:
        ranking = submission.get(query.query_id)
        if ranking is not None:
            problems += _list_problems(query.query_id, ranking, CIRCO_LIST_LENGTH, gallery, int)
    return problems


def _key_problems(entries: dict[str, Any], query_ids: list[str], may_be_absent: set[str]) -> list[str]:
    absent = [q for q in query_ids if q not in entries and q not in may_be_absent]
    extra = sorted(set(entries) - set(query_ids))
    problems = []
    if absent:
        problems.append(f"{len(absent)} queries have no entry (first: {absent[:5]})")
    if extra:
        problems.append(f"{len(extra)} keys are not query ids of this split (first: {extra[:5]})")
    return problems


def _list_problems(query_id: str, ranking: Any, length: int, allowed: set, kind: type) -> list[str]:
    if not isinstance(ranking, list) or not all(isinstance(i, kind) and not isinstance(i, bool) for i in ranking):
        return [f"{query_id}: must be a list of {kind.__name__} ids"]
    problems = []
    if len(ranking) != length:
        problems.append(f"{query_id}: {len(ranking)} ids, {length} expected")
    if len(set(ranking)) != len(ranking):
        problems.append(f"{query_id}: repeated ids")
    unknown = [i for i in ranking if i not in allowed]
    if unknown:
        problems.append(f"{query_id}: ids outside the allowed candidates (first: {unknown[:3]})")
    return problems


def write_result_submissions(
    result: EvalResult, units: Sequence[BenchmarkData], out_dir: str | Path
) -> list[WrittenSubmission]:
    """Write (validated) server files from an evaluation's rankings: CIRR's two files, or CIRCO's one.

    Names: ``{method}.{benchmark}.{split}.recall.json`` / ``.recall_subset.json`` (CIRR format) and
    ``{method}.circo.{split}.json``. FashionIQ has no test server, so nothing is written for it. Queries
    that missing images leave without a full list (``unanswerable``) are left out of the file: the server
    scores them as misses, and each ``WrittenSubmission`` says how many.
    """
    out_dir = Path(out_dir)
    written = []
    for unit in units:
        ranking = result.rankings.get(unit.name, {})
        stem = out_dir / f"{result.method}.{unit.benchmark}.{unit.split}"
        server_format = benchmark_spec(unit.benchmark).submission
        if server_format == "cirr":
            subset = result.subset_rankings.get(unit.name, {})
            files = [
                (f"{stem}.recall.json", "recall", ranking),
                (f"{stem}.recall_subset.json", "recall_subset", subset),
            ]
        elif server_format == "circo":
            files = [(f"{stem}.json", None, ranking)]
        else:
            continue
        for path, metric, lists in files:
            skip = unanswerable(unit, metric)
            query_ids = [q.query_id for q in unit.queries if q.query_id not in skip]
            rankings = [lists.get(q, []) for q in query_ids]
            if metric is None:
                submission = circo_submission(query_ids, rankings)
            else:
                submission = cirr_submission(metric, query_ids, rankings)
            write_submission(path, submission, unit, partial=True)
            written.append(WrittenSubmission(Path(path), len(unit.queries), len(skip)))
    return written
