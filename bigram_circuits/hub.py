"""Hugging Face Hub plumbing for subnetworks: the model card, resolving a repo id, pushing files.

Everything here goes through ``huggingface_hub`` (no hand-written HTTP), so its cache, token,
``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` / ``HF_HOME`` settings apply as they do to
``transformers``. :class:`~bigram_circuits.subnetwork.Subnetwork` calls these from
``save_pretrained``, ``from_pretrained`` and ``push_to_hub``; this module does not import it.

Two repository layouts are read:

- this package's: ``subnetwork.json`` + ``masks.safetensors`` (+ the ``README.md`` model card);
- the paper authors' (``tylerachang/bigram-subnetworks-*``): one or more mask pickles in the repo
  root, named ``subnetwork_dict_lambda{lambda}.pickle`` (e.g. ``subnetwork_dict_lambda1e1.pickle``).
  :func:`pick_author_file` chooses one: the ``filename`` given, else the file of lambda ``lam``,
  else the only pickle, else the largest lambda (the default of the authors' own loader).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bigram_circuits.errors import HubError, MaskError

__all__ = [
    "ARXIV_ID",
    "LIBRARY_NAME",
    "RepoFiles",
    "is_repo_id",
    "model_card",
    "pick_author_file",
    "push_files",
    "resolve_repo",
]

ARXIV_ID = "2504.15471"
LIBRARY_NAME = "bigram_circuits"
TAGS = ("bigram-circuits", "mechanistic-interpretability", "subnetwork", "pruning-mask", f"arxiv:{ARXIV_ID}")
AUTHOR_SUFFIXES = (".pickle", ".pkl")
_AUTHOR_NAME = re.compile(r"^subnetwork_dict_lambda(?P<lam>[0-9.eE+-]+)\.(pickle|pkl)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is shaped like a Hub repo id (``owner/name``) rather than a path."""
    return bool(_REPO_ID.match(text)) and not Path(text).exists()


# ----------------------------------------------------------------------------- model card


