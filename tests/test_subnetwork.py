"""Subnetwork: apply keep/ablate, sizes in the paper's unit, controls, files, authors' pickles."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from bigram_circuits.errors import MaskError, UnsafeFileError
from bigram_circuits.masks import attach_masks, mask_components
from bigram_circuits.subnetwork import Subnetwork, load_author_pickle


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(seed))


def _random_subnetwork(bridge, granularities, p: float = 0.5, seed: int = 0) -> Subnetwork:
    gen = torch.Generator().manual_seed(seed)
    masks = {c.key: torch.rand(c.shape, generator=gen) < p for c in mask_components(bridge, granularities)}
    return Subnetwork.from_masks(bridge, masks, {"model_name": "tiny", "config": {"lam": 1.0}})


def test_keep_and_ablate(tiny_neox):
    bridge, _ = tiny_neox
    sub = _random_subnetwork(bridge, ("neuron", "head"))
    tokens = _tokens()
    with torch.no_grad():
        with sub.applied(bridge, mode="keep"):
            kept = bridge(tokens)
        with attach_masks(bridge, list(sub.components.values()), lambda k: sub.masks[k].float()):
            by_hand = bridge(tokens)
        with sub.applied(bridge, mode="ablate"):
            ablated = bridge(tokens)
        with sub.complement().applied(bridge):
            complement = bridge(tokens)
        full = bridge(tokens)
    assert torch.equal(kept, by_hand)
    assert torch.equal(ablated, complement)
    assert not torch.allclose(kept, full) and not torch.allclose(ablated, full)
    with Subnetwork.full(bridge, ("neuron", "head")).applied(bridge), torch.no_grad():
        assert torch.equal(bridge(tokens), full)


@pytest.mark.usefixtures("no_runtime_typecheck")  # mode="remove" is outside RunMode on purpose
def test_applying_twice_or_to_another_model_is_refused(tiny_neox, tiny_gpt2):
    bridge, _ = tiny_neox
    sub = _random_subnetwork(bridge, "neuron")
    with sub.applied(bridge), pytest.raises(MaskError, match="already applied"), sub.applied(bridge):
        pass
    with pytest.raises(MaskError, match="made for model"), sub.applied(tiny_gpt2[0]):
        pass
    with pytest.raises(MaskError), sub.applied(bridge, mode="remove"):
        pass


def test_sizes_in_paper_unit(tiny_neox):
    bridge, _ = tiny_neox
    d_model, d_head, d_mlp, n_layers = 32, 8, 64, 2
    matrix_total = n_layers * (4 * d_model * d_model + 2 * d_model * d_mlp)
    sub = _random_subnetwork(bridge, ("neuron", "head"), seed=3)
    neurons = sum(int(sub.masks[f"blocks.{L}.mlp.hook_post"].sum()) for L in range(n_layers))
    heads = sum(int(sub.masks[f"blocks.{L}.attn.hook_z"].sum()) for L in range(n_layers))
    assert sub.n_params() == neurons * 2 * d_model + heads * 4 * d_model * d_head
    assert sub.n_params_total() == matrix_total
    assert Subnetwork.full(bridge, "weight").n_params() == matrix_total
    assert Subnetwork.empty(bridge, ("neuron", "head")).n_params() == 0
    table = sub.layer_distribution()
    assert set(zip(table.layer, table.block)) == {(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")}
    assert abs(table.share_of_subnetwork.sum() - 1.0) < 1e-9
    assert table.kept_params.sum() == sub.n_params()


def test_random_control_keeps_count_per_block(tiny_gpt2):
    bridge, _ = tiny_gpt2
    sub = _random_subnetwork(bridge, ("head", "neuron", "weight"), p=0.3)
    control = sub.random_control(seed=1)
    assert control.random_control(seed=1).masks.keys() == sub.masks.keys()
    for key in sub.masks:
        assert int(control.masks[key].sum()) == int(sub.masks[key].sum())
    assert any(not torch.equal(control.masks[k], sub.masks[k]) for k in sub.masks)
    again = sub.random_control(seed=1)
    assert all(torch.equal(again.masks[k], control.masks[k]) for k in sub.masks)


def test_save_load_round_trip(tiny_gpt2, tmp_path):
    bridge, _ = tiny_gpt2
    sub = _random_subnetwork(bridge, ("neuron", "head", "weight"), seed=5)
    sub.metadata["metrics"] = {"bigram_r": np.float64(0.93), "loss": float("inf")}
    sub.save(tmp_path / "sub")
    back = Subnetwork.load(tmp_path / "sub")
    assert back.model_id == sub.model_id and back.geometry == sub.geometry
    assert back.components == sub.components
    assert all(torch.equal(back.masks[k], sub.masks[k]) for k in sub.masks)
    assert back.metadata["metrics"]["bigram_r"] == pytest.approx(0.93)
    assert back.metadata["config"] == {"lam": 1.0}
    tokens = _tokens(1)
    with torch.no_grad():
        with sub.applied(bridge):
            a = bridge(tokens)
        with back.applied(bridge):
            b = bridge(tokens)
    assert torch.equal(a, b)
    (tmp_path / "sub" / "subnetwork.json").write_text("{not json")
    with pytest.raises(MaskError, match="corrupt"):
        Subnetwork.load(tmp_path / "sub")
    with pytest.raises(MaskError):
        Subnetwork.load(tmp_path / "nothing")


@pytest.mark.parametrize("name", ["tiny_neox", "tiny_gpt2"])
def test_author_pickle_round_trip(name, request, tmp_path):
    bridge, _ = request.getfixturevalue(name)
    sub = _random_subnetwork(bridge, "weight", p=0.4, seed=9)
    path = sub.save_author_pickle(tmp_path / "subnetwork_dict.pickle", orig_model_name="tiny/model")
    raw = load_author_pickle(path)
    assert raw["orig_model_name"] == "tiny/model"
    assert all(v.dtype == bool for k, v in raw.items() if k != "orig_model_name")
    back = Subnetwork.from_author_pickle(path, bridge)
    assert all(torch.equal(back.masks[k], sub.masks[k]) for k in sub.masks)
    assert back.metadata["model_name"] == "tiny/model"


def test_neuron_head_subnetwork_exports_as_equivalent_weight_masks(tiny_neox, tmp_path):
    bridge, _ = tiny_neox
    sub = _random_subnetwork(bridge, ("neuron", "head"), seed=11)
    back = Subnetwork.from_author_pickle(sub.save_author_pickle(tmp_path / "m.pickle"), bridge)
    assert back.granularities == ("weight",)
    assert back.n_params() == sub.n_params()
    tokens = _tokens(2)
    with torch.no_grad():
        with sub.applied(bridge):
            a = bridge(tokens)
        with back.applied(bridge):
            b = bridge(tokens)
    assert torch.allclose(a, b, atol=1e-5)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused(tmp_path, tiny_neox):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({"gpt_neox.layers.0.attention.dense.weight": _Exploit(marker)}))
    with pytest.raises(UnsafeFileError):
        load_author_pickle(evil)
    with pytest.raises(UnsafeFileError):
        Subnetwork.from_author_pickle(evil, tiny_neox[0])
    assert not marker.exists()
    not_a_dict = tmp_path / "list.pickle"
    not_a_dict.write_bytes(pickle.dumps([np.zeros(3, dtype=bool)]))
    with pytest.raises(UnsafeFileError):
        load_author_pickle(not_a_dict)
    objects = tmp_path / "objects.pickle"
    objects.write_bytes(pickle.dumps({"w": np.array([{"a": 1}], dtype=object)}))
    with pytest.raises(UnsafeFileError):
        load_author_pickle(objects)
    wrong_shape = tmp_path / "shape.pickle"
    wrong_shape.write_bytes(pickle.dumps({"gpt_neox.layers.0.attention.dense.weight": np.ones((2, 2), bool)}))
    with pytest.raises(MaskError):
        Subnetwork.from_author_pickle(wrong_shape, tiny_neox[0])


def test_saved_keys_are_the_mask_key_strings(tiny_neox, tmp_path):
    from safetensors.torch import load_file

    from bigram_circuits.masks import MaskKey

    bridge, _ = tiny_neox
    sub = _random_subnetwork(bridge, ("neuron", "head", "weight"), seed=12)
    saved = load_file(str(sub.save(tmp_path / "sub") / "masks.safetensors"))
    expected = {str(MaskKey.head(L)) for L in range(2)} | {str(MaskKey.neuron(L)) for L in range(2)}
    expected |= {str(MaskKey.weight(L, k)) for L in range(2) for k in ("q", "k", "v", "o", "in", "out")}
    assert set(saved) == expected
    assert "blocks.1.attn.hook_z" in saved and "blocks.0.mlp.in.weight" in saved  # the strings old runs hold
    assert all(str(MaskKey.parse(key)) == key for key in saved)


def test_applied_leaves_no_trace_even_when_the_block_raises(tiny_gpt2):
    from torch.nn.utils import parametrize

    bridge, _ = tiny_gpt2
    sub = _random_subnetwork(bridge, ("neuron", "head", "weight"), seed=13)
    tokens = _tokens(3)
    with torch.no_grad():
        full = bridge(tokens)
        for mode in ("keep", "ablate"):
            with pytest.raises(KeyError), sub.applied(bridge, mode):
                assert not torch.allclose(bridge(tokens), full)
                raise KeyError("inside")
            assert not any(hp.fwd_hooks for hp in bridge.hook_dict.values())
            assert not any(parametrize.is_parametrized(m) for m in bridge.modules())
            assert torch.equal(bridge(tokens), full)


def test_with_masks_keeps_model_and_components(tiny_neox):
    bridge, _ = tiny_neox
    sub = _random_subnetwork(bridge, ("neuron", "head"), seed=14)
    other = sub.with_masks({k: ~m for k, m in sub.masks.items()}, {"note": 1})
    assert other.metadata == {"note": 1} and other.components == sub.components and other.model_id == sub.model_id
    assert all(torch.equal(other.masks[k], ~sub.masks[k]) for k in sub.masks)
    with pytest.raises(MaskError, match="do not match"):
        sub.with_masks({}, {})
