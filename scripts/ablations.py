"""Ablations of Fusion-Diff on the shapes world: what the generative prior, stage 1 and the sampler add.

It runs (or reuses, when the demo already made them) the demo's steps up to stage 2, with the same demo
config, then trains the ablations on the same data, with the same training configs, steps and budget:

- **regression**: stage 1 and stage 2 with ``model.objective=regression``: the same prior + adapter network
  trained to output ``z0`` from (text, control) on one fixed input (no noise, fixed timestep); one forward
  at query time;
- **no stage 1**: stage 2 on a randomly initialised, frozen prior (``model.prior_init=random``).

Then it prints two tables in the demo's format, each row with its protocol line:

- *test split* (held-out phrasing, the demo's query settings and captioner): Fusion-Diff, the regression and
  no-stage-1 ablations, Fusion-Diff with multi-sample scoring (``sample_reduction`` max and lse over
  the same samples the default averages), and with its first hits re-ranked by the diffusion loss (``RERANK``);
- *val split*, the sampling ablation of the demo's stage 2: 1 / 10 / 25 steps with DDIM and DPM-Solver++,
  one sample vs averaged samples, and mean vs max vs log-sum-exp scoring;
- when the demo builds its open-edit benchmark (``world.open_test_queries``), a third table on its test split
  (edits with several right answers, CIRCO's mAP@K): the same rows as the first, where scoring by the best
  of several samples should beat a point estimate if the generative part earns it.

    python scripts/ablations.py --quick          # configs/demo_quick.yaml sizes, out_dir runs/demo-quick
    python scripts/ablations.py                  # the full demo's sizes (runs/demo)
    python scripts/ablations.py --config FILE [section.key=value ...]

Tables go to <out_dir>/results/ablations-test.{md,json} and ablations-val-sampling.{md,json}; when the demo's
own tables are there, ``shapes-test-with-ablations.{md,json}`` (and ``shapes-open-test-with-ablations``) hold
the demo's main table with the ablation rows added: one table to read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fusion_diff.baselines import create_method
from fusion_diff.benchmarks.report import EvalResult, markdown_table, read_results, write_results
from fusion_diff.demo import Demo, DemoConfig, default_config_path
from fusion_diff.training.config import load_dataclass

MULTI_SAMPLE = {"max": {"sample_reduction": "max"}, "lse": {"sample_reduction": "lse", "sample_temperature": 0.05}}
# The demo query's first 20 hits re-ranked by the diffusion loss (a likelihood the regressor cannot give), at the
# weight chosen on val by `scripts/sweep_sampling.py --grid rerank` (R@1 and open-edit mAP@5 alike).
RERANK = {"rerank_top_k": 20, "rerank_weight": 4.0}
SAMPLING_STEPS = (1, 10, 25)
SAMPLERS = ("ddim", "dpm++")
AVERAGED_SAMPLES = 8


def train_ablations(demo: Demo, stage1: Path, regression_loss: str) -> dict[str, Path]:
    """The regression (stage 1 + 2) and no-stage-1 pipelines, trained like the demo's (cached when unchanged)."""
    regression = ["model.objective=regression", f"model.regression_loss={regression_loss}"]
    with demo.step("ablation: regression stage 1"):
        reg1 = demo.train_stage(
            "stage1", demo.stage1_inputs(), out_name="ablation-regression/stage1", variant=regression
        )
    with demo.step("ablation: regression stage 2"):
        reg2 = demo.train_stage(
            "stage2", demo.stage2_inputs(reg1), out_name="ablation-regression/stage2",
            variant=[f"model.regression_loss={regression_loss}"],
        )  # fmt: skip
    with demo.step("ablation: no stage 1 (random prior) stage 2"):
        random2 = demo.train_stage(
            "stage2",
            demo.stage2_inputs(stage1),
            out_name="ablation-no-stage1/stage2",
            variant=["model.prior_init=random"],
        )
    return {"regression": reg2, "no-stage-1": random2}


def fusion_diff_row(name: str, pipeline: Path, options: dict[str, Any]) -> Any:
    return create_method("fusion-diff", pipeline=str(pipeline), name=name, **options)


