"""Faithfulness controls: permuted bigram targets (issue 23)."""

from __future__ import annotations

import numpy as np
import pytest

from bigram_circuits.errors import StatsError
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.runspec import RunSpec


@pytest.fixture(scope="module")
def stats() -> BigramStats:
    rng = np.random.default_rng(0)
    tokens = rng.zipf(1.5, size=(40, 32)) % 50
    return BigramStats.from_tokens(tokens, 50, show_progress=False)


def _rows(stats: BigramStats) -> dict[int, dict[int, int]]:
    t = stats.bigram
    return {
        int(c): dict(zip(t.next_ids[t.indptr[i] : t.indptr[i + 1]].tolist(), t.counts[t.indptr[i] : t.indptr[i + 1]]))
        for i, c in enumerate(t.contexts)
    }


def test_permuted_contexts_moves_whole_rows_to_other_contexts(stats):
    permuted = stats.permuted("contexts", seed=3)
    before, after = _rows(stats), _rows(permuted)
    assert set(before) == set(after)  # the same contexts are seen
    # The same multiset of rows, but no context keeps its own row.
    as_key = lambda row: tuple(sorted(row.items()))  # noqa: E731
    assert sorted(map(as_key, before.values())) == sorted(map(as_key, after.values()))
    # One cycle through all contexts: a context keeps an equal row only where two rows coincide.
    unique = {c for c in before if sum(as_key(r) == as_key(before[c]) for r in before.values()) == 1}
    assert unique and all(before[c] != after[c] for c in unique)
    contexts = np.asarray(sorted(before))
    np.testing.assert_allclose(np.sort(permuted.entropy(contexts)), np.sort(stats.entropy(contexts)))
    np.testing.assert_array_equal(permuted.unigram_probs(), stats.unigram_probs())
    # Each permuted distribution still sums to 1 and the unseen-context backoff is unchanged.
    for c in contexts[:5]:
        assert permuted.distribution(int(c)).sum() == pytest.approx(1.0)


def test_permuted_vocab_keeps_each_rows_entropy_but_not_its_tokens(stats):
    permuted = stats.permuted("vocab", seed=1)
    contexts = stats.bigram.contexts
    np.testing.assert_allclose(permuted.entropy(contexts), stats.entropy(contexts))
    before, after = _rows(stats), _rows(permuted)
    for c in before:
        assert sorted(before[c].values()) == sorted(after[c].values())
    assert sum(set(before[c]) != set(after[c]) for c in before) > len(before) // 2
    for table in (permuted.bigram,):  # ids stay sorted within each row (the lookup needs it)
        for i in range(len(table.contexts)):
            ids = table.next_ids[table.indptr[i] : table.indptr[i + 1]]
            assert np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(permuted.unigram_probs(), stats.unigram_probs())


def test_permutations_are_seeded(stats):
    for variant in ("contexts", "vocab"):
        a, b, c = (stats.permuted(variant, seed=s) for s in (0, 0, 1))
        np.testing.assert_array_equal(a.bigram.next_ids, b.bigram.next_ids)
        assert not np.array_equal(a.bigram.next_ids, c.bigram.next_ids)
    with pytest.raises(StatsError, match="variant"):
        stats.permuted("rows")


# ---------------------------------------------------------------- partial and mean ablation


@pytest.fixture(scope="module")
def tiny_eval(tiny_neox, tiny_text):
    from bigram_circuits.data import tokenize_documents

    bridge, tokenizer = tiny_neox
    dataset = tokenize_documents(tiny_text, tokenizer, show_progress=False)
    stats = BigramStats.from_tokens(dataset.windows(32), len(tokenizer), show_progress=False)
    return bridge, stats, dataset.windows(32, max_windows=4)


def _unit_subnetwork(bridge, p: float = 0.3, seed: int = 0):
    import torch

    from bigram_circuits.subnetwork import Subnetwork

    gen = torch.Generator().manual_seed(seed)
    full = Subnetwork.full(bridge, ("neuron", "head"))
    return Subnetwork.from_masks(bridge, {k: torch.rand(m.shape, generator=gen) < p for k, m in full.masks.items()})


