"""Result tables: the paper's tables from result DataFrames, the lambda-choice rule, and the
one Markdown writer. Pure pandas (no model, no plotting), so every layer can use them.

========  ===========================  ==========================================================
Paper     Function                     Input columns (``[optional]``)
========  ===========================  ==========================================================
Fig 1     ``table_fig1``               sweep: model, lambda, active_params, r, [full_model_r];
                                       reference numbers of the paper in ``PAPER_FIG1``
Fig 2     ``interpolate_r``            sweep: active_params, r
Table 1   ``table1_chosen``            sweep: model, lambda, active_params, r, [mask_size]
Table 2   ``table2_bigram_r``          rows: condition, r, [model]
Table 3   ``table3_overlap``           rows: pair, fraction_overlap, expected, ratio, p_value,
                                       frac_a_in_b, [expected_frac_a_in_b], [p_value_text],
                                       [n_random] (``circuits.overlap.overlap_table`` output)
Table 4   ``table4_generations``       generations: condition, text (or generation), [prompt]
========  ===========================  ==========================================================

A missing column raises :class:`~bigram_circuits.errors.FigureDataError` naming it.
``active_params`` is in the paper's unit: non-embedding weights gated by kept mask entries.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bigram_circuits.errors import FigureDataError
from bigram_circuits.io import atomic_write_bytes

__all__ = [
    "HEADLINE_COLUMNS",
    "PAPER_FIG1",
    "TABLE2_CONDITIONS",
    "TABLE2_SHORT",
    "from_search_sweep",
    "interpolate_r",
    "sparsest_within",
    "table1_chosen",
    "table2_bigram_r",
    "table3_overlap",
    "table4_generations",
    "table_controls",
    "table_controls_partial",
    "table_fig1",
    "table_headline",
    "to_markdown",
    "write_tables",
]


def sparsest_within(table: pd.DataFrame, metric: str, size: str, tolerance: float = 0.04) -> pd.Series | None:
    """The paper's choice of lambda: the sparsest row (fewest ``size``; ties to the larger lambda)
    whose ``metric`` is within ``tolerance`` of the lambda = 0 row's (of the best row's when there
    is no lambda 0). ``None`` when no row has a ``metric``."""
    valid = table[table[metric].notna()]
    if valid.empty:
        return None
    zero = valid[valid["lambda"] == 0]
    reference = float(zero[metric].iloc[0]) if not zero.empty else float(valid[metric].max())
    close = valid[valid[metric] >= reference - tolerance]
    return close.sort_values([size, "lambda"], ascending=[True, False]).iloc[0]


# Best bigram-subnetwork r and full-model bigram r, read off the paper's Figure 1 table.
PAPER_FIG1 = pd.DataFrame(
    {
        "model": [
            "Pythia 70M",
            "Pythia 160M",
            "Pythia 410M",
            "Pythia 1B",
            "GPT-2 small",
            "GPT-2 medium",
            "GPT-2 large",
        ],
        "best_subnetwork_r": [0.961, 0.964, 0.983, 0.987, 0.979, 0.985, 0.986],
        "full_model_r": [0.737, 0.69, 0.65, 0.632, 0.624, 0.582, 0.583],
    }
)


def require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
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


def ordered(values: Iterable, preferred: Sequence[str]) -> list:
    """Unique values in first-seen order, with the ``preferred`` ones first in that order."""
    seen = list(dict.fromkeys(values))
    lower = {str(v).lower(): v for v in seen}
    front = [lower[p] for p in preferred if p in lower]
    return front + [v for v in seen if v not in front]


def full_model_r_by_model(sweep: pd.DataFrame, full_model_r: Mapping[str, float] | None) -> dict:
    if full_model_r is not None:
        return {str(k): float(v) for k, v in full_model_r.items()}
    if "full_model_r" in sweep.columns:
        return {
            str(m): float(g["full_model_r"].dropna().iloc[0])
            for m, g in sweep.groupby("model", sort=False)
            if g["full_model_r"].notna().any()
        }
    return {}


def table_fig1(sweep: pd.DataFrame, full_model_r: Mapping[str, float] | None = None) -> pd.DataFrame:
    """The table beside Figure 1: best bigram-subnetwork r vs the full model's r, per model.

    Columns: model, best_subnetwork_r, full_model_r (as in :data:`PAPER_FIG1`), plus the
    lambda and active_params of the best subnetwork.
    """
    require_columns(sweep, ["model", "lambda", "active_params", "r"], "table_fig1 sweep")
    reference = full_model_r_by_model(sweep, full_model_r)
    rows = []
    for model, group in sweep.groupby("model", sort=False):
        best = group.loc[group["r"].idxmax()]
        rows.append(
            {
                "model": model,
                "best_subnetwork_r": round(float(best["r"]), 3),
                "full_model_r": round(reference[str(model)], 3) if str(model) in reference else float("nan"),
                "lambda": best["lambda"],
                "active_params": int(best["active_params"]),
            }
        )
    return pd.DataFrame(rows)


def interpolate_r(sweep: pd.DataFrame, target_params: Sequence[float]) -> pd.DataFrame:
    """Estimate r at given active-parameter counts by interpolating a sweep in log parameters.

    ``sweep`` (one model or checkpoint) has ``active_params`` and ``r``. As in the paper's
    Figure 2, r at a size is read off the piecewise-linear curve of r against log10 of active
    parameters; targets outside the swept range are clamped to the nearest end (and flagged in
    the ``extrapolated`` column); with no non-empty subnetwork the estimates are NaN. Returns
    columns target_params, r_estimated, extrapolated.
    """
    require_columns(sweep, ["active_params", "r"], "interpolate_r sweep")
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


def table1_chosen(sweep: pd.DataFrame, tolerance: float = 0.04) -> pd.DataFrame:
    """Table 1: the chosen bigram subnetwork of each model.

    The chosen subnetwork is the sparsest (fewest active_params) whose r is within
    ``tolerance`` of the lambda = 0 run's r (of the best run's when the sweep has no lambda 0),
    the rule of :func:`sparsest_within`, which ``search.choose_subnetwork`` also uses. ``sweep``
    columns: model, lambda, active_params,
    r, and optionally mask_size (|M|, the model's maskable non-embedding weights, as in the
    paper's "7.24M of 84.9M"). Returns: model, lambda, active_params, [mask_size,
    active_percent], r.
    """
    require_columns(sweep, ["model", "lambda", "active_params", "r"], "table1_chosen sweep")
    rows = []
    for model, group in sweep.groupby("model", sort=False):
        group = group.dropna(subset=["r"])
        if group.empty:
            continue
        chosen = sparsest_within(group, "r", "active_params", tolerance)
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
    require_columns(table, ["lambda", "n_params", "bigram_r"], "from_search_sweep table")
    rows = pd.DataFrame(
        {
            "model": str(model),
            "lambda": table["lambda"].astype(float).to_numpy(),
            "active_params": table["n_params"].astype(float).to_numpy(),
            "r": table["bigram_r"].astype(float).to_numpy(),
        }
    )
    if mask_size is not None:
        rows["mask_size"] = int(mask_size)
    return rows


# Table 2's rows, in the paper's order: the one vocabulary of its condition names (the paper
# pipeline, the real-model study and the findings use these keys and labels).
TABLE2_CONDITIONS: dict[str, str] = {
    "full_model": "full model",
    "subnetwork": "bigram subnetwork",
    "random_init": "subnetwork at random init",
    "random_init_trained_embeddings": "random init + trained embeddings",
    "empty": "empty subnetwork + embeddings",
    "linear_map": "embeddings + linear map",
}
# Short names for one-line summaries (the README's findings table).
TABLE2_SHORT: dict[str, str] = {
    "full_model": "full",
    "subnetwork": "subnetwork",
    "random_init": "random init",
    "random_init_trained_embeddings": "init + trained emb",
    "empty": "empty + emb",
    "linear_map": "emb + linear map",
}
_TABLE2_ORDER = list(TABLE2_CONDITIONS.values())


def table2_bigram_r(rows: pd.DataFrame) -> pd.DataFrame:
    """Table 2: bigram r of the full model, the bigram subnetwork and the baselines.

    ``rows``: condition, r, optional model. Conditions are ordered as in the paper where their
    names match (full model, bigram subnetwork, subnetwork at random init, random init +
    trained embeddings, empty subnetwork + embeddings, embeddings + linear map), others after.
    Without a model column: columns condition, r. With one: one row per condition, one column
    per model.
    """
    require_columns(rows, ["condition", "r"], "table2_bigram_r rows")
    order = ordered(rows["condition"], _TABLE2_ORDER)
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
    require_columns(
        rows, ["pair", "fraction_overlap", "expected", "ratio", "p_value", "frac_a_in_b"], "table3_overlap rows"
    )
    table = pd.DataFrame(
        {
            "pair": rows["pair"].astype(str),
            "overlap": rows["fraction_overlap"].astype(float).round(4),
            "expected": rows["expected"].astype(float).round(4),
            "ratio": rows["ratio"].astype(float).round(2),
        }
    )
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


_TABLE4_ORDER = [
    "full model",
    "full",
    "bigram subnetwork",
    "bigram only",
    "bigram",
    "bigram ablated",
    "random ablated",
    "optimal ablated",
]


def table4_generations(generations: pd.DataFrame) -> pd.DataFrame:
    """Table 4: sample generations of the full model, the bigram subnetwork and ablations.

    ``generations``: condition, text (or generation, as ``evaluate.generate_table`` names
    it), optional prompt. Rows are ordered by prompt (first seen) then condition (full model,
    bigram subnetwork, bigram ablated, random ablated, others); whitespace runs (newlines) are
    shown as single spaces so the table stays one line a row.
    """
    if (
        isinstance(generations, pd.DataFrame)
        and "text" not in generations.columns
        and "generation" in generations.columns
    ):
        generations = generations.rename(columns={"generation": "text"})
    require_columns(generations, ["condition", "text"], "table4_generations generations")
    table = generations.copy()
    order = ordered(table["condition"], _TABLE4_ORDER)
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


HEADLINE_COLUMNS = (
    "active_params",
    "active_percent",
    "r",
    "mlp0_share",
    "ablated_loss_increase",
    "random_ablated_loss_increase",
    "ablation_ratio",
    "random_only_loss",
    "overlap_ratio",
    "overlap_frac_in_optimal",
)


def table_headline(rows: pd.DataFrame) -> pd.DataFrame:
    """Headline numbers per seed (``FiguresConfig.headline_seeds``) and a last row of
    ``mean ± sd`` (sample std) for each of :data:`HEADLINE_COLUMNS` present in ``rows``."""
    require_columns(rows, ["seed", "active_params", "r"], "table_headline rows")
    columns = [c for c in HEADLINE_COLUMNS if c in rows.columns]
    shown = rows[["seed", *[c for c in ("lambda", "steps") if c in rows.columns], *columns]].copy().astype(object)

    def number(value: float, column: str) -> str:
        return f"{value:,.0f}" if column == "active_params" else f"{value:.4g}"

    summary: dict[str, object] = {"seed": "mean ± sd"}
    for column in columns:
        values = rows[column].astype(float)
        shown[column] = [number(v, column) for v in values]
        spread = values.std(ddof=1) if len(values) > 1 else float("nan")
        summary[column] = f"{number(values.mean(), column)} ± " + (
            number(spread, column) if column == "active_params" else f"{spread:.2g}"
        )
    return pd.concat([shown, pd.DataFrame([summary])], ignore_index=True)


def _mean_sd(values: pd.Series, digits: int = 3) -> str:
    values = values.astype(float)
    spread = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():.{digits}f}" + ("" if math.isnan(spread) else f" ± {spread:.{digits}f}")


def _p_text(p: float, n_random: int) -> str:
    """A sampled p-value: ``p < 1/n`` when no null sample reached the actual value."""
    return f"p < {1 / n_random:.0e}" if p == 0 else f"p = {p:.2g}"


def table_controls_partial(partial: pd.DataFrame) -> pd.DataFrame:
    """Partial ablation curves as a table: per granularity, ablation (zero / mean) and fraction
    removed, the held-out loss increase and bigram r with that fraction of the bigram subnetwork
    and of random same-shape subnetworks removed (``mean ± sd`` over draws)."""
    require_columns(
        partial, ["condition", "ablation", "fraction", "seed", "loss_increase", "r_dropped"], "partial ablation"
    )
    data = partial.assign(granularity=partial.get("granularity", ""))
    rows = []
    for (granularity, ablation, fraction), group in data.groupby(["granularity", "ablation", "fraction"], sort=True):
        if fraction == 0:
            continue
        row = {"granularity": granularity, "ablation": ablation, "% removed": f"{100 * fraction:g}"}
        for condition in ("bigram", "random"):
            part = group[group["condition"] == condition]
            row[f"{condition}: loss increase (nats)"] = _mean_sd(part["loss_increase"])
            row[f"{condition}: r"] = _mean_sd(part["r_dropped"])
        rows.append(row)
    return pd.DataFrame(rows)


def table_controls(
    sweeps: pd.DataFrame,
    partial: pd.DataFrame,
    seed_overlap: pd.DataFrame,
    seeds: pd.DataFrame,
    headline: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The faithfulness controls in one table (``control``, ``result`` text per row).

    ``sweeps``: lambda sweeps with ``control`` (``"real bigram target"`` first), active_params,
    active_percent and r (each against its own target); the real row picks the chosen subnetwork
    (column ``chosen``), else the best r. For each other control: r read off its curve at the
    real subnetwork's size (:func:`interpolate_r`; "clamped" when outside its swept sizes), the
    smallest swept size whose r reaches the real r, and its best r. ``partial``: rows of
    ``partial_ablation_table`` (100% and 50% removed, mean ± sd over draws). ``seed_overlap``:
    overlap rows with ``kind`` (e.g. "seed vs seed"). ``seeds``: the chosen lambda per seed
    (active_percent, r). ``headline`` (optional): the headline rows, whose ``overlap_ratio`` and
    ``overlap_p_value`` (each seed against the optimal subnetwork) go beside the seed overlap.
    """
    require_columns(sweeps, ["control", "active_params", "active_percent", "r"], "control sweeps")
    real = sweeps[sweeps["control"] == "real bigram target"]
    if real.empty:
        raise FigureDataError("control sweeps need the real bigram target's rows (control 'real bigram target')")
    pick = real[real["chosen"].astype(bool)] if "chosen" in real and real["chosen"].astype(bool).any() else None
    chosen = (pick if pick is not None else real.loc[[real["r"].idxmax()]]).iloc[0]
    size, r_real, percent = float(chosen["active_params"]), float(chosen["r"]), float(chosen["active_percent"])
    rows = [
        {
            "control": f"real bigram target (chosen lambda {chosen['lambda']:g}, {len(seeds)} seeds)",
            "result": f"{_mean_sd(seeds['active_percent'], 3)}% of the weights at r {_mean_sd(seeds['r'], 4)}"
            f" (seed 0: {size:,.0f} weights = {percent:.2f}%, r {r_real:.3f})",
        }
    ]
    for control, group in sweeps[sweeps["control"] != "real bigram target"].groupby("control", sort=False):
        at_size = interpolate_r(group, [size]).iloc[0]
        reached = group[group["r"] >= r_real]
        best = group.loc[group["r"].idxmax()]
        reach = (
            f"reaches r {r_real:.3f} at {reached['active_percent'].min():.2f}% of the weights"
            if len(reached)
            else f"never reaches r {r_real:.3f} (best r {best['r']:.3f} at {best['active_percent']:.2f}%)"
        )
        if len(group) == 1:  # one search (at the chosen lambda): its own size, no curve to read
            result = (
                f"r {best['r']:.3f} at {best['active_percent']:.2f}% of the weights (lambda {best['lambda']:g}, "
                f"one search); {reach.split(' (')[0]}"
            )
        else:
            clamped = " (clamped: outside its swept sizes)" if bool(at_size["extrapolated"]) else ""
            result = (
                f"r {at_size['r_estimated']:.3f} at the real subnetwork's size{clamped}; {reach}; "
                f"swept {group['active_percent'].min():.2f}-{group['active_percent'].max():.1f}% "
                f"(r {group['r'].min():.3f}-{group['r'].max():.3f})"
            )
        rows.append({"control": control, "result": result})
    data = partial.assign(granularity=partial.get("granularity", ""))
    for (granularity, ablation), group in data.groupby(["granularity", "ablation"], sort=True):
        for fraction in (0.5, 1.0):
            part = group[np.isclose(group["fraction"], fraction)]
            if part.empty:
                continue
            bigram, random = part[part["condition"] == "bigram"], part[part["condition"] == "random"]
            rows.append(
                {
                    "control": f"partial ablation, {granularity}, {ablation} ablation: {100 * fraction:g}% removed "
                    f"({part['seed'].nunique()} draws)",
                    "result": f"loss +{_mean_sd(bigram['loss_increase'])} nats (bigram) vs "
                    f"+{_mean_sd(random['loss_increase'])} (random same-shape); r {_mean_sd(bigram['r_dropped'])}"
                    f" vs {_mean_sd(random['r_dropped'])}",
                }
            )
    for kind, group in seed_overlap.groupby("kind", sort=False):
        n_null = int(group["n_random"].iloc[0])
        rows.append(
            {
                "control": f"overlap, {kind} ({len(group)} pairs)",
                "result": f"{_mean_sd(group['ratio'], 2)}x chance; {_mean_sd(group['frac_a_in_b'], 3)} of A in B "
                f"(chance {_mean_sd(group['expected_frac_a_in_b'], 4)}); "
                f"{_p_text(group['p_value'].max(), n_null)} ({n_null:,} null pairs)",
            }
        )
    if headline is not None and "overlap_ratio" in headline:
        rows.append(
            {
                "control": f"overlap, bigram vs optimal ({len(headline)} seeds, headline stage)",
                "result": f"{_mean_sd(headline['overlap_ratio'], 2)}x chance; "
                f"{_p_text(headline['overlap_p_value'].max(), 10_000)} (every seed)",
            }
        )
    return pd.DataFrame(rows)


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
            table[column] = (
                table[column].astype(str).str.replace("|", r"\|", regex=False).str.replace("\n", " ", regex=False)
            )
        elif pd.api.types.is_integer_dtype(table[column]) or _is_whole(table[column]):
            table[column] = table[column].map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
        elif pd.api.types.is_float_dtype(table[column]) and table[column].isna().any():
            # tabulate leaves None cells blank (missingval) but prints NaN as "nan".
            table[column] = table[column].astype(object).where(table[column].notna(), None)
    try:
        return table.to_markdown(index=index, floatfmt=floatfmt, missingval="")
    except ImportError as exc:
        raise FigureDataError("to_markdown needs the 'tabulate' package: pip install tabulate") from exc


