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
(Fig 2)   ``fig_layer_distribution``   distribution: layer, block ("mlp"|"attn"), share_of_subnetwork,
                                       [fraction_kept] (``Subnetwork.layer_distribution()``)
Fig 3     ``fig3_rotation``            lens: run, layer, target ("input"|"output"), rotation_deg
Fig 4     ``fig4_similarity``          matrices: {run: square layer x layer DataFrame of cosines}
Fig 5     ``fig5_optimal``             opt_sweep: active_params, r_model, r_bigram, [model];
                                       ablation: condition, loss, [loss_std], [model]
Table 1   ``table1_chosen``            sweep: model, lambda, active_params, r, [mask_size]
Table 2   ``table2_bigram_r``          rows: condition, r, [model]
Table 3   ``table3_overlap``           rows: pair, fraction_overlap, expected, ratio, p_value,
                                       frac_a_in_b, [expected_frac_a_in_b], [p_value_text],
                                       [n_random] (``circuits.overlap.overlap_table`` output)
Table 4   ``table4_generations``       generations: condition, text (or generation), [prompt]
========  ===========================  ==========================================================

``active_params`` is in the paper's unit: non-embedding weights gated by kept mask entries.
``save_figure`` writes HTML (always) and PNG (when kaleido finds Chromium); ``to_markdown``
renders a table for the README.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from bigram_circuits.data import atomic_write_bytes
from bigram_circuits.errors import BigramCircuitsError
from bigram_circuits.masks import DEFAULT_GRANULARITIES

