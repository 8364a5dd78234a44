"""``bigram-circuits build-up``: circuits built on a run's bigram subnetwork."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from bigram_circuits.circuits.buildup import BuildUpConfig, build_up_experiment
from bigram_circuits.devices import resolve_device
from bigram_circuits.errors import ConfigError

__all__ = ["build_up_command", "save_build_up"]


def save_build_up(tables: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike) -> list[Path]:
    """Write every table as CSV + Markdown under ``out_dir`` (atomic writes); return the paths."""
    from bigram_circuits.io import ensure_output_dir
    from bigram_circuits.tables import write_tables

    ensure_output_dir(out_dir)
    return write_tables(tables, out_dir)


def build_up_command(
    model: str = "default",
    base: str | os.PathLike = "",
    out: str | os.PathLike | None = None,
    *,
    optimal: str | os.PathLike | None = None,
    config: BuildUpConfig | None = None,
    device: str | torch.device = "cpu",
    png: bool = True,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """``bigram-circuits build-up``: the build-up experiment on a run's chosen subnetwork
    (``base``, a ``find`` run or subnetwork directory) and optionally an optimal subnetwork;
    writes the tables and ``build_up.html``/``.png`` under ``out`` when given."""
    from bigram_circuits.circuits.runs import subnetwork_dir_of
    from bigram_circuits.models import load_model
    from bigram_circuits.subnetwork import Subnetwork

    device = resolve_device(device)  # once, before any work
    if not base:
        raise ConfigError("pass --base RUN_DIR: a `bigram-circuits find` run or subnetwork directory")
    if out is not None:
        from bigram_circuits.io import ensure_output_dir

        ensure_output_dir(out)
    bases = {"bigram": Subnetwork.load(subnetwork_dir_of(base))}
    if optimal is not None:
        bases["optimal"] = Subnetwork.load(subnetwork_dir_of(optimal))
    bridge, tokenizer = load_model(model, device=device)
    tables = build_up_experiment(bridge, tokenizer, bases, config or BuildUpConfig(), progress=progress)
    if out is not None:
        from bigram_circuits.plots import fig_build_up, save_figure

        save_build_up(tables, out)
        save_figure(fig_build_up(tables["build_up_summary"]), Path(out) / "build_up", png=png)
    return tables
