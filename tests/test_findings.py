"""The README's findings table (benchmarks/findings.py) against the committed results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def findings_module():
    spec = importlib.util.spec_from_file_location("findings_script", REPO / "benchmarks" / "findings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_findings_match_the_committed_data(findings_module, tmp_path):
    """benchmarks/results/findings.md is what findings.py makes of the committed results now:
    rerun `python benchmarks/findings.py` after any result it reads changes."""
    findings_module.main(["--out", str(tmp_path / "findings")])
    committed = (REPO / "benchmarks" / "results" / "findings.md").read_text(encoding="utf-8")
    assert (tmp_path / "findings.md").read_text(encoding="utf-8") == committed
    assert json.loads((tmp_path / "findings.json").read_text()) == json.loads(
        (REPO / "benchmarks" / "results" / "findings.json").read_text()
    )


def test_table2_verdict_holds_the_subnetwork_against_every_baseline(findings_module):
    verdict = findings_module.table2_verdict
    rows = {"full model": 0.87, "bigram subnetwork": 0.964, "subnetwork at random init": 0.567}
    assert verdict(pd.Series(rows)).startswith("holds")
    rows["embeddings + linear map"] = 0.958  # a baseline within 0.02: narrow
    assert verdict(pd.Series(rows)).startswith("narrowly") and "linear map" in verdict(pd.Series(rows))
    rows["random init + trained embeddings"] = 0.97  # a baseline above it
    assert verdict(pd.Series(rows)).startswith("differs")


def test_plateau_verdict_tests_the_plateau_and_the_fall(findings_module):
    verdict = findings_module.plateau_verdict

    def sweep(points):  # (active params, r), lambda 0 first
        return pd.DataFrame(
            {"lambda": range(len(points)), "active_params": [p for p, _ in points], "r": [r for _, r in points]}
        ).assign(mask_size=20_000_000)

    assert verdict(sweep([(10e6, 0.96), (2e6, 0.95), (5e5, 0.80)])).startswith("holds")  # falls below ~1M
    assert verdict(sweep([(10e6, 0.96), (2e6, 0.95), (5e5, 0.95), (1e4, 0.8)])).startswith("partly")  # falls late
    assert "no fall" in verdict(sweep([(10e6, 0.96), (5e5, 0.95)]))
    assert verdict(sweep([(10e6, 0.96)]).assign(**{"lambda": 1})).startswith("not measured")
