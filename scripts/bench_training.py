"""Training throughput (samples/s) of stage 1 and stage 2 for the default configs, on precomputed embeddings.

Random unit-norm embeddings stand in for the caches (training reads only embeddings, so the
numbers are those of real data of the same size). Stage 1 runs first; its prior is stage 2's.
Throughput is averaged over the logged intervals after the first (warm-up). On a shared machine
the figures are noisy: report the load with them.

    python scripts/bench_training.py [--steps 40] [--dim 256] [--threads 2] [--max-text-tokens 0 16]

``--max-text-tokens``: one stage 1 + stage 2 run per value (0: pooled text; N: token-level text, random
caption lengths 2..N, instruction lengths 2..``--instruction-length``, 16 by default: the shapes world's
longest instruction), with the samples/s ratios to the first value. A batch costs its longest text.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from fusion_diff.training.config import load_config
from fusion_diff.training.data import PAIR_FIELDS, TRIPLET_FIELDS, write_random_caches
from fusion_diff.training.loop import train

REPO = Path(__file__).resolve().parents[1]


def bench(config_path: Path, overrides: list[str]) -> tuple[float, float]:
    """(samples/s, wall seconds incl. set-up) of one training run."""
    config = load_config(config_path, overrides=overrides)
    start = time.perf_counter()
    result = train(config)
    return result.samples_per_second, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per stage")
    parser.add_argument("--num", type=int, default=20_000, help="random embeddings per cache")
    parser.add_argument("--dim", type=int, default=256, help="embedding size (the shapes-world backbone's is 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--stage1-config", type=Path, default=REPO / "configs/stage1_prior.yaml")
    parser.add_argument("--stage2-config", type=Path, default=REPO / "configs/stage2_adapter.yaml")
    parser.add_argument("--max-text-tokens", type=int, nargs="+", default=[0], help="0: pooled text; N: token-level")
    parser.add_argument("--instruction-length", type=int, default=16, help="longest instruction (token-level runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    first = None
    for tokens in args.max_text_tokens:
        s1, t1, s2, t2 = run_stages(args, tokens)
        first = first or (s1, s2)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        text = f"token-level text, max_text_tokens={tokens}" if tokens else "pooled text"
        print(f"threads={args.threads} dim={args.dim} steps={args.steps} {text} load-average(1 min)={load:.1f}")
        ratio = [
            f" [{s / f:.2f}x the first text setting]" if len(args.max_text_tokens) > 1 else ""
            for s, f in zip((s1, s2), first)
        ]
        print(
            f"stage 1 (prior, {args.stage1_config.name}):   {s1:8.0f} samples/s   (run incl. set-up {t1:.1f} s){ratio[0]}"
        )
        print(
            f"stage 2 (adapter, {args.stage2_config.name}): {s2:8.0f} samples/s   (run incl. set-up {t2:.1f} s){ratio[1]}"
        )


def run_stages(args: argparse.Namespace, tokens: int) -> tuple[float, float, float, float]:
    """Stage 1 then stage 2 on fresh random caches (with token caches when ``tokens``)."""
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        tmp = Path(tmp)
        write_random_caches(tmp / "pairs", PAIR_FIELDS, args.num, args.dim, seed=0, max_text_tokens=tokens or None)
        write_random_caches(
            tmp / "triplets", TRIPLET_FIELDS, args.num, args.dim, seed=1,
            max_text_tokens=tokens or None, max_length=min(tokens, args.instruction_length) or None,
        )  # fmt: skip
        common = [
            f"schedule.max_train_steps={args.steps}",
            "checkpointing.every_n_steps=0",
            f"logging.log_every_n_steps={max(1, args.steps // 4)}",
            "logging.report_to=none",
            "logging.progress_bar=false",
            "validation.function=null",
        ]
        stage1 = [
            f"output_dir={tmp / 's1'}",
            f"data.pair_embeddings={tmp / 'pairs'}",
            f"model.max_text_tokens={tokens}",
        ]
        s1, t1 = bench(args.stage1_config, common + stage1)
        s2, t2 = bench(
            args.stage2_config,
            common
            + [
                f"output_dir={tmp / 's2'}",
                f"model.prior_path={tmp / 's1'}",
                f"data.triplet_embeddings={tmp / 'triplets'}",
            ],
        )
    return s1, t1, s2, t2


if __name__ == "__main__":
    main()
