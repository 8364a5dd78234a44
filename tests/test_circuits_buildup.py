"""Candidates from three methods and the build-up experiment, on tiny models built in the tests."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from circuit_doubles import random_units

from bigram_circuits.app.buildup import BuildUpConfig, build_up_experiment, candidates_from_tables
from bigram_circuits.circuits.ablation import Candidate, add_candidate, repeated_sequence_losses
from bigram_circuits.circuits.buildup import (
    CONDITIONS,
    build_up,
    build_up_report,
    recovered_fraction,
    summarize_build_up,
)
from bigram_circuits.circuits.candidates import (
    attribution_scores,
    candidate_agreement,
    candidate_from_scores,
    head_score_candidates,
    method_head_table,
    patching_candidate,
    patching_scores,
    transformer_lens_version,
)
from bigram_circuits.circuits.overlap import candidate_weight_masks, circuit_overlap, circuit_placement
from bigram_circuits.circuits.patching import patch
from bigram_circuits.circuits.tasks import NameCopyingTask, RepetitionTask
from bigram_circuits.errors import ConfigError, MaskError
from bigram_circuits.subnetwork import Subnetwork

VOCAB = 300


def _score_table(values: dict[tuple[int, int], float]) -> pd.DataFrame:
    return pd.DataFrame([{"layer": layer, "head": head, "score": score} for (layer, head), score in values.items()])


def _single_token_words(tokenizer, count: int = 6) -> list[str]:
    """Words of the tiny vocabulary that are one token and occur in no name template."""
    from conftest import _WORDS

    from bigram_circuits.circuits.tasks import TEMPLATES

    used = {t for template in TEMPLATES for t in tokenizer.encode(template.format(a=" x", b=" y"))}
    words = [w for w in _WORDS if len(ids := tokenizer.encode(" " + w)) == 1 and ids[0] not in used]
    return list(dict.fromkeys(words))[:count]


def test_heads_with_their_layer_mlps_and_their_random_control(tiny_neox):
    bridge, _ = tiny_neox
    d_mlp, n_layers = int(bridge.cfg.d_mlp), int(bridge.cfg.n_layers)
    candidate = Candidate("c", heads=[(0, 1)], neurons=[(1, 2)]).with_layer_mlps(bridge)
    assert candidate.layer_mlps and candidate.heads == ((0, 1),)
    assert set(candidate.neurons) == {(0, n) for n in range(d_mlp)} | {(1, 2)}
    control = candidate.random_control(bridge, seed=0)
    assert control.layer_mlps and len(control.heads) == 1 and control.heads != candidate.heads
    assert control.heads[0][0] == 0  # as many heads per layer
    # the random head brings its layer's MLP; the candidate's other neuron is drawn as usual (one more)
    assert {(0, n) for n in range(d_mlp)} <= set(control.neurons)
    assert len(control.neurons) == d_mlp + 1 and n_layers > 1


@pytest.mark.usefixtures("no_runtime_typecheck")
def test_candidate_scores_and_top_k():
    scores = {("head", 0, 1): 0.2, ("head", 1, 3): 0.9, ("head", 1, 0): -0.5, ("neuron", 0, 4): 0.4}
    candidate = Candidate("c", heads=[(0, 1), (1, 3), (1, 0)], neurons=[(0, 4)], scores=scores)
    ranked = candidate.ranked()
    assert list(ranked["score"]) == [0.9, 0.4, 0.2, -0.5] and list(ranked["rank"]) == [1, 2, 3, 4]
    top = candidate.top_k(2)
    assert top.heads == ((1, 3),) and top.neurons == ((0, 4),) and top.scores == candidate.scores
    assert candidate.top_k(1, absolute=True).heads == ((1, 3),)
    assert candidate.top_k(2, absolute=True).heads == ((1, 0), (1, 3))
    unscored = Candidate("u", heads=[(0, 0), (0, 1)], scores={("head", 0, 1): 1.0})
    assert unscored.top_k(1).heads == ((0, 1),)
    with pytest.raises(MaskError):
        candidate.top_k(0)
    with pytest.raises(MaskError, match="keyed"):
        Candidate("bad", heads=[(0, 0)], scores={(0, 0): 1.0})


def test_candidate_from_scores_agreement_and_head_table():
    a = candidate_from_scores(_score_table({(0, 0): 3, (0, 1): 2, (1, 0): 1, (1, 1): 0}), "a", 2)
    b = candidate_from_scores(_score_table({(0, 0): 0, (0, 1): 2, (1, 0): 3, (1, 1): 1}), "b", 2)
    assert set(a.heads) == {(0, 0), (0, 1)} and set(b.heads) == {(0, 1), (1, 0)}
    assert len(a.scores) == 4
    agreement = candidate_agreement({"a": a, "b": b}).iloc[0]
    assert agreement["shared"] == 1 and agreement["jaccard"] == pytest.approx(1 / 3)
    assert agreement["shared_heads"] == "L0H1" and agreement["n_scored"] == 4
    expected = pd.Series([3, 2, 1, 0]).corr(pd.Series([0, 2, 3, 1]), method="spearman")
    assert agreement["spearman"] == pytest.approx(expected)
    table = method_head_table({"a": a, "b": b})
    assert table.iloc[0]["head"] == "L0H1" and table.iloc[0]["n_methods"] == 2
    assert set(table["head"]) == {"L0H0", "L0H1", "L1H0"}
    with pytest.raises(MaskError):
        candidate_agreement({"a": a})
    with pytest.raises(MaskError, match="lacks"):
        candidate_from_scores(pd.DataFrame({"layer": [0]}), "x", 1)


def test_repetition_task(tiny_neox):
    bridge, _ = tiny_neox
    task = RepetitionTask(VOCAB, seq_len=6, n_sequences=4, seed=3, batch_size=3)
    seq = 6
    assert torch.equal(task.clean[:, seq:], task.corrupted[:, seq:])
    assert not torch.equal(task.clean[:, :seq], task.corrupted[:, :seq])
    assert torch.equal(task.clean[:, :seq], task.clean[:, seq:])
    values = task(bridge)
    first, second = repeated_sequence_losses(bridge, task.clean, seq, VOCAB)
    assert values["second_half_loss"] == pytest.approx(second)
    assert values["first_half_loss"] == pytest.approx(first)
    with torch.no_grad():
        logits = bridge(task.clean)
    assert float(task.metric_fn()(logits)) == pytest.approx(second)
    assert float(task.metric_fn(slice(1, 2))(logits[1:2])) == pytest.approx(
        float(task.per_example(logits, slice(0, 4))[1])
    )


def test_name_copying_task(tiny_neox):
    bridge, tokenizer = tiny_neox
    names = _single_token_words(tokenizer)
    task = NameCopyingTask(tokenizer, n_prompts=6, names=names, vocab_size=VOCAB, batch_size=4)
    assert task.clean.shape == task.corrupted.shape and task.clean.shape[0] == 6
    for row in range(task.clean.shape[0]):
        answer, repeated = int(task.answers[row]), int(task.repeated[row])
        assert answer in task.clean[row].tolist() and answer not in task.corrupted[row].tolist()
        # the first mention of the repeated name is replaced, the repeat is kept
        assert task.clean[row].tolist().count(repeated) == task.corrupted[row].tolist().count(repeated) + 1
        assert task.clean[row, -1] == task.corrupted[row, -1]
    with torch.no_grad():
        logits = bridge(task.clean)
    rows = torch.arange(6)
    expected = logits[rows, -1, task.answers] - logits[rows, -1, task.repeated]
    values = task(bridge)
    assert values["logit_diff"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert values["accuracy"] == pytest.approx(float((expected > 0).double().mean()))
    with pytest.raises(ConfigError, match="single-token names"):
        NameCopyingTask(tokenizer, names=names[:3])


def test_patching_scores_match_activation_patching(tiny_neox):
    bridge, _ = tiny_neox
    task = RepetitionTask(VOCAB, seq_len=5, n_sequences=3, seed=1)
    scores = patching_scores(bridge, task, n_examples=2)
    assert len(scores) == bridge.cfg.n_layers * bridge.cfg.n_heads
    reference = patch(bridge, task.clean[:2], task.corrupted[:2], "head", task.metric_fn(slice(0, 2)), "all")
    np.testing.assert_allclose(scores["score"], reference["recovered"])
    candidate = patching_candidate(bridge, task, top_k=3, n_examples=2)
    best = scores.sort_values("score", ascending=False).head(3)
    assert set(candidate.heads) == set(zip(best["layer"], best["head"]))
    assert candidate.method == "activation patching"


def test_attribution_scores_are_the_first_order_estimate(tiny_neox):
    """TL's node score of a head = d metric / d alpha at 0 when the head's output moves by
    alpha * (clean - corrupted), summed over positions; divided by the measured gap."""
    bridge, _ = tiny_neox
    task = RepetitionTask(VOCAB, seq_len=5, n_sequences=2, seed=2)
    scores = attribution_scores(bridge, task, n_examples=1)
    assert scores.attrs["transformer_lens"] == transformer_lens_version()
    assert set(scores["kind"]) == {"head", "mlp"}
    layer, head = 1, 2
    name = f"blocks.{layer}.attn.hook_z"
    with torch.no_grad():
        _, cache = bridge.run_with_cache(task.clean[:1], names_filter=[name])
        _, corrupt_cache = bridge.run_with_cache(task.corrupted[:1], names_filter=[name])
    delta = (cache[name] - corrupt_cache[name])[..., head, :]
    alpha = torch.zeros((), requires_grad=True)

    def nudge(z, hook):
        z = z.clone()
        z[..., head, :] = z[..., head, :] + alpha * delta
        return z

    with torch.enable_grad():
        metric = task.metric_fn(slice(0, 1))(bridge.run_with_hooks(task.corrupted[:1], fwd_hooks=[(name, nudge)]))
        (grad,) = torch.autograd.grad(metric, alpha)
    row = scores[(scores["kind"] == "head") & (scores["layer"] == layer) & (scores["head"] == head)]
    assert float(row["raw"].iloc[0]) == pytest.approx(float(grad), rel=1e-3, abs=1e-6)
    gap = scores.attrs["clean_metric"] - scores.attrs["corrupted_metric"]
    assert float(row["score"].iloc[0]) == pytest.approx(float(grad) / gap, rel=1e-3, abs=1e-6)


def test_head_score_candidates(tiny_neox):
    bridge, _ = tiny_neox
    candidates, scores = head_score_candidates(bridge, VOCAB, n_induction=2, n_previous=1, seq_len=5, n_sequences=2)
    assert set(candidates) == {"induction heads", "previous-token heads", "induction + previous-token"}
    best = scores.head(2)
    assert set(candidates["induction heads"].heads) == set(zip(best["layer"], best["head"]))
    union = set(candidates["induction heads"].heads) | set(candidates["previous-token heads"].heads)
    assert set(candidates["induction + previous-token"].heads) == union
    assert len(candidates["induction heads"].scores) == len(scores)


def test_recovered_fraction():
    assert recovered_fraction(5.0, 10.0, 0.0) == pytest.approx(0.5)  # a loss halfway down
    assert recovered_fraction(3.0, 1.0, 5.0) == pytest.approx(0.5)  # a logit difference
    assert np.isnan(recovered_fraction(1.0, 2.0, 2.0))


def test_build_up_rows_and_values(tiny_neox):
    bridge, _ = tiny_neox
    base = random_units(bridge, keep_fraction=0.4, seed=3)
    task = RepetitionTask(VOCAB, seq_len=5, n_sequences=3)
    candidates = {"two": Candidate("two", heads=[(0, 1), (1, 2)]), "one": Candidate("one", heads=[(1, 0)])}
    table = build_up(bridge, base, candidates, task, seeds=(0, 1), progress=False)
    assert set(table["condition"]) == set(CONDITIONS)
    assert len(table) == 2 + 2 * (1 + 2) * 2
    base_row = table[table["condition"] == "base"].iloc[0]
    with base.applied(bridge, "keep"):
        assert base_row["value"] == pytest.approx(task(bridge)["second_half_loss"])
    full_row = table[table["condition"] == "full"].iloc[0]
    assert full_row["value"] == pytest.approx(task(bridge)["second_half_loss"])
    assert base_row["recovered"] == pytest.approx(0.0) and full_row["recovered"] == pytest.approx(1.0)
    added = table[(table["condition"] == "base + candidate") & (table["candidate"] == "two")].iloc[0]
    with add_candidate(base, candidates["two"], bridge).applied(bridge, "keep"):
        assert added["value"] == pytest.approx(task(bridge)["second_half_loss"])
    expected = (added["value"] - base_row["value"]) / (full_row["value"] - base_row["value"])
    assert added["recovered"] == pytest.approx(expected)
    removed = table[(table["condition"] == "full - candidate") & (table["candidate"] == "one")].iloc[0]
    with candidates["one"].applied(bridge, "ablate"):
        assert removed["value"] == pytest.approx(task(bridge)["second_half_loss"])
    randoms = table[table["condition"] == "base + random heads"]
    assert sorted(randoms["seed"].dropna().unique().tolist()) == [0, 1]

    summary = summarize_build_up(table)
    random_two = summary[(summary["condition"] == "base + random heads") & (summary["candidate"] == "two")].iloc[0]
    mine = randoms[randoms["candidate"] == "two"]["recovered"]
    assert random_two["n_seeds"] == 2 and random_two["recovered"] == pytest.approx(mine.mean())
    assert random_two["recovered_std"] == pytest.approx(mine.std())
    report = build_up_report(summary)
    assert list(report["candidate"]) == ["two", "one"]
    assert report.iloc[0]["recovered"] == pytest.approx(added["recovered"])
    again = build_up(
        bridge,
        base,
        candidates,
        task,
        seeds=(0,),
        necessity=False,
        progress=False,
        full={"second_half_loss": 1.0},
        base_label="other",
    )
    assert "full - candidate" not in set(again["condition"])
    assert again.attrs["full_value"] == 1.0 and set(again["base"]) == {"other"}


def test_candidate_weights_and_overlap(tiny_llama):
    bridge, _ = tiny_llama
    empty = Subnetwork.empty(bridge, ("weight",))
    full = Subnetwork.full(bridge, ("weight",))
    candidate = Candidate("c", heads=[(1, 0), (1, 3)])
    masks = candidate_weight_masks(candidate, bridge, full.masks)
    d_head, d_model = bridge.cfg.d_head, bridge.cfg.d_model
    assert int(masks["blocks.1.attn.q.weight"].sum()) == 2 * d_head * d_model
    assert int(masks["blocks.1.attn.o.weight"].sum()) == 2 * d_head * d_model
    # heads 0 and 3 sit in different K/V groups (4 query heads share 2 K/V heads)
    assert int(masks["blocks.1.attn.k.weight"].sum()) == 2 * d_head * d_model
    assert int(masks["blocks.0.attn.q.weight"].sum()) == 0
    assert not any(bool(m.any()) for k, m in masks.items() if ".mlp." in k)
    with add_candidate(empty, candidate, bridge).applied(bridge):
        pass
    combined = add_candidate(empty, candidate, bridge)
    for key in masks:
        assert torch.equal(combined.masks[key].cpu(), masks[key]), key

    half = Subnetwork.from_masks(
        bridge,
        {k: torch.rand(m.shape, generator=torch.Generator().manual_seed(0)) < 0.5 for k, m in full.masks.items()},
    )
    table = circuit_overlap(half, {"c": candidate}, bridge, n_random=200, seeds=(0, 1))
    row = table.iloc[0]
    assert row["circuit_weights"] == sum(int(m.sum()) for m in masks.values())
    shared = sum(int((masks[k] & half.masks[k]).sum()) for k in masks)
    assert row["shared_weights"] == shared
    assert row["circuit_in_base"] == pytest.approx(shared / row["circuit_weights"])
    assert 0.3 < row["random_heads_in_base"] < 0.7
    everything = circuit_overlap(full, {"c": candidate}, bridge, n_random=50, seeds=(0,)).iloc[0]
    assert everything["circuit_in_base"] == 1.0

    placement = circuit_placement(half, {"c": candidate}, bridge)
    assert list(placement["heads"]) == [0, 2] and placement.iloc[1]["head_labels"] == "L1H0, L1H3"
    assert placement.iloc[1]["circuit_in_base"] == pytest.approx(row["circuit_in_base"])
    assert placement["base_attn_share"].sum() + placement["base_mlp_share"].sum() == pytest.approx(1.0)


def test_build_up_experiment_and_figure(tiny_neox):
    from bigram_circuits.errors import FigureDataError
    from bigram_circuits.plots import fig_build_up

    bridge, tokenizer = tiny_neox
    base = Subnetwork.from_masks(
        bridge,
        {
            k: torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) < 0.3
            for k, m in Subnetwork.full(bridge, ("weight",)).masks.items()
        },
    )
    config = BuildUpConfig(
        tasks=("repetition",),
        top_k=2,
        n_previous=1,
        seeds=(0, 1),
        seq_len=5,
        n_sequences=3,
        n_score_sequences=2,
        n_attribution=2,
        n_patching=2,
        n_random_overlap=100,
        wide_k=4,
    )
    tables = build_up_experiment(
        bridge, tokenizer, {"bigram": base, "optimal": base.random_control(2)}, config, progress=False
    )
    assert set(tables["build_up"]["base"]) == {"bigram", "optimal"}
    names = set(tables["build_up_report"]["candidate"])
    assert names == {
        "induction heads",
        "induction + previous-token",
        "attribution top 2",
        "patching top 2",
        "attribution top 4",
    }
    assert set(tables["build_up_report"].set_index("candidate").loc["attribution top 4", "heads"]) == {4}
    assert set(tables["overlap"]["base"]) == {"bigram", "optimal"}
    assert tables["candidates"].attrs["transformer_lens"] == transformer_lens_version()
    methods = set(tables["method_scores"]["method"])
    assert methods == {"attribution patching", "attribution patching (MLP)", "activation patching"}
    optimal_rows = tables["build_up"][tables["build_up"]["base"] == "optimal"]
    removed = optimal_rows[optimal_rows["condition"] == "full - candidate"]  # measured once, reused
    first_rows = tables["build_up"][
        (tables["build_up"]["base"] == "bigram") & (tables["build_up"]["condition"] == "full - candidate")
    ]
    np.testing.assert_allclose(removed["value"], first_rows["value"])
    assert not np.allclose(removed["recovered"], first_rows["recovered"])
    # the candidates round-trip through their tables (as stored in a results file)
    stored = {
        k: pd.read_json(io.StringIO(tables[k].to_json(orient="records"))) for k in ("head_scores", "method_scores")
    }
    again = candidates_from_tables(stored["head_scores"], stored["method_scores"], config)["repetition"]
    listed = tables["candidates"].set_index("candidate")["heads"]
    assert {name: ", ".join(f"L{a}H{b}" for a, b in c.heads) for name, c in again.items()} == {
        name: listed[name] for name in again
    }
    rerun = build_up_experiment(
        bridge,
        tokenizer,
        {"bigram": base},
        config,
        progress=False,
        found={k: tables[k] for k in ("head_scores", "method_scores")},
    )
    pd.testing.assert_frame_equal(
        rerun["build_up_report"], tables["build_up_report"][tables["build_up_report"]["base"] == "bigram"]
    )
    # The next unit up: each candidate's heads with the whole MLP of their layers.
    with_mlps = build_up_experiment(
        bridge,
        tokenizer,
        {"bigram": base},
        replace(config, unit="heads_mlps", necessity=False),
        progress=False,
        found={k: tables[k] for k in ("head_scores", "method_scores")},
    )
    rows = with_mlps["build_up"]
    added = rows[rows["condition"] == "base + candidate"].set_index("candidate")
    heads_only = tables["build_up"]
    heads_only = heads_only[(heads_only["base"] == "bigram") & (heads_only["condition"] == "base + candidate")]
    heads_only = heads_only.set_index("candidate")
    for name, row in added.iterrows():
        layers = {layer for layer, _ in again[name].heads} if name in again else None
        if layers is not None:
            assert row["neurons"] == len(layers) * bridge.cfg.d_mlp
        assert row["added_weights"] > heads_only.loc[name, "added_weights"]
    random_rows = rows[rows["condition"] == "base + random heads"]
    assert ((random_rows["neurons"] > 0) & (random_rows["neurons"] % bridge.cfg.d_mlp == 0)).all()
    pd.testing.assert_frame_equal(with_mlps["overlap"], rerun["overlap"])  # the overlap stays the heads'
    with pytest.raises(ConfigError, match="unit must be one of heads, heads_mlps"):
        BuildUpConfig(unit="blocks")
    figure = fig_build_up(tables["build_up_summary"])
    assert len(figure.data) > 4
    with pytest.raises(FigureDataError, match="value"):
        fig_build_up(tables["build_up_summary"].drop(columns=["value"]))
    with pytest.raises(ConfigError):
        BuildUpConfig(tasks=("nope",))


def test_build_up_cli(tiny_neox_dir, tiny_neox, tmp_path, capsys):
    from bigram_circuits.cli import main

    bridge, _ = tiny_neox
    base = Subnetwork.from_masks(
        bridge,
        {
            k: torch.rand(m.shape, generator=torch.Generator().manual_seed(2)) < 0.3
            for k, m in Subnetwork.full(bridge, ("weight",)).masks.items()
        },
    )
    base.save(tmp_path / "base")
    out = tmp_path / "out"
    status = main(
        [
            "build-up",
            "--model",
            str(tiny_neox_dir),
            "--base",
            str(tmp_path / "base"),
            "--out",
            str(out),
            "--tasks",
            "repetition",
            "--top-k",
            "2",
            "--n-previous",
            "1",
            "--seeds",
            "0,1",
            "--seq-len",
            "5",
            "--n-sequences",
            "2",
            "--n-attribution",
            "1",
            "--n-patching",
            "1",
            "--n-random-overlap",
            "50",
            "--no-png",
            "--no-progress",
        ]
    )
    assert status == 0
    assert (out / "build_up_report.csv").exists() and (out / "build_up.html").exists()
    report = pd.read_csv(out / "build_up_report.csv")
    assert set(report["base"]) == {"bigram"}
    assert "recovered" in capsys.readouterr().out
    assert main(["build-up", "--model", str(tiny_neox_dir), "--base", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
