"""A new granularity defined here alone (one mask per whole attention or MLP block) works in the
search, ``Subnetwork`` (save/load, complement, random control, sizes), overlap and the layer
distribution with no edit to the library: the proof that granularities are one registry."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from bigram_circuits.circuits.overlap import layer_distribution, overlap
from bigram_circuits.data import tokenize_documents
from bigram_circuits.errors import MaskError
from bigram_circuits.masks import (
    ATTN_MATRICES,
    MLP_MATRICES,
    GranularitySpec,
    MaskComponent,
    MaskKey,
    mask_components,
    parse_granularities,
    parse_mask_key,
    register_granularity,
    unregister_granularity,
)
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import DEFAULT_LR, SearchConfig, Target, search
from bigram_circuits.subnetwork import Subnetwork

# ---- the new granularity (everything it takes)

_BLOCK_KEY = re.compile(r"blocks\.(0|[1-9][0-9]*)\.(attn|mlp)\.hook_out")


@dataclass(frozen=True, order=True)
class BlockKey:
    """The typed key of one layer's attention or MLP block."""

    layer: int
    block: str

    def __str__(self) -> str:
        return f"blocks.{self.layer}.{self.block}.hook_out"


class BlockGranularity(GranularitySpec):
    """One entry per attention or MLP block, multiplying the block's output."""

    name = "block"
    default_lr = 0.05

    def components(self, bridge, geometry):
        g = geometry
        sizes = {
            "attn": g.d_model * g.d_head * (2 * g.n_heads + 2 * g.n_kv_heads),
            "mlp": g.d_model * g.d_mlp * (3 if g.gated_mlp else 2),
        }
        return [
            MaskComponent(str(BlockKey(layer, block)), self.name, layer, block, "block", (1,), float(size))
            for layer in range(g.n_layers)
            for block, size in sizes.items()
        ]

    def parse_key(self, text):
        found = _BLOCK_KEY.fullmatch(text)
        return BlockKey(int(found.group(1)), found.group(2)) if found else None

    def attach(self, component, mask_of, attachment):
        return attachment.hook(component.key, lambda act, hook: act * mask_of().to(act.device, act.dtype))

    def expand(self, key, mask, geometry):
        return {str(MaskKey.weight(key.layer, kind)): mask.reshape(1, 1) for kind in self.weight_kinds(key)}

    def weight_kinds(self, key):
        return ATTN_MATRICES if key.block == "attn" else MLP_MATRICES


# ---- the proof


@pytest.fixture(scope="module", autouse=True)
def block_granularity():
    spec = register_granularity(BlockGranularity())
    yield spec
    unregister_granularity("block")


def _blocks(bridge, keep: dict[str, bool]) -> Subnetwork:
    masks = {c.key: torch.tensor([keep.get(c.key, False)]) for c in mask_components(bridge, "block")}
    return Subnetwork.from_masks(bridge, masks, {"note": "blocks"})


def test_registry_knows_the_new_granularity(tiny_neox):
    bridge, _ = tiny_neox
    assert parse_granularities("Block,head") == ("head", "block") and DEFAULT_LR["block"] == 0.05
    assert parse_mask_key("blocks.1.mlp.hook_out") == BlockKey(1, "mlp")
    components = mask_components(bridge, ("block", "neuron"))
    assert [c.granularity for c in components[:3]] == ["neuron", "block", "block"]
    with pytest.raises(MaskError, match="already registered"):
        register_granularity(BlockGranularity())


def test_subnetwork_files_controls_and_sizes(tiny_neox, tmp_path):
    bridge, _ = tiny_neox
    sub = _blocks(bridge, {"blocks.0.attn.hook_out": True, "blocks.1.mlp.hook_out": True})
    loaded = Subnetwork.load(sub.save(tmp_path / "sub"))
    assert loaded.granularities == ("block",) and all(torch.equal(loaded.masks[k], m) for k, m in sub.masks.items())
    assert sub.n_params_total() == Subnetwork.full(bridge, "weight").n_params_total()
    attn0 = sub.components["blocks.0.attn.hook_out"].params_per_entry
    mlp1 = sub.components["blocks.1.mlp.hook_out"].params_per_entry
    assert sub.n_params() == attn0 + mlp1
    assert sub.complement().n_params() == sub.n_params_total() - sub.n_params()
    assert sub.random_control(seed=3).n_kept == sub.n_kept
    tokens = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = bridge(tokens)
        with Subnetwork.full(bridge, "block").applied(bridge):
            assert torch.equal(bridge(tokens), full)
        with sub.applied(bridge):
            assert not torch.allclose(bridge(tokens), full)


def test_overlap_and_layer_distribution(tiny_neox):
    bridge, _ = tiny_neox
    a = _blocks(bridge, {"blocks.0.attn.hook_out": True, "blocks.1.mlp.hook_out": True})
    b = _blocks(bridge, {"blocks.0.attn.hook_out": True})
    result = overlap(a, b, n_random=100)
    assert (result.n_kept_a, result.n_kept_b, result.n_overlap) == (2, 1, 1)
    table = layer_distribution(a).set_index(["layer", "component"])
    assert table.loc[(0, "attn"), "fraction_kept"] == 1.0 and table.loc[(0, "mlp"), "kept_params"] == 0
    assert table.loc[(1, "mlp"), "kept_params"] == a.components["blocks.1.mlp.hook_out"].params_per_entry
    sizes = {k: c.params_per_entry for k, c in a.components.items()}
    per_entry = layer_distribution(a.masks, params_per_entry=sizes).set_index(["layer", "component"])
    assert per_entry.loc[(1, "mlp"), "kept_params"] == table.loc[(1, "mlp"), "kept_params"]


def test_search_on_the_new_granularity(tiny_neox, tiny_text, tmp_path):
    bridge, tokenizer = tiny_neox
    windows = tokenize_documents(tiny_text, tokenizer, show_progress=False).windows(seq_len=24)
    stats = BigramStats.from_tokens(windows, len(tokenizer), seq_len=24, show_progress=False)
    config = SearchConfig(batch_size=8, seq_len=24, max_steps=6, stability_check=False, lam=1.0)
    result = search(bridge, windows, Target.bigram(stats), "block", config, tmp_path / "run", show_progress=False)
    assert result.subnetwork.granularities == ("block",)
    assert set(result.subnetwork.masks) == {c.key for c in mask_components(bridge, "block")}
    again = Subnetwork.load(tmp_path / "run")
    assert again.n_params() == result.subnetwork.n_params()
