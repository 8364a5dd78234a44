"""Plots: result DataFrames in, plotly figures out, and :func:`save_figure` (HTML + PNG).

No model code: this package imports only ``errors``, ``io`` and ``tables`` from the library.
"""

from bigram_circuits.plots.figures import (
    PNG_HELP,
    fig1_r_vs_params,
    fig2_training_dynamics,
    fig3_rotation,
    fig4_similarity,
    fig5_optimal,
    fig_build_up,
    fig_controls,
    fig_layer_distribution,
    human_count,
    patching_heatmap,
    save_figure,
    similarity_heatmap,
)
from bigram_circuits.plots.viewer import view, view_html

__all__ = [
    "PNG_HELP",
    "fig1_r_vs_params",
    "fig2_training_dynamics",
    "fig3_rotation",
    "fig4_similarity",
    "fig5_optimal",
    "fig_build_up",
    "fig_controls",
    "fig_layer_distribution",
    "human_count",
    "patching_heatmap",
    "save_figure",
    "similarity_heatmap",
    "view",
    "view_html",
]