__all__ = [
    "PAPER_FIG1",
    "PNG_HELP",
    "FigureDataError",
    "FiguresConfig",
    "fig1_r_vs_params",
    "fig2_training_dynamics",
    "fig3_rotation",
    "fig4_similarity",
    "fig5_optimal",
    "fig_build_up",
    "fig_layer_distribution",
    "figures_command",
    "from_search_sweep",
    "human_count",
    "interpolate_r",
    "save_figure",
    "table1_chosen",
    "table2_bigram_r",
    "table3_overlap",
    "table4_generations",
    "table_fig1",
    "table_headline",
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
    fig.update_xaxes(type="log", title_text="Active non-embedding parameters (log scale)",
                     **_log_ticks(data["active_params"]))
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
    the ``extrapolated`` column); with no non-empty subnetwork the estimates are NaN. Returns
    columns target_params, r_estimated, extrapolated.
    """
    _require_columns(sweep, ["active_params", "r"], "interpolate_r sweep")
    data = sweep[(sweep["active_params"] > 0) & sweep["r"].notna()]
    targets = np.asarray(target_params, dtype=float)
    if data.empty:  # every mask came out empty: nothing to read r off (a gap in Fig 2)
        return pd.DataFrame({"target_params": targets, "r_estimated": np.nan, "extrapolated": True})
    # Equal sizes (e.g. several lambdas that all keep everything) average into one point.
    curve = data.groupby("active_params", as_index=False)["r"].mean().sort_values("active_params")
    log_x = np.log10(curve["active_params"].to_numpy(dtype=float))
    r = curve["r"].to_numpy(dtype=float)
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


def fig_layer_distribution(distribution: pd.DataFrame, title: str = "Where the subnetwork sits") -> go.Figure:
    """One subnetwork's layer distribution (Fig 2's heatmaps for a single model, no checkpoints).

    ``distribution``: layer, block ("mlp" or "attn"), share_of_subnetwork and optionally
    fraction_kept, as returned by :meth:`Subnetwork.layer_distribution`. Left: stacked bars of
    the share of the subnetwork's weights in each layer's MLP and attention. Right (with
    fraction_kept): the fraction of each block that is kept.
    """
    _require_columns(distribution, ["layer", "block", "share_of_subnetwork"], "fig_layer_distribution")
    blocks = set(distribution["block"].str.lower())
    if not blocks <= {"mlp", "attn"}:
        raise FigureDataError(f"block must be 'mlp' or 'attn', got {sorted(blocks - {'mlp', 'attn'})}")
    with_fraction = "fraction_kept" in distribution.columns
    fig = make_subplots(rows=1, cols=2 if with_fraction else 1, horizontal_spacing=0.1,
                        subplot_titles=("Share of the subnetwork's weights", "Fraction of each block kept")
                        if with_fraction else ("Share of the subnetwork's weights",))
    colors = {"mlp": _PALETTE[0], "attn": _PALETTE[1]}
    for block, label in (("mlp", "MLP"), ("attn", "attention")):
        part = distribution[distribution["block"].str.lower() == block].sort_values("layer")
        if part.empty:
            continue
        fig.add_trace(go.Bar(
            x=part["layer"], y=part["share_of_subnetwork"], name=label, legendgroup=block,
            marker_color=colors[block], hovertemplate="layer %{x}<br>%{y:.1%}<extra>" + label + "</extra>",
        ), row=1, col=1)
        if with_fraction:
            fig.add_trace(go.Scatter(
                x=part["layer"], y=part["fraction_kept"], mode="lines+markers", name=label,
                legendgroup=block, showlegend=False, line={"color": colors[block], "width": 2},
                hovertemplate="layer %{x}<br>%{y:.1%} kept<extra>" + label + "</extra>",
            ), row=1, col=2)
    for col in range(1, (2 if with_fraction else 1) + 1):
        fig.update_xaxes(title_text="Layer", dtick=1 if distribution["layer"].nunique() <= 12 else 5,
                         row=1, col=col)
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
    _require_columns(summary, ["task", "metric", "base", "condition", "candidate", "value"], "fig_build_up")
    tasks = list(dict.fromkeys(summary["task"]))
    metrics = {t: str(summary.loc[summary["task"] == t, "metric"].iloc[0]) for t in tasks}
    fig = make_subplots(rows=1, cols=len(tasks), horizontal_spacing=0.12,
                        subplot_titles=[f"{t} ({metrics[t].replace('_', ' ')})" for t in tasks])
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
            for condition, label, opacity in (("base + candidate", f"{base} + candidate", 1.0),
                                              ("base + random heads", f"{base} + random heads", 0.4)):
                rows = mine[mine["condition"] == condition].set_index("candidate").reindex(names)
                if rows["value"].isna().all():
                    continue
                error = None
                if "value_std" in rows.columns and rows["value_std"].notna().any():
                    error = {"type": "data", "array": rows["value_std"].fillna(0.0).tolist(), "visible": True}
                fig.add_trace(go.Bar(
                    x=names, y=rows["value"].tolist(), name=label, legendgroup=label,
                    showlegend=legend(label), marker={"color": color, "opacity": opacity},
                    error_y=error, hovertemplate="%{x}<br>%{y:.3f}<extra>" + label + "</extra>",
                ), row=1, col=col)
            alone = mine.loc[mine["condition"] == "base", "value"]
            if not alone.empty:
                fig.add_trace(go.Scatter(
                    x=names, y=[float(alone.iloc[0])] * len(names), mode="lines", name=f"{base} alone",
                    legendgroup=f"{base} alone", showlegend=legend(f"{base} alone"),
                    line={"color": color, "dash": "dash", "width": 2},
                ), row=1, col=col)
        full = part.loc[part["condition"] == "full", "value"]
        if not full.empty:
            fig.add_trace(go.Scatter(
                x=names, y=[float(full.iloc[0])] * len(names), mode="lines", name="full model",
                legendgroup="full model", showlegend=legend("full model"),
                line={"color": _RUN_COLORS["full"], "width": 2},
            ), row=1, col=col)
        without = part[part["condition"] == "full - candidate"].drop_duplicates("candidate")
        without = without.set_index("candidate").reindex(names)
        if without["value"].notna().any():
            fig.add_trace(go.Scatter(
                x=names, y=without["value"].tolist(), mode="markers", name="full - candidate",
                legendgroup="full - candidate", showlegend=legend("full - candidate"),
                marker={"symbol": "x", "size": 11, "color": _RUN_COLORS["full"]},
            ), row=1, col=col)
        fig.update_yaxes(title_text=metrics[task].replace("_", " "), row=1, col=col)
        fig.update_xaxes(tickangle=-25, row=1, col=col)
    fig.update_layout(barmode="group", legend={"orientation": "h", "y": -0.35, "x": 0.0})
    return _style(fig, title, height=520, width=max(650, 560 * len(tasks)))


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
        # One tick per layer for small models; every 5th for deep ones (30 layers are unreadable).
        fig.update_xaxes(type="linear", dtick=1 if lens["layer"].max() <= 12 else 5, rangemode="tozero",
                         title_text="Layer (0 = embeddings)", row=1, col=col)
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
    one bar trace per condition, labelled with its loss (x: model when ``model`` has several
    values, else the condition).
    """
    _require_columns(opt_sweep, ["active_params", "r_model", "r_bigram"], "fig5_optimal opt_sweep")
    _require_columns(ablation, ["condition", "loss"], "fig5_optimal ablation")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.12,
                        subplot_titles=("Optimal subnetworks: correlation with model and bigrams",
                                        "Eval loss with a subnetwork removed"))
    data = opt_sweep[opt_sweep["active_params"] > 0]
    several_models = "model" in data.columns and data["model"].nunique() > 1
    groups = data.groupby("model", sort=False) if several_models else [("", data)]
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
    fig.update_xaxes(type="log", title_text="Active non-embedding parameters (log scale)", row=1, col=1,
                     **_log_ticks(data["active_params"]))
    fig.update_yaxes(title_text="Surprisal correlation (Pearson r)", row=1, col=1)

    conditions = _ordered(ablation["condition"], ["full model", "full", "random ablated", "random",
                                                  "bigram ablated", "bigram", "optimal ablated", "optimal"])
    has_model = "model" in ablation.columns and ablation["model"].nunique() > 1
    for i, condition in enumerate(conditions):
        rows = ablation[ablation["condition"] == condition]
        kind = next((k for k in ("full", "random", "bigram", "optimal") if k in str(condition).lower()), None)
        error = None
        if "loss_std" in rows.columns and rows["loss_std"].notna().any():
            error = {"type": "data", "array": rows["loss_std"].fillna(0.0).to_numpy(), "visible": True}
        fig.add_trace(go.Bar(
            x=rows["model"].astype(str) if has_model else [str(condition)], y=rows["loss"],
            name=str(condition), error_y=error, showlegend=has_model,
            text=rows["loss"], texttemplate="%{text:.2f}", textposition="outside", cliponaxis=False,
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
    ``tolerance`` of the lambda = 0 run's r (of the best run's when the sweep has no lambda 0),
    the rule of ``search.choose_subnetwork``. ``sweep`` columns: model, lambda, active_params,
    r, and optionally mask_size (|M|, the model's maskable non-embedding weights, as in the
    paper's "7.24M of 84.9M"). Returns: model, lambda, active_params, [mask_size,
    active_percent], r.
    """
    _require_columns(sweep, ["model", "lambda", "active_params", "r"], "table1_chosen sweep")
    rows = []
    for model, group in sweep.groupby("model", sort=False):
        group = group.dropna(subset=["r"])
        if group.empty:
            continue
        zero = group[group["lambda"] == 0]
        reference_r = float(zero["r"].iloc[0]) if not zero.empty else float(group["r"].max())
        eligible = group[group["r"] >= reference_r - tolerance]
        chosen = eligible.sort_values(["active_params", "lambda"], ascending=[True, False]).iloc[0]
        row = {"model": model, "lambda": chosen["lambda"], "active_params": int(chosen["active_params"])}
        if "mask_size" in group.columns and pd.notna(chosen["mask_size"]):
            row["mask_size"] = int(chosen["mask_size"])
            row["active_percent"] = round(100.0 * chosen["active_params"] / chosen["mask_size"], 2)
        row["r"] = round(float(chosen["r"]), 3)
        rows.append(row)
    if not rows:
        raise FigureDataError("table1_chosen sweep has no row with a finite r")
    return pd.DataFrame(rows)


def from_search_sweep(table: pd.DataFrame, model: str, mask_size: int | None = None) -> pd.DataFrame:
    """Rows for :func:`fig1_r_vs_params` / :func:`table1_chosen` from a ``search.sweep`` table.

    ``search.sweep`` (and ``bigram-circuits find``'s ``sweep.csv``) name the columns lambda,
    n_params and bigram_r; this adds ``model`` and renames them to lambda, active_params, r
    (plus mask_size when given).
    """
    _require_columns(table, ["lambda", "n_params", "bigram_r"], "from_search_sweep table")
    rows = pd.DataFrame({
        "model": str(model),
        "lambda": table["lambda"].astype(float).to_numpy(),
        "active_params": table["n_params"].astype(float).to_numpy(),
        "r": table["bigram_r"].astype(float).to_numpy(),
    })
    if mask_size is not None:
        rows["mask_size"] = int(mask_size)
    return rows


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


_TABLE4_ORDER = ["full model", "full", "bigram subnetwork", "bigram only", "bigram", "bigram ablated",
                 "random ablated", "optimal ablated"]


def table4_generations(generations: pd.DataFrame) -> pd.DataFrame:
    """Table 4: sample generations of the full model, the bigram subnetwork and ablations.

    ``generations``: condition, text (or generation, as ``evaluate.generate_table`` names
    it), optional prompt. Rows are ordered by prompt (first seen) then condition (full model,
    bigram subnetwork, bigram ablated, random ablated, others); whitespace runs (newlines) are
    shown as single spaces so the table stays one line a row.
    """
    if isinstance(generations, pd.DataFrame) and "text" not in generations.columns \
            and "generation" in generations.columns:
        generations = generations.rename(columns={"generation": "text"})
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


HEADLINE_COLUMNS = ("active_params", "active_percent", "r", "mlp0_share", "ablated_loss_increase",
                    "random_ablated_loss_increase", "ablation_ratio", "random_only_loss", "overlap_ratio",
                    "overlap_frac_in_optimal")


def table_headline(rows: pd.DataFrame) -> pd.DataFrame:
    """Headline numbers per seed (``FiguresConfig.headline_seeds``) and a last row of
    ``mean ± sd`` (sample std) for each of :data:`HEADLINE_COLUMNS` present in ``rows``."""
    _require_columns(rows, ["seed", "active_params", "r"], "table_headline rows")
    columns = [c for c in HEADLINE_COLUMNS if c in rows.columns]
    shown = rows[["seed", *[c for c in ("lambda", "steps") if c in rows.columns], *columns]].copy().astype(object)

    def number(value: float, column: str) -> str:
        return f"{value:,.0f}" if column == "active_params" else f"{value:.4g}"

    summary: dict[str, object] = {"seed": "mean ± sd"}
    for column in columns:
        values = rows[column].astype(float)
        shown[column] = [number(v, column) for v in values]
        spread = values.std(ddof=1) if len(values) > 1 else float("nan")
        summary[column] = f"{number(values.mean(), column)} ± {number(spread, column) if column == 'active_params' else f'{spread:.2g}'}"
    return pd.concat([shown, pd.DataFrame([summary])], ignore_index=True)


def _is_whole(column: pd.Series) -> bool:
    """A float column whose values are all whole numbers of at least 1000 (parameter counts)."""
    if not pd.api.types.is_float_dtype(column):
        return False
    values = column.dropna()
    return bool(len(values)) and bool((values == values.round()).all()) and bool((values.abs() >= 1000).all())


def to_markdown(df: pd.DataFrame, floatfmt: str = ".3g", index: bool = False) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (for the README), pipes and newlines escaped.

    Floats use ``floatfmt`` (3 significant digits by default); integers, and float columns of
    whole numbers >= 1000 (parameter counts), get thousands separators; missing values are
    blank. Needs the ``tabulate`` package (pandas' Markdown writer).
    """
    if not isinstance(df, pd.DataFrame):
        raise FigureDataError(f"to_markdown needs a pandas DataFrame, got {type(df).__name__}")
    table = df.copy()
    for column in table.columns:
        if table[column].dtype == object or pd.api.types.is_string_dtype(table[column]):
            table[column] = (table[column].astype(str).str.replace("|", r"\|", regex=False)
                             .str.replace("\n", " ", regex=False))
        elif pd.api.types.is_integer_dtype(table[column]) or _is_whole(table[column]):
            table[column] = table[column].map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
        elif pd.api.types.is_float_dtype(table[column]) and table[column].isna().any():
            # tabulate leaves None cells blank (missingval) but prints NaN as "nan".
            table[column] = table[column].astype(object).where(table[column].notna(), None)
    try:
        return table.to_markdown(index=index, floatfmt=floatfmt, missingval="")
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


# ----------------------------------------------------------------------------- regenerate everything


@dataclass(frozen=True)
class FiguresConfig:
    """Settings of :func:`figures_command`, sized for the default model on 2 CPU cores.

    The paper's searches are weight masks over 10k steps of 32 x 128 tokens with the
    temperature growing 0.1% per step. Here masks are also single weights (``granularities``;
    ``("neuron", "head")`` draws the coarser masks), but batches are 8 x 64 tokens (a bigram
    target needs no long context) and the temperature grows 4% per step, so a mask is decided
    in about 150-250 steps (at most ``max_steps``). The chosen lambda's bigram subnetwork is
    searched again with every seed of ``headline_seeds``, and the headline numbers (size, r,
    ablation ratio, overlap with the optimal subnetwork) are reported as mean and sample std
    over those seeds. Fig 2 uses at most ``max_checkpoints`` training checkpoints (evenly
    spaced, first and last included) plus the final model, and estimates r at
    ``target_fractions`` of the maskable parameters. Table 2's "embeddings + linear map"
    baseline trains its map for ``linear_map_steps`` steps.
    """

    corpus: str = "default"
    granularities: tuple[str, ...] = DEFAULT_GRANULARITIES
    seq_len: int = 64
    batch_size: int = 8
    max_steps: int = 300
    temperature_growth: float = 1.04
    lr: float | None = None
    headline_seeds: tuple[int, ...] = (0, 1, 2)
    bigram_lambdas: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0)
    optimal_lambdas: tuple[float, ...] = (1.0, 10.0, 100.0)
    checkpoint_lambdas: tuple[float, ...] = (1.0, 10.0, 100.0)
    max_checkpoints: int = 3
    target_fractions: tuple[float, ...] = (0.02, 0.05, 0.2)
    train_windows: int = 2048
    eval_windows: int = 256
    analysis_seq_len: int = 128
    analysis_tokens: int = 32768
    ablation_windows: int = 64
    random_seeds: tuple[int, ...] = (0, 1, 2)
    overlap_samples: int = 10_000
    prompts: tuple[str, ...] = ("The President of the United States", "The city is located in")
    generation_tokens: int = 20
    generation_temperature: float = 1.0
    linear_map_steps: int = 300
    seed: int = 0

    def search_config(self):
        """The :class:`~bigram_circuits.search.SearchConfig` of every search (lambda set per run)."""
        from bigram_circuits.search import SearchConfig

        return SearchConfig(max_steps=self.max_steps, batch_size=self.batch_size, seq_len=self.seq_len,
                            temperature_growth=self.temperature_growth, lr=self.lr, seed=self.seed,
                            checkpoint_every=25, eval_batches=2)

    def key(self) -> str:
        """A short hash of every setting (results of other settings live in other cache folders)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _model_fingerprint(model: str) -> str:
    """A short hash of the model's files (weights and checkpoints), or of its name for hub models."""
    from bigram_circuits.models import resolve_source

    source = resolve_source(model)
    digest = hashlib.sha256(f"{source.kind}|{source.label}".encode())
    location = Path(source.location)
    files = [location] if location.is_file() else sorted(
        p for p in location.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin", ".gguf"))
    for path in files:
        # Name, size and modification time: a retrained model gets a new cache without hashing GBs.
        stat = path.stat()
        digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:10]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text.strip("/\\").split("/")[-1])[:40] or "model"


