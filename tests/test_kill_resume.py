"""A ``bigram-circuits find`` process killed with SIGKILL mid-search and run again ends with
the same masks and history as an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bigram_circuits.manifest import verify_manifest
from bigram_circuits.subnetwork import Subnetwork

LAMBDAS = ("0", "0.05")
TIMEOUT_S = 240


def _find_command(model: Path, corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bigram_circuits.cli",
        "find",
        "--model",
        str(model),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--granularity",
        "neuron,head",
        "--lambdas",
        ",".join(LAMBDAS),
        "--seq-len",
        "24",
        "--batch-size",
        "8",
        "--max-steps",
        "40",
        "--checkpoint-every",
        "4",
        "--max-train-windows",
        "128",
        "--max-eval-windows",
        "16",
        "--seed",
        "7",
        "--no-progress",
    ]


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_gives_the_uninterrupted_masks(tiny_neox_dir, tiny_text, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_text), encoding="utf-8")
    # One thread per process: both runs do the same arithmetic whatever else the machine runs.
    env = {
        **os.environ,
        "BIGRAM_CIRCUITS_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
    # Both runs may fill the shared token cache at once: its writes are atomic, the content equal.
    straight = _start(_find_command(tiny_neox_dir, corpus, straight_out), env, tmp_path / "straight.log")
    victim = _start(_find_command(tiny_neox_dir, corpus, killed_out), env, tmp_path / "killed.log")
    # Kill during the second lambda, after its first checkpoint: the first lambda is finished.
    checkpoint = killed_out / f"lambda_{LAMBDAS[1]}" / "checkpoint.pt"
    deadline = time.monotonic() + TIMEOUT_S
    while not checkpoint.exists():
        assert victim.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert (killed_out / f"lambda_{LAMBDAS[0]}" / "masks.safetensors").exists()
    assert not (killed_out / f"lambda_{LAMBDAS[1]}" / "masks.safetensors").exists(), "killed too late"
    assert not (killed_out / "manifest.json").exists()

    resumed = subprocess.run(
        _find_command(tiny_neox_dir, corpus, killed_out), env=env, capture_output=True, check=False, timeout=TIMEOUT_S
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert straight.wait(timeout=TIMEOUT_S) == 0, (tmp_path / "straight.log").read_text()

    for lam in LAMBDAS:
        a = Subnetwork.load(straight_out / f"lambda_{lam}")
        b = Subnetwork.load(killed_out / f"lambda_{lam}")
        assert a.masks.keys() == b.masks.keys()
        for key in a.masks:
            assert torch.equal(a.masks[key], b.masks[key]), (lam, key)
        pd.testing.assert_frame_equal(
            pd.read_csv(straight_out / f"lambda_{lam}" / "history.csv"),
            pd.read_csv(killed_out / f"lambda_{lam}" / "history.csv"),
        )
        assert not (killed_out / f"lambda_{lam}" / "checkpoint.pt").exists()
    pd.testing.assert_frame_equal(
        pd.read_csv(straight_out / "sweep.csv").drop(columns=["wall_time_s", "cpu_time_s", "path"], errors="ignore"),
        pd.read_csv(killed_out / "sweep.csv").drop(columns=["wall_time_s", "cpu_time_s", "path"], errors="ignore"),
    )
    assert verify_manifest(killed_out).attrs["ok"]
    assert not [p for p in killed_out.rglob("*") if p.name.endswith(".tmp")]
