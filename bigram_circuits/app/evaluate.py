"""``bigram-circuits evaluate``: the evaluation tables of a ``find`` run (ablation, generations,
sweep metrics, overlap with an optimal subnetwork, layer distribution)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from bigram_circuits.circuits.overlap import layer_distribution, overlap_table
from bigram_circuits.circuits.runs import load_run
from bigram_circuits.devices import resolve_device
from bigram_circuits.errors import MaskError
from bigram_circuits.evaluate import (
    DEFAULT_PROMPT,
    ablation_table,
    generate_table,
    generation_conditions,
    sweep_metrics_table,
)
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.rundir import RunDir
from bigram_circuits.subnetwork import Subnetwork
from bigram_circuits.tables import write_tables

__all__ = ["evaluate_run"]


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    # an optimal-subnetwork run to compare with (default: RUN/optimal if it exists)
    optimal: str | os.PathLike | None = None,
    n_eval_windows: int | None = 256,  # held-out windows of the run's seq_len
    seeds: Sequence[int] = (0, 1, 2),  # comma-separated seeds of the random same-shape subnetworks
    n_random: int = 10_000,  # random pairs for the overlap null
    prompt: str = DEFAULT_PROMPT,
    temperature: float = 0.8,  # sampling temperature of the generations
    max_new_tokens: int = 30,  # tokens per generation
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    out_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Evaluate a saved ``bigram-circuits find`` run and write its tables next to it.

    Loads the run's chosen bigram subnetwork (or the subnetwork saved in ``run_dir`` itself),
    the model and corpus it was found on, the run's bigram stats and ``n_eval_windows``
    held-out windows. ``optimal`` is a run (or subnetwork directory) of the same model and
    granularity searched with the full-model target; without it, ``run_dir/optimal`` is used
    if it exists. Returns and writes (``out_dir``, default ``run_dir/evaluation``, as
    ``NAME.csv`` + ``NAME.md`` and ``summary.json``) the tables: ``metrics`` (full model and
    every lambda), ``ablation``, ``generations``, ``layer_distribution`` and, with an optimal
    subnetwork, ``overlap``.
    """

    device = resolve_device(device)  # once, before any work
    run_path = Path(run_dir)
    if not run_path.is_dir():
        raise MaskError(f"run directory {run_path} does not exist; run `bigram-circuits find` first")
    loaded = load_run(run_path, device=device)
    bridge, tokenizer, bigram = loaded.bridge, loaded.tokenizer, loaded.subnetwork
    optimal_path = Path(optimal) if optimal is not None else RunDir(run_path).optimal_run().path
    optimal_sub, optimal_dir = None, None
    if optimal is not None or optimal_path.is_dir():
        if not optimal_path.is_dir():
            raise MaskError(
                f"optimal run {optimal_path} does not exist; run `bigram-circuits find --target full_model`"
            )
        bigram_lambda = bigram.metadata.get("config", {}).get("lam")
        optimal_dir = RunDir(optimal_path).optimal_subnetwork_dir(prefer_lambda=bigram_lambda)
        optimal_sub = Subnetwork.load(optimal_dir)
    stats = RunDir(run_path).bigram_stats(tokenizer, loaded.corpus, loaded.seq_len, show_progress=show_progress)
    windows = loaded.eval_windows(None if n_eval_windows is None else n_eval_windows * loaded.seq_len)

    tables: dict[str, pd.DataFrame] = {}
    tables["metrics"] = sweep_metrics_table(bridge, stats, windows, run_path, batch_size, show_progress)
    tables["ablation"] = ablation_table(bridge, stats, windows, bigram, optimal_sub, seeds, batch_size, show_progress)
    tables["generations"] = generate_table(
        bridge, tokenizer, prompt, generation_conditions(bigram, seeds[0]), temperature, max_new_tokens, seed=0
    )
    tables["layer_distribution"] = layer_distribution(bigram)
    if optimal_sub is not None:
        tables["overlap"] = overlap_table({"bigram vs optimal": (bigram, optimal_sub)}, n_random=n_random)

    summary = {
        "run": str(run_path),
        "bigram_subnetwork": str(loaded.subnetwork_dir),
        "model": loaded.model_name,
        "n_eval_windows": len(windows),
        "n_eval_tokens": int(tables["ablation"]["n_tokens"].iloc[0]),
        "loss_increase_ratio": tables["ablation"].attrs["loss_increase_ratio"],
        "random_ablated_loss_increase_by_seed": tables["ablation"].attrs["random_ablated_loss_increase_by_seed"],
        **{f"layer_{k}": v for k, v in tables["layer_distribution"].attrs.items()},
    }
    if optimal_sub is not None:
        row = tables["overlap"].iloc[0]
        summary.update(
            {
                "optimal_subnetwork": str(optimal_dir),
                "overlap_fraction": float(row["fraction_overlap"]),
                "overlap_expected": float(row["expected"]),
                "overlap_ratio": float(row["ratio"]),
                "overlap_p_value": float(row["p_value"]),
                "overlap_frac_bigram_in_optimal": float(row["frac_a_in_b"]),
            }
        )
    target_dir = Path(out_dir) if out_dir is not None else RunDir(run_path).evaluation_dir
    write_tables(tables, target_dir)
    atomic_write_bytes(target_dir / "summary.json", json.dumps(summary, indent=2, default=str).encode("utf-8"))
    return tables