def _evenly_spaced(values: Sequence[int], count: int) -> list[int]:
    if len(values) <= count:
        return list(values)
    picks = np.unique(np.linspace(0, len(values) - 1, count).round().astype(int))
    return [values[i] for i in picks]


class _FigureRun:
    """Results of one model under one FiguresConfig, computed on first use and cached on disk.

    Every result is a CSV/JSON file under ``root``; searches keep their own resumable folders
    there. The model, data and bigram statistics are loaded only when something is missing,
    so a fully cached run only redraws.
    """

    def __init__(self, model: str, config: FiguresConfig, root: Path, device: str, show_progress: bool):
        self.model, self.config, self.root = model, config, root
        self.device, self.show_progress = device, show_progress
        self._loaded: dict | None = None
        root.mkdir(parents=True, exist_ok=True)
        settings = {"model": model, "config": asdict(config)}
        atomic_write_bytes(root / "settings.json", json.dumps(settings, indent=2).encode("utf-8"))

    # -- cache helpers

    def _frame(self, name: str, compute) -> pd.DataFrame:
        path = self.root / f"{name}.csv"
        if path.exists():
            return pd.read_csv(path)
        table = compute()
        atomic_write_bytes(path, table.to_csv(index=False).encode("utf-8"))
        return table

    def _json(self, name: str, compute) -> dict:
        path = self.root / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        atomic_write_bytes(path, json.dumps(value, indent=2).encode("utf-8"))
        return value

    # -- model and data (loaded lazily, once)

    @property
    def loaded(self) -> dict:
        if self._loaded is None:
            from bigram_circuits.data import load_token_dataset
            from bigram_circuits.models import load_model, model_vocab_size
            from bigram_circuits.ngrams import BigramStats

            cfg = self.config
            bridge, tokenizer = load_model(self.model, device=self.device)
            vocab = model_vocab_size(bridge, tokenizer)
            train = load_token_dataset(cfg.corpus, tokenizer, split="train", show_progress=self.show_progress)
            held_out = load_token_dataset(cfg.corpus, tokenizer, split="eval", show_progress=self.show_progress)
            stats = BigramStats.from_tokens(train, vocab, seq_len=cfg.analysis_seq_len, show_progress=False)
            n_analysis = math.ceil(cfg.analysis_tokens / cfg.analysis_seq_len)
            self._loaded = {
                "bridge": bridge, "tokenizer": tokenizer, "vocab": vocab, "stats": stats,
                "train": train.windows(cfg.seq_len, cfg.train_windows),
                "eval": held_out.windows(cfg.seq_len, cfg.eval_windows),
                "analysis": held_out.windows(cfg.analysis_seq_len, n_analysis),
                "ablation": held_out.windows(cfg.analysis_seq_len, cfg.ablation_windows),
            }
        return self._loaded

    def _sweep(self, bridge, target_name: str, lambdas, folder: str, seed: int | None = None) -> pd.DataFrame:
        from bigram_circuits.search import Target, sweep

        data = self.loaded
        target = Target.bigram(data["stats"]) if target_name == "bigram" else Target.full_model(data["vocab"])
        config = self.config.search_config()
        if seed is not None:
            config = replace(config, seed=seed)
        table = sweep(bridge, data["train"], target, [float(x) for x in lambdas], self.config.granularities,
                      config, self.root / folder, eval_windows=data["eval"],
                      show_progress=self.show_progress, metadata={"figures": folder})
        table["path"] = [str(Path(p).relative_to(self.root)) for p in table["path"]]
        return table

    def subnetwork(self, relative_path: str):
        from bigram_circuits.subnetwork import Subnetwork

        return Subnetwork.load(self.root / relative_path)

    # -- Fig 1, Table 1

    def bigram_sweep(self) -> pd.DataFrame:
        """The lambda sweep of bigram subnetworks of the final model, with full-model r and |M|."""
        def compute() -> pd.DataFrame:
            from bigram_circuits.search import bigram_correlation
            from bigram_circuits.subnetwork import Subnetwork

            data = self.loaded
            table = self._sweep(data["bridge"], "bigram", self.config.bigram_lambdas, "final/bigram")
            mask_size = Subnetwork.full(data["bridge"], self.config.granularities).n_params_total()
            rows = from_search_sweep(table, self.model, mask_size=mask_size)
            rows["full_model_r"] = bigram_correlation(data["bridge"], data["stats"], data["eval"])
            rows["chosen"] = table["chosen"].to_numpy()
            rows["path"] = table["path"].to_numpy()
            return rows
        return self._frame("bigram_sweep", compute)

    def chosen_bigram(self):
        table = self.bigram_sweep()
        chosen = table[table["chosen"]] if table["chosen"].any() else table.loc[[table["r"].idxmax()]]
        return self.subnetwork(chosen["path"].iloc[0])

    # -- Fig 5 left, and the optimal subnetwork paired with the chosen bigram one

    def optimal_sweep(self) -> pd.DataFrame:
        """Optimal subnetworks (target: the full model's distribution): r with model and bigrams."""
        def compute() -> pd.DataFrame:
            from bigram_circuits.evaluate import (
                metrics_from_surprisals,
                pearson_r,
                token_surprisals,
            )

            data = self.loaded
            table = self._sweep(data["bridge"], "full_model", self.config.optimal_lambdas, "final/optimal")
            full = token_surprisals(data["bridge"], data["stats"], data["eval"], show_progress=False)
            rows = []
            for _, run in table.iterrows():
                sub = token_surprisals(data["bridge"], data["stats"], data["eval"], self.subnetwork(run["path"]),
                                       show_progress=False)
                rows.append({"model": self.model, "lambda": run["lambda"], "active_params": run["n_params"],
                             "r_model": pearson_r(sub.model, full.model),
                             "r_bigram": metrics_from_surprisals(sub)["r_dropped"], "path": run["path"]})
            return pd.DataFrame(rows)
        return self._frame("optimal_sweep", compute)

    def paired_optimal(self):
        """The optimal subnetwork closest in size (log scale) to the chosen bigram subnetwork."""
        table = self.optimal_sweep()
        size = max(self.chosen_bigram().n_params(), 1)
        distance = (np.log(table["active_params"].clip(lower=1)) - math.log(size)).abs()
        return self.subnetwork(table.loc[distance.idxmin(), "path"])

    # -- headline numbers over seeds

    def headline(self) -> pd.DataFrame:
        """The chosen lambda's bigram subnetwork searched once per ``headline_seeds`` seed: its
        size, r, where it sits, the ablation ratio against a random same-shape subnetwork (drawn
        with the same seed) and its overlap with the paired optimal subnetwork."""
        def compute() -> pd.DataFrame:
            from bigram_circuits.circuits.overlap import overlap
            from bigram_circuits.evaluate import ablation_table

            data = self.loaded
            sweep_rows = self.bigram_sweep()
            chosen = sweep_rows[sweep_rows["chosen"]] if sweep_rows["chosen"].any() \
                else sweep_rows.loc[[sweep_rows["r"].idxmax()]]
            lam, chosen_path = float(chosen["lambda"].iloc[0]), str(chosen["path"].iloc[0])
            optimal = self.paired_optimal()
            rows = []
            for seed in self.config.headline_seeds:
                path = chosen_path if seed == self.config.seed else str(
                    self._sweep(data["bridge"], "bigram", [lam], f"final/bigram_seed_{seed}", seed=seed)["path"].iloc[0])
                sub = self.subnetwork(path)
                metrics = sub.metadata.get("metrics", {})
                ablation = ablation_table(data["bridge"], data["stats"], data["ablation"], sub, seeds=(seed,),
                                          show_progress=False).set_index("condition")
                shares = sub.layer_distribution()
                kept = max(float(shares["kept_params"].sum()), 1.0)
                result = overlap(sub, optimal, n_random=self.config.overlap_samples, seed=self.config.seed)
                rows.append({
                    "seed": seed, "lambda": lam, "active_params": int(sub.n_params()),
                    "active_percent": 100.0 * sub.n_params() / max(sub.n_params_total(), 1),
                    "r": float(metrics.get("bigram_r", float("nan"))), "steps": int(metrics.get("steps", 0)),
                    "converged": bool(metrics.get("converged", False)),
                    "mlp0_share": float(shares.query("layer == 0 and block == 'mlp'")["kept_params"].sum() / kept),
                    "ablated_loss_increase": float(ablation.loc["bigram ablated", "loss_increase"]),
                    "random_ablated_loss_increase": float(ablation.loc["random ablated", "loss_increase"]),
                    "ablation_ratio": float(ablation.attrs["loss_increase_ratio"]),
                    "bigram_only_loss": float(ablation.loc["bigram only", "lm_loss_nats"]),
                    "random_only_loss": float(ablation.loc["random only", "lm_loss_nats"]),
                    "overlap_ratio": result.ratio, "overlap_p_value": result.p_value,
                    "overlap_frac_in_optimal": result.frac_a_in_b, "path": path,
                })
            return pd.DataFrame(rows)
        return self._frame("headline_seeds", compute)

    # -- Fig 2

    def checkpoint_results(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Estimated r at fixed sizes and layer shares of the chosen subnetwork, per checkpoint."""
        from bigram_circuits.models import available_checkpoints

        steps = _evenly_spaced(available_checkpoints(self.model), self.config.max_checkpoints)
        if not steps:
            return pd.DataFrame(), pd.DataFrame()

        def compute_step(step: int | None) -> pd.DataFrame:
            from bigram_circuits.models import load_model
            from bigram_circuits.search import bigram_correlation, choose_subnetwork

            data = self.loaded
            if step is None:  # the final model: reuse the Fig 1 sweep
                rows = self.bigram_sweep()
                full_r = float(rows["full_model_r"].iloc[0])
                chosen_path = rows.loc[rows["chosen"], "path"].iloc[0] if rows["chosen"].any() \
                    else rows.loc[rows["r"].idxmax(), "path"]
            else:
                bridge, _ = load_model(self.model, device=self.device, checkpoint=step)
                table = self._sweep(bridge, "bigram", self.config.checkpoint_lambdas, f"step_{step}/bigram")
                rows = from_search_sweep(table, self.model)
                full_r = bigram_correlation(bridge, data["stats"], data["eval"])
                chosen_path = table.loc[choose_subnetwork(table).name, "path"]
                del bridge
            chosen = self.subnetwork(chosen_path)
            targets = [f * chosen.n_params_total() for f in self.config.target_fractions]
            estimate = interpolate_r(rows, targets)
            estimate["full_model_r"] = full_r
            shares = chosen.layer_distribution().rename(columns={"block": "component", "share_of_subnetwork": "share"})
            shares = shares[["layer", "component", "share"]].assign(kind="share")
            return pd.concat([estimate.assign(kind="r"), shares], ignore_index=True)

        final_step = self._final_step()
        parts = []
        for step in steps + ([None] if final_step is not None else []):
            label = final_step if step is None else step
            part = self._frame(f"checkpoint_{label}", lambda s=step: compute_step(s))
            parts.append(part.assign(step=label))
        combined = pd.concat(parts, ignore_index=True)
        ckpt = combined[combined["kind"] == "r"][["step", "target_params", "r_estimated", "full_model_r",
                                                  "extrapolated"]]
        share = combined[combined["kind"] == "share"][["step", "component", "layer", "share"]]
        return ckpt.reset_index(drop=True), share.astype({"layer": int}).reset_index(drop=True)

    def _final_step(self) -> int | None:
        """The final model's training step, from the model folder's metrics.json when it has one."""
        from bigram_circuits.models import resolve_source

        metrics = Path(resolve_source(self.model).location) / "metrics.json"
        if not metrics.is_file():
            return None
        try:
            return int(json.loads(metrics.read_text())["config"]["max_steps"])
        except (KeyError, TypeError, ValueError):
            return None

    # -- Fig 3, Fig 4

    def _runs(self) -> dict:
        bigram = self.chosen_bigram()
        return {"full": None, "bigram": bigram, "random": bigram.random_control(self.config.seed)}

    def lens(self) -> pd.DataFrame:
        def compute() -> pd.DataFrame:
            from bigram_circuits.circuits.lens import lens_report

            data = self.loaded
            return lens_report(data["bridge"], data["tokenizer"], data["analysis"], self._runs(),
                               n_tokens=self.config.analysis_tokens, progress=self.show_progress)
        return self._frame("lens", compute)

    def similarity(self) -> dict[str, pd.DataFrame]:
        names = ("full", "bigram", "random")
        paths = {name: self.root / f"similarity_{name}.csv" for name in names}
        if not all(p.exists() for p in paths.values()):
            from bigram_circuits.circuits.similarity import similarity_report

            data = self.loaded
            matrices = similarity_report(data["bridge"], data["analysis"], self._runs(),
                                         n_tokens=self.config.analysis_tokens, progress=self.show_progress)
            for name, matrix in matrices.items():
                atomic_write_bytes(paths[name], matrix.to_csv().encode("utf-8"))
        return {name: pd.read_csv(path, index_col=0) for name, path in paths.items()}

    # -- Fig 5 right, Tables 2-4

    def ablation(self) -> pd.DataFrame:
        def compute() -> pd.DataFrame:
            from bigram_circuits.evaluate import ablation_table

            data = self.loaded
            return ablation_table(data["bridge"], data["stats"], data["ablation"], self.chosen_bigram(),
                                  optimal=self.paired_optimal(), seeds=self.config.random_seeds,
                                  show_progress=self.show_progress)
        return self._frame("ablation", compute)

    def overlap(self) -> pd.DataFrame:
        def compute() -> pd.DataFrame:
            from bigram_circuits.circuits.overlap import overlap_table

            return overlap_table({"bigram vs optimal": (self.chosen_bigram(), self.paired_optimal())},
                                 n_random=self.config.overlap_samples, seed=self.config.seed)
        return self._frame("overlap", compute)

    def generations(self) -> pd.DataFrame:
        def compute() -> pd.DataFrame:
            from bigram_circuits.evaluate import generate_table, generation_conditions

            data = self.loaded
            conditions = generation_conditions(self.chosen_bigram(), random_seed=self.config.seed)
            return pd.concat([
                generate_table(data["bridge"], data["tokenizer"], prompt, conditions,
                               temperature=self.config.generation_temperature,
                               max_new_tokens=self.config.generation_tokens, seed=self.config.seed)
                for prompt in self.config.prompts
            ], ignore_index=True)
        return self._frame("generations", compute)

    def bigram_r_rows(self) -> pd.DataFrame:
        """Table 2 rows: full model, bigram subnetwork, empty subnetwork (embeddings, layernorms
        and biases only), "embeddings + linear map" and, with a step-0 checkpoint, the subnetworks
        found at random initialisation with its own and with the trained embeddings."""
        def compute() -> pd.DataFrame:
            from bigram_circuits.baselines import (
                LinearMapConfig,
                fit_linear_map,
                transplant_embeddings,
            )
            from bigram_circuits.models import available_checkpoints, load_model
            from bigram_circuits.search import SWEEP_FILE, bigram_correlation, choose_subnetwork
            from bigram_circuits.subnetwork import Subnetwork

            data = self.loaded
            sweep_rows = self.bigram_sweep()
            chosen = table1_chosen(sweep_rows).iloc[0]
            empty = Subnetwork.empty(data["bridge"], self.config.granularities)
            rows = [
                {"condition": "full model", "r": float(sweep_rows["full_model_r"].iloc[0])},
                {"condition": "bigram subnetwork", "r": float(chosen["r"])},
            ]
            if 0 in available_checkpoints(self.model):
                self.checkpoint_results()  # makes sure the step-0 sweep exists
                init_sweep = self.root / "step_0" / "bigram" / SWEEP_FILE
                rows.append({"condition": "subnetwork at random init",
                             "r": float(choose_subnetwork(pd.read_csv(init_sweep))["bigram_r"])})
                init_bridge, _ = load_model(self.model, device=self.device, checkpoint=0)
                transplant_embeddings(init_bridge, data["bridge"])
                table = self._sweep(init_bridge, "bigram", self.config.checkpoint_lambdas,
                                    "step_0_trained_embeddings/bigram")
                rows.append({"condition": "random init + trained embeddings",
                             "r": float(choose_subnetwork(table)["bigram_r"])})
                del init_bridge
            rows.append({"condition": "empty subnetwork + embeddings",
                         "r": bigram_correlation(data["bridge"], data["stats"], data["eval"], empty)})
            linear_map = fit_linear_map(
                data["bridge"], data["stats"], data["train"],
                LinearMapConfig(steps=self.config.linear_map_steps, batch_size=self.config.batch_size,
                                seed=self.config.seed),
                show_progress=self.show_progress)
            rows.append({"condition": "embeddings + linear map",
                         "r": linear_map.evaluate(data["bridge"], data["stats"], data["eval"])["r_dropped"]})
            return pd.DataFrame(rows)
        # "table2_bigram_r": a cache written before the linear-map and transplant rows existed
        # ("table2_rows") is not reused.
        return self._frame("table2_bigram_r", compute)


def figures_command(
    model: str = "default",
    out_dir: str | os.PathLike = "figures",
    cache_dir: str | os.PathLike = "runs/figures_cache",
    *,
    config: FiguresConfig | None = None,
    device: str = "cpu",
    png: bool = True,
    show_progress: bool = True,
) -> list[Path]:
    """``bigram-circuits figures``: compute every result of the paper's figures and tables for
    ``model`` and write them to ``out_dir``; returns the paths written.

    Intermediate results (searches, evaluations, lens, similarity, ablations, generations) are
    cached under ``cache_dir/<model>-<hash of model files and settings>/``, so an interrupted
    run resumes where it stopped and a finished one only redraws. Writes ``fig1..fig5`` as
    HTML (+ PNG when Chromium is available; one shared ``plotly.min.js``), every table as CSV,
    ``tables.md`` with all tables in Markdown, and the figures' input DataFrames under
    ``out_dir/data/`` (so they can be redrawn without the cache). ``png=False`` skips the PNG
    export.
    """
    from bigram_circuits.data import ensure_output_dir

    config = config or FiguresConfig()
    # Unwritable destinations fail now, not after the searches.
    out = ensure_output_dir(out_dir)
    ensure_output_dir(cache_dir)
    root = Path(cache_dir) / f"{_slug(str(model))}-{_model_fingerprint(str(model))}-{config.key()}"
    run = _FigureRun(str(model), config, root, device, show_progress)

    stages = [
        ("bigram sweep", run.bigram_sweep), ("optimal sweep", run.optimal_sweep),
        ("checkpoints", run.checkpoint_results), ("linear lens", run.lens), ("similarity", run.similarity),
        ("ablation", run.ablation), ("overlap", run.overlap), ("generations", run.generations),
        ("bigram r table", run.bigram_r_rows), ("headline over seeds", run.headline),
    ]
    results = {}
    with tqdm(total=len(stages), desc="figures", unit="stage", disable=not show_progress) as bar:
        for name, compute in stages:
            bar.set_postfix_str(name)
            results[name] = compute()
            bar.update(1)

    written: list[Path] = []

    def save(fig: go.Figure, name: str) -> None:
        written.extend(save_figure(fig, out / name, png=png, include_plotlyjs="directory"))

    sweep_rows = results["bigram sweep"]
    save(fig1_r_vs_params(sweep_rows), "fig1_r_vs_params")
    ckpt, share = results["checkpoints"]
    if len(ckpt):
        save(fig2_training_dynamics(ckpt, share), "fig2_training_dynamics")
    else:
        _log.warning("Fig 2 skipped: %s has no training checkpoints (checkpoints/step_N.safetensors)", model)
    save(fig3_rotation(results["linear lens"]), "fig3_rotation")
    save(fig4_similarity(results["similarity"]), "fig4_similarity")
    ablation = results["ablation"].rename(columns={"lm_loss_nats": "loss", "lm_loss_nats_std": "loss_std"})
    ablation = ablation[ablation["condition"].isin(["full model", "random ablated", "bigram ablated",
                                                    "optimal ablated"])]
    save(fig5_optimal(results["optimal sweep"], ablation), "fig5_optimal")
    chosen = table1_chosen(sweep_rows).iloc[0]
    distribution = run.chosen_bigram().layer_distribution()
    save(fig_layer_distribution(distribution, f"Where the chosen bigram subnetwork sits (lambda {chosen['lambda']:g}, "
                                              f"{human_count(chosen['active_params'])} weights, r {chosen['r']:.3f})"),
         "fig_layer_distribution")

    tables = {
        "Figure 1: best bigram subnetwork r vs full model r": ("table_fig1", table_fig1(sweep_rows)),
        "Figure 1 (paper): Pythia and GPT-2": ("table_fig1_paper", PAPER_FIG1),
        "Table 1: chosen bigram subnetwork": ("table1_chosen", table1_chosen(sweep_rows)),
        "Table 2: bigram r of the full model, the subnetwork and baselines":
            ("table2_bigram_r", table2_bigram_r(results["bigram r table"])),
        "Table 3: overlap of the bigram and optimal subnetworks": ("table3_overlap", table3_overlap(results["overlap"])),
        "Table 4: sample generations": ("table4_generations", table4_generations(results["generations"])),
        "Headline over seeds: the chosen lambda searched with each seed (mean ± sd last)":
            ("table_headline_seeds", table_headline(results["headline over seeds"])),
        "Ablation: held-out LM loss (nats) with subnetworks kept or removed":
            ("table_ablation", results["ablation"][["condition", "lm_loss_nats", "lm_loss_nats_std",
                                                   "loss_increase", "r_dropped", "active_params"]]),
    }
    # The inputs of every figure, so a notebook (or anyone) can redraw them without the cache.
    inputs = {
        "bigram_sweep": sweep_rows, "optimal_sweep": results["optimal sweep"], "checkpoint_r": ckpt,
        "checkpoint_layer_share": share, "lens": results["linear lens"], "ablation": results["ablation"],
        "overlap": results["overlap"], "generations": results["generations"],
        "bigram_r_rows": results["bigram r table"], "headline_seeds": results["headline over seeds"],
        "layer_distribution": distribution,
        **{f"similarity_{name}": matrix for name, matrix in results["similarity"].items()},
    }
    data_dir = ensure_output_dir(out / "data")
    for name, table in inputs.items():
        path = data_dir / f"{name}.csv"
        atomic_write_bytes(path, table.to_csv(index=name.startswith("similarity_")).encode("utf-8"))
        written.append(path)
    markdown = [f"# Tables for model {model!r}\n"]
    for title, (name, table) in tables.items():
        csv_path = out / f"{name}.csv"
        atomic_write_bytes(csv_path, table.to_csv(index=False).encode("utf-8"))
        written.append(csv_path)
        markdown.append(f"## {title}\n\n{to_markdown(table)}\n")
    md_path = out / "tables.md"
    atomic_write_bytes(md_path, "\n".join(markdown).encode("utf-8"))
    written.append(md_path)
    return written
