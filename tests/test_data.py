"""Corpora, splits, token caches and batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from bigram_circuits import data
from bigram_circuits import io as bc_io
from bigram_circuits.errors import CorpusError
from bigram_circuits.training import train_tokenizer

DOCS = [f"Document number {i} talks about the union and the state of things {i % 7}." for i in range(60)]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(DOCS, 300, out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    # Keep token caches of these tests out of the user's cache; archives stay shared (slow to fetch).
    monkeypatch.setenv("BIGRAM_CIRCUITS_CACHE", str(tmp_path / "cache"))
    archives = data.Path.home() / ".cache" / "bigram_circuits" / "archives"
    if archives.exists():
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "archives").symlink_to(archives)


def test_local_text_file_folder_and_jsonl(tmp_path):
    text_file = tmp_path / "a.txt"
    text_file.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    assert data.load_documents(text_file) == ["First paragraph.", "Second paragraph."]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n\n", encoding="utf-8")
    folder_docs = data.load_documents(tmp_path)
    assert folder_docs == ["First paragraph.", "Second paragraph.", "from jsonl"]


def test_bad_sources_give_one_line_errors(tmp_path):
    with pytest.raises(CorpusError, match="neither a named source"):
        data.load_documents(tmp_path / "missing.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match=r"no \.txt"):
        data.load_documents(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:1"):
        data.load_documents(bad)
    with pytest.raises(CorpusError) as err:
        data.load_documents(tmp_path / "nope")
    assert "\n" not in str(err.value)


def test_split_is_deterministic_and_disjoint():
    train, evaluation = data.split_documents(DOCS, eval_fraction=0.2)
    assert set(train).isdisjoint(evaluation)
    assert sorted(train + evaluation) == sorted(DOCS)
    # Independent of document order: a document's side depends on its text only.
    _train2, eval2 = data.split_documents(list(reversed(DOCS)), eval_fraction=0.2)
    assert set(eval2) == set(evaluation)
    with pytest.raises(CorpusError):
        data.split_documents(DOCS[:1], eval_fraction=0.2)


def test_tokenize_windows_and_cache(tmp_path, small_tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS), encoding="utf-8")
    dataset = data.load_token_dataset(corpus, small_tokenizer, split="all", show_progress=False)
    assert dataset.tokens.dtype == np.uint16
    assert int((dataset.tokens == small_tokenizer.eos_token_id).sum()) == len(DOCS)
    windows = dataset.windows(16)
    assert windows.shape == (len(dataset) // 16, 16)
    assert np.array_equal(windows.reshape(-1), dataset.tokens[: windows.size])
    again = data.load_token_dataset(corpus, small_tokenizer, split="all", show_progress=False)
    assert np.array_equal(np.asarray(again.tokens), dataset.tokens)  # served from the cache
    with pytest.raises(CorpusError, match="fewer than one window"):
        dataset.windows(10**7)


def test_iterate_batches_is_seeded_and_resumable():
    windows = np.arange(40).reshape(20, 2)
    full = list(data.iterate_batches(windows, 4, seed=3))
    assert len(full) == 5
    assert [b.tolist() for b in data.iterate_batches(windows, 4, seed=3, start_batch=2)] == [
        b.tolist() for b in full[2:]
    ]
    assert sorted(np.concatenate(full)[:, 0].tolist()) == list(range(0, 40, 2))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "written" / "out.bin"
    bc_io.atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_offline_sotu_source_is_fetched_and_verified():
    documents = data.load_documents("sotu")
    assert len(documents) > 200
    assert documents[0].startswith("Fellow-Citizens")
