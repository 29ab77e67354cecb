"""``fusion-diff serve``: the composed-search web page over a saved retriever (default: the demo's shapes gallery)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusion_diff.cli.arguments import port, positive_int

DEFAULT_DEMO_DIR = Path("runs/demo")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="a web page for composed search (reference image + text) over a saved retriever",
        description=(
            "Starts a Gradio page on HOST:PORT: upload a reference or click a gallery image, type what should change, "
            "pick a method (or two, side by side) and its settings, and see the top-k gallery images with scores and "
            "captions, the reference's caption, the query time and where the query landed in the joint space. "
            "By default it serves the shapes-world gallery that `make demo` leaves in runs/demo, with its test queries "
            "behind a 'random test query' button. Works offline (system fonts, no analytics). Needs the serve extra: "
            "pip install -e '.[serve]'."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--retriever", type=Path, action="append", default=None,
        help="a saved ComposedRetriever folder; give two (a fused and an image gallery) to switch gallery modes",
    )  # fmt: skip
    source.add_argument(
        "--demo-dir", type=Path, default=None,
        help=f"a `fusion-diff demo` output folder: its retriever, benchmark and FTI4CIR (default {DEFAULT_DEMO_DIR})",
    )  # fmt: skip
    parser.add_argument(
        "--benchmark", type=Path, default=None,
        help="a shapes-world benchmark folder whose test queries the 'random test query' button draws from",
    )  # fmt: skip
    parser.add_argument("--fti4cir", type=Path, default=None, help="an FTI4CIR checkpoint, to offer FTI4CIR too")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=port, default=7860, help="port to listen on")
    parser.add_argument("--max-batch-size", type=positive_int, default=8, help="queries that arrive together run as one batch")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fusion_diff.errors import ConfigError

    try:
        from fusion_diff.serve import build_app, launch, service_from_demo, service_from_folder
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise ConfigError("fusion-diff serve needs Gradio: pip install -e '.[serve]' (or '.[dev]').") from err

    if args.retriever is None:
        service = service_from_demo(args.demo_dir or DEFAULT_DEMO_DIR, benchmark=args.benchmark, fti4cir=args.fti4cir)
    else:
        service = service_from_folder(args.retriever, benchmark=args.benchmark, fti4cir=args.fti4cir)
    app = build_app(service, max_batch_size=args.max_batch_size)
    print(f"Serving {service.source} on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    launch(app, service, host=args.host, port=args.port)
    return 0
