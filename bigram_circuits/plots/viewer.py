"""The subnetwork viewer: the viewer's DataFrames in, one plotly figure out, and an offline HTML page.

:func:`view` draws the tables of :func:`bigram_circuits.viewdata.view_tables`:

1. kept fraction per layer x matrix (one heatmap per subnetwork);
2. a drill-down of one matrix, chosen in a drop-down: kept fraction of each output row and each
   input column;
3. for neuron / head masks, which units are kept (per layer);
4. for two subnetworks, their overlap per block against the exact random null (observed / expected,
   p-value on hover);
5. the metrics table.

:func:`view_html` writes it as one self-contained page (plotly.js inline, no script from the network).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bigram_circuits.errors import FigureDataError
from bigram_circuits.io import atomic_write_bytes

__all__ = ["view", "view_html"]

_ORDER = ("q", "k", "v", "o", "in", "gate", "out")
_NEEDED = {
    "matrices": ("subnetwork", "layer", "matrix", "fraction_kept", "kept_params", "total_params"),
    "rows": ("subnetwork", "layer", "matrix", "row", "fraction_kept"),
    "columns": ("subnetwork", "layer", "matrix", "column", "fraction_kept"),
    "units": ("subnetwork", "layer", "kind", "unit", "kept"),
    "metrics": ("subnetwork", "metric", "value"),
}
_COLORS = ("#1f77b4", "#d62728")


def _check(tables: Mapping[str, pd.DataFrame]) -> None:
    for name, columns in _NEEDED.items():
        if name not in tables:
            raise FigureDataError(f"viewer tables lack {name!r}; build them with bigram_circuits.viewdata.view_tables")
        missing = [c for c in columns if c not in tables[name].columns]
        if missing and not tables[name].empty:
            raise FigureDataError(f"viewer table {name!r} lacks columns {missing}")
    if tables["matrices"].empty:
        raise FigureDataError("viewer table 'matrices' is empty; the subnetwork has no masks to draw")


def _fmt(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        if np.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.6g}" if np.isfinite(value) else str(value)
    return str(value)


def view(tables: Mapping[str, pd.DataFrame], title: str | None = None) -> go.Figure:
    """One interactive figure of one or two subnetworks from :func:`~bigram_circuits.viewdata.view_tables`'s
    DataFrames (heatmaps, matrix drill-down, units, overlap against chance, metrics)."""
    _check(tables)
    matrices = tables["matrices"]
    names = list(pd.unique(matrices["subnetwork"]))
    kinds = [k for k in _ORDER if k in set(matrices["matrix"])]
    layers = sorted(int(x) for x in pd.unique(matrices["layer"]))
    units = tables["units"]
    unit_kinds = [k for k in ("neuron", "head") if not units.empty and k in set(units["kind"])]
    has_overlap = "overlap" in tables and not tables["overlap"].empty

    # Rows of the grid: heatmaps, drill-down, units (optional), overlap (optional), metrics.
    panels: list[tuple[str, list, float]] = [
        ("heat", [{"type": "heatmap"}] * 2 if len(names) == 2 else [{"type": "heatmap", "colspan": 2}, None], 1.0),
        ("drill", [{"type": "xy"}, {"type": "xy"}], 0.9),
    ]
    if unit_kinds:
        specs = [{"type": "heatmap"}] * 2 if len(unit_kinds) == 2 else [{"type": "heatmap", "colspan": 2}, None]
        panels.append(("units", specs, 0.8))
    if has_overlap:
        panels.append(("overlap", [{"type": "xy", "colspan": 2}, None], 0.9))
    n_metric_rows = tables["metrics"]["metric"].nunique() + (5 if has_overlap else 0)
    panels.append(("metrics", [{"type": "table", "colspan": 2}, None], 0.3 + 0.075 * n_metric_rows))
    titles: list[str] = []
    for key, _, _ in panels:  # one title per subplot (a spanned cell has none)
        if key == "heat":
            titles += [f"{n}: kept fraction per layer x matrix" for n in names]
        elif key == "drill":
            key_text = "" if len(names) == 1 else f" ({names[0]} blue, {names[1]} red)"
            titles += [f"kept fraction of each output row{key_text}", f"kept fraction of each input column{key_text}"]
        elif key == "units":
            titles += [f"kept {k}s (per layer)" for k in unit_kinds]
        elif key == "overlap":
            titles += ["overlap per block: observed / expected under the random null (1 = chance)"]
        else:
            titles += ["metrics (measured on the binary masks)"]
    heights = [h for _, _, h in panels]
    fig = make_subplots(
        rows=len(panels),
        cols=2,
        specs=[s for _, s, _ in panels],
        subplot_titles=titles,
        row_heights=[h / sum(heights) for h in heights],
        vertical_spacing=0.32 / len(panels),
        horizontal_spacing=0.08,
    )
    row_of = {key: i + 1 for i, (key, _, _) in enumerate(panels)}

    # 1. heatmaps
    for i, name in enumerate(names):
        part = matrices[matrices["subnetwork"] == name]
        grid = part.pivot_table(index="layer", columns="matrix", values="fraction_kept").reindex(
            index=layers, columns=kinds
        )
        kept = part.pivot_table(index="layer", columns="matrix", values="kept_params").reindex(
            index=layers, columns=kinds
        )
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=kinds,
                y=[f"L{layer}" for layer in layers],
                customdata=kept.to_numpy(),
                zmin=0,
                zmax=max(float(matrices["fraction_kept"].max()), 1e-9),
                colorscale="Viridis",
                colorbar={"title": "kept", "len": 0.25, "y": 0.9, "x": 1.02 if i == len(names) - 1 else 0.46},
                showscale=i == len(names) - 1,
                hovertemplate=f"{name} %{{y}} %{{x}}: %{{z:.3%}} kept (%{{customdata:,}} weights)<extra></extra>",
                name=name,
            ),
            row=row_of["heat"],
            col=i + 1,
        )

    # 2. drill-down: traces per matrix, one visible at a time (drop-down below)
    options = [(layer, kind) for layer in layers for kind in kinds]
    present = set(zip(matrices["layer"].astype(int), matrices["matrix"]))
    options = [o for o in options if o in present]
    drill_traces: list[tuple[int, str]] = []
    for layer, kind in options:
        for axis, col in (("row", 1), ("column", 2)):
            table = tables["rows" if axis == "row" else "columns"]
            for i, name in enumerate(names):
                part = table[(table["subnetwork"] == name) & (table["layer"] == layer) & (table["matrix"] == kind)]
                fig.add_trace(
                    go.Scattergl(
                        x=part[axis].to_numpy(),
                        y=part["fraction_kept"].to_numpy(),
                        mode="lines",
                        line={"color": _COLORS[i % 2], "width": 1},
                        name=f"{name} L{layer} {kind} {axis}s",
                        legendgroup=name,
                        showlegend=False,
                        visible=(layer, kind) == options[0],
                        hovertemplate=f"{name} L{layer} {kind} {axis} %{{x}}: %{{y:.2%}} kept<extra></extra>",
                    ),
                    row=row_of["drill"],
                    col=col,
                )
                drill_traces.append((len(fig.data) - 1, f"L{layer} {kind}"))
    fig.update_yaxes(range=[0, 1.02], row=row_of["drill"], col=1)
    fig.update_yaxes(range=[0, 1.02], row=row_of["drill"], col=2)
    fig.update_xaxes(title_text="output unit (row of the [out, in] matrix)", row=row_of["drill"], col=1)
    fig.update_xaxes(title_text="input unit (column)", row=row_of["drill"], col=2)

    # 3. units of neuron / head masks: 1 = kept by the first, 2 = by the second, 3 = both
    if unit_kinds:
        for i, kind in enumerate(unit_kinds):
            part = units[units["kind"] == kind]
            code = np.zeros((len(layers), int(part["unit"].max()) + 1))
            for j, name in enumerate(names):
                kept = part[(part["subnetwork"] == name) & part["kept"].astype(bool)]
                for layer, unit in zip(kept["layer"], kept["unit"]):
                    code[layers.index(int(layer)), int(unit)] += 2**j
            scale = [[0, "#f0f0f0"], [0.33, _COLORS[0]], [0.67, _COLORS[1]], [1, "#2ca02c"]]
            fig.add_trace(
                go.Heatmap(
                    z=code,
                    y=[f"L{layer}" for layer in layers],
                    zmin=0,
                    zmax=3 if len(names) == 2 else 1,
                    colorscale=scale if len(names) == 2 else [[0, "#f0f0f0"], [1, _COLORS[0]]],
                    showscale=False,
                    hovertemplate=f"%{{y}} {kind} %{{x}}: "
                    + ("0 none, 1 A, 2 B, 3 both = %{z}" if len(names) == 2 else "kept = %{z}")
                    + "<extra></extra>",
                ),
                row=row_of["units"],
                col=i + 1,
            )

    # 4. overlap per block against the exact null
    if has_overlap:
        table = tables["overlap"]
        labels = [f"L{layer} {matrix}" for layer, matrix in zip(table["layer"], table["matrix"])]
        significant = table["p_value"] < 0.01
        fig.add_trace(
            go.Bar(
                x=labels,
                y=table["ratio"],
                marker_color=np.where(significant, "#2ca02c", "#999999"),
                customdata=np.stack(
                    [table["kept_both"], table["expected"], table["p_value"], table["kept_a"], table["kept_b"]], axis=1
                ),
                hovertemplate="%{x}: %{customdata[0]:,} shared vs %{customdata[1]:,.1f} expected (ratio %{y:.2f}, "
                "p = %{customdata[2]:.3g}; kept %{customdata[3]:,} / %{customdata[4]:,})<extra></extra>",
                name="observed / expected",
                showlegend=False,
            ),
            row=row_of["overlap"],
            col=1,
        )
        fig.add_hline(y=1.0, line_dash="dot", line_color="black", row=row_of["overlap"], col=1)
        fig.update_yaxes(title_text="observed / expected", row=row_of["overlap"], col=1)

    # 5. metrics
    metrics = tables["metrics"]
    wide = metrics.pivot_table(index="metric", columns="subnetwork", values="value", aggfunc="first", sort=False)
    wide = wide.reindex(columns=names)
    cells = [list(wide.index)] + [[_fmt(v) for v in wide[name]] for name in names]
    header = ["metric", *names]
    if has_overlap:
        total = tables["overlap_total"].iloc[0]
        extra = {
            "overlap |A&B|/|M|": total.get("fraction_overlap"),
            "expected (null mean)": total.get("expected"),
            "overlap / expected": total.get("ratio"),
            "p-value": total.get("p_value_text", total.get("p_value")),
            "share of A in B": total.get("frac_a_in_b"),
        }
        cells[0] += list(extra)
        cells[1] += [_fmt(v) for v in extra.values()]
        for column in cells[2:]:
            column += [""] * len(extra)
    fig.add_trace(
        go.Table(
            header={"values": header, "fill_color": "#e8e8e8", "align": "left"},
            cells={"values": cells, "align": "left"},
        ),
        row=row_of["metrics"],
        col=1,
    )

    # The drop-down switches the drill-down traces; every other trace keeps its visibility.
    buttons = []
    for layer, kind in options:
        label = f"L{layer} {kind}"
        visible = [True] * len(fig.data)
        for index, owner in drill_traces:
            visible[index] = owner == label
        buttons.append({"label": label, "method": "restyle", "args": [{"visible": visible}]})
    drill_top = fig.get_subplot(row_of["drill"], 1).yaxis.domain[1]
    fig.update_layout(
        title={"text": title or "Subnetwork viewer: " + " vs ".join(names), "x": 0.01},
        height=int(380 * sum(heights)),
        width=1200,
        margin={"l": 60, "r": 60, "t": 80, "b": 40},
        updatemenus=[
            {
                "buttons": buttons,
                "direction": "down",
                "x": 0.0,
                "xanchor": "left",
                "y": drill_top + 0.035,
                "yanchor": "bottom",
                "showactive": True,
            }
        ],
        template="plotly_white",
    )
    return fig


def view_html(fig: go.Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as one self-contained HTML page (plotly.js inline: opens offline, no script
    from the network), atomically. Returns the path."""
    if not isinstance(fig, go.Figure):
        raise FigureDataError(f"view_html needs a plotly Figure, got {type(fig).__name__}")
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path.with_name(path.name + ".html")
    html = fig.to_html(include_plotlyjs=True, full_html=True, include_mathjax=False, config={"displaylogo": False})
    atomic_write_bytes(path, html.encode("utf-8"))
    return path
