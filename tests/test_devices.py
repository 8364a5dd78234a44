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
from bigram_circuits.errors import BigramCircuitsError, DeviceError
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
