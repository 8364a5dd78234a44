"""A found subnetwork: binary masks + provenance, applied to a bridge as a context manager.

``Subnetwork.masks`` maps mask keys (see :mod:`bigram_circuits.masks`) to boolean tensors
(True = kept). On disk a subnetwork is a directory with ``masks.safetensors`` and
``subnetwork.json`` (model id, geometry, components, metadata: model, data, config, metrics).

Sizes are reported in the paper's unit, weights gated: a subnetwork's masks are expanded to the
weight matrices they gate (neuron: its MLP row(s) and column; head: its Q/K/V rows and O
columns) and the kept weights are counted, so neuron/head subnetworks and weight subnetworks
compare directly. The total is every attention and MLP weight matrix entry (the paper's mask
size; embeddings, layernorms and biases are excluded).

:meth:`Subnetwork.save_pretrained` adds a ``README.md`` model card (a Hub-style folder);
:meth:`Subnetwork.push_to_hub` uploads that folder and :meth:`Subnetwork.from_pretrained` reads it
back from a folder or a Hub repo id through the HF cache (:mod:`bigram_circuits.hub`).

The authors' released masks (pickles of ``{HF parameter name: numpy bool array}``) are read
through a restricted unpickler that refuses anything but dicts, strings and numpy arrays
(:mod:`bigram_circuits.masks.authors`, the authors' format).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.errors import MaskError
from bigram_circuits.hub import model_card, pick_author_file, push_files, resolve_repo
from bigram_circuits.io import atomic_write_bytes, ensure_output_dir
from bigram_circuits.masks import (
    DEFAULT_GRANULARITIES,
    Granularity,
    MaskComponent,
    MaskKey,
    ModelGeometry,
    RunMode,
    apply_binary_masks,
    expand_to_weight_masks,
    granularity_of_key,
    mask_components,
    masks_attached,
    model_geometry,
    parse_granularities,
)
from bigram_circuits.masks.authors import (
    AUTHOR_NAME_KEY,
    author_dict_to_weight_masks,
    author_parameter_names,
    load_author_pickle,
    weight_masks_to_author_dict,
)
from bigram_circuits.models import model_id

__all__ = ["Subnetwork", "load_author_pickle"]

MASKS_FILE = "masks.safetensors"
META_FILE = "subnetwork.json"
MODEL_CARD_FILE = "README.md"
FORMAT = "bigram_circuits.subnetwork"
FORMAT_VERSION = 1


def _jsonable(obj):
    """Recursively convert metadata to JSON types (dataclasses, numpy, paths, tensors)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return _jsonable(obj.item())
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


