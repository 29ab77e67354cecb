"""Joint-space figures: 2-D projections of reference / generated query / target / gallery, and sampling walks."""

from fusion_diff.viz.inputs import VIZ_FILE, VizInputs, load_viz_inputs, save_viz_inputs
from fusion_diff.viz.plots import plot_query_space, plot_query_walk, plot_trajectory, render_figures
from fusion_diff.viz.projection import PROJECTIONS, project_2d, umap_available

__all__ = [
    "PROJECTIONS",
    "VIZ_FILE",
    "VizInputs",
    "load_viz_inputs",
    "plot_query_space",
    "plot_query_walk",
    "plot_trajectory",
    "project_2d",
    "render_figures",
    "save_viz_inputs",
    "umap_available",
]
