"""Query settings of the demo's methods, scored on the shapes benchmark's **val** split.

A sampled query embedding carries diffusion noise, and noise costs retrieval: this script measures
Fusion-Diff's steps, sample averaging, the one-step z0 prediction, the two guidance scales, the
gallery (fused or image embeddings) and the mix-back toward the reference; and FTI4CIR's gallery and
mix-back toward the reference. The demo's defaults are chosen here, on val (never on test). It reuses a
finished demo folder:

    python scripts/sweep_sampling.py --demo-dir runs/demo [--config configs/demo.yaml]   # tables in runs/demo/results/
    python scripts/sweep_sampling.py --demo-dir runs/demo --grid multi-sample --test-best \
        --also runs/demo/ablation-regression/stage2          # steps x samples x mean/max/lse, then test once
    python scripts/sweep_sampling.py --demo-dir runs/demo --grid multi-sample --benchmark shapes-open --test-best \
        --also runs/demo/ablation-regression/stage2          # the same on the open-edit benchmark (several right
                                                             # answers; a val split of its own is written first)
    python scripts/sweep_sampling.py --demo-dir runs/demo --grid rerank --test-best \
        --also runs/demo/ablation-regression/stage2          # the first hits re-ranked by the diffusion loss
    python scripts/sweep_sampling.py --demo-dir runs/demo --pipeline runs/k3   # another stage-2 run on the same data
    python scripts/sweep_sampling.py --demo-dir runs/demo --pipeline runs/img --control-mode image  # f(I_ref) control
    python scripts/sweep_sampling.py --demo-dir runs/demo --fti4cir runs/fti600  # another FTI4CIR checkpoint
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from fusion_diff.baselines import create_method
from fusion_diff.baselines.registry import load_pipeline, method_factory
from fusion_diff.benchmarks.report import markdown_table, write_results
from fusion_diff.demo import Demo, pipeline_row_name


def _setting(
    steps: int, samples: int, control: float, text: float, mix: float = 0.0, gallery: str = "fused"
) -> dict[str, float | str]:
    return {
        "num_inference_steps": steps, "num_samples": samples, "control_guidance": control,
        "text_guidance": text, "mix_reference": mix, "gallery_mode": gallery,
    }  # fmt: skip


GRID = [
    *[_setting(1, 1, c, t) for c, t in itertools.product((1.0, 1.5, 2.0, 3.0), (1.0, 1.5, 2.0, 3.0))],
    *[  # averaging one-step predictions from several noises, with and without a small mix-back
        _setting(1, n, c, t, m) for (c, t), n, m in itertools.product(((1.0, 1.5), (1.5, 2.0)), (4, 8), (0.0, 0.1))
    ],
    *[  # mix-back toward the reference
        _setting(1, 1, c, t, m)
        for (c, t), m in itertools.product(((1.0, 1.5), (1.5, 2.0)), (0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
    ],
    _setting(1, 8, 1.5, 2.0, 0.4),
    _setting(10, 1, 1.5, 1.5),
    _setting(10, 8, 1.5, 1.5),
    _setting(10, 1, 2.0, 2.0),
    _setting(50, 1, 1.5, 1.5),
    *[  # the image gallery (no captioner on the gallery side), mixed toward f(I_ref)
        _setting(1, 8, c, t, m, gallery="image")
        for (c, t), m in itertools.product(((1.0, 1.5), (1.5, 2.0), (2.0, 2.0)), (0.0, 0.2, 0.3, 0.4))
    ],
]
REDUCTIONS = (
    {"sample_reduction": "mean"},
    {"sample_reduction": "max"},
    {"sample_reduction": "lse", "sample_temperature": 0.05},
)
# What sampling several queries buys: more steps leave more diversity between samples than the one-step z0
# prediction, lower guidance more still; scoring by the best sample (max, lse) lets each sample reach a
# different right answer where an edit has several.
MULTI_SAMPLE_GRID = [
    *[{**_setting(1, n, 1.5, 2.0, 0.1), **r} for n, r in itertools.product((8, 32), REDUCTIONS)],
    *[{**_setting(10, 16, 1.5, 2.0, 0.1), **r} for r in REDUCTIONS],
    *[{**_setting(10, 16, 1.0, 1.0, 0.1), **r} for r in REDUCTIONS[:2]],  # weaker guidance: more diverse samples
    *[{**_setting(25, 8, 1.5, 2.0, 0.1), **r} for r in REDUCTIONS[:2]],
]
# Re-ranking the demo query's first hits by the diffusion loss of each candidate (a likelihood a regressor has not):
# how much weight the loss gets against the first-stage score, and how deep it looks.
RERANK_GRID = [
    _setting(1, 8, 1.5, 2.0, 0.1),  # the demo's query, not re-ranked
    *[{**_setting(1, 8, 1.5, 2.0, 0.1), "rerank_top_k": 20, "rerank_weight": w} for w in (1.0, 2.0, 4.0, 8.0)],
    {**_setting(1, 8, 1.5, 2.0, 0.1), "rerank_top_k": 50, "rerank_weight": 4.0},
]
GRIDS = {"query-settings": GRID, "multi-sample": MULTI_SAMPLE_GRID, "rerank": RERANK_GRID}
METRIC = {"shapes": "R@1", "shapes-open": "mAP@5"}
FTI4CIR_MIX = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", required=True, help="a finished `fusion-diff demo` output folder")
    parser.add_argument("--pipeline", default=None, help="a Fusion-Diff pipeline folder to sweep instead of the demo's stage2/")
    parser.add_argument("--control-mode", default="auto", choices=("auto", "fused", "image"),
                        help="Fusion-Diff's reference control at query time (image: for an adapter trained on f(I_ref))")
    parser.add_argument("--fti4cir", default=None, help="an FTI4CIR checkpoint to sweep (default: the demo's, unless --pipeline)")
    parser.add_argument("--grid", default="query-settings", choices=sorted(GRIDS), help="which settings to sweep")
    parser.add_argument("--benchmark", default="shapes", choices=sorted(METRIC),
                        help="shapes (one right answer) or shapes-open (several; a val split is written for it)")
    parser.add_argument("--open-val-queries", type=int, default=300, help="with --benchmark shapes-open: val queries")
    parser.add_argument("--also", nargs="+", default=[], metavar="PIPELINE",
                        help="other pipelines (ablations) scored with the demo's settings beside the sweep")
    parser.add_argument("--test-best", action="store_true",
                        help="then score the val-selected setting (and --also) once on the test split")
    parser.add_argument("--config", default=None, help="the demo config that made it (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="demo config overrides used for that run (section.key=value)")
    args = parser.parse_args()
    if args.fti4cir and not (Path(args.fti4cir) / "config.json").is_file():
        parser.error(f"--fti4cir {args.fti4cir}: no FTI4CIR checkpoint there (config.json missing)")

    demo = Demo.finished(args.demo_dir, args.config, args.overrides)
    metric = METRIC[args.benchmark]
    if args.benchmark == "shapes-open":
        demo.build_open_benchmark("val", args.open_val_queries)
    evaluator = demo.evaluator("val", benchmark=args.benchmark)
    pipeline = load_pipeline(args.pipeline or demo.path("stage2"))

    def score(method, evaluator=evaluator):
        start = time.perf_counter()
        result = demo.scored(evaluator, method)
        shown = "  ".join(f"{key} {result.metrics[key]:.2f}" for key in (metric, "R@10", "mAP@50") if key in result.metrics)
        print(f"{method.name}: {shown}  ({time.perf_counter() - start:.0f} s)", flush=True)
        return result

    def fusion_diff(name, setting, path=None):
        return method_factory("fusion-diff")(
            pipeline=load_pipeline(path) if path else pipeline, seed=demo.config.seed, name=name,
            control_mode=args.control_mode, **setting,
        )  # fmt: skip

    results = [score(create_method("image-only"))]  # the bar to clear, on the same queries
    settings = {"fusion-diff[" + ",".join(f"{k}={v}" for k, v in s.items()) + "]": s for s in GRIDS[args.grid]}
    sweep = [score(fusion_diff(name, setting)) for name, setting in settings.items()]
    ablations = {pipeline_row_name(path): path for path in args.also}
    results += sweep + [score(fusion_diff(name, demo.fusion_diff_options(), path)) for name, path in ablations.items()]
    best = max(sweep, key=lambda r: r.metrics[metric])
    fti4cir = Path(args.fti4cir) if args.fti4cir else demo.path("fti4cir")
    if args.grid == "query-settings" and (args.fti4cir or not args.pipeline) and (fti4cir / "config.json").is_file():
        for gallery, mix in itertools.product(("image", "fused"), FTI4CIR_MIX):
            name = f"fti4cir[gallery_mode={gallery},mix_reference={mix}]"
            method = create_method("fti4cir", checkpoint=str(fti4cir), mix_reference=mix, gallery_mode=gallery, name=name)
            results.append(score(method))
    print(markdown_table(results))
    print(f"best Fusion-Diff setting on val by {metric}: {best.method}")
    stem = f"{args.benchmark}-val-{args.grid}-sweep" + (f"-{Path(args.pipeline).name}" if args.pipeline else "")
    write_results(results, demo.path("results"), stem)
    if args.test_best:  # the val-selected setting, scored once on test beside the demo's default and the ablations
        if args.benchmark == "shapes-open":
            demo.build_open_benchmark("test")
        test = demo.evaluator("test", benchmark=args.benchmark)
        rows = [score(create_method("image-only"), test)]
        rows.append(score(fusion_diff("fusion-diff (demo settings)", demo.fusion_diff_options()), test))
        rows.append(score(fusion_diff(f"{best.method} (val-selected)", settings[best.method]), test))
        rows += [score(fusion_diff(name, demo.fusion_diff_options(), path), test) for name, path in ablations.items()]
        print(markdown_table(rows))
        write_results(rows, demo.path("results"), stem.replace("-val-", "-test-") + "-best")


if __name__ == "__main__":
    main()
