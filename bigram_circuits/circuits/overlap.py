"""Overlap between two subnetworks, tested against a random null with the same per-block shape.

The paper (Table 3) compares the bigram subnetwork with the "optimal" subnetwork of the same
model: overlap = |A & B| / |M| over all mask entries M, the expected overlap of random pairs
that keep the same number of entries in every block (each Q, K, V, O, MLP-in and MLP-out
matrix of each layer), the share of random pairs at least as large (p-value), and the share
of A contained in B.

The null is sampled exactly but without drawing masks: within one block of n entries, the
overlap of two independent uniform random subsets of sizes a and b follows the hypergeometric
distribution (b draws from n entries of which a are "good"); blocks are independent, so a
random pair's total overlap is a sum of per-block hypergeometric draws. Its mean is
sum(a * b / n) over blocks.

A candidate circuit (heads and neurons, a :class:`~bigram_circuits.circuits.ablation.Candidate`)
is compared with a base subnetwork the same way, as the weights it uses
(:func:`candidate_weight_masks`): :func:`circuit_overlap` (overlap, null, and the share of the
circuit the base keeps against random heads) and :func:`circuit_placement` (per layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Integer
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.circuits.ablation import Candidate, _unit_as_weight_masks
from bigram_circuits.circuits.candidates import head_label
from bigram_circuits.errors import ConfigError, MaskError
from bigram_circuits.masks import (
    MaskComponent,
    MaskKey,
    ModelGeometry,
    expand_to_weight_masks,
    granularity_of_key,
    model_geometry,
    parse_mask_key,
)

__all__ = [
    "BlockCounts",
    "HasMasks",
    "OverlapResult",
    "WeightExpandable",
    "block_counts",
    "candidate_weight_masks",
    "circuit_overlap",
    "circuit_placement",
    "layer_distribution",
    "null_overlap_samples",
    "overlap",
    "overlap_table",
]

# numpy's hypergeometric sampler accepts populations below this size only.
_MAX_BLOCK_ENTRIES = 10**9


@runtime_checkable
class HasMasks(Protocol):
    """Anything holding boolean masks by mask key (a :class:`~bigram_circuits.subnetwork.Subnetwork`,
    any :class:`~bigram_circuits.circuits.runs.MaskedSubnetwork`); overlap also takes the dict itself."""

    masks: Mapping[str, torch.Tensor]


@runtime_checkable
class WeightExpandable(HasMasks, Protocol):
    """A subnetwork whose masks expand exactly to the weights they gate (a
    :class:`~bigram_circuits.subnetwork.Subnetwork`): what the exact :func:`layer_distribution`
    and the base of :func:`circuit_overlap` / :func:`circuit_placement` need."""

    geometry: ModelGeometry
    components: Mapping[str, MaskComponent]

    def to_weight_masks(self) -> dict[str, torch.Tensor]:
        """The equivalent weight-level masks of every matrix."""
        ...

    def layer_distribution(self) -> pd.DataFrame:
        """Kept weights per layer and block (attn / mlp), with ``share_of_subnetwork`` and ``fraction_kept``."""
        ...


@dataclass(frozen=True)
class BlockCounts:
    """Per-block entry counts of two subnetworks: block size n, kept in A, kept in B, kept in both."""

    names: list[str]
    size: Integer[np.ndarray, " n_blocks"]
    kept_a: Integer[np.ndarray, " n_blocks"]
    kept_b: Integer[np.ndarray, " n_blocks"]
    kept_both: Integer[np.ndarray, " n_blocks"]


@dataclass(frozen=True)
class OverlapResult:
    """Overlap of subnetworks A and B, and its random null (fractions are of all mask entries)."""

    n_entries: int
    n_kept_a: int
    n_kept_b: int
    n_overlap: int
    fraction_overlap: float  # |A & B| / |M|
    frac_a_in_b: float  # |A & B| / |A|
    expected: float  # analytic mean of the null, as a fraction of |M|
    expected_sampled: float  # mean of the sampled null, as a fraction of |M|
    null_std: float  # std of the sampled null, as a fraction of |M|
    expected_frac_a_in_b: float  # expected / (|A| / |M|)
    ratio: float  # fraction_overlap / expected
    p_value: float  # share of random pairs with an overlap at least |A & B|
    n_random: int

    @property
    def p_value_text(self) -> str:
        """The p-value as the paper writes it: ``< 1/n_random`` when no random pair reached it."""
        if self.p_value == 0.0:
            return f"< {1.0 / self.n_random:.0e}"
        return f"{self.p_value:.2g}"

    def to_dict(self) -> dict[str, float | int | str]:
        """A flat dict (one table row), including ``p_value_text``."""
        row: dict[str, float | int | str] = asdict(self)
        row["p_value_text"] = self.p_value_text
        return row


def _masks_of(subnetwork: Any) -> Mapping[str, torch.Tensor]:
    masks = subnetwork.masks if isinstance(subnetwork, HasMasks) else subnetwork
    if not isinstance(masks, Mapping):
        raise MaskError("expected a Subnetwork or a dict of boolean masks; pass subnetwork.masks")
    return masks


def block_counts(a, b) -> BlockCounts:
    """Count entries, kept entries and shared kept entries of subnetworks ``a`` and ``b`` per block.

    A block is one mask key: one weight matrix (Q, K, V, O, MLP in/out of a layer), or one
    layer's neurons or heads, the unit within which ``Subnetwork.random_control`` shuffles.
    """
    masks_a, masks_b = _masks_of(a), _masks_of(b)
    if set(masks_a) != set(masks_b):
        only_a = sorted(set(masks_a) - set(masks_b))[:3]
        only_b = sorted(set(masks_b) - set(masks_a))[:3]
        raise MaskError(
            f"subnetworks mask different components (only in A: {only_a}, only in B: {only_b}); "
            "compare subnetworks of the same model and granularity"
        )
    if not masks_a:
        raise MaskError("subnetworks have no masks; compare non-empty mask sets")
    names: list[str] = []
    size: list[int] = []
    kept_a: list[int] = []
    kept_b: list[int] = []
    kept_both: list[int] = []
    for key in sorted(masks_a):
        ma = torch.as_tensor(masks_a[key]).bool()
        mb = torch.as_tensor(masks_b[key]).bool()
        if ma.shape != mb.shape:
            raise MaskError(
                f"mask {key!r} has shape {tuple(ma.shape)} in A and {tuple(mb.shape)} in B; "
                "compare subnetworks of the same model"
            )
        names.append(key)
        size.append(ma.numel())
        kept_a.append(int(ma.sum()))
        kept_b.append(int(mb.sum()))
        kept_both.append(int((ma & mb).sum()))
    return BlockCounts(
        names=names,
        size=np.asarray(size, dtype=np.int64),
        kept_a=np.asarray(kept_a, dtype=np.int64),
        kept_b=np.asarray(kept_b, dtype=np.int64),
        kept_both=np.asarray(kept_both, dtype=np.int64),
    )


def null_overlap_samples(
    size: Integer[np.ndarray, " n_blocks"],
    kept_a: Integer[np.ndarray, " n_blocks"],
    kept_b: Integer[np.ndarray, " n_blocks"],
    n_random: int = 10_000,
    seed: int = 0,
    chunk: int = 2_000,
) -> Integer[np.ndarray, " n_random"]:
    """Total overlap (entry count) of ``n_random`` random pairs with the given per-block kept counts.

    Equivalent to drawing, in every block, a uniform random subset of ``kept_a`` and one of
    ``kept_b`` entries and counting shared entries, summed over blocks.
    """
    size = np.asarray(size, dtype=np.int64)
    kept_a = np.asarray(kept_a, dtype=np.int64)
    kept_b = np.asarray(kept_b, dtype=np.int64)
    if n_random < 1:
        raise ConfigError(f"n_random must be positive, got {n_random}; pass n_random >= 1")
    if np.any(kept_a > size) or np.any(kept_b > size) or np.any(kept_a < 0) or np.any(kept_b < 0):
        raise MaskError("kept counts must lie between 0 and the block size")
    if np.any(size >= _MAX_BLOCK_ENTRIES):
        raise MaskError(f"a block has {int(size.max())} entries; the null supports blocks below 1e9")
    rng = np.random.default_rng(seed)
    # Blocks where one side keeps nothing or everything have a fixed overlap; skip sampling them.
    fixed = (kept_a == 0) | (kept_b == 0) | (kept_a == size) | (kept_b == size)
    fixed_total = int(np.sum(np.where(fixed, kept_a * kept_b // np.maximum(size, 1), 0)))
    good, bad, draws = kept_a[~fixed], (size - kept_a)[~fixed], kept_b[~fixed]
    totals = np.empty(n_random, dtype=np.int64)
    for start in range(0, n_random, chunk):
        stop = min(start + chunk, n_random)
        if good.size:
            sample = rng.hypergeometric(good, bad, draws, size=(stop - start, good.size))
            totals[start:stop] = sample.sum(axis=1) + fixed_total
        else:
            totals[start:stop] = fixed_total
    return totals


def overlap(a, b, n_random: int = 10_000, seed: int = 0) -> OverlapResult:
    """Overlap of subnetworks ``a`` and ``b`` (Subnetworks or mask dicts of one granularity).

    ``fraction_overlap`` = |A & B| / |M|; ``expected`` is the analytic null mean
    sum(a_k * b_k / n_k) / |M| over blocks k; ``p_value`` is the share of ``n_random`` random
    pairs (same kept count per block) whose overlap is at least the actual one.
    """
    counts = block_counts(a, b)
    n_entries = int(counts.size.sum())
    n_a, n_b = int(counts.kept_a.sum()), int(counts.kept_b.sum())
    n_overlap = int(counts.kept_both.sum())
    expected_count = float(np.sum(counts.kept_a * counts.kept_b / np.maximum(counts.size, 1)))
    null = null_overlap_samples(counts.size, counts.kept_a, counts.kept_b, n_random=n_random, seed=seed)
    fraction = n_overlap / n_entries
    expected = expected_count / n_entries
    return OverlapResult(
        n_entries=n_entries,
        n_kept_a=n_a,
        n_kept_b=n_b,
        n_overlap=n_overlap,
        fraction_overlap=fraction,
        frac_a_in_b=n_overlap / n_a if n_a else float("nan"),
        expected=expected,
        expected_sampled=float(null.mean()) / n_entries,
        null_std=float(null.std()) / n_entries,
        expected_frac_a_in_b=expected_count / n_a if n_a else float("nan"),
        ratio=fraction / expected if expected > 0 else float("nan"),
        p_value=float(np.mean(null >= n_overlap)),
        n_random=n_random,
    )


def overlap_table(pairs: Mapping[str, tuple[object, object]], n_random: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """One :func:`overlap` row per named pair ``{name: (A, B)}`` (Table 3 of the paper)."""
    rows = []
    for name, (a, b) in pairs.items():
        rows.append({"pair": name, **overlap(a, b, n_random=n_random, seed=seed).to_dict()})
    return pd.DataFrame(rows)


def _kind_of(key: str) -> str:
    """The matrix kind of a weight mask key: q, k, v, o, in, gate, out."""
    return MaskKey.parse(key).kind


def _gated_kinds(key: str) -> tuple[int, tuple[str, ...]]:
    """The layer of any registered mask key and the kinds of weight matrix its entries gate."""
    spec = granularity_of_key(key)
    typed = spec.parse_key_or_raise(key)
    return typed.layer, tuple(spec.weight_kinds(typed))


def _matrix_counts_expanded(subnetwork: WeightExpandable) -> list[tuple[int, str, float, float]]:
    """(layer, matrix kind, kept, total) weights of every matrix some mask gates, exactly."""
    gated: dict[int, set[str]] = {}
    for key in subnetwork.masks:
        layer, kinds = _gated_kinds(key)
        gated.setdefault(layer, set()).update(kinds)
    rows = []
    for layer in sorted(gated):
        weights = expand_to_weight_masks(subnetwork.geometry, subnetwork.components, subnetwork.masks, layers=[layer])
        for key, mask in weights.items():
            kind = _kind_of(key)
            if kind in gated[layer]:
                rows.append((layer, kind, float(mask.sum()), float(mask.numel())))
    return rows


def _matrix_counts_per_entry(
    masks: Mapping[str, torch.Tensor], params_per_entry: Mapping[str, float] | None
) -> list[tuple[int, str, float, float]]:
    """(layer, kind, kept, total) weights from per-entry sizes. An entry's weights are shared
    between the blocks of the matrices it gates in proportion to their number; within attention
    equally between those matrices (a head: Q, K, V, O), within the MLP on its first one."""
    rows = []
    for key, mask in masks.items():
        layer, kinds = _gated_kinds(key)
        if str(parse_mask_key(key)) != str(MaskKey.weight(layer, kinds[0])) and (
            params_per_entry is None or key not in params_per_entry
        ):
            raise MaskError(
                f"mask {key!r} is a neuron/head mask; pass params_per_entry (weights gated per entry) or a Subnetwork"
            )
        weight = 1.0 if params_per_entry is None else float(params_per_entry.get(key, 1.0))
        mask = torch.as_tensor(mask).bool()
        kept, total = float(mask.sum()) * weight, float(mask.numel()) * weight
        blocks: dict[str, list[str]] = {}
        for kind in kinds:
            blocks.setdefault(MaskKey.weight(layer, kind).block, []).append(kind)
        for block, in_block in blocks.items():
            share = len(in_block) / len(kinds)
            if block == "attn":
                rows += [
                    (layer, part, kept * share / len(in_block), total * share / len(in_block)) for part in in_block
                ]
            else:
                rows.append((layer, in_block[0], kept * share, total * share))
    return rows


def layer_distribution(subnetwork, params_per_entry: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Share of kept parameters (paper unit: weights gated) in each layer's MLP and attention.

    For a :class:`~bigram_circuits.subnetwork.Subnetwork` the masks are expanded exactly to
    the weight matrices they gate (one layer at a time). Only matrices that some mask gates
    are counted, so a neuron-only subnetwork is all MLP. For a plain dict of masks,
    ``params_per_entry`` gives the weights one entry gates per key (default 1, weight masks);
    a head's weights are then split equally between Q, K, V and O.

    Columns: layer, component ("mlp" | "attn"), kept_params, total_params, share (of all kept
    weights), fraction_kept, and for attention qk_params / vo_params (Q+K versus V+O weights).
    ``table.attrs`` holds the overall mlp_share, attn_share, qk_share_of_attn and the
    plurality (layer, component).
    """
    if isinstance(subnetwork, WeightExpandable):
        rows = _matrix_counts_expanded(subnetwork)
    else:
        rows = _matrix_counts_per_entry(_masks_of(subnetwork), params_per_entry)
    if not rows:
        raise MaskError("the subnetwork has no masks; nothing to distribute over layers")
    matrices = pd.DataFrame(rows, columns=["layer", "kind", "kept_params", "total_params"])
    matrices["component"] = np.where(matrices["kind"].isin(["q", "k", "v", "o"]), "attn", "mlp")
    matrices["qk_params"] = np.where(matrices["kind"].isin(["q", "k"]), matrices["kept_params"], 0.0)
    matrices["vo_params"] = np.where(matrices["kind"].isin(["v", "o"]), matrices["kept_params"], 0.0)
    table = matrices.groupby(["layer", "component"], as_index=False)[
        ["kept_params", "total_params", "qk_params", "vo_params"]
    ].sum()
    kept_total = float(table["kept_params"].sum())
    table["share"] = table["kept_params"] / kept_total if kept_total else 0.0
    table["fraction_kept"] = table["kept_params"] / table["total_params"]
    mlp = table["component"] == "mlp"
    table.loc[mlp, ["qk_params", "vo_params"]] = float("nan")
    table = table[
        [
            "layer",
            "component",
            "kept_params",
            "total_params",
            "share",
            "fraction_kept",
            "qk_params",
            "vo_params",
        ]
    ]
    attn_kept = float(table.loc[~mlp, "kept_params"].sum())
    top = table.loc[table["kept_params"].idxmax()]
    table.attrs.update(
        {
            "mlp_share": float(table.loc[mlp, "share"].sum()),
            "attn_share": float(table.loc[~mlp, "share"].sum()),
            "qk_share_of_attn": float(table.loc[~mlp, "qk_params"].sum()) / attn_kept if attn_kept else float("nan"),
            "plurality": f"layer {int(top['layer'])} {top['component']}",
        }
    )
    return table


