"""Count bigrams of a tokenized corpus as shards on a Dask cluster and merge them exactly.

    from bigram_circuits.cluster import count_bigrams_on_cluster
    stats = count_bigrams_on_cluster(tokens, vocab_size, n_shards=8, n_workers=2)   # local cluster
    stats = count_bigrams_on_cluster(["a.npy", "b.npy"], V, address="tcp://host:8786", out="stats.npz")

Why Dask: it is pure Python and pip-installable (``pip install 'bigram-circuits[cluster]'``),
``dask.distributed.LocalCluster`` starts worker processes in-process with no daemon or config,
and the same code connects to an existing scheduler (``dask scheduler`` / ``dask worker``,
dask-jobqueue on Slurm, Kubernetes) by its address.

Exactness: the result equals ``BigramStats.from_tokens`` of the same input in one process
(same counts, ``n_sequences`` and therefore the same distributions and losses):

- a 2-D array ``[n_seq, seq_len]`` or a :class:`~bigram_circuits.data.TokenDataset` (counted as
  its ``windows(seq_len)``): shards are contiguous ranges of rows; every row is an independent
  sequence, so no bigram crosses a shard boundary;
- a 1-D array (one sequence, as ``from_tokens`` counts it): shards are contiguous token ranges,
  and each shard after the first starts from the ``order - 1`` tokens before it instead of
  START, so the bigram that straddles a boundary is counted once, by the later shard, and START
  only precedes the very first token;
- a list of ``.npy`` token files (1-D or 2-D; opened with ``mmap_mode="r"`` by the workers, so
  the driver never reads them): counted as ``from_tokens([np.load(p) for p in paths])``, i.e.
  each file by the rules above. ``as_windows=True`` counts every 1-D array or file as its
  non-overlapping ``seq_len`` windows instead (the tail that does not fill one is dropped), as
  ``TokenDataset.windows`` does: the paper's 128-token sequences.

Shard counts come back to the cluster and are merged pairwise (a tree of ``a + b``) on the
workers. With an existing cluster, every worker must have ``bigram_circuits`` installed and
(for token files) see the same paths.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigram_circuits.errors import ConfigError, CorpusError, StatsError, TokenError
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.ngrams.counting import (
    DEFAULT_CHUNK_TOKENS,
    NgramCounter,
    as_int_array,
    check_range,
    check_vocab_size,
    is_token_dataset,
)

__all__ = ["count_bigrams_on_cluster", "plan_shards"]

_INSTALL_HINT = "pip install 'bigram-circuits[cluster]'"


@dataclass(frozen=True)
class Shard:
    """Rows ``[lo, hi)`` of a 2-D source, or tokens ``[lo, hi)`` of a 1-D one (``rows=False``)."""

    source: int  # index into the list of sources
    lo: int
    hi: int
    rows: bool


class _NoProgress:
    def update(self, n: int) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _open_source(source: Any, as_windows: bool, seq_len: int) -> np.ndarray:
    """The array a source stands for (a path is memory-mapped), as windows if asked."""
    arr = np.load(source, mmap_mode="r") if isinstance(source, (str, os.PathLike)) else source
    if as_windows and arr.ndim == 1:
        n = arr.shape[0] // seq_len
        arr = arr[: n * seq_len].reshape(n, seq_len)
    return arr


def _count_shard(
    data: Any,
    shard: Shard,
    prefix: np.ndarray | None,
    vocab_size: int,
    order: int,
    add_k: float,
    as_windows: bool,
    seq_len: int,
    chunk_tokens: int,
) -> BigramStats:
    """Count one shard. ``data`` is the shard's own tokens (shipped by the driver) or a path
    (the worker memory-maps the file and slices the shard itself). ``prefix`` [1, order - 1] are
    the tokens before a 1-D shard (START = vocab_size where the sequence begins)."""
    V = vocab_size
    if isinstance(data, (str, os.PathLike)):
        data = _open_source(data, as_windows, seq_len)[shard.lo : shard.hi]
    counter = NgramCounter(V, order, chunk_tokens, 1)
    if shard.rows:
        counter.add(data, _NoProgress())
        return BigramStats.from_counter(counter, add_k)
    # A piece of one long sequence: the same loop as NgramCounter.add for 1-D arrays, but the
    # carried context starts from the tokens before the shard, and only the shard holding the
    # sequence's first token counts the sequence.
    assert prefix is not None
    for start in range(0, data.shape[0], counter.chunk_tokens):
        piece = np.asarray(data[start : start + counter.chunk_tokens])
        check_range(piece, V, "tokens", f"vocab_size {V}; count with the tokenizer's vocab size")
        counter.count_block(piece.reshape(1, -1), prefix)
        tail = piece[-(order - 1) :].astype(np.int64).reshape(1, -1)
        prefix = np.concatenate([prefix, tail], axis=1)[:, -(order - 1) :]
    counter.n_sequences += 1 if shard.lo == 0 else 0
    return BigramStats.from_counter(counter, add_k)


def _merge(a: BigramStats, b: BigramStats) -> BigramStats:
    return a + b


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer ({hint}), got {value!r}")
    return int(value)


def _check_array(arr: Any, what: str) -> np.ndarray:
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    arr = as_int_array(arr, what)
    if arr.ndim not in (1, 2):
        raise TokenError(f"{what} must be 1-D (one sequence) or 2-D [n_seq, seq_len], got shape {tuple(arr.shape)}")
    if arr.ndim == 2 and arr.shape[1] == 0:
        raise TokenError(f"{what} has windows of length 0; pass sequences of at least one token")
    return arr


def _resolve_sources(tokens_or_paths: Any, vocab_size: int, seq_len: int) -> tuple[list, list[np.ndarray]]:
    """(sources, header arrays): each source is an in-memory array or a path; the header arrays
    (memmaps for paths) give shapes and dtypes without reading the data."""
    if is_token_dataset(tokens_or_paths):
        if int(tokens_or_paths.vocab_size) != vocab_size:
            raise StatsError(
                f"token dataset has vocab_size {tokens_or_paths.vocab_size} but the stats use {vocab_size}; "
                "pass the tokenizer's vocabulary size (len(tokenizer))"
            )
        arr = _check_array(tokens_or_paths.windows(seq_len), "token dataset windows")
        return [arr], [arr]
    if isinstance(tokens_or_paths, (np.ndarray, torch.Tensor)):
        arr = _check_array(tokens_or_paths, "tokens")
        return [arr], [arr]
    if isinstance(tokens_or_paths, (str, os.PathLike)):
        tokens_or_paths = [tokens_or_paths]
    if isinstance(tokens_or_paths, bytes) or not isinstance(tokens_or_paths, (list, tuple)):
        raise TokenError(
            f"cannot count tokens from a {type(tokens_or_paths).__name__}; pass an integer array, a "
            "TokenDataset or a list of .npy token files"
        )
    if not tokens_or_paths:
        raise TokenError("no token files given; pass at least one .npy token file")
    sources, headers = [], []
    for item in tokens_or_paths:
        if not isinstance(item, (str, os.PathLike)):
            raise TokenError(f"a list of token sources must hold .npy file paths, got a {type(item).__name__}")
        path = Path(item).expanduser().resolve()
        if not path.is_file():
            raise CorpusError(f"token file {item} does not exist; pass .npy files of token ids")
        try:
            header = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise CorpusError(
                f"cannot read token file {item} as a .npy array ({exc}); save tokens with np.save"
            ) from None
        if not isinstance(header, np.ndarray):
            raise CorpusError(f"token file {item} is not a single .npy array; save tokens with np.save")
        headers.append(_check_array(header, f"token file {item}"))
        sources.append(str(path))
    return sources, headers


def plan_shards(sizes: list[int], rows: list[bool], n_shards: int) -> list[Shard]:
    """Split sources of ``sizes`` units (rows or tokens) into about ``n_shards`` contiguous
    shards, in proportion to their sizes, at least one per non-empty source."""
    total = sum(sizes)
    shards: list[Shard] = []
    for index, (size, is_rows) in enumerate(zip(sizes, rows)):
        if size == 0:
            continue
        pieces = max(1, min(size, round(n_shards * size / total)))
        bounds = np.linspace(0, size, pieces + 1).round().astype(np.int64)
        shards += [Shard(index, int(lo), int(hi), is_rows) for lo, hi in itertools.pairwise(bounds) if hi > lo]
    return shards


def _connect(address: str | None, n_workers: int, timeout: float):
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError(f"cluster counting needs dask.distributed; {_INSTALL_HINT}") from None
    if address is None:
        try:
            with warnings.catch_warnings():  # "Port 8787 is already in use": any free port is fine
                warnings.filterwarnings("ignore", message="Port .* is already in use")
                cluster = LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
        except RuntimeError as exc:  # "Nanny failed to start": usually a script without a main guard
            raise ConfigError(
                f"the local Dask cluster's workers failed to start ({exc}); workers are spawned "
                "processes, so call this under `if __name__ == '__main__':` in a script"
            ) from None
        return Client(cluster), cluster
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"address must be a Dask scheduler address such as 'tcp://host:8786', got {address!r}")
    try:
        return Client(address, timeout=timeout), None
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"cannot reach a Dask scheduler at {address!r} ({reason}); start one with `dask scheduler` "
            "or pass address=None for a local cluster"
        ) from None


def count_bigrams_on_cluster(
    tokens_or_paths: Any,
    vocab_size: int,
    *,
    n_shards: int | None = None,
    address: str | None = None,
    n_workers: int = 2,
    order: int = 2,
    add_k: float = 0.0,
    seq_len: int = 128,
    as_windows: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    out: str | os.PathLike | None = None,
    tokenizer=None,
    connect_timeout: float = 10.0,
    show_progress: bool = False,
) -> BigramStats:
    """Count n-grams of ``tokens_or_paths`` as ``n_shards`` shards on a Dask cluster and merge
    them with ``+``; the result equals ``BigramStats.from_tokens`` in one process (module
    docstring). ``address=None`` starts a local cluster of ``n_workers`` processes (one thread
    each) and closes it afterwards; otherwise the scheduler at ``address`` is used as it is.
    ``n_shards`` defaults to one per worker: every extra shard costs a merge of its table, which
    for a large vocabulary can take as long as counting it (benchmarks/bench_cluster_counting.py);
    use more shards when one shard would not fit a worker's memory. ``out`` saves the merged stats
    (``BigramStats.save``,
    with ``tokenizer``'s fingerprint when given)."""
    vocab_size = check_vocab_size(vocab_size)
    order = BigramStats._check_order(order, vocab_size)
    add_k = BigramStats._check_add_k(add_k)
    n_workers = _check_positive_int(n_workers, "n_workers", "worker processes of the local cluster")
    if n_shards is not None:
        n_shards = _check_positive_int(n_shards, "n_shards", "pieces the corpus is cut into")
    seq_len = _check_positive_int(seq_len, "seq_len", "tokens per window")
    if as_windows and seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 to cut windows, got {seq_len}")
    chunk_tokens = _check_positive_int(chunk_tokens, "chunk_tokens", "tokens sorted at once")
    if not (isinstance(connect_timeout, (int, float)) and math.isfinite(connect_timeout) and connect_timeout > 0):
        raise ConfigError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
    sources, headers = _resolve_sources(tokens_or_paths, vocab_size, seq_len)
    views = [_open_source(h, as_windows, seq_len) for h in headers]
    sizes = [int(v.shape[0]) for v in views]
    if sum(sizes) == 0:
        raise TokenError("no tokens to count; pass a non-empty token array or dataset")

    client, cluster = _connect(address, n_workers, float(connect_timeout))
    try:
        if n_shards is None:
            n_shards = len(client.scheduler_info().get("workers", {})) or n_workers
        shards = plan_shards(sizes, [v.ndim == 2 for v in views], n_shards)
        payloads, prefixes = [], []
        for shard in shards:
            view = views[shard.source]
            prefix = None
            if not shard.rows:
                before = np.asarray(view[max(0, shard.lo - (order - 1)) : shard.lo], dtype=np.int64)
                if before.size:
                    check_range(
                        before, vocab_size, "tokens", f"vocab_size {vocab_size}; count with the tokenizer's vocab size"
                    )
                prefix = np.full((1, order - 1), vocab_size, dtype=np.int64)
                if before.size:
                    prefix[0, -before.size :] = before
            prefixes.append(prefix)
            src = sources[shard.source]
            # In-memory arrays ship each shard's slice once; files are opened by the workers.
            payloads.append(src if isinstance(src, str) else np.ascontiguousarray(view[shard.lo : shard.hi]))
        in_memory = [i for i, p in enumerate(payloads) if not isinstance(p, str)]
        if in_memory:
            scattered = client.scatter([payloads[i] for i in in_memory])
            for i, future in zip(in_memory, scattered):
                payloads[i] = future
        futures = [
            client.submit(
                _count_shard,
                payload,
                shard,
                prefix,
                vocab_size,
                order,
                add_k,
                as_windows,
                seq_len,
                chunk_tokens,
                pure=False,
            )
            for payload, shard, prefix in zip(payloads, shards, prefixes)
        ]
        if show_progress:
            from dask.distributed import progress

            progress(futures)
        # Merge pairwise on the workers: log2(n_shards) rounds of `a + b`.
        while len(futures) > 1:
            merged = [client.submit(_merge, a, b, pure=False) for a, b in zip(futures[0::2], futures[1::2])]
            if len(futures) % 2:
                merged.append(futures[-1])
            futures = merged
        stats = futures[0].result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if out is not None:
        stats.save(out, tokenizer=tokenizer)
    return stats