@dataclass
class Subnetwork:
    """Binary masks over a model's components plus where they came from.

    Build one with :meth:`from_masks` (from a bridge), :meth:`full` / :meth:`empty`,
    :meth:`load`, or :meth:`from_author_pickle`.
    """

    masks: dict[str, Bool[torch.Tensor, ...]]
    components: dict[str, MaskComponent]
    geometry: ModelGeometry
    model_id: str
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.masks) != set(self.components):
            missing = sorted(set(self.components) - set(self.masks))
            extra = sorted(set(self.masks) - set(self.components))
            raise MaskError(f"mask keys do not match the components (missing {missing[:3]}, extra {extra[:3]})")
        for key, c in self.components.items():
            mask = self.masks[key]
            if tuple(mask.shape) != c.shape:
                raise MaskError(f"mask {key!r} has shape {tuple(mask.shape)}, expected {c.shape}")
            self.masks[key] = mask.detach().to(device="cpu", dtype=torch.bool)

    # ---- construction

    @classmethod
    def from_masks(
        cls, bridge: TransformerBridge, masks: Mapping[str, torch.Tensor], metadata: Mapping | None = None
    ) -> Subnetwork:
        """A subnetwork of ``bridge`` from boolean masks keyed by mask key (all keys of their
        granularities must be present)."""
        if masks_attached(bridge):
            raise MaskError("build subnetworks while no masks are applied to the model")
        granularities = parse_granularities(sorted({_granularity_of(k) for k in masks}))
        components = {c.key: c for c in mask_components(bridge, granularities)}
        return cls(dict(masks), components, model_geometry(bridge), model_id(bridge), dict(metadata or {}))

    @classmethod
    def full(cls, bridge: TransformerBridge, granularities: str | Sequence[str] = DEFAULT_GRANULARITIES) -> Subnetwork:
        """Every entry kept (the full model; the paper's lambda = -inf reference)."""
        comps = mask_components(bridge, granularities)
        return cls.from_masks(bridge, {c.key: torch.ones(c.shape, dtype=torch.bool) for c in comps}, {"kind": "full"})

    @classmethod
    def empty(cls, bridge: TransformerBridge, granularities: str | Sequence[str] = DEFAULT_GRANULARITIES) -> Subnetwork:
        """No entry kept (embeddings, layernorms and biases only; lambda = +inf reference)."""
        comps = mask_components(bridge, granularities)
        return cls.from_masks(bridge, {c.key: torch.zeros(c.shape, dtype=torch.bool) for c in comps}, {"kind": "empty"})

    # ---- sizes

    @property
    def granularities(self) -> tuple[Granularity, ...]:
        return parse_granularities([c.granularity for c in self.components.values()])

    @property
    def n_kept(self) -> int:
        """Mask entries kept (neurons, heads and/or weights)."""
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def n_entries(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    @property
    def density(self) -> float:
        """Kept share of mask entries."""
        return self.n_kept / self.n_entries

    def _weight_counts(self) -> pd.DataFrame:
        """Kept and total weights per (layer, block, matrix), expanding one layer at a time."""
        rows = []
        for layer in range(self.geometry.n_layers):
            weights = expand_to_weight_masks(self.geometry, self.components, self.masks, layers=[layer])
            for key, mask in weights.items():
                mask_key = MaskKey.parse(key)
                rows.append(
                    {
                        "layer": layer,
                        "block": mask_key.block,
                        "matrix": mask_key.kind,
                        "kept_params": int(mask.sum()),
                        "total_params": mask.numel(),
                    }
                )
        return pd.DataFrame(rows)

    def n_params(self) -> int:
        """Weights kept in the paper's unit (attention and MLP matrix entries gated on)."""
        return int(self._weight_counts()["kept_params"].sum())

    def n_params_total(self) -> int:
        """All attention and MLP weight matrix entries (the paper's mask size |M|)."""
        return int(self._weight_counts()["total_params"].sum())

    def layer_distribution(self) -> pd.DataFrame:
        """Per layer and block (attn / mlp): kept weights, the block's size, the share of the
        subnetwork it holds and the fraction of the block kept."""
        table = self._weight_counts().groupby(["layer", "block"], as_index=False)[["kept_params", "total_params"]].sum()
        kept = max(int(table["kept_params"].sum()), 1)
        table["share_of_subnetwork"] = table["kept_params"] / kept
        table["fraction_kept"] = table["kept_params"] / table["total_params"]
        return table

    def summary(self) -> dict:
        """Sizes in one dict (entries, weights kept, total, percent)."""
        counts = self._weight_counts()
        kept, total = int(counts["kept_params"].sum()), int(counts["total_params"].sum())
        return {
            "granularities": ",".join(self.granularities),
            "n_kept": self.n_kept,
            "n_entries": self.n_entries,
            "n_params": kept,
            "n_params_total": total,
            "percent_params": 100.0 * kept / max(total, 1),
        }

    # ---- derived subnetworks

    def _with_masks(self, masks: dict[str, torch.Tensor], note: Mapping) -> Subnetwork:
        return self.with_masks(masks, {**self.metadata, **note})

    def with_masks(self, masks: Mapping[str, Bool[torch.Tensor, ...]], metadata: Mapping) -> Subnetwork:
        """A subnetwork of the same model and components with other ``masks`` (every key) and
        ``metadata`` (replacing this one's)."""
        return Subnetwork(dict(masks), dict(self.components), self.geometry, self.model_id, dict(metadata))

    def complement(self) -> Subnetwork:
        """Every entry this subnetwork drops (what ``applied(mode="ablate")`` keeps)."""
        return self._with_masks({k: ~m for k, m in self.masks.items()}, {"derived": "complement"})

    def random_control(self, seed: int = 0) -> Subnetwork:
        """A random subnetwork with the same kept count in every block, one block per mask key
        at any granularity: each weight matrix (Q, K, V, O, MLP in/out of each layer) for
        weight masks, each layer's neurons or heads."""
        gen = torch.Generator().manual_seed(int(seed))
        masks = {}
        # Sorted keys: the draw must not depend on dict order (a loaded file's order varies).
        for key in sorted(self.masks):
            mask = self.masks[key]
            flat = torch.zeros(mask.numel(), dtype=torch.bool)
            flat[torch.randperm(mask.numel(), generator=gen)[: int(mask.sum())]] = True
            masks[key] = flat.reshape(mask.shape)
        return self._with_masks(masks, {"derived": "random_control", "random_seed": int(seed)})

    def to_weight_masks(self) -> dict[str, Bool[torch.Tensor, "out in"]]:
        """The equivalent weight-level masks (canonical ``[out, in]`` layout) of every matrix."""
        return expand_to_weight_masks(self.geometry, self.components, self.masks)

    # ---- applying

    def check_model(self, bridge: TransformerBridge) -> None:
        """Raise ``MaskError`` unless ``bridge`` is the architecture this subnetwork was made for."""
        if masks_attached(bridge):
            raise MaskError("masks are already applied to this model; exit the other `with` block first")
        found = model_id(bridge)
        if found != self.model_id:
            raise MaskError(
                f"subnetwork was made for model {self.model_id}, not {found}; load the model it was found on"
            )

    @contextlib.contextmanager
    def applied(self, bridge: TransformerBridge, mode: RunMode = "keep") -> Iterator:
        """Run ``bridge`` with only this subnetwork (``mode="keep"``) or without it
        (``mode="ablate"``, keeping the complement) inside the block; yields the bridge.
        (:func:`bigram_circuits.masks.apply_binary_masks`, which checks ``mode``: one application
        per bridge at a time.)"""
        self.check_model(bridge)
        with apply_binary_masks(bridge, self.masks, mode, list(self.components.values())):
            yield bridge

    # ---- files

    def _file_bytes(self) -> dict[str, bytes]:
        """The saved files, name -> bytes (``masks.safetensors``, ``subnetwork.json``)."""
        from safetensors.torch import save as safetensors_bytes

        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_id": self.model_id,
            "geometry": self.geometry.to_dict(),
            "components": [c.to_dict() for c in self.components.values()],
            "summary": self.summary(),
            "metadata": _jsonable(self.metadata),
        }
        return {
            MASKS_FILE: safetensors_bytes({k: m.contiguous() for k, m in self.masks.items()}),
            META_FILE: json.dumps(meta, indent=2).encode("utf-8"),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``masks.safetensors`` and ``subnetwork.json`` into ``directory`` (atomically)."""
        directory = ensure_output_dir(directory)
        for name, data in self._file_bytes().items():
            atomic_write_bytes(directory / name, data)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Subnetwork:
        """Read a subnetwork saved by :meth:`save`."""
        from safetensors import SafetensorError
        from safetensors.torch import load as safetensors_load

        directory = Path(directory)
        meta_path, masks_path = directory / META_FILE, directory / MASKS_FILE
        if not meta_path.exists() or not masks_path.exists():
            raise MaskError(f"{directory} is not a saved subnetwork (needs {META_FILE} and {MASKS_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            masks = safetensors_load(masks_path.read_bytes())
        except (json.JSONDecodeError, SafetensorError, UnicodeDecodeError) as exc:
            raise MaskError(f"{directory} holds a corrupt subnetwork ({type(exc).__name__}); save it again") from exc
        if meta.get("format") != FORMAT:
            raise MaskError(f"{meta_path} is not a bigram_circuits subnetwork file")
        components = {c["key"]: MaskComponent.from_dict(c) for c in meta["components"]}
        return cls(
            masks, components, ModelGeometry.from_dict(meta["geometry"]), meta["model_id"], meta.get("metadata", {})
        )

    # ---- Hugging Face Hub

    def model_card(self, repo_id: str | None = None) -> str:
        """The ``README.md`` that :meth:`save_pretrained` writes (:func:`bigram_circuits.hub.model_card`)."""
        return model_card(
            model_id=self.model_id,
            metadata=self.metadata,
            summary=self.summary(),
            layer_table=self.layer_distribution(),
            repo_id=repo_id,
        )

    def _pretrained_files(self, repo_id: str | None) -> dict[str, bytes]:
        return {**self._file_bytes(), MODEL_CARD_FILE: self.model_card(repo_id).encode("utf-8")}

    def save_pretrained(self, directory: str | os.PathLike, repo_id: str | None = None) -> Path:
        """Write a Hub-style folder: :meth:`save`'s ``masks.safetensors`` and ``subnetwork.json``
        plus a ``README.md`` model card (``repo_id`` goes into its loading example). Each file is
        written atomically; :meth:`from_pretrained` and :meth:`load` read the folder."""
        directory = ensure_output_dir(directory)
        for name, data in self._pretrained_files(repo_id).items():
            atomic_write_bytes(directory / name, data)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_directory: str | os.PathLike,
        revision: str | None = None,
        *,
        bridge: TransformerBridge | None = None,
        filename: str | None = None,
        lam: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
    ) -> Subnetwork:
        """Load a subnetwork from a local folder or a Hugging Face Hub repo id (through the HF
        cache: with ``HF_HUB_OFFLINE=1`` a cached snapshot loads without the network).

        A folder or repo with ``subnetwork.json`` + ``masks.safetensors`` (:meth:`save_pretrained`)
        loads as :meth:`load`; with ``bridge`` it is checked against that model at once
        (:meth:`check_model`, as :meth:`applied` does). A repo in the paper authors' layout
        (``tylerachang/bigram-subnetworks-*``: mask pickles ``subnetwork_dict_lambda{lambda}.pickle``
        in the root) needs ``bridge`` and is read through the restricted unpickler: ``filename``
        picks a pickle, else ``lam`` (e.g. ``lam=1`` for ``..._lambda1.pickle``), else the only
        one, else the largest lambda, as the authors' loader does
        (:func:`bigram_circuits.hub.pick_author_file`). Hub failures raise ``HubError``.
        """
        files = resolve_repo(repo_id_or_directory, revision, cache_dir=cache_dir, token=token)
        if META_FILE in files.names and MASKS_FILE in files.names and filename is None:
            meta_path, masks_path = files.fetch(META_FILE), files.fetch(MASKS_FILE)
            if meta_path.parent != masks_path.parent:  # both come from one snapshot; be safe anyway
                raise MaskError(f"{files.source}: {META_FILE} and {MASKS_FILE} resolved to different snapshots")
            subnetwork = cls.load(meta_path.parent)
            if bridge is not None:
                subnetwork.check_model(bridge)
            return subnetwork
        name = pick_author_file(files.names, filename, lam)
        if bridge is None:
            raise MaskError(
                f"{files.source} holds the authors' mask pickles ({name}); pass bridge= the model they were made for"
            )
        source = {"source_repo": files.source, "source_file": name, "source_revision": files.revision}
        return cls.from_author_dict(load_author_pickle(files.fetch(name)), bridge, source)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
    ) -> str:
        """Upload :meth:`save_pretrained`'s files (``masks.safetensors``, ``subnetwork.json``,
        ``README.md``) to the Hub model repo ``repo_id`` in one commit, creating the repo if needed
        (``huggingface_hub.HfApi.create_repo`` + ``create_commit``). ``token`` defaults to the
        saved login (`hf auth login`) or ``HF_TOKEN``. Returns the commit URL."""
        message = commit_message or f"Upload bigram subnetwork ({self.summary()['percent_params']:.3g}% of weights)"
        return push_files(
            repo_id,
            self._pretrained_files(repo_id),
            private=private,
            token=token,
            commit_message=message,
            revision=revision,
        )

    # ---- authors' mask dicts

    def to_author_dict(self, orig_model_name: str | None = None) -> dict:
        """``{HF parameter name: numpy bool array}`` in the HF layout, as the authors release
        (neuron/head masks are expanded to the weights they gate), plus ``orig_model_name``."""
        out: dict = weight_masks_to_author_dict(self.geometry, self.to_weight_masks())
        name = orig_model_name or self.metadata.get("model_name")
        if name:
            out[AUTHOR_NAME_KEY] = str(name)
        return out

    def save_author_pickle(self, path: str | os.PathLike, orig_model_name: str | None = None) -> Path:
        """Write :meth:`to_author_dict` as a pickle the authors' loading code reads."""
        path = Path(path)
        atomic_write_bytes(path, pickle.dumps(self.to_author_dict(orig_model_name), protocol=pickle.HIGHEST_PROTOCOL))
        return path

    @classmethod
    def from_author_dict(
        cls, author: Mapping, bridge: TransformerBridge, metadata: Mapping | None = None
    ) -> Subnetwork:
        """A weight-granularity subnetwork of ``bridge`` from an authors'-format mask dict."""
        geometry = model_geometry(bridge)
        arrays = {k: v for k, v in author.items() if k != AUTHOR_NAME_KEY}
        for name, value in arrays.items():
            if not isinstance(value, np.ndarray) or not (value.dtype == bool or np.issubdtype(value.dtype, np.integer)):
                raise MaskError(f"mask dict entry {name!r} is not a numpy bool array; is this an authors' mask dict?")
        weight_masks = author_dict_to_weight_masks(geometry, arrays)
        ignored = sorted(set(arrays) - set(author_parameter_names(geometry).values()))
        info = {"source": "author_dict", "ignored_parameters": ignored}
        if isinstance(author.get(AUTHOR_NAME_KEY), str):
            info["model_name"] = author[AUTHOR_NAME_KEY]
        return cls.from_masks(bridge, weight_masks, {**info, **dict(metadata or {})})

    @classmethod
    def from_author_pickle(cls, path: str | os.PathLike, bridge: TransformerBridge) -> Subnetwork:
        """Load an authors' released mask pickle for ``bridge`` (restricted unpickler)."""
        return cls.from_author_dict(load_author_pickle(path), bridge, {"source_file": str(path)})


def _granularity_of(key: str) -> str:
    with contextlib.suppress(MaskError):
        return granularity_of_key(key).name
    # Not a mask key, but shaped like one of a granularity: reported as not matching the components.
    for granularity, suffix in (("neuron", ".mlp.hook_post"), ("head", ".attn.hook_z"), ("weight", ".weight")):
        if key.endswith(suffix):
            return granularity
    return MaskKey.parse(key).granularity  # raises MaskError("unknown mask key ...")
