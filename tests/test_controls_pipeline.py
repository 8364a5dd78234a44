"""Faithfulness controls reachable from find and the figures pipeline (issue 23): the permuted
targets by name, and the figures pipeline's controls stage run on its own."""

from __future__ import annotations

import numpy as np
import pytest

from bigram_circuits.errors import SearchError
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import Target


@pytest.fixture(scope="module")
def stats() -> BigramStats:
    rng = np.random.default_rng(0)
    tokens = rng.zipf(1.5, size=(40, 32)) % 50
    return BigramStats.from_tokens(tokens, 50, show_progress=False)


def test_target_from_name_builds_the_permuted_control(stats):
    tokens = np.asarray(stats.bigram.contexts[:8][None, :] % 50)
    target = Target.from_name("permuted_contexts", stats=stats)
    assert target.name == "permuted_contexts"
    # The target's stats are the permuted table (so the search measures r against it).
    expected = stats.permuted("contexts", 0).next_token_surprisal(tokens)
    np.testing.assert_array_equal(target.stats.next_token_surprisal(tokens), expected)
    seeded = Target.from_name("permuted_vocab:2", stats=stats)
    np.testing.assert_array_equal(seeded.stats.bigram.next_ids, stats.permuted("vocab", 2).bigram.next_ids)
    with pytest.raises(SearchError, match="needs bigram stats"):
        Target.from_name("permuted_vocab")
    with pytest.raises(SearchError, match="unknown target"):
        Target.from_name("permuted_rows", stats=stats)


@pytest.mark.slow
def test_controls_stage_runs_alone_and_replaces_its_sections(
    tmp_path, tiny_figures_model, tiny_figures_config, monkeypatch
):
    import pandas as pd

    from bigram_circuits.app import figures as A

    model_dir, corpus = tiny_figures_model
    config = tiny_figures_config(corpus, ablation_windows=2, overlap_samples=50)
    out, cache = tmp_path / "figures", tmp_path / "cache_dir"
    out.mkdir()
    (out / "tables.md").write_text("# Tables\n\n## Table 1\n\nkept\n")
    written = A.figures_command(
        str(model_dir), out, cache, config=config, png=False, show_progress=False, only="controls"
    )
    names = {p.name for p in written}
    assert {"fig_controls.html", "table_controls.csv", "table_controls_partial.csv", "tables.md"} <= names
    assert {"controls_sweeps.csv", "controls_partial_ablation.csv", "controls_seed_overlap.csv"} <= names
    assert "controls_seed_runs.csv" in names
    sweeps = pd.read_csv(out / "data" / "controls_sweeps.csv")
    assert set(sweeps["control"]) == {
        "real bigram target",
        "permuted contexts",
        "permuted vocab",
        "random init",
        "random init + trained embeddings",
    }
    partial = pd.read_csv(out / "data" / "controls_partial_ablation.csv")
    assert set(partial["granularity"]) == {"weight", "neuron+head"}
    assert set(partial.loc[partial["granularity"] == "neuron+head", "ablation"]) == {"zero", "mean"}
    text = (out / "tables.md").read_text()
    assert text.startswith("# Tables\n\n## Table 1\n\nkept") and text.count("## Controls") == 2
    # Cached: a second run redraws without loading the model, and replaces (not repeats) its sections.
    from bigram_circuits import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    A.figures_command(str(model_dir), out, cache, config=config, png=False, show_progress=False, only="controls")
    assert (out / "tables.md").read_text().count("## Controls") == 2
    with pytest.raises(A.ConfigError, match="only"):
        A.figures_command(str(model_dir), out, cache, config=config, only="everything")
