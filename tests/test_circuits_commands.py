"""The CLI entry points of the circuits package on a tiny saved run."""

from __future__ import annotations

import json

import pytest
import torch

from bigram_circuits.app.lens import lens_command
from bigram_circuits.app.patch import patch_command
from bigram_circuits.circuits.runs import load_run, subnetwork_dir_of
from bigram_circuits.errors import MaskError, TokenError


@pytest.fixture()
def tiny_run(tmp_path, monkeypatch, tiny_neox, tiny_neox_dir, tiny_text):
    from bigram_circuits.subnetwork import Subnetwork

    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": doc}) for doc in tiny_text * 3), encoding="utf-8")
    bridge, _ = tiny_neox
    generator = torch.Generator().manual_seed(0)
    masks = {
        k: torch.rand(m.shape, generator=generator) < 0.4
        for k, m in Subnetwork.full(bridge, ("neuron", "head")).masks.items()
    }
    run_dir = tmp_path / "run"
    metadata = {"model": str(tiny_neox_dir), "corpus": str(corpus), "config": {"seq_len": 32}}
    Subnetwork.from_masks(bridge, masks, metadata).save(run_dir / "lambda_10")
    (run_dir / "sweep.csv").write_text("lambda,chosen\n1,False\n10,True\n", encoding="utf-8")
    return run_dir


def test_run_resolution(tiny_run, tmp_path):
    assert subnetwork_dir_of(tiny_run) == tiny_run / "lambda_10"
    assert subnetwork_dir_of(tiny_run / "lambda_10") == tiny_run / "lambda_10"
    loaded = load_run(tiny_run)
    assert loaded.seq_len == 32 and loaded.eval_windows(64).shape == (2, 32)
    with pytest.raises(MaskError, match="find"):
        subnetwork_dir_of(tmp_path)


def test_lens_command_writes_tables_and_figures(tiny_run, tmp_path):
    out = tmp_path / "lens"
    table = lens_command(tiny_run, n_tokens=256, out=out, progress=False)
    assert list(table["run"].unique()) == ["full", "bigram", "random"]
    for name in (
        "linear_lens.csv",
        "logit_lens.csv",
        "similarity_full.csv",
        "similarity_bigram.csv",
        "similarity_random.csv",
        "rotation.html",
        "similarity.html",
    ):
        assert (out / name).exists(), name


def _same_length_prompts(tokenizer) -> tuple[str, str]:
    """Two prompts differing in one word with the same number of tokens."""
    words = ["war", "law", "state", "house", "nation", "people", "world", "power", "union"]
    by_length: dict[int, list[str]] = {}
    for word in words:
        prompt = f"The {word} of the"
        by_length.setdefault(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), []).append(prompt)
    pairs = [group for group in by_length.values() if len(group) >= 2]
    assert pairs, "the tiny tokenizer splits every word differently"
    return pairs[0][0], pairs[0][1]


def test_patch_command(tiny_run, tiny_neox, tiny_neox_dir, tmp_path):
    clean, corrupted = _same_length_prompts(tiny_neox[1])
    table = patch_command(str(tiny_neox_dir), clean, corrupted, "head", out=tmp_path / "heads.html")
    assert (tmp_path / "heads.html").exists()
    assert {"layer", "head", "metric", "recovered"} <= set(table.columns) and "metric_name" in table.attrs
    with_run = patch_command(clean=clean, corrupted=corrupted, component="resid_pre", run=tiny_run)
    assert with_run.attrs["clean_run"] == "bigram" and "pos" in with_run.columns
    with pytest.raises(TokenError, match="same length"):
        patch_command(str(tiny_neox_dir), clean, clean + " war of the nation", "resid_pre")


def test_run_dir_layout(tiny_run, tmp_path):
    """RunDir answers the layout questions every command asks (old run directories included)."""
    from bigram_circuits.rundir import RunDir

    run = RunDir(tiny_run)
    assert run.subnetwork_dir() == tiny_run / "lambda_10" == run.lambda_run(10).path
    assert [r.path.name for r in run.lambda_runs()] == sorted(p.name for p in tiny_run.glob("lambda_*"))
    assert run.sweep_table()["dir"].tolist() == [
        str(tiny_run / f"lambda_{lam:g}") for lam in run.sweep_table()["lambda"]
    ]
    assert run.lambda_run(10).holds_subnetwork() and not RunDir(tmp_path).is_finished_search()
    assert run.optimal_run().path == tiny_run / "optimal" and run.seed_run(3).path == tiny_run / "seed_3"
    assert RunDir(run) == run and str(run / "sweep.csv") == str(run.sweep_file)
