"""Build circuits up from a base subnetwork: base, base + candidate, base + random heads, full.

The paper's stated purpose for bigram subnetworks is "a foundation for studying language model
circuits by building up from a minimal circuit". This module measures that for a behaviour
(a *task* with a metric):

==========================  ===============================================================
condition                   run
==========================  ===============================================================
``base``                    the base subnetwork alone (e.g. the bigram subnetwork)
``base + candidate``        the base with the candidate's heads/neurons switched on as well
                            (:func:`~bigram_circuits.circuits.ablation.add_candidate`: a
                            weight-mask base gets the head's W_Q/W_K/W_V rows and W_O columns)
``base + random heads``     the base plus as many random heads per layer (one row per seed)
``full``                    the full model
``full - candidate``        the full model with the candidate's heads zeroed (``hook_z``)
``full - random heads``     the full model without as many random heads (one row per seed)
==========================  ===============================================================

**Recovered fraction** of a run with metric value ``m``:
``recovered = (m - m_base) / (m_full - m_base)``: 0 = the base alone, 1 = the full model. For
a loss (lower is better) this is ``(loss_base - loss) / (loss_base - loss_full)``, the share of
the full model's loss reduction over the base that the run achieves; for a logit difference
(higher is better) it is the share of the full model's gain. ``full - candidate`` rows report
how much of that improvement is left without the candidate.

The tasks (:class:`~bigram_circuits.circuits.tasks.RepetitionTask`,
:class:`~bigram_circuits.circuits.tasks.NameCopyingTask`) are in
:mod:`~bigram_circuits.circuits.tasks`, the comparison of a base with the candidate circuits
(:func:`~bigram_circuits.circuits.overlap.circuit_overlap`,
:func:`~bigram_circuits.circuits.overlap.circuit_placement`) in
:mod:`~bigram_circuits.circuits.overlap`, and the whole experiment (candidates from three
methods, every base and task, overlap and placement:
:func:`~bigram_circuits.app.buildup.build_up_experiment`) in :mod:`bigram_circuits.app.buildup`.

Everything returns DataFrames; nothing is plotted or written except by
:func:`~bigram_circuits.app.buildup.save_build_up`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.circuits.ablation import Candidate, add_candidate
from bigram_circuits.circuits.runs import RunSpec
from bigram_circuits.circuits.tasks import MeasuredTask
from bigram_circuits.errors import ConfigError, MaskError

__all__ = [
    "CONDITIONS",
    "build_up",
    "build_up_report",
    "recovered_fraction",
    "summarize_build_up",
]

CONDITIONS = (
    "base",
    "base + candidate",
    "base + random heads",
    "full",
    "full - candidate",
    "full - random heads",
)


def recovered_fraction(value: float, base: float, full: float) -> float:
    """``(value - base) / (full - base)``: 0 at the base, 1 at the full model (NaN if equal)."""
    gap = full - base
    if gap == 0 or not math.isfinite(gap):
        return float("nan")
    return (value - base) / gap


# --------------------------------------------------------------------------- build-up


def _measure(bridge: TransformerBridge, run: RunSpec, task: MeasuredTask) -> dict[str, float]:
    with run.context(bridge):
        return {key: float(value) for key, value in task(bridge).items()}


def build_up(
    bridge: TransformerBridge,
    base: Any,
    candidates: Mapping[str, Candidate] | Sequence[Candidate],
    task: MeasuredTask,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    base_label: str = "bigram",
    necessity: bool = True,
    full: Mapping[str, float] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Measure ``task`` on base, base + each candidate, base + random heads (one row per seed),
    the full model and (with ``necessity``) the full model minus each candidate / random heads.

    ``task`` is a :class:`~bigram_circuits.circuits.tasks.MeasuredTask`: ``task(bridge) ->
    {metric: value, ...}`` under the active run, its main metric named in ``task.metric_name``.
    ``full`` reuses an already measured full-model result (e.g. for a second base). Columns:
    task, metric, base, condition (see :data:`CONDITIONS`), candidate, seed, heads, neurons,
    added_weights (mask entries switched on in the base), value, recovered, then every value
    the task returns. ``attrs``: base_value, full_value.
    """
    if isinstance(candidates, Mapping):
        named = dict(candidates)
    else:
        named = {c.name: c for c in candidates}
    if not named:
        raise MaskError("build_up needs at least one candidate")
    if not isinstance(task, MeasuredTask):
        raise ConfigError("the task must be callable with a name and its main metric's name (task.metric_name)")
    metric, task_name = task.metric_name, task.name
    jobs: list[tuple[str, str, int | None, Candidate | None, RunSpec | None, str]] = []
    for name, candidate in named.items():
        jobs.append(("base + candidate", name, None, candidate, None, "add"))
        for seed in seeds:
            control = candidate.random_control(bridge, seed=int(seed), exclude=dict(base.masks))
            jobs.append(("base + random heads", name, int(seed), control, None, "add"))
    if necessity:
        for name, candidate in named.items():
            jobs.append(("full - candidate", name, None, candidate, RunSpec(candidate, "ablate"), "run"))
            for seed in seeds:
                control = candidate.random_control(bridge, seed=int(seed))
                jobs.append(("full - random heads", name, int(seed), control, RunSpec(control, "ablate"), "run"))

    rows: list[dict[str, Any]] = []

    def record(condition, name, seed, candidate, added, values):
        rows.append(
            {
                "task": task_name,
                "metric": metric,
                "base": base_label,
                "condition": condition,
                "candidate": name,
                "seed": seed,
                "heads": 0 if candidate is None else candidate.n_heads,
                "neurons": 0 if candidate is None else candidate.n_neurons,
                "added_weights": added,
                **values,
            }
        )

    bar = tqdm(total=len(jobs) + 2, desc=f"build-up {task_name} ({base_label})", disable=not progress, leave=False)
    record("base", None, None, None, None, _measure(bridge, RunSpec(base, "keep"), task))
    bar.update()
    full_values = dict(full) if full is not None else _measure(bridge, RunSpec(None), task)
    record("full", None, None, None, None, full_values)
    bar.update()
    for condition, name, seed, candidate, run, how in jobs:
        added = None
        if how == "add":
            combined = add_candidate(base, candidate, bridge)
            added = int(sum(combined.metadata["added_entries"].values()))
            run = RunSpec(combined, "keep")
        record(condition, name, seed, candidate, added, _measure(bridge, run, task))
        bar.update()
    bar.close()
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc(metric), "value", table[metric])
    base_value = float(table.loc[table["condition"] == "base", "value"].iloc[0])
    full_value = float(full_values[metric])
    table.insert(
        table.columns.get_loc("value") + 1,
        "recovered",
        [recovered_fraction(v, base_value, full_value) for v in table["value"]],
    )
    table["seed"] = table["seed"].astype("Int64")
    table["added_weights"] = table["added_weights"].astype("Int64")
    order = {c: i for i, c in enumerate(CONDITIONS)}
    table = table.sort_values("condition", key=lambda s: s.map(order), kind="stable", ignore_index=True)
    table.attrs.update(base_value=base_value, full_value=full_value, metric=metric)
    return table


