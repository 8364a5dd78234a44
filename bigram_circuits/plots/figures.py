"""The paper's figures (plotly), drawn from result DataFrames, and :func:`save_figure`.

Every function takes plain DataFrames with the columns listed below, checks them (a missing
column raises :class:`~bigram_circuits.errors.FigureDataError` naming it), and returns a
``plotly.graph_objects.Figure``. Nothing here runs a model: the application layer
(``bigram_circuits.app.figures``) computes the results and feeds them to these functions.

========  ===========================  ==========================================================
Paper     Function                     Input columns (``[optional]``)
========  ===========================  ==========================================================
Fig 1     ``fig1_r_vs_params``         sweep: model, lambda, active_params, r, [full_model_r]
Fig 2     ``fig2_training_dynamics``   ckpt: step, target_params, r_estimated, full_model_r;
                                       layer_share: step, component ("mlp"|"attn"), layer, share
(Fig 2)   ``fig_layer_distribution``   distribution: layer, block ("mlp"|"attn"), share_of_subnetwork,
                                       [fraction_kept] (``Subnetwork.layer_distribution()``)
Fig 3     ``fig3_rotation``            lens: run, layer, target ("input"|"output"), rotation_deg
Fig 4     ``fig4_similarity``          matrices: {run: square layer x layer DataFrame of cosines}
Fig 5     ``fig5_optimal``             opt_sweep: active_params, r_model, r_bigram, [model];
                                       ablation: condition, loss, [loss_std], [model]
(15)      ``fig_build_up``             build-up summary (``circuits.buildup``)
========  ===========================  ==========================================================

``save_figure`` writes HTML (always) and PNG (when kaleido finds Chromium and the export
finishes within ``png_timeout``; otherwise one :class:`~bigram_circuits.errors.FigureExportWarning`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import SupportsFloat

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bigram_circuits.errors import FigureDataError, FigureExportWarning
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.tables import full_model_r_by_model, ordered, require_columns

__all__ = [
    "PNG_HELP",
    "PNG_TIMEOUT_S",
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
]

_log = logging.getLogger(__name__)

# One look for every figure: the same template, font and colour per run kind.
_TEMPLATE = "simple_white"


_FONT = {"family": "Helvetica, Arial, sans-serif", "size": 14, "color": "#222"}


_RUN_COLORS = {
    "full": "#222222",
    "full model": "#222222",
    "bigram": "#1f77b4",
    "bigram subnetwork": "#1f77b4",
    "random": "#ff7f0e",
    "random subnetwork": "#ff7f0e",
    "optimal": "#2ca02c",
    "optimal subnetwork": "#2ca02c",
}


_PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#ff7f0e",
]


_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def _run_color(run: str, index: int) -> str:
    return _RUN_COLORS.get(str(run).lower(), _PALETTE[index % len(_PALETTE)])


def _style(fig: go.Figure, title: str, *, height: int = 450, width: int = 700) -> go.Figure:
    fig.update_layout(
        template=_TEMPLATE,
        title={"text": title, "x": 0.5, "xanchor": "center", "font": {"size": 17}},
        font=_FONT,
        height=height,
        width=width,
        margin={"l": 70, "r": 30, "t": 80, "b": 60},
        legend={"bgcolor": "rgba(255,255,255,0.8)"},
    )
    return fig


def human_count(n: SupportsFloat | None) -> str:
    """A parameter count the way the paper writes it: 7.24M, 905k, 1.38B, 512."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    n = float(f"{float(n):.3g}")  # round first so 999.9k becomes 1M, not 1000k
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            # Three significant digits, trailing zeros dropped: 7.24M, 84.9M, 905k, 20k.
            decimals = 2 if abs(value) < 10 else (1 if abs(value) < 100 else 0)
            text = f"{value:.{decimals}f}"
            if "." in text:
                text = text.rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{n:.0f}"


def _log_ticks(values: Iterable[float]) -> dict:
    """Tick values and paper-style labels (50k, 100k, 200k) for a log axis over ``values``.

    Ticks at 1-2-5 multiples of powers of ten, or 1-2-3-5-7 or every 1-9 multiple when the
    range is too narrow for three; plotly's own log ticks label minor ticks with bare digits.
    """
    positive = np.asarray([v for v in values if v > 0], dtype=float)
    if positive.size == 0:
        return {}
    low, high = positive.min() / 1.15, positive.max() * 1.15
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for multiples in ((1, 2, 5), (1, 2, 3, 5, 7), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0**d for d in decades for m in multiples if low <= m * 10.0**d <= high]
        if len(ticks) >= 3:
            break
    return {"tickvals": ticks, "ticktext": [human_count(t) for t in ticks]}


