"""The paper's figures (plotly) and tables (pandas), drawn from result DataFrames.

Every function takes plain DataFrames with the columns listed below, checks them (a missing
column raises :class:`FigureDataError` naming it), and returns a ``plotly.graph_objects.Figure``
or a display-ready DataFrame. Nothing here runs a model: :func:`figures_command` computes the
results with the other modules and feeds them to these functions.

========  ===========================  ==========================================================
Paper     Function                     Input columns (``[optional]``)
========  ===========================  ==========================================================
Fig 1     ``fig1_r_vs_params``         sweep: model, lambda, active_params, r, [full_model_r]
Fig 1     ``table_fig1``               sweep: model, lambda, active_params, r, [full_model_r];
                                       reference numbers of the paper in ``PAPER_FIG1``
Fig 2     ``fig2_training_dynamics``   ckpt: step, target_params, r_estimated, full_model_r;
                                       layer_share: step, component ("mlp"|"attn"), layer, share
Fig 3     ``fig3_rotation``            lens: run, layer, target ("input"|"output"), rotation_deg
Fig 4     ``fig4_similarity``          matrices: {run: square layer x layer DataFrame of cosines}
Fig 5     ``fig5_optimal``             opt_sweep: active_params, r_model, r_bigram, [model];
                                       ablation: condition, loss, [loss_std], [model]
Table 1   ``table1_chosen``            sweep: model, lambda, active_params, r, [mask_size],
                                       [total_params]
Table 2   ``table2_bigram_r``          rows: condition, r, [model]
Table 3   ``table3_overlap``           rows: pair, fraction_overlap, expected, ratio, p_value,
                                       frac_a_in_b, [expected_frac_a_in_b], [p_value_text],
                                       [n_random] (``circuits.overlap.overlap_table`` output)
Table 4   ``table4_generations``       generations: condition, text, [prompt]
========  ===========================  ==========================================================

``active_params`` is in the paper's unit: non-embedding weights gated by kept mask entries.
``save_figure`` writes HTML (always) and PNG (when kaleido finds Chromium); ``to_markdown``
renders a table for the README.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bigram_circuits.data import atomic_write_bytes
from bigram_circuits.errors import BigramCircuitsError

__all__ = [
    "PAPER_FIG1",
    "PNG_HELP",
    "FigureDataError",
    "fig1_r_vs_params",
    "fig2_training_dynamics",
    "fig3_rotation",
    "fig4_similarity",
    "fig5_optimal",
    "human_count",
    "interpolate_r",
    "save_figure",
    "table1_chosen",
    "table2_bigram_r",
    "table3_overlap",
    "table4_generations",
    "table_fig1",
    "to_markdown",
]

_log = logging.getLogger(__name__)


class FigureDataError(BigramCircuitsError, ValueError):
    """A results table lacks the columns (or shape) a figure or table needs."""


# Best bigram-subnetwork r and full-model bigram r, read off the paper's Figure 1 table.
PAPER_FIG1 = pd.DataFrame(
    {
        "model": ["Pythia 70M", "Pythia 160M", "Pythia 410M", "Pythia 1B",
                  "GPT-2 small", "GPT-2 medium", "GPT-2 large"],
        "best_subnetwork_r": [0.961, 0.964, 0.983, 0.987, 0.979, 0.985, 0.986],
        "full_model_r": [0.737, 0.69, 0.65, 0.632, 0.624, 0.582, 0.583],
    }
)

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
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f", "#ff7f0e"]
_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


# ----------------------------------------------------------------------------- helpers


def _require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise a one-line FigureDataError naming every column of ``columns`` missing from ``df``."""
    if not isinstance(df, pd.DataFrame):
        raise FigureDataError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FigureDataError(
            f"{what} lacks column(s) {', '.join(repr(c) for c in missing)}; "
            f"it has {', '.join(repr(str(c)) for c in df.columns) or 'none'}"
        )
    if df.empty:
        raise FigureDataError(f"{what} has no rows; compute the results first")


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


def human_count(n: float) -> str:
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


