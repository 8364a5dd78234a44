"""Devices: validation up front, and the core paths on the device under test.

The device is ``$BIGRAM_CIRCUITS_TEST_DEVICE`` (default ``cpu``; the ``device`` fixture in
conftest). Each test compares the model on that device with the same model on the CPU, so the
suite checks device-correctness when it runs on CUDA and stays meaningful on a CPU-only machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigram_circuits.circuits.lens import LinearLensConfig, linear_lens, logit_lens
from bigram_circuits.circuits.similarity import deflated_covariance, layer_covariance_similarity
from bigram_circuits.cli import main
from bigram_circuits.data import tokenize_documents
from bigram_circuits.devices import SHARE_GPU_ENV
from bigram_circuits.distributed import data_parallel
from bigram_circuits.errors import BigramCircuitsError, ConfigError, DeviceError
from bigram_circuits.evaluate import evaluate_metrics
from bigram_circuits.masks import MaskSet, component_device
from bigram_circuits.models import (
    available_devices,
    input_device,
    load_model,
    resolve_device,
    resolve_device_map,
)
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, search
from bigram_circuits.subnetwork import Subnetwork

ABSENT_GPU = f"cuda:{torch.cuda.device_count() + 3}"


@pytest.fixture(scope="module")
def corpus(tiny_neox, tiny_text):
    _, tokenizer = tiny_neox
    windows = tokenize_documents(tiny_text, tokenizer, show_progress=False).windows(seq_len=24)
    stats = BigramStats.from_tokens(windows[:-16], len(tokenizer), seq_len=24, show_progress=False)
    return windows[:-16], windows[-16:], stats


# --------------------------------------------------------------------------- validation


def test_resolve_device_accepts_present_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert str(resolve_device("auto")) in available_devices()
    assert available_devices()[0] == "cpu"


@pytest.mark.parametrize("name", [ABSENT_GPU, "gpu0", "meta", "cuda:-1"])
def test_absent_or_unknown_device_is_one_line_naming_the_present_ones(name):
    with pytest.raises(DeviceError) as info:
        resolve_device(name)
    message = str(info.value)
    assert "\n" not in message and "devices present: cpu" in message
    assert isinstance(info.value, BigramCircuitsError)


def test_load_model_checks_the_device_before_loading(tiny_neox_dir):
    with pytest.raises(DeviceError, match="devices present"):
        load_model(tiny_neox_dir, device=ABSENT_GPU)


def test_device_maps_are_checked_up_front(tiny_neox_dir):
    with pytest.raises(DeviceError, match="unknown device_map"):
        resolve_device_map("everywhere")
    with pytest.raises(DeviceError, match="meta"):
        resolve_device_map({"gpt_neox.layers.0": "meta"})
    with pytest.raises(DeviceError, match="devices present"):
        resolve_device_map({"gpt_neox.layers.0": ABSENT_GPU})
    with pytest.raises(DeviceError, match="GPUs"):
        load_model(tiny_neox_dir, n_devices=torch.cuda.device_count() + 2)
    assert resolve_device_map({"a": "cpu", "b": "disk"}, {"cpu": "1GiB"}) == (
        {"a": "cpu", "b": "disk"},
        {"cpu": "1GiB"},
    )


def test_cli_find_on_an_absent_device_prints_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["find", "--device", ABSENT_GPU, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "devices present" in err
    assert "Traceback" not in err and not out.exists()


# --------------------------------------------------------------------------- resolution for ranks and GPU counts
# No GPU is needed: torch.cuda's answers and the torchrun environment are replaced per test.

TORCHRUN_VARIABLES = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", SHARE_GPU_ENV)


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)`` makes torch report ``n`` CUDA devices (none: no CUDA); ``gpus(n, rank=r, ranks=k)``
    also sets the variables torchrun gives local rank ``r`` of ``k``. Starts outside torchrun."""
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_up(n: int, rank: int | None = None, ranks: int = 1) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
        if rank is not None:
            monkeypatch.setenv("LOCAL_RANK", str(rank))
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))

    return set_up


