"""Weight-level views: :func:`expand_to_weight_masks` turns any mix of masks of any
granularities into the weight masks they amount to, in the canonical ``[out, in]`` layout
(each granularity expands its own entries; where several cover a weight, all must keep it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Bool

from bigram_circuits.masks.geometry import ModelGeometry, _matrix_shapes
from bigram_circuits.masks.granularities import MaskComponent, get_granularity
from bigram_circuits.masks.vocabulary import ATTN_MATRICES, MLP_MATRICES, MaskKey

__all__ = ["expand_to_weight_masks"]


def expand_to_weight_masks(
    geometry: ModelGeometry,
    components: Mapping[str, MaskComponent],
    masks: Mapping[str, torch.Tensor],
    layers: Sequence[int] | None = None,
) -> dict[str, Bool[torch.Tensor, "out in"]]:
    """Weight-level masks (canonical layout) equivalent to any mix of masks of any granularities
    (each expanded by its :meth:`GranularitySpec.expand`, within its component's layer).

    A neuron keeps its row of each MLP input matrix and its column of the output matrix; a head
    keeps its rows of Q, K, V (for grouped K/V heads: if any of its query heads is kept) and its
    columns of O. Where several granularities cover a weight, it is kept only if all keep it.
    ``layers`` restricts the result to those layers (bounded memory for large models).
    """
    g = geometry
    shapes = _matrix_shapes(g)
    kinds = (*ATTN_MATRICES, *MLP_MATRICES) if g.gated_mlp else (*ATTN_MATRICES, "in", "out")
    layer_set = set(range(g.n_layers) if layers is None else layers)
    out: dict[str, torch.Tensor] = {}
    for layer in sorted(layer_set):
        for kind in kinds:
            out[str(MaskKey.weight(layer, kind))] = torch.ones(shapes[kind], dtype=torch.bool)
    for key, mask in masks.items():
        c = components[key]
        if c.layer not in layer_set:
            continue
        spec = get_granularity(c.granularity)
        for weight_key, gate in spec.expand(spec.parse_key_or_raise(key), mask.to(torch.bool).cpu(), g).items():
            if weight_key in out:  # a matrix this model lacks (an ungated MLP's gate) gates nothing
                out[weight_key] &= gate
    return out
