"""Query settings of the demo's methods, scored on the shapes benchmark's **val** split.

A sampled query embedding carries diffusion noise, and noise costs retrieval: this script measures
Fusion-Diff's steps, sample averaging, the one-step z0 prediction, the two guidance scales, the
gallery (fused or image embeddings) and the mix-back toward the reference; and FTI4CIR's gallery and
mix-back toward the reference. The demo's defaults are chosen here, on val (never on test). It reuses a
finished demo folder:

    python scripts/sweep_sampling.py --demo-dir runs/demo [--config configs/demo.yaml]   # tables in runs/demo/results/
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
from fusion_diff.demo import Demo, DemoConfig, default_config_path
from fusion_diff.training.config import load_dataclass


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
FTI4CIR_MIX = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", required=True, help="a finished `fusion-diff demo` output folder")
    parser.add_argument("--pipeline", default=None, help="a Fusion-Diff pipeline folder to sweep instead of the demo's stage2/")
    parser.add_argument("--control-mode", default="auto", choices=("auto", "fused", "image"),
                        help="Fusion-Diff's reference control at query time (image: for an adapter trained on f(I_ref))")
    parser.add_argument("--fti4cir", default=None, help="an FTI4CIR checkpoint to sweep (default: the demo's, unless --pipeline)")
    parser.add_argument("--config", default=None, help="the demo config that made it (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="demo config overrides used for that run (section.key=value)")
    args = parser.parse_args()
    if args.fti4cir and not (Path(args.fti4cir) / "config.json").is_file():
        parser.error(f"--fti4cir {args.fti4cir}: no FTI4CIR checkpoint there (config.json missing)")

    config_path = Path(args.config) if args.config else default_config_path(quick=False)
    config = load_dataclass(DemoConfig, config_path, [*args.overrides, f"out_dir={args.demo_dir}"])
    demo = Demo(config, config_path.parent, progress=False)
    demo.embedder = demo.build_backbone()
    evaluator = demo.evaluator("val")
    pipeline = load_pipeline(args.pipeline or demo.path("stage2"))

    reference = evaluator.evaluate(create_method("image-only"))  # the bar to clear, on the same queries
    print(f"image-only: R@1 {reference.metrics['R@1']:.2f}  R@10 {reference.metrics['R@10']:.2f}", flush=True)
    results = [reference]
    for setting in GRID:
        name = "fusion-diff[" + ",".join(f"{key}={value}" for key, value in setting.items()) + "]"
        method = method_factory("fusion-diff")(
            pipeline=pipeline, seed=config.seed, name=name, control_mode=args.control_mode, **setting
        )
        start = time.perf_counter()
        result = evaluator.evaluate(method)
        seconds = time.perf_counter() - start
        print(f"{name}: R@1 {result.metrics['R@1']:.2f}  R@10 {result.metrics['R@10']:.2f}  ({seconds:.0f} s)", flush=True)
        results.append(result)
    best = max(results[1:], key=lambda r: r.metrics["R@1"])
    fti4cir = Path(args.fti4cir) if args.fti4cir else demo.path("fti4cir")
    if (args.fti4cir or not args.pipeline) and (fti4cir / "config.json").is_file():
        for gallery, mix in itertools.product(("image", "fused"), FTI4CIR_MIX):
            name = f"fti4cir[gallery_mode={gallery},mix_reference={mix}]"
            method = create_method("fti4cir", checkpoint=str(fti4cir), mix_reference=mix, gallery_mode=gallery, name=name)
            result = evaluator.evaluate(method)
            print(f"{method.name}: R@1 {result.metrics['R@1']:.2f}  R@10 {result.metrics['R@10']:.2f}", flush=True)
            results.append(result)
    print(markdown_table(results))
    print(f"best Fusion-Diff setting on val by R@1: {best.method}")
    stem = "shapes-val-sampling-sweep" + (f"-{Path(args.pipeline).name}" if args.pipeline else "")
    write_results(results, demo.path("results"), stem)


if __name__ == "__main__":
    main()