def test_partial_subnetwork_keeps_the_fraction_of_each_block(tiny_neox):
    from bigram_circuits.circuits.ablation import partial_subnetwork
    from bigram_circuits.errors import ConfigError

    sub = _unit_subnetwork(tiny_neox[0])
    half = partial_subnetwork(sub, 0.5, seed=1)
    for key, mask in sub.masks.items():
        assert int(half.masks[key].sum()) == round(0.5 * int(mask.sum()))
        assert not bool((half.masks[key] & ~mask).any())  # only entries of the subnetwork
    assert all(bool((partial_subnetwork(sub, 1.0).masks[k] == m).all()) for k, m in sub.masks.items())
    assert partial_subnetwork(sub, 0.0).n_params() == 0
    again = partial_subnetwork(sub, 0.5, seed=1)
    assert all(bool((again.masks[k] == half.masks[k]).all()) for k in sub.masks)
    with pytest.raises(ConfigError, match="fraction"):
        partial_subnetwork(sub, 1.5)


def test_partial_ablation_table_uses_the_evaluation_metrics(tiny_eval):
    from bigram_circuits.circuits.ablation import partial_ablation_table
    from bigram_circuits.evaluate import evaluate_metrics

    bridge, stats, windows = tiny_eval
    sub = _unit_subnetwork(bridge)
    table = partial_ablation_table(bridge, stats, windows, sub, fractions=(0.5, 1.0), seeds=(0, 1), show_progress=False)
    assert set(table["ablation"]) == {"zero", "mean"}  # neuron/head masks: both
    assert set(table["condition"]) == {"bigram", "random"}
    assert len(table) == 2 * 2 * 3 * 2  # condition x ablation x (0, 0.5, 1) x seeds
    whole = table[(table["condition"] == "bigram") & (table["ablation"] == "zero") & (table["fraction"] == 1.0)]
    expected = evaluate_metrics(bridge, stats, windows, RunSpec(sub, "ablate"), show_progress=False)
    assert whole["lm_loss_nats"].to_numpy() == pytest.approx(expected["lm_loss_nats"], rel=1e-6)
    assert whole["r_dropped"].to_numpy() == pytest.approx(expected["r_dropped"], rel=1e-6)
    assert (table.loc[table["fraction"] == 0, "loss_increase"] == 0).all()
    assert (whole["removed_params"] == sub.n_params()).all()
    # Weight masks: zero ablation only; asking for mean ablation is refused.
    from bigram_circuits.errors import MaskError
    from bigram_circuits.subnetwork import Subnetwork

    weights = Subnetwork.empty(bridge, ("weight",))
    assert set(
        partial_ablation_table(bridge, stats, windows, weights, (1.0,), (0,), show_progress=False)["ablation"]
    ) == {"zero"}
    with pytest.raises(MaskError, match="neuron/head"):
        partial_ablation_table(bridge, stats, windows, weights, (1.0,), (0,), mean_ablation=True, show_progress=False)