def _one_line_config_error(request, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_device(request, **kwargs)
    assert isinstance(info.value, DeviceError) and "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(("n_gpus", "expected"), [(0, "cpu"), (1, "cuda:0"), (4, "cuda:0")])
def test_auto_is_cuda_when_available_else_cpu(gpus, n_gpus, expected):
    gpus(n_gpus)
    assert resolve_device("auto") == torch.device(expected)
    if n_gpus:
        assert resolve_device("cuda") == torch.device("cuda", 0)
        assert resolve_device(f"cuda:{n_gpus - 1}") == torch.device("cuda", n_gpus - 1)


@pytest.mark.parametrize("request_", ["cuda", "auto", "CUDA", torch.device("cuda")])
@pytest.mark.parametrize(("local_rank", "n_ranks", "n_gpus"), [(0, 2, 2), (1, 2, 2), (3, 4, 8), (0, 1, 1)])
def test_under_torchrun_each_rank_takes_its_own_local_gpu(gpus, request_, local_rank, n_ranks, n_gpus):
    gpus(n_gpus, rank=local_rank, ranks=n_ranks)
    resolved = resolve_device(request_)
    assert resolved == torch.device("cuda", local_rank)
    assert resolve_device(resolved) == resolved  # a resolved device passes through unchanged


def test_the_torchrun_environment_can_be_passed_explicitly(gpus):
    gpus(2)
    assert resolve_device("cuda", environ={"LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == torch.device("cuda", 1)
    assert resolve_device("cuda", environ={}) == torch.device("cuda", 0)


def test_under_torchrun_without_cuda_auto_is_cpu_and_cuda_is_one_error(gpus):
    gpus(0, rank=1, ranks=2)
    assert resolve_device("auto") == torch.device("cpu")
    assert "no CUDA here" in _one_line_config_error("cuda")


def test_more_torchrun_ranks_than_gpus_is_one_error(gpus):
    gpus(2, rank=2, ranks=3)
    message = _one_line_config_error("auto")
    assert "LOCAL_RANK is 2" in message and "--nproc-per-node 2" in message


@pytest.mark.parametrize("request_", ["cuda:1", 1])
def test_one_explicit_gpu_for_several_torchrun_ranks_is_one_error_unless_shared(gpus, monkeypatch, request_):
    gpus(2, rank=0, ranks=2)
    message = _one_line_config_error(request_)
    assert "all 2 torchrun ranks" in message and "--device cuda" in message and SHARE_GPU_ENV in message
    monkeypatch.setenv(SHARE_GPU_ENV, "1")
    assert resolve_device(request_) == torch.device("cuda", 1)


def test_one_explicit_gpu_for_a_single_torchrun_rank_is_fine(gpus, monkeypatch):
    gpus(2, rank=0, ranks=1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "1")  # the count falls back to WORLD_SIZE
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("request_", "n_gpus", "phrase"),
    [
        ("cuda", 0, "no CUDA here"),
        ("cuda:2", 2, "(2 CUDA devices)"),
        (torch.device("cuda", 5), 2, "(2 CUDA devices)"),
        ("mps", 0, "'mps' is not available"),
        ("tpu", 0, "unknown device"),
        ("cuda:x", 1, "unknown device"),
    ],
)
def test_an_impossible_request_is_one_config_error_saying_what_to_pass(gpus, monkeypatch, request_, n_gpus, phrase):
    gpus(n_gpus)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)
    message = _one_line_config_error(request_)
    assert phrase in message and "devices present: cpu" in message and "pass one of them" in message


def test_bad_torchrun_variables_are_one_error(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv("LOCAL_RANK", "first")
    assert "LOCAL_RANK" in _one_line_config_error("cuda")


def test_data_parallel_keeps_the_resolved_device(gpus):
    gpus(0)
    with data_parallel(device="auto") as group:
        assert group.device == torch.device("cpu") and group.backend == "gloo"
    gpus(2, rank=0, ranks=2)
    with pytest.raises(DeviceError, match="torchrun ranks"), data_parallel(device="cuda:1"):
        pass


@pytest.mark.parametrize("entry", ["cli", "torchrun"])
def test_cli_refuses_one_gpu_for_every_rank_in_one_line_before_any_output(gpus, tmp_path, capsys, entry):
    from bigram_circuits.distributed.__main__ import main as torchrun_main

    gpus(2, rank=1, ranks=2)
    out = tmp_path / "run"
    run = main if entry == "cli" else torchrun_main
    assert run(["find", "--device", "cuda:0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "all 2 torchrun ranks" in err
    assert "Traceback" not in err and not out.exists()


def test_the_torchrun_entry_hands_the_command_the_resolved_device(gpus, monkeypatch, tmp_path):
    import bigram_circuits.distributed.__main__ as entry

    seen = []
    monkeypatch.setattr(entry, "cli_run", lambda args: seen.append(args.device) or 0)
    gpus(0, rank=0, ranks=1)
    assert entry.main(["find", "--device", "auto", "--out", str(tmp_path / "run")]) == 0
    assert seen == [torch.device("cpu")]


# --------------------------------------------------------------------------- on the test device


def test_masks_live_on_the_model_device_and_match_cpu(tiny_neox, tiny_neox_on_device, device):
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for bridge, _ in (tiny_neox, tiny_neox_on_device):
        mask_set = MaskSet.for_model(bridge, ("neuron", "head", "weight"), init=0.5)
        for key, component in mask_set.components.items():
            assert mask_set.logit(key).device == component_device(bridge, component)
        with mask_set.attach(bridge) as forward_masks:
            logits = bridge(tokens.to(input_device(bridge)))
        loss = logits.float().pow(2).mean() + mask_set.penalty(forward_masks)
        # Gradients of the mask logits only: the session-wide model must keep no .grad.
        grads = torch.cat([g.flatten().cpu() for g in torch.autograd.grad(loss, list(mask_set.parameters()))])
        results.append((logits.detach().cpu(), grads))
    assert mask_set.logit(mask_set.keys[0]).device.type == device.type
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-6)


def test_search_steps_on_the_device_match_cpu(tiny_neox, tiny_neox_on_device, corpus):
    train, held_out, stats = corpus
    config = SearchConfig(batch_size=8, seq_len=24, max_steps=3, stability_check=False, lam=1.0)
    cpu, dev = (
        search(
            bridge, train, Target.bigram(stats), ("neuron", "head"), config, eval_windows=held_out, show_progress=False
        )
        for bridge, _ in (tiny_neox, tiny_neox_on_device)
    )
    np.testing.assert_allclose(dev.history["loss"], cpu.history["loss"], rtol=1e-4)
    for key, logit in cpu.mask_set.logits.items():
        torch.testing.assert_close(dev.mask_set.logits[key].detach().cpu(), logit.detach(), rtol=1e-3, atol=1e-5)
    assert dev.metrics["bigram_r"] == pytest.approx(cpu.metrics["bigram_r"], abs=1e-4)


def test_evaluate_on_the_device_matches_cpu(tiny_neox, tiny_neox_on_device, corpus):
    _, held_out, stats = corpus
    sub = Subnetwork.full(tiny_neox[0]).random_control(seed=0)
    cpu, dev = (
        evaluate_metrics(bridge, stats, held_out, sub, show_progress=False)
        for bridge, _ in (tiny_neox, tiny_neox_on_device)
    )
    for name in ("r_dropped", "soft_xent", "lm_loss_nats"):
        assert dev[name] == pytest.approx(cpu[name], rel=1e-4, abs=1e-5)


def test_lenses_and_similarity_run_on_the_device(tiny_neox, tiny_neox_on_device, corpus):
    train, _, stats = corpus
    windows = train[:16]
    tables = []
    for bridge, tokenizer in (tiny_neox, tiny_neox_on_device):
        lens = logit_lens(bridge, windows, bigram_stats=stats, vocab_size=len(tokenizer), n_tokens=None, progress=False)
        linear = linear_lens(
            bridge,
            windows,
            config=LinearLensConfig(n_tokens=16 * 24, batch_size=8),
            vocab_size=len(tokenizer),
            progress=False,
        )
        similarity = layer_covariance_similarity(bridge, windows, n_tokens=None, progress=False)
        tables.append((lens, linear, similarity))
    (lens_c, linear_c, sim_c), (lens_d, linear_d, sim_d) = tables
    np.testing.assert_allclose(lens_d["bigram_r"], lens_c["bigram_r"], atol=1e-4)
    np.testing.assert_allclose(linear_d["r2"], linear_c["r2"], atol=1e-3)
    np.testing.assert_allclose(sim_d.to_numpy(), sim_c.to_numpy(), atol=1e-4)
    activations = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    on_device = activations.to(tiny_neox_on_device[0].cfg.device)
    np.testing.assert_allclose(deflated_covariance(on_device), deflated_covariance(activations), atol=1e-10)


@pytest.mark.gpu
def test_cuda_model_keeps_masks_and_lenses_on_cuda(tiny_neox_dir, corpus):
    bridge, tokenizer = load_model(tiny_neox_dir, device="cuda")
    mask_set = MaskSet.for_model(bridge, ("neuron", "head", "weight"))
    assert {p.device.type for p in mask_set.parameters()} == {"cuda"}
    _, held_out, stats = corpus
    table = logit_lens(bridge, held_out, bigram_stats=stats, vocab_size=len(tokenizer), n_tokens=None, progress=False)
    assert np.isfinite(table["bigram_r"]).all()
