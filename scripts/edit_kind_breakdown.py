"""R@1 per edit kind on the shapes benchmark's **val** split, in the benchmark's and the training generator's
phrasing: which edits a finished demo's Fusion-Diff (and its ablations) gets right, and whether a failing kind
fails for want of the words (only the held-out phrasing fails) or for want of the operation (both fail).

    python scripts/edit_kind_breakdown.py --demo-dir runs/demo [--also runs/demo/ablation-regression/stage2] \
        [--config configs/demo.yaml] [section.key=value ...]

Every model is scored with the demo's query settings and captioner; tables go to
``<demo-dir>/results/shapes-val-by-edit-{benchmark,training}-phrasing.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fusion_diff.baselines import create_method
from fusion_diff.baselines.registry import load_pipeline, method_factory
from fusion_diff.benchmarks.shapes import edit_kinds, kind_table
from fusion_diff.demo import Demo, pipeline_row_name
from fusion_diff.utils.io import atomic_path


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
    for phrasing in ("benchmark", "training"):
        evaluator = demo.evaluator("val", phrasing=phrasing)
        results = [demo.scored(evaluator, create_method("image-only"))]
        for name, path in pipelines.items():
            method = method_factory("fusion-diff")(pipeline=load_pipeline(path), name=name, **demo.fusion_diff_options())
            results.append(demo.scored(evaluator, method))
        overall = "; ".join(f"{r.method} {r.metrics['R@1']:.2f}" for r in results)
        table = f"R@1 per edit kind, val split, {phrasing} phrasing (all kinds: {overall})\n\n"
        table += kind_table(results, evaluator.units[0], kinds)
        print(table, flush=True)
        with atomic_path(demo.path("results") / f"shapes-val-by-edit-{phrasing}-phrasing.md") as tmp:
            tmp.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
