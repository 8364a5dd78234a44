"""The README's main command, `bigram-circuits demo`, on the bundled default model."""

from __future__ import annotations

from bigram_circuits.cli import main
from bigram_circuits.subnetwork import Subnetwork


def test_demo_loads_evaluates_and_finds_a_subnetwork(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "3", "--eval-windows", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3,145,728 attention+MLP weights" in printed
    assert "eval loss on" in printed and "bigram subnetwork:" in printed
    subnetwork = Subnetwork.load(out)  # the demo's result is a saved, reloadable subnetwork
    assert set(subnetwork.granularities) == {"neuron", "head"}
