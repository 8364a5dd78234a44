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
    assert "random ablated" in printed and "bigram ablated" in printed and "same shape" in printed
    subnetwork = Subnetwork.load(out)  # the demo's result is a saved, reloadable subnetwork
    assert set(subnetwork.granularities) == {"weight"}


def test_demo_granularity_is_one_option_away(tmp_path, capsys):
    out = tmp_path / "demo_nh"
    assert main(["demo", "--steps", "2", "--eval-windows", "4", "--granularity", "neuron,head", "--out", str(out)]) == 0
    assert set(Subnetwork.load(out).granularities) == {"neuron", "head"}
