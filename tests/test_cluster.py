"""Bigram counting on a Dask cluster equals one process exactly (bigram_circuits.cluster)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from bigram_circuits.data import TokenDataset
from bigram_circuits.errors import (
    BigramCircuitsError,
    ConfigError,
    CorpusError,
    StatsError,
    TokenError,
)
from bigram_circuits.ngrams import BigramStats

distributed = pytest.importorskip("dask.distributed")

import itertools

from bigram_circuits.cluster import count_bigrams_on_cluster, plan_shards

V = 97


def _zipf_tokens(rng, shape) -> np.ndarray:
    return ((rng.zipf(1.3, size=shape) - 1) % V).astype(np.uint16)


def assert_same_stats(got: BigramStats, want: BigramStats) -> None:
    assert (got.vocab_size, got.order, got.add_k, got.n_sequences) == (
        want.vocab_size,
        want.order,
        want.add_k,
        want.n_sequences,
    )
    np.testing.assert_array_equal(got.unigram_counts, want.unigram_counts)
    for name in ("bigram", "trigram"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None)
        if a is not None:
            for field in ("contexts", "indptr", "next_ids", "counts"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # Same distributions, hence the same soft cross-entropy on a batch of logits.
    rng = np.random.default_rng(1)
    batch = rng.integers(0, V, size=(3, 17))
    logits = torch.from_numpy(rng.normal(size=(3, 17, V + 5)))
    assert float(got.soft_cross_entropy(logits, batch)) == float(want.soft_cross_entropy(logits, batch))


def _one_line(exc: BaseException) -> None:
    assert "\n" not in str(exc) and str(exc)


@pytest.fixture(scope="module")
def cluster_address():
    """A 2-process LocalCluster started by the test; count_bigrams_on_cluster connects by address."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    ) as cluster:
        yield cluster.scheduler_address


def test_plan_shards_cover_every_unit_once():
    shards = plan_shards([10, 0, 3, 1], [True, True, False, False], 8)
    for source, size in ((0, 10), (2, 3), (3, 1)):
        pieces = [(s.lo, s.hi) for s in shards if s.source == source]
        assert pieces[0][0] == 0 and pieces[-1][1] == size
        assert all(a[1] == b[0] and a[1] > a[0] for a, b in itertools.pairwise(pieces))
    assert not [s for s in shards if s.source == 1]


