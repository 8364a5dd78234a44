"""Models split over devices (``load_model(device_map=...)``): masks, search, evaluation, lenses.

Without a GPU the split is CPU + disk: accelerate keeps layer 1's weights on the ``meta`` device
and loads them from the offload folder for each forward pass, which is the code path of any
multi-device bridge (weights not where the first parameter is, hooks that move activations).
Every result is compared with the same model loaded on one device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigram_circuits.circuits.lens import logit_lens
from bigram_circuits.data import tokenize_documents
from bigram_circuits.errors import ModelLoadError
from bigram_circuits.evaluate import evaluate_metrics
from bigram_circuits.masks import MaskSet, component_device, mask_components, weight_tensor
from bigram_circuits.models import input_device, load_model, model_id
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, search
from bigram_circuits.subnetwork import Subnetwork

NEOX_CPU_DISK = {
    "gpt_neox.embed_in": "cpu",
    "gpt_neox.layers.0": "cpu",
    "gpt_neox.layers.1": "disk",
    "gpt_neox.final_layer_norm": "cpu",
    "gpt_neox.rotary_emb": "cpu",
    "lm_head": "cpu",
}
GRANULARITIES = [("neuron", "head"), ("weight",), ("neuron", "head", "weight")]


@pytest.fixture(scope="module")
def split_neox(tiny_neox_dir, tmp_path_factory):
    """The tiny GPT-NeoX with layer 1 offloaded to disk (the rest on the CPU)."""
    folder = tmp_path_factory.mktemp("offload")
    return load_model(tiny_neox_dir, device_map=NEOX_CPU_DISK, offload_folder=folder)


@pytest.fixture(scope="module")
def corpus(tiny_neox, tiny_text):
    _, tokenizer = tiny_neox
    windows = tokenize_documents(tiny_text, tokenizer, show_progress=False).windows(seq_len=24)
    stats = BigramStats.from_tokens(windows[:-16], len(tokenizer), seq_len=24, show_progress=False)
    return windows[:-16], windows[-16:], stats


def _tokens() -> torch.Tensor:
    return torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _random_logits(mask_set: MaskSet) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in mask_set.parameters():
            param.copy_(torch.rand(param.shape, generator=generator) * 2 - 1)


def test_the_split_is_real(split_neox, tiny_neox):
    bridge, _ = split_neox
    devices = {p.device.type for p in bridge.parameters()}
    assert devices == {"cpu", "meta"}  # layer 1 lives on disk, loaded per forward pass
    assert input_device(bridge) == torch.device("cpu")
    assert model_id(bridge) == model_id(tiny_neox[0])
    for component in mask_components(bridge, ("neuron", "head", "weight")):
        assert component_device(bridge, component) == torch.device("cpu")  # execution, not meta
    # Offloaded matrices are read from accelerate's store (zero-weight detection needs values).
    for component in mask_components(bridge, ("weight",)):
        torch.testing.assert_close(
            weight_tensor(bridge, component).cpu(), weight_tensor(tiny_neox[0], component).detach()
        )
    with torch.no_grad():
        torch.testing.assert_close(bridge(_tokens()), tiny_neox[0](_tokens()))


@pytest.mark.parametrize("granularities", GRANULARITIES)
def test_masked_logits_and_gradients_match_one_device(split_neox, tiny_neox, granularities):
    results = []
    for bridge, _ in (tiny_neox, split_neox):
        mask_set = MaskSet.for_model(bridge, granularities)
        _random_logits(mask_set)
        with mask_set.attach(bridge) as forward_masks:
            logits = bridge(_tokens())
        loss = logits.float().pow(2).mean() + mask_set.penalty(forward_masks)
        grads = torch.autograd.grad(loss, list(mask_set.parameters()))
        results.append((logits.detach(), torch.cat([g.flatten() for g in grads])))
    (ref_logits, ref_grads), (logits, grads) = results
    assert not torch.allclose(ref_logits, tiny_neox[0](_tokens()).detach())  # the mask acts
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-8)
    assert (grads != 0).any()
    with torch.no_grad():  # attachment removed cleanly: the offloaded model runs as before
        torch.testing.assert_close(split_neox[0](_tokens()), tiny_neox[0](_tokens()))


@pytest.mark.parametrize("mode", ["keep", "ablate"])
def test_subnetwork_applied_matches_one_device(split_neox, tiny_neox, mode):
    reference = tiny_neox[0]
    masks = {}
    generator = torch.Generator().manual_seed(2)
    for c in mask_components(reference, ("neuron", "head", "weight")):
        masks[c.key] = torch.rand(c.shape, generator=generator) > 0.3
    sub = Subnetwork.from_masks(reference, masks, {})
    with torch.no_grad():
        with sub.applied(reference, mode=mode):
            expected = reference(_tokens())
        with sub.applied(split_neox[0], mode=mode):
            found = split_neox[0](_tokens())
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


def test_search_steps_match_one_device(split_neox, tiny_neox, corpus):
    train, held_out, stats = corpus
    config = SearchConfig(batch_size=8, seq_len=24, max_steps=2, stability_check=False, lam=1.0)
    one, split = (
        search(
            bridge,
            train,
            Target.bigram(stats),
            ("neuron", "head", "weight"),
            config,
            eval_windows=held_out,
            show_progress=False,
        )
        for bridge, _ in (tiny_neox, split_neox)
    )
    np.testing.assert_allclose(split.history["loss"], one.history["loss"], rtol=1e-6)
    for key, logit in one.mask_set.logits.items():
        torch.testing.assert_close(split.mask_set.logits[key].detach(), logit.detach())
    assert split.metrics["bigram_r"] == pytest.approx(one.metrics["bigram_r"], abs=1e-6)
    assert split.subnetwork.model_id == one.subnetwork.model_id


def test_evaluation_and_lens_match_one_device(split_neox, tiny_neox, corpus):
    _, held_out, stats = corpus
    sub = Subnetwork.full(tiny_neox[0], ("weight",)).random_control(seed=0)
    one, split = (
        evaluate_metrics(bridge, stats, held_out, sub, show_progress=False) for bridge, _ in (tiny_neox, split_neox)
    )
    for name in ("r_dropped", "soft_xent", "lm_loss_nats"):
        assert split[name] == pytest.approx(one[name], rel=1e-6)
    lens_one, lens_split = (
        logit_lens(bridge, held_out, sub, bigram_stats=stats, vocab_size=300, n_tokens=None, progress=False)
        for bridge, _ in (tiny_neox, split_neox)
    )
    np.testing.assert_allclose(lens_split["kl_to_final"], lens_one["kl_to_final"], atol=1e-6)


def test_a_device_map_that_cannot_be_applied_is_one_line(tiny_neox_dir, tmp_path):
    with pytest.raises(ModelLoadError) as info:  # lm_head is given no device
        load_model(tiny_neox_dir, device_map={"gpt_neox": "disk"}, offload_folder=tmp_path)
    assert "\n" not in str(info.value) and "device_map" in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_split_matches_one_device(tiny_neox_dir, tiny_neox):
    bridge, _ = load_model(tiny_neox_dir, n_devices=2)
    mask_set = MaskSet.for_model(bridge, ("neuron", "head", "weight"))
    assert len({p.device for p in mask_set.parameters()}) >= 1
    with mask_set.attach(bridge):
        logits = bridge(_tokens().to(input_device(bridge)))
    reference = MaskSet.for_model(tiny_neox[0], ("neuron", "head", "weight"))
    with reference.attach(tiny_neox[0]):
        expected = tiny_neox[0](_tokens())
    torch.testing.assert_close(logits.detach().cpu(), expected.detach(), rtol=1e-4, atol=1e-4)
