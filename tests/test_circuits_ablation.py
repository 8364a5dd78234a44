"""Candidate circuits: head scores, sufficiency on top of a subnetwork, necessity in the full model."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from circuit_doubles import MaskedUnits, random_units

from bigram_circuits.circuits.ablation import (
    Candidate,
    RepeatedSequenceLoss,
    add_candidate,
    find_induction_heads,
    head_scores,
    necessity,
    repeated_random_tokens,
    repeated_sequence_loss,
    select_heads,
    sufficiency,
)
from bigram_circuits.errors import ConfigError, MaskError, TokenError

VOCAB = 300


def test_candidate_masks_and_validation(tiny_neox):
    bridge, _ = tiny_neox
    candidate = Candidate("c", heads=[(1, 2), (0, 1), (1, 2)], neurons=[(0, 5)])
    assert candidate.heads == ((0, 1), (1, 2)) and candidate.n_neurons == 1
    masks = candidate.masks(bridge)
    assert set(masks) == {"blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post"}
    assert masks["blocks.1.attn.hook_z"].tolist() == [False, False, True, False]
    assert int(masks["blocks.0.mlp.hook_post"].sum()) == 1
    with pytest.raises(MaskError, match="does not exist"):
        Candidate(heads=[(5, 0)]).masks(bridge)
    with pytest.raises(MaskError):
        Candidate()


def test_candidate_ablation_zeroes_exactly_its_units(tiny_neox):
    bridge, _ = tiny_neox
    candidate = Candidate(heads=[(0, 1), (1, 3)], neurons=[(1, 7)])
    tokens = repeated_random_tokens(VOCAB, 6, 2, seed=0)
    double = MaskedUnits(candidate.masks(bridge))
    with torch.no_grad():
        with candidate.applied(bridge, "ablate"):
            ours = bridge(tokens)
        with double.applied(bridge, "ablate"):
            reference = bridge(tokens)
        with candidate.applied(bridge, "keep"):
            kept = bridge(tokens)
        full = bridge(tokens)
    torch.testing.assert_close(ours, reference)
    assert not torch.allclose(ours, full) and not torch.allclose(kept, full)
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), full)  # hooks removed afterwards


def test_add_candidate_ors_into_the_base_masks(tiny_neox):
    bridge, _ = tiny_neox
    base = random_units(bridge, keep_fraction=0.3, seed=4)
    base.masks.pop("blocks.1.mlp.hook_post")  # layer-1 neurons are not gated by this base
    candidate = Candidate("ind", heads=[(1, 0), (1, 1)], neurons=[(0, 2), (1, 9)])
    combined = add_candidate(base, candidate, bridge)
    assert type(combined) is MaskedUnits and combined is not base
    for key, mask in base.masks.items():
        extra = candidate.masks(bridge).get(key, torch.zeros_like(mask))
        assert torch.equal(combined.masks[key], mask | extra)
    assert "blocks.1.mlp.hook_post" not in combined.masks
    assert combined.metadata["added_candidate"] == "ind"
    with pytest.raises(MaskError, match="no mask"):
        add_candidate(base, Candidate(weights={"blocks.0.mlp.in.weight": torch.ones(2, 2)}), bridge)


@pytest.mark.usefixtures("no_runtime_typecheck")  # bases without the interface on purpose
def test_add_candidate_needs_the_masked_subnetwork_interface(tiny_neox):
    """``add_candidate`` asks its base only for ``masks``, ``metadata`` and ``with_masks``."""
    from bigram_circuits.circuits.runs import MaskedSubnetwork
    from bigram_circuits.subnetwork import Subnetwork

    bridge, _ = tiny_neox
    assert isinstance(random_units(bridge), MaskedSubnetwork)
    assert isinstance(Subnetwork.empty(bridge, ("neuron", "head")), MaskedSubnetwork)

    class MasksOnly:
        def __init__(self):
            self.masks = {"blocks.0.attn.hook_z": torch.zeros(4, dtype=torch.bool)}

    for base in (MasksOnly(), object()):
        with pytest.raises(MaskError, match="cannot copy itself"):
            add_candidate(base, Candidate(heads=[(0, 1)]), bridge)
    with pytest.raises(MaskError, match="no mask"):
        add_candidate(random_units(bridge), Candidate(weights={"not a key": torch.ones(2)}), bridge)


def test_candidate_ablation_equals_zeroing_by_hand(tiny_gpt2):
    bridge, _ = tiny_gpt2
    candidate = Candidate(heads=[(0, 1), (1, 3)], neurons=[(1, 7)])
    tokens = repeated_random_tokens(VOCAB, 6, 2, seed=1)

    def zero(index):
        def hook(act, hook):
            act = act.clone()
            act[:, :, index] = 0.0
            return act

        return hook

    by_hand = [
        ("blocks.0.attn.hook_z", zero([1])),
        ("blocks.1.attn.hook_z", zero([3])),
        ("blocks.1.mlp.hook_post", zero([7])),
    ]
    with torch.no_grad():
        expected = bridge.run_with_hooks(tokens, fwd_hooks=by_hand)
        with candidate.applied(bridge, "ablate"):
            got = bridge(tokens)
    torch.testing.assert_close(got, expected)


def test_add_candidate_to_a_weight_subnetwork(tiny_neox):
    """Heads / neurons added to a weight-granularity subnetwork switch on the weights they use."""
    from bigram_circuits.subnetwork import Subnetwork

    bridge, _ = tiny_neox
    base = Subnetwork.empty(bridge, ("weight",))
    candidate = Candidate("c", heads=[(1, 2)], neurons=[(0, 5)])
    combined = add_candidate(base, candidate, bridge)
    assert isinstance(combined, Subnetwork) and combined.granularities == ("weight",)
    unit_masks = {**Subnetwork.empty(bridge, ("neuron", "head")).masks, **candidate.masks(bridge)}
    units = Subnetwork.from_masks(bridge, unit_masks).to_weight_masks()
    for key in (
        "blocks.1.attn.q.weight",
        "blocks.1.attn.v.weight",
        "blocks.1.attn.o.weight",
        "blocks.0.mlp.in.weight",
        "blocks.0.mlp.out.weight",
    ):
        assert torch.equal(combined.masks[key], units[key]), key
    assert int(combined.masks["blocks.0.attn.q.weight"].sum()) == 0
    extra = torch.zeros_like(base.masks["blocks.0.mlp.in.weight"])
    extra[0, 0] = True
    weighted = add_candidate(base, Candidate(weights={"blocks.0.mlp.in.weight": extra}), bridge)
    assert int(weighted.masks["blocks.0.mlp.in.weight"].sum()) == 1


def test_random_control_same_shape_avoiding_exclusions(tiny_neox):
    bridge, _ = tiny_neox
    candidate = Candidate(heads=[(1, 0), (1, 1)], neurons=[(0, 3)])
    exclude = {"blocks.1.attn.hook_z": torch.tensor([False, False, True, False])}
    control = candidate.random_control(bridge, seed=0, exclude=exclude)
    assert control.n_heads == 2 and control.n_neurons == 1
    # layer 1 has only head 3 free, so one head comes from layer 0
    assert (1, 3) in control.heads and sum(layer == 0 for layer, _ in control.heads) == 1
    assert control.neurons[0][0] == 0 and control.neurons[0] != (0, 3)
    assert control == candidate.random_control(bridge, seed=0, exclude=exclude)


def test_repeated_sequences_and_loss(tiny_neox):
    bridge, _ = tiny_neox
    tokens = repeated_random_tokens(VOCAB, 5, 3, seed=1, prefix_token=0, low=1)
    assert tokens.shape == (3, 11) and (tokens[:, 0] == 0).all()
    assert torch.equal(tokens[:, 1:6], tokens[:, 6:])
    loss = repeated_sequence_loss(bridge, VOCAB, 5, 3, seed=1, prefix_token=0, low=1)
    with torch.no_grad():
        logp = torch.log_softmax(bridge(tokens)[..., :VOCAB].double(), -1)
    second = -logp[:, 6:-1].gather(-1, tokens[:, 7:].unsqueeze(-1)).mean()
    first = -logp[:, 1:5].gather(-1, tokens[:, 2:6].unsqueeze(-1)).mean()
    assert loss == pytest.approx(float(second))
    behaviour = RepeatedSequenceLoss(VOCAB, 5, 3, seed=1, prefix_token=0, low=1)(bridge)
    assert behaviour["second_half_loss"] == pytest.approx(loss)
    assert behaviour["first_half_loss"] == pytest.approx(float(first))
    assert behaviour["copy_gain"] == pytest.approx(float(first - second))
    pooled = repeated_random_tokens(VOCAB, 6, 4, pool=[7, 9])
    assert set(pooled.unique().tolist()) <= {7, 9}
    with pytest.raises(ConfigError, match="seq_len >= 2"):
        repeated_random_tokens(VOCAB, 1, 3)
    with pytest.raises(TokenError, match="pool"):
        repeated_random_tokens(VOCAB, 4, 3, pool=[VOCAB])


@contextlib.contextmanager
def _forced_patterns(bridge, seq_len: int):
    """Layer 1: head 0 attends to the previous token, head 1 is a perfect induction head."""

    def hook(pattern, hook):
        forced = pattern.clone()
        n = pattern.shape[-1]
        prev = torch.zeros(n, n)
        prev[0, 0] = 1.0
        prev[torch.arange(1, n), torch.arange(0, n - 1)] = 1.0
        induction = prev.clone()
        later = torch.arange(seq_len, n)
        induction[later] = 0.0
        induction[later, later - seq_len + 1] = 1.0
        forced[:, 0], forced[:, 1] = prev, induction
        return forced

    with bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", hook)]):
        yield bridge


class _Forced:
    def __init__(self, seq_len):
        self.seq_len = seq_len

    def applied(self, bridge, mode="keep"):
        return _forced_patterns(bridge, self.seq_len)


def test_head_scores_find_planted_heads(tiny_neox):
    bridge, _ = tiny_neox
    scores = head_scores(bridge, VOCAB, seq_len=6, n_sequences=4, run=_Forced(6))
    by_head = scores.set_index(["layer", "head"])
    assert by_head.loc[(1, 0), "previous_token_score"] == pytest.approx(1.0)
    assert by_head.loc[(1, 1), "induction_score"] == pytest.approx(1.0)
    assert by_head.loc[(1, 0), "induction_score"] == pytest.approx(0.0)
    assert (
        (
            (scores[["previous_token_score", "induction_score"]] >= 0)
            & (scores[["previous_token_score", "induction_score"]] <= 1 + 1e-9)
        )
        .all()
        .all()
    )
    assert select_heads(scores, "induction_score", top_k=1) == [(1, 1)]
    assert select_heads(scores, "previous_token_score", threshold=0.99) == [(1, 0)]
    with pytest.raises(MaskError):
        select_heads(scores, "induction_score")


def test_find_induction_heads_returns_a_candidate(tiny_neox):
    bridge, _ = tiny_neox
    candidate, scores = find_induction_heads(
        bridge, VOCAB, top_k=2, seq_len=6, n_sequences=4, include_previous_token_heads=False
    )
    assert candidate.n_heads == 2 and len(scores) == bridge.cfg.n_layers * bridge.cfg.n_heads
    with pytest.raises(MaskError, match="lower induction_threshold"):
        find_induction_heads(
            bridge,
            VOCAB,
            induction_threshold=1.5,
            previous_token_threshold=1.5,
            seq_len=6,
            n_sequences=4,
        )


def test_sufficiency_and_necessity_tables(tiny_neox):
    bridge, _ = tiny_neox
    base = random_units(bridge, keep_fraction=0.4, seed=7)
    candidate = Candidate("heads", heads=[(0, 0), (1, 2)])
    behaviour = RepeatedSequenceLoss(VOCAB, seq_len=6, n_sequences=4)
    table = sufficiency(bridge, base, candidate, behaviour, n_random_controls=1)
    assert list(table["run"]) == ["bigram", "bigram + heads", "bigram + random #0", "full"]
    values = table.set_index("run")["second_half_loss"]
    with base.applied(bridge, "keep"):
        assert values["bigram"] == pytest.approx(behaviour(bridge)["second_half_loss"])
    with add_candidate(base, candidate, bridge).applied(bridge, "keep"):
        assert values["bigram + heads"] == pytest.approx(behaviour(bridge)["second_half_loss"])
    assert values["full"] == pytest.approx(behaviour(bridge)["second_half_loss"])
    assert table.set_index("run").loc["bigram + heads", "heads"] == 2
    already_on = sum(bool(base.masks[f"blocks.{layer}.attn.hook_z"][head]) for layer, head in candidate.heads)
    assert table.set_index("run").loc["bigram + heads", "new_entries"] == 2 - already_on
    assert table.set_index("run").loc["bigram + random #0", "new_entries"] == 2  # controls avoid the base

    removed = necessity(
        bridge,
        candidate,
        lambda b: {
            "loss": behaviour(b)["second_half_loss"],
            "double": 2 * behaviour(b)["second_half_loss"],
        },
    )
    assert list(removed["run"]) == ["full", "full - heads", "full - random #0"]
    with MaskedUnits(candidate.masks(bridge)).applied(bridge, "ablate"):
        assert removed.set_index("run").loc["full - heads", "loss"] == pytest.approx(
            behaviour(bridge)["second_half_loss"]
        )
    np.testing.assert_allclose(removed["double"], 2 * removed["loss"])


def test_sufficiency_with_a_real_subnetwork(tiny_neox):
    from bigram_circuits.subnetwork import Subnetwork

    bridge, _ = tiny_neox
    generator = torch.Generator().manual_seed(0)
    base = Subnetwork.from_masks(
        bridge,
        {
            k: torch.rand(m.shape, generator=generator) < 0.3
            for k, m in Subnetwork.full(bridge, ("neuron", "head")).masks.items()
        },
    )
    candidate = Candidate("heads", heads=[(0, 3), (1, 1)])
    behaviour = RepeatedSequenceLoss(VOCAB, seq_len=6, n_sequences=4)
    table = sufficiency(bridge, base, candidate, lambda b: behaviour(b)["second_half_loss"], n_random_controls=0)
    table = table.set_index("run")
    assert list(table.index) == ["bigram", "bigram + heads", "full"]
    with base.applied(bridge, "keep"):
        assert table.loc["bigram", "behaviour"] == pytest.approx(behaviour(bridge)["second_half_loss"])
    assert table.loc["full", "behaviour"] == pytest.approx(behaviour(bridge)["second_half_loss"])
    assert table.loc["bigram + heads", "behaviour"] != pytest.approx(table.loc["bigram", "behaviour"])
