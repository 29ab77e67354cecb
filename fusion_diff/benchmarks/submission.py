"""Test-server submission files of CIRR and CIRCO, and a validator to run before uploading.

- CIRR (https://github.com/Cuberick-Orion/CIRR/blob/main/Test-split_server.md): two JSON files,
  ``{"version": "rc2", "metric": "recall", "<pairid>": [top-50 image names]}`` and the same with
  ``"metric": "recall_subset"`` and the top-3 of the query's group (reference excluded). At most 5 MB.
- CIRCO (https://circo.micc.unifi.it/): ``{"<query id>": [50 unique COCO image ids]}`` covering every
  test query.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusion_diff.benchmarks.report import EvalResult
from fusion_diff.benchmarks.types import BenchmarkData
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


def write_submission(path: str | Path, submission: dict[str, Any], data: BenchmarkData) -> Path:
    """Validate ``submission`` against ``data`` and write it atomically (compact JSON, as the servers expect)."""
    validate_submission(submission, data, source=str(path))
    write_json_atomic(path, submission, indent=None)
    return Path(path)


def validate_submission(
    submission: dict[str, Any] | str | Path, data: BenchmarkData, source: str | None = None
) -> None:
    """Raise ``DataError`` listing every problem a test server would reject (or that breaks the protocol).

    ``submission`` is a parsed file or a path. CIRR-format benchmarks and CIRCO are supported.
    """
    if not isinstance(submission, dict):
        source = source or str(submission)
        submission = read_json(submission, "submission file")
    source = source or "submission"
    if data.benchmark == "circo":
        problems = _circo_problems(submission, data)
    elif data.benchmark in ("cirr", "shapes"):
        problems = _cirr_problems(submission, data)
    else:
        raise DataError(f"{data.benchmark} has no test server submission format (CIRR and CIRCO do).")
    if problems:
        shown = "\n  ".join(problems[:PROBLEMS_SHOWN])
        raise DataError(f"{source} is not a valid {data.name} submission ({len(problems)} problems):\n  {shown}")


def _cirr_problems(submission: dict[str, Any], data: BenchmarkData) -> list[str]:
    problems = []
    if submission.get("version") != CIRR_VERSION:
        problems.append(f'"version" must be "{CIRR_VERSION}", found {submission.get("version")!r}')
    metric = submission.get("metric")
    if metric not in CIRR_LIST_LENGTH:
        return problems + [f'"metric" must be "recall" or "recall_subset", found {metric!r}']
    entries = {k: v for k, v in submission.items() if k not in ("version", "metric")}
    problems += _key_problems(entries, [q.query_id for q in data.queries])
    gallery = set(data.gallery)
    for query in data.queries:
        ranking = entries.get(query.query_id)
        if ranking is None:
            continue
        allowed = set(query.group) if metric == "recall_subset" else gallery
        length = min(CIRR_LIST_LENGTH[metric], len(allowed) - 1)
        problems += _list_problems(query.query_id, ranking, length, allowed, str)
        if query.reference in ranking:
            problems.append(f"{query.query_id}: lists its own reference {query.reference} (CIRR removes it)")
    size = len(json.dumps(submission))
    if size > CIRR_MAX_BYTES:
        problems.append(f"{size} bytes: larger than the 5 MB upload limit")
    return problems


def _circo_problems(submission: dict[str, Any], data: BenchmarkData) -> list[str]:
    problems = _key_problems(submission, [q.query_id for q in data.queries])
    gallery = {int(i) for i in data.gallery}
    for query in data.queries:
        ranking = submission.get(query.query_id)
        if ranking is not None:
            problems += _list_problems(query.query_id, ranking, CIRCO_LIST_LENGTH, gallery, int)
    return problems


def _key_problems(entries: dict[str, Any], query_ids: list[str]) -> list[str]:
    absent = [q for q in query_ids if q not in entries]
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


def write_result_submissions(result: EvalResult, units: Sequence[BenchmarkData], out_dir: str | Path) -> list[Path]:
    """Write (validated) server files from an evaluation's rankings: CIRR's two files, or CIRCO's one.

    Names: ``{method}.{benchmark}.{split}.recall.json`` / ``.recall_subset.json`` (CIRR format) and
    ``{method}.circo.{split}.json``. FashionIQ has no test server, so nothing is written for it.
    """
    out_dir = Path(out_dir)
    written = []
    for unit in units:
        ranking = result.rankings.get(unit.name, {})
        query_ids = [q.query_id for q in unit.queries]
        stem = out_dir / f"{result.method}.{unit.benchmark}.{unit.split}"
        if unit.benchmark in ("cirr", "shapes"):
            subset = result.subset_rankings.get(unit.name, {})
            for metric, lists in (("recall", ranking), ("recall_subset", subset)):
                submission = cirr_submission(metric, query_ids, [lists.get(q, []) for q in query_ids])
                written.append(write_submission(f"{stem}.{metric}.json", submission, unit))
        elif unit.benchmark == "circo":
            submission = circo_submission(query_ids, [ranking.get(q, []) for q in query_ids])
            written.append(write_submission(f"{stem}.json", submission, unit))
    return written
