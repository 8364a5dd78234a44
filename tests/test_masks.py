"""Mask granularities, parameterisations and attachment on tiny GPT-NeoX, GPT-2 and LLaMA bridges."""

from __future__ import annotations

import math

import pytest
import torch

from bigram_circuits.errors import MaskError
from bigram_circuits.masks import (
    HardConcrete,
    MaskSet,
    attach_masks,
    author_dict_to_weight_masks,
    expand_to_weight_masks,
    mask_components,
    model_geometry,
    parse_granularities,
    weight_masks_to_author_dict,
)

MODELS = ["tiny_neox", "tiny_gpt2", "tiny_llama"]
ALL = ("neuron", "head", "weight")


@pytest.fixture(params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


def _tokens(seed: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 300, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _constant(masks: dict[str, torch.Tensor]):
    floats = {k: v.float() for k, v in masks.items()}
    return lambda key: floats[key]


def _random_binary(components, p: float = 0.6, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {c.key: torch.rand(c.shape, generator=gen) < p for c in components}


def test_parse_granularities():
    assert parse_granularities("head,neuron") == ("neuron", "head")
    assert parse_granularities(["weight"]) == ("weight",)
    with pytest.raises(MaskError):
        parse_granularities("neurons")


def test_components_cover_every_projection(model):
    bridge, _ = model
    geo = model_geometry(bridge)
    comps = mask_components(bridge, ALL)
    kinds = {c.kind for c in comps if c.layer == 0}
    expected = {"neuron", "head", "q", "k", "v", "o", "in", "out"} | ({"gate"} if geo.gated_mlp else set())
    assert kinds == expected
    # The paper unit: neuron and head masks gate exactly the weights of the matrices they cover.
    weight_total = sum(c.total_params for c in comps if c.granularity == "weight")
    unit_total = sum(c.total_params for c in comps if c.granularity != "weight")
    assert math.isclose(weight_total, unit_total)


def test_all_ones_reproduces_unmasked_logits_exactly(model):
    bridge, _ = model
    tokens = _tokens()
    with torch.no_grad():
        reference = bridge(tokens)
        comps = mask_components(bridge, ALL)
        ones = {c.key: torch.ones(c.shape, dtype=torch.bool) for c in comps}
        with attach_masks(bridge, comps, _constant(ones)):
            masked = bridge(tokens)
        mask_set = MaskSet.for_model(bridge, ALL, init=50.0)  # sigmoid(50) == 1.0 in float32
        with mask_set.attach(bridge):
            soft_masked = bridge(tokens)
    assert torch.equal(masked, reference)
    assert torch.equal(soft_masked, reference)


def test_zero_neuron_and_head_masks_equal_zeroing_hooks_by_hand(model):
    bridge, _ = model
    tokens = _tokens(1)
    for granularity, hook_suffix in (("neuron", "mlp.hook_post"), ("head", "attn.hook_z")):
        comps = mask_components(bridge, granularity)
        zeros = {c.key: torch.zeros(c.shape, dtype=torch.bool) for c in comps}
        with torch.no_grad():
            with attach_masks(bridge, comps, _constant(zeros)):
                masked = bridge(tokens)
            hooks = [(f"blocks.{L}.{hook_suffix}", lambda act, hook: act * 0.0) for L in range(bridge.cfg.n_layers)]
            by_hand = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        assert torch.allclose(masked, by_hand, atol=1e-6)


def test_partial_head_mask_matches_zeroing_those_heads(tiny_neox):
    bridge, _ = tiny_neox
    tokens = _tokens(2)
    comps = mask_components(bridge, "head")
    keep = {c.key: torch.tensor([True, False, True, False]) for c in comps}

    def zero_heads(act, hook):
        act = act.clone()
        act[:, :, [1, 3]] = 0.0
        return act

    with torch.no_grad():
        with attach_masks(bridge, comps, _constant(keep)):
            masked = bridge(tokens)
        by_hand = bridge.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.{L}.attn.hook_z", zero_heads) for L in range(2)]
        )
    assert torch.allclose(masked, by_hand, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_weight_masks_match_masked_hf_model(name, request):
    """Weight masks act on the matrices the forward uses, in the authors' HF layout."""
    from transformers import AutoModelForCausalLM

    bridge, _ = request.getfixturevalue(name)
    reference = AutoModelForCausalLM.from_pretrained(str(request.getfixturevalue(f"{name}_dir"))).eval()
    comps = mask_components(bridge, "weight")
    masks = _random_binary(comps, p=0.7)
    author = weight_masks_to_author_dict(model_geometry(bridge), masks)
    state = reference.state_dict()
    with torch.no_grad():
        for param_name, mask in author.items():
            state[param_name].mul_(torch.from_numpy(mask).to(state[param_name].dtype))
    tokens = _tokens(3)
    with torch.no_grad():
        expected = reference(tokens).logits
        with attach_masks(bridge, comps, _constant(masks)):
            got = bridge(tokens)
    assert torch.allclose(got, expected, atol=1e-5)


def test_neuron_head_masks_equal_their_weight_expansion(model):
    bridge, _ = model
    comps = mask_components(bridge, ("neuron", "head"))
    masks = _random_binary(comps, p=0.5, seed=4)
    expanded = expand_to_weight_masks(model_geometry(bridge), {c.key: c for c in comps}, masks)
    weight_comps = mask_components(bridge, "weight")
    tokens = _tokens(5)
    with torch.no_grad():
        with attach_masks(bridge, comps, _constant(masks)):
            by_unit = bridge(tokens)
        with attach_masks(bridge, weight_comps, _constant(expanded)):
            by_weight = bridge(tokens)
    assert torch.allclose(by_unit, by_weight, atol=1e-5)


def test_author_dict_round_trip(model):
    bridge, _ = model
    geo = model_geometry(bridge)
    comps = mask_components(bridge, "weight")
    masks = _random_binary(comps, seed=7)
    back = author_dict_to_weight_masks(geo, weight_masks_to_author_dict(geo, masks))
    assert set(back) == set(masks)
    for key in masks:
        assert torch.equal(back[key], masks[key])


@pytest.mark.parametrize("parameterization", ["continuous", "hard_concrete"])
def test_gradients_reach_every_mask_entry(model, parameterization):
    bridge, _ = model
    mask_set = MaskSet.for_model(bridge, ALL, parameterization=parameterization)
    mask_set.train()
    frozen = [p for p in bridge.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # as the search does: base weights frozen
    with mask_set.attach(bridge):
        logits = bridge(_tokens(6, batch=4, seq=16))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), _tokens(6, 4, 16)[:, 1:].flatten())
    (loss + mask_set.penalty()).backward()
    for p in frozen:
        p.requires_grad_(True)
    for key in mask_set.keys:
        grad = mask_set.logit(key).grad
        assert grad is not None and torch.isfinite(grad).all(), key
        assert (grad != 0).all(), f"{key}: {(grad == 0).sum()} entries got no gradient"
    assert all(p.grad is None for p in bridge.parameters())


def test_attach_is_exclusive_and_leaves_no_trace(tiny_neox):
    bridge, _ = tiny_neox
    names_before = [n for n, _ in bridge.named_parameters()]
    mask_set = MaskSet.for_model(bridge, ALL)
    with mask_set.attach(bridge):
        with pytest.raises(MaskError), mask_set.attach(bridge):
            pass
        bridge.reset_hooks()  # user calls must not strip the masks
        assert bridge.hook_dict["blocks.0.mlp.hook_post"].fwd_hooks
    assert [n for n, _ in bridge.named_parameters()] == names_before
    assert not any(hp.fwd_hooks for hp in bridge.hook_dict.values())


def test_exact_zero_weights_are_never_kept(tiny_neox_dir):
    from bigram_circuits.models import load_model

    bridge, _ = load_model(tiny_neox_dir)
    comps = {c.key: c for c in mask_components(bridge, "weight")}
    with torch.no_grad():
        bridge.blocks[0].attn.q.original_component.weight[0, :5] = 0.0
    mask_set = MaskSet.for_model(bridge, "weight", init=1.0)
    binary = mask_set.binary()
    assert not binary["blocks.0.attn.q.weight"][0, :5].any()
    assert binary["blocks.0.attn.q.weight"][0, 5:].all()
    assert float(mask_set.soft()["blocks.0.attn.q.weight"][0, :5].max()) == 0.0
    assert comps["blocks.0.attn.q.weight"].shape == (32, 32)


def test_density_and_top_k(tiny_gpt2):
    bridge, _ = tiny_gpt2
    mask_set = MaskSet.for_model(bridge, ("neuron", "head"))
    with torch.no_grad():
        for i, key in enumerate(mask_set.keys):
            mask_set.logit(key).copy_(torch.linspace(-1, 1, mask_set.logit(key).numel()) + 0.01 * i)
    table = mask_set.density()
    assert set(table["key"]) == set(mask_set.keys)
    assert ((table.hard_density > 0.4) & (table.hard_density < 0.6)).all()
    assert (table.soft_density.between(0.4, 0.6)).all()
    top = mask_set.binary(top_k=10)
    assert sum(int(m.sum()) for m in top.values()) == 10
    with pytest.raises(MaskError):
        mask_set.binary(top_k=10**9)


def test_hard_concrete_gates():
    hc = HardConcrete()
    logits = torch.zeros(10_000)
    sampled = hc.sample(logits, 1.0, training=True, generator=torch.Generator().manual_seed(0))
    assert sampled.min() == 0.0 and sampled.max() == 1.0
    p_zero = float((sampled == 0).float().mean())
    # Closed form: P(gate == 0) = sigmoid(beta * log(-gamma / zeta) - log_alpha).
    expected_zero = 1 - float(hc.probability(torch.zeros(1), 1.0))
    assert abs(p_zero - expected_zero) < 0.02
    assert torch.allclose(hc.sample(logits, 1.0, training=False, generator=None), torch.full_like(logits, 0.5))


@pytest.mark.parametrize("parameterization", ["continuous", "hard_concrete"])
def test_decision_counts_and_penalty_reuse(tiny_neox, parameterization):
    bridge, _ = tiny_neox
    mask_set = MaskSet.for_model(bridge, ("neuron", "head", "weight"), parameterization=parameterization)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key in mask_set.keys:
            mask_set.logit(key).copy_(torch.randn(mask_set.logit(key).shape, generator=gen) * 3)
    mask_set.temperature = 1.7
    probs = mask_set.soft()
    on = sum(int((p > 0.9).sum()) for p in probs.values())
    undecided = sum(int(((p >= 0.1) & (p <= 0.9)).sum()) for p in probs.values())
    assert mask_set.decision_counts()[:2] == (undecided, on)

    mask_set.eval()  # deterministic gates, so both forward passes see the same mask
    grads = []
    for reuse in (False, True):
        mask_set.zero_grad()
        with mask_set.attach(bridge):
            logits = bridge(_tokens(8))
        (logits.square().mean() + 3.0 * mask_set.penalty(reuse_forward_masks=reuse)).backward()
        grads.append({k: mask_set.logit(k).grad.clone() for k in mask_set.keys})
    bridge.zero_grad(set_to_none=True)  # the bridge fixture is shared: leave no base-weight grads
    for key in mask_set.keys:
        assert torch.allclose(grads[0][key], grads[1][key], rtol=1e-5, atol=1e-9)