# --------------------------------------------------------------------------- candidate circuits vs a base


def candidate_weight_masks(
    candidate: Candidate, bridge: TransformerBridge, reference: Mapping[str, torch.Tensor]
) -> dict[str, Bool[torch.Tensor, "out in"]]:
    """The weights a candidate uses, as masks over the weight keys of ``reference``
    (canonical ``[out, in]`` layout): a head's W_Q rows and W_O columns and its K/V group's
    W_K/W_V rows; a neuron's MLP input row(s) and output column; plus ``candidate.weights``."""
    out = {key: torch.zeros(tuple(mask.shape), dtype=torch.bool) for key, mask in reference.items()}
    geometry = model_geometry(bridge)
    for key, units in candidate.masks(bridge).items():
        if key in out and not MaskKey.is_unit_key(key):
            out[key] |= units.cpu()
            continue
        for weight_key, grid in _unit_as_weight_masks(key, units.cpu(), reference, geometry).items():
            out[weight_key] |= grid
    return out


def _base_weight_masks(base: Any) -> dict[str, torch.Tensor]:
    if isinstance(base, WeightExpandable):
        return base.to_weight_masks()
    masks = dict(base.masks)
    if any(granularity_of_key(key).name != "weight" for key in masks):
        raise MaskError("the base holds head/neuron masks; pass a Subnetwork (it expands to weights)")
    return masks


