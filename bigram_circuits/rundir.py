"""The on-disk layout of a run, in one place.

A ``find`` run directory holds a lambda sweep (one sub-run per lambda), or, with several
seeds, one such sweep per seed::

    RUN/
      manifest.json          files, hashes and settings (bigram_circuits.manifest)
      find.json              what was run and which subnetwork was chosen
      bigram_stats.npz       the bigram statistics the sweep used (tokenizer fingerprint inside)
      sweep.csv              one row per lambda; the ``chosen`` column marks the paper's choice
      seeds.csv              (several seeds) mean and sample std over seeds per lambda
      seed_{s}/              (several seeds) a sweep as above
      lambda_{lam:g}/        one search: subnetwork.json + .safetensors, history.csv,
                             checkpoint.pt while it runs
      optimal/               (optional) a full-model-target sweep compared by ``evaluate``
      evaluation/            tables of ``bigram-circuits evaluate``
      circuits/              tables and figures of ``bigram-circuits lens``

A directory that itself holds ``subnetwork.json`` is a single search (a ``lambda_*`` folder,
or a run saved with :meth:`~bigram_circuits.subnetwork.Subnetwork.save`). :class:`RunDir`
answers every question about that layout (where is the chosen subnetwork, the sweep table, the
checkpoint) and loads or counts the bigram statistics with a tokenizer check; commands,
studies and the search use it instead of spelling out file names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bigram_circuits.data import TokenDataset, load_token_dataset
from bigram_circuits.errors import MaskError
from bigram_circuits.ngrams import BigramStats

__all__ = ["RunDir"]


@dataclass(frozen=True)
class RunDir:
    """A run directory (it need not exist yet). ``RunDir("runs/find").lambda_run(10).path`` is
    ``runs/find/lambda_10``."""

    path: Path

    SUBNETWORK = "subnetwork.json"
    SWEEP = "sweep.csv"
    SEEDS = "seeds.csv"
    STATS = "bigram_stats.npz"
    CHECKPOINT = "checkpoint.pt"
    HISTORY = "history.csv"
    FIND = "find.json"
    EVALUATION = "evaluation"
    CIRCUITS = "circuits"
    OPTIMAL = "optimal"

    def __init__(self, path: str | os.PathLike | RunDir) -> None:
        object.__setattr__(self, "path", Path(path.path if isinstance(path, RunDir) else path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- sub-runs

    @staticmethod
    def lambda_name(lam: float) -> str:
        """The folder name of the search at sparsity weight ``lam`` (``lambda_10``, ``lambda_0.5``)."""
        return f"lambda_{float(lam):g}"

    def lambda_run(self, lam: float) -> RunDir:
        return RunDir(self.path / self.lambda_name(lam))

    def lambda_runs(self) -> list[RunDir]:
        """The finished-or-running ``lambda_*`` searches in this directory, by lambda."""
        found = []
        for folder in self.path.glob("lambda_*"):
            try:
                found.append((float(folder.name.removeprefix("lambda_")), RunDir(folder)))
            except ValueError:
                continue
        return [run for _, run in sorted(found, key=lambda pair: pair[0])]

    def optimal_run(self) -> RunDir:
        """Where ``evaluate`` looks for an optimal-subnetwork run by default."""
        return RunDir(self.path / self.OPTIMAL)

    def seed_run(self, seed: int) -> RunDir:
        """The sweep of one seed of a several-seed ``find``."""
        return RunDir(self.path / f"seed_{int(seed)}")

    # -- files

    @property
    def checkpoint_file(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def history_file(self) -> Path:
        return self.path / self.HISTORY

    @property
    def sweep_file(self) -> Path:
        return self.path / self.SWEEP

    @property
    def stats_file(self) -> Path:
        return self.path / self.STATS

    @property
    def evaluation_dir(self) -> Path:
        return self.path / self.EVALUATION

    @property
    def circuits_dir(self) -> Path:
        return self.path / self.CIRCUITS

    def holds_subnetwork(self) -> bool:
        """Whether this directory is one finished search (it holds ``subnetwork.json``)."""
        return (self.path / self.SUBNETWORK).exists()

    def is_finished_search(self) -> bool:
        """A finished search: its subnetwork and its loss history are both written."""
        return self.holds_subnetwork() and self.history_file.exists()

    # -- the sweep and its chosen subnetwork

    def sweep_table(self) -> pd.DataFrame | None:
        """``sweep.csv`` with a ``dir`` column (each lambda's folder), or None without a sweep."""
        if not self.sweep_file.exists():
            return None
        table = pd.read_csv(self.sweep_file)
        if "lambda" not in table or table.empty:
            raise MaskError(f"{self.sweep_file} has no lambda rows; run `bigram-circuits find` again")
        table["dir"] = [str(self.lambda_run(lam).path) for lam in table["lambda"]]
        return table

    def subnetwork_dir(self) -> Path:
        """The chosen subnetwork's directory: this one when it holds ``subnetwork.json``, else
        the lambda marked ``chosen`` in ``sweep.csv`` (or its only lambda)."""
        if self.holds_subnetwork():
            return self.path
        if not self.sweep_file.exists():
            raise MaskError(
                f"{self.path} holds no {self.SUBNETWORK} or {self.SWEEP}; pass a run of `bigram-circuits find`"
            )
        sweep = pd.read_csv(self.sweep_file)
        chosen = sweep[sweep["chosen"].astype(bool)] if "chosen" in sweep else sweep[:0]
        if chosen.empty and len(sweep) == 1:
            chosen = sweep
        if chosen.empty:
            raise MaskError(f"{self.path} has no chosen subnetwork; pass one of its lambda_* directories")
        return self.lambda_run(float(chosen["lambda"].iloc[0])).path

    def optimal_subnetwork_dir(self, prefer_lambda: float | None = None) -> Path:
        """The subnetwork of an optimal (full-model target) run: as :meth:`subnetwork_dir`, and
        since such a sweep chooses no lambda (it has no bigram r), else ``lambda_{prefer_lambda}``."""
        try:
            return self.subnetwork_dir()
        except MaskError:
            if prefer_lambda is not None and self.lambda_run(prefer_lambda).holds_subnetwork():
                return self.lambda_run(prefer_lambda).path
            raise

    # -- bigram statistics

    def bigram_stats(
        self,
        tokenizer,
        corpus: str = "default",
        seq_len: int = 128,
        vocab_size: int | None = None,
        *,
        train: TokenDataset | None = None,
        save: bool = True,
        show_progress: bool = True,
    ) -> BigramStats:
        """The run's bigram statistics: ``bigram_stats.npz`` when it exists (refused with a
        ``StatsError`` line when it was counted with another tokenizer), else counted on the
        train split of ``corpus`` (``train``, when the caller has loaded it already) in windows
        of ``seq_len`` and, with ``save``, written there."""
        if self.stats_file.exists():
            return BigramStats.load(self.stats_file, tokenizer=tokenizer)
        if train is None:
            train = load_token_dataset(corpus, tokenizer, split="train", show_progress=show_progress)
        stats = BigramStats.from_tokens(
            train,
            vocab_size if vocab_size is not None else len(tokenizer),
            seq_len=seq_len,
            show_progress=show_progress,
        )
        if save:
            stats.save(self.stats_file, tokenizer=tokenizer)
        return stats