def test_mean_ablation_sets_units_to_their_mean(tiny_eval):
    import torch

    from bigram_circuits.circuits.ablation import MeanAblation, unit_mean_activations
    from bigram_circuits.evaluate import evaluate_metrics

    bridge, stats, windows = tiny_eval
    sub = _unit_subnetwork(bridge)
    keys = sorted(sub.masks)
    means = unit_mean_activations(bridge, windows, keys)
    neuron = next(k for k in keys if k.endswith("hook_post"))
    _, cache = bridge.run_with_cache(torch.as_tensor(windows[:2].astype(np.int64)), names_filter=[neuron])
    assert means[neuron].shape == cache[neuron].shape[-1:]
    # Zero "means" are zero ablation exactly.
    zeros = {k: torch.zeros_like(v) for k, v in means.items()}
    zero = evaluate_metrics(bridge, stats, windows, RunSpec(sub, "ablate"), show_progress=False)
    as_mean = evaluate_metrics(bridge, stats, windows, RunSpec(MeanAblation(sub, zeros), "ablate"), show_progress=False)
    assert as_mean["lm_loss_nats"] == pytest.approx(zero["lm_loss_nats"], rel=1e-5)
    # Real means: the removed neurons output their mean inside the block, and only there.
    with MeanAblation(sub, means).applied(bridge):
        _, cache = bridge.run_with_cache(torch.as_tensor(windows[:2].astype(np.int64)), names_filter=[neuron])
    removed = sub.masks[neuron]
    expected = means[neuron][removed].expand_as(cache[neuron][..., removed])
    torch.testing.assert_close(cache[neuron][..., removed], expected)
    _, after = bridge.run_with_cache(torch.as_tensor(windows[:2].astype(np.int64)), names_filter=[neuron])
    assert not torch.allclose(after[neuron][..., removed], expected)


# ---------------------------------------------------------------- the figures pipeline's controls stage


def test_tables_and_figure_of_the_controls():
    import pandas as pd

    from bigram_circuits.plots import fig_controls
    from bigram_circuits.tables import table_controls, table_controls_partial

    sweeps = pd.DataFrame(
        {
            "control": ["real bigram target"] * 2 + ["permuted contexts"] * 2,
            "lambda": [1.0, 10.0, 1.0, 10.0],
            "active_params": [4000.0, 1000.0, 8000.0, 500.0],
            "active_percent": [4.0, 1.0, 8.0, 0.5],
            "r": [0.97, 0.96, 0.5, 0.3],
            "chosen": [False, True, False, False],
        }
    )
    partial = pd.DataFrame(
        {
            "condition": ["bigram", "bigram", "random", "random"] * 2,
            "ablation": "zero",
            "fraction": [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
            "seed": [0, 1, 0, 1] * 2,
            "loss_increase": [0, 0, 0, 0, 0.5, 0.5, 0.01, 0.03],
            "r_dropped": [0.9] * 4 + [0.1, 0.1, 0.8, 0.8],
        }
    )
    overlap = pd.DataFrame(
        {
            "pair": ["seed 0 vs seed 1", "seed 0 vs optimal"],
            "kind": ["seed vs seed", "bigram vs optimal"],
            "ratio": [20.0, 8.0],
            "frac_a_in_b": [0.5, 0.2],
            "expected_frac_a_in_b": [0.01, 0.02],
            "p_value": [0.0, 0.0],
            "n_random": [100, 100],
        }
    )
    seeds = pd.DataFrame({"seed": [0, 1], "active_percent": [1.0, 1.2], "r": [0.96, 0.962]})
    headline = seeds.assign(overlap_ratio=[8.0, 9.0], overlap_p_value=[0.0, 0.0])
    table = table_controls(sweeps, partial, overlap, seeds, headline).set_index("control")
    assert table.loc["overlap, bigram vs optimal (2 seeds, headline stage)", "result"].startswith("8.50 ± 0.71x")
    permuted = table.loc["permuted contexts", "result"]
    # r read off the permuted curve at the real size (1000 weights), between its 500 and 8000 points.
    assert permuted.startswith("r 0.") and "never reaches r 0.960 (best r 0.500 at 8.00%)" in permuted
    assert "1.100 ± 0.141% of the weights" in table.iloc[0]["result"]
    assert any("100% removed" in c for c in table.index) and "seed vs seed" in " ".join(table.index)
    curves = table_controls_partial(partial)
    assert list(curves["% removed"]) == ["100"] and curves.iloc[0]["random: loss increase (nats)"] == "0.020 ± 0.014"
    fig = fig_controls(sweeps, partial)
    assert {t.name for t in fig.data} >= {"real bigram target", "permuted contexts", "bigram removed, zero ablation"}