def circuit_overlap(
    base: Any,
    candidates: Mapping[str, Candidate],
    bridge: TransformerBridge,
    *,
    base_label: str = "bigram",
    n_random: int = 10_000,
    seeds: Sequence[int] = (0, 1, 2),
    seed: int = 0,
) -> pd.DataFrame:
    """Weight-level overlap of the base subnetwork with each candidate circuit.

    The candidate's weights (:func:`candidate_weight_masks`) are compared with the base's
    weight masks by :func:`~bigram_circuits.circuits.overlap.overlap` (exact per-matrix null).
    Columns: base, candidate, heads, circuit_weights, base_weights, shared_weights,
    fraction_overlap, expected, ratio, p_value, p_value_text, circuit_in_base (share of the
    circuit's weights the base keeps), expected_circuit_in_base (under the null: the base's
    density in the circuit's matrices), random_heads_in_base / _std (the same share for random
    heads, same count per layer, over ``seeds``).
    """
    reference = _base_weight_masks(base)
    rows = []
    for name, candidate in candidates.items():
        circuit = candidate_weight_masks(candidate, bridge, reference)
        result = overlap(reference, circuit, n_random=n_random, seed=seed)
        shares = []
        for control_seed in seeds:
            control = candidate.random_control(bridge, seed=int(control_seed))
            control_masks = candidate_weight_masks(control, bridge, reference)
            kept = sum(int((control_masks[k] & reference[k]).sum()) for k in reference)
            total = sum(int(control_masks[k].sum()) for k in reference)
            shares.append(kept / total if total else float("nan"))
        n_circuit = result.n_kept_b
        rows.append(
            {
                "base": base_label,
                "candidate": name,
                "heads": candidate.n_heads,
                "circuit_weights": n_circuit,
                "base_weights": result.n_kept_a,
                "shared_weights": result.n_overlap,
                "fraction_overlap": result.fraction_overlap,
                "expected": result.expected,
                "ratio": result.ratio,
                "p_value": result.p_value,
                "p_value_text": result.p_value_text,
                "circuit_in_base": result.n_overlap / n_circuit if n_circuit else float("nan"),
                "expected_circuit_in_base": result.expected * result.n_entries / n_circuit
                if n_circuit
                else float("nan"),
                "random_heads_in_base": float(np.mean(shares)) if shares else float("nan"),
                "random_heads_in_base_std": float(np.std(shares, ddof=1)) if len(shares) > 1 else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def circuit_placement(
    base: Any, candidates: Mapping[str, Candidate], bridge: TransformerBridge, *, base_label: str = "bigram"
) -> pd.DataFrame:
    """Per layer: where the base subnetwork's attention weights sit and where each candidate's
    heads sit, with the share of the candidate's weights in that layer that the base keeps.

    Columns: base, layer, base_attn_share (share of the base's kept weights in that layer's
    attention), base_attn_fraction_kept, base_mlp_share, candidate, heads (in that layer),
    head_labels, circuit_weights, circuit_in_base.
    """
    reference = _base_weight_masks(base)
    if not isinstance(base, WeightExpandable):
        raise MaskError("the base needs layer_distribution(); pass a Subnetwork")
    distribution = base.layer_distribution()
    by_block = distribution.set_index(["layer", "block"])
    n_layers = int(bridge.cfg.n_layers)
    rows = []
    for name, candidate in candidates.items():
        circuit = candidate_weight_masks(candidate, bridge, reference)
        for layer in range(n_layers):
            heads = [h for h in candidate.heads if h[0] == layer]
            keys = [k for k in reference if (parsed := MaskKey.try_parse(k)) is not None and parsed.layer == layer]
            n_circuit = sum(int(circuit[k].sum()) for k in keys)
            kept = sum(int((circuit[k] & reference[k]).sum()) for k in keys)

            def share(block: str, column: str, layer: int = layer) -> float:
                key = (layer, block)
                return float(by_block.loc[key, column]) if key in by_block.index else float("nan")

            rows.append(
                {
                    "base": base_label,
                    "layer": layer,
                    "base_attn_share": share("attn", "share_of_subnetwork"),
                    "base_attn_fraction_kept": share("attn", "fraction_kept"),
                    "base_mlp_share": share("mlp", "share_of_subnetwork"),
                    "candidate": name,
                    "heads": len(heads),
                    "head_labels": ", ".join(head_label(*h) for h in heads),
                    "circuit_weights": n_circuit,
                    "circuit_in_base": kept / n_circuit if n_circuit else float("nan"),
                }
            )
    return pd.DataFrame(rows)
