"""A minimal stand-in for ``Subnetwork`` in the circuits tests: head / neuron masks applied by hooks.

It follows the contract of ``bigram_circuits.subnetwork.Subnetwork`` (``masks`` keyed
``blocks.{L}.attn.hook_z`` -> [n_heads] and ``blocks.{L}.mlp.hook_post`` -> [d_mlp],
``applied(bridge, mode)``), so the circuits code is tested independently of the search.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class MaskedUnits:
    masks: dict[str, torch.Tensor]
    granularities: tuple[str, ...] = ("neuron", "head")
    model_id: str = "test"
    metadata: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def applied(self, bridge, mode: str = "keep"):
        hooks = []
        for key, mask in self.masks.items():
            gate = (mask if mode == "keep" else ~mask).float()
            is_head = key.endswith("hook_z")

            def hook(act, hook, gate=gate, is_head=is_head):
                return act * (gate[:, None] if is_head else gate)

            hooks.append((key, hook))
        with bridge.hooks(fwd_hooks=hooks):
            yield bridge


def random_units(bridge, keep_fraction: float = 0.5, seed: int = 0) -> MaskedUnits:
    """Keep a random fraction of every layer's heads and neurons."""
    generator = torch.Generator().manual_seed(seed)
    cfg = bridge.cfg
    masks = {}
    for layer in range(cfg.n_layers):
        masks[f"blocks.{layer}.attn.hook_z"] = (
            torch.rand(cfg.n_heads, generator=generator) < keep_fraction
        )
        masks[f"blocks.{layer}.mlp.hook_post"] = (
            torch.rand(cfg.d_mlp, generator=generator) < keep_fraction
        )
    return MaskedUnits(masks)
