"""``fusion-diff demo [--quick]``: the shapes world end to end, from nothing to the results table."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole method on the shapes world and print the results table",
        description=(
            "Builds the shapes world's backbone and CIR benchmark, a pair set and a synthetic triplet set (and their "
            "embeddings), trains stage 1 (prior), stage 2 (Control-Adapter) and FTI4CIR, then evaluates every method "
            "on the benchmark's test split with captioner captions (ground truth only in rows named oracle) and writes "
            "the table (markdown + JSON) and the joint-space plots to OUT_DIR/results. Every step is cached or "
            "resumable: run it again after an interruption. Sizes and training configs: configs/demo.yaml "
            "(configs/demo_quick.yaml with --quick). On a CPU too slow for the budget (budget.minutes, 20 by "
            "default) the training schedules are scaled down to fit, printed and recorded (--no-budget: the "
            "reference schedule)."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="smaller sets and shorter training (a few minutes)")
    parser.add_argument(
        "--no-budget",
        action="store_true",
        help="run the reference schedule whatever this machine's speed (by default the demo times a few training "
        "steps and, if the estimate exceeds the config's budget.minutes, shortens the training schedules to fit "
        "and says so in the table's protocol lines)",
    )
    parser.add_argument(
        "--config", default=None, help="demo YAML config (default: configs/demo.yaml or demo_quick.yaml)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. data.triplets=20000 out_dir=runs/x",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fusion_diff.demo import run_demo

    overrides = [*args.overrides, *(["budget.minutes=null"] if args.no_budget else [])]
    run_demo(quick=args.quick, config_path=args.config, overrides=overrides)
    return 0
