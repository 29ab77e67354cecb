"""The shapes-world benchmark: CIRR's file format, read by the CIRR loader, plus its oracle captions.

Written by ``fusion-diff world benchmark --out DIR`` (``data_synth.shapes.benchmark``). Beside the
CIRR files it holds ``oracle/captions.{val,test1}.json`` ({image name: ground-truth caption}), read
ONLY by the oracle rows, and ``captions_train_phrasing/cap.rc2.test1.json`` (the same test edits in
the training generator's phrasing, for the phrasing-gap figure).

The open-edit benchmark (``fusion-diff world benchmark-open``, ``data_synth.shapes.benchmark_open``) is
written in CIRCO's format and read by the CIRCO loader as ``shapes-open``: several ground truths per query,
mAP@K.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from fusion_diff.benchmarks.annotations import TITLES
from fusion_diff.benchmarks.circo import circo_unit_metrics, load_circo
from fusion_diff.benchmarks.cirr import annotation_dir, cirr_split, cirr_unit_metrics, load_cirr
from fusion_diff.benchmarks.report import EvalResult
from fusion_diff.benchmarks.spec import BenchmarkSpec
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


def load_shapes_open(
    root: str | Path, split: str = "test", *, image_root: str | Path | None = None, allow_missing: bool = False
) -> BenchmarkData:
    """Load a split of the open-edit benchmark through the CIRCO loader (gallery: its COCO-style info file)."""
    return load_circo(
        root, split, gallery="coco-info", image_root=image_root, allow_missing=allow_missing, benchmark="shapes-open"
    )


def oracle_captions_path(root: str | Path, split: str) -> Path:
    """``root/oracle/captions.{val,test1}.json`` (next to the CIRR-format files)."""
    return annotation_dir(Path(root)) / "oracle" / f"captions.{cirr_split(split)}.json"


def load_oracle_captions(path: str | Path) -> dict[str, str]:
    """{image name: ground-truth caption}. Only oracle rows may read this file."""
    captions = read_json(path, "shapes-world oracle captions file")
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise DataError(f"{path} is not an oracle captions file ({{image name: caption}} expected).")
    return captions


def edit_kinds(root: str | Path, split: str, benchmark: str = "shapes") -> dict[str, str]:
    """{query id: edit kind} from the benchmark's per-query metadata; two-edit queries are all "composite".

    ``benchmark="shapes-open"`` reads the open-edit benchmark's (kinds such as ``recolour_any``)."""
    if benchmark == "shapes-open":
        from data_synth.shapes.benchmark_open import load_open_meta

        return {str(m["id"]): m["kind"] for m in load_open_meta(root, split)}
    from data_synth.shapes.benchmark import load_meta  # the writer's own reader (imported late: no cycle)

    meta = load_meta(annotation_dir(Path(root)), cirr_split(split))
    return {str(m["pairid"]): "composite" if ":" in m["kind"] else m["kind"] for m in meta}


def recall_at_1_by_kind(result: EvalResult, unit: BenchmarkData, kinds: dict[str, str]) -> dict[str, float]:
    """R@1 (%) of ``result`` on ``unit`` per edit kind: where a method wins and loses against image-only
    (with several ground truths: the share of queries whose first result is one of them)."""
    ranking = result.rankings[unit.name]
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for query in unit.queries:
        if query.query_id not in ranking:
            continue
        kind = kinds.get(str(query.query_id))
        if kind is None:
            raise DataError(f"query {query.query_id} of {unit.name} has no edit kind in the benchmark's meta folder.")
        totals[kind] += 1
        hits[kind] += bool(ranking[query.query_id]) and ranking[query.query_id][0] in query.positives
    return {kind: 100.0 * hits[kind] / totals[kind] for kind in sorted(totals, key=lambda k: (-totals[k], k))}


def kind_table(results: Sequence[EvalResult], unit: BenchmarkData, kinds: dict[str, str]) -> str:
    """A markdown table of R@1 per edit kind (rows) and method (columns), with the query count per kind."""
    per_method = {r.method: recall_at_1_by_kind(r, unit, kinds) for r in results}
    counts = Counter(kinds[str(q.query_id)] for q in unit.queries if str(q.query_id) in kinds)
    rows = next(iter(per_method.values()), {})
    lines = ["| edit kind | queries | " + " | ".join(per_method) + " |", "|---|---|" + "---|" * len(per_method)]
    for kind in rows:
        cells = [f"{per_method[m].get(kind, float('nan')):.1f}" for m in per_method]
        lines.append(f"| {kind} | {counts[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TARGET, OUTSIDE = "target", "outside its group"
COMPOSITE_NEAR_MISS = "part or variant of the composite"


def first_result_reasons(root: str | Path, split: str) -> dict[str, tuple[str, dict[str, str]]]:
    """{query id: (edit kind, {hard negative's image name: why it is one})} from the benchmark's meta folder;
    a two-edit query's negatives other than group fillers are one reason (:data:`COMPOSITE_NEAR_MISS`)."""
    from data_synth.shapes.benchmark import FILLER_REASONS, load_meta

    out = {}
    for m in load_meta(annotation_dir(Path(root)), cirr_split(split)):
        composite = ":" in m["kind"]
        reasons = {
            n["name"]: COMPOSITE_NEAR_MISS if composite and n["reason"] not in FILLER_REASONS else n["reason"]
            for n in m["negatives"]
        }
        out[str(m["pairid"])] = ("composite" if composite else m["kind"], reasons)
    return out


def first_result_table(result: EvalResult, unit: BenchmarkData, reasons: dict[str, tuple[str, dict[str, str]]]) -> str:
    """Where each query's first result lands, per edit kind (% of its queries): the target, one of its group's
    hard negatives (by why it is one: the right edit on the wrong object, the wrong value, the wrong edit; a
    neighbour or random filler), or an image outside the group. Tells a kind that confuses near misses from
    one that is lost."""
    ranking = result.rankings[unit.name]
    counts: dict[str, Counter[str]] = {}
    for query in unit.queries:
        if not ranking.get(query.query_id):
            continue
        kind, negatives = reasons[str(query.query_id)]
        first = ranking[query.query_id][0]
        where = TARGET if first in query.positives else negatives.get(first, OUTSIDE)
        counts.setdefault(kind, Counter())[where] += 1
    columns = [TARGET, *sorted({w for c in counts.values() for w in c} - {TARGET, OUTSIDE}), OUTSIDE]
    lines = [f"| edit kind | queries | {' | '.join(columns)} |", "|---|---|" + "---|" * len(columns)]
    for kind in sorted(counts, key=lambda k: (-sum(counts[k].values()), k)):
        total = sum(counts[kind].values())
        cells = [f"{100.0 * counts[kind][c] / total:.1f}" for c in columns]
        lines.append(f"| {kind} | {total} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SPEC = BenchmarkSpec(
    "shapes", TITLES["shapes"],
    load=lambda root, split, phrasing="benchmark", **common: [load_shapes(root, split, phrasing=phrasing, **common)],
    metrics=cirr_unit_metrics, load_options=("phrasing",), submission="cirr",
)  # fmt: skip
OPEN_SPEC = BenchmarkSpec(
    "shapes-open", TITLES["shapes-open"], load=lambda root, split, **common: [load_shapes_open(root, split, **common)],
    metrics=circo_unit_metrics,
)  # fmt: skip
