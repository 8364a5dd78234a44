"""The schedule comparison on SmolLM2-135M at weight masks: one row per (schedule, lambda).

    bash scripts/schedule_comparison.sh            # the runs (resumable; two lanes, one thread each)
    bash scripts/schedule_comparison.sh c          # the 16 x 32 probe (slow, lambda 10 and 100)
    python benchmarks/schedule_comparison.py       # this table
    bash scripts/schedule_comparison.sh d          # the default model: fast vs slow, 3 seeds
    python benchmarks/schedule_comparison.py --model default

Reads the finished runs ``runs/schedules/{schedule}_lambda_{lam}/lambda_{lam}`` (their
``subnetwork.json`` metrics are measured on the saved binary mask, on the held-out windows) and
writes ``benchmarks/results/schedule_comparison.{json,md}`` with, per run: bigram r, weights
kept (% of the attention + MLP weights), steps, stop reason, stability, process CPU seconds,
the step at which the target loss first settled and the temperature at the end; beside them
the full model's r and the noise ceiling (``benchmarks/results/noise_ceiling.json``), the
sanity references every row is held against. Unfinished runs are listed from their checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.search import stability_check, steps_per_check_point
from bigram_circuits.tables import to_markdown

RUNS = REPO / "runs" / "schedules"
RESULTS = REPO / "benchmarks" / "results" / "schedule_comparison"
RUNS_DEFAULT = REPO / "runs" / "schedules_default"
RESULTS_DEFAULT = REPO / "benchmarks" / "results" / "schedule_default_model"


def _first_settled(history: pd.DataFrame) -> int | None:
    if "settled" not in history or not history["settled"].any():
        return None
    return int(history.loc[history["settled"].astype(bool), "step"].iloc[0])


def run_row(path: Path) -> dict:
    """One run folder (``.../lambda_<lam>``): its metrics when finished, else its checkpoint's step."""
    if (path / "subnetwork.json").is_file():
        meta = json.loads((path / "subnetwork.json").read_text())["metadata"]
        m, config = meta["metrics"], meta["config"]
        history = pd.read_csv(path / "history.csv")
        points = steps_per_check_point(int(config["batch_size"]), int(config["seq_len"]))
        stable, stability = stability_check(history["loss"].astype(float).tolist(), steps_per_point=points)
        return {
            "finished": True,
            "bigram_r": m.get("bigram_r"),
            "percent_kept": m["percent_params"],
            "n_params": m["n_params"],
            "steps": m["steps"],
            "stop_reason": m["stop_reason"],
            # Rechecked from the history at the paper's tokens per point (as the study and
            # `find` recheck a finished run): runs made before that check carry an older verdict.
            "stable": stable,
            "stability": stability,
            "cpu_time_s": m.get("cpu_time_s"),
            "settled_at_step": _first_settled(history),
            "final_temperature": float(history["temperature"].iloc[-1]),
            "final_soft_density": float(history["soft_density"].iloc[-1]),
            "init": config.get("init"),
            "temperature_rule": config.get("temperature_rule", "every_step"),
            "temperature_growth": config.get("temperature_growth"),
            "lr": config.get("lr"),
            "batch": f"{config.get('batch_size')} x {config.get('seq_len')}",
        }
    if (path / "checkpoint.pt").is_file():
        state = torch.load(path / "checkpoint.pt", weights_only=False, map_location="cpu")
        last = (state.get("history") or [{}])[-1]
        return {"finished": False, "steps": last.get("step"), "stop_reason": "running (checkpoint)"}
    return {}


def rows(runs: Path) -> list[dict]:
    out = []
    for run in sorted(p for p in runs.glob("*_lambda_*") if p.is_dir()):
        schedule, lam = run.name.rsplit("_lambda_", 1)
        found = run_row(run / f"lambda_{lam}")
        if found:  # a folder whose run has not written its first checkpoint yet is left out
            out.append({"schedule": schedule, "lambda": float(lam), **found})
    return out


def seed_rows(runs: Path) -> list[dict]:
    """``runs/<schedule>/seed_<n>/lambda_<lam>`` (``find --seeds``): one row per schedule and seed."""
    out = []
    for path in sorted(runs.glob("*/seed_*/lambda_*")):
        seed = int(path.parent.name.removeprefix("seed_"))
        lam = float(path.name.removeprefix("lambda_"))
        out.append({"schedule": path.parent.parent.name, "seed": seed, "lambda": lam, **run_row(path)})
    return out


