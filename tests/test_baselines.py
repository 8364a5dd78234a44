"""Table 2 baselines: trained embeddings in a random-init model, and embeddings + linear map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigram_circuits.baselines import (
    BaselineError,
    LinearMapBaseline,
    LinearMapConfig,
    fit_linear_map,
    transplant_embeddings,
)
from bigram_circuits.data import tokenize_documents
from bigram_circuits.errors import ConfigError
from bigram_circuits.models import load_model
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.subnetwork import Subnetwork


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


@pytest.fixture(scope="module")
def two_neox(tmp_path_factory, tiny_model_factory):
    """Two tiny GPT-NeoX models of one architecture, different seeds (fresh: tests mutate them)."""
    root = tmp_path_factory.mktemp("transplant")
    target_dir = tiny_model_factory("neox", root / "target", seed=1)
    source_dir = tiny_model_factory("neox", root / "source", seed=2)
    return target_dir, source_dir


def test_transplant_copies_embeddings_and_final_norm_only(two_neox):
    target, _ = load_model(two_neox[0])
    source, _ = load_model(two_neox[1])
    source_before = _snapshot(source)
    target_blocks_before = _snapshot(target.blocks)

    copied = transplant_embeddings(target, source)

    assert any(name.startswith("embed.") for name in copied)
    assert any(name.startswith("unembed.") for name in copied)
    assert any(name.startswith("ln_final.") for name in copied)
    for component in ("embed", "unembed", "ln_final"):
        for (name, got), (_, want) in zip(
            getattr(target, component).named_parameters(), getattr(source, component).named_parameters()
        ):
            assert torch.equal(got, want), f"{component}.{name} was not copied"
    for name, param in target.blocks.named_parameters():
        assert torch.equal(param, target_blocks_before[name]), f"block parameter {name} changed"
    for name, param in source.named_parameters():
        assert torch.equal(param, source_before[name]), "the source model must stay untouched"


def test_transplant_can_leave_the_final_norm(two_neox):
    target, _ = load_model(two_neox[0])
    source, _ = load_model(two_neox[1])
    with torch.no_grad():  # make the final norms differ (HF initialises them identically)
        for param in source.ln_final.parameters():
            param.add_(0.5)
    norm_before = _snapshot(target.ln_final)
    copied = transplant_embeddings(target, source, include_final_norm=False)
    assert not any(name.startswith("ln_final.") for name in copied)
    for name, param in target.ln_final.named_parameters():
        assert torch.equal(param, norm_before[name])


def test_transplant_between_architectures_fails_with_one_line(tiny_model_factory, tmp_path, two_neox):
    target, _ = load_model(two_neox[0])
    wider, _ = load_model(tiny_model_factory("neox", tmp_path / "wider", vocab_size=320))
    with pytest.raises(BaselineError, match="shape") as info:
        transplant_embeddings(target, wider)
    assert "\n" not in str(info.value)


def test_transplant_handles_tied_embeddings(tiny_model_factory, tmp_path):
    target, _ = load_model(tiny_model_factory("gpt2", tmp_path / "a", seed=1))
    source, _ = load_model(tiny_model_factory("gpt2", tmp_path / "b", seed=2))
    transplant_embeddings(target, source)
    tokens = torch.tensor([[1, 2, 3, 4]])
    # GPT-2 ties embedding and unembedding: logits of the embedding path now match the source's
    with torch.no_grad():
        got = target.unembed(target.ln_final(target.embed(tokens)))
        want = source.unembed(source.ln_final(source.embed(tokens)))
    torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def tiny_bigram(tiny_neox, tiny_text):
    bridge, tokenizer = tiny_neox
    dataset = tokenize_documents(tiny_text, tokenizer, show_progress=False)
    windows = dataset.windows(32)
    stats = BigramStats.from_tokens(windows, len(tokenizer), show_progress=False)
    return bridge, stats, windows


def test_identity_map_is_the_empty_subnetwork(tiny_bigram):
    """W = I, b = 0 reads the embedding straight into the unembedding: on a rotary model with
    zero biases that is exactly the empty subnetwork (no neuron, no head)."""
    bridge, _, windows = tiny_bigram
    d_model = bridge.cfg.d_model
    identity = LinearMapBaseline(weight=torch.eye(d_model), bias=torch.zeros(d_model))
    tokens = torch.as_tensor(windows[:2].astype(np.int64))
    with torch.no_grad():
        got = identity.logits(bridge, tokens)
        with Subnetwork.empty(bridge, ("neuron", "head")).applied(bridge):
            want = bridge(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fit_linear_map_lowers_bigram_loss_and_leaves_model_alone(tiny_bigram):
    bridge, stats, windows = tiny_bigram
    before = _snapshot(bridge)
    requires_grad = {name: p.requires_grad for name, p in bridge.named_parameters()}

    baseline = fit_linear_map(
        bridge, stats, windows, LinearMapConfig(steps=60, lr=1e-2, batch_size=4), show_progress=False
    )

    assert len(baseline.losses) == 60
    assert np.mean(baseline.losses[-10:]) < baseline.losses[0] - 0.1
    assert not baseline.weight.requires_grad
    for name, param in bridge.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed while fitting the map"
        assert param.requires_grad == requires_grad[name]
    fitted = baseline.evaluate(bridge, stats, windows[:6])
    d_model = bridge.cfg.d_model
    identity = LinearMapBaseline(weight=torch.eye(d_model), bias=torch.zeros(d_model)).evaluate(
        bridge, stats, windows[:6]
    )
    assert fitted["soft_xent"] < identity["soft_xent"]
    assert -1.0 <= fitted["r_dropped"] <= 1.0
    assert fitted["n_tokens"] == 6 * 31


def test_fit_linear_map_is_deterministic(tiny_bigram):
    bridge, stats, windows = tiny_bigram
    config = LinearMapConfig(steps=5, batch_size=2, seed=3)
    first = fit_linear_map(bridge, stats, windows, config, show_progress=False)
    second = fit_linear_map(bridge, stats, windows, config, show_progress=False)
    assert first.losses == second.losses
    assert torch.equal(first.weight, second.weight)


def test_linear_map_bad_inputs(tiny_bigram):
    bridge, stats, windows = tiny_bigram
    with pytest.raises(ConfigError):
        LinearMapConfig(steps=0)
    with pytest.raises(ConfigError):
        LinearMapConfig(lr=float("nan"))
    with pytest.raises(BaselineError, match="non-empty"):
        fit_linear_map(bridge, stats, windows[:0], show_progress=False)
    with pytest.raises(BaselineError, match="vocab"):
        fit_linear_map(bridge, stats, windows + int(stats.vocab_size), show_progress=False)
