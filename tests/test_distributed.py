"""Data-parallel search (``bigram_circuits.distributed``): gloo on CPU, two ranks under torchrun.

Two ranks, each on half of every batch, with the mask-logit gradients averaged, follow one
process with the same global batch; a run killed mid-search (SIGKILL to every rank) resumes from
rank 0's checkpoint to the same result; ``--shard-masks`` (FSDP2) follows it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bigram_circuits.distributed import SINGLE_PROCESS, ProcessGroup, current, launched_by_torchrun
from bigram_circuits.errors import SearchError
from bigram_circuits.search import SearchConfig, Target, search
from bigram_circuits.subnetwork import Subnetwork

TIMEOUT_S = 300
LAMBDA = "0.5"
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def _find_args(model: Path, corpus: Path, out: Path, max_steps: int = 150) -> list[str]:
    return [
        "find",
        "--model",
        str(model),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--granularity",
        "weight",
        "--lambdas",
        LAMBDA,
        "--seq-len",
        "24",
        "--batch-size",
        "8",
        "--max-steps",
        str(max_steps),
        "--checkpoint-every",
        "5",
        "--max-train-windows",
        "128",
        "--max-eval-windows",
        "16",
        "--no-progress",
        "--no-stability-check",
    ]


def _env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "BIGRAM_CIRCUITS_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _torchrun(args: list[str]) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "bigram_circuits.distributed", *args]


def test_single_process_group_changes_nothing():
    batch = np.arange(24).reshape(8, 3)
    assert current() is SINGLE_PROCESS and not SINGLE_PROCESS.active and SINGLE_PROCESS.is_writer
    assert SINGLE_PROCESS.shard(batch) is batch
    values = torch.tensor([1.0, 2.0])
    assert SINGLE_PROCESS.average(values) is values
    assert SINGLE_PROCESS.any(True) and not SINGLE_PROCESS.any(False)


def test_shards_are_equal_contiguous_parts_of_the_batch():
    batch = np.arange(16).reshape(8, 2)
    parts = [ProcessGroup(rank=r, world_size=4).shard(batch) for r in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    assert {len(p) for p in parts} == {2}
    with pytest.raises(SearchError, match="multiple of 3"):
        ProcessGroup(rank=0, world_size=3).shard(batch)


def test_torchrun_without_the_data_parallel_entry_is_refused(tiny_neox, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_by_torchrun()
    windows = np.zeros((8, 24), dtype=np.int64)
    with pytest.raises(SearchError, match=r"bigram_circuits\.distributed"):
        search(
            tiny_neox[0],
            windows,
            Target.next_token(300),
            "neuron",
            SearchConfig(max_steps=1, batch_size=8),
            show_progress=False,
        )


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None or not hasattr(signal, "SIGKILL"), reason="needs torchrun and SIGKILL")
def test_two_ranks_equal_one_process_and_a_killed_run_resumes(tiny_neox_dir, tiny_text, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_text), encoding="utf-8")
    env = _env(tmp_path)
    single_out, parallel_out = tmp_path / "single", tmp_path / "parallel"
    single = subprocess.Popen(
        [sys.executable, "-m", "bigram_circuits.cli", *_find_args(tiny_neox_dir, corpus, single_out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log = tmp_path / "killed.log"
    with open(log, "wb") as handle:  # own session: the kill reaches torchrun and both ranks
        victim = subprocess.Popen(
            _torchrun(_find_args(tiny_neox_dir, corpus, parallel_out)),
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run_dir = parallel_out / f"lambda_{LAMBDA}"
    deadline = time.monotonic() + TIMEOUT_S
    while not (run_dir / "checkpoint.pt").exists():
        assert victim.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (run_dir / "masks.safetensors").exists(), "killed too late"
    resumed = subprocess.run(
        _torchrun(_find_args(tiny_neox_dir, corpus, parallel_out)),
        env=env,
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    out, _ = single.communicate(timeout=TIMEOUT_S)
    assert single.returncode == 0, out.decode()[-3000:]

    one = pd.read_csv(single_out / f"lambda_{LAMBDA}" / "history.csv")
    two = pd.read_csv(run_dir / "history.csv")
    assert len(one) == len(two) > 5
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
    np.testing.assert_allclose(two["soft_density"], one["soft_density"], rtol=1e-4)
    a, b = Subnetwork.load(single_out / f"lambda_{LAMBDA}"), Subnetwork.load(run_dir)
    agree = sum(int((a.masks[k] == b.masks[k]).sum()) for k in a.masks) / a.n_entries
    assert agree >= 0.999, agree
    # One writer: one stats file, one sweep table, no stray temp files or checkpoints.
    assert (parallel_out / "sweep.csv").exists() and (parallel_out / "find.json").exists()
    assert not list(parallel_out.rglob("*.tmp")) and not (run_dir / "checkpoint.pt").exists()
    stdout = resumed.stdout.decode()
    assert stdout.count("n_params") == 1  # the table printed by rank 0 only
    # The same run with the mask logits sharded over the two ranks (FSDP2).
    sharded_out = tmp_path / "sharded"
    sharded = subprocess.run(
        _torchrun(["--shard-masks", *_find_args(tiny_neox_dir, corpus, sharded_out)]),
        env=env,
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert sharded.returncode == 0, sharded.stderr.decode()[-3000:]
    three = pd.read_csv(sharded_out / f"lambda_{LAMBDA}" / "history.csv")
    assert len(three) == len(one)
    np.testing.assert_allclose(three["loss"], one["loss"], rtol=1e-4)
    c = Subnetwork.load(sharded_out / f"lambda_{LAMBDA}")
    assert c.metadata["metrics"]["data_parallel"] == {"world_size": 2, "sharded_masks": True}
    sharded_agree = sum(int((a.masks[k] == c.masks[k]).sum()) for k in a.masks) / a.n_entries
    assert sharded_agree >= 0.999
    print(
        f"data-parallel vs one process: {len(one)} steps, max relative loss difference "
        f"{float(np.max(np.abs(two['loss'] / one['loss'] - 1))):.2e}, mask agreement {agree:.6f}; sharded: "
        f"{float(np.max(np.abs(three['loss'] / one['loss'] - 1))):.2e}, {sharded_agree:.6f}"
    )


# --------------------------------------------------------------------------- FSDP2 mask sharding

FSDP_STEPS = 3


def _fsdp_steps(bridge, mask_set, batches, lam: float = 0.5) -> None:
    """A few AdamW steps of a next-token loss + lambda * penalty through ``mask_set.attach``."""
    optimizer = torch.optim.AdamW(mask_set.parameters(), lr=0.05)
    for tokens in batches:
        with mask_set.attach(bridge) as forward_masks:
            logits = bridge(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1, :300].flatten(0, 1), tokens[:, 1:].flatten())
        loss = loss + lam * mask_set.penalty(forward_masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _fsdp_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 300, (4, 12), generator=generator) for _ in range(FSDP_STEPS)]


def _fsdp_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """One rank: shard the weight-mask logits with FSDP2, run its half of every batch."""
    from bigram_circuits.distributed import data_parallel, full_logits, shard_mask_set
    from bigram_circuits.masks import MaskSet
    from bigram_circuits.models import load_model

    torch.set_num_threads(1)
    bridge, _ = load_model(model_dir)
    for p in bridge.parameters():
        p.requires_grad_(False)
    with data_parallel("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}") as group:
        mask_set = shard_mask_set(MaskSet.for_model(bridge, "weight"))
        local = {key: tuple(mask_set.parameter(key).to_local().shape) for key in mask_set.keys}
        batches = [torch.as_tensor(group.shard(b.numpy())) for b in _fsdp_batches()]
        _fsdp_steps(bridge, mask_set, batches)
        logits = full_logits(mask_set)
        if group.is_writer:
            torch.save({"logits": logits, "local_shapes": local}, out)


@pytest.mark.slow
def test_fsdp2_sharded_weight_masks_match_one_process(tiny_neox, tiny_neox_dir, tmp_path):
    import torch.multiprocessing as mp
    from conftest import free_port

    from bigram_circuits.masks import MaskSet

    out = tmp_path / "fsdp.pt"
    mp.start_processes(
        _fsdp_worker, args=(2, free_port(), str(tiny_neox_dir), str(out)), nprocs=2, join=True, start_method="spawn"
    )
    sharded = torch.load(out, weights_only=True)
    bridge = tiny_neox[0]
    reference = MaskSet.for_model(bridge, "weight")
    frozen = [p for p in bridge.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        _fsdp_steps(bridge, reference, _fsdp_batches())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for key in reference.keys:
        logit = reference.logit(key)
        assert sharded["local_shapes"][key][0] == (logit.shape[0] + 1) // 2  # half the rows each
        # AdamW divides by sqrt(v): near-zero gradients turn float-order noise into ~1e-6 steps.
        torch.testing.assert_close(sharded["logits"][key], logit.detach(), rtol=1e-4, atol=1e-5)
    worst = max(float((sharded["logits"][k] - reference.logit(k).detach()).abs().max()) for k in reference.keys)
    print(f"FSDP2 sharded vs one process after {FSDP_STEPS} steps: max |logit difference| {worst:.2e}")


def test_shard_masks_flag_goes_before_the_command(capsys):
    from bigram_circuits.distributed.__main__ import main

    assert main(["find", "--shard-masks", "--model", "default"]) == 2
    assert "before the command" in capsys.readouterr().err


def test_shard_masks_in_one_process_says_there_is_nothing_to_shard(capsys, monkeypatch, tmp_path):
    import bigram_circuits.distributed.__main__ as entry

    monkeypatch.setattr(entry, "cli_run", lambda args: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert entry.main(["--shard-masks", "find", "--out", str(tmp_path / "run")]) == 0
    assert "nothing to shard" in capsys.readouterr().err
