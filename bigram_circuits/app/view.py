"""``bigram-circuits view`` and ``bigram-circuits push``: look at subnetworks and share them.

:func:`view` is the viewer in Jupyter: ``view(a)`` or ``view(a, b)`` returns a plotly figure (a
subnetwork, a saved subnetwork folder, a ``find`` run or a Hub repo id each work). It lives here,
in the application layer, because the library (``Subnetwork``) never imports the plotting layer
(``tests/test_architecture.py``): the tables come from :func:`bigram_circuits.viewdata.view_tables`
and the figure from :func:`bigram_circuits.plots.view`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from bigram_circuits.data import COMPOSITE_SOURCES, OFFLINE_SOURCES
from bigram_circuits.errors import MaskError
from bigram_circuits.hub import is_repo_id
from bigram_circuits.io import sha256_file
from bigram_circuits.plots import view as view_figure
from bigram_circuits.plots import view_html
from bigram_circuits.rundir import RunDir
from bigram_circuits.subnetwork import Subnetwork
from bigram_circuits.viewdata import view_tables

__all__ = ["load_subnetwork", "push_command", "view", "view_command"]

SubnetworkSource = Subnetwork | str | os.PathLike


def load_subnetwork(source: SubnetworkSource) -> Subnetwork:
    """A subnetwork from itself, a saved subnetwork folder, a ``find`` run directory (its chosen
    subnetwork, as the other commands pick it) or a Hub repo id in this package's format."""
    if isinstance(source, Subnetwork):
        return source
    path = Path(source)
    if path.is_dir():
        return Subnetwork.load(RunDir(path).subnetwork_dir())
    if is_repo_id(str(source)):
        return Subnetwork.from_pretrained(str(source))
    raise MaskError(f"{source} is neither a run or subnetwork directory nor a Hub repo id; pass one of them")


def _label(source: SubnetworkSource, fallback: str) -> str:
    if isinstance(source, Subnetwork):
        return fallback
    return Path(source).name or str(source)


def view(
    a: SubnetworkSource,
    b: SubnetworkSource | None = None,
    *,
    names: Sequence[str] | None = None,
    n_random: int = 2_000,
    title: str | None = None,
) -> go.Figure:
    """The viewer as a plotly figure: kept fraction per layer x matrix, a per-matrix drill-down
    (kept rows and columns; kept units of neuron/head masks), the metrics and, for two
    subnetworks, their overlap per block against the exact random null (``n_random`` pairs)."""
    subs = [load_subnetwork(a)] + ([] if b is None else [load_subnetwork(b)])
    if names is None:
        names = [_label(a, "A")] + ([] if b is None else [_label(b, "B")])
        if len(set(names)) < len(names):
            names = [f"{n} ({tag})" for n, tag in zip(names, "AB")]
    tables = view_tables(*subs, names=names, n_random=n_random)
    return view_figure(tables, title=title)


def view_command(
    run: str | os.PathLike,
    other: str | os.PathLike | None = None,
    *,
    out: str | os.PathLike = "subnetwork_view.html",  # the HTML file to write
    n_random: int = 2_000,  # random pairs for the overlap null
) -> Path:
    """Write the viewer of ``run`` (and ``other``) as one self-contained offline HTML page."""
    return view_html(view(run, other, n_random=n_random), out)


def _corpus_fingerprint(corpus: object) -> str | None:
    """SHA-256 of a corpus: the pinned archive checksum(s) of a named source, or a local file's hash."""
    if not isinstance(corpus, str):
        return None
    parts = COMPOSITE_SOURCES.get(corpus, (corpus,))
    if all(part in OFFLINE_SOURCES for part in parts):
        return "+".join(OFFLINE_SOURCES[part].sha256 for part in parts)
    path = Path(corpus)
    return sha256_file(path) if path.is_file() else None


def _run_provenance(subnetwork_dir: Path) -> dict:
    """What a run directory records beyond the subnetwork's own metadata: the tokenizer
    fingerprint of its bigram statistics, the schedule of ``find`` and the corpus fingerprint."""
    found: dict = {}
    for folder in (subnetwork_dir, *subnetwork_dir.parents[:2]):
        stats = folder / RunDir.STATS
        if "tokenizer_fingerprint" not in found and stats.exists():
            with np.load(stats, allow_pickle=False) as data:
                if "tokenizer_fingerprint" in data.files and str(data["tokenizer_fingerprint"]):
                    found["tokenizer_fingerprint"] = str(data["tokenizer_fingerprint"])
        manifest = folder / "manifest.json"
        if "schedule" not in found and manifest.exists():
            try:
                settings = json.loads(manifest.read_text(encoding="utf-8")).get("config", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                settings = {}
            if isinstance(settings, dict) and settings.get("schedule"):
                found["schedule"] = settings["schedule"]
    return found


def push_command(
    run: str | os.PathLike,
    *,
    repo: str,  # the Hub model repo id (owner/name); created if missing
    private: bool = False,  # create the repo private
    token: str | None = None,  # a Hugging Face token (default: the saved login or HF_TOKEN)
    commit_message: str | None = None,  # the commit message (default: a summary of the subnetwork)
) -> str:
    """Upload the subnetwork of ``run`` (a saved subnetwork or a ``find`` run: its chosen one) to
    the Hub model repo ``repo`` with its model card; the run's tokenizer fingerprint, schedule
    and corpus fingerprint are added to the card. Returns the commit URL."""
    folder = RunDir(run).subnetwork_dir()
    subnetwork = Subnetwork.load(folder)
    extra = _run_provenance(folder)
    fingerprint = _corpus_fingerprint(subnetwork.metadata.get("corpus"))
    if fingerprint:
        extra["corpus_sha256"] = fingerprint
    extra = {k: v for k, v in extra.items() if k not in subnetwork.metadata}
    if extra:
        subnetwork = subnetwork.with_masks(subnetwork.masks, {**subnetwork.metadata, **extra})
    return subnetwork.push_to_hub(repo, private=private, token=token, commit_message=commit_message)