def fig1_r_vs_params(sweep: pd.DataFrame, full_model_r: Mapping[str, float] | None = None) -> go.Figure:
    """Figure 1: bigram r of bigram subnetworks vs active non-embedding parameters (log x).

    ``sweep`` has one row per subnetwork: ``model``, ``lambda``, ``active_params`` (paper unit)
    and ``r`` (Pearson r of subnetwork surprisal with bigram surprisal). The full model's r is
    drawn as a dashed reference line per model, taken from ``full_model_r`` ({model: r}) or
    else from a ``full_model_r`` column. Traces: one line per model, plus one reference line per
    model that has a full-model r. Rows with ``active_params <= 0`` (empty masks) are left out
    because the x axis is logarithmic.
    """
    require_columns(sweep, ["model", "lambda", "active_params", "r"], "fig1_r_vs_params sweep")
    reference = full_model_r_by_model(sweep, full_model_r)
    data = sweep[sweep["active_params"] > 0]
    fig = go.Figure()
    x_range = (data["active_params"].min(), data["active_params"].max()) if len(data) else (1, 10)
    for i, (model, group) in enumerate(data.groupby("model", sort=False)):
        group = group.sort_values("active_params")
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(
            go.Scatter(
                x=group["active_params"],
                y=group["r"],
                mode="lines+markers",
                name=str(model),
                line={"color": color, "width": 2},
                marker={"size": 8},
                legendgroup=str(model),
                customdata=np.stack([group["lambda"].astype(float)], axis=-1),
                hovertemplate="λ=%{customdata[0]}<br>%{x:.3s} params<br>r=%{y:.3f}<extra>" + str(model) + "</extra>",
            )
        )
        if str(model) in reference:
            fig.add_trace(
                go.Scatter(
                    x=list(x_range),
                    y=[reference[str(model)]] * 2,
                    mode="lines",
                    name=f"{model} (full model)",
                    legendgroup=str(model),
                    line={"color": color, "width": 1.5, "dash": "dash"},
                    hovertemplate="full model r=%{y:.3f}<extra>" + str(model) + "</extra>",
                )
            )
    fig.update_xaxes(
        type="log", title_text="Active non-embedding parameters (log scale)", **_log_ticks(data["active_params"])
    )
    fig.update_yaxes(title_text="Bigram surprisal correlation (Pearson r)")
    return _style(fig, "Bigram subnetworks: correlation with bigram surprisal vs size")


def fig2_training_dynamics(ckpt: pd.DataFrame, layer_share: pd.DataFrame) -> go.Figure:
    """Figure 2: bigram subnetworks across training checkpoints.

    ``ckpt``: step, target_params, r_estimated (r of a bigram subnetwork of that size at that
    step, e.g. from :func:`interpolate_r`) and full_model_r (the full model's bigram r at that
    step). ``layer_share``: step, component ("mlp" or "attn"), layer, share (fraction of the
    chosen subnetwork's parameters in that layer component at that step).

    Three panels: lines of r vs step (one trace per target size, one for the full model), then a
    heatmap of MLP shares and one of attention shares (layer x step, one shared colour scale).
    """
    require_columns(ckpt, ["step", "target_params", "r_estimated", "full_model_r"], "fig2_training_dynamics ckpt")
    require_columns(layer_share, ["step", "component", "layer", "share"], "fig2_training_dynamics layer_share")
    components = set(layer_share["component"].str.lower())
    if not components <= {"mlp", "attn"}:
        raise FigureDataError(
            f"layer_share component must be 'mlp' or 'attn', got {sorted(components - {'mlp', 'attn'})}"
        )
    fig = make_subplots(
        rows=1,
        cols=3,
        column_widths=[0.4, 0.3, 0.3],
        horizontal_spacing=0.09,
        subplot_titles=(
            "Bigram r during training",
            "Share of subnetwork in MLP layers",
            "Share of subnetwork in attention layers",
        ),
    )
    for i, (size, group) in enumerate(ckpt.groupby("target_params", sort=True)):
        group = group.sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=group["step"],
                y=group["r_estimated"],
                mode="lines+markers",
                name=f"subnetwork, {human_count(size)} params",
                line={"color": _PALETTE[i % len(_PALETTE)]},
                hovertemplate="step %{x}<br>r=%{y:.3f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    full = ckpt.groupby("step", as_index=False)["full_model_r"].first().sort_values("step")
    fig.add_trace(
        go.Scatter(
            x=full["step"],
            y=full["full_model_r"],
            mode="lines+markers",
            name="full model",
            line={"color": _RUN_COLORS["full"], "dash": "dash"},
            hovertemplate="step %{x}<br>r=%{y:.3f}<extra>full model</extra>",
        ),
        row=1,
        col=1,
    )

    steps = sorted(layer_share["step"].unique())
    layers = sorted(layer_share["layer"].unique())
    zmax = float(layer_share["share"].max()) or 1.0
    for col, component, label in ((2, "mlp", "MLP"), (3, "attn", "attention")):
        part = layer_share[layer_share["component"].str.lower() == component]
        grid = (
            part.pivot_table(index="layer", columns="step", values="share", aggfunc="sum")
            .reindex(index=layers, columns=steps)
            .fillna(0.0)
        )
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[str(s) for s in steps],
                y=[str(layer) for layer in layers],
                zmin=0.0,
                zmax=zmax,
                coloraxis="coloraxis",
                name=label,
                hovertemplate=f"{label} layer %{{y}}<br>step %{{x}}<br>share %{{z:.1%}}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(type="category", title_text="Training step", row=1, col=col)
        fig.update_yaxes(type="category", title_text="Layer", row=1, col=col)
    fig.update_xaxes(title_text="Training step", row=1, col=1)
    fig.update_yaxes(title_text="Bigram surprisal correlation (r)", row=1, col=1)
    fig.update_layout(
        coloraxis={
            "colorscale": "Blues",
            "cmin": 0.0,
            "cmax": zmax,
            "colorbar": {"title": "share", "tickformat": ".0%", "x": 1.02},
        },
        legend={"orientation": "h", "y": -0.25, "x": 0.0},
    )
    return _style(fig, "Bigram subnetworks across training checkpoints", height=480, width=1250)


