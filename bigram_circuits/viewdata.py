"""The tables behind the subnetwork viewer: one or two subnetworks as DataFrames.

:func:`view_tables` turns subnetworks into plain DataFrames that the plotting layer draws
(:func:`bigram_circuits.plots.view`; the application layer's :func:`bigram_circuits.app.view.view`
does both steps). Sizes are in the paper's unit: neuron and head masks are expanded to the
weights they gate, one layer at a time. The overlap of two subnetworks per block is tested
against the exact null of :mod:`bigram_circuits.circuits.overlap` (random pairs keeping the same
count in the block), and overall with :func:`~bigram_circuits.circuits.overlap.overlap`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bigram_circuits.circuits.overlap import block_counts, null_overlap_samples, overlap
from bigram_circuits.errors import MaskError
from bigram_circuits.masks import MaskKey, expand_to_weight_masks
from bigram_circuits.subnetwork import Subnetwork

__all__ = ["MATRIX_ORDER", "view_tables"]

# Weight matrices in reading order (a gated MLP adds "gate").
MATRIX_ORDER = ("q", "k", "v", "o", "in", "gate", "out")
_SCALAR = (int, float, bool, str, np.generic)


def _weight_tables(sub: Subnetwork, name: str) -> tuple[list[dict], list[pd.DataFrame], list[pd.DataFrame]]:
    """Per-matrix counts, and kept fraction of every output row and input column ([out, in])."""
    matrices, rows, columns = [], [], []
    for layer in range(sub.geometry.n_layers):
        weights = expand_to_weight_masks(sub.geometry, sub.components, sub.masks, layers=[layer])
        for key, mask in weights.items():
            kind, block = MaskKey.parse(key).kind, MaskKey.parse(key).block
            kept = mask.float()
            matrices.append(
                {
                    "subnetwork": name,
                    "layer": layer,
                    "block": block,
                    "matrix": kind,
                    "shape": f"{mask.shape[0]} x {mask.shape[1]}",
                    "kept_params": int(mask.sum()),
                    "total_params": mask.numel(),
                    "fraction_kept": float(kept.mean()),
                }
            )
            for axis, out, label in ((1, rows, "row"), (0, columns, "column")):
                fraction = kept.mean(dim=axis).numpy()
                out.append(
                    pd.DataFrame(
                        {
                            "subnetwork": name,
                            "layer": layer,
                            "matrix": kind,
                            label: np.arange(fraction.size),
                            "fraction_kept": fraction,
                        }
                    )
                )
    return matrices, rows, columns


def _units(sub: Subnetwork, name: str) -> list[dict]:
    """Which neurons / heads a neuron or head mask keeps."""
    found = []
    for key, component in sub.components.items():
        if component.granularity in ("neuron", "head"):
            for unit, kept in enumerate(sub.masks[key].tolist()):
                found.append(
                    {
                        "subnetwork": name,
                        "layer": component.layer,
                        "kind": component.granularity,
                        "unit": unit,
                        "kept": bool(kept),
                    }
                )
    return found


def _metrics(sub: Subnetwork, name: str) -> list[dict]:
    """The summary, lambda and every scalar metric recorded with the subnetwork."""
    values: dict[str, object] = dict(sub.summary())
    config = sub.metadata.get("config") if isinstance(sub.metadata.get("config"), dict) else {}
    if "lam" in config:
        values["lambda"] = config["lam"]
    metrics = sub.metadata.get("metrics") if isinstance(sub.metadata.get("metrics"), dict) else {}
    values.update({k: v for k, v in metrics.items() if isinstance(v, _SCALAR) and k not in values})
    values["model_id"] = sub.model_id
    model = sub.metadata.get("model_name") or sub.metadata.get("model")
    if model:
        values["model"] = str(model)
    return [
        {"subnetwork": name, "metric": k, "value": v if isinstance(v, str) else float(v)} for k, v in values.items()
    ]


def _overlap_tables(a: Subnetwork, b: Subnetwork, n_random: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per block: kept in A, in B, in both, the null's mean and the share of random pairs with at
    least as much overlap; and the overall :func:`overlap` row."""
    if a.model_id != b.model_id:
        raise MaskError(f"cannot compare subnetworks of different models ({a.model_id} vs {b.model_id})")
    masks_a, masks_b = a.masks, b.masks
    if set(masks_a) != set(masks_b):  # different granularities: compare the weights they keep
        masks_a, masks_b = a.to_weight_masks(), b.to_weight_masks()
    counts = block_counts(masks_a, masks_b)
    rows = []
    for i, key in enumerate(counts.names):
        mask_key = MaskKey.parse(key)
        size, kept_a, kept_b, both = (int(x[i]) for x in (counts.size, counts.kept_a, counts.kept_b, counts.kept_both))
        null = null_overlap_samples(
            counts.size[i : i + 1], counts.kept_a[i : i + 1], counts.kept_b[i : i + 1], n_random, seed
        )
        expected = kept_a * kept_b / size if size else 0.0
        rows.append(
            {
                "key": key,
                "layer": mask_key.layer,
                "matrix": mask_key.kind,
                "size": size,
                "kept_a": kept_a,
                "kept_b": kept_b,
                "kept_both": both,
                "expected": expected,
                "null_std": float(null.std()),
                "ratio": both / expected if expected > 0 else float("nan"),
                "p_value": float(np.mean(null >= both)),
                "n_random": n_random,
            }
        )
    total = overlap(masks_a, masks_b, n_random=n_random, seed=seed).to_dict()
    table = pd.DataFrame(rows)
    order = {kind: i for i, kind in enumerate((*MATRIX_ORDER, "head", "neuron"))}
    table = table.sort_values(["layer", "matrix"], key=lambda c: c.map(order) if c.name == "matrix" else c)
    return table.reset_index(drop=True), pd.DataFrame([total])


