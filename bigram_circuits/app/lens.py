"""``bigram-circuits lens``: logit lens and linear lens (rotation, similarity) of a run."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from bigram_circuits.circuits.lens import lens_report, logit_lens_report
from bigram_circuits.devices import resolve_device

__all__ = ["lens_command"]


def lens_command(
    run: str | os.PathLike,
    n_tokens: int = 16384,  # held-out tokens for the lenses and similarity
    *,
    out: str | os.PathLike | None = None,  # output directory (default RUN/circuits)
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """``bigram-circuits lens RUN``: linear lens, logit lens and layer covariance similarity of
    the full model, the run's bigram subnetwork and a random same-shape subnetwork.

    Uses ``n_tokens`` held-out tokens of the run's corpus. Writes ``linear_lens.csv``,
    ``logit_lens.csv``, ``similarity_{run}.csv`` and the figures ``rotation.html`` /
    ``similarity.html`` to ``out`` (default ``RUN/circuits``); returns the linear-lens table.
    """
    from bigram_circuits.circuits.runs import load_run
    from bigram_circuits.circuits.similarity import similarity_report
    from bigram_circuits.io import atomic_write_bytes, ensure_output_dir
    from bigram_circuits.models import model_vocab_size
    from bigram_circuits.plots import fig3_rotation, fig4_similarity, save_figure
    from bigram_circuits.rundir import RunDir

    loaded = load_run(run, device=resolve_device(device))  # resolved once, before any work
    # An unwritable destination fails now, not after the lens work.
    out_dir = ensure_output_dir(Path(out) if out is not None else RunDir(run).circuits_dir)
    windows = loaded.eval_windows(n_tokens)
    runs = {
        "full": None,
        "bigram": loaded.subnetwork,
        "random": loaded.subnetwork.random_control(0),
    }
    # The run's statistics, or counted now (and saved) when it has none: the logit lens' bigram r needs them.
    stats = RunDir(run).bigram_stats(
        loaded.tokenizer,
        loaded.corpus,
        loaded.seq_len,
        vocab_size=model_vocab_size(loaded.bridge, loaded.tokenizer),
        show_progress=progress,
    )
    table = lens_report(loaded.bridge, loaded.tokenizer, windows, runs, n_tokens, progress=progress)
    logit_table = logit_lens_report(
        loaded.bridge,
        loaded.tokenizer,
        windows,
        runs,
        bigram_stats=stats,
        n_tokens=n_tokens,
        progress=progress,
    )
    matrices = similarity_report(loaded.bridge, windows, runs, n_tokens, progress=progress)
    atomic_write_bytes(out_dir / "linear_lens.csv", table.to_csv(index=False).encode("utf-8"))
    atomic_write_bytes(out_dir / "logit_lens.csv", logit_table.to_csv(index=False).encode("utf-8"))
    for label, matrix in matrices.items():
        atomic_write_bytes(out_dir / f"similarity_{label}.csv", matrix.to_csv().encode("utf-8"))
    save_figure(fig3_rotation(table), out_dir / "rotation", png=False, include_plotlyjs="directory")
    save_figure(fig4_similarity(matrices), out_dir / "similarity", png=False, include_plotlyjs="directory")
    return table