def fig_layer_distribution(distribution: pd.DataFrame, title: str = "Where the subnetwork sits") -> go.Figure:
    """One subnetwork's layer distribution (Fig 2's heatmaps for a single model, no checkpoints).

    ``distribution``: layer, block ("mlp" or "attn"), share_of_subnetwork and optionally
    fraction_kept, as returned by :meth:`Subnetwork.layer_distribution`. Left: stacked bars of
    the share of the subnetwork's weights in each layer's MLP and attention. Right (with
    fraction_kept): the fraction of each block that is kept.
    """
    require_columns(distribution, ["layer", "block", "share_of_subnetwork"], "fig_layer_distribution")
    blocks = set(distribution["block"].str.lower())
    if not blocks <= {"mlp", "attn"}:
        raise FigureDataError(f"block must be 'mlp' or 'attn', got {sorted(blocks - {'mlp', 'attn'})}")
    with_fraction = "fraction_kept" in distribution.columns
    fig = make_subplots(
        rows=1,
        cols=2 if with_fraction else 1,
        horizontal_spacing=0.1,
        subplot_titles=("Share of the subnetwork's weights", "Fraction of each block kept")
        if with_fraction
        else ("Share of the subnetwork's weights",),
    )
    colors = {"mlp": _PALETTE[0], "attn": _PALETTE[1]}
    for block, label in (("mlp", "MLP"), ("attn", "attention")):
        part = distribution[distribution["block"].str.lower() == block].sort_values("layer")
        if part.empty:
            continue
        fig.add_trace(
            go.Bar(
                x=part["layer"],
                y=part["share_of_subnetwork"],
                name=label,
                legendgroup=block,
                marker_color=colors[block],
                hovertemplate="layer %{x}<br>%{y:.1%}<extra>" + label + "</extra>",
            ),
            row=1,
            col=1,
        )
        if with_fraction:
            fig.add_trace(
                go.Scatter(
                    x=part["layer"],
                    y=part["fraction_kept"],
                    mode="lines+markers",
                    name=label,
                    legendgroup=block,
                    showlegend=False,
                    line={"color": colors[block], "width": 2},
                    hovertemplate="layer %{x}<br>%{y:.1%} kept<extra>" + label + "</extra>",
                ),
                row=1,
                col=2,
            )
    for col in range(1, (2 if with_fraction else 1) + 1):
        fig.update_xaxes(title_text="Layer", dtick=1 if distribution["layer"].nunique() <= 12 else 5, row=1, col=col)
        fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=1, col=col)
    fig.update_layout(barmode="stack")
    return _style(fig, title, height=420, width=1100 if with_fraction else 650)