def summarize_build_up(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, base, condition, candidate): mean and std over random seeds.

    Columns: task, metric, base, condition, candidate, heads, value, value_std, recovered,
    recovered_std, n_seeds (std is NaN for single rows).
    """
    keys = ["task", "metric", "base", "condition", "candidate"]
    missing = [c for c in keys + ["value", "recovered", "heads"] if c not in table.columns]
    if missing:
        raise ConfigError(f"the build-up table lacks column(s) {missing}; pass build_up's output")
    frame = table.assign(candidate=table["candidate"].fillna(""))
    grouped = frame.groupby(keys, sort=False, dropna=False)
    summary = grouped.agg(
        heads=("heads", "first"),
        value=("value", "mean"),
        value_std=("value", "std"),
        recovered=("recovered", "mean"),
        recovered_std=("recovered", "std"),
        n_seeds=("value", "size"),
    ).reset_index()
    summary["candidate"] = summary["candidate"].replace("", None)
    return summary


def build_up_report(summary: pd.DataFrame) -> pd.DataFrame:
    """A wide table, one row per (task, base, candidate): the base and full values and their
    ``gap`` (the denominator of every recovered fraction: when it is small against the spread of
    the random controls, the fractions mean little), the value and recovered fraction with the
    candidate, with random heads (mean and std over seeds), and of the full model without the
    candidate / without random heads."""
    rows = []
    for (task, base), part in summary.groupby(["task", "base"], sort=False):
        base_value = float(part.loc[part["condition"] == "base", "value"].iloc[0])
        full_value = float(part.loc[part["condition"] == "full", "value"].iloc[0])
        for name in part["candidate"].dropna().unique():
            mine = part[part["candidate"] == name].set_index("condition")

            def get(condition: str, column: str, mine: pd.DataFrame = mine) -> float:
                return float(mine.loc[condition, column]) if condition in mine.index else float("nan")

            rows.append(
                {
                    "task": task,
                    "metric": part["metric"].iloc[0],
                    "base": base,
                    "candidate": name,
                    "heads": int(mine["heads"].iloc[0]),
                    "base_value": base_value,
                    "full_value": full_value,
                    "gap": full_value - base_value,
                    "with_candidate": get("base + candidate", "value"),
                    "recovered": get("base + candidate", "recovered"),
                    "random_heads": get("base + random heads", "value"),
                    "random_recovered": get("base + random heads", "recovered"),
                    "random_recovered_std": get("base + random heads", "recovered_std"),
                    "full_minus_candidate": get("full - candidate", "value"),
                    "full_minus_recovered": get("full - candidate", "recovered"),
                    "full_minus_random_recovered": get("full - random heads", "recovered"),
                    "full_minus_random_recovered_std": get("full - random heads", "recovered_std"),
                }
            )
    return pd.DataFrame(rows)
