"""The prepared GPU check script, rehearsed on the CPU at tiny sizes (every stage, one JSON)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_every_stage_on_cpu(tiny_neox_dir, tiny_text, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_text), encoding="utf-8")
    out = tmp_path / "gpu_check.json"
    report = _load_script().main(
        [
            "--device",
            "cpu",
            "--out",
            str(out),
            "--tests",
            "tests/test_devices.py::test_resolve_device_accepts_present_devices",
            "--size",
            "tiny",
            "--steps",
            "3",
            "--batch",
            "4",
            "--seq-len",
            "16",
            "--model",
            str(tiny_neox_dir),
            "--corpus",
            str(corpus),
            "--sweep-lambdas",
            "0,1",
            "--sweep-steps",
            "2",
            "--sweep-train-windows",
            "32",
            "--sweep-eval-windows",
            "8",
            "--sweep-seq-len",
            "16",
            "--sweep-batch",
            "8",
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["stages"].keys() == {"tests", "search", "sweep"} == report["stages"].keys()
    tests, search, sweep = (saved["stages"][k] for k in ("tests", "search", "sweep"))
    assert "error" not in tests and tests["returncode"] == 0 and tests["passed"] == 1, tests
    assert tests["device"] == "cpu"
    assert "error" not in search, search
    assert search["steps"] == 3 and search["median_step_s"] > 0 and search["batch"] == "4x16"
    assert search["peak_gpu_memory_gb"] is None and search["masked_weights"] > 0
    assert "error" not in sweep, sweep
    assert [row["lambda"] for row in sweep["rows"]] == [0.0, 1.0]
    assert all(row["steps"] <= 2 for row in sweep["rows"])
    assert saved["environment"]["device"] == "cpu" and saved["total_wall_s"] > 0
