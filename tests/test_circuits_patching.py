"""Activation patching between runs (full model / subnetwork, clean / corrupted prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from circuit_doubles import MaskedUnits, random_units
from transformer_lens import patching as tl_patching

from bigram_circuits.circuits.patching import (
    cache_run,
    kl_to_reference,
    logit_difference,
    next_token_loss,
    patch,
    run_with_patches,
)
from bigram_circuits.errors import ConfigError, TokenError
from bigram_circuits.plots import patching_heatmap


def _tokens(seed: int, shape=(2, 8), vocab: int = 300) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, :50].logsumexp(-1).mean() + logits[:, 3, 7].mean()


@pytest.mark.parametrize(
    ("component", "positions", "units"),
    [
        ("resid_pre", "each", None),
        ("attn_out", "all", None),
        ("mlp_out", [0, -1], None),
        ("head", "all", None),
        ("head", "each", [1]),
        ("neuron", "all", [0, 5, 63]),
    ],
)
def test_patching_a_run_with_its_own_activations_changes_nothing(tiny_neox, component, positions, units):
    bridge, _ = tiny_neox
    tokens = _tokens(0)
    table = patch(bridge, tokens, tokens, component, _metric, positions, units=units)
    assert len(table) > 0
    np.testing.assert_allclose(table["metric"], table.attrs["clean_metric"], rtol=1e-5, atol=1e-5)
    assert table.attrs["clean_metric"] == pytest.approx(table.attrs["corrupted_metric"], abs=1e-6)


def test_self_patching_under_a_subnetwork_changes_nothing(tiny_neox):
    bridge, _ = tiny_neox
    sub = random_units(bridge, seed=1)
    tokens = _tokens(1)
    table = patch(
        bridge,
        tokens,
        None,
        "head",
        _metric,
        "all",
        clean_run=(sub, "keep"),
        corrupted_run=(sub, "keep"),
    )
    np.testing.assert_allclose(table["metric"], table.attrs["corrupted_metric"], rtol=1e-5, atol=1e-5)
    full = patch(bridge, tokens, None, "resid_pre", _metric, "all").attrs["clean_metric"]
    assert table.attrs["clean_metric"] != pytest.approx(full)  # the subnetwork really ran


def test_patching_every_layers_residual_reproduces_the_clean_logits(tiny_neox):
    bridge, _ = tiny_neox
    clean, corrupted = _tokens(2), _tokens(3)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(bridge.cfg.n_layers)]
    clean_logits, cache = cache_run(bridge, clean, None, names)
    patched = run_with_patches(bridge, corrupted, {name: cache[name] for name in names})
    torch.testing.assert_close(patched, clean_logits, rtol=1e-5, atol=1e-5)
    # each layer alone, all positions at once, also restores the clean output
    table = patch(bridge, clean, corrupted, "resid_pre", _metric, "all")
    np.testing.assert_allclose(table["metric"], table.attrs["clean_metric"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table["recovered"], 1.0, atol=1e-4)


def test_by_position_matches_transformer_lens(tiny_neox):
    bridge, _ = tiny_neox
    clean, corrupted = _tokens(4), _tokens(5)
    ours = patch(bridge, clean, corrupted, "resid_pre", _metric, "each")
    _, cache = bridge.run_with_cache(clean)
    reference = tl_patching.get_act_patch_resid_pre(bridge, corrupted, cache, _metric)
    grid = ours.pivot(index="layer", columns="pos", values="metric").to_numpy()
    np.testing.assert_allclose(grid, reference.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_patch_into_a_subnetwork_run_overrides_its_masks(tiny_neox):
    """Full model -> subnetwork on one prompt: a kept layer-0 head already matches the full run,
    a zeroed head gets its full-model output back (the patch runs after the mask)."""
    bridge, _ = tiny_neox
    heads0 = torch.tensor([True, False, True, True])
    sub = MaskedUnits({"blocks.0.attn.hook_z": heads0})
    tokens = _tokens(6)
    table = patch(
        bridge,
        tokens,
        None,
        "head",
        _metric,
        "all",
        layers=[0],
        clean_run=None,
        corrupted_run=(sub, "keep"),
    )
    by_head = table.set_index("head")["metric"]
    base = table.attrs["corrupted_metric"]
    for head in (0, 2, 3):
        assert by_head[head] == pytest.approx(base, abs=1e-5)
    assert abs(by_head[1] - base) > 1e-4
    assert table.attrs["clean_run"] == "full" and table.attrs["corrupted_run"] == "subnetwork:keep"


def test_gpt2_bridge_self_patching(tiny_gpt2):
    bridge, _ = tiny_gpt2
    tokens = _tokens(7)
    table = patch(bridge, tokens, tokens, "neuron", _metric, "each", units=[3])
    np.testing.assert_allclose(table["metric"], table.attrs["clean_metric"], rtol=1e-5, atol=1e-5)
    assert set(table.columns) >= {
        "component",
        "layer",
        "pos",
        "neuron",
        "hook",
        "metric",
        "recovered",
    }


def test_metrics():
    logits = torch.zeros(2, 3, 5)
    logits[0, -1, 1], logits[1, -1, 2] = 3.0, 1.0
    assert float(logit_difference([1, 2], 0)(logits)) == pytest.approx(2.0)
    assert float(kl_to_reference(torch.randn(2, 3, 5).clone())(logits)) > 0
    same = torch.randn(2, 3, 5)
    assert float(kl_to_reference(same)(same)) == pytest.approx(0.0, abs=1e-9)
    tokens = torch.tensor([[0, 1, 2], [1, 2, 3]])
    assert float(next_token_loss(tokens)(torch.zeros(2, 3, 5))) == pytest.approx(np.log(5))


@pytest.mark.usefixtures("no_runtime_typecheck")
def test_bad_inputs(tiny_neox):
    bridge, _ = tiny_neox
    with pytest.raises(TokenError, match="same length"):
        patch(bridge, _tokens(0, (2, 8)), _tokens(0, (2, 6)), "resid_pre", _metric)
    with pytest.raises(ConfigError, match="unknown component"):
        patch(bridge, _tokens(0), None, "resid_mid", _metric)
    with pytest.raises(ConfigError, match="scalar"):
        patch(bridge, _tokens(0), None, "resid_pre", lambda logits: logits[:, -1, 0])
    # Bad option values are ConfigErrors (still ValueErrors); TokenError is for the token ids themselves.
    with pytest.raises(ConfigError, match="layers must be in"):
        patch(bridge, _tokens(0), None, "resid_pre", _metric, layers=[bridge.cfg.n_layers])
    with pytest.raises(ConfigError, match="outside the"):
        patch(bridge, _tokens(0), None, "resid_pre", _metric, [99])
    with pytest.raises(ConfigError, match="'all', 'each'"):
        patch(bridge, _tokens(0), None, "resid_pre", _metric, "every")
    with pytest.raises(ValueError):
        patch(bridge, _tokens(0), None, "resid_mid", _metric)


def test_heatmap(tiny_neox):
    bridge, _ = tiny_neox
    table = patch(bridge, _tokens(0), _tokens(1), "head", _metric, "each")
    figure = patching_heatmap(table, "metric")
    assert np.asarray(figure.data[0].z).shape == (bridge.cfg.n_layers * bridge.cfg.n_heads, 8)


def test_full_model_into_a_real_subnetwork(tiny_neox):
    """A saved-subnetwork run: self-patching is a no-op; patching the full model's last
    residual stream into the subnetwork run restores the full model's output."""
    from bigram_circuits.subnetwork import Subnetwork

    bridge, _ = tiny_neox
    generator = torch.Generator().manual_seed(3)
    sub = Subnetwork.from_masks(
        bridge,
        {
            k: torch.rand(m.shape, generator=generator) < 0.5
            for k, m in Subnetwork.full(bridge, ("neuron", "head")).masks.items()
        },
    )
    tokens = _tokens(8)
    with torch.no_grad():
        reference = bridge(tokens)
    metric = kl_to_reference(reference)
    same = patch(
        bridge,
        tokens,
        None,
        "neuron",
        metric,
        "all",
        units=[0, 1],
        clean_run=sub,
        corrupted_run=sub,
    )
    np.testing.assert_allclose(same["metric"], same.attrs["clean_metric"], atol=1e-6)
    last = bridge.cfg.n_layers - 1
    table = patch(
        bridge,
        tokens,
        None,
        "resid_pre",
        metric,
        "all",
        clean_run=None,
        corrupted_run=(sub, "keep"),
    )
    assert table.attrs["clean_metric"] == pytest.approx(0.0, abs=1e-9)
    assert table.attrs["corrupted_metric"] > 1e-4
    assert table.set_index("layer").loc[0, "metric"] > 1e-4  # later layers are still masked
    assert table.set_index("layer").loc[last, "metric"] < table.attrs["corrupted_metric"]
