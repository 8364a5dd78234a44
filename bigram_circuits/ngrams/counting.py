"""Exact, streaming n-gram counting into sparse count tables.

Counting (:meth:`~bigram_circuits.ngrams.BigramStats.from_tokens`) takes a 2-D array of
sequences ``[n_seq, seq_len]`` (each row a sequence), a 1-D array (one sequence), a
:class:`~bigram_circuits.data.TokenDataset` (its ``windows(seq_len)``), or any iterable of such
arrays (streamed, so the corpus never has to fit in memory). The first token of every sequence
is counted under the START context, whose id is ``vocab_size``
(:attr:`~bigram_circuits.ngrams.BigramStats.start_id`); with ``order=3`` the trigram contexts of
a sequence's first two tokens are ``(START, START)`` and ``(START, t0)``. Counting is
vectorised: each chunk's (context, next) pairs become integer keys that are sorted and
run-length encoded, and chunk results are merged exactly. Stats of shards add up
(``a + b``), so counting can be split across processes.

The token checks and the counter are public because :mod:`bigram_circuits.cluster` counts
its shards with the same code as :meth:`~bigram_circuits.ngrams.BigramStats.from_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Integer

from bigram_circuits.errors import StatsError, TokenError

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "CountTable",
    "NgramCounter",
    "WindowedTokens",
    "as_int_array",
    "check_range",
    "check_vocab_size",
    "is_token_dataset",
    "token_blocks",
]

DEFAULT_CHUNK_TOKENS = 1 << 24  # tokens sorted at once while counting (64-128 MB of keys)
_MIN_THREADED_KEYS = 1 << 21  # below this, one thread sorts faster than the split costs


# --------------------------------------------------------------------------------------------
# Sparse count tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountTable:
    """Sparse counts of one n-gram order, CSR-like: for each seen context id (sorted), its next
    token ids (sorted) and their counts. Context ids: the bigram context is the current token
    (``V`` = START); the trigram context of ``(a, b)`` is ``a * (V + 1) + b``."""

    contexts: Integer[np.ndarray, " n_ctx"]
    indptr: Integer[np.ndarray, " n_ctx_plus_1"]
    next_ids: Integer[np.ndarray, " nnz"]
    counts: Integer[np.ndarray, " nnz"]
    totals: Integer[np.ndarray, " n_ctx"] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        totals = np.add.reduceat(self.counts, self.indptr[:-1]) if len(self.contexts) else np.zeros(0, np.int64)
        object.__setattr__(self, "totals", totals.astype(np.int64, copy=False))

    @classmethod
    def empty(cls) -> CountTable:
        """A table with no contexts."""
        return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))

    @classmethod
    def from_keys(cls, keys: np.ndarray, counts: np.ndarray, vocab_size: int, n_context_ids: int) -> CountTable:
        """Build from sorted unique keys ``context * V + next`` (contexts < ``n_context_ids``)
        and their counts."""
        if len(keys) == 0:
            return cls.empty()
        counts = counts.astype(np.int64, copy=False)
        if n_context_ids <= max(1 << 20, 4 * len(keys)):
            # Few possible contexts: binary-search every context's first key (no division).
            firsts = np.arange(n_context_ids + 1, dtype=np.int64) * vocab_size
            bounds = np.searchsorted(keys, firsts.astype(keys.dtype) if keys.dtype == np.uint32 else firsts)
            lengths = np.diff(bounds)
            contexts = np.flatnonzero(lengths).astype(np.int64)
            indptr = np.append(bounds[contexts], len(keys)).astype(np.int64)
            offsets = np.repeat((contexts * vocab_size).astype(keys.dtype), lengths[contexts])
            np.subtract(keys, offsets, out=offsets)
            next_ids = offsets.astype(np.int32)
            return cls(contexts, indptr, next_ids, counts)
        keys = keys.astype(np.int64, copy=False)
        context_of = keys // vocab_size
        next_ids = (keys - context_of * vocab_size).astype(np.int32)
        new_row = np.empty(len(keys), dtype=bool)
        new_row[0] = True
        np.not_equal(context_of[1:], context_of[:-1], out=new_row[1:])
        starts = np.flatnonzero(new_row)
        indptr = np.append(starts, len(keys)).astype(np.int64)
        return cls(context_of[starts], indptr, next_ids, counts)

    def keys(self, vocab_size: int) -> np.ndarray:
        """Sorted int64 keys ``context * V + next`` of every stored entry."""
        rows = np.repeat(self.contexts, np.diff(self.indptr))
        return rows * vocab_size + self.next_ids

    @property
    def nnz(self) -> int:
        """Number of stored (context, next) pairs."""
        return len(self.next_ids)

    def find_rows(self, context_ids: np.ndarray) -> np.ndarray:
        """Row index of each context id, -1 where the context was never seen."""
        context_ids = np.asarray(context_ids, dtype=np.int64)
        if len(self.contexts) == 0:
            return np.full(context_ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self.contexts, context_ids)
        pos_clipped = np.minimum(pos, len(self.contexts) - 1)
        return np.where(self.contexts[pos_clipped] == context_ids, pos_clipped, -1).astype(np.int64)

    def lookup(self, rows: np.ndarray, next_ids: np.ndarray) -> np.ndarray:
        """Count of ``next_ids`` in rows ``rows`` (0 where absent; rows must be >= 0).

        A vectorised binary search inside each row's sorted id range (no Python loop over
        queries)."""
        lo = self.indptr[rows].copy()
        hi = self.indptr[rows + 1].copy()
        target = np.asarray(next_ids, dtype=np.int64)
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) // 2
            mid_vals = self.next_ids[np.minimum(mid, max(self.nnz - 1, 0))].astype(np.int64)
            go_right = active & (mid_vals < target)
            lo = np.where(go_right, mid + 1, lo)
            hi = np.where(active & ~go_right, mid, hi)
        found = lo < self.indptr[rows + 1]
        safe = np.minimum(lo, max(self.nnz - 1, 0))
        hit = found & (self.next_ids[safe] == target) if self.nnz else np.zeros_like(found)
        return np.where(hit, self.counts[safe] if self.nnz else 0, 0).astype(np.int64)

    def merged(self, other: CountTable, vocab_size: int, n_context_ids: int) -> CountTable:
        """Exact sum of two tables."""
        keys, counts = _merge_sorted_counts(self.keys(vocab_size), self.counts, other.keys(vocab_size), other.counts)
        return CountTable.from_keys(keys, counts, vocab_size, n_context_ids)


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def _run_lengths(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique values of a sorted array and how often each occurs."""
    n = len(sorted_keys)
    if n == 0:
        return sorted_keys, np.zeros(0, np.int64)
    boundary = np.empty(n, dtype=bool)
    boundary[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=boundary[1:])
    starts = np.flatnonzero(boundary)
    counts = np.empty(len(starts), dtype=np.int64)
    np.subtract(starts[1:], starts[:-1], out=counts[:-1])
    counts[-1] = n - starts[-1]
    return sorted_keys[starts], counts


