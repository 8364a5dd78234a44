"""Mask granularities, parameterisations and attachment on tiny GPT-NeoX, GPT-2 and LLaMA bridges."""

from __future__ import annotations

import math

import pytest
import torch

from bigram_circuits.errors import MaskError
from bigram_circuits.masks import (
    GRANULARITIES,
    ContinuousSparsification,
    ForwardMasks,
    HardConcrete,
    MaskKey,
    MaskParameterization,
    MaskSet,
    apply_binary_masks,
    attach_masks,
    author_dict_to_weight_masks,
    expand_to_weight_masks,
    mask_components,
    masks_attached,
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
        by_hand = bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{L}.attn.hook_z", zero_heads) for L in range(2)])
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
    with pytest.MonkeyPatch.context() as patch:  # counted in chunks that split every tensor
        patch.setattr("bigram_circuits.masks.maskset._COUNT_CHUNK", 7)
        assert mask_set.decision_counts()[:2] == (undecided, on)

    mask_set.eval()  # deterministic gates, so both forward passes see the same mask
    grads = []
    for reuse in (False, True):
        mask_set.zero_grad()
        with mask_set.attach(bridge) as used:
            logits = bridge(_tokens(8))
        (logits.square().mean() + 3.0 * mask_set.penalty(used if reuse else None)).backward()
        grads.append({k: mask_set.logit(k).grad.clone() for k in mask_set.keys})
    bridge.zero_grad(set_to_none=True)  # the bridge fixture is shared: leave no base-weight grads
    for key in mask_set.keys:
        assert torch.allclose(grads[0][key], grads[1][key], rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- mask keys


@pytest.fixture(scope="module")
def default_bridge():
    from bigram_circuits.models import load_model

    return load_model("default")[0]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_every_key_of_the_default_model_round_trips(default_bridge, granularity):
    components = mask_components(default_bridge, granularity)
    assert components
    for c in components:
        key = MaskKey.parse(c.key)
        assert str(key) == c.key and key == c.mask_key
        assert (key.layer, key.block, key.kind, key.granularity) == (c.layer, c.block, c.kind, granularity)
        if granularity == "weight":
            assert key.parameter_name == c.key and key == MaskKey.weight(c.layer, c.kind)
        else:
            assert key.hook_name == c.key and key.hook_name in default_bridge.hook_dict
            assert key == MaskKey.unit(granularity, c.layer)


def test_key_strings_are_the_saved_ones():
    assert str(MaskKey.head(3)) == "blocks.3.attn.hook_z"
    assert str(MaskKey.neuron(0)) == "blocks.0.mlp.hook_post"
    assert str(MaskKey.weight(11, "q")) == "blocks.11.attn.q.weight"
    assert str(MaskKey.weight(2, "gate")) == "blocks.2.mlp.gate.weight"
    assert MaskKey.hook_template("head").format(layer=4) == "blocks.4.attn.hook_z"
    assert MaskKey.is_unit_key("blocks.1.mlp.hook_post") and not MaskKey.is_unit_key("blocks.1.mlp.in.weight")
    assert sorted([MaskKey.neuron(1), MaskKey.head(0)]) == [MaskKey.head(0), MaskKey.neuron(1)]


@pytest.mark.parametrize(
    "text",
    [
        "blocks.0.attn.hook_post",
        "blocks.0.mlp.hook_z",
        "blocks.0.attn.in.weight",
        "blocks.0.mlp.q.weight",
        "blocks.01.attn.hook_z",
        "blocks.-1.attn.hook_z",
        "blocks.0.attn.q",
        "blocks.0.attn.hook_z.weight",
        "blocks.0.attn.hook_z ",
        "blocks.x.mlp.hook_post",
        "0.attn.hook_z",
        "",
        "blocks.0.attn.qq.weight",
    ],
)
def test_malformed_keys_are_refused(text):
    assert MaskKey.try_parse(text) is None and not MaskKey.is_unit_key(text)
    with pytest.raises(MaskError, match="unknown mask key"):
        MaskKey.parse(text)


@pytest.mark.usefixtures("no_runtime_typecheck")  # wrongly typed arguments on purpose
def test_inconsistent_keys_cannot_be_built():
    with pytest.raises(MaskError):
        MaskKey(0, "mlp", "head")
    with pytest.raises(MaskError):
        MaskKey(-1, "attn", "head")
    with pytest.raises(MaskError):
        MaskKey.unit("weight", 0)
    with pytest.raises(MaskError, match="not a hook point"):
        _ = MaskKey.weight(0, "q").hook_name
    with pytest.raises(MaskError, match="not a weight matrix"):
        _ = MaskKey.head(0).parameter_name


# --------------------------------------------------------------------------- one way to apply masks


def _no_mask_trace(bridge) -> bool:
    from torch.nn.utils import parametrize

    hooks = any(hp.fwd_hooks or hp.bwd_hooks for hp in bridge.hook_dict.values())
    parametrized = any(parametrize.is_parametrized(m) for m in bridge.modules())
    return not hooks and not parametrized and not masks_attached(bridge)


def test_masks_are_gone_after_the_block_even_when_it_raises(model):
    bridge, _ = model
    tokens = _tokens(9)
    comps = mask_components(bridge, ALL)
    zeros = {c.key: torch.zeros(c.shape, dtype=torch.bool) for c in comps}
    with torch.no_grad():
        reference = bridge(tokens)
        with pytest.raises(RuntimeError, match="inside"), attach_masks(bridge, comps, _constant(zeros)):
            assert not torch.allclose(bridge(tokens), reference)
            raise RuntimeError("inside")
        assert _no_mask_trace(bridge)
        assert torch.equal(bridge(tokens), reference)
        mask_set = MaskSet.for_model(bridge, ALL, init=-3.0)
        with mask_set.attach(bridge):
            assert not torch.allclose(bridge(tokens), reference)
        assert _no_mask_trace(bridge)
        assert torch.equal(bridge(tokens), reference)


def test_nested_or_repeated_application_is_refused_and_leaves_the_outer_one(tiny_neox):
    """Documented: one mask application per bridge at a time, whatever applies it."""
    from bigram_circuits.circuits.ablation import Candidate
    from bigram_circuits.subnetwork import Subnetwork

    bridge, _ = tiny_neox
    tokens = _tokens(10)
    sub = Subnetwork.empty(bridge, ("neuron", "head"))
    mask_set = MaskSet.for_model(bridge, ALL)
    inner = [
        lambda: mask_set.attach(bridge),
        lambda: sub.applied(bridge),
        lambda: Candidate(heads=[(0, 1)]).applied(bridge),
        lambda: apply_binary_masks(bridge, {"blocks.0.attn.hook_z": torch.ones(4, dtype=torch.bool)}),
    ]
    with torch.no_grad():
        with sub.applied(bridge):
            masked = bridge(tokens)
            for make in inner:
                with pytest.raises(MaskError, match="already applied"), make():
                    pass
                assert masks_attached(bridge)
                assert torch.equal(bridge(tokens), masked)  # the outer masks are untouched
        assert _no_mask_trace(bridge)
        with sub.applied(bridge):  # and the bridge can be masked again afterwards
            assert torch.equal(bridge(tokens), masked)


def test_masks_do_not_rely_on_add_hooks_return_value(tiny_gpt2, monkeypatch):
    """TransformerLens main's ``HookPoint.add_hook`` returns nothing; removal goes by level."""
    from transformer_lens.hook_points import HookPoint

    bridge, _ = tiny_gpt2
    original = HookPoint.add_hook

    def add_hook_returning_none(self, *args, **kwargs):
        original(self, *args, **kwargs)

    monkeypatch.setattr(HookPoint, "add_hook", add_hook_returning_none)
    tokens = _tokens(11)
    comps = mask_components(bridge, ("neuron", "head"))
    with torch.no_grad():
        reference = bridge(tokens)
        with attach_masks(bridge, comps, _constant(_random_binary(comps, seed=2))):
            masked = bridge(tokens)
        assert _no_mask_trace(bridge)
        assert torch.equal(bridge(tokens), reference) and not torch.allclose(masked, reference)


def test_user_hooks_inside_the_block_see_masked_activations_and_stay_theirs(tiny_neox):
    bridge, _ = tiny_neox
    comps = mask_components(bridge, "neuron")
    zeros = {c.key: torch.zeros(c.shape, dtype=torch.bool) for c in comps}
    seen = []
    with torch.no_grad(), attach_masks(bridge, comps, _constant(zeros)):
        with bridge.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", lambda act, hook: seen.append(act.abs().max()))]):
            bridge(_tokens(12))
        _, cache = bridge.run_with_cache(_tokens(12), names_filter=["blocks.1.mlp.hook_post"])
        assert len(bridge.hook_dict["blocks.0.mlp.hook_post"].fwd_hooks) == 1  # only the mask is left
    assert float(seen[0]) == 0.0 and float(cache["blocks.1.mlp.hook_post"].abs().max()) == 0.0
    assert _no_mask_trace(bridge)


# --------------------------------------------------------------------------- parameterizations


@pytest.mark.parametrize("cls", [ContinuousSparsification, HardConcrete])
def test_both_parameterizations_satisfy_the_protocol(cls):
    strategy = cls()
    assert isinstance(strategy, MaskParameterization)
    logits = torch.linspace(-3, 3, 7)
    for p in (0.1, 0.5, 0.9):
        at = torch.tensor([strategy.logit_at(p, 2.0)])
        assert torch.allclose(strategy.probability(at, 2.0), torch.tensor([p]))
    sample = strategy.sample(logits, 2.0, False, None)
    assert sample.shape == logits.shape and bool(((sample >= 0) & (sample <= 1)).all())
    assert strategy.sample_is_probability == torch.equal(sample, strategy.probability(logits, 2.0))


@pytest.mark.usefixtures("no_runtime_typecheck")  # wrongly typed arguments on purpose
def test_mask_set_takes_a_strategy_instance(tiny_neox):
    bridge, _ = tiny_neox
    by_name = MaskSet.for_model(bridge, "head", "hard_concrete")
    strategy = HardConcrete()
    by_instance = MaskSet.for_model(bridge, "head", strategy)
    assert by_instance.parameterization is strategy and by_instance.generator is not None
    assert by_name.state_dict().keys() == by_instance.state_dict().keys()
    with pytest.raises(MaskError, match="not a mask parameterization"):
        MaskSet.for_model(bridge, "head", object())
    with pytest.raises(MaskError, match="unknown parameterization"):
        MaskSet.for_model(bridge, "head", "sigmoid")


@pytest.mark.parametrize("parameterization", ["continuous", "hard_concrete"])
def test_penalty_does_not_depend_on_forward_passes(tiny_neox, parameterization):
    bridge, _ = tiny_neox
    mask_set = MaskSet.for_model(bridge, ALL, parameterization=parameterization)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key in mask_set.keys:
            mask_set.logit(key).copy_(torch.randn(mask_set.logit(key).shape, generator=gen))
    mask_set.train()
    before = mask_set.penalty().detach()
    with torch.no_grad(), mask_set.attach(bridge) as used:
        bridge(_tokens(13))
        bridge(_tokens(14))  # every forward pass in the block shares one mask per key
    assert isinstance(used, ForwardMasks) and set(used) == set(mask_set.keys)
    assert torch.equal(mask_set.penalty().detach(), before)
    # Summed from the forward's masks: the same value (continuous) or ignored (hard concrete).
    assert torch.equal(mask_set.penalty(used).detach(), before)
    assert torch.equal(mask_set.penalty({}).detach(), before)


def test_an_eval_mode_bridge_stays_in_eval_mode_under_weight_masks(tiny_neox):
    """TransformerLens' analyses refuse a bridge with any submodule in training mode."""
    bridge, _ = tiny_neox
    bridge.eval()
    comps = mask_components(bridge, ALL)
    with attach_masks(bridge, comps, _constant({c.key: torch.ones(c.shape, dtype=torch.bool) for c in comps})):
        assert not any(m.training for m in bridge.modules())
        bridge.train()  # and train()/eval() reach the parametrizations without recursing
        bridge.eval()
    assert not any(m.training for m in bridge.modules())


@pytest.mark.parametrize("parameterization", ["continuous", "hard_concrete"])
def test_masked_weights_are_recomputed_for_the_backward_with_the_same_gradients(
    model, parameterization, monkeypatch, no_runtime_typecheck
):
    """Autograd keeps a recipe instead of any masked weight it saves for the backward; for
    continuous masks the soft masks are not kept either (the sigmoid is recomputed, and the
    recipe remakes the mask from the logits). The gradients are bitwise those of keeping it all,
    and each mask is still computed once per forward pass (run-time type checks off: beartype
    reads a sample item of a Mapping argument, which would remake a freed mask)."""
    import weakref

    from bigram_circuits.masks.hooks import _MaskedWeights

    bridge, _ = model
    tokens = _tokens(3, batch=2, seq=10)
    pack, product = _MaskedWeights.pack, _MaskedWeights.product

    def gradients(lean: bool) -> tuple[dict[str, torch.Tensor], dict]:
        with monkeypatch.context() as patch:
            mask_set = MaskSet.for_model(bridge, "weight", parameterization=parameterization)
            mask_set.seed(5)
            mask_set.train()
            products, seen = [], {"recipes": 0, "kept_products": 0, "remade": 0, "computed": []}

            def made(self, weight, mask, remake=None):
                out = product(self, weight, mask, remake if lean else None)
                products.append(weakref.ref(out))
                seen["remade"] += remake is not None and lean
                return out

            def counted(self, tensor):
                packed = pack(self, tensor) if lean else tensor
                if packed is not tensor:
                    seen["recipes"] += 1
                elif any(
                    (live := ref()) is not None
                    and live.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
                    for ref in products
                ):
                    seen["kept_products"] += 1  # autograd holds a masked weight (or a view of one)
                return packed

            patch.setattr(_MaskedWeights, "pack", counted)
            patch.setattr(_MaskedWeights, "product", made)
            compute = mask_set.forward_masks_of
            patch.setattr(mask_set, "forward_masks_of", lambda key: (seen["computed"].append(key), compute(key))[1])
            if not lean:  # recompute off: torch's sigmoid, masks kept by the block and by autograd
                mask_set.recompute = False
            frozen = [p for p in bridge.parameters() if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
            try:
                with mask_set.attach(bridge) as used:
                    logits = bridge(tokens)
                seen["masks_alive"] = sum(used._alive(key) is not None for key in used)  # until the backward
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
                (loss + mask_set.penalty(used)).backward()
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            return {key: mask_set.logit(key).grad.clone() for key in mask_set.keys}, seen

    lean, seen = gradients(lean=True)
    assert seen["recipes"] > 0 and seen["kept_products"] == 0
    assert sorted(seen["computed"]) == sorted(lean)  # one mask per key and forward pass
    continuous = parameterization == "continuous"
    assert (seen["remade"] > 0) == continuous  # remade from the logits
    assert seen["masks_alive"] == (0 if continuous else len(lean))  # hard concrete keeps its noise draws
    kept, seen = gradients(lean=False)  # what autograd would hold otherwise
    assert seen["recipes"] == 0 and seen["masks_alive"] == len(kept)  # nothing recomputed, all kept
    for key in kept:
        assert torch.equal(lean[key], kept[key]), key


def test_a_weight_changed_in_place_before_the_backward_is_refused(tiny_neox):
    """With the masked weights recomputed, an in-place change between forward and backward
    would silently change the gradients; it is refused as autograd refuses it for kept tensors."""
    bridge, _ = tiny_neox
    mask_set = MaskSet.for_model(bridge, "weight")
    frozen = [p for p in bridge.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with mask_set.attach(bridge):
            logits = bridge(_tokens(2, batch=2, seq=8))
        with torch.no_grad():
            for p in frozen:
                p.add_(0.0)  # bumps every weight's version, values unchanged
        with pytest.raises(MaskError, match="modified in place"):
            logits.sum().backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
