"""``fusion-diff viz``: PNG figures of the joint space from saved embeddings."""

from __future__ import annotations

import argparse

from fusion_diff.cli.arguments import non_negative_int, positive_int


def run(args: argparse.Namespace) -> int:
    from fusion_diff.viz import load_viz_inputs, render_figures

    written = render_figures(
        load_viz_inputs(args.inputs), args.out, max_queries=args.max_queries, num_neighbors=args.neighbors,
        method=args.method, seed=args.seed,
    )  # fmt: skip
    for path in written:
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "viz",
        help="PNG plots of the joint space: reference -> query -> target, nearest gallery items, sampling walk",
        description=(
            "Project embeddings to 2-D (UMAP if umap-learn is installed, else t-SNE) and write query_space.png "
            "(reference -> generated query -> target per query, with each query's nearest gallery items) and, "
            "when a trajectory is present, trajectory.png (z through the sampling steps, and its cosine to the "
            "target per step). Input: a .safetensors file with tensors reference [Q,d], query [Q,d], target [Q,d], "
            "optional gallery [N,d] and trajectory [steps,Q,d]; or a results folder holding the file that "
            "fusion_diff.viz.save_viz_inputs writes (e.g. the demo's)."
        ),
    )
    parser.add_argument(
        "--inputs", required=True, help="a viz .safetensors file, or a results folder holding one"
    )
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument(
        "--method",
        default="auto",
        help="2-D projection: auto (umap if installed, else tsne) or one of fusion_diff.viz.PROJECTIONS (checked "
        "when the command runs, so that --help loads no plotting library)",
    )
    parser.add_argument("--max-queries", type=positive_int, default=12, help="plot the first N queries (more gets unreadable)")
    parser.add_argument("--neighbors", type=non_negative_int, default=5, help="nearest gallery items shown per query (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="projection seed")
    parser.set_defaults(func=run)