def _ordered(values: Iterable, preferred: Sequence[str]) -> list:
    """Unique values in first-seen order, with the ``preferred`` ones first in that order."""
    seen = list(dict.fromkeys(values))
    lower = {str(v).lower(): v for v in seen}
    front = [lower[p] for p in preferred if p in lower]
    return front + [v for v in seen if v not in front]


# ----------------------------------------------------------------------------- Figure 1


def _full_model_r_by_model(sweep: pd.DataFrame, full_model_r: Mapping[str, float] | None) -> dict:
    if full_model_r is not None:
        return {str(k): float(v) for k, v in full_model_r.items()}
    if "full_model_r" in sweep.columns:
        return {str(m): float(g["full_model_r"].dropna().iloc[0])
                for m, g in sweep.groupby("model", sort=False) if g["full_model_r"].notna().any()}
    return {}


def fig1_r_vs_params(sweep: pd.DataFrame, full_model_r: Mapping[str, float] | None = None) -> go.Figure:
    """Figure 1: bigram r of bigram subnetworks vs active non-embedding parameters (log x).

    ``sweep`` has one row per subnetwork: ``model``, ``lambda``, ``active_params`` (paper unit)
    and ``r`` (Pearson r of subnetwork surprisal with bigram surprisal). The full model's r is
    drawn as a dashed reference line per model, taken from ``full_model_r`` ({model: r}) or
    else from a ``full_model_r`` column. Traces: one line per model, plus one reference line per
    model that has a full-model r. Rows with ``active_params <= 0`` (empty masks) are left out
    because the x axis is logarithmic.
    """
    _require_columns(sweep, ["model", "lambda", "active_params", "r"], "fig1_r_vs_params sweep")
    reference = _full_model_r_by_model(sweep, full_model_r)
    data = sweep[sweep["active_params"] > 0]
    fig = go.Figure()
    x_range = (data["active_params"].min(), data["active_params"].max()) if len(data) else (1, 10)
    for i, (model, group) in enumerate(data.groupby("model", sort=False)):
        group = group.sort_values("active_params")
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(go.Scatter(
            x=group["active_params"], y=group["r"], mode="lines+markers", name=str(model),
            line={"color": color, "width": 2}, marker={"size": 8}, legendgroup=str(model),
            customdata=np.stack([group["lambda"].astype(float)], axis=-1),
            hovertemplate="λ=%{customdata[0]}<br>%{x:.3s} params<br>r=%{y:.3f}<extra>" + str(model) + "</extra>",
        ))
        if str(model) in reference:
            fig.add_trace(go.Scatter(
                x=list(x_range), y=[reference[str(model)]] * 2, mode="lines",
                name=f"{model} (full model)", legendgroup=str(model),
                line={"color": color, "width": 1.5, "dash": "dash"},
                hovertemplate="full model r=%{y:.3f}<extra>" + str(model) + "</extra>",
            ))
    fig.update_xaxes(type="log", title_text="Active non-embedding parameters (log scale)")
    fig.update_yaxes(title_text="Bigram surprisal correlation (Pearson r)")
    return _style(fig, "Bigram subnetworks: correlation with bigram surprisal vs size")