def view_tables(
    a: Subnetwork,
    b: Subnetwork | None = None,
    *,
    names: Sequence[str] = ("A", "B"),
    n_random: int = 2_000,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """DataFrames describing subnetwork ``a`` (and ``b``), keyed by table name:

    - ``matrices``: subnetwork, layer, block, matrix (q, k, v, o, in, gate, out), shape,
      kept_params, total_params, fraction_kept (weights gated, the heatmap);
    - ``rows`` / ``columns``: kept fraction of every output row / input column of every matrix
      (canonical ``[out, in]`` layout; the drill-down);
    - ``units``: for neuron / head masks, every unit and whether it is kept;
    - ``metrics``: subnetwork, metric, value (sizes, lambda, the metrics measured on the mask);
    - with ``b``: ``overlap`` (per block: kept in A, B and both, the exact null's mean ``expected``
      and std, ``ratio``, ``p_value`` from ``n_random`` random pairs) and ``overlap_total`` (one
      :func:`~bigram_circuits.circuits.overlap.overlap` row). Subnetworks of different
      granularities are compared on the weights they gate.

    ``table.attrs["names"]`` of ``matrices`` lists the subnetworks' names in order.
    """
    subs = [a] if b is None else [a, b]
    if len(names) < len(subs) or len(set(names[: len(subs)])) != len(subs):
        raise MaskError(f"give {len(subs)} distinct names for the subnetworks, got {list(names)}")
    matrices, rows, columns, units, metrics = [], [], [], [], []
    for sub, name in zip(subs, names):
        if not isinstance(sub, Subnetwork):
            raise MaskError(f"view_tables needs Subnetworks, got {type(sub).__name__}; load one with Subnetwork.load")
        m, r, c = _weight_tables(sub, name)
        matrices += m
        rows += r
        columns += c
        units += _units(sub, name)
        metrics += _metrics(sub, name)
    tables = {
        "matrices": pd.DataFrame(matrices),
        "rows": pd.concat(rows, ignore_index=True),
        "columns": pd.concat(columns, ignore_index=True),
        "units": pd.DataFrame(units, columns=["subnetwork", "layer", "kind", "unit", "kept"]),
        "metrics": pd.DataFrame(metrics),
    }
    if b is not None:
        tables["overlap"], tables["overlap_total"] = _overlap_tables(a, b, n_random, seed)
    tables["matrices"].attrs["names"] = list(names[: len(subs)])
    return tables
