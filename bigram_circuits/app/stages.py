"""Stage caching for the application pipelines (the paper figures, the real-model study).

Each expensive stage's result is written once, atomically, in a cache folder and read back on a
rerun: an interrupted pipeline loses at most the stage it was in, and a rerun after one more
search (a control, a seed) recomputes only the stages whose names or keys changed. A keyed cache
(:meth:`StageCache.keyed`) lives in a folder named by a digest of everything its stages depend
on, so changing an input starts a new folder instead of reading stale results.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bigram_circuits.io import atomic_write_bytes, ensure_output_dir

__all__ = ["StageCache"]

_TIMINGS = "stage_timings.json"


class StageCache:
    """Stage results under ``root``: :meth:`frame` (a DataFrame, as CSV) and :meth:`json` (any
    JSON-ready value), each computed by its ``compute`` callable only when absent. ``seconds``
    holds how long each stage took when it was computed (kept in ``stage_timings.json``), so a
    rerun that reads the cache still reports the real cost of its results."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        timings = self.root / _TIMINGS
        self.seconds: dict[str, float] = json.loads(timings.read_text()) if timings.is_file() else {}

    @classmethod
    def keyed(cls, parent: Path, key: Mapping[str, Any]) -> StageCache:
        """The cache in ``parent/<digest of key>`` (``key`` JSON-ready; written beside the stages
        as ``key.json`` so a reader can see what a folder was made from)."""
        text = json.dumps(key, sort_keys=True, default=str)
        root = ensure_output_dir(Path(parent) / hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])
        if not (root / "key.json").is_file():
            atomic_write_bytes(root / "key.json", json.dumps(key, sort_keys=True, indent=2, default=str).encode())
        return cls(root)

    def frame(self, name: str, compute: Callable[[], pd.DataFrame], *, index: bool = False) -> pd.DataFrame:
        """The stage ``name`` as a DataFrame (``name.csv``). With ``index`` the index is kept (the
        first column) and the stage is always returned as read back, so a first run and a rerun
        see the same labels (e.g. a layer x layer matrix)."""
        path = self.root / f"{name}.csv"
        if not path.exists():
            table = self._timed(name, compute)
            atomic_write_bytes(path, table.to_csv(index=index).encode("utf-8"))
            if not index:
                return table
        return pd.read_csv(path, index_col=0 if index else None)

    def frames(
        self, prefix: str, names: Sequence[str], compute: Callable[[], Mapping[str, pd.DataFrame]]
    ) -> dict[str, pd.DataFrame]:
        """Several indexed frames made by one computation (stages ``<prefix>_<name>``): ``compute``
        runs at most once, only if one of them is absent, and returns every frame by name."""
        computed: dict[str, pd.DataFrame] = {}

        def one(name: str) -> pd.DataFrame:
            if not computed:
                computed.update(compute())
            return computed[name]

        return {name: self.frame(f"{prefix}_{name}", lambda n=name: one(n), index=True) for name in names}

    def cached_frame(self, name: str) -> pd.DataFrame | None:
        """The frame stage ``name`` if it has been computed, else None (nothing is computed)."""
        path = self.root / f"{name}.csv"
        return pd.read_csv(path) if path.exists() else None

    def json(self, name: str, compute: Callable[[], Any]) -> Any:
        """The stage ``name`` as a JSON-ready value (``name.json``)."""
        path = self.root / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = self._timed(name, compute)
        atomic_write_bytes(path, json.dumps(value, indent=2).encode("utf-8"))
        return json.loads(json.dumps(value))  # the same types a rerun reads back (tuples -> lists)

    def _timed(self, name: str, compute: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = compute()
        self.seconds[name] = time.perf_counter() - started
        ensure_output_dir(self.root)
        atomic_write_bytes(self.root / _TIMINGS, json.dumps(self.seconds, indent=2).encode("utf-8"))
        return value