def table_fig1(sweep: pd.DataFrame, full_model_r: Mapping[str, float] | None = None) -> pd.DataFrame:
    """The table beside Figure 1: best bigram-subnetwork r vs the full model's r, per model.

    Columns: model, best_subnetwork_r, full_model_r (as in :data:`PAPER_FIG1`), plus the
    lambda and active_params of the best subnetwork.
    """
    _require_columns(sweep, ["model", "lambda", "active_params", "r"], "table_fig1 sweep")
    reference = _full_model_r_by_model(sweep, full_model_r)
    rows = []
    for model, group in sweep.groupby("model", sort=False):
        best = group.loc[group["r"].idxmax()]
        rows.append({
            "model": model,
            "best_subnetwork_r": round(float(best["r"]), 3),
            "full_model_r": round(reference[str(model)], 3) if str(model) in reference else float("nan"),
            "lambda": best["lambda"],
            "active_params": int(best["active_params"]),
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- Figure 2


def interpolate_r(sweep: pd.DataFrame, target_params: Sequence[float]) -> pd.DataFrame:
    """Estimate r at given active-parameter counts by interpolating a sweep in log parameters.

    ``sweep`` (one model or checkpoint) has ``active_params`` and ``r``. As in the paper's
    Figure 2, r at a size is read off the piecewise-linear curve of r against log10 of active
    parameters; targets outside the swept range are clamped to the nearest end (and flagged in
    the ``extrapolated`` column). Returns columns target_params, r_estimated, extrapolated.
    """
    _require_columns(sweep, ["active_params", "r"], "interpolate_r sweep")
    data = sweep[(sweep["active_params"] > 0) & sweep["r"].notna()]
    if data.empty:
        raise FigureDataError("interpolate_r sweep has no subnetwork with active_params > 0")
    # Equal sizes (e.g. several lambdas that all keep everything) average into one point.
    curve = data.groupby("active_params", as_index=False)["r"].mean().sort_values("active_params")
    log_x = np.log10(curve["active_params"].to_numpy(dtype=float))
    r = curve["r"].to_numpy(dtype=float)
    targets = np.asarray(target_params, dtype=float)
    estimate = np.interp(np.log10(targets), log_x, r)
    outside = (targets < curve["active_params"].iloc[0]) | (targets > curve["active_params"].iloc[-1])
    return pd.DataFrame({"target_params": targets, "r_estimated": estimate, "extrapolated": outside})


def fig2_training_dynamics(ckpt: pd.DataFrame, layer_share: pd.DataFrame) -> go.Figure:
    """Figure 2: bigram subnetworks across training checkpoints.

    ``ckpt``: step, target_params, r_estimated (r of a bigram subnetwork of that size at that
    step, e.g. from :func:`interpolate_r`) and full_model_r (the full model's bigram r at that
    step). ``layer_share``: step, component ("mlp" or "attn"), layer, share (fraction of the
    chosen subnetwork's parameters in that layer component at that step).

    Three panels: lines of r vs step (one trace per target size, one for the full model), then a
    heatmap of MLP shares and one of attention shares (layer x step, one shared colour scale).
    """
    _require_columns(ckpt, ["step", "target_params", "r_estimated", "full_model_r"],
                     "fig2_training_dynamics ckpt")
    _require_columns(layer_share, ["step", "component", "layer", "share"],
                     "fig2_training_dynamics layer_share")
    components = set(layer_share["component"].str.lower())
    if not components <= {"mlp", "attn"}:
        raise FigureDataError(
            f"layer_share component must be 'mlp' or 'attn', got {sorted(components - {'mlp', 'attn'})}")
    fig = make_subplots(
        rows=1, cols=3, column_widths=[0.4, 0.3, 0.3], horizontal_spacing=0.09,
        subplot_titles=("Bigram r during training", "Share of subnetwork in MLP layers",
                        "Share of subnetwork in attention layers"),
    )
    for i, (size, group) in enumerate(ckpt.groupby("target_params", sort=True)):
        group = group.sort_values("step")
        fig.add_trace(go.Scatter(
            x=group["step"], y=group["r_estimated"], mode="lines+markers",
            name=f"subnetwork, {human_count(size)} params", line={"color": _PALETTE[i % len(_PALETTE)]},
            hovertemplate="step %{x}<br>r=%{y:.3f}<extra></extra>",
        ), row=1, col=1)
    full = ckpt.groupby("step", as_index=False)["full_model_r"].first().sort_values("step")
    fig.add_trace(go.Scatter(
        x=full["step"], y=full["full_model_r"], mode="lines+markers", name="full model",
        line={"color": _RUN_COLORS["full"], "dash": "dash"},
        hovertemplate="step %{x}<br>r=%{y:.3f}<extra>full model</extra>",
    ), row=1, col=1)

    steps = sorted(layer_share["step"].unique())
    layers = sorted(layer_share["layer"].unique())
    zmax = float(layer_share["share"].max()) or 1.0
    for col, component, label in ((2, "mlp", "MLP"), (3, "attn", "attention")):
        part = layer_share[layer_share["component"].str.lower() == component]
        grid = (part.pivot_table(index="layer", columns="step", values="share", aggfunc="sum")
                .reindex(index=layers, columns=steps).fillna(0.0))
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(), x=[str(s) for s in steps], y=[str(layer) for layer in layers],
            zmin=0.0, zmax=zmax, coloraxis="coloraxis", name=label,
            hovertemplate=f"{label} layer %{{y}}<br>step %{{x}}<br>share %{{z:.1%}}<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(type="category", title_text="Training step", row=1, col=col)
        fig.update_yaxes(type="category", title_text="Layer", row=1, col=col)
    fig.update_xaxes(title_text="Training step", row=1, col=1)
    fig.update_yaxes(title_text="Bigram surprisal correlation (r)", row=1, col=1)
    fig.update_layout(coloraxis={"colorscale": "Blues", "cmin": 0.0, "cmax": zmax,
                                 "colorbar": {"title": "share", "tickformat": ".0%", "x": 1.02}},
                      legend={"orientation": "h", "y": -0.25, "x": 0.0})
    return _style(fig, "Bigram subnetworks across training checkpoints", height=480, width=1250)


# ----------------------------------------------------------------------------- Figure 3


def fig3_rotation(lens: pd.DataFrame) -> go.Figure:
    """Figure 3: median rotation (degrees) towards the input and the output, per layer.

    ``lens``: run (e.g. "full", "bigram", "random"), layer (0 = embedding output), target
    ("input": map X_l -> raw token embeddings; "output": map X_l -> last layer) and
    rotation_deg. Two panels (input, output) with one line per run each.
    """
    _require_columns(lens, ["run", "layer", "target", "rotation_deg"], "fig3_rotation lens")
    targets = set(lens["target"].str.lower())
    if not targets <= {"input", "output"}:
        raise FigureDataError(f"lens target must be 'input' or 'output', got {sorted(targets - {'input', 'output'})}")
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("Rotation to input (token embeddings)",
                                        "Rotation to output (last layer)"))
    runs = _ordered(lens["run"], ["full", "bigram", "random", "optimal"])
    for col, target in ((1, "input"), (2, "output")):
        part = lens[lens["target"].str.lower() == target]
        for i, run in enumerate(runs):
            group = part[part["run"] == run].sort_values("layer")
            fig.add_trace(go.Scatter(
                x=group["layer"], y=group["rotation_deg"], mode="lines+markers", name=str(run),
                legendgroup=str(run), showlegend=col == 1,
                line={"color": _run_color(run, i), "dash": _DASHES[i % len(_DASHES)], "width": 2.5},
                hovertemplate="layer %{x}<br>%{y:.1f}°<extra>" + str(run) + "</extra>",
            ), row=1, col=col)
        fig.update_xaxes(type="linear", dtick=1, title_text="Layer (0 = embeddings)", row=1, col=col)
    fig.update_yaxes(title_text="Median rotation (degrees)", rangemode="tozero", row=1, col=1)
    return _style(fig, "Rotation of hidden states towards the input and the output", height=450, width=1000)


# ----------------------------------------------------------------------------- Figure 4


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
            raise FigureDataError(f"fig4_similarity matrix {run!r} must be a square layer x layer DataFrame, got shape {shape}")
    values = np.concatenate([np.asarray(m, dtype=float).ravel() for m in matrices.values()])
    zmin, zmax = float(np.nanmin(values)), float(np.nanmax(values))
    runs = _ordered(matrices.keys(), ["full", "bigram", "random", "optimal"])
    fig = make_subplots(rows=1, cols=len(runs), horizontal_spacing=0.05,
                        subplot_titles=[str(r) for r in runs])
    for col, run in enumerate(runs, start=1):
        matrix = matrices[run]
        fig.add_trace(go.Heatmap(
            z=matrix.to_numpy(dtype=float), x=[str(c) for c in matrix.columns],
            y=[str(i) for i in matrix.index], coloraxis="coloraxis", name=str(run),
            hovertemplate="layers %{y} and %{x}<br>cosine %{z:.3f}<extra>" + str(run) + "</extra>",
        ), row=1, col=col)
        fig.update_xaxes(type="category", title_text="Layer", row=1, col=col)
        fig.update_yaxes(type="category", autorange="reversed", scaleanchor=f"x{col if col > 1 else ''}",
                         row=1, col=col)
    fig.update_yaxes(title_text="Layer", row=1, col=1)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": zmin, "cmax": zmax,
                                 "colorbar": {"title": "cosine"}})
    return _style(fig, "Layer covariance similarity", height=420, width=330 * len(runs) + 120)


