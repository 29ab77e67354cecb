"""PNG figures of the joint space (the interpretability figure of DESIGN.md §2.5).

* ``plot_query_space``: reference -> generated query -> target per query, with each query's nearest
  gallery items, all in one 2-D projection;
* ``plot_trajectory``: the walk of z through the sampling steps (2-D projection), beside the cosine
  of each step to the target and to the reference (projection-free, so it cannot mislead).

Figures are drawn on a bare Agg canvas (no pyplot, no global backend switch) and written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fusion_diff.retrieval.index import GalleryIndex
from fusion_diff.utils.io import atomic_path
from fusion_diff.viz.inputs import VizInputs
from fusion_diff.viz.projection import project_2d, resolve_projection

MARKERS = {"reference": "o", "query": "*", "target": "s", "start": "x"}
NEIGHBOUR_COLOUR = "#b0b0b0"


def _colours(count: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["tab10" if count <= 10 else "tab20"](np.arange(count) % 20)


def _save(fig: Figure, out_path: str | os.PathLike) -> Path:
    out_path = Path(out_path)
    FigureCanvasAgg(fig)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return out_path


def _legend(ax, entries: list[tuple[str, str, str]]) -> None:
    handles = [Line2D([], [], marker=m, linestyle="", color=c, label=label, markersize=8) for label, m, c in entries]
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.8)


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean())


def plot_query_space(
    inputs: VizInputs,
    out_path: str | os.PathLike,
    num_neighbors: int = 5,
    method: str = "auto",
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """Reference, generated query, target (and the query's ``num_neighbors`` nearest gallery items) per query."""
    method = resolve_projection(method)
    q = len(inputs.query)
    parts = [inputs.reference, inputs.query, inputs.target]
    neighbours = torch.empty(0, dtype=torch.long)
    if inputs.gallery is not None and num_neighbors > 0:
        index = GalleryIndex(inputs.gallery, [str(i) for i in range(len(inputs.gallery))])
        neighbours = index.search(inputs.query, k=num_neighbors).indices.flatten().unique()
        neighbours = neighbours[neighbours >= 0]
        parts.append(inputs.gallery[neighbours])
    xy = project_2d(torch.cat(parts), method=method, seed=seed)
    ref, query, target, near = xy[:q], xy[q : 2 * q], xy[2 * q : 3 * q], xy[3 * q :]

    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.add_subplot()
    if len(near):
        ax.scatter(near[:, 0], near[:, 1], s=14, c=NEIGHBOUR_COLOUR, zorder=1)
    for i, colour in enumerate(_colours(q)):
        ax.plot(*zip(ref[i], query[i], strict=True), linestyle="--", color=colour, linewidth=1, zorder=2)
        ax.plot(*zip(query[i], target[i], strict=True), linestyle="-", color=colour, linewidth=1.4, zorder=2)
        for name, points, size in (("reference", ref, 40), ("query", query, 110), ("target", target, 40)):
            ax.scatter(
                *points[i], marker=MARKERS[name], s=size, color=colour, edgecolors="black", linewidths=0.4, zorder=3
            )
    entries = [
        ("reference", MARKERS["reference"], "gray"),
        ("generated query", MARKERS["query"], "gray"),
        ("target", MARKERS["target"], "gray"),
    ]
    if len(near):
        entries.append((f"{num_neighbors} nearest gallery items", "o", NEIGHBOUR_COLOUR))
    _legend(ax, entries)
    summary = (
        f"mean cos(query, target) {_mean_cos(inputs.query, inputs.target):.3f}   "
        f"mean cos(reference, target) {_mean_cos(inputs.reference, inputs.target):.3f}"
    )
    ax.set_title(title or f"Joint space, {q} queries ({method})", fontsize=11)
    ax.set_xlabel(summary, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, out_path)


def plot_trajectory(
    inputs: VizInputs, out_path: str | os.PathLike, method: str = "auto", seed: int = 0, title: str | None = None
) -> Path:
    """The sampling walk of each query (``inputs.trajectory`` ``[S, Q, d]``): 2-D path and cosine per step."""
    if inputs.trajectory is None:
        raise ValueError(
            "plot_trajectory needs inputs.trajectory ([steps, Q, d], from sample(..., return_trajectory=True))"
        )
    method = resolve_projection(method)
    steps, q, d = inputs.trajectory.shape
    walk = F.normalize(inputs.trajectory.float(), dim=-1)
    xy = project_2d(torch.cat([walk.reshape(steps * q, d), inputs.reference, inputs.target]), method=method, seed=seed)
    path = xy[: steps * q].reshape(steps, q, 2)
    ref, target = xy[steps * q : steps * q + q], xy[steps * q + q :]
    to_target = (walk * F.normalize(inputs.target, dim=-1)).sum(-1)  # [S, Q]
    to_reference = (walk * F.normalize(inputs.reference, dim=-1)).sum(-1)

    fig = Figure(figsize=(13, 5.5))
    ax, cos_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    step_axis = np.arange(1, steps + 1)
    for i, colour in enumerate(_colours(q)):
        ax.plot(path[:, i, 0], path[:, i, 1], "-", color=colour, linewidth=1, alpha=0.8)
        ax.scatter(path[1:-1, i, 0], path[1:-1, i, 1], s=8, color=colour)
        ax.scatter(*path[0, i], marker=MARKERS["start"], s=40, color=colour)
        ax.scatter(*path[-1, i], marker=MARKERS["query"], s=110, color=colour, edgecolors="black", linewidths=0.4)
        ax.scatter(*ref[i], marker=MARKERS["reference"], s=40, color=colour, edgecolors="black", linewidths=0.4)
        ax.scatter(*target[i], marker=MARKERS["target"], s=40, color=colour, edgecolors="black", linewidths=0.4)
        cos_ax.plot(step_axis, to_target[:, i].numpy(), "-", color=colour, linewidth=1)
        cos_ax.plot(step_axis, to_reference[:, i].numpy(), ":", color=colour, linewidth=1)
    _legend(
        ax,
        [("first step", MARKERS["start"], "gray"), ("final query", MARKERS["query"], "gray"),
         ("reference", MARKERS["reference"], "gray"), ("target", MARKERS["target"], "gray")],
    )  # fmt: skip
    ax.set_title(title or f"Sampling trajectories, {q} queries, {steps} steps ({method})", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    cos_ax.plot(step_axis, to_target.mean(1).numpy(), "-", color="black", linewidth=2.5, label="cos(z, target), mean")
    cos_ax.plot(
        step_axis, to_reference.mean(1).numpy(), ":", color="black", linewidth=2.5, label="cos(z, reference), mean"
    )
    cos_ax.set_xlabel("sampling step")
    cos_ax.set_ylabel("cosine similarity")
    cos_ax.grid(alpha=0.3)
    cos_ax.legend(fontsize=8)
    return _save(fig, out_path)


def render_figures(
    inputs: VizInputs,
    out_dir: str | os.PathLike,
    max_queries: int = 12,
    num_neighbors: int = 5,
    method: str = "auto",
    seed: int = 0,
) -> list[Path]:
    """Write ``query_space.png`` (and ``trajectory.png`` when a trajectory is given) for the first ``max_queries``."""
    out_dir = Path(out_dir)
    chosen = inputs.select(max_queries)
    written = [plot_query_space(chosen, out_dir / "query_space.png", num_neighbors, method, seed)]
    if chosen.trajectory is not None:
        written.append(plot_trajectory(chosen, out_dir / "trajectory.png", method, seed))
    return written


def plot_query_walk(
    reference: torch.Tensor,
    query: torch.Tensor,
    hits: torch.Tensor,
    out_path: str | os.PathLike,
    walk: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    target_rank: int | None = None,
    method: str = "pca",
    title: str | None = None,
) -> Path:
    """Where one composed query landed: reference ``[d]``, the sampling walk ``[S, d]`` (if any), the final
    query ``[d]``, its top hits ``[K, d]`` numbered by rank, and the true target ``[d]`` when known.

    PCA by default: one query and its hits are a few dozen points, too few for t-SNE or UMAP to keep
    distances, and a linear map keeps what is near what."""
    walk = walk if walk is not None else query.new_zeros(0, query.shape[-1])
    parts = [reference[None], walk, query[None], hits] + ([target[None]] if target is not None else [])
    xy = project_2d(torch.cat(parts), method=method)
    s, k = len(walk), len(hits)
    ref, path, final, near = xy[0], xy[1 : 1 + s], xy[1 + s], xy[2 + s : 2 + s + k]

    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    ax.scatter(near[:, 0], near[:, 1], s=26, c=NEIGHBOUR_COLOUR, edgecolors="black", linewidths=0.3, zorder=1)
    for rank, (x, y) in enumerate(near, start=1):
        ax.annotate(str(rank), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color="#505050")
    colour = _colours(1)[0]
    line = np.vstack([ref[None], path, final[None]])
    ax.plot(line[:, 0], line[:, 1], "--", color=colour, linewidth=1, zorder=2)
    if s:
        ax.scatter(path[:, 0], path[:, 1], s=12, color=colour, zorder=3)
    ax.scatter(*ref, marker=MARKERS["reference"], s=70, color="white", edgecolors="black", zorder=4)
    ax.scatter(*final, marker=MARKERS["query"], s=180, color=colour, edgecolors="black", linewidths=0.5, zorder=4)
    entries = [("reference", MARKERS["reference"], "black"), ("query", MARKERS["query"], colour)]
    if s:
        entries.append((f"sampling walk ({s} step{'s' if s > 1 else ''})", "o", colour))
    entries.append((f"top {k} hits (by rank)", "o", NEIGHBOUR_COLOUR))
    if target is not None:
        ax.scatter(*xy[-1], marker=MARKERS["target"], s=90, color="#2ca02c", edgecolors="black", zorder=5)
        rank_note = f"rank {target_rank}" if target_rank else "not in the top hits"
        entries.append((f"true target ({rank_note})", MARKERS["target"], "#2ca02c"))
    _legend(ax, entries)
    cos = float(F.normalize(query, dim=-1) @ F.normalize(reference, dim=-1))
    ax.set_title(title or "Where the query landed in the joint space", fontsize=10)
    ax.set_xlabel(f"{method.upper()} of the joint space   cos(query, reference) {cos:.3f}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, out_path)
