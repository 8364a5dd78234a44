"""Layer covariance similarity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from circuit_doubles import random_units

from bigram_circuits.circuits.runs import collect_activations, hidden_state_names
from bigram_circuits.circuits.similarity import (
    covariance_similarity,
    deflated_covariance,
    layer_covariance_similarity,
    similarity_report,
)
from bigram_circuits.errors import ConfigError, TokenError
from bigram_circuits.plots import similarity_heatmap


def test_similarity_of_a_layer_with_itself_is_one():
    generator = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(500, 12, generator=generator),
        torch.randn(500, 12, generator=generator) @ torch.randn(12, 12, generator=generator),
    )
    table = covariance_similarity([a, b, a])
    np.testing.assert_allclose(np.diag(table.to_numpy()), 1.0)
    assert table.loc[0, 2] == pytest.approx(1.0)
    np.testing.assert_allclose(table.to_numpy(), table.to_numpy().T)
    assert 0.0 <= table.loc[0, 1] < 1.0


def test_deflated_covariance_matches_an_explicit_svd():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=generator, dtype=torch.float64) @ torch.randn(
        8, 8, generator=generator, dtype=torch.float64
    )
    centred = x - x.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    top = vh[0:1].T
    deflated = centred - centred @ top @ top.T
    np.testing.assert_allclose(deflated_covariance(x), (deflated.T @ deflated / x.shape[0]).numpy(), atol=1e-10)


def test_the_top_singular_direction_is_removed():
    """Two layers sharing their structure but with different huge outlier directions."""
    generator = torch.Generator().manual_seed(2)
    shared = torch.randn(1000, 10, generator=generator, dtype=torch.float64)
    outlier_a, outlier_b = (
        torch.zeros(10, dtype=torch.float64),
        torch.zeros(10, dtype=torch.float64),
    )
    outlier_a[0], outlier_b[1] = 1.0, 1.0
    layer_a = shared.clone()
    layer_a[:, 0] = 0
    layer_a += 100 * torch.randn(1000, 1, generator=generator, dtype=torch.float64) * outlier_a
    layer_b = shared.clone()
    layer_b[:, 1] = 0
    layer_b += 100 * torch.randn(1000, 1, generator=generator, dtype=torch.float64) * outlier_b
    table = covariance_similarity({"a": layer_a, "b": layer_b})
    assert table.loc["a", "b"] > 0.7
    raw = [np.cov(layer.T.numpy()).reshape(-1) for layer in (layer_a, layer_b)]
    assert np.dot(raw[0], raw[1]) / np.linalg.norm(raw[0]) / np.linalg.norm(raw[1]) < 0.1


def test_bad_activations():
    with pytest.raises(ConfigError, match="n >= 2"):
        deflated_covariance(torch.randn(1, 4))
    with pytest.raises(ConfigError, match="at least one activation set"):
        covariance_similarity([])


def test_layer_similarity_of_a_model(tiny_neox):
    bridge, _ = tiny_neox
    windows = np.random.default_rng(0).integers(1, 300, size=(8, 32))
    table = layer_covariance_similarity(bridge, windows, n_tokens=256, progress=False)
    n_hidden = bridge.cfg.n_layers + 1
    assert table.shape == (n_hidden, n_hidden)
    np.testing.assert_allclose(np.diag(table.to_numpy()), 1.0)
    names = hidden_state_names(bridge)
    collected = collect_activations(bridge, windows, names, n_tokens=256, progress=False)
    direct = covariance_similarity([collected.activations[name] for name in names])
    np.testing.assert_allclose(table.to_numpy(), direct.to_numpy(), atol=1e-6)  # streaming == in memory
    matrices = similarity_report(
        bridge,
        windows,
        {"full": None, "random": random_units(bridge, seed=1)},
        n_tokens=256,
        progress=False,
    )
    pd_full = matrices["full"]
    np.testing.assert_allclose(pd_full.to_numpy(), table.to_numpy(), atol=1e-10)
    assert not np.allclose(matrices["random"].to_numpy(), table.to_numpy())
    figure = similarity_heatmap(matrices)
    assert len(figure.data) == 2
    with pytest.raises(TokenError, match="outside the model's vocabulary"):
        layer_covariance_similarity(bridge, windows + 10_000, n_tokens=256, progress=False)
    with pytest.raises(ConfigError, match="at least one run"):
        similarity_report(bridge, windows, {}, n_tokens=256, progress=False)
