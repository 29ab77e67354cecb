"""``fusion-diff train prior|adapter|fti4cir --config FILE [--resume latest] [section.key=value ...]``.

Runs under ``accelerate launch`` too: ``accelerate launch -m fusion_diff.cli train adapter --config ...``
(or ``accelerate launch adapters/train_adapter.py --config ...``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fusion_diff.cli.arguments import positive_int

TASK_HELP = {
    "prior": "Stage 1: the diffusion prior over fused embeddings, on image-caption pair embeddings.",
    "adapter": "Stage 2: the Control-Adapter on synthetic triplet embeddings, with the stage-1 prior frozen.",
    "fti4cir": "FTI4CIR: the subject/attribute textual-inversion networks on unlabeled images.",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the prior (stage 1), the Control-Adapter (stage 2) or FTI4CIR with Accelerate",
        description=(
            "Train one model from a YAML config (see configs/). Unknown keys or wrong types in the config stop the "
            "run before training. Checkpoints go to OUTPUT_DIR/checkpoints, logs to OUTPUT_DIR/logs, and the final "
            "weights (save_pretrained format) with the effective config to OUTPUT_DIR. Multi-process: "
            "accelerate launch --config_file adapters/accelerate/<setup>.yaml -m fusion_diff.cli train ..."
        ),
    )
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, summary in TASK_HELP.items():
        add_task_arguments(tasks.add_parser(name, help=summary, description=summary))


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of one training task; shared with the ``adapters/train_*.py`` entry scripts."""
    parser.add_argument(
        "--config", type=Path, required=True, help="YAML training config (e.g. configs/stage2_adapter.yaml)."
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="latest|DIR",
        help="continue from the newest checkpoint in OUTPUT_DIR/checkpoints ('latest'; starts fresh if there is "
        "none) or from a given checkpoint folder; the result equals an uninterrupted run",
    )
    parser.add_argument(
        "--stop-at-step",
        type=positive_int,
        default=None,
        metavar="N",
        help="save a checkpoint and exit at step N (e.g. to fit a job time limit); continue with --resume latest",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, checked like the file's keys, e.g. schedule.max_train_steps=2000",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fusion_diff.training.config import load_config

    config = load_config(args.config, task=args.task, overrides=args.overrides)  # a bad config fails in a second
    from fusion_diff.training.loop import train

    result = train(config, resume=args.resume, stop_at_step=args.stop_at_step)
    from accelerate import PartialState

    if PartialState().is_main_process:
        state = "finished" if result.finished else "stopped (continue with --resume latest)"
        loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
        print(
            f"{args.task}: {state} at step {result.global_step}; last loss {loss}; "
            f"{result.samples_per_second:.0f} samples/s; output in {result.output_dir}"
        )
        for key, value in result.validation.items():
            print(f"  {key} = {value:.4f}")
    return 0


def main_for_task(task: str, argv: list[str] | None = None) -> int:
    """Entry point of ``adapters/train_<task>.py``: the same arguments as ``fusion-diff train <task>``."""
    from fusion_diff.cli import parse_args

    parser = argparse.ArgumentParser(prog=f"train_{task}.py", description=TASK_HELP[task])
    add_task_arguments(parser)
    args = parse_args(parser, argv)
    args.task = task
    return args.func(args)