def write_tables(
    tables: Mapping[str, pd.DataFrame],
    out_dir: str | os.PathLike,
    floatfmt: str = ".4g",
    *,
    markdown: bool | str = True,
    titles: Mapping[str, str] | None = None,
    header: str = "",
    index: bool = False,
) -> list[Path]:
    """Write each table as ``NAME.csv`` in ``out_dir`` (atomically; ``index``: with its index as
    the first column) and as Markdown; return the paths.

    ``markdown=True`` writes ``NAME.md`` per table, the table's ``attrs`` listed under it; a file
    name writes that one file: ``header``, then every table in order under its title (``titles``,
    else its name), without attrs; ``False`` writes no Markdown."""
    out = Path(out_dir)
    written: list[Path] = []
    sections = []
    for name, table in tables.items():
        csv_path = out / f"{name}.csv"
        buffer = io.StringIO()
        table.to_csv(buffer, index=index)
        atomic_write_bytes(csv_path, buffer.getvalue().encode("utf-8"))
        written.append(csv_path)
        if markdown is False:
            continue
        section = f"## {(titles or {}).get(name, name)}\n\n{to_markdown(table, floatfmt=floatfmt)}\n"
        if markdown is True:
            md_path = out / f"{name}.md"
            summary = "".join(f"- {key}: {value}\n" for key, value in table.attrs.items())
            atomic_write_bytes(md_path, (section + (f"\n{summary}" if summary else "")).encode("utf-8"))
            written.append(md_path)
        sections.append(section)
    if isinstance(markdown, str):
        md_path = out / markdown
        atomic_write_bytes(md_path, "\n".join([header, *sections]).encode("utf-8"))
        written.append(md_path)
    return written