def _cell(value: object) -> str:
    if value is None or value == "":
        return "not recorded"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[tuple[str, object]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    return "\n".join(lines)


def _first(metadata: Mapping, *keys: str) -> object:
    """The first of ``keys`` the metadata (or its ``config``) holds."""
    config = metadata.get("config") if isinstance(metadata.get("config"), Mapping) else {}
    for key in keys:
        for source in (metadata, config):
            if source.get(key) not in (None, ""):
                return source[key]
    return None


_METRICS = (
    ("bigram_r", "bigram r (Pearson r of the subnetwork's surprisal with the bigram's)"),
    ("target_loss", "target loss (held-out)"),
    ("n_params", "weights kept"),
    ("n_params_total", "maskable weights"),
    ("percent_params", "percent of weights kept"),
    ("density", "kept share of mask entries"),
    ("steps", "search steps"),
    ("stop_reason", "stop reason"),
    ("stable", "passed the stability check"),
    ("metrics_on", "measured on"),
)


def model_card(
    *,
    model_id: str,
    metadata: Mapping,
    summary: Mapping,
    layer_table: pd.DataFrame,
    repo_id: str | None = None,
) -> str:
    """The ``README.md`` of a saved subnetwork: YAML front matter (library, tags, base model, the
    paper's arXiv id) and a body with the model, fingerprints, search settings, the metrics
    measured on the binary mask, the layer distribution and a loading example.

    ``layer_table`` is :meth:`Subnetwork.layer_distribution` (layer, block, kept_params,
    total_params, share_of_subnetwork, fraction_kept); ``summary`` is :meth:`Subnetwork.summary`.
    Fields the metadata does not hold read "not recorded".
    """
    from huggingface_hub import ModelCard, ModelCardData

    model = _first(metadata, "model_name", "model")
    base_model = str(model) if isinstance(model, str) and is_repo_id(model) else None
    data = ModelCardData(library_name=LIBRARY_NAME, tags=list(TAGS), base_model=base_model)
    metrics = metadata.get("metrics") if isinstance(metadata.get("metrics"), Mapping) else {}
    metric_rows = [(label, metrics.get(key, summary.get(key))) for key, label in _METRICS]
    metric_rows = [(label, value) for label, value in metric_rows if value is not None]
    lam = _first(metadata, "lam", "lambda")
    schedule = _first(metadata, "schedule")
    if schedule is None and isinstance(metadata.get("config"), Mapping):
        config = metadata["config"]
        lr = "per-granularity default" if config.get("lr") is None else _cell(config["lr"])
        schedule = (
            f"lr {lr}, temperature x{_cell(config.get('temperature_growth'))} per step "
            f"from {_cell(config.get('temperature_init'))}, at most {_cell(config.get('max_steps'))} steps"
        )
    provenance = [
        ("model", model),
        ("model revision", _first(metadata, "model_revision", "revision")),
        ("architecture fingerprint (`model_id`)", model_id),
        ("tokenizer fingerprint", _first(metadata, "tokenizer_fingerprint")),
        ("corpus", _first(metadata, "corpus")),
        ("corpus fingerprint", _first(metadata, "corpus_fingerprint", "corpus_sha256")),
        ("target", _first(metadata, "target")),
        ("granularity", summary.get("granularities")),
        ("lambda (sparsity weight)", lam),
        ("schedule", schedule),
        ("parameterization", _first(metadata, "parameterization")),
        ("seed", _first(metadata, "seed")),
    ]
    layers = ["| layer | attention kept | MLP kept | share of the subnetwork (attn / MLP) |", "|---|---|---|---|"]
    for layer, group in layer_table.groupby("layer", sort=True):
        by_block = {row["block"]: row for _, row in group.iterrows()}
        cells = []
        for block in ("attn", "mlp"):
            row = by_block.get(block)
            cells.append(
                "-" if row is None else f"{100 * row['fraction_kept']:.2f}% ({int(row['kept_params']):,} weights)"
            )
        shares = " / ".join(
            f"{100 * by_block[b]['share_of_subnetwork']:.1f}%" if b in by_block else "-" for b in ("attn", "mlp")
        )
        layers.append(f"| {layer} | {cells[0]} | {cells[1]} | {shares} |")
    where = repo_id or "path/to/this/folder"
    load_with = model if isinstance(model, str) and model else "MODEL"
    body = f"""
# Bigram subnetwork of `{_cell(model)}`

A binary mask over the attention and MLP weights of `{_cell(model)}`, found with the
`bigram_circuits` package as in *Bigram Subnetworks: Mapping to Next Tokens
in Transformer Language Models* (Chang and Bergen, 2025, [arXiv:{ARXIV_ID}](https://arxiv.org/abs/{ARXIV_ID})). It keeps
{int(summary.get("n_params", 0)):,} of {int(summary.get("n_params_total", 0)):,} maskable weights
({float(summary.get("percent_params", 0.0)):.3f}%); embeddings, layer norms and biases are not masked.

## Provenance

{_table(provenance)}

## Metrics (measured on the binary mask)

{_table(metric_rows) if metric_rows else "No metrics were recorded with this subnetwork."}

## Layer distribution

Kept fraction of each block's weights (and the block's share of all kept weights).

{chr(10).join(layers)}

## Loading

```python
from bigram_circuits.models import load_model; from bigram_circuits.subnetwork import Subnetwork
bridge, tokenizer = load_model("{load_with}")
subnetwork = Subnetwork.from_pretrained("{where}", bridge=bridge)  # then: with subnetwork.applied(bridge): ...
```

Files: `masks.safetensors` (one boolean tensor per mask key, True = kept) and `subnetwork.json`
(model fingerprint, geometry, components, summary and the full search metadata).
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    return str(card)


# ----------------------------------------------------------------------------- resolving a repository


@dataclass(frozen=True)
class RepoFiles:
    """The files of a local folder or a Hub repo at one revision, fetched on demand."""

    source: str
    names: tuple[str, ...]
    fetch: Callable[[str], Path]
    revision: str | None = None  # the commit a Hub repo resolved to (None for a local folder)


def _hub_error(repo_id: str, exc: Exception) -> HubError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, HFValidationError):
        return HubError(f"{repo_id!r} is neither a folder nor a valid Hub repo id; pass owner/name or a folder")
    if isinstance(exc, LocalEntryNotFoundError) or constants.HF_HUB_OFFLINE:
        return HubError(
            f"{repo_id} is not in the Hugging Face cache and the Hub is off (HF_HUB_OFFLINE); "
            "download it once with the network on, or pass a local folder"
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo_id} has no such revision; pass revision= a branch, tag or commit it has")
    if isinstance(exc, GatedRepoError):
        return HubError(f"{repo_id} is gated; accept its terms on the Hub and pass token= (or `hf auth login`)")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"Hub repo {repo_id} was not found (or it is private: pass token= or `hf auth login`)")
    return HubError(
        f"cannot reach Hub repo {repo_id} ({type(exc).__name__}); check the network or set HF_HUB_OFFLINE=1"
    )


def resolve_repo(
    repo_id_or_directory: str | os.PathLike,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> RepoFiles:
    """The files of a local folder, or of a Hub repo id through the HF cache.

    Online, the repo's file list comes from the Hub and each file is downloaded into the cache
    when fetched (``hf_hub_download``). With ``HF_HUB_OFFLINE=1`` the cached snapshot of
    ``revision`` (default ``main``) is used as it is (``snapshot_download(local_files_only=True)``);
    a repo missing from the cache raises :class:`HubError`.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError, HTTPError

    path = Path(repo_id_or_directory)
    if path.is_dir():
        names = tuple(sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()))
        return RepoFiles(str(path), names, lambda name: path / name)
    repo_id = str(repo_id_or_directory)
    if path.exists() or not _REPO_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is neither a folder nor a Hub repo id (owner/name); pass one of them")
    hub_errors = (OSError, HFValidationError, HTTPError)
    try:
        if constants.HF_HUB_OFFLINE:
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
            names = tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
            return RepoFiles(repo_id, names, lambda name: folder / name, folder.name)
        info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=False)
    except hub_errors as exc:
        raise _hub_error(repo_id, exc) from exc
    commit = info.sha

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id, name, revision=commit, cache_dir=cache_dir, token=token))
        except hub_errors as exc:
            raise _hub_error(repo_id, exc) from exc

    names = tuple(sorted(sibling.rfilename for sibling in info.siblings or ()))
    return RepoFiles(repo_id, names, fetch, commit)


