"""The ``fusion-diff`` command line: one sub-module per command group, each with ``register``."""

from __future__ import annotations

import argparse
import importlib

# (module under fusion_diff.cli, one-line summary). Each module defines ``register(subparsers)``
# that adds its sub-command(s) with ``set_defaults(func=...)``.
COMMAND_MODULES: tuple[str, ...] = (
    "embed",  # embed images / texts / pairs into a cache
    "sample",  # sample query embeddings with a Fusion-Diff pipeline
    "search",  # top-K search of a gallery cache
    "index",  # gallery indexes (saved retrievers) and composed queries (fusion-diff query)
    "world",  # the shapes world: backbone, benchmark
    "synth",  # synthetic triplet sets
    "caption",  # captioners and the caption cache
    "train",  # Accelerate training: prior, adapter, fti4cir
    "eval",  # benchmark evaluation
    "demo",  # the end-to-end shapes-world demo
    "viz",  # joint-space plots
    "bench",  # speed benchmarks
    "serve",  # the composed-search web page
    "smoke",  # every heavy path once, with throughput
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-diff",
        description="Zero-shot composed image retrieval with fused-embedding diffusion (Fusion-Diff) and FTI4CIR.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of a failure (also accepted anywhere on the line; or FUSION_DIFF_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"fusion_diff.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"fusion_diff.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def _show_progress_notes() -> None:
    """The library's INFO lines (which model runs where, in what precision) go to stderr for the CLI."""
    import logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # no-op when logging is set up already
    logging.getLogger("fusion_diff").setLevel(logging.INFO)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``section.key=value`` overrides may stand anywhere (argparse takes a
    positional list only in one piece: ``--config c.yaml a=1 --resume latest b=2`` would reject ``b=2``)."""
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*(args.overrides or []), *(item for item in extra if not item.startswith("-") and "=" in item)]
        extra = [item for item in extra if item not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    _show_progress_notes()
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    from fusion_diff.cli.failures import entry

    entry()