def fig_build_up(summary: pd.DataFrame, title: str = "Circuits built on the base subnetwork") -> go.Figure:
    """Build-up experiments: base, base + candidate, base + random heads and the full model.

    ``summary``: task, metric, base, condition, candidate, value, [value_std] (the output of
    ``circuits.buildup.summarize_build_up``). One panel per task; per candidate, bars for
    every base with the candidate added (solid) and with as many random heads (light, error bar
    = std over seeds); dashed lines mark each base alone, a black line the full model, and
    crosses the full model without the candidate.
    """
    require_columns(summary, ["task", "metric", "base", "condition", "candidate", "value"], "fig_build_up")
    tasks = list(dict.fromkeys(summary["task"]))
    metrics = {t: str(summary.loc[summary["task"] == t, "metric"].iloc[0]) for t in tasks}
    fig = make_subplots(
        rows=1,
        cols=len(tasks),
        horizontal_spacing=0.12,
        subplot_titles=[f"{t} ({metrics[t].replace('_', ' ')})" for t in tasks],
    )
    bases = list(dict.fromkeys(summary["base"]))
    shown: set[str] = set()

    def legend(name: str) -> bool:
        first = name not in shown
        shown.add(name)
        return first

    for col, task in enumerate(tasks, start=1):
        part = summary[summary["task"] == task]
        names = list(dict.fromkeys(part["candidate"].dropna()))
        for index, base in enumerate(bases):
            mine = part[part["base"] == base]
            color = _run_color(base, index)
            for condition, label, opacity in (
                ("base + candidate", f"{base} + candidate", 1.0),
                ("base + random heads", f"{base} + random heads", 0.4),
            ):
                rows = mine[mine["condition"] == condition].set_index("candidate").reindex(names)
                if rows["value"].isna().all():
                    continue
                error = None
                if "value_std" in rows.columns and rows["value_std"].notna().any():
                    error = {"type": "data", "array": rows["value_std"].fillna(0.0).tolist(), "visible": True}
                fig.add_trace(
                    go.Bar(
                        x=names,
                        y=rows["value"].tolist(),
                        name=label,
                        legendgroup=label,
                        showlegend=legend(label),
                        marker={"color": color, "opacity": opacity},
                        error_y=error,
                        hovertemplate="%{x}<br>%{y:.3f}<extra>" + label + "</extra>",
                    ),
                    row=1,
                    col=col,
                )
            alone = mine.loc[mine["condition"] == "base", "value"]
            if not alone.empty:
                fig.add_trace(
                    go.Scatter(
                        x=names,
                        y=[float(alone.iloc[0])] * len(names),
                        mode="lines",
                        name=f"{base} alone",
                        legendgroup=f"{base} alone",
                        showlegend=legend(f"{base} alone"),
                        line={"color": color, "dash": "dash", "width": 2},
                    ),
                    row=1,
                    col=col,
                )
        full = part.loc[part["condition"] == "full", "value"]
        if not full.empty:
            fig.add_trace(
                go.Scatter(
                    x=names,
                    y=[float(full.iloc[0])] * len(names),
                    mode="lines",
                    name="full model",
                    legendgroup="full model",
                    showlegend=legend("full model"),
                    line={"color": _RUN_COLORS["full"], "width": 2},
                ),
                row=1,
                col=col,
            )
        without = part[part["condition"] == "full - candidate"].drop_duplicates("candidate")
        without = without.set_index("candidate").reindex(names)
        if without["value"].notna().any():
            fig.add_trace(
                go.Scatter(
                    x=names,
                    y=without["value"].tolist(),
                    mode="markers",
                    name="full - candidate",
                    legendgroup="full - candidate",
                    showlegend=legend("full - candidate"),
                    marker={"symbol": "x", "size": 11, "color": _RUN_COLORS["full"]},
                ),
                row=1,
                col=col,
            )
        fig.update_yaxes(title_text=metrics[task].replace("_", " "), row=1, col=col)
        fig.update_xaxes(tickangle=-25, row=1, col=col)
    fig.update_layout(barmode="group", legend={"orientation": "h", "y": -0.35, "x": 0.0})
    return _style(fig, title, height=520, width=max(650, 560 * len(tasks)))


