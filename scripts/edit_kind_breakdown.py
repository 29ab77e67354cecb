"""R@1 per edit kind on the shapes benchmark's **val** split, in the benchmark's and the training generator's
phrasing: which edits a finished demo's Fusion-Diff (and its ablations) gets right, and whether a failing kind
fails for want of the words (only the held-out phrasing fails) or for want of the operation (both fail); and,
per model, where each kind's first result lands (the target, which kind of hard negative of its group, or
outside the group): a kind that confuses near misses or one that is lost; and, for the removals, how many wrong
first results still show the very object the instruction removes (read from the benchmark's oracle captions:
an analysis of the rankings, never an input of a method).

    python scripts/edit_kind_breakdown.py --demo-dir runs/demo [--also runs/demo/ablation-regression/stage2] \
        [--config configs/demo.yaml] [section.key=value ...]

Every model is scored with the demo's query settings and captioner; tables go to
``<demo-dir>/results/shapes-val-by-edit-{benchmark,training}-phrasing.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_synth.shapes.benchmark import load_meta
from data_synth.shapes.captions import parse_caption
from fusion_diff.baselines import create_method
from fusion_diff.baselines.registry import load_pipeline, method_factory
from fusion_diff.benchmarks.cirr import annotation_dir
from fusion_diff.benchmarks.report import EvalResult
from fusion_diff.benchmarks.shapes import (
    edit_kinds,
    first_result_reasons,
    first_result_table,
    kind_table,
    load_oracle_captions,
    oracle_captions_path,
)
from fusion_diff.benchmarks.types import BenchmarkData
from fusion_diff.demo import Demo, pipeline_row_name
from fusion_diff.utils.io import atomic_path


def removed_object_kept(result: EvalResult, unit: BenchmarkData, root: Path) -> str:
    """Of the removal queries whose first result is wrong, the share whose first result still holds the object
    to be removed: the very object (shape, colour, size, cell), or one of its shape and colour anywhere (the
    object changed or moved instead of removed); from the oracle captions."""
    captions = load_oracle_captions(oracle_captions_path(root, "val"))
    meta = load_meta(annotation_dir(root), "val")
    removed = {str(m["pairid"]): m["edit"]["objects"][0] for m in meta if m["kind"] == "remove"}
    ranking = result.rankings[unit.name]
    wrong = exact = alike = 0
    for query in unit.queries:
        obj, first = removed.get(str(query.query_id)), (ranking.get(query.query_id) or [None])[0]
        if obj is None or first is None or first in query.positives:
            continue
        wrong += 1
        shown = [(o.shape, o.colour, o.size, o.position) for o in parse_caption(captions[first]).objects]
        exact += (obj["shape"], obj["colour"], obj["size"], tuple(obj["position"])) in shown
        alike += any(shape == obj["shape"] and colour == obj["colour"] for shape, colour, _, _ in shown)
    return (
        f"{result.method}: of {wrong} wrong first results, {100 * exact / max(wrong, 1):.1f}% still hold the very "
        f"object, {100 * alike / max(wrong, 1):.1f}% one of its shape and colour"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", required=True, help="a finished `fusion-diff demo` output folder")
    parser.add_argument("--also", nargs="+", default=[], metavar="PIPELINE", help="other pipelines (ablations) to score")
    parser.add_argument("--config", default=None, help="the demo config that made it (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="demo config overrides used for that run (section.key=value)")
    args = parser.parse_args()

    demo = Demo.finished(args.demo_dir, args.config, args.overrides)
    pipelines = {"fusion-diff": demo.path("stage2")}
    pipelines.update({pipeline_row_name(path): Path(path) for path in args.also})
    kinds = edit_kinds(demo.path("benchmark"), "val")
    reasons = first_result_reasons(demo.path("benchmark"), "val")
    for phrasing in ("benchmark", "training"):
        evaluator = demo.evaluator("val", phrasing=phrasing)
        results = [demo.scored(evaluator, create_method("image-only"))]
        for name, path in pipelines.items():
            method = method_factory("fusion-diff")(pipeline=load_pipeline(path), name=name, **demo.fusion_diff_options())
            results.append(demo.scored(evaluator, method))
        overall = "; ".join(f"{r.method} {r.metrics['R@1']:.2f}" for r in results)
        table = f"R@1 per edit kind, val split, {phrasing} phrasing (all kinds: {overall})\n\n"
        table += kind_table(results, evaluator.units[0], kinds)
        for result in results:
            table += f"\nWhere {result.method}'s first result lands, per edit kind (% of its queries)\n\n"
            table += first_result_table(result, evaluator.units[0], reasons)
        table += "\nRemovals with a wrong first result: does it still show the object to remove? (oracle captions)\n\n"
        unit, root = evaluator.units[0], demo.path("benchmark")
        table += "".join(f"- {removed_object_kept(r, unit, root)}\n" for r in results)
        print(table, flush=True)
        with atomic_path(demo.path("results") / f"shapes-val-by-edit-{phrasing}-phrasing.md") as tmp:
            tmp.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