def _count_keys_threaded(keys: np.ndarray, n_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and counts using ``n_threads`` threads (numpy releases the GIL while
    sorting): sort equal slices of ``keys`` in place, then split the key range at sampled
    splitters and sort + run-length encode each range's pieces independently, so the ranges'
    results simply concatenate."""
    from concurrent.futures import ThreadPoolExecutor

    parts = np.array_split(keys, n_threads)
    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(np.ndarray.sort, parts))
        sample = np.sort(np.concatenate([p[:: max(1, len(p) // 256)] for p in parts]))
        cut = np.linspace(0, len(sample), n_threads + 1).astype(np.int64)[1:-1]
        splitters = np.unique(sample[cut])
        bounds = [np.concatenate([[0], np.searchsorted(p, splitters), [len(p)]]) for p in parts]

        def count_range(r: int) -> tuple[np.ndarray, np.ndarray]:
            merged = np.concatenate([p[b[r] : b[r + 1]] for p, b in zip(parts, bounds)])
            merged.sort()
            return _run_lengths(merged)

        results = list(pool.map(count_range, range(len(splitters) + 1)))
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def _merge_sorted_counts(
    a_keys: np.ndarray, a_counts: np.ndarray, b_keys: np.ndarray, b_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two (sorted unique keys, counts) pairs, adding counts of shared keys."""
    if len(b_keys) > len(a_keys):
        a_keys, a_counts, b_keys, b_counts = b_keys, b_counts, a_keys, a_counts
    if len(b_keys) == 0:
        return a_keys, a_counts
    if a_keys.dtype != b_keys.dtype:
        a_keys, b_keys = a_keys.astype(np.int64), b_keys.astype(np.int64)
    at = np.searchsorted(a_keys, b_keys)
    hit = at < len(a_keys)
    hit[hit] = a_keys[at[hit]] == b_keys[hit]
    counts = a_counts.copy()
    counts[at[hit]] += b_counts[hit]  # b's keys are unique, so no index repeats here
    miss = ~hit
    keys = np.insert(a_keys, at[miss], b_keys[miss])
    counts = np.insert(counts, at[miss], b_counts[miss])
    return keys, counts


class _KeyCounter:
    """Exact counts of integer keys fed in chunks. Chunk results are kept as sorted runs and
    merged like a binary counter (a run is merged once the one above it is at least half its
    size), so total merge work stays O(U log chunks) for U distinct keys."""

    def __init__(self, dtype: np.dtype, n_threads: int = 1) -> None:
        self.dtype = dtype
        self.n_threads = n_threads
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add_keys(self, keys: np.ndarray) -> None:
        """Count an unsorted array of keys (sorted in place when counted in one thread)."""
        if self.n_threads > 1 and len(keys) >= _MIN_THREADED_KEYS:
            self._push(*_count_keys_threaded(keys, self.n_threads))
        else:
            keys.sort()
            self._push(*_run_lengths(keys))

    def _push(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self._runs.append((keys, counts))
        while len(self._runs) >= 2 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            top = self._runs.pop()
            below = self._runs.pop()
            self._runs.append(_merge_sorted_counts(below[0], below[1], top[0], top[1]))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """All sorted unique keys and their counts."""
        if not self._runs:
            return np.zeros(0, self.dtype), np.zeros(0, np.int64)
        keys, counts = self._runs[-1]
        for below_keys, below_counts in reversed(self._runs[:-1]):
            keys, counts = _merge_sorted_counts(below_keys, below_counts, keys, counts)
        return keys, counts


def _bigram_key_dtype(vocab_size: int) -> np.dtype:
    # Bigram keys (V + 1) * V fit uint32 up to V = 65535, which halves sort work and memory.
    return np.dtype(np.uint32) if (vocab_size + 1) * vocab_size <= np.iinfo(np.uint32).max else np.dtype(np.int64)


def _bigram_keys(block: np.ndarray, prefix: np.ndarray | int, vocab_size: int, dtype: np.dtype) -> np.ndarray:
    """Keys ``context * V + next`` for every token of ``block`` [rows, L]; ``prefix`` [rows, 1]
    (or a scalar) is the context of each row's first token."""
    keys = np.empty(block.shape, dtype=dtype)
    first = prefix[:, -1] if isinstance(prefix, np.ndarray) else prefix
    keys[:, 0] = np.asarray(first, dtype=np.int64) * vocab_size
    # ids were range-checked already, so the unsafe casts below cannot overflow
    np.multiply(block[:, :-1], dtype.type(vocab_size), out=keys[:, 1:], dtype=dtype, casting="unsafe")
    np.add(keys, block, out=keys, dtype=dtype, casting="unsafe")
    return keys.reshape(-1)


def _trigram_keys(block: np.ndarray, prefix: np.ndarray | int, vocab_size: int) -> np.ndarray:
    """Keys ``(a * (V + 1) + b) * V + next``; ``prefix`` [rows, 2] (or a scalar) holds the two
    tokens before each row (START = V for a new sequence)."""
    rows, length = block.shape
    pre = np.broadcast_to(
        np.asarray(prefix, dtype=np.int64).reshape(-1, 2)
        if isinstance(prefix, np.ndarray)
        else np.full((1, 2), prefix, dtype=np.int64),
        (rows, 2),
    )
    extended = np.empty((rows, length + 2), dtype=np.int64)
    extended[:, :2] = pre
    extended[:, 2:] = block
    keys = extended[:, :-2] * (vocab_size + 1)
    keys += extended[:, 1:-1]
    keys *= vocab_size
    keys += extended[:, 2:]
    return keys.reshape(-1)


def as_int_array(values: Any, what: str) -> np.ndarray:
    """A numpy integer array from a numpy array, torch tensor or nested list; TokenError if not ints."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    if arr.size == 0:
        raise TokenError(f"{what} is empty; pass at least one token id")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TokenError(
            f"{what} must hold integer token ids, got dtype {arr.dtype}; tokenize text first "
            "(float or object arrays are not token ids)"
        )
    return arr


def check_range(arr: np.ndarray, upper: int, what: str, hint: str) -> None:
    """TokenError unless every id is in [0, upper)."""
    if np.issubdtype(arr.dtype, np.signedinteger):
        low = int(arr.min())
        if low < 0:
            raise TokenError(f"{what} holds a negative token id ({low}); token ids must be >= 0")
    high = int(arr.max())
    if high >= upper:
        raise TokenError(f"{what} holds token id {high}, out of range for {hint}")


@runtime_checkable
class WindowedTokens(Protocol):
    """A token dataset as counting reads it (a :class:`~bigram_circuits.data.TokenDataset`)."""

    tokens: Any
    vocab_size: int

    def windows(self, seq_len: int = 128, max_windows: int | None = None) -> np.ndarray:
        """The tokens cut into ``[n, seq_len]`` windows."""
        ...


def is_token_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a token dataset (:class:`WindowedTokens`, e.g. a
    :class:`~bigram_circuits.data.TokenDataset`)."""
    return isinstance(obj, WindowedTokens)


def token_blocks(source: Any, vocab_size: int, seq_len: int) -> Iterator[np.ndarray]:
    """Yield validated-later arrays: 2-D = independent sequences, 1-D = one sequence."""
    if is_token_dataset(source):
        if int(source.vocab_size) != vocab_size:
            raise StatsError(
                f"token dataset has vocab_size {source.vocab_size} but the stats use {vocab_size}; "
                "pass the tokenizer's vocabulary size (len(tokenizer))"
            )
        yield source.windows(seq_len)
        return
    if isinstance(source, (np.ndarray, torch.Tensor)):
        yield source
        return
    if isinstance(source, (str, bytes)):
        raise TokenError("got text, not token ids; tokenize it first (e.g. data.load_token_dataset)")
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], (int, np.integer)):
        yield np.asarray(source)  # a flat list of ids: one sequence
        return
    try:
        iterator = iter(source)
    except TypeError:
        raise TokenError(
            f"cannot count tokens from a {type(source).__name__}; pass an integer array, a "
            "TokenDataset or an iterable of arrays"
        ) from None
    for item in iterator:
        if is_token_dataset(item):
            yield from token_blocks(item, vocab_size, seq_len)
        elif isinstance(item, (str, bytes)):
            raise TokenError("got text, not token ids; tokenize it first (e.g. data.load_token_dataset)")
        else:
            yield item


