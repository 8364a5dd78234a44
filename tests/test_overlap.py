"""Overlap of subnetworks and its random null (hypergeometric per block)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigram_circuits.circuits.overlap import (
    block_counts,
    layer_distribution,
    null_overlap_samples,
    overlap,
)
from bigram_circuits.errors import ConfigError, MaskError


def _random_mask(shape, n_kept, generator):
    flat = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=generator)[:n_kept]] = True
    return flat.reshape(shape)


def test_hand_computed_overlap():
    a = {
        "blocks.0.mlp.in.weight": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool),
        "blocks.0.attn.q.weight": torch.tensor([1, 0, 0, 0], dtype=torch.bool),
    }
    b = {
        "blocks.0.mlp.in.weight": torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool),
        "blocks.0.attn.q.weight": torch.tensor([1, 1, 0, 0], dtype=torch.bool),
    }
    result = overlap(a, b, n_random=2000, seed=0)
    assert result.n_entries == 12
    assert (result.n_kept_a, result.n_kept_b, result.n_overlap) == (3, 4, 2)
    assert result.fraction_overlap == pytest.approx(2 / 12)
    assert result.frac_a_in_b == pytest.approx(2 / 3)
    # analytic null: mlp block 2*2/8, q block 1*2/4
    expected = (2 * 2 / 8 + 1 * 2 / 4) / 12
    assert result.expected == pytest.approx(expected)
    assert result.ratio == pytest.approx((2 / 12) / expected)
    assert 0.0 <= result.p_value <= 1.0


def test_null_mean_matches_analytic_expectation():
    size = np.array([1000, 500, 64, 4096])
    kept_a = np.array([100, 250, 3, 40])
    kept_b = np.array([300, 10, 60, 4000])
    samples = null_overlap_samples(size, kept_a, kept_b, n_random=20_000, seed=1)
    analytic = float(np.sum(kept_a * kept_b / size))
    # analytic variance of a sum of independent hypergeometrics, for the tolerance
    var = np.sum(kept_b * (kept_a / size) * (1 - kept_a / size) * (size - kept_b) / (size - 1))
    assert abs(samples.mean() - analytic) < 5 * np.sqrt(var / samples.size)
    assert samples.var() == pytest.approx(var, rel=0.1)


def test_null_matches_explicit_mask_drawing():
    """Per-block hypergeometric draws have the same distribution as drawing the masks."""
    shapes = {"blocks.0.attn.q.weight": (4, 5), "blocks.1.mlp.out.weight": (3, 4)}
    kept_a = {"blocks.0.attn.q.weight": 6, "blocks.1.mlp.out.weight": 5}
    kept_b = {"blocks.0.attn.q.weight": 9, "blocks.1.mlp.out.weight": 7}
    gen = torch.Generator().manual_seed(0)
    n = 6000
    explicit = np.empty(n, dtype=np.int64)
    for i in range(n):
        total = 0
        for key, shape in shapes.items():
            total += int((_random_mask(shape, kept_a[key], gen) & _random_mask(shape, kept_b[key], gen)).sum())
        explicit[i] = total
    keys = sorted(shapes)
    sampled = null_overlap_samples(
        np.array([np.prod(shapes[k]) for k in keys]),
        np.array([kept_a[k] for k in keys]),
        np.array([kept_b[k] for k in keys]),
        n_random=n,
        seed=0,
    )
    support = np.arange(0, 15)
    p_explicit = np.bincount(explicit, minlength=15)[:15] / n
    p_sampled = np.bincount(sampled, minlength=15)[:15] / n
    # same distribution: total variation distance small (sampling noise ~ 0.02 at n = 6000)
    assert 0.5 * np.abs(p_explicit - p_sampled).sum() < 0.04
    assert sampled.mean() == pytest.approx(explicit.mean(), abs=0.1)
    assert support.size == 15


def test_identical_subnetworks_are_significant_and_disjoint_are_not():
    gen = torch.Generator().manual_seed(3)
    a = {f"blocks.{i}.mlp.in.weight": _random_mask((32, 16), 50, gen) for i in range(3)}
    same = overlap(a, a, n_random=1000)
    assert same.frac_a_in_b == 1.0
    assert same.p_value == 0.0
    assert same.p_value_text == "< 1e-03"
    assert same.ratio > 5
    disjoint = overlap(a, {k: ~v for k, v in a.items()}, n_random=1000)
    assert disjoint.n_overlap == 0
    assert disjoint.p_value == 1.0


def test_fixed_blocks_do_not_need_sampling():
    # A keeps a whole block and B keeps nothing of another: overlap is fixed.
    counts = null_overlap_samples(np.array([10, 8]), np.array([10, 3]), np.array([4, 0]), n_random=50)
    assert np.all(counts == 4)
    with pytest.raises(ConfigError, match="n_random"):
        null_overlap_samples(np.array([10]), np.array([1]), np.array([1]), n_random=0)


def test_mismatched_subnetworks_are_refused():
    a = {"blocks.0.mlp.in.weight": torch.ones(3, 4, dtype=torch.bool)}
    with pytest.raises(MaskError):
        block_counts(a, {"blocks.0.mlp.in.weight": torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(MaskError):
        block_counts(a, {"blocks.1.mlp.in.weight": torch.ones(3, 4, dtype=torch.bool)})


def test_layer_distribution_weight_masks():
    masks = {
        "blocks.0.mlp.in.weight": torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool),  # 4
        "blocks.0.mlp.out.weight": torch.tensor([1, 1, 0, 0], dtype=torch.bool),  # 2
        "blocks.0.attn.q.weight": torch.tensor([1, 0], dtype=torch.bool),  # 1
        "blocks.0.attn.v.weight": torch.tensor([1, 1], dtype=torch.bool),  # 2
        "blocks.1.attn.k.weight": torch.tensor([1, 0], dtype=torch.bool),  # 1
    }
    table = layer_distribution(masks)
    indexed = table.set_index(["layer", "component"])
    assert indexed.loc[(0, "mlp"), "kept_params"] == 6
    assert indexed.loc[(0, "mlp"), "share"] == pytest.approx(0.6)
    assert indexed.loc[(0, "mlp"), "fraction_kept"] == pytest.approx(0.6)
    assert indexed.loc[(0, "attn"), "qk_params"] == 1
    assert indexed.loc[(0, "attn"), "vo_params"] == 2
    assert indexed.loc[(1, "attn"), "share"] == pytest.approx(0.1)
    assert table["share"].sum() == pytest.approx(1.0)
    assert table.attrs["mlp_share"] == pytest.approx(0.6)
    assert table.attrs["qk_share_of_attn"] == pytest.approx(0.5)
    assert table.attrs["plurality"] == "layer 0 mlp"


def test_layer_distribution_neuron_and_head_dicts_need_sizes():
    masks = {
        "blocks.0.mlp.hook_post": torch.tensor([1, 0, 1, 0], dtype=torch.bool),
        "blocks.0.attn.hook_z": torch.tensor([1, 0], dtype=torch.bool),
    }
    d_model, d_head = 8, 4
    table = layer_distribution(
        masks,
        params_per_entry={
            "blocks.0.mlp.hook_post": 2 * d_model,
            "blocks.0.attn.hook_z": 4 * d_model * d_head,
        },
    ).set_index(["layer", "component"])
    assert table.loc[(0, "mlp"), "kept_params"] == 2 * 2 * d_model
    assert table.loc[(0, "attn"), "kept_params"] == 4 * d_model * d_head
    assert table.loc[(0, "attn"), "qk_params"] == table.loc[(0, "attn"), "vo_params"]
    with pytest.raises(MaskError):
        layer_distribution(masks)


# ---------------------------------------------------------------- real subnetworks


@pytest.fixture(scope="module")
def neox(tiny_neox):
    return tiny_neox[0]


def test_overlap_of_subnetworks_uses_their_blocks(neox):
    from bigram_circuits.subnetwork import Subnetwork

    gen = torch.Generator().manual_seed(0)
    full = Subnetwork.full(neox, ("neuron", "head"))
    a = Subnetwork.from_masks(neox, {k: torch.rand(m.shape, generator=gen) < 0.3 for k, m in full.masks.items()})
    b = Subnetwork.from_masks(
        neox,
        {k: (torch.rand(m.shape, generator=gen) < 0.3) | a.masks[k] for k, m in full.masks.items()},
    )
    result = overlap(a, b, n_random=2000)
    assert result.frac_a_in_b == 1.0
    assert result.n_entries == a.n_entries
    assert result.p_value < 0.01 and result.ratio > 1
    # a random control has the same kept count per block, so overlap with it is at chance
    control = overlap(a.random_control(1), b, n_random=2000)
    assert abs(control.fraction_overlap - control.expected) < 4 * control.null_std
    counts = block_counts(a, a.random_control(5))
    assert np.array_equal(counts.kept_a, counts.kept_b)


def test_layer_distribution_of_a_subnetwork_in_paper_units(neox):
    from bigram_circuits.subnetwork import Subnetwork

    geo_full = Subnetwork.full(neox, ("neuron", "head"))
    masks = {k: torch.zeros_like(m) for k, m in geo_full.masks.items()}
    masks["blocks.0.mlp.hook_post"][:3] = True  # 3 neurons of layer 0
    masks["blocks.1.attn.hook_z"][0] = True  # 1 head of layer 1
    sub = Subnetwork.from_masks(neox, masks)
    geo = sub.geometry
    table = layer_distribution(sub).set_index(["layer", "component"])
    # neurons and heads only keep weights where both their neuron and head masks agree:
    # layer 0 attention and layer 1 MLP keep nothing, so layer-0 neurons and layer-1 heads keep all.
    assert table.loc[(0, "mlp"), "kept_params"] == 3 * 2 * geo.d_model
    assert table.loc[(1, "attn"), "kept_params"] == 4 * geo.d_model * geo.d_head
    assert table.loc[(1, "attn"), "qk_params"] == table.loc[(1, "attn"), "vo_params"]
    assert table.loc[(0, "attn"), "kept_params"] == 0
    assert table["kept_params"].sum() == sub.n_params()
    assert table["share"].sum() == pytest.approx(1.0)
