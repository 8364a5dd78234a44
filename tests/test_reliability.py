"""Reliability: a table of bad inputs to the public API and the CLI, each answered by one
specific exception with a one-line message and no partial file; atomic writes and manifests;
NaN losses; determinism. (The kill-and-resume test of the CLI is in test_kill_resume.py.)"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch

from bigram_circuits import cli
from bigram_circuits.app.find import find_command
from bigram_circuits.data import TokenDataset, load_documents, split_documents, tokenize_documents
from bigram_circuits.errors import (
    BigramCircuitsError,
    ConfigError,
    CorpusError,
    ManifestError,
    MaskError,
    ModelLoadError,
    OutputError,
    SearchError,
    StatsError,
    TokenError,
    UnsafeFileError,
)
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.manifest import MANIFEST_FILE, read_manifest, verify_manifest
from bigram_circuits.masks import attach_masks, mask_components, parse_granularities
from bigram_circuits.models import load_model, model_id
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, search, sweep
from bigram_circuits.subnetwork import Subnetwork

SEQ = 24


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; on a busy machine more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Env:
    """What a bad-input case may use: tiny models, a tiny corpus, and an output directory."""

    def __init__(self, request, tmp_path: Path, monkeypatch):
        self.request, self.tmp, self.monkeypatch = request, tmp_path, monkeypatch
        self.out = tmp_path / "out"
        self.out.mkdir()

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    @cached_property
    def neox(self):
        return self.fixture("tiny_neox")

    @cached_property
    def bridge(self):
        return self.neox[0]

    @cached_property
    def tokenizer(self):
        return self.neox[1]

    @cached_property
    def windows(self) -> np.ndarray:
        return tokenize_documents(self.fixture("tiny_text"), self.tokenizer, show_progress=False).windows(SEQ)

    @cached_property
    def stats(self) -> BigramStats:
        return BigramStats.from_tokens(self.windows, len(self.tokenizer), seq_len=SEQ, show_progress=False)

    def copy_model(self, skip: tuple[str, ...] = ()) -> Path:
        """A copy of the tiny GPT-NeoX directory without the files named in ``skip``."""
        target = self.tmp / "model_copy"
        shutil.copytree(self.fixture("tiny_neox_dir"), target, ignore=shutil.ignore_patterns(*skip))
        return target

    def quick(self, **overrides) -> SearchConfig:
        options = {"batch_size": 8, "seq_len": SEQ, "max_steps": 4, "stability_check": False, "eval_batches": 1}
        return SearchConfig(**{**options, **overrides})

    def a_file(self) -> Path:
        path = self.tmp / "a_file"
        path.write_text("not a directory")
        return path

    def saved_subnetwork(self, granularity: str = "neuron") -> Path:
        return Subnetwork.full(self.bridge, granularity).save(self.tmp / f"sub_{granularity}")


@dataclass(frozen=True)
class Case:
    """One bad input: ``call(env)`` must raise ``error`` whose message contains ``match``;
    ``absent`` lists paths (relative to the env's tmp dir) that must not exist afterwards."""

    id: str
    category: str
    call: Callable[[Env], object]
    error: type[BaseException]
    match: str
    absent: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- case helpers


def _offline_unknown_model(env: Env):
    from huggingface_hub import constants

    env.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return load_model("no-such-org/no-such-model")


def _weights_replaced(env: Env, data: Callable[[bytes], bytes]):
    model_dir = env.copy_model()
    weights = model_dir / "model.safetensors"
    weights.write_bytes(data(weights.read_bytes()))
    return load_model(model_dir)


def _vocab_mismatch(env: Env):
    model_dir = env.fixture("tiny_model_factory")("gpt2", env.tmp / "small_vocab", vocab_size=100)
    return load_model(model_dir)


def _empty_corpus(env: Env):
    path = env.tmp / "empty.txt"
    path.write_text("\n\n")
    return load_documents(path)


def _bad_jsonl(env: Env):
    path = env.tmp / "corpus.jsonl"
    path.write_text('{"text": "fine"}\nnot json\n')
    return load_documents(path)


def _too_short_corpus(env: Env):
    return tokenize_documents(["Hi."], env.tokenizer, show_progress=False).windows(64)


def _windows_with(env: Env, value: int) -> np.ndarray:
    windows = np.array(env.windows[:16], dtype=np.int64)
    windows[0, 3] = value
    return windows


def _long_windows(env: Env) -> np.ndarray:
    tokens = np.asarray(tokenize_documents(env.fixture("tiny_text"), env.tokenizer, show_progress=False).tokens)
    return tokens[: 16 * 100].reshape(16, 100).astype(np.int64)


def _stats_corrupt(env: Env):
    path = env.tmp / "stats.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    return BigramStats.load(path)


def _stats_other_vocab(env: Env):
    path = env.stats.save(env.out / "stats.npz")
    return BigramStats.load(path, vocab_size=999)


def _applied_twice(env: Env):
    sub = Subnetwork.full(env.bridge, "neuron")
    with sub.applied(env.bridge), sub.applied(env.bridge):
        pass


def _other_model(env: Env):
    sub = Subnetwork.full(env.fixture("tiny_gpt2")[0], "neuron")
    with sub.applied(env.bridge):
        pass


def _mask_file_of_other_granularity(env: Env):
    neuron_dir, head_dir = env.saved_subnetwork("neuron"), env.saved_subnetwork("head")
    shutil.copyfile(head_dir / "masks.safetensors", neuron_dir / "masks.safetensors")
    return Subnetwork.load(neuron_dir)


def _truncated_masks(env: Env):
    directory = env.saved_subnetwork("neuron")
    masks = directory / "masks.safetensors"
    masks.write_bytes(masks.read_bytes()[:40])
    return Subnetwork.load(directory)


def _author_pickle_of_other_model(env: Env):
    path = Subnetwork.full(env.bridge, "weight").save_author_pickle(env.tmp / "neox.pickle")
    return Subnetwork.from_author_pickle(path, env.fixture("tiny_llama")[0])


def _unknown_mask_hook(env: Env):
    component = mask_components(env.bridge, "neuron")[0]
    ghost = dataclasses.replace(component, key="blocks.7.mlp.hook_post", layer=7)
    with attach_masks(env.bridge, [ghost], lambda key: torch.ones(ghost.shape)):
        pass


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_pickle(env: Env):
    evil = env.tmp / "evil.pickle"
    evil.write_bytes(pickle.dumps({"gpt_neox.layers.0.mlp.dense_h_to_4h.weight": _Exploit(env.tmp / "pwned")}))
    return Subnetwork.from_author_pickle(evil, env.bridge)


def _search(env: Env, windows=None, target=None, granularities="neuron", out=None, **config):
    return search(
        env.bridge,
        env.windows if windows is None else windows,
        target or Target.bigram(env.stats),
        granularities,
        env.quick(**config),
        out,
        show_progress=False,
    )


def _corrupt_checkpoint(env: Env):
    (env.out / "run").mkdir()
    (env.out / "run" / "checkpoint.pt").write_bytes(b"\x80\x04 truncated checkpoint")
    return _search(env, out=env.out / "run")


def _checkpoint_of_other_granularity(env: Env):
    config = env.quick()
    state = {
        "config": config.to_dict(),
        "granularities": ["head"],
        "target": "bigram",
        "model_id": model_id(env.bridge),
        "attempt": 0,
        "step": 2,
    }
    (env.out / "run").mkdir()
    torch.save(state, env.out / "run" / "checkpoint.pt")
    return _search(env, out=env.out / "run")


def _nan_after(k: int, base: Callable) -> Target:
    calls = {"n": 0}

    def loss(logits, tokens):
        calls["n"] += 1
        value = base(logits, tokens, None)
        return value * float("nan") if calls["n"] > k else value

    return Target.custom(loss)


def _nan_loss(env: Env):
    return _search(env, target=_nan_after(2, Target.bigram(env.stats)), out=env.out / "run")


def _disk_full(env: Env):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    env.monkeypatch.setattr(os, "fsync", full)
    return Subnetwork.full(env.bridge, "neuron").save(env.out / "sub")


def _permission_denied(env: Env):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    env.monkeypatch.setattr(tempfile, "mkstemp", denied)
    return env.stats.save(env.out / "stats.npz")


def _find(env: Env, **kwargs):
    options = {
        "model": str(env.fixture("tiny_neox_dir")),
        "granularities": "neuron",
        "lambdas": [1.0],
        "out_dir": env.out / "find",
        "corpus": "no-such-corpus",
        "show_progress": False,
        **kwargs,
    }
    return find_command(**options)


CASES = [
    # models
    Case("unknown_model_offline", "model", _offline_unknown_model, ModelLoadError, "cannot reach the hub"),
    Case(
        "model_path_missing",
        "model",
        lambda e: load_model(e.tmp / "no" / "model"),
        ModelLoadError,
        "no model file or directory",
    ),
    Case("model_dir_without_config", "model", lambda e: load_model(e.out), ModelLoadError, "no config.json"),
    Case(
        "weights_missing",
        "model",
        lambda e: load_model(e.copy_model(skip=("model.safetensors",))),
        ModelLoadError,
        "no model weights",
    ),
    Case(
        "weights_corrupt",
        "model",
        lambda e: _weights_replaced(e, lambda b: b"\x00garbage" * 64),
        ModelLoadError,
        "cannot load the weights",
    ),
    Case(
        "weights_truncated_safetensors",
        "model",
        lambda e: _weights_replaced(e, lambda b: b[: len(b) // 2]),
        ModelLoadError,
        "cannot load the weights",
    ),
    Case("tokenizer_model_vocab_mismatch", "model", _vocab_mismatch, ModelLoadError, "vocab mismatch"),
    Case(
        "checkpoint_step_missing",
        "model",
        lambda e: load_model(e.fixture("tiny_neox_dir"), checkpoint=7),
        ModelLoadError,
        "no checkpoint at step 7",
    ),
    Case(
        "dtype_not_float",
        "model",
        lambda e: load_model(e.fixture("tiny_neox_dir"), dtype="int8"),
        ModelLoadError,
        "not a torch floating dtype",
    ),
    # corpora
    Case("corpus_unknown", "corpus", lambda e: load_documents("no-such-corpus"), CorpusError, "neither a named source"),
    Case("corpus_empty_file", "corpus", _empty_corpus, CorpusError, "holds no text"),
    Case("corpus_bad_jsonl", "corpus", _bad_jsonl, CorpusError, "expected a JSON object"),
    Case("corpus_too_short", "corpus", _too_short_corpus, CorpusError, "fewer than one window"),
    Case(
        "corpus_one_document_split",
        "corpus",
        lambda e: split_documents(["only one document"]),
        CorpusError,
        "left one side empty",
    ),
    # token ids and lengths
    Case(
        "stats_token_id_out_of_range",
        "tokens",
        lambda e: BigramStats.from_tokens(np.array([[1, 999]]), 300, show_progress=False),
        TokenError,
        "999",
    ),
    Case(
        "stats_negative_token_id",
        "tokens",
        lambda e: BigramStats.from_tokens(np.array([[1, -2]]), 300, show_progress=False),
        TokenError,
        "negative",
    ),
    Case(
        "stats_float_tokens",
        "tokens",
        lambda e: BigramStats.from_tokens(np.array([[1.5, 2.0]]), 300, show_progress=False),
        TokenError,
        "",
    ),
    Case(
        "search_token_id_out_of_range",
        "tokens",
        lambda e: _search(e, windows=_windows_with(e, 400)),
        TokenError,
        "outside the model's vocabulary",
    ),
    Case(
        "search_sequence_above_context",
        "tokens",
        lambda e: _search(e, windows=_long_windows(e), seq_len=128),
        TokenError,
        "exceed the model's context of 64",
    ),
    Case(
        "evaluate_sequence_above_context",
        "tokens",
        lambda e: __import__("bigram_circuits.evaluate").evaluate.evaluate_metrics(e.bridge, e.stats, _long_windows(e)),
        TokenError,
        "exceed the model's context",
    ),
    Case(
        "patch_token_id_out_of_range",
        "tokens",
        lambda e: __import__("bigram_circuits.circuits.patching").circuits.patching.cache_run(
            e.bridge, torch.tensor([[1, 2, 999]])
        ),
        TokenError,
        "outside the model's vocabulary",
    ),
    # bigram statistics
    Case("stats_file_corrupt", "stats", _stats_corrupt, StatsError, ""),
    Case("stats_file_other_vocab", "stats", _stats_other_vocab, StatsError, "999"),
    Case(
        "stats_logits_narrower_than_vocab",
        "stats",
        lambda e: e.stats.soft_cross_entropy(torch.zeros(1, 3, 10), np.array([[1, 2, 3]])),
        StatsError,
        "",
    ),
    # masks and subnetworks
    Case("subnetwork_applied_twice", "mask", _applied_twice, MaskError, "already applied"),
    Case("subnetwork_for_another_model", "mask", _other_model, MaskError, "made for model"),
    Case("mask_file_of_other_granularity", "mask", _mask_file_of_other_granularity, MaskError, "do not match"),
    Case("masks_truncated_safetensors", "mask", _truncated_masks, MaskError, "corrupt subnetwork"),
    Case("unknown_granularity", "mask", lambda e: parse_granularities("neurons"), MaskError, "neurons"),
    Case(
        "unknown_apply_mode",
        "mask",
        lambda e: Subnetwork.full(e.bridge).applied(e.bridge, "drop").__enter__(),
        MaskError,
        "keep",
    ),
    Case("author_masks_of_other_model", "mask", _author_pickle_of_other_model, MaskError, ""),
    Case("unknown_mask_hook", "hook", _unknown_mask_hook, MaskError, "does not exist"),
    Case(
        "unknown_patch_hook",
        "hook",
        lambda e: __import__("bigram_circuits.circuits.patching").circuits.patching.run_with_patches(
            e.bridge, torch.tensor([[1, 2]]), {"blocks.9.hook_resid_pre": torch.zeros(1, 2, 32)}
        ),
        ConfigError,
        "unknown hook name",
    ),
    Case(
        "unknown_cache_hook",
        "hook",
        lambda e: __import__("bigram_circuits.circuits.patching").circuits.patching.cache_run(
            e.bridge, torch.tensor([[1, 2]]), names=["blocks.0.hook_nothing"]
        ),
        ConfigError,
        "unknown hook name",
    ),
    Case("malicious_pickle", "unsafe", _malicious_pickle, UnsafeFileError, "could run code", absent=("pwned",)),
    # options
    Case(
        "windows_seq_len_1", "config", lambda e: TokenDataset(np.arange(10), 300, 0).windows(1), ConfigError, "seq_len"
    ),
    Case(
        "generate_nan_temperature",
        "config",
        lambda e: __import__("bigram_circuits.evaluate").evaluate.generate(
            e.bridge, e.tokenizer, "the", temperature=float("nan")
        ),
        ConfigError,
        "temperature",
    ),
    Case("lambda_negative", "search", lambda e: SearchConfig(lam=-1.0), SearchError, "lam must be >= 0"),
    Case("lambda_nan", "search", lambda e: SearchConfig(lam=float("nan")), SearchError, "lam must be >= 0"),
    Case("lambda_inf", "search", lambda e: SearchConfig(lam=float("inf")), SearchError, "lam must be >= 0"),
    Case(
        "temperature_growth_below_one",
        "search",
        lambda e: SearchConfig(temperature_growth=0.99),
        SearchError,
        "temperature schedule",
    ),
    Case(
        "temperature_init_nan",
        "search",
        lambda e: SearchConfig(temperature_init=float("nan")),
        SearchError,
        "temperature schedule",
    ),
    Case(
        "temperature_growth_inf",
        "search",
        lambda e: SearchConfig(temperature_growth=float("inf")),
        SearchError,
        "temperature schedule",
    ),
    Case("learning_rate_nan", "search", lambda e: SearchConfig(lr=float("nan")), SearchError, "lr must be"),
    Case(
        "fewer_windows_than_a_batch",
        "search",
        lambda e: _search(e, windows=e.windows[:3]),
        SearchError,
        "fewer than one batch",
    ),
    Case("unknown_target", "search", lambda e: Target.from_name("bigrams"), SearchError, "unknown target"),
    Case("checkpoint_corrupt", "search", _corrupt_checkpoint, SearchError, "unreadable"),
    Case(
        "checkpoint_of_other_granularity",
        "search",
        _checkpoint_of_other_granularity,
        SearchError,
        "belongs to another run",
    ),
    Case(
        "nan_loss_during_search",
        "search",
        _nan_loss,
        SearchError,
        "loss became nan at step 3",
        absent=("out/run/masks.safetensors", "out/run/manifest.json"),
    ),
    Case(
        "find_unknown_option",
        "search",
        lambda e: _find(e, learning_rate=0.1),
        SearchError,
        "unknown search option",
        absent=("out/find",),
    ),
    Case(
        "find_negative_lambda",
        "search",
        lambda e: _find(e, lambdas=[1.0, -3.0]),
        SearchError,
        "lam must be >= 0",
        absent=("out/find",),
    ),
    Case(
        "sweep_without_lambdas",
        "search",
        lambda e: sweep(e.bridge, e.windows, Target.bigram(e.stats), [], "neuron", e.quick()),
        SearchError,
        "at least one lambda",
    ),
    # outputs
    Case(
        "disk_full_on_save",
        "output",
        _disk_full,
        OutputError,
        "No space left on device",
        absent=("out/sub/masks.safetensors", "out/sub/subnetwork.json"),
    ),
    Case(
        "permission_denied_on_write",
        "output",
        _permission_denied,
        OutputError,
        "Permission denied",
        absent=("out/stats.npz",),
    ),
    Case(
        "output_dir_under_a_file",
        "output",
        lambda e: Subnetwork.full(e.bridge).save(e.a_file() / "sub"),
        OutputError,
        "cannot write",
    ),
    Case(
        "search_out_dir_under_a_file",
        "output",
        lambda e: _search(e, out=e.a_file() / "run"),
        OutputError,
        "cannot write",
    ),
]


def _leftovers(root: Path) -> list[str]:
    """Temporary files or staging directories left anywhere under ``root``."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.endswith(".tmp") or p.name.startswith((".staging", ".sub", ".model"))
    )


def test_the_table_is_broad():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.category for c in CASES} >= {
        "model",
        "corpus",
        "tokens",
        "stats",
        "mask",
        "hook",
        "unsafe",
        "config",
        "search",
        "output",
    }


@pytest.mark.usefixtures("no_runtime_typecheck")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, request, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    env = Env(request, tmp_path, monkeypatch)
    with pytest.raises(BigramCircuitsError) as info:
        case.call(env)
    error = info.value
    assert type(error) is case.error, f"{type(error).__name__}: {error}"
    message = str(error)
    assert case.match in message
    assert "\n" not in message and 0 < len(message) < 400
    monkeypatch.undo()  # e.g. a patched os.fsync must not hide leftovers
    assert _leftovers(tmp_path) == []
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel


# ----------------------------------------------------------------------------- CLI


def _cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def _assert_one_error_line(code: int, err: str, match: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert match in errors[0]


@pytest.fixture
def corpus_file(tiny_text, tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(tiny_text), encoding="utf-8")
    return path


CLI_CASES = [
    ("find_missing_out", lambda d: ["find"], "--out"),
    ("find_bad_lambda_list", lambda d: ["find", "--out", d["out"], "--lambdas", "1,x"], "comma-separated"),
    ("find_negative_lambda", lambda d: ["find", "--out", d["out"], "--lambdas=-1"], "lam must be >= 0"),
    ("find_nan_lambda", lambda d: ["find", "--out", d["out"], "--lambdas", "nan"], "lam must be >= 0"),
    ("find_zero_steps", lambda d: ["find", "--out", d["out"], "--max-steps", "0"], "max_steps"),
    ("find_unknown_granularity", lambda d: ["find", "--out", d["out"], "--granularity", "neurons"], "neurons"),
    ("find_model_missing", lambda d: ["find", "--out", d["out"], "--model", d["missing"]], "no model file"),
    ("find_out_under_a_file", lambda d: ["find", "--out", d["file"] + "/run", "--model", d["model"]], "cannot write"),
    (
        "find_corpus_missing",
        lambda d: ["find", "--out", d["out"], "--model", d["model"], "--corpus", d["missing"]],
        "neither a named source",
    ),
    (
        "find_seq_len_above_context",
        lambda d: [
            "find",
            "--out",
            d["out"],
            "--model",
            d["model"],
            "--corpus",
            d["corpus"],
            "--seq-len",
            "128",
            "--no-progress",
        ],
        "exceed the model's context of 64",
    ),
    ("evaluate_missing_run", lambda d: ["evaluate", d["missing"]], "does not exist"),
    (
        "patch_unknown_component",
        lambda d: ["patch", "--clean", "a", "--corrupted", "b", "--component", "x"],
        "invalid choice",
    ),
]


@pytest.mark.parametrize("name,argv,match", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_error_line(name, argv, match, capsys, tmp_path, monkeypatch, tiny_neox_dir, corpus_file):
    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    paths = {
        "out": str(tmp_path / "out"),
        "missing": str(tmp_path / "missing" / "thing"),
        "file": str(a_file),
        "model": str(tiny_neox_dir),
        "corpus": str(corpus_file),
    }
    code, err = _cli(capsys, *argv(paths))
    _assert_one_error_line(code, err, match)
    assert _leftovers(tmp_path) == []


def test_cli_prints_os_errors_as_one_line(capsys, monkeypatch):
    from bigram_circuits.app import lens

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/run/subnetwork.json")

    monkeypatch.setattr(lens, "lens_command", unreadable)
    code, err = _cli(capsys, "lens", "/some/run")
    _assert_one_error_line(code, err, "Permission denied: /some/run/subnetwork.json")


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    env = {**os.environ, "BIGRAM_CIRCUITS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigram_circuits.cli",
            "find",
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(tmp_path / "missing" / "model"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    _assert_one_error_line(proc.returncode, proc.stderr, "no model file or directory")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ----------------------------------------------------------------------------- writes, manifests, NaN


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    atomic_write_bytes(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left"):
        atomic_write_bytes(target, b"new and longer")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_package_writes_only_through_the_atomic_helper():
    """No module writes a final path directly (no open(..., 'w'), write_text, to_csv(path),
    torch.save(path), save_file(...), np.save* or write_html to a path)."""
    import re

    root = Path(__file__).resolve().parents[1] / "bigram_circuits"
    direct = re.compile(
        r"open\([^)]*['\"][wax]b?['\"]|\.write_text\(|\.write_bytes\(|to_csv\((?!index|buffer\b)[^)]"
        r"|torch\.save\((?!state, buffer)|save_file\(|np\.save(z|z_compressed)?\((?!buffer|handle)"
        r"|write_html\(|\.save_pretrained\((?!staging|str\(staging|\))"
    )
    helper = ("io.py", 'with os.fdopen(fd, "wb") as handle:')  # inside io.atomic_write itself
    offenders = []
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if direct.search(line) and "atomic" not in line and (path.name, line.strip()) != helper:
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []


def test_nan_loss_keeps_the_last_good_checkpoint_and_resumes_exactly(tiny_neox, tiny_text, tmp_path):
    bridge, tokenizer = tiny_neox
    windows = tokenize_documents(tiny_text, tokenizer, show_progress=False).windows(SEQ)
    stats = BigramStats.from_tokens(windows, len(tokenizer), seq_len=SEQ, show_progress=False)
    bigram = Target.bigram(stats)
    config = SearchConfig(
        batch_size=8,
        seq_len=SEQ,
        max_steps=8,
        checkpoint_every=100,
        stability_check=False,
        parameterization="hard_concrete",
        seed=5,
        eval_batches=1,
    )
    run = tmp_path / "run"
    with pytest.raises(SearchError, match=r"loss became nan at step 5 .*last good state \(step 4\)"):
        search(bridge, windows, _nan_after(4, bigram), "neuron", config, run, show_progress=False)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and len(state["history"]) == 4
    assert all(np.isfinite(row["loss"]) for row in state["history"])
    assert not (run / "masks.safetensors").exists()

    good = Target.custom(lambda logits, tokens: bigram(logits, tokens, None))  # same name as the NaN target
    resumed = search(bridge, windows, good, "neuron", config, run, show_progress=False)
    straight = search(bridge, windows, good, "neuron", config, tmp_path / "straight", show_progress=False)
    assert len(resumed.history) == len(straight.history)
    for key, mask in straight.subnetwork.masks.items():
        assert torch.equal(resumed.subnetwork.masks[key], mask)


def test_runs_carry_a_verifiable_manifest(tiny_neox, tiny_text, tmp_path):
    bridge, tokenizer = tiny_neox
    windows = tokenize_documents(tiny_text, tokenizer, show_progress=False).windows(SEQ)
    stats = BigramStats.from_tokens(windows, len(tokenizer), seq_len=SEQ, show_progress=False)
    config = SearchConfig(batch_size=8, seq_len=SEQ, max_steps=3, stability_check=False, eval_batches=1)
    sweep(
        bridge,
        windows[:-16],
        Target.bigram(stats),
        [0.5],
        "neuron",
        config,
        tmp_path / "sweep",
        eval_windows=windows[-16:],
        show_progress=False,
    )
    run = tmp_path / "sweep"
    manifest = read_manifest(run)
    assert manifest["kind"] == "sweep" and manifest["config"]["lambdas"] == [0.5]
    assert {"bigram_circuits", "torch", "transformers", "transformer-lens", "python"} <= set(manifest["versions"])
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["versions"]["torch"]
    assert {
        "sweep.csv",
        "lambda_0.5/masks.safetensors",
        "lambda_0.5/subnetwork.json",
        "lambda_0.5/history.csv",
        "lambda_0.5/manifest.json",
    } == set(manifest["files"])
    inner = read_manifest(run / "lambda_0.5")
    assert inner["kind"] == "search" and inner["config"]["config"]["lam"] == 0.5
    report = verify_manifest(run)
    assert report.attrs["ok"] and set(report["status"]) == {"ok"}
    assert _leftovers(tmp_path) == []

    (run / "lambda_0.5" / "history.csv").write_text("step,loss\n1,0.0\n")
    (run / "sweep.csv").unlink()
    (run / "evaluation").mkdir()
    (run / "evaluation" / "extra.csv").write_text("added later; not the manifest's concern\n")
    status = verify_manifest(run).set_index("path")["status"]
    assert status["lambda_0.5/history.csv"] == "modified" and status["sweep.csv"] == "missing"
    assert status["lambda_0.5/masks.safetensors"] == "ok" and not verify_manifest(run).attrs["ok"]

    with pytest.raises(ManifestError, match="does not exist"):
        verify_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("parameterization", ["continuous", "hard_concrete"])
def test_same_seed_gives_identical_masks_on_cpu(parameterization, tiny_neox, tiny_text):
    bridge, tokenizer = tiny_neox
    windows = tokenize_documents(tiny_text, tokenizer, show_progress=False).windows(SEQ)
    stats = BigramStats.from_tokens(windows, len(tokenizer), seq_len=SEQ, show_progress=False)
    config = SearchConfig(
        batch_size=8,
        seq_len=SEQ,
        max_steps=10,
        stability_check=False,
        seed=11,
        parameterization=parameterization,
        lam=2.0,
        eval_batches=1,
    )
    first, second = (
        search(bridge, windows, Target.bigram(stats), ("neuron", "head"), config, show_progress=False) for _ in range(2)
    )
    assert first.history["loss"].tolist() == second.history["loss"].tolist()
    for key, mask in first.subnetwork.masks.items():
        assert torch.equal(second.subnetwork.masks[key], mask)
    for key, logit in first.mask_set.state_dict().items():
        if isinstance(logit, torch.Tensor):
            assert torch.equal(second.mask_set.state_dict()[key], logit), key
