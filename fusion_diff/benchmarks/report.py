"""Evaluation results: the numbers with their full protocol, as JSON and as a markdown table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_diff.utils.io import atomic_path, write_json_atomic


@dataclass
class EvalResult:
    """One method on one benchmark split: metrics (%), the protocol that defines them, and the rankings.

    ``rankings`` / ``subset_rankings`` map each evaluation unit's name (e.g. ``cirr/test1``) to
    ``{query id: ranked gallery ids}`` (top-50; CIRR group top-3); they feed submission files
    and are left out of the JSON record.
    """

    method: str
    metrics: dict[str, float]
    protocol: dict[str, Any]
    rankings: dict[str, dict[str, list[str]]] = field(default_factory=dict, repr=False)
    subset_rankings: dict[str, dict[str, list[str]]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "metrics": self.metrics, "protocol": self.protocol}

    def protocol_line(self) -> str:
        """The short protocol description every reported number carries."""
        p = self.protocol
        parts = [
            f"{p['benchmark']}/{p['split']}",
            f"{p['queries_evaluated']} queries",
            f"backbone {p['backbone']['name']}",
            f"gallery {p['gallery_mode']}",
            f"captioner {p['captioner'] or 'none'}",
            f"reference inputs {'+'.join(p['reference_inputs'])}",
            f"reference removed: {'yes' if p['ranking']['reference_removed'] else 'no'}",
            "ties against the method",
        ]
        if "fashioniq_captions" in p:
            parts.append(f"FashionIQ captions: {p['fashioniq_captions']}")
        if "circo_shared_concept" in p:
            parts.append(f"CIRCO shared_concept: {'on' if p['circo_shared_concept'] else 'off'}")
        parts.append(f"missing images {p['missing_images']}")
        if p.get("queries_dropped"):
            parts.append(f"queries dropped (reference missing) {p['queries_dropped']}")
        if p.get("queries_missing_targets"):
            best = ", ".join(f"{name} {value:.1f}%" for name, value in p["best_possible"].items())
            parts.append(f"queries with a missing target {p['queries_missing_targets']} (best possible: {best})")
        if p.get("schedule"):  # the demo's training schedule (reference, or scaled to a time budget)
            parts.append(f"schedule: {p['schedule']}")
        method = {k: v for k, v in p["method"].items() if k not in ("method", "name")}
        return "; ".join(parts) + f"; method {self.method} {json.dumps(method, sort_keys=True, default=str)}"


def markdown_table(results: Sequence[EvalResult], digits: int = 2) -> str:
    """One row per result (columns: every metric, in first-seen order), then each row's protocol line."""
    columns = list(dict.fromkeys(name for result in results for name in result.metrics))
    lines = [
        "| " + " | ".join(["method", *columns]) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for result in results:
        cells = [f"{result.metrics[c]:.{digits}f}" if c in result.metrics else "" for c in columns]
        lines.append("| " + " | ".join([result.method, *cells]) + " |")
    lines.append("")
    lines += [f"- **{result.method}**: {result.protocol_line()}" for result in results]
    return "\n".join(lines) + "\n"


def write_results(results: Sequence[EvalResult], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """``{stem}.json`` (metrics + protocol of every result) and ``{stem}.md`` (the table), written atomically."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json_atomic(json_path, [result.to_dict() for result in results])
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_table(results), encoding="utf-8")
    return json_path, md_path


def read_results(path: str | Path) -> list[EvalResult]:
    """The results a ``write_results`` JSON holds (metrics and protocol; rankings are not kept there)."""
    from fusion_diff.utils.io import read_json

    return [EvalResult(r["method"], r["metrics"], r["protocol"]) for r in read_json(Path(path), "results table")]


def write_rankings(results: Sequence[EvalResult], out_dir: str | Path, stem: str) -> Path:
    """``{stem}.rankings.json``: every result's ranked ids per query (top-50; CIRR group top-3 under
    ``subset_rankings``), written atomically, so that no ranking is lost when a later step fails."""
    path = Path(out_dir) / f"{stem}.rankings.json"
    records = [
        {"method": r.method, "rankings": r.rankings, "subset_rankings": r.subset_rankings} for r in results
    ]
    write_json_atomic(path, records, indent=None)
    return path