# ----------------------------------------------------------------------------- Figure 5


def fig5_optimal(opt_sweep: pd.DataFrame, ablation: pd.DataFrame) -> go.Figure:
    """Figure 5: optimal (pruning) subnetworks, and the LM loss when subnetworks are removed.

    ``opt_sweep``: active_params, r_model (Pearson r of the optimal subnetwork's surprisal with
    the full model's), r_bigram (with bigram surprisal), optional model. ``ablation``:
    condition (e.g. "full model", "random ablated", "bigram ablated", "optimal ablated"), loss
    (held-out LM loss, nats), optional loss_std (error bars) and model (x axis groups).

    Left panel (log x): two lines per model (r with the model, r with bigrams). Right panel:
    one bar trace per condition.
    """
    _require_columns(opt_sweep, ["active_params", "r_model", "r_bigram"], "fig5_optimal opt_sweep")
    _require_columns(ablation, ["condition", "loss"], "fig5_optimal ablation")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.12,
                        subplot_titles=("Optimal subnetworks: correlation with model and bigrams",
                                        "Eval loss with a subnetwork removed"))
    data = opt_sweep[opt_sweep["active_params"] > 0]
    groups = data.groupby("model", sort=False) if "model" in data.columns else [("", data)]
    for i, (model, group) in enumerate(groups):
        group = group.sort_values("active_params")
        suffix = f" ({model})" if model != "" else ""
        color = _PALETTE[i % len(_PALETTE)]
        for column, label, dash, kind in (("r_model", "r with full model", "solid", "optimal"),
                                          ("r_bigram", "r with bigrams", "dash", "bigram")):
            # One model: colour by what is correlated; several: colour by model, dash by target.
            line_color = color if suffix else _RUN_COLORS[kind]
            fig.add_trace(go.Scatter(
                x=group["active_params"], y=group[column], mode="lines+markers", name=label + suffix,
                line={"color": line_color, "dash": dash, "width": 2},
                hovertemplate="%{x:.3s} params<br>r=%{y:.3f}<extra>" + label + suffix + "</extra>",
            ), row=1, col=1)
    fig.update_xaxes(type="log", title_text="Active non-embedding parameters (log scale)", row=1, col=1)
    fig.update_yaxes(title_text="Surprisal correlation (Pearson r)", row=1, col=1)

    conditions = _ordered(ablation["condition"], ["full model", "full", "random ablated", "random",
                                                  "bigram ablated", "bigram", "optimal ablated", "optimal"])
    has_model = "model" in ablation.columns
    for i, condition in enumerate(conditions):
        rows = ablation[ablation["condition"] == condition]
        kind = next((k for k in ("full", "random", "bigram", "optimal") if k in str(condition).lower()), None)
        error = None
        if "loss_std" in rows.columns and rows["loss_std"].notna().any():
            error = {"type": "data", "array": rows["loss_std"].fillna(0.0).to_numpy(), "visible": True}
        fig.add_trace(go.Bar(
            x=rows["model"].astype(str) if has_model else [str(condition)], y=rows["loss"],
            name=str(condition), error_y=error, showlegend=has_model,
            marker_color=_RUN_COLORS[kind] if kind else _PALETTE[i % len(_PALETTE)],
            hovertemplate="%{y:.3f} nats<extra>" + str(condition) + "</extra>",
        ), row=1, col=2)
    fig.update_xaxes(type="category", title_text="Model" if has_model else "", row=1, col=2)
    fig.update_yaxes(title_text="Eval loss (nats per token)", row=1, col=2)
    fig.update_layout(barmode="group")
    return _style(fig, "Optimal subnetworks and subnetwork ablations", height=470, width=1150)


