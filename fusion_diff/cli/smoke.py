"""``fusion-diff smoke``: every heavy path once (embed, caption, both stages, sampling, eval) with throughput."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from fusion_diff.smoke import smoke_main

    return smoke_main(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "smoke",
        help="smoke run: embed, caption, train both stages, sample and evaluate once, printing throughput",
        description="Random-weight models at real sizes (--profile real: open_clip ViT-L-14, a BLIP-large-shaped "
        "captioner, the ViT-L-14 recipe's prior; 2,000 images, 200 steps per stage, 10,000 sampled queries) or toy "
        "sizes (--profile toy, the default on a CPU). Prints images/s, samples/s, queries/s and the peak memory of "
        "each step; exits non-zero on any failure. The retrieval numbers of random weights mean nothing.",
    )
    parser.add_argument("--device", default="cpu", help="cuda or cpu")
    parser.add_argument(
        "--profile", choices=("real", "toy"), default=None, help="sizes (default: real on cuda, toy on cpu)"
    )
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                        help="every model's precision (default: bf16 on cuda, fp32 on cpu)")  # fmt: skip
    parser.add_argument("--out", default="runs/smoke", help="working folder (models, images, caches, runs)")
    parser.add_argument("--cirr-annotations", default=None,
                        help="CIRR annotation folder (captions/, image_splits/); default $FUSION_DIFF_BENCHMARKS/cirr "
                        "or ../shared/benchmarks/cirr beside the repository")  # fmt: skip
    parser.set_defaults(func=run)