def fig3_rotation(lens: pd.DataFrame) -> go.Figure:
    """Figure 3: median rotation (degrees) towards the input and the output, per layer.

    ``lens``: run (e.g. "full", "bigram", "random"), layer (0 = embedding output), target
    ("input": map X_l -> raw token embeddings; "output": map X_l -> last layer) and
    rotation_deg. Two panels (input, output) with one line per run each.
    """
    require_columns(lens, ["run", "layer", "target", "rotation_deg"], "fig3_rotation lens")
    targets = set(lens["target"].str.lower())
    if not targets <= {"input", "output"}:
        raise FigureDataError(f"lens target must be 'input' or 'output', got {sorted(targets - {'input', 'output'})}")
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.06,
        subplot_titles=("Rotation to input (token embeddings)", "Rotation to output (last layer)"),
    )
    runs = ordered(lens["run"], ["full", "bigram", "random", "optimal"])
    for col, target in ((1, "input"), (2, "output")):
        part = lens[lens["target"].str.lower() == target]
        for i, run in enumerate(runs):
            group = part[part["run"] == run].sort_values("layer")
            fig.add_trace(
                go.Scatter(
                    x=group["layer"],
                    y=group["rotation_deg"],
                    mode="lines+markers",
                    name=str(run),
                    legendgroup=str(run),
                    showlegend=col == 1,
                    line={"color": _run_color(run, i), "dash": _DASHES[i % len(_DASHES)], "width": 2.5},
                    hovertemplate="layer %{x}<br>%{y:.1f}°<extra>" + str(run) + "</extra>",
                ),
                row=1,
                col=col,
            )
        # One tick per layer for small models; every 5th for deep ones (30 layers are unreadable).
        fig.update_xaxes(
            type="linear",
            dtick=1 if lens["layer"].max() <= 12 else 5,
            rangemode="tozero",
            title_text="Layer (0 = embeddings)",
            row=1,
            col=col,
        )
    fig.update_yaxes(title_text="Median rotation (degrees)", rangemode="tozero", row=1, col=1)
    return _style(fig, "Rotation of hidden states towards the input and the output", height=450, width=1000)