def _mean_sd(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    return f"{values.mean():.4g} ± {values.std(ddof=1):.2g}" if len(values) > 1 else f"{values.mean():.4g}"


def _over_seeds(part: pd.DataFrame) -> dict:
    """Mean ± sd over the finished runs in ``part`` (one per seed)."""
    return {
        "seeds": len(part),
        "bigram_r": _mean_sd(part["bigram_r"]),
        "percent_kept": _mean_sd(part["percent_kept"]),
        "steps": _mean_sd(part["steps"]),
        "stop_reasons": ", ".join(sorted(set(part["stop_reason"]))),
        "all_stable": bool(part["stable"].all()),
        "cpu_time_s": _mean_sd(part["cpu_time_s"]),
    }


def _write_report(
    out: Path, result: dict, title: str, table: pd.DataFrame, before: list[str], after: list[str]
) -> None:
    """``out.json`` (``result``) and ``out.md``: the title, the command, ``before``, the per-run
    ``table`` (without its bookkeeping columns), ``after``; the Markdown is printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(result, indent=2).encode("utf-8"))
    shown = table.drop(columns=[c for c in ("n_params", "finished", "stability") if c in table], errors="ignore")
    lines = [f"# {title}", "", f"Command: `{result['command']}`", "", *before, to_markdown(shown, floatfmt=".4g"), ""]
    markdown = "\n".join([*lines, *after])
    atomic_write_bytes(out.with_suffix(".md"), markdown.encode("utf-8"))
    print(markdown)


def default_model(runs: Path, out: Path) -> pd.DataFrame:
    """The default model's fast vs slow over seeds (lane d), beside the figures pipeline's headline
    (``figures/table_headline_seeds.csv``: T x1.04, the same batch and lambda)."""
    table = pd.DataFrame(seed_rows(runs))
    finished = table[table.get("finished", False) == True]  # noqa: E712 (NaN for unfinished rows)
    summary = [
        {"schedule": schedule, **_over_seeds(part)} for schedule, part in finished.groupby("schedule", sort=True)
    ]
    headline_file = REPO / "figures" / "table_headline_seeds.csv"
    if headline_file.is_file():
        headline = pd.read_csv(headline_file)
        headline = headline[headline["seed"] != "mean ± sd"]
        summary.append(
            {
                "schedule": "figures headline (T x1.04, 300 steps max)",
                "seeds": len(headline),
                "bigram_r": _mean_sd(headline["r"]),
                "percent_kept": _mean_sd(headline["active_percent"]),
                "steps": _mean_sd(headline["steps"]),
            }
        )
    result = {
        "rows": json.loads(table.to_json(orient="records")),
        "summary": summary,
        "command": "bash scripts/schedule_comparison.sh d && python benchmarks/schedule_comparison.py --model default",
    }
    _write_report(
        out,
        result,
        "Schedules on the default model: fast (the default) vs slow, lambda 10, 8 x 64, 3 seeds",
        table,
        [to_markdown(pd.DataFrame(summary), floatfmt=".4g"), "", "Per seed:", ""],
        [],
    )
    return table


def seed_summary(table: pd.DataFrame) -> list[dict]:
    """Mean ± sd over seeds of each (schedule, lambda) that has ``<schedule>-seed<N>`` runs: the
    schedule's own run is seed 0. Finished runs only."""
    if table.empty or "finished" not in table:
        return []
    done = table[table["finished"] == True].copy()  # noqa: E712 (NaN for unfinished rows)
    done["base"] = done["schedule"].str.replace(r"-seed\d+$", "", regex=True)
    out = []
    for (base, lam), part in done.groupby(["base", "lambda"], sort=True):
        if len(part) >= 2 and (part["schedule"] != base).any():
            out.append({"schedule": base, "lambda": lam, **_over_seeds(part)})
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "default"), default="smollm2")
    parser.add_argument(
        "--runs", type=Path, default=None, help="default runs/schedules (smollm2), runs/schedules_default"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default benchmarks/results/schedule_comparison (smollm2)"
    )
    args = parser.parse_args(argv)
    if args.model == "default":
        return default_model(args.runs or RUNS_DEFAULT, args.out or RESULTS_DEFAULT)
    args.runs, args.out = args.runs or RUNS, args.out or RESULTS
    table = pd.DataFrame(rows(args.runs))
    references: dict = {}
    ceiling_file = REPO / "benchmarks" / "results" / "noise_ceiling.json"
    if ceiling_file.is_file():
        ceiling = pd.DataFrame(json.loads(ceiling_file.read_text())["rows"])
        part = ceiling[(ceiling["model"] == "smollm2") & (ceiling["seq_len"] == 32)]
        if len(part):
            references["noise_ceiling_r"] = float(part["r_dropped"].mean())
    study_file = REPO / "benchmarks" / "results" / "smollm2_study.json"
    if study_file.is_file():  # the full model's r on the same held-out windows (256 x 32)
        study = json.loads(study_file.read_text())
        if study.get("seq_len") == 32 and study.get("n_eval_windows") == 256:
            references["full_model_r"] = float(study["full_model"]["r_dropped"])
    seeds = seed_summary(table)
    result = {
        "rows": json.loads(table.to_json(orient="records")),
        "seeds": seeds,
        "references": references,
        "command": (
            "bash scripts/schedule_comparison.sh && bash scripts/schedule_comparison.sh c && "
            "bash scripts/schedule_comparison.sh e && python benchmarks/schedule_comparison.py"
        ),
    }
    seeds_part = (
        [
            "Seeds (a `NAME-seedN` run is seed N of `NAME`, whose own run is seed 0):",
            "",
            to_markdown(pd.DataFrame(seeds)),
            "",
        ]
        if seeds
        else []
    )
    references_line = "References: " + (", ".join(f"{k} {v:.3f}" for k, v in references.items()) or "none measured")
    _write_report(
        args.out,
        result,
        "Schedule comparison: SmolLM2-135M, weight masks, 2 CPU cores",
        table,
        [],
        [*seeds_part, references_line, ""],
    )
    return table


if __name__ == "__main__":
    main()
