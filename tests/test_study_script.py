"""The real-model study script (benchmarks/smollm2_study.py) end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_study.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("smollm2_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_study_script_runs_on_a_tiny_model_and_resumes(tmp_path, tiny_neox_dir, tiny_text, monkeypatch):
    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(list(tiny_text) * 3))
    study = _load_script()
    argv = ["--model", str(tiny_neox_dir), "--label", "tiny", "--corpus", str(corpus), "--lambdas", "0", "10",
            "--max-steps", "3", "--batch-size", "4", "--seq-len", "16", "--train-windows", "32",
            "--eval-windows", "8", "--analysis-tokens", "128", "--threads", "1", "--eval-batches", "1",
            "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results" / "study"),
            "--figures", str(tmp_path / "figures")]
    result = study.main(argv)

    saved = json.loads((tmp_path / "results" / "study.json").read_text())
    assert saved["label"] == "tiny" and saved["corpus"] == str(corpus)
    assert [row["lambda"] for row in saved["sweep"]] == [0.0, 10.0]
    assert saved["chosen"]["n_params"] <= saved["chosen"]["n_params_total"]
    assert set(saved["circuits"]) == {"full", "bigram", "random"}
    assert {"full model", "bigram ablated", "random ablated"} <= {row["condition"] for row in saved["ablation"]}
    markdown = (tmp_path / "results" / "study.md").read_text()
    assert "tiny (this run)" in markdown and "## Circuits" in markdown
    assert [row["lambda"] for row in saved["sweep_layers"]] == [0.0, 10.0]
    for name in ("fig1_r_vs_params", "layer_distribution_lambda_0", "layer_distribution_lambda_10",
                 "fig3_rotation", "fig4_similarity"):
        assert (tmp_path / "figures" / f"{name}.html").exists()

    # A second run resumes the finished sweep instead of searching again.
    again = study.main(argv)
    assert again["sweep"] == result["sweep"]