# ----------------------------------------------------------------------------- tables


def table1_chosen(sweep: pd.DataFrame, tolerance: float = 0.04) -> pd.DataFrame:
    """Table 1: the chosen bigram subnetwork of each model.

    The chosen subnetwork is the sparsest (fewest active_params) whose r is within
    ``tolerance`` of the r at the smallest lambda (lambda = 0 in the paper). ``sweep`` columns:
    model, lambda, active_params, r, and optionally mask_size (kept mask entries) and
    total_params (non-embedding parameters of the model, for a percentage column).
    """
    _require_columns(sweep, ["model", "lambda", "active_params", "r"], "table1_chosen sweep")
    rows = []
    for model, group in sweep.groupby("model", sort=False):
        group = group.dropna(subset=["r"])
        if group.empty:
            continue
        reference_r = float(group.loc[group["lambda"].idxmin(), "r"])
        eligible = group[group["r"] >= reference_r - tolerance]
        chosen = eligible.sort_values(["active_params", "lambda"], ascending=[True, False]).iloc[0]
        row = {"model": model, "lambda": chosen["lambda"], "active_params": int(chosen["active_params"])}
        if "total_params" in group.columns and pd.notna(chosen["total_params"]):
            row["total_params"] = int(chosen["total_params"])
            row["active_percent"] = round(100.0 * chosen["active_params"] / chosen["total_params"], 2)
        if "mask_size" in group.columns and pd.notna(chosen["mask_size"]):
            row["mask_size"] = int(chosen["mask_size"])
        row["r"] = round(float(chosen["r"]), 3)
        rows.append(row)
    if not rows:
        raise FigureDataError("table1_chosen sweep has no row with a finite r")
    return pd.DataFrame(rows)


