"""The real-model study script (benchmarks/smollm2_study.py): its options are the StudyConfig
fields, and it runs end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_study.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("smollm2_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_options_are_the_config_fields():
    from bigram_circuits.app.study import StudyConfig, _command_line
    from bigram_circuits.search import SearchConfig

    study = _load_script()
    config = study.parse_args(["--lambdas", "0", "10", "--lr", "0.05", "--prompts", "a", "b c", "--max-steps", "7"])
    assert config.lambdas == (0.0, 10.0) and config.prompts == ("a", "b c")
    # the search settings are flat options of the nested SearchConfig
    assert config.search.lr == 0.05 and config.search.max_steps == 7
    assert config.search == dataclasses.replace(StudyConfig().search, lr=0.05, max_steps=7)
    for field in dataclasses.fields(StudyConfig):  # every other option keeps its default (paths under the repo)
        if field.name not in {"lambdas", "prompts", "search"}:
            expected = study.REPO / field.default if isinstance(field.default, Path) else field.default
            assert getattr(config, field.name) == expected, field.name
    # a search setting the study does not size is the --schedule's; one given overrides it
    config = study.parse_args(["--schedule", "warm_settle", "--init", "1.5", "--out", "runs/x"])
    assert config.search == dataclasses.replace(StudyConfig(schedule="warm_settle").search, init=1.5)
    assert config.search.temperature_rule == SearchConfig.named("warm_settle").temperature_rule == "after_settle"
    assert config.search.max_steps == StudyConfig().search.max_steps == 350  # the study's size
    assert _command_line(config).startswith("python benchmarks/smollm2_study.py --schedule warm_settle --init 1.5 ")
    assert "--out runs/x" in _command_line(config)


@pytest.mark.slow
def test_study_script_runs_on_a_tiny_model_and_resumes(tmp_path, tiny_neox_dir, tiny_text, monkeypatch):
    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(list(tiny_text) * 3))
    study = _load_script()
    argv = [
        "--model",
        str(tiny_neox_dir),
        "--label",
        "tiny",
        "--corpus",
        str(corpus),
        "--lambdas",
        "0",
        "10",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--train-windows",
        "32",
        "--eval-windows",
        "8",
        "--analysis-tokens",
        "128",
        "--threads",
        "1",
        "--eval-batches",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--results",
        str(tmp_path / "results" / "study"),
        "--figures",
        str(tmp_path / "figures"),
        "--linear-map-steps",
        "3",
    ]
    result = study.main(argv)

    saved = json.loads((tmp_path / "results" / "study.json").read_text())
    assert saved["label"] == "tiny" and saved["corpus"] == str(corpus)
    assert [row["lambda"] for row in saved["sweep"]] == [0.0, 10.0]
    assert saved["chosen"]["n_params"] <= saved["chosen"]["n_params_total"]
    assert {"stable", "chosen"} <= set(saved["sweep"][0]) and 0 < saved["noise_ceiling_r"] <= 1
    assert [row["seed"] for row in saved["seeds"]] == [0, 1, 2]  # the chosen lambda over 3 seeds
    assert all(row["lambda"] == saved["chosen"]["lambda"] for row in saved["seeds"])
    assert saved["seeds_summary"]["n_seeds"] == 3 and "bigram_r_sd" in saved["seeds_summary"]
    assert saved["optimal"]["lambda"] == saved["chosen"]["lambda"]  # the optimal subnetwork at the chosen lambda
    assert sum(row["condition"] == "random ablated" for row in saved["ablation"]) == 1  # mean over 3 controls
    assert set(saved["circuits"]) == {"full", "bigram", "random"}
    # Table 2 and the controls: the chosen lambda searched at random init (with and without the
    # trained embeddings) and on the permuted table, the partial ablation and seed-vs-seed overlap.
    conditions = [row["condition"] for row in saved["table2"]]
    assert conditions == [
        "full model",
        "bigram subnetwork",
        "subnetwork at random init",
        "random init + trained embeddings",
        "empty subnetwork + embeddings",
        "embeddings + linear map",
    ]
    searches = saved["controls"]["searches"]
    names = ["random_init", "random_init_trained_embeddings", "permuted_contexts"]
    assert [row["control"] for row in searches] == names
    assert all(row["lambda"] == saved["chosen"]["lambda"] for row in searches)
    assert (tmp_path / "run" / "controls" / "random_init" / "sweep.csv").exists()
    assert {row["condition"] for row in saved["controls"]["partial_ablation"]} == {"bigram", "random"}
    assert len(saved["controls"]["seed_overlap"]) == 3  # seed pairs (0,1), (0,2), (1,2)
    assert "## Table 2" in (tmp_path / "results" / "study.md").read_text()
    assert {"full model", "bigram ablated", "random ablated"} <= {row["condition"] for row in saved["ablation"]}
    markdown = (tmp_path / "results" / "study.md").read_text()
    assert "tiny (this run)" in markdown and "## Circuits" in markdown and "Noise ceiling" in markdown
    assert saved["command"] == "python benchmarks/smollm2_study.py " + " ".join(argv)
    assert [row["lambda"] for row in saved["sweep_layers"]] == [0.0, 10.0]
    for name in (
        "fig1_r_vs_params",
        "layer_distribution_lambda_0",
        "layer_distribution_lambda_10",
        "fig3_rotation",
        "fig4_similarity",
    ):
        assert (tmp_path / "figures" / f"{name}.html").exists()

    # A second run resumes the finished sweep instead of searching again, and reads every analysis
    # from its cached stage (OUT/study_stages) instead of computing it again.
    import bigram_circuits.circuits.ablation as circuits_ablation
    import bigram_circuits.circuits.lens as lens_module
    import bigram_circuits.evaluate as evaluate_module

    def recomputed(*args, **kwargs):
        raise AssertionError("a cached stage was computed again")

    with monkeypatch.context() as patched:
        patched.setattr(evaluate_module, "ablation_table", recomputed)
        patched.setattr(circuits_ablation, "partial_ablation_table", recomputed)
        patched.setattr(lens_module, "lens_report", recomputed)
        again = study.main(argv)
    assert again["sweep"] == result["sweep"]
    assert again["controls"]["searches"] == result["controls"]["searches"]  # reused too
    for key in ("ablation", "generations", "optimal", "overlap", "table2", "controls", "circuits", "full_model"):
        assert json.loads(json.dumps(again[key])) == json.loads(json.dumps(result[key])), key
    cached = {k: v for k, v in result["timings_s"].items() if k.startswith(("ablation_", "partial_ablation_"))}
    assert cached and all(again["timings_s"][k] == v for k, v in cached.items())  # the time it took when computed

    # One control alone (to run the study's searches side by side), at the sweep's chosen lambda.
    row = study.main([*argv, "--only-control", "permuted_vocab"])
    assert row["control"] == "permuted_vocab" and row["lambda"] == saved["chosen"]["lambda"]
    assert (tmp_path / "run" / "controls" / "permuted_vocab" / "sweep.csv").exists()


def test_study_script_refuses_an_impossible_device_in_one_line(tmp_path):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_study.py"
    out = tmp_path / "never"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cuda", "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error:") and "cuda" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not out.exists()  # refused before any work