class NgramCounter:
    """Streaming counter behind :meth:`~bigram_circuits.ngrams.BigramStats.from_tokens` (and the
    shards of :mod:`bigram_circuits.cluster`)."""

    def __init__(self, vocab_size: int, order: int, chunk_tokens: int, n_threads: int) -> None:
        self.vocab_size = vocab_size
        self.order = order
        self.chunk_tokens = max(int(chunk_tokens), 1)
        self.bigram = _KeyCounter(_bigram_key_dtype(vocab_size), n_threads)
        self.trigram = _KeyCounter(np.dtype(np.int64), n_threads) if order == 3 else None
        self.n_tokens = 0
        self.n_sequences = 0

    def count_block(self, block: np.ndarray, prefix: np.ndarray | int) -> None:
        """Count the rows of ``block`` [rows, L] (range-checked already); ``prefix``: the context
        of each row's first token(s), as in ``_bigram_keys`` / ``_trigram_keys``."""
        V = self.vocab_size
        self.bigram.add_keys(_bigram_keys(block, prefix, V, self.bigram.dtype))
        if self.trigram is not None:
            self.trigram.add_keys(_trigram_keys(block, prefix, V))
        self.n_tokens += int(block.size)

    def add(self, item: Any, progress) -> None:
        """Count one 2-D array of sequences or one 1-D sequence (checked here); ``progress``
        gets ``update(n_tokens)`` calls."""
        arr = as_int_array(item, "tokens")
        V = self.vocab_size
        if arr.ndim == 2:
            if arr.shape[1] == 0:
                raise TokenError("token windows have length 0; pass sequences of at least one token")
            rows_per_chunk = max(1, self.chunk_tokens // arr.shape[1])
            for start in range(0, arr.shape[0], rows_per_chunk):
                block = np.asarray(arr[start : start + rows_per_chunk])
                check_range(block, V, "tokens", f"vocab_size {V}; count with the tokenizer's vocab size")
                self.count_block(block, V)
                self.n_sequences += block.shape[0]
                progress.update(block.size)
        elif arr.ndim == 1:
            # One sequence, possibly longer than memory allows at once: carry its last tokens.
            prefix = np.full((1, self.order - 1), V, dtype=np.int64)
            for start in range(0, arr.shape[0], self.chunk_tokens):
                piece = np.asarray(arr[start : start + self.chunk_tokens])
                check_range(piece, V, "tokens", f"vocab_size {V}; count with the tokenizer's vocab size")
                self.count_block(piece.reshape(1, -1), prefix)
                tail = piece[-(self.order - 1) :].astype(np.int64).reshape(1, -1)
                prefix = np.concatenate([prefix, tail], axis=1)[:, -(self.order - 1) :]
                progress.update(piece.size)
            self.n_sequences += 1
        else:
            raise TokenError(f"tokens must be 1-D (one sequence) or 2-D [n_seq, seq_len], got shape {tuple(arr.shape)}")


def check_vocab_size(vocab_size: Any) -> int:
    """``vocab_size`` as an int; StatsError unless it is a positive integer."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise StatsError(f"vocab_size must be a positive integer (len(tokenizer)), got {vocab_size!r}")
    return int(vocab_size)