@pytest.mark.slow
@pytest.mark.parametrize("order", [2, 3])
def test_existing_cluster_counts_equal_one_process(cluster_address, order, tmp_path):
    rng = np.random.default_rng(order)
    flat = _zipf_tokens(rng, 5_003)
    windows = _zipf_tokens(rng, (61, 32))
    dataset = TokenDataset(tokens=_zipf_tokens(rng, 4_100), vocab_size=V, eos_token_id=0)
    np.save(tmp_path / "a.npy", flat)
    np.save(tmp_path / "b.npy", windows.astype(np.uint32))
    files = [tmp_path / "a.npy", str(tmp_path / "b.npy")]

    def run(source, **kw):
        return count_bigrams_on_cluster(source, V, order=order, address=cluster_address, **kw)

    def one(source, **kw):
        return BigramStats.from_tokens(source, V, order=order, show_progress=False, **kw)

    # 1-D: one sequence cut into token ranges; bigrams (and trigrams) straddling cuts count once.
    assert_same_stats(run(flat, n_shards=7), one(flat))
    assert_same_stats(run(flat[:5], n_shards=8), one(flat[:5]))  # 1-token shards
    assert_same_stats(run(torch.from_numpy(flat.astype(np.int64)), n_shards=3, chunk_tokens=100), one(flat))
    # 2-D windows and a TokenDataset (its seq_len windows) are cut into row ranges.
    assert_same_stats(run(windows, n_shards=5), one(windows))
    assert_same_stats(run(dataset, n_shards=4, seq_len=64), one(dataset, seq_len=64))
    # Token files, memory-mapped by the workers: each file as from_tokens counts it.
    assert_same_stats(run(files, n_shards=6), one([flat, windows]))
    cut = flat[: len(flat) // 50 * 50].reshape(-1, 50)
    assert_same_stats(run(files, n_shards=6, as_windows=True, seq_len=50), one([cut, windows]))
    # Shard results add up with `+` like any other BigramStats.
    assert_same_stats(run(flat[:2000], n_shards=2) + run(windows, n_shards=2), one([flat[:2000], windows]))


@pytest.mark.slow
def test_local_cluster_started_by_the_code_and_saved(tmp_path):
    rng = np.random.default_rng(5)
    windows = _zipf_tokens(rng, (200, 16))
    out = tmp_path / "stats.npz"
    # One worker here (the 2-worker equality runs on the fixture's cluster): a cold worker
    # imports torch, which dominates this test's time on a small machine.
    stats = count_bigrams_on_cluster(windows, V, n_shards=4, n_workers=1, out=out, add_k=0.5)
    want = BigramStats.from_tokens(windows, V, add_k=0.5, show_progress=False)
    assert_same_stats(stats, want)
    assert_same_stats(BigramStats.load(out, vocab_size=V), want)


@pytest.mark.slow
def test_bad_tokens_on_the_workers_are_one_line(cluster_address):
    bad = np.arange(50, dtype=np.int64)
    bad[30] = V
    with pytest.raises(TokenError, match="out of range") as info:
        count_bigrams_on_cluster(bad, V, n_shards=3, address=cluster_address)
    _one_line(info.value)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"vocab_size": 0}, StatsError, "vocab_size must be a positive integer"),
        ({"n_shards": 0}, ConfigError, "n_shards must be a positive integer"),
        ({"n_workers": 1.5}, ConfigError, "n_workers must be a positive integer"),
        ({"order": 4}, StatsError, "order must be 2"),
        ({"tokens": "some text"}, CorpusError, "does not exist"),
        ({"tokens": np.zeros((2, 2, 2), dtype=np.int64)}, TokenError, "1-D .* or 2-D"),
        ({"tokens": np.zeros(4)}, TokenError, "integer token ids"),
        ({"tokens": np.zeros(0, dtype=np.int64)}, TokenError, "empty"),
        ({"tokens": [1, 2, 3]}, TokenError, "must hold .npy file paths"),
        ({"tokens": []}, TokenError, "no token files"),
        ({"tokens": 3}, TokenError, "cannot count tokens from a int"),
        ({"tokens": TokenDataset(np.zeros(300, np.uint16), V + 1, 0)}, StatsError, "vocab_size"),
        ({"address": "tcp://127.0.0.1:1", "connect_timeout": 1}, ConfigError, "cannot reach a Dask scheduler"),
        ({"address": ""}, ConfigError, "scheduler address"),
    ],
)
@pytest.mark.usefixtures("no_runtime_typecheck")
def test_bad_inputs_are_one_line_errors(kwargs, error, match):
    kwargs = dict(kwargs)
    tokens = kwargs.pop("tokens", np.arange(10, dtype=np.int64))
    vocab_size = kwargs.pop("vocab_size", V)
    with pytest.raises(error, match=match) as info:
        count_bigrams_on_cluster(tokens, vocab_size, **kwargs)
    assert isinstance(info.value, BigramCircuitsError)
    _one_line(info.value)


def test_bad_token_files_are_one_line(tmp_path):
    (tmp_path / "t.txt").write_text("not tokens")
    np.save(tmp_path / "f.npy", np.ones(5, dtype=np.float32))
    for path, match in (
        (tmp_path / "t.txt", "cannot read token file"),
        (tmp_path / "f.npy", "integer token ids"),
        (tmp_path / "missing.npy", "does not exist"),
    ):
        with pytest.raises(BigramCircuitsError, match=match) as info:
            count_bigrams_on_cluster([path], V)
        _one_line(info.value)


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    with pytest.raises(ConfigError, match=r"pip install 'bigram-circuits\[cluster\]'") as info:
        count_bigrams_on_cluster(np.arange(10), V)
    _one_line(info.value)
