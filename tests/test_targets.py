"""The target registry (issue 21): a target registered here alone is reachable from
``Target.from_name``, from ``find --target`` (its check and its help) and from ``find``, which
counts bigram statistics only for a target that needs them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from bigram_circuits import cli
from bigram_circuits.errors import SearchError
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.rundir import RunDir
from bigram_circuits.search import Target, sweep
from bigram_circuits.targets import (
    TargetRequest,
    register_target,
    target_help,
    target_spec,
    target_specs,
    unregister_target,
)


def _mean_logit(request: TargetRequest) -> Target:
    """A toy target that needs no statistics: push the mean logit towards ``argument``."""
    goal = float(request.argument or 0)
    return Target.custom(lambda logits, tokens: (logits.float().mean() - goal) ** 2, name=request.name)


@pytest.fixture
def toy_target() -> Iterator[str]:
    register_target("toy_mean", _mean_logit, aliases=("toy",), argument="GOAL", help="test target")
    yield "toy_mean"
    unregister_target("toy_mean")


@pytest.fixture
def toy_bigram() -> Iterator[str]:
    def build(request: TargetRequest) -> Target:
        return dataclasses.replace(Target.bigram(request.stats), name=request.name)

    register_target("toy_bigram", build, needs_stats=True, help="test target on the bigram table")
    yield "toy_bigram"
    unregister_target("toy_bigram")


@pytest.fixture(scope="module")
def stats() -> BigramStats:
    rng = np.random.default_rng(0)
    return BigramStats.from_tokens(rng.integers(0, 20, size=(10, 16)), 20, show_progress=False)


def test_a_registered_target_is_built_by_name_alias_and_argument(toy_target, toy_bigram, stats):
    target = Target.from_name("toy_mean")
    assert target.name == "toy_mean" and target.stats is None
    logits = torch.full((1, 3, 5), 2.0)
    assert float(target(logits, torch.zeros((1, 3), dtype=torch.long))) == pytest.approx(4.0)
    seeded = Target.from_name("toy:2")  # an alias with an argument
    assert seeded.name == "toy:2" and float(seeded(logits, None)) == pytest.approx(0.0)
    assert target_spec("toy:7").name == "toy_mean"
    assert Target.from_name(toy_bigram, stats=stats).stats is stats
    with pytest.raises(SearchError, match="the toy_bigram target needs bigram stats"):
        Target.from_name(toy_bigram)
    with pytest.raises(SearchError, match=r"unknown target 'toy_mean:x'.*toy_mean\[:GOAL\]"):
        Target.from_name("toy_mean:x")
    with pytest.raises(SearchError, match="unknown target 'toy_bigram:1'"):  # it takes no argument
        Target.from_name("toy_bigram:1", stats=stats)


def test_built_in_targets_keep_their_names_and_needs(stats):
    names = {spec.name: spec for spec in target_specs()}
    assert list(names)[:5] == ["bigram", "full_model", "next_token", "permuted_contexts", "permuted_vocab"]
    assert {n for n, s in names.items() if s.needs_stats} >= {"bigram", "permuted_contexts", "permuted_vocab"}
    assert not names["full_model"].needs_stats and not names["next_token"].needs_stats
    for alias in ("full", "optimal"):
        assert Target.from_name(alias).name == "full_model"
    assert Target.from_name("permuted_vocab:", stats=stats).name == "permuted_vocab:"  # seed 0, as before
    assert Target.from_name("bigram", stats=stats).selection_metric == "bigram_r"
    assert Target.from_name("full_model").selection_metric is None


def test_registering_a_taken_name_is_one_line_unless_replaced(toy_target):
    with pytest.raises(SearchError, match="'toy' is taken by 'toy_mean'; pass replace=True"):
        register_target("other", _mean_logit, aliases=("toy",))
    with pytest.raises(SearchError, match="not usable"):
        register_target("a:b", _mean_logit)
    register_target("toy_mean", _mean_logit, replace=True)  # the alias goes with the old spec
    with pytest.raises(SearchError, match="unknown target 'toy'"):
        target_spec("toy")
    with pytest.raises(SearchError, match="no target 'never' is registered"):
        unregister_target("never")


def test_find_cli_accepts_a_registered_target_and_lists_it(toy_target, capsys, monkeypatch):
    import functools

    import pandas as pd

    import bigram_circuits.app.find as find_module

    seen = {}

    @functools.wraps(find_module.find_command)  # the same signature, so the same options
    def fake_find(**kwargs):
        seen.update(kwargs)
        return pd.DataFrame()

    monkeypatch.setattr(find_module, "find_command", fake_find)
    assert cli.main(["find", "--out", "x", "--target", "toy:3"]) == 0
    assert seen == {"out_dir": "x", "target": "toy:3"}
    assert "toy_mean[:GOAL] (test target; also toy)" in target_help()
    with pytest.raises(SystemExit):
        cli.main(["find", "--help"])
    assert "toy_mean[:GOAL] (test target; also toy)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["find", "--out", "x", "--target", "toy_means"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --target: unknown target 'toy_means'; use bigram,")
    assert "toy_mean[:GOAL]" in err and len(err.splitlines()) == 1
    assert seen == {"out_dir": "x", "target": "toy:3"}  # find was not called again


def test_find_refuses_an_unknown_target_before_loading_anything(tmp_path, monkeypatch):
    from bigram_circuits import models
    from bigram_circuits.app.find import find_command

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    with pytest.raises(SearchError, match="unknown target 'bigrams'"):
        find_command(out_dir=tmp_path / "run", target="bigrams", show_progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("needs_stats", [False, True], ids=["no_stats", "stats"])
def test_find_counts_bigram_stats_only_for_a_target_that_needs_them(
    needs_stats, toy_target, toy_bigram, tmp_path, monkeypatch, tiny_neox_dir, tiny_text
):
    from bigram_circuits.app.find import find_command

    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_text), encoding="utf-8")
    calls = []
    counted, loaded = BigramStats.from_tokens, RunDir.bigram_stats

    def count(*args, **kwargs):
        calls.append("count")
        return counted(*args, **kwargs)

    def load_or_count(self, *args, **kwargs):
        calls.append("run")
        return loaded(self, *args, **kwargs)

    monkeypatch.setattr(BigramStats, "from_tokens", count)
    monkeypatch.setattr(RunDir, "bigram_stats", load_or_count)
    table = find_command(
        str(tiny_neox_dir),
        "neuron",
        [1.0],
        tmp_path / "run",
        corpus=str(corpus),
        target=toy_bigram if needs_stats else "toy_mean:1",
        max_train_windows=8,
        max_eval_windows=4,
        show_progress=False,
        seq_len=16,
        batch_size=4,
        max_steps=2,
        min_steps=1,
        stability_check=False,
        eval_batches=1,
    )
    assert len(table) == 1
    if needs_stats:
        assert calls == ["run", "count"] and (tmp_path / "run" / RunDir.STATS).exists()
        assert np.isfinite(table["bigram_r"].iloc[0])
    else:
        assert calls == [] and not (tmp_path / "run" / RunDir.STATS).exists()
        assert table["bigram_r"].isna().all() and not table["chosen"].any()


def test_sweep_refuses_a_selection_metric_it_does_not_record(tiny_neox):
    bridge, _ = tiny_neox
    target = dataclasses.replace(Target.next_token(), selection_metric="target_loss")
    with pytest.raises(SearchError, match="selects on 'target_loss', which a sweep does not record"):
        sweep(bridge, np.zeros((2, 8), dtype=np.int64), target, [1.0], "neuron", show_progress=False)
