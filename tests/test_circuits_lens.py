"""Logit lens and the linear lens (ridge maps, rotation, recall@k)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from circuit_doubles import random_units
from typechecks import unchecked

from bigram_circuits.circuits.lens import (
    Lens,
    LensReadout,
    LinearLens,
    LinearLensConfig,
    LogitLens,
    fit_ridge,
    lens_report,
    linear_lens,
    logit_lens,
    logit_lens_logits,
    logit_lens_report,
    logit_lens_top_tokens,
    read_hidden_states,
    recall_at_k,
    rotation_degrees,
)
from bigram_circuits.errors import ConfigError, TokenError
from bigram_circuits.runspec import RunSpec


def _windows(n: int, seq: int, seed: int = 0, vocab: int = 300) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, size=(n, seq))


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_logit_lens_at_the_last_layer_equals_the_model_logits(fixture, request):
    bridge, tokenizer = request.getfixturevalue(fixture)
    tokens = torch.as_tensor(_windows(2, 10))
    lens = logit_lens_logits(bridge, tokens)
    assert lens.shape[0] == bridge.cfg.n_layers + 1
    with torch.no_grad():
        logits = bridge(tokens)
    torch.testing.assert_close(lens[-1], logits, rtol=1e-5, atol=1e-5)
    cut = logit_lens_logits(bridge, tokens, vocab_size=len(tokenizer))
    torch.testing.assert_close(cut[-1], logits[..., : len(tokenizer)], rtol=1e-5, atol=1e-5)


def test_logit_lens_under_a_subnetwork_ends_at_its_logits(tiny_neox):
    bridge, _ = tiny_neox
    sub = random_units(bridge, seed=3)
    tokens = torch.as_tensor(_windows(2, 10, seed=1))
    lens = logit_lens_logits(bridge, tokens, RunSpec(sub, "keep"))
    with torch.no_grad(), sub.applied(bridge, "keep"):
        logits = bridge(tokens)
    torch.testing.assert_close(lens[-1], logits, rtol=1e-5, atol=1e-5)


class _HashBigrams:
    """Fake bigram statistics: a fixed function of (current, next), inf for some pairs."""

    def surprisal(self, current, nxt):
        value = ((np.asarray(current) * 7 + np.asarray(nxt) * 3) % 11).astype(np.float64)
        value[value == 0] = np.inf
        return value


def test_logit_lens_table(tiny_neox):
    bridge, tokenizer = tiny_neox
    windows = _windows(6, 12, seed=2)
    table = logit_lens(
        bridge,
        windows,
        bigram_stats=_HashBigrams(),
        vocab_size=len(tokenizer),
        n_tokens=None,
        batch_size=4,
        progress=False,
    )
    assert list(table["layer"]) == list(range(bridge.cfg.n_layers + 1))
    last = table.iloc[-1]
    assert last["kl_to_final"] == pytest.approx(0.0, abs=1e-9)
    assert last["top1_agreement"] == pytest.approx(1.0)
    assert (table["kl_to_final"] >= -1e-9).all()
    # bigram r recomputed by hand for layer 0
    lens = logit_lens_logits(bridge, torch.as_tensor(windows), vocab_size=len(tokenizer))[0].double()
    logp = torch.log_softmax(lens, -1)[:, :-1]
    nxt = torch.as_tensor(windows)[:, 1:]
    ours = -logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).reshape(-1).numpy()
    theirs = _HashBigrams().surprisal(windows[:, :-1], windows[:, 1:]).reshape(-1)
    keep = np.isfinite(theirs)
    assert table.loc[0, "bigram_r"] == pytest.approx(np.corrcoef(ours[keep], theirs[keep])[0, 1], abs=1e-6)
    both = logit_lens_report(
        bridge,
        tokenizer,
        windows,
        {"full": None, "sub": random_units(bridge)},
        n_tokens=48,
        progress=False,
    )
    assert set(both["run"]) == {"full", "sub"} and np.isnan(both["bigram_r"]).all()


def test_logit_lens_top_tokens(tiny_neox):
    bridge, tokenizer = tiny_neox
    tokens = torch.as_tensor(_windows(1, 9, seed=3)[0])
    table = logit_lens_top_tokens(bridge, tokens, tokenizer, k=3)
    assert len(table) == 3 * (bridge.cfg.n_layers + 1)
    with torch.no_grad():
        best = int(bridge(tokens[None])[0, -1, : len(tokenizer)].argmax())
    last = table[(table["layer"] == bridge.cfg.n_layers) & (table["rank"] == 1)]
    assert int(last["token_id"].iloc[0]) == best


def test_linear_lens_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    n, d = 4000, 16
    x = rng.normal(size=(n, d)) * 3.0
    weight = rng.normal(size=(d, d))
    bias = rng.normal(size=d)
    y = x @ weight + bias + 0.01 * rng.normal(size=(n, d))
    ridge = fit_ridge(x, y, alpha=1.0)
    np.testing.assert_allclose(ridge.weight, weight, atol=5e-3)
    np.testing.assert_allclose(ridge.bias, bias, atol=5e-3)
    assert ridge.r2(x, y) > 0.999
    # the ridge solution is the exact minimiser: its gradient vanishes
    xc, yc = x - x.mean(0), y - y.mean(0)
    gradient = xc.T @ (xc @ ridge.weight - yc) + 1.0 * ridge.weight
    np.testing.assert_allclose(gradient, 0.0, atol=1e-6)


def test_rotation_of_known_maps():
    assert rotation_degrees(np.eye(6)) == pytest.approx(0.0)
    angle = np.deg2rad(30.0)
    block = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rotation = np.kron(np.eye(3), block)
    assert rotation_degrees(rotation) == pytest.approx(30.0)
    assert rotation_degrees(2.0 * rotation) == pytest.approx(30.0)  # scale does not matter
    assert rotation_degrees(-np.eye(4)) == pytest.approx(180.0)
    with pytest.raises(ConfigError, match="square"), unchecked():
        rotation_degrees(np.ones((2, 3)))


def test_recall_at_k():
    generator = torch.Generator().manual_seed(0)
    candidates = torch.randn(50, 8, generator=generator)
    targets = torch.randint(0, 50, (200,), generator=generator)
    exact = recall_at_k(candidates[targets] * 5.0, targets, candidates, (1, 5))
    assert exact == {1: 1.0, 5: 1.0}
    noisy = recall_at_k(torch.randn(200, 8, generator=generator), targets, candidates, (1, 5, 50))
    assert noisy[1] <= noisy[5] <= noisy[50] == 1.0


def test_linear_lens_on_a_model(tiny_neox):
    bridge, tokenizer = tiny_neox
    windows = _windows(40, 32, seed=4)
    config = LinearLensConfig(n_tokens=1024, test_fraction=0.25, batch_size=8)
    table = linear_lens(bridge, windows, config=config, vocab_size=len(tokenizer), progress=False)
    n_hidden = bridge.cfg.n_layers + 1
    assert len(table) == 2 * n_hidden
    assert set(table.columns) >= {
        "run",
        "layer",
        "target",
        "rotation_deg",
        "r2",
        "recall@1",
        "recall@5",
        "recall@10",
    }
    assert (table["n_train"] == 768).all() and (table["n_test"] == 256).all()
    row = table.set_index(["layer", "target"])
    # X_0 of GPT-NeoX is the token embedding itself and X_L maps to itself: symmetric PSD maps
    assert row.loc[(0, "input"), "rotation_deg"] == pytest.approx(0.0, abs=1e-6)
    assert row.loc[(n_hidden - 1, "output"), "rotation_deg"] == pytest.approx(0.0, abs=1e-6)
    assert row.loc[(0, "input"), "recall@10"] > 0.9
    assert (
        ((table[["recall@1", "recall@5", "recall@10"]] >= 0) & (table[["recall@1", "recall@5", "recall@10"]] <= 1))
        .all()
        .all()
    )
    assert (table["recall@1"] <= table["recall@10"]).all()


def test_lens_report_side_by_side(tiny_neox):
    from bigram_circuits.subnetwork import Subnetwork

    bridge, tokenizer = tiny_neox
    generator = torch.Generator().manual_seed(0)
    sub = Subnetwork.from_masks(
        bridge,
        {
            k: torch.rand(m.shape, generator=generator) < 0.2
            for k, m in Subnetwork.full(bridge, ("neuron", "head")).masks.items()
        },
    )
    runs = {"full": None, "bigram": sub, "random": sub.random_control(seed=5)}
    table = lens_report(bridge, tokenizer, _windows(8, 32, seed=6), runs, n_tokens=256, progress=False)
    assert list(table["run"].unique()) == ["full", "bigram", "random"]
    by_run = table.set_index(["run", "layer", "target"])["rotation_deg"]
    assert by_run[("bigram", 1, "input")] != pytest.approx(by_run[("full", 1, "input")])
    from bigram_circuits.plots import fig3_rotation

    assert len(fig3_rotation(table).data) == 6  # the lens table is the figure's input
    with pytest.raises(ConfigError, match="hold only"):
        lens_report(bridge, tokenizer, _windows(2, 32), runs, n_tokens=4096, progress=False)


class _RecordingRun:
    """A subnetwork stand-in that records whether it is applied."""

    def __init__(self):
        self.active = False

    @contextlib.contextmanager
    def applied(self, bridge, mode="keep"):
        self.active = True
        try:
            yield self
        finally:
            self.active = False


def test_one_loop_reads_every_layer_through_a_lens(tiny_neox):
    bridge, tokenizer = tiny_neox
    tokens = torch.as_tensor(_windows(5, 10, seed=7))
    lens = LogitLens(bridge, len(tokenizer))
    assert isinstance(lens, Lens)
    reference = logit_lens_logits(bridge, tokens, vocab_size=len(tokenizer))
    batches = list(read_hidden_states(bridge, tokens, lens, batch_size=2, progress=False))
    assert [batch.shape[0] for batch, _ in batches] == [2, 2, 1]
    for index, (batch, readout) in enumerate(batches):
        assert len(readout) == bridge.cfg.n_layers + 1
        rows = slice(2 * index, 2 * index + batch.shape[0])
        for layer, logits in enumerate(readout):
            torch.testing.assert_close(logits, reference[layer, rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(readout[-1], readout[len(readout) - 1])
    # Without a lens the readout is the hidden states; a fitted linear lens reads them too.
    ((_, states),) = read_hidden_states(bridge, tokens, batch_size=8, progress=False)
    flat = [state.reshape(-1, state.shape[-1]) for state in states]
    target = flat[-1].double().numpy()
    linear = LinearLens.fit(flat, target, alpha=1.0)
    assert isinstance(linear, Lens) and len(linear.maps) == len(flat)
    predicted = LensReadout(linear, flat)[0]
    np.testing.assert_allclose(predicted.numpy(), linear.maps[0].predict(flat[0].double().numpy()), rtol=1e-6)


def test_closing_the_loop_early_leaves_the_run(tiny_neox):
    bridge, _ = tiny_neox
    run = _RecordingRun()
    batches = read_hidden_states(bridge, _windows(4, 8), None, run, batch_size=1, progress=False)
    next(batches)
    assert run.active
    batches.close()
    assert not run.active
    with pytest.raises(TokenError, match="outside the model's vocabulary"):
        next(read_hidden_states(bridge, _windows(2, 8) + 10_000, progress=False))


def test_lens_options_are_config_errors(tiny_neox):
    bridge, tokenizer = tiny_neox
    with pytest.raises(ConfigError, match="test_fraction"):
        LinearLensConfig(test_fraction=1.0)
    with pytest.raises(ConfigError, match="n_tokens"):
        LinearLensConfig(n_tokens=0)
    with pytest.raises(ConfigError, match="alpha"):
        fit_ridge(np.ones((3, 2)), np.ones((3, 2)), alpha=-1.0)
    with pytest.raises(ConfigError, match="similarity"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), torch.zeros(4, 3), similarity="l2")
    with pytest.raises(ConfigError, match="at least two windows"):
        linear_lens(bridge, _windows(1, 32), config=LinearLensConfig(n_tokens=32), progress=False)
    with pytest.raises(ConfigError, match="at least one run"):
        lens_report(bridge, tokenizer, _windows(4, 32), {}, n_tokens=64, progress=False)
    # TransformerLens' own refusals (here: a bridge left in training mode) keep the error contract.
    bridge.train()
    try:
        with pytest.raises(ConfigError, match="eval"):
            logit_lens_logits(bridge, torch.as_tensor(_windows(1, 4)))
    finally:
        bridge.eval()