def pick_author_file(names: Sequence[str], filename: str | None = None, lam: float | None = None) -> str:
    """The authors' mask pickle to load from a repo's root files ``names``: ``filename`` when
    given, else ``subnetwork_dict_lambda{lam}.pickle`` when ``lam`` is given, else the only
    pickle, else the largest lambda (the default of the authors' loader)."""
    pickles = sorted(n for n in names if "/" not in n and n.endswith(AUTHOR_SUFFIXES))
    if filename is not None:
        if filename not in names:
            raise MaskError(f"the repo has no file {filename!r}; its mask pickles: {', '.join(pickles) or 'none'}")
        return filename
    by_lambda = {}
    for name in pickles:
        found = _AUTHOR_NAME.match(name)
        if found:
            try:
                by_lambda[float(found["lam"])] = name
            except ValueError:
                continue
    if lam is not None:
        if float(lam) not in by_lambda:
            have = ", ".join(f"{x:g}" for x in sorted(by_lambda)) or "none"
            raise MaskError(f"the repo has no mask for lambda {lam:g} (it has: {have}); pass one of those")
        return by_lambda[float(lam)]
    if len(pickles) == 1:
        return pickles[0]
    if by_lambda:
        return by_lambda[max(by_lambda)]
    if pickles:
        raise MaskError(f"the repo holds several mask pickles ({', '.join(pickles)}); pass filename= one of them")
    raise MaskError("the repo holds neither subnetwork.json + masks.safetensors nor a mask pickle")


# ----------------------------------------------------------------------------- pushing


def push_files(
    repo_id: str,
    files: Mapping[str, bytes],
    *,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str = "Upload bigram subnetwork",
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` (a model repo; kept if it exists) and commit ``files`` (name -> bytes)
    in one commit through ``HfApi.create_repo`` and ``HfApi.create_commit``. Returns the
    commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HFValidationError, HTTPError

    if not _REPO_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id; pass owner/name")
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in sorted(files.items())]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id, operations, commit_message=commit_message, repo_type="model", revision=revision
        )
    except (OSError, HFValidationError, HTTPError) as exc:
        raise HubError(
            f"cannot push to {repo_id} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
            "check the token (`hf auth login` or token=) and the network"
        ) from exc
    return str(getattr(info, "commit_url", info))