def fig4_similarity(matrices: Mapping[str, pd.DataFrame]) -> go.Figure:
    """Figure 4: layer covariance similarity, one heatmap per run on one colour scale.

    ``matrices`` maps a run name (e.g. "full", "bigram", "random") to a square DataFrame whose
    index and columns are layers and whose values are Frobenius cosines between the layers'
    covariance matrices (top singular direction removed).
    """
    if not isinstance(matrices, Mapping) or not matrices:
        raise FigureDataError("fig4_similarity needs a non-empty dict {run: layer x layer DataFrame}")
    for run, matrix in matrices.items():
        if not isinstance(matrix, pd.DataFrame) or matrix.shape[0] != matrix.shape[1] or matrix.empty:
            shape = getattr(matrix, "shape", None)
            raise FigureDataError(
                f"fig4_similarity matrix {run!r} must be a square layer x layer DataFrame, got shape {shape}"
            )
    values = np.concatenate([np.asarray(m, dtype=float).ravel() for m in matrices.values()])
    zmin, zmax = float(np.nanmin(values)), float(np.nanmax(values))
    runs = ordered(matrices.keys(), ["full", "bigram", "random", "optimal"])
    fig = make_subplots(rows=1, cols=len(runs), horizontal_spacing=0.05, subplot_titles=[str(r) for r in runs])
    for col, run in enumerate(runs, start=1):
        matrix = matrices[run]
        fig.add_trace(
            go.Heatmap(
                z=matrix.to_numpy(dtype=float),
                x=[str(c) for c in matrix.columns],
                y=[str(i) for i in matrix.index],
                coloraxis="coloraxis",
                name=str(run),
                hovertemplate="layers %{y} and %{x}<br>cosine %{z:.3f}<extra>" + str(run) + "</extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(type="category", title_text="Layer", row=1, col=col)
        fig.update_yaxes(
            type="category", autorange="reversed", scaleanchor=f"x{col if col > 1 else ''}", row=1, col=col
        )
    fig.update_yaxes(title_text="Layer", row=1, col=1)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": zmin, "cmax": zmax, "colorbar": {"title": "cosine"}})
    return _style(fig, "Layer covariance similarity", height=420, width=330 * len(runs) + 120)


def fig5_optimal(opt_sweep: pd.DataFrame, ablation: pd.DataFrame) -> go.Figure:
    """Figure 5: optimal (pruning) subnetworks, and the LM loss when subnetworks are removed.

    ``opt_sweep``: active_params, r_model (Pearson r of the optimal subnetwork's surprisal with
    the full model's), r_bigram (with bigram surprisal), optional model. ``ablation``:
    condition (e.g. "full model", "random ablated", "bigram ablated", "optimal ablated"), loss
    (held-out LM loss, nats), optional loss_std (error bars) and model (x axis groups).

    Left panel (log x): two lines per model (r with the model, r with bigrams). Right panel:
    one bar trace per condition, labelled with its loss (x: model when ``model`` has several
    values, else the condition).
    """
    require_columns(opt_sweep, ["active_params", "r_model", "r_bigram"], "fig5_optimal opt_sweep")
    require_columns(ablation, ["condition", "loss"], "fig5_optimal ablation")
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.55, 0.45],
        horizontal_spacing=0.12,
        subplot_titles=(
            "Optimal subnetworks: correlation with model and bigrams",
            "Eval loss with a subnetwork removed",
        ),
    )
    data = opt_sweep[opt_sweep["active_params"] > 0]
    several_models = "model" in data.columns and data["model"].nunique() > 1
    groups = data.groupby("model", sort=False) if several_models else [("", data)]
    for i, (model, group) in enumerate(groups):
        group = group.sort_values("active_params")
        suffix = f" ({model})" if model != "" else ""
        color = _PALETTE[i % len(_PALETTE)]
        for column, label, dash, kind in (
            ("r_model", "r with full model", "solid", "optimal"),
            ("r_bigram", "r with bigrams", "dash", "bigram"),
        ):
            # One model: colour by what is correlated; several: colour by model, dash by target.
            line_color = color if suffix else _RUN_COLORS[kind]
            fig.add_trace(
                go.Scatter(
                    x=group["active_params"],
                    y=group[column],
                    mode="lines+markers",
                    name=label + suffix,
                    line={"color": line_color, "dash": dash, "width": 2},
                    hovertemplate="%{x:.3s} params<br>r=%{y:.3f}<extra>" + label + suffix + "</extra>",
                ),
                row=1,
                col=1,
            )
    fig.update_xaxes(
        type="log",
        title_text="Active non-embedding parameters (log scale)",
        row=1,
        col=1,
        **_log_ticks(data["active_params"]),
    )
    fig.update_yaxes(title_text="Surprisal correlation (Pearson r)", row=1, col=1)

    conditions = ordered(
        ablation["condition"],
        ["full model", "full", "random ablated", "random", "bigram ablated", "bigram", "optimal ablated", "optimal"],
    )
    has_model = "model" in ablation.columns and ablation["model"].nunique() > 1
    for i, condition in enumerate(conditions):
        rows = ablation[ablation["condition"] == condition]
        kind = next((k for k in ("full", "random", "bigram", "optimal") if k in str(condition).lower()), None)
        error = None
        if "loss_std" in rows.columns and rows["loss_std"].notna().any():
            error = {"type": "data", "array": rows["loss_std"].fillna(0.0).to_numpy(), "visible": True}
        fig.add_trace(
            go.Bar(
                x=rows["model"].astype(str) if has_model else [str(condition)],
                y=rows["loss"],
                name=str(condition),
                error_y=error,
                showlegend=has_model,
                text=rows["loss"],
                texttemplate="%{text:.2f}",
                textposition="outside",
                cliponaxis=False,
                marker_color=_RUN_COLORS[kind] if kind else _PALETTE[i % len(_PALETTE)],
                hovertemplate="%{y:.3f} nats<extra>" + str(condition) + "</extra>",
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(type="category", title_text="Model" if has_model else "", row=1, col=2)
    fig.update_yaxes(title_text="Eval loss (nats per token)", row=1, col=2)
    fig.update_layout(barmode="group")
    return _style(fig, "Optimal subnetworks and subnetwork ablations", height=470, width=1150)


PNG_HELP = "PNG export needs Chromium: apt-get install chromium (HTML written)"

# Seconds one PNG export (kaleido driving Chromium) may take before save_figure gives up on it.
# A first export starts the browser, a few seconds on a loaded machine; a hung browser never ends.
PNG_TIMEOUT_S = 120.0

# One kaleido export at a time per process; an export that has hung keeps it (later figures skip
# PNG anyway, through _png_failure).
_export_lock = threading.Lock()


_CHROMIUM = Path("/usr/bin/chromium")


# Set after the first failed PNG export, so later figures skip the slow browser start.
_png_failure: str | None = None


def fig_controls(sweeps: pd.DataFrame, partial: pd.DataFrame) -> go.Figure:
    """Faithfulness controls: bigram r against active weights for the real target and each
    control (left; ``sweeps``: control, active_params, r, each r against its own target), and
    the held-out loss increase against the fraction of a subnetwork removed (right; ``partial``:
    condition "bigram" / "random", ablation "zero" / "mean", optional granularity, fraction,
    loss_increase; mean and sd over draws as error bars)."""
    require_columns(sweeps, ["control", "active_params", "r"], "fig_controls sweeps")
    require_columns(partial, ["condition", "ablation", "fraction", "loss_increase"], "fig_controls partial")
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        subplot_titles=("Bigram r vs size: real target and controls", "Loss with part of a subnetwork removed"),
    )
    data = sweeps[sweeps["active_params"] > 0]
    for i, (control, group) in enumerate(data.groupby("control", sort=False)):
        group = group.sort_values("active_params")
        real = control == "real bigram target"
        fig.add_trace(
            go.Scatter(
                x=group["active_params"],
                y=group["r"],
                mode="lines+markers",
                name=str(control),
                legendgroup="sweeps",
                line={"color": "#222222" if real else _PALETTE[i % len(_PALETTE)], "width": 3 if real else 2},
                hovertemplate="%{x:.3s} weights<br>r=%{y:.3f}<extra>" + str(control) + "</extra>",
            ),
            row=1,
            col=1,
        )
    fig.update_xaxes(
        type="log", title_text="Active weights (log scale)", row=1, col=1, **_log_ticks(data["active_params"])
    )
    fig.update_yaxes(title_text="Pearson r with its own target", row=1, col=1)
    frame = partial.assign(granularity=partial.get("granularity", ""))
    curves = frame.groupby(["granularity", "ablation", "condition", "fraction"], as_index=False)["loss_increase"].agg(
        ["mean", "std"]
    )
    for j, ((granularity, ablation, condition), group) in enumerate(
        curves.groupby(["granularity", "ablation", "condition"], sort=True)
    ):
        label = f"{condition} removed, {ablation} ablation" + (f" ({granularity})" if granularity else "")
        fig.add_trace(
            go.Scatter(
                x=100 * group["fraction"],
                y=group["mean"],
                error_y={"type": "data", "array": group["std"].fillna(0.0), "visible": True},
                mode="lines+markers",
                name=label,
                legendgroup="partial",
                line={
                    "color": _RUN_COLORS.get(condition, _PALETTE[j % len(_PALETTE)]),
                    "dash": "solid" if ablation == "zero" else "dash",
                    "width": 2 if granularity.startswith("weight") or not granularity else 1,
                },
                marker={"symbol": "circle" if granularity.startswith("weight") or not granularity else "square"},
                hovertemplate="%{x:g}% removed<br>+%{y:.3f} nats<extra>" + label + "</extra>",
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="% of the subnetwork removed", row=1, col=2)
    fig.update_yaxes(title_text="Held-out loss increase (nats)", row=1, col=2)
    return _style(fig, "Faithfulness controls", height=520, width=1250)


def save_figure(
    fig: go.Figure,
    path_without_suffix: str | os.PathLike,
    *,
    png: bool = True,
    scale: float = 2.0,
    include_plotlyjs: bool | str = True,
    png_timeout: float = PNG_TIMEOUT_S,
) -> list[Path]:
    """Write ``fig`` as ``<path>.html`` (always) and ``<path>.png`` (when Chromium is usable).

    Both files are written atomically (a temp file with a per-process unique name, then a
    rename), so processes or threads writing the same path at once each leave a whole file and
    never read or remove another's temp file. ``include_plotlyjs``: True embeds
    plotly.js (opens offline, ~4.7 MB), "cdn" links it (small, needs the internet),
    "directory" links a ``plotly.min.js`` written once next to the HTML (offline, shared by
    every figure of a folder). PNG export uses kaleido, which needs a Chrome/Chromium browser;
    ``BROWSER_PATH`` is pointed at /usr/bin/chromium when unset and that file exists. If the
    export fails, one :class:`~bigram_circuits.errors.FigureExportWarning` (:data:`PNG_HELP`) is
    issued and only the HTML path is returned. The export runs in a daemon thread that is given
    ``png_timeout`` seconds (default :data:`PNG_TIMEOUT_S`): after that the HTML is kept, one
    warning says the PNG was not written, and later figures of this process skip PNG (a hung
    Chromium is left to exit with the process). Exports within one process run one at a time.
    Returns the paths written.
    """
    global _png_failure
    if not isinstance(fig, go.Figure):
        raise FigureDataError(f"save_figure needs a plotly Figure, got {type(fig).__name__}")
    base = Path(path_without_suffix)
    if base.suffix in (".html", ".png"):
        base = base.with_suffix("")
    html_path = base.with_name(base.name + ".html")
    if include_plotlyjs == "directory":
        bundle = html_path.parent / "plotly.min.js"
        if not bundle.exists():
            from plotly.offline import get_plotlyjs

            atomic_write_bytes(bundle, get_plotlyjs().encode("utf-8"))
    html = fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True)
    atomic_write_bytes(html_path, html.encode("utf-8"))
    written = [html_path]
    if not png:
        return written
    if _png_failure is not None:
        _log.info("skipping PNG of %s: %s", base.name, _png_failure)
        return written
    if "BROWSER_PATH" not in os.environ and _CHROMIUM.exists():
        os.environ["BROWSER_PATH"] = str(_CHROMIUM)
    png_path = base.with_name(base.name + ".png")
    try:
        image = _export_png(fig, scale, png_timeout)
    except TimeoutError:
        _png_failure = f"PNG export did not finish in {png_timeout:g} s"
        warnings.warn(
            f"{png_path} not written: Chromium's PNG export did not finish in {png_timeout:g} s "
            f"(HTML written; later figures skip PNG)",
            FigureExportWarning,
            stacklevel=2,
        )
        return written
    except Exception as exc:
        _png_failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _log.debug("PNG export failed: %s", _png_failure)
        warnings.warn(PNG_HELP, FigureExportWarning, stacklevel=2)
        return written
    atomic_write_bytes(png_path, image)
    written.append(png_path)
    return written


def _export_png(fig: go.Figure, scale: float, timeout: float) -> bytes:
    """``fig.to_image(format="png")`` in a daemon thread; ``TimeoutError`` if it (or waiting for an
    earlier export of this process) takes longer than ``timeout`` seconds, else its bytes or its
    exception."""
    if not _export_lock.acquire(timeout=timeout):
        raise TimeoutError(f"an earlier PNG export is still running after {timeout:g} s")
    outcome: dict[str, object] = {}

    def export() -> None:
        try:
            outcome["image"] = fig.to_image(format="png", scale=scale)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc
        finally:
            _export_lock.release()

    try:
        worker = threading.Thread(target=export, name="save_figure-png", daemon=True)
        worker.start()
    except BaseException:
        _export_lock.release()
        raise
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"PNG export did not finish in {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["image"]  # type: ignore[return-value]


def patching_heatmap(table: pd.DataFrame, value: str = "metric", title: str | None = None):
    """Plotly heatmap of a :func:`patch` table: layers (and heads) by positions / units."""
    import plotly.graph_objects as go

    if value not in table.columns:
        raise FigureDataError(f"column {value!r} is not in the patching table; use 'metric' or 'recovered'")
    frame = table.copy()
    unit = "head" if "head" in frame.columns else "neuron" if "neuron" in frame.columns else None
    if "pos" in frame.columns:
        frame["row"] = (
            "L" + frame["layer"].astype(str) + (("H" + frame["head"].astype(str)) if unit == "head" else "")
            if unit != "neuron"
            else "L" + frame["layer"].astype(str) + "N" + frame["neuron"].astype(str)
        )
        frame["col"] = frame["pos"]
        x_title = "position"
    elif unit is not None:
        frame["row"] = "L" + frame["layer"].astype(str)
        frame["col"] = frame[unit]
        x_title = unit
    else:
        frame["row"] = "L" + frame["layer"].astype(str)
        frame["col"] = "all positions"
        x_title = ""
    grid = frame.pivot_table(index="row", columns="col", values=value, sort=False)
    component = str(table["component"].iloc[0]) if len(table) else ""
    figure = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[str(c) for c in grid.columns],
            y=list(grid.index),
            colorscale="RdBu",
            zmid=0.0,
            colorbar={"title": value},
        )
    )
    figure.update_yaxes(autorange="reversed", title_text="layer")
    figure.update_xaxes(title_text=x_title)
    figure.update_layout(
        title=title
        or f"Activation patching: {component} "
        f"({table.attrs.get('clean_run', 'clean')} -> {table.attrs.get('corrupted_run', 'corrupted')})"
    )
    return figure


def similarity_heatmap(matrices: pd.DataFrame | Mapping[str, pd.DataFrame], title: str = "Layer covariance similarity"):
    """Plotly heatmap(s) of similarity matrices (one panel per run; paper Fig. 4), drawn by
    :func:`fig4_similarity`."""
    # fig4_similarity is defined above in this module.

    panels = {"similarity": matrices} if isinstance(matrices, pd.DataFrame) else dict(matrices)
    figure = fig4_similarity(panels)
    figure.update_layout(title=title)
    return figure
