"""A minimal stand-in for ``Subnetwork`` in the circuits tests: head / neuron masks of any layers.

It follows the contract of ``bigram_circuits.subnetwork.Subnetwork`` that the circuits code uses
(``bigram_circuits.circuits.runs.MaskedSubnetwork``: ``masks`` keyed by ``MaskKey`` strings,
``blocks.{L}.attn.hook_z`` -> [n_heads] and ``blocks.{L}.mlp.hook_post`` -> [d_mlp],
``metadata``, ``with_masks(masks, metadata)`` and ``applied(bridge, mode)``), so the circuits code
is tested independently of the search. It is applied the way every mask is
(``bigram_circuits.masks.apply_binary_masks``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bigram_circuits.masks import MaskKey, RunMode, apply_binary_masks


@dataclass
class MaskedUnits:
    masks: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    def with_masks(self, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> MaskedUnits:
        return MaskedUnits(dict(masks), dict(metadata))

    @contextlib.contextmanager
    def applied(self, bridge: Any, mode: RunMode = "keep") -> Iterator[Any]:
        with apply_binary_masks(bridge, self.masks, mode):
            yield bridge


def random_units(bridge: Any, keep_fraction: float = 0.5, seed: int = 0) -> MaskedUnits:
    """Keep a random fraction of every layer's heads and neurons."""
    generator = torch.Generator().manual_seed(seed)
    cfg = bridge.cfg
    masks = {}
    for layer in range(cfg.n_layers):
        masks[str(MaskKey.head(layer))] = torch.rand(cfg.n_heads, generator=generator) < keep_fraction
        masks[str(MaskKey.neuron(layer))] = torch.rand(cfg.d_mlp, generator=generator) < keep_fraction
    return MaskedUnits(masks)