def test_rows(demo: Demo, stage2: Path, ablations: dict[str, Path], benchmark: str = "shapes") -> list[EvalResult]:
    """Fusion-Diff, its ablations and multi-sample scoring on the test split of the demo's ``benchmark``
    (``shapes``, or the open-edit ``shapes-open``), with the demo's query settings."""
    evaluator = demo.evaluator("test", benchmark=benchmark)
    options = demo.fusion_diff_options()
    rows = [fusion_diff_row("fusion-diff", stage2, options)]
    rows += [fusion_diff_row(f"ablation: {name}", path, options) for name, path in ablations.items()]
    rows += [fusion_diff_row(f"fusion-diff[{r}]", stage2, {**options, **extra}) for r, extra in MULTI_SAMPLE.items()]
    rows.append(fusion_diff_row("fusion-diff[rerank]", stage2, {**options, **RERANK}))
    return [evaluate(demo, evaluator, method) for method in rows]


def sampling_rows(demo: Demo, stage2: Path) -> list[EvalResult]:
    """The sampling ablation on val: steps x sampler with one sample, then averaged and multi-sample scoring."""
    evaluator = demo.evaluator("val")
    base = {k: v for k, v in demo.fusion_diff_options().items() if k not in ("num_inference_steps", "num_samples")}
    settings = [
        {"sampler": sampler, "num_inference_steps": steps, "num_samples": 1}
        for sampler in SAMPLERS
        for steps in SAMPLING_STEPS
    ]
    settings += [{"sampler": "ddim", "num_inference_steps": s, "num_samples": AVERAGED_SAMPLES} for s in (1, 10)]
    settings += [
        {"sampler": "ddim", "num_inference_steps": 1, "num_samples": AVERAGED_SAMPLES, **extra}
        for extra in MULTI_SAMPLE.values()
    ]
    results = []
    for setting in settings:
        name = "fusion-diff[" + ",".join(f"{k}={v}" for k, v in setting.items()) + "]"
        results.append(evaluate(demo, evaluator, fusion_diff_row(name, stage2, {**base, **setting})))
    return results


def with_demo_table(results: Path, demo_stem: str, rows: list[EvalResult]) -> None:
    """``<demo_stem>-with-ablations``: the demo's table (when the demo wrote it) with the ablation rows added."""
    demo_table = results / f"{demo_stem}.json"
    if demo_table.is_file():
        kept = read_results(demo_table)
        known = {r.method for r in kept}
        write_results(kept + [r for r in rows if r.method not in known], results, f"{demo_stem}-with-ablations")


def evaluate(demo: Demo, evaluator: Any, method: Any) -> EvalResult:
    """One row, its protocol naming the schedule it was trained with (the demo's: reference or scaled)."""
    result = demo.scored(evaluator, method)
    print(f"    {method.name}: " + "  ".join(f"{k} {v:.2f}" for k, v in list(result.metrics.items())[:3]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick demo's sizes (configs/demo_quick.yaml)")
    parser.add_argument("--config", default=None, help="a demo config (default: configs/demo.yaml or demo_quick.yaml)")
    parser.add_argument("--regression-loss", default="mse", choices=("mse", "cosine"),
                        help="loss of the regression ablation (the diffusion model's is MSE)")  # fmt: skip
    parser.add_argument("--skip-sampling", action="store_true", help="only the test table (no val sampling sweep)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="demo config overrides")
    args = parser.parse_args()

    config_path = Path(args.config) if args.config else default_config_path(args.quick)
    config = load_dataclass(DemoConfig, config_path, args.overrides)
    demo = Demo(config, config_path.parent)
    stage1, stage2 = demo.prepare()
    ablations = train_ablations(demo, stage1, args.regression_loss)
    results = demo.path("results")
    with demo.step("ablations: test split"):
        table = test_rows(demo, stage2, ablations)
        write_results(table, results, "ablations-test")
        with_demo_table(results, "shapes-test", table)
    print("\nAblations (shapes test split):\n" + markdown_table(table))
    if not args.skip_sampling:
        with demo.step("ablations: sampling (val split)"):
            sweep = sampling_rows(demo, stage2)
            write_results(sweep, results, "ablations-val-sampling")
        print("\nSampling ablation (shapes val split, the demo's stage 2):\n" + markdown_table(sweep))
    if demo.config.world.open_test_queries:  # the demo's open-edit benchmark (several right answers)
        with demo.step("ablations: open-edit benchmark (test split)"):
            open_table = test_rows(demo, stage2, ablations, "shapes-open")
            write_results(open_table, results, "ablations-open-test")
            with_demo_table(results, "shapes-open-test", open_table)
        print("\nAblations (open-edit benchmark, test split; several right answers):\n" + markdown_table(open_table))
    seconds = ", ".join(f"{name} {value:.0f} s" for name, value in demo.timings.items())
    print(f"Wrote {results}/ablations-*.md and .json. Step times: {seconds}")


if __name__ == "__main__":
    main()