_TABLE2_ORDER = [
    "full model", "bigram subnetwork", "subnetwork at random init",
    "random init + trained embeddings", "empty subnetwork + embeddings", "embeddings + linear map",
]


def table2_bigram_r(rows: pd.DataFrame) -> pd.DataFrame:
    """Table 2: bigram r of the full model, the bigram subnetwork and the baselines.

    ``rows``: condition, r, optional model. Conditions are ordered as in the paper where their
    names match (full model, bigram subnetwork, subnetwork at random init, random init +
    trained embeddings, empty subnetwork + embeddings, embeddings + linear map), others after.
    Without a model column: columns condition, r. With one: one row per condition, one column
    per model.
    """
    _require_columns(rows, ["condition", "r"], "table2_bigram_r rows")
    order = _ordered(rows["condition"], _TABLE2_ORDER)
    if "model" in rows.columns:
        table = rows.pivot_table(index="condition", columns="model", values="r", aggfunc="first", sort=False)
        table = table.reindex(order).round(3)
        table.columns.name = None
        return table.reset_index()
    table = rows[["condition", "r"]].copy()
    table["condition"] = pd.Categorical(table["condition"], categories=order, ordered=True)
    table = table.sort_values("condition", kind="stable")
    table["condition"] = table["condition"].astype(str)
    table["r"] = table["r"].astype(float).round(3)
    return table.reset_index(drop=True)


def table3_overlap(rows: pd.DataFrame) -> pd.DataFrame:
    """Table 3: overlap of bigram and optimal subnetworks against a random null.

    ``rows`` is ``circuits.overlap.overlap_table`` output (one row per pair): pair,
    fraction_overlap, expected, ratio, p_value, frac_a_in_b, and optionally
    expected_frac_a_in_b, p_value_text, n_random. Returns: pair, overlap, expected, ratio,
    p (as text, "< 1e-04" when no random pair reached it), % of A in B, expected % of A in B.
    """
    _require_columns(rows, ["pair", "fraction_overlap", "expected", "ratio", "p_value", "frac_a_in_b"],
                     "table3_overlap rows")
    table = pd.DataFrame({
        "pair": rows["pair"].astype(str),
        "overlap": rows["fraction_overlap"].astype(float).round(4),
        "expected": rows["expected"].astype(float).round(4),
        "ratio": rows["ratio"].astype(float).round(2),
    })
    if "p_value_text" in rows.columns:
        table["p"] = rows["p_value_text"].astype(str)
    elif "n_random" in rows.columns:
        table["p"] = [f"< {1.0 / n:.0e}" if p == 0 else f"{p:.2g}" for p, n in zip(rows["p_value"], rows["n_random"])]
    else:
        table["p"] = [f"{p:.2g}" for p in rows["p_value"]]
    table["% of A in B"] = (100.0 * rows["frac_a_in_b"].astype(float)).round(1)
    if "expected_frac_a_in_b" in rows.columns:
        table["expected % of A in B"] = (100.0 * rows["expected_frac_a_in_b"].astype(float)).round(1)
    return table.reset_index(drop=True)


