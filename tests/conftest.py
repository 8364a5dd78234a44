"""Shared test fixtures: tiny random GPT-NeoX and GPT-2 models saved as Hugging Face directories.

- ``tiny_model_factory(kind, out_dir, vocab_size=None, seed=0)`` writes a tiny model directory
  (``kind`` is ``"neox"`` or ``"gpt2"``; ``vocab_size`` sets the model's embedding rows, default
  the tokenizer's).
- ``tiny_neox_dir`` / ``tiny_gpt2_dir``: session-wide directories. The GPT-NeoX model has a padded
  unembedding (``TINY_NEOX_PADDED_VOCAB`` rows for ``TINY_VOCAB`` tokens, as Pythia pads), the
  GPT-2 model exactly ``TINY_VOCAB`` rows.
- ``tiny_neox`` / ``tiny_gpt2``: ``(bridge, tokenizer)`` loaded through ``load_model``. They are
  session-wide, so a test must not leave hooks or weight changes on them.
- ``tiny_text``: the deterministic text the tiny tokenizer was trained on.
- ``device``: the torch device tests run on, from ``$BIGRAM_CIRCUITS_TEST_DEVICE`` (default
  ``cpu``; e.g. ``cuda`` or ``cuda:1``), validated by ``models.resolve_device``;
  ``tiny_neox_on_device`` is the tiny GPT-NeoX model loaded there. Tests marked ``gpu`` are
  skipped unless CUDA is present.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TEST_DEVICE_ENV = "BIGRAM_CIRCUITS_TEST_DEVICE"
TINY_VOCAB = 300
TINY_NEOX_PADDED_VOCAB = 320
TINY_CONTEXT = 64
EOS = "<|endoftext|>"

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "more",
    "can",
    "out",
    "up",
    "time",
    "people",
    "about",
    "year",
    "new",
    "state",
    "nation",
    "president",
    "war",
    "law",
    "congress",
    "government",
    "world",
    "public",
    "country",
    "great",
    "house",
    "bill",
    "union",
    "power",
    "history",
]


def _tiny_documents(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents made from a fixed word list."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def save_tiny_tokenizer(out_dir: Path) -> int:
    """Train a byte-level BPE tokenizer of ``TINY_VOCAB`` tokens, save it; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_documents(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.save_pretrained(str(out_dir))
    return len(fast)


def make_tiny_model_dir(kind: str, out_dir: Path, vocab_size: int | None = None, seed: int = 0) -> Path:
    """Write a tiny randomly initialised ``kind`` ("neox" or "gpt2") model + tokenizer to ``out_dir``."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = save_tiny_tokenizer(out_dir)
    vocab = vocab_size if vocab_size is not None else n_tokens
    torch.manual_seed(seed)
    if kind == "neox":
        config = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=TINY_CONTEXT,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
        model = GPTNeoXForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=64,
            n_positions=TINY_CONTEXT,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"kind must be 'neox' or 'gpt2', got {kind!r}")
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_factory() -> Callable[..., Path]:
    """The function ``make_tiny_model_dir(kind, out_dir, vocab_size=None, seed=0)``."""
    return make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_text() -> list[str]:
    """The documents the tiny tokenizer was trained on (deterministic)."""
    return _tiny_documents()


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory) -> Path:
    """A tiny GPT-NeoX HF directory with a padded unembedding (320 rows, 300 tokens)."""
    return make_tiny_model_dir("neox", tmp_path_factory.mktemp("tiny_neox"), vocab_size=TINY_NEOX_PADDED_VOCAB)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 HF directory whose vocabulary matches its tokenizer exactly."""
    return make_tiny_model_dir("gpt2", tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_neox(tiny_neox_dir):
    """``(bridge, tokenizer)`` of the tiny GPT-NeoX model, loaded through ``load_model``."""
    from bigram_circuits.models import load_model

    return load_model(tiny_neox_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    """``(bridge, tokenizer)`` of the tiny GPT-2 model, loaded through ``load_model``."""
    from bigram_circuits.models import load_model

    return load_model(tiny_gpt2_dir)


def make_tiny_llama_dir(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny randomly initialised LLaMA-style model (gated MLP, grouped K/V heads, RMSNorm)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = save_tiny_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=n_tokens,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA-style HF directory (SmolLM2's architecture family)."""
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """``(bridge, tokenizer)`` of the tiny LLaMA-style model, loaded through ``load_model``."""
    from bigram_circuits.models import load_model

    return load_model(tiny_llama_dir)


def pytest_collection_modifyitems(config, items) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test: ``$BIGRAM_CIRCUITS_TEST_DEVICE`` (default ``cpu``)."""
    from bigram_circuits.models import resolve_device

    return resolve_device(os.environ.get(TEST_DEVICE_ENV, "cpu"))


@pytest.fixture(scope="session")
def tiny_neox_on_device(tiny_neox_dir, device):
    """``(bridge, tokenizer)`` of the tiny GPT-NeoX model loaded on the device under test."""
    from bigram_circuits.models import load_model

    return load_model(tiny_neox_dir, device=device)


@pytest.fixture
def no_runtime_typecheck():
    """The suite's run-time type checks off for one test (``typechecks.unchecked``)."""
    from typechecks import unchecked

    with unchecked():
        yield


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a gloo process group's ``tcp://`` init method)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- the figures pipeline


@pytest.fixture
def tiny_figures_model(tmp_path, tiny_model_factory, tiny_text, monkeypatch) -> tuple[Path, Path]:
    """A tiny GPT-NeoX directory with two training checkpoints (steps 0 and 4), and a corpus
    file for it; the cache goes to tmp_path."""
    import shutil

    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_factory("neox", tmp_path / "model")
    (model_dir / "checkpoints").mkdir()
    for step in (0, 4):
        shutil.copy(model_dir / "model.safetensors", model_dir / "checkpoints" / f"step_{step}.safetensors")
    (model_dir / "metrics.json").write_text('{"config": {"max_steps": 8}}')
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(list(tiny_text) * 3))
    return model_dir, corpus


@pytest.fixture
def tiny_figures_config():
    """``FiguresConfig`` for the tiny figures model: every stage in seconds."""
    from dataclasses import replace

    from bigram_circuits.app.figures import FiguresConfig

    def make(corpus: Path, **changes) -> FiguresConfig:
        return FiguresConfig(
            **{
                "corpus": str(corpus),
                "search": replace(FiguresConfig().search, seq_len=16, batch_size=4, max_steps=3),
                "bigram_lambdas": (0.0, 10.0),
                "optimal_lambdas": (10.0,),
                "checkpoint_lambdas": (1.0, 10.0),
                "max_checkpoints": 2,
                "train_windows": 64,
                "eval_windows": 8,
                "analysis_seq_len": 32,
                "analysis_tokens": 256,
                "ablation_windows": 4,
                "random_seeds": (0, 1),
                "overlap_samples": 100,
                "prompts": ("the",),
                "generation_tokens": 3,
                "linear_map_steps": 3,
                "headline_seeds": (0, 1),
                **changes,
            }
        )

    return make
