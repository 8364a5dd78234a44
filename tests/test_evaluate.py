"""Held-out metrics, ablation tables and generations (bigram_circuits.evaluate)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats

from bigram_circuits.app.evaluate import evaluate_run
from bigram_circuits.data import tokenize_documents
from bigram_circuits.errors import TokenError
from bigram_circuits.evaluate import (
    METRIC_COLUMNS,
    TokenSurprisals,
    ablation_table,
    evaluate_metrics,
    generate,
    generate_table,
    generation_conditions,
    loss_increase_ratio,
    metrics_from_surprisals,
    noise_ceiling,
    pearson_r,
    surprisals_from_logits,
)
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.runspec import RunSpec
from bigram_circuits.subnetwork import Subnetwork
from bigram_circuits.tables import write_tables


class BigramLookup(torch.nn.Module):
    """A "model" whose logits depend only on the current token: logits[cur] (padded wider)."""

    def __init__(self, logits: torch.Tensor, pad: int = 2):
        super().__init__()
        padded = torch.cat([logits, torch.full((logits.shape[0], pad), 50.0)], dim=1)
        self.table = torch.nn.Parameter(padded, requires_grad=False)

    def forward(self, tokens):
        return self.table[tokens]


def test_pearson_matches_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert pearson_r(x, y) == pytest.approx(scipy_stats.pearsonr(x, y).statistic)
    assert math.isnan(pearson_r(np.ones(5), y[:5]))


def test_metrics_from_surprisals_hand_computed():
    model = np.array([1.0, 2.0, 3.0, 4.0])
    bigram = np.array([1.0, 3.0, np.inf, 5.0])
    row = metrics_from_surprisals(TokenSurprisals(model, bigram, soft_xent_sum=6.0, soft_xent_count=4))
    # dropped: x = (1, 2, 4), y = (1, 3, 5) -> dx = (-4/3, -1/3, 5/3), dy = (-2, 0, 2)
    assert row["r_dropped"] == pytest.approx(6 / math.sqrt((42 / 9) * 8))
    # clipped: inf -> 5, y = (1, 3, 5, 5)
    assert row["r_clipped"] == pytest.approx(scipy_stats.pearsonr(model, [1, 3, 5, 5]).statistic)
    assert row["soft_xent"] == pytest.approx(1.5)
    assert row["lm_loss_nats"] == pytest.approx(2.5)
    assert row["lm_loss_bits"] == pytest.approx(2.5 / math.log(2))
    assert row["perplexity"] == pytest.approx(math.exp(2.5))
    assert (row["n_tokens"], row["n_inf_bigram"]) == (4, 1)


def test_evaluate_metrics_on_a_lookup_model_hand_computed():
    # bigram counts of [[0, 1, 2], [2, 0, 2]]: 0 -> {1, 2}, 1 -> 2, 2 -> 0
    stats = BigramStats.from_tokens(np.array([[0, 1, 2], [2, 0, 2]]), 3, show_progress=False)
    probs = np.array([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.0, -1.0]])
    windows = np.array([[0, 1, 2, 0], [1, 0, 0, 2]])
    # Any next-token predictor goes through surprisals_from_logits; evaluate_metrics is the same
    # computation on a TransformerBridge (with a subnetwork applied).
    row = metrics_from_surprisals(
        surprisals_from_logits(BigramLookup(logits), stats, windows, batch_size=1, show_progress=False)
    )
    log_p = torch.log_softmax(logits.double(), dim=-1).numpy()
    pairs = [(0, 1), (1, 2), (2, 0), (1, 0), (0, 0), (0, 2)]
    model = np.array([-log_p[c, n] for c, n in pairs])
    bigram = np.array([math.log(2), 0.0, 0.0, np.inf, np.inf, math.log(2)])
    assert row["lm_loss_nats"] == pytest.approx(model.mean())
    assert row["lm_loss_bits"] == pytest.approx(model.mean() / math.log(2))
    assert row["perplexity"] == pytest.approx(math.exp(model.mean()))
    finite = np.isfinite(bigram)
    assert row["r_dropped"] == pytest.approx(np.corrcoef(model[finite], bigram[finite])[0, 1])
    clipped = np.where(finite, bigram, math.log(2))
    assert row["r_clipped"] == pytest.approx(np.corrcoef(model, clipped)[0, 1])
    # soft cross-entropy over every position (8 of them); the padded logits are ignored
    with np.errstate(invalid="ignore"):
        per_context = [-(np.where(probs[c] > 0, probs[c] * log_p[c], 0.0)).sum() for c in range(3)]
    assert row["soft_xent"] == pytest.approx(np.mean([per_context[c] for c in windows.ravel()]))
    assert (row["n_tokens"], row["n_inf_bigram"]) == (6, 2)


@pytest.mark.usefixtures("no_runtime_typecheck")
def test_bad_windows_are_refused():
    stats = BigramStats.from_tokens(np.array([[0, 1, 2]]), 3, show_progress=False)
    model = BigramLookup(torch.zeros(3, 3))
    with pytest.raises(TokenError):
        evaluate_metrics(model, stats, np.array([[0, 5]]), show_progress=False)
    with pytest.raises(TokenError):
        evaluate_metrics(model, stats, np.array([0, 1, 2]), show_progress=False)


def test_loss_increase_ratio():
    table = pd.DataFrame(
        {"condition": ["full model", "bigram ablated", "random ablated"], "lm_loss_nats": [2.0, 8.0, 2.5]}
    )
    assert loss_increase_ratio(table) == pytest.approx(12.0)
    no_harm = table.assign(lm_loss_nats=[2.0, 8.0, 1.9])
    assert loss_increase_ratio(no_harm) == math.inf
    assert math.isnan(loss_increase_ratio(no_harm.assign(lm_loss_nats=[2.0, 1.5, 1.9])))


def test_write_tables(tmp_path):
    table = pd.DataFrame({"condition": ["full model"], "lm_loss_nats": [2.0]})
    table.attrs["loss_increase_ratio"] = 3.5
    paths = write_tables({"ablation": table}, tmp_path)
    assert sorted(p.name for p in paths) == ["ablation.csv", "ablation.md"]
    assert pd.read_csv(tmp_path / "ablation.csv").equals(table)
    text = (tmp_path / "ablation.md").read_text()
    assert "| condition" in text and "loss_increase_ratio: 3.5" in text


def test_generate_is_seeded_and_greedy_is_argmax(tiny_neox):
    bridge, tokenizer = tiny_neox
    first = generate(bridge, tokenizer, "the state of the", None, temperature=1.0, max_new_tokens=8, seed=3)
    again = generate(bridge, tokenizer, "the state of the", None, temperature=1.0, max_new_tokens=8, seed=3)
    assert first == again
    greedy = generate(bridge, tokenizer, "the", None, temperature=0.0, max_new_tokens=1)
    ids = torch.tensor([tokenizer("the", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        best = int(bridge(ids)[0, -1, : len(tokenizer)].argmax())
    expected = "" if best == tokenizer.eos_token_id else tokenizer.decode([best])
    assert greedy == expected


# ---------------------------------------------------------------- a real tiny model


@pytest.fixture(scope="module")
def tiny_eval(tiny_neox, tiny_text):
    """(bridge, tokenizer, stats, windows): bigram stats of the tiny corpus and 6 eval windows."""
    bridge, tokenizer = tiny_neox
    dataset = tokenize_documents(tiny_text, tokenizer, show_progress=False)
    stats = BigramStats.from_tokens(dataset.windows(32), len(tokenizer), show_progress=False)
    return bridge, tokenizer, stats, dataset.windows(32, max_windows=6)


def test_empty_subnetwork_ablated_equals_full_model(tiny_eval):
    bridge, _, stats, windows = tiny_eval
    full = evaluate_metrics(bridge, stats, windows, show_progress=False)
    for granularities in (("neuron", "head"), ("weight",)):
        empty = Subnetwork.empty(bridge, granularities)
        ablated = evaluate_metrics(bridge, stats, windows, RunSpec(empty, "ablate"), show_progress=False)
        for column in METRIC_COLUMNS:
            assert ablated[column] == pytest.approx(full[column], rel=1e-5), column
        kept_all = evaluate_metrics(
            bridge, stats, windows, RunSpec(Subnetwork.full(bridge, granularities), "keep"), show_progress=False
        )
        assert kept_all["lm_loss_nats"] == pytest.approx(full["lm_loss_nats"], rel=1e-5)


def test_ablation_table_rows_and_ratio(tiny_eval):
    bridge, _, stats, windows = tiny_eval
    gen = torch.Generator().manual_seed(0)
    full = Subnetwork.full(bridge, ("neuron", "head"))
    bigram = Subnetwork.from_masks(bridge, {k: torch.rand(m.shape, generator=gen) < 0.2 for k, m in full.masks.items()})
    optimal = bigram.random_control(9)
    table = ablation_table(bridge, stats, windows, bigram, optimal, seeds=(0, 1), show_progress=False)
    assert list(table["condition"]) == [
        "full model",
        "bigram only",
        "bigram ablated",
        "random only",
        "random ablated",
        "optimal only",
        "optimal ablated",
    ]
    rows = table.set_index("condition")
    assert rows.loc["random ablated", "n_seeds"] == 2
    assert rows.loc["full model", "loss_increase"] == 0.0
    assert np.isnan(rows.loc["full model", "lm_loss_nats_std"])
    assert rows.loc["random only", "lm_loss_nats_std"] >= 0
    assert rows.loc["bigram only", "active_params"] == bigram.n_params()
    assert rows.loc["bigram ablated", "active_params"] == bigram.complement().n_params()
    assert rows.loc["full model", "active_params"] == bigram.n_params_total()
    bigram_increase = rows.loc["bigram ablated", "loss_increase"]
    random_increase = rows.loc["random ablated", "loss_increase"]
    ratio = table.attrs["loss_increase_ratio"]
    if random_increase > 0:  # an untrained tiny model may even improve when parameters are removed
        assert ratio == pytest.approx(bigram_increase / random_increase)
    else:
        assert math.isnan(ratio) or ratio == math.inf
    assert len(table.attrs["random_ablated_loss_increase_by_seed"]) == 2


def test_generation_table_conditions(tiny_eval):
    bridge, tokenizer, _, _ = tiny_eval
    empty = Subnetwork.empty(bridge, ("neuron", "head"))
    conditions = generation_conditions(empty, random_seed=0)
    table = generate_table(bridge, tokenizer, "the state", conditions, temperature=0.8, max_new_tokens=6, seed=1)
    assert list(table["condition"]) == ["full model", "bigram only", "bigram ablated", "random ablated"]
    generations = table.set_index("condition")["generation"]
    # ablating nothing (the empty subnetwork, or its same-shape random control) is the full model
    assert generations["bigram ablated"] == generations["full model"]
    assert generations["random ablated"] == generations["full model"]


def test_evaluate_run_writes_tables_next_to_the_run(tiny_neox_dir, tiny_text, tmp_path, monkeypatch):
    from bigram_circuits.data import load_token_dataset
    from bigram_circuits.models import load_model
    from bigram_circuits.search import SearchConfig, Target, sweep

    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_text), encoding="utf-8")
    bridge, tokenizer = load_model(tiny_neox_dir)
    train = load_token_dataset(corpus, tokenizer, split="train", show_progress=False)
    held_out = load_token_dataset(corpus, tokenizer, split="eval", show_progress=False).windows(32, 4)
    stats = BigramStats.from_tokens(train, len(tokenizer), seq_len=32, show_progress=False)
    run = tmp_path / "run"
    run.mkdir()
    stats.save(run / "bigram_stats.npz", tokenizer=tokenizer)
    config = SearchConfig(max_steps=3, batch_size=2, seq_len=32, stability_check=False, eval_batches=1)
    meta = {"corpus": str(corpus), "model": str(tiny_neox_dir)}
    sweep(
        bridge,
        train.windows(32, 8),
        Target.bigram(stats),
        [0.0, 1.0],
        ("neuron", "head"),
        config,
        run,
        eval_windows=held_out,
        show_progress=False,
        metadata=meta,
    )
    sweep(
        bridge,
        train.windows(32, 8),
        Target.full_model(len(tokenizer)),
        [1.0],
        ("neuron", "head"),
        config,
        run / "optimal",
        show_progress=False,
        metadata=meta,
    )

    tables = evaluate_run(run, n_eval_windows=4, seeds=(0, 1), n_random=500, max_new_tokens=4, show_progress=False)
    assert set(tables) == {"metrics", "ablation", "generations", "layer_distribution", "overlap"}
    assert list(tables["metrics"]["subnetwork"]) == ["full model", "lambda_0", "lambda_1"]
    assert tables["metrics"]["chosen"].sum() == 1
    assert "optimal ablated" in set(tables["ablation"]["condition"])
    out = run / "evaluation"
    for name in tables:
        assert (out / f"{name}.csv").exists() and (out / f"{name}.md").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert {"loss_increase_ratio", "overlap_p_value", "layer_plurality"} <= set(summary)
    # the full model row matches a direct evaluation on the same held-out windows
    direct = evaluate_metrics(bridge, stats, held_out, show_progress=False)
    assert tables["metrics"].loc[0, "lm_loss_nats"] == pytest.approx(direct["lm_loss_nats"], rel=1e-5)


def test_noise_ceiling_splits_the_training_windows_in_two_halves():
    rng = np.random.default_rng(0)

    # A strict bigram chain: token t is followed by (t + 1) % 7 or (t + 2) % 7, 3:1
    def chain(n_windows: int) -> np.ndarray:
        rows = np.zeros((n_windows, 16), dtype=np.int64)
        rows[:, 0] = rng.integers(0, 7, n_windows)
        for i in range(1, 16):
            rows[:, i] = (rows[:, i - 1] + np.where(rng.random(n_windows) < 0.75, 1, 2)) % 7
        return rows

    train, held_out = chain(400), chain(20)
    ceiling = noise_ceiling(train, held_out, vocab_size=8, seed=1)
    assert ceiling["half_windows"] == 200 and ceiling["n_tokens"] == 20 * 15
    assert ceiling["unseen_share"] == 0.0 and ceiling["r_dropped"] > 0.98  # plenty of text: the halves agree
    few = noise_ceiling(chain(4), held_out, vocab_size=8, seed=1)  # two windows per half: noisy tables
    assert few["r_dropped"] < ceiling["r_dropped"]
    assert noise_ceiling(train, held_out, vocab_size=8, seed=1) == ceiling  # seeded
    with pytest.raises(TokenError, match="at least 2"):
        noise_ceiling(train[:1], held_out, vocab_size=8)