_TABLE4_ORDER = ["full model", "full", "bigram subnetwork", "bigram", "bigram ablated",
                 "random ablated", "optimal ablated"]


def table4_generations(generations: pd.DataFrame) -> pd.DataFrame:
    """Table 4: sample generations of the full model, the bigram subnetwork and ablations.

    ``generations``: condition, text, optional prompt. Rows are ordered by prompt (first seen)
    then condition (full model, bigram subnetwork, bigram ablated, random ablated, others);
    whitespace runs (newlines) are shown as single spaces so the table stays one line a row.
    """
    _require_columns(generations, ["condition", "text"], "table4_generations generations")
    table = generations.copy()
    order = _ordered(table["condition"], _TABLE4_ORDER)
    table["_condition_rank"] = table["condition"].map({c: i for i, c in enumerate(order)})
    keys = ["_condition_rank"]
    if "prompt" in table.columns:
        table["_prompt_rank"] = table["prompt"].map({p: i for i, p in enumerate(dict.fromkeys(table["prompt"]))})
        keys = ["_prompt_rank", "_condition_rank"]
    table = table.sort_values(keys, kind="stable")
    columns = (["prompt"] if "prompt" in table.columns else []) + ["condition", "text"]
    table = table[columns].reset_index(drop=True)
    for column in columns:
        table[column] = table[column].astype(str).str.split().str.join(" ")
    return table


def to_markdown(df: pd.DataFrame, floatfmt: str = ".3g", index: bool = False) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (for the README), pipes and newlines escaped.

    Floats use ``floatfmt`` (3 significant digits by default), integers get thousands
    separators. Needs the ``tabulate`` package (pandas' Markdown writer).
    """
    if not isinstance(df, pd.DataFrame):
        raise FigureDataError(f"to_markdown needs a pandas DataFrame, got {type(df).__name__}")
    table = df.copy()
    for column in table.columns:
        if table[column].dtype == object or pd.api.types.is_string_dtype(table[column]):
            table[column] = (table[column].astype(str).str.replace("|", r"\|", regex=False)
                             .str.replace("\n", " ", regex=False))
        elif pd.api.types.is_integer_dtype(table[column]):
            table[column] = table[column].map(lambda v: f"{v:,}")
    try:
        return table.to_markdown(index=index, floatfmt=floatfmt, disable_numparse=False)
    except ImportError as exc:
        raise BigramCircuitsError("to_markdown needs the 'tabulate' package: pip install tabulate") from exc


# ----------------------------------------------------------------------------- saving

PNG_HELP = "PNG export needs Chromium: apt-get install chromium (HTML written)"
_CHROMIUM = Path("/usr/bin/chromium")
# Set after the first failed PNG export, so later figures skip the slow browser start.
_png_failure: str | None = None


def save_figure(
    fig: go.Figure,
    path_without_suffix: str | os.PathLike,
    *,
    png: bool = True,
    scale: float = 2.0,
    include_plotlyjs: bool | str = True,
) -> list[Path]:
    """Write ``fig`` as ``<path>.html`` (always) and ``<path>.png`` (when Chromium is usable).

    Both files are written atomically (temp file + rename). ``include_plotlyjs``: True embeds
    plotly.js (opens offline, ~4.7 MB), "cdn" links it (small, needs the internet),
    "directory" links a ``plotly.min.js`` written once next to the HTML (offline, shared by
    every figure of a folder). PNG export uses kaleido, which needs a Chrome/Chromium browser;
    ``BROWSER_PATH`` is pointed at /usr/bin/chromium when unset and that file exists. If the
    export fails, one warning (:data:`PNG_HELP`) is issued and only the HTML path is returned.
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
        image = fig.to_image(format="png", scale=scale)
    except Exception as exc:  # noqa: BLE001 - kaleido raises many unrelated types without a browser
        _png_failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _log.debug("PNG export failed: %s", _png_failure)
        warnings.warn(PNG_HELP, RuntimeWarning, stacklevel=2)
        return written
    atomic_write_bytes(png_path, image)
    written.append(png_path)
    return written
