"""N-gram statistics of a token corpus: sparse counts, backoff distributions and the soft
cross-entropy of model logits against them, without ever building a dense (batch, pos, vocab)
target.

Counting
    :meth:`BigramStats.from_tokens` takes a 2-D array of sequences ``[n_seq, seq_len]`` (each row
    a sequence), a 1-D array (one sequence), a :class:`~bigram_circuits.data.TokenDataset` (its
    ``windows(seq_len)``), or any iterable of such arrays (streamed, so the corpus never has to
    fit in memory). The first token of every sequence is counted under the START context, whose
    id is ``vocab_size`` (:attr:`BigramStats.start_id`); with ``order=3`` the trigram contexts of
    a sequence's first two tokens are ``(START, START)`` and ``(START, t0)``. Counting is
    vectorised: each chunk's (context, next) pairs become integer keys that are sorted and
    run-length encoded, and chunk results are merged exactly. Stats of shards add up
    (``a + b``), so counting can be split across processes.

Distributions (each conditional distribution sums to 1 over the ``vocab_size`` tokens)
    With ``add_k = k`` (default 0: no smoothing, as in the paper), ``n(c, j)`` the count of ``j``
    after context ``c`` and ``N(c)`` its row total, ``u(j)`` the unigram count of ``j`` (every
    counted token, i.e. every next token, first tokens of sequences included) and ``N`` their sum:

    - seen context (``N(c) > 0``): ``P(j | c) = (n(c, j) + k) / (N(c) + k V)``;
    - unseen context: the unigram distribution ``P(j) = (u(j) + k) / (N + k V)``;
    - nothing counted at all (``N = 0``; only possible for stats built empty): uniform ``1 / V``.

    With ``order=3`` an unseen trigram context ``(a, b)`` first backs off to the bigram context
    ``b``, then to the unigram. Backoff is decided per context, as in the paper's code, never per
    token: with ``k = 0`` a token never seen after a seen context has probability 0 (surprisal
    ``inf``), and a token never seen anywhere has probability 0 under the unigram backoff too.

Loss
    :meth:`BigramStats.soft_cross_entropy` computes
    ``mean_positions( -sum_j P(j | current) log_softmax(logits[..., :V])_j )``
    as ``logsumexp(z) - sum_j P(j | c) z_j`` (valid because each ``P(. | c)`` sums to 1): the
    second term gathers the logits at the non-zero entries of the sparse rows, plus a unigram
    matrix-vector product for backed-off contexts and a row sum for the add-k constant. It runs
    in chunks of positions with a custom backward (``softmax - P``), so memory beyond the logits
    and their gradient stays a few tens of MB whatever the vocabulary.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Integer

from bigram_circuits.errors import StatsError, TokenError
from bigram_circuits.io import atomic_write

__all__ = ["PERMUTATION_VARIANTS", "STATS_FORMAT_VERSION", "BigramStats", "CountTable", "TargetRows"]

STATS_FORMAT_VERSION = 1
_DEFAULT_CHUNK_TOKENS = 1 << 24  # tokens sorted at once while counting (64-128 MB of keys)
_LOSS_CHUNK_BYTES = 32 << 20  # logits bytes (and sparse entries) the loss handles at once
_MIN_THREADED_KEYS = 1 << 21  # below this, one thread sorts faster than the split costs
_DENSE_TARGET_LIMIT = 1 << 28  # elements of a dense target that dense_targets() agrees to build


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


def _as_int_array(values: Any, what: str) -> np.ndarray:
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


def _check_range(arr: np.ndarray, upper: int, what: str, hint: str) -> None:
    """TokenError unless every id is in [0, upper)."""
    if np.issubdtype(arr.dtype, np.signedinteger):
        low = int(arr.min())
        if low < 0:
            raise TokenError(f"{what} holds a negative token id ({low}); token ids must be >= 0")
    high = int(arr.max())
    if high >= upper:
        raise TokenError(f"{what} holds token id {high}, out of range for {hint}")


def _is_token_dataset(obj: Any) -> bool:
    return hasattr(obj, "windows") and hasattr(obj, "tokens") and hasattr(obj, "vocab_size")


def _blocks(source: Any, vocab_size: int, seq_len: int) -> Iterator[np.ndarray]:
    """Yield validated-later arrays: 2-D = independent sequences, 1-D = one sequence."""
    if _is_token_dataset(source):
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
        if _is_token_dataset(item):
            yield from _blocks(item, vocab_size, seq_len)
        elif isinstance(item, (str, bytes)):
            raise TokenError("got text, not token ids; tokenize it first (e.g. data.load_token_dataset)")
        else:
            yield item


class _NgramCounter:
    """Streaming counter behind :meth:`BigramStats.from_tokens`."""

    def __init__(self, vocab_size: int, order: int, chunk_tokens: int, n_threads: int) -> None:
        self.vocab_size = vocab_size
        self.order = order
        self.chunk_tokens = max(int(chunk_tokens), 1)
        self.bigram = _KeyCounter(_bigram_key_dtype(vocab_size), n_threads)
        self.trigram = _KeyCounter(np.dtype(np.int64), n_threads) if order == 3 else None
        self.n_tokens = 0
        self.n_sequences = 0

    def _count_block(self, block: np.ndarray, prefix: np.ndarray | int) -> None:
        V = self.vocab_size
        self.bigram.add_keys(_bigram_keys(block, prefix, V, self.bigram.dtype))
        if self.trigram is not None:
            self.trigram.add_keys(_trigram_keys(block, prefix, V))
        self.n_tokens += int(block.size)

    def add(self, item: Any, progress) -> None:
        arr = _as_int_array(item, "tokens")
        V = self.vocab_size
        if arr.ndim == 2:
            if arr.shape[1] == 0:
                raise TokenError("token windows have length 0; pass sequences of at least one token")
            rows_per_chunk = max(1, self.chunk_tokens // arr.shape[1])
            for start in range(0, arr.shape[0], rows_per_chunk):
                block = np.asarray(arr[start : start + rows_per_chunk])
                _check_range(block, V, "tokens", f"vocab_size {V}; count with the tokenizer's vocab size")
                self._count_block(block, V)
                self.n_sequences += block.shape[0]
                progress.update(block.size)
        elif arr.ndim == 1:
            # One sequence, possibly longer than memory allows at once: carry its last tokens.
            prefix = np.full((1, self.order - 1), V, dtype=np.int64)
            for start in range(0, arr.shape[0], self.chunk_tokens):
                piece = np.asarray(arr[start : start + self.chunk_tokens])
                _check_range(piece, V, "tokens", f"vocab_size {V}; count with the tokenizer's vocab size")
                self._count_block(piece.reshape(1, -1), prefix)
                tail = piece[-(self.order - 1) :].astype(np.int64).reshape(1, -1)
                prefix = np.concatenate([prefix, tail], axis=1)[:, -(self.order - 1) :]
                progress.update(piece.size)
            self.n_sequences += 1
        else:
            raise TokenError(f"tokens must be 1-D (one sequence) or 2-D [n_seq, seq_len], got shape {tuple(arr.shape)}")


# --------------------------------------------------------------------------------------------
# Sparse targets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRows:
    """The distributions ``P(. | context)`` of a set of positions, in sparse form.

    For position ``r`` (flattened over ``shape``) and token ``j``::

        P(j) = backoff[r] * dense_probs[j] + const[r] + scale[r] * n_r(j)

    where ``n_r(j)`` is the count of ``j`` in row ``row[r]`` of ``tables[table_index[r]]``
    (``table_index[r] = -1``: no sparse part). ``backoff`` is 1 where the context was unseen
    (unigram backoff, or uniform when nothing was counted) and 0 otherwise; ``const`` is the
    add-k share ``k / (N(c) + kV)`` of a seen row. Build with :meth:`BigramStats.target_rows`.
    """

    shape: tuple[int, ...]
    vocab_size: int
    tables: tuple[CountTable, ...]
    table_index: Integer[np.ndarray, " n"]
    row: Integer[np.ndarray, " n"]
    scale: Float[np.ndarray, " n"]
    const: Float[np.ndarray, " n"]
    backoff: Float[np.ndarray, " n"]
    dense_probs: Float[np.ndarray, " vocab"]

    @property
    def n_positions(self) -> int:
        """Number of positions described."""
        return len(self.row)

    def row_lengths(self) -> Integer[np.ndarray, " n"]:
        """Number of sparse entries of each position."""
        lengths = np.zeros(self.n_positions, dtype=np.int64)
        for t, table in enumerate(self.tables):
            sel = np.flatnonzero(self.table_index == t)
            rows = self.row[sel]
            lengths[sel] = table.indptr[rows + 1] - table.indptr[rows]
        return lengths

    def entries(self, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sparse entries of positions ``lo..hi``: (position, token id, probability) arrays."""
        hi = self.n_positions if hi is None else hi
        positions, tokens, probs = [], [], []
        for t, table in enumerate(self.tables):
            sel = np.flatnonzero(self.table_index[lo:hi] == t) + lo
            if len(sel) == 0:
                continue
            rows = self.row[sel]
            starts = table.indptr[rows]
            lengths = table.indptr[rows + 1] - starts
            total = int(lengths.sum())
            # Entry e of position p reads index starts[p] + (e - first entry of p).
            shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
            index = np.arange(total, dtype=np.int64) + shift
            positions.append(np.repeat(sel, lengths))
            tokens.append(table.next_ids[index].astype(np.int64))
            probs.append(table.counts[index] * np.repeat(self.scale[sel], lengths))
        if not positions:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        return np.concatenate(positions), np.concatenate(tokens), np.concatenate(probs)

    def dense(self, max_elements: int = _DENSE_TARGET_LIMIT) -> Float[np.ndarray, "*positions vocab"]:
        """The dense float64 target ``[*shape, V]`` (for tests and small cases only)."""
        n, V = self.n_positions, self.vocab_size
        if n * V > max_elements:
            raise StatsError(
                f"a dense target of {n} positions x {V} tokens would take {n * V * 8 / 1e9:.1f} GB; "
                "use soft_cross_entropy or target_rows instead"
            )
        out = self.backoff[:, None] * self.dense_probs[None, :] + self.const[:, None]
        pos, tok, prob = self.entries()
        out[pos, tok] += prob  # (position, token) pairs are unique: one row per position
        return out.reshape(*self.shape, V)


def _chunk_plan(row_lengths: np.ndarray, rows_per_chunk: int, entries_per_chunk: int) -> list[tuple[int, int]]:
    """Split positions into ranges of at most ``rows_per_chunk`` rows and (unless one row
    alone exceeds it) ``entries_per_chunk`` sparse entries."""
    n = len(row_lengths)
    cum = np.concatenate([[0], np.cumsum(row_lengths)])
    plan, lo = [], 0
    while lo < n:
        hi = min(lo + rows_per_chunk, n)
        by_entries = int(np.searchsorted(cum, cum[lo] + entries_per_chunk, side="right")) - 1
        hi = max(lo + 1, min(hi, by_entries))
        plan.append((lo, hi))
        lo = hi
    return plan


class _SparseSoftCrossEntropy(torch.autograd.Function):
    """Per-position ``logsumexp(z) - sum_j P(j) z_j`` with backward ``softmax(z) - P``, both
    computed from :class:`TargetRows`: dense passes over row chunks of the logits, sparse
    gathers over chunks of entries (no dense target; no entries saved for backward)."""

    @staticmethod
    def _plans(rows: TargetRows, width: int, chunk_bytes: int) -> tuple[list, list]:
        n = rows.n_positions
        rows_per_chunk = max(1, chunk_bytes // (width * 4))
        row_plan = [(lo, min(lo + rows_per_chunk, n)) for lo in range(0, n, rows_per_chunk)]
        # An entry costs ~40 bytes in flight (position, token, probability, index, value).
        entry_plan = _chunk_plan(rows.row_lengths(), n, max(1, chunk_bytes // 40))
        return row_plan, entry_plan

    @staticmethod
    def _entries(rows: TargetRows, lo: int, hi: int, width: int, device) -> tuple[torch.Tensor, ...]:
        """(position, flat logits index, probability) tensors of positions lo..hi on ``device``."""
        pos, tok, prob = rows.entries(lo, hi)
        pos_t = torch.from_numpy(pos).to(device)
        flat = pos_t * width + torch.from_numpy(tok).to(device)
        return pos_t, flat, torch.from_numpy(prob).to(device)

    @staticmethod
    def forward(ctx, logits2d: torch.Tensor, rows: TargetRows, chunk_bytes: int) -> torch.Tensor:
        n, width = logits2d.shape
        V = rows.vocab_size
        device = logits2d.device
        compute_dtype = logits2d.dtype if logits2d.dtype in (torch.float32, torch.float64) else torch.float32
        row_plan, entry_plan = _SparseSoftCrossEntropy._plans(rows, width, chunk_bytes)
        dense_probs = torch.as_tensor(rows.dense_probs).to(device=device, dtype=compute_dtype)
        lse = torch.empty(n, dtype=compute_dtype, device=device)
        expected = torch.zeros(n, dtype=torch.float64, device=device)  # sum_j P(j) z_j
        for lo, hi in row_plan:
            z = logits2d[lo:hi, :V]
            if z.dtype != compute_dtype:
                z = z.to(compute_dtype)
            lse[lo:hi] = torch.logsumexp(z, dim=-1)
            const = rows.const[lo:hi]
            if const.any():
                expected[lo:hi] += torch.from_numpy(const).to(device) * z.sum(dim=-1).double()
            backed_off = np.flatnonzero(rows.backoff[lo:hi])
            if len(backed_off):
                sel = torch.from_numpy(backed_off).to(device)
                expected[lo + sel] += (z[sel] @ dense_probs).double()
        flat_logits = logits2d.view(-1)
        for lo, hi in entry_plan:
            pos, flat, prob = _SparseSoftCrossEntropy._entries(rows, lo, hi, width, device)
            if len(pos):
                expected.index_add_(0, pos, flat_logits[flat].double() * prob)
        ctx.save_for_backward(logits2d, lse)
        ctx.rows, ctx.plans, ctx.compute_dtype = rows, (row_plan, entry_plan), compute_dtype
        return (lse.double() - expected).to(compute_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits2d, lse = ctx.saved_tensors
        rows: TargetRows = ctx.rows
        row_plan, entry_plan = ctx.plans
        V = rows.vocab_size
        device, dtype = logits2d.device, logits2d.dtype
        compute_dtype = ctx.compute_dtype
        width = logits2d.shape[1]
        grad = torch.empty_like(logits2d, memory_format=torch.contiguous_format)
        if width > V:
            grad[:, V:] = 0  # padded logits are outside the softmax
        dense_probs = torch.as_tensor(rows.dense_probs).to(device=device, dtype=compute_dtype)
        const = torch.as_tensor(rows.const).to(device=device, dtype=compute_dtype)
        scale = grad_out.to(compute_dtype)
        for lo, hi in row_plan:  # softmax(z) minus the dense part of P, times the incoming grad
            z = logits2d[lo:hi, :V]
            if dtype == compute_dtype:
                work = grad[lo:hi, :V]
                torch.sub(z, lse[lo:hi, None], out=work)
            else:
                work = z.to(compute_dtype) - lse[lo:hi, None]
            work.exp_()
            backed_off = np.flatnonzero(rows.backoff[lo:hi])
            if len(backed_off):
                sel = torch.from_numpy(backed_off).to(device)
                work.index_add_(0, sel, dense_probs.expand(len(backed_off), V), alpha=-1)
            if rows.const[lo:hi].any():
                work.sub_(const[lo:hi, None])
            work.mul_(scale[lo:hi, None])
            if dtype != compute_dtype:
                grad[lo:hi, :V] = work.to(dtype)
        flat_grad = grad.view(-1)
        scale64 = scale.double()
        for lo, hi in entry_plan:  # minus the sparse part of P
            pos, flat, prob = _SparseSoftCrossEntropy._entries(rows, lo, hi, width, device)
            if len(pos):
                flat_grad.index_add_(0, flat, (-(prob * scale64[pos])).to(dtype))
        return grad, None, None


# --------------------------------------------------------------------------------------------
# BigramStats
# --------------------------------------------------------------------------------------------


PERMUTATION_VARIANTS = ("contexts", "vocab")


def _permute_rows(table: CountTable, vocab_size: int, rng: np.random.Generator) -> CountTable:
    """The rows of ``table`` moved along one random cycle through its contexts (no fixed point)."""
    n = len(table.contexts)
    if n < 2:
        return table
    order = rng.permutation(n)
    source = np.empty(n, dtype=np.int64)
    source[order] = np.roll(order, -1)  # context order[i] takes the row of context order[i + 1]
    lengths = np.diff(table.indptr)[source]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Entry j of new row i comes from old entry indptr_old[source[i]] + j.
    starts = np.repeat(table.indptr[:-1][source] - indptr[:-1], lengths)
    take = np.arange(int(indptr[-1]), dtype=np.int64) + starts
    return CountTable(table.contexts.copy(), indptr, table.next_ids[take].copy(), table.counts[take].copy())


def _permute_vocab_within_rows(table: CountTable, vocab_size: int, rng: np.random.Generator) -> CountTable:
    """Each row's next-token ids replaced by distinct random ids (one vocabulary permutation per
    row), entries re-sorted by id within the row; counts travel with their entries."""
    if table.nnz == 0:
        return table
    lengths = np.diff(table.indptr)
    new_ids = np.empty(table.nnz, dtype=np.int64)
    for row in range(len(table.contexts)):
        lo, hi = table.indptr[row], table.indptr[row + 1]
        new_ids[lo:hi] = rng.choice(vocab_size, size=hi - lo, replace=False)
    rows = np.repeat(np.arange(len(table.contexts)), lengths)
    order = np.lexsort((new_ids, rows))
    return CountTable(table.contexts.copy(), table.indptr.copy(), new_ids[order].astype(np.int32), table.counts[order])


def _check_vocab_size(vocab_size: Any) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise StatsError(f"vocab_size must be a positive integer (len(tokenizer)), got {vocab_size!r}")
    return int(vocab_size)


@dataclass(frozen=True, eq=False)
class BigramStats:
    """Bigram (optionally trigram) counts of a corpus and the backoff distributions built on
    them; see the module docstring for the exact definitions. Create with :meth:`from_tokens`
    or :meth:`load`; shards add up with ``+`` / :meth:`merge`."""

    vocab_size: int
    order: int
    add_k: float
    unigram_counts: Integer[np.ndarray, " vocab"]
    bigram: CountTable
    trigram: CountTable | None = None
    n_sequences: int = 0
    tokenizer_fingerprint: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_tokens(
        cls,
        tokens: Any,
        vocab_size: int,
        *,
        order: int = 2,
        add_k: float = 0.0,
        seq_len: int = 128,
        chunk_tokens: int = _DEFAULT_CHUNK_TOKENS,
        n_threads: int | None = None,
        show_progress: bool = True,
    ) -> BigramStats:
        """Count n-grams of ``tokens``: a 2-D array of sequences ``[n_seq, seq_len]``, a 1-D array
        (one sequence), a :class:`~bigram_circuits.data.TokenDataset` (counted as its
        ``windows(seq_len)``, as the paper's 128-token sequences), or an iterable of such arrays
        (streamed chunk by chunk). Numpy arrays, memmaps, torch tensors and lists are accepted.
        ``chunk_tokens`` bounds the tokens handled at once (memory: about 8-16 bytes each);
        ``n_threads`` (default: up to 8) sorts large chunks in parallel threads."""
        from tqdm.auto import tqdm

        vocab_size = _check_vocab_size(vocab_size)
        order = cls._check_order(order, vocab_size)
        add_k = cls._check_add_k(add_k)
        if n_threads is None:
            n_threads = min(8, os.cpu_count() or 1)
        counter = _NgramCounter(vocab_size, order, chunk_tokens, max(1, int(n_threads)))
        total = None
        if isinstance(tokens, (np.ndarray, torch.Tensor)):
            total = int(np.prod(tokens.shape))
        with tqdm(
            total=total,
            unit="tok",
            unit_scale=True,
            desc=f"count {order}-grams",
            disable=not show_progress,
            leave=False,
        ) as progress:
            for block in _blocks(tokens, vocab_size, seq_len):
                counter.add(block, progress)
        if counter.n_tokens == 0:
            raise TokenError("no tokens to count; pass a non-empty token array or dataset")
        bigram = CountTable.from_keys(*counter.bigram.result(), vocab_size, vocab_size + 1)
        # Every counted token is the next token of exactly one bigram (START included).
        unigram = np.rint(np.bincount(bigram.next_ids, weights=bigram.counts, minlength=vocab_size)).astype(np.int64)
        trigram = None
        if counter.trigram is not None:
            trigram = CountTable.from_keys(*counter.trigram.result(), vocab_size, (vocab_size + 1) ** 2)
        return cls(vocab_size, order, add_k, unigram, bigram, trigram, counter.n_sequences)

    @staticmethod
    def _check_order(order: Any, vocab_size: int) -> int:
        if order not in (2, 3):
            raise StatsError(f"order must be 2 (bigrams) or 3 (trigrams), got {order!r}")
        if order == 3 and (vocab_size + 1) ** 2 * vocab_size >= 2**63:
            raise StatsError(f"trigram keys overflow int64 at vocab_size {vocab_size}; use order=2")
        return int(order)

    @staticmethod
    def _check_add_k(add_k: Any) -> float:
        try:
            value = float(add_k)
        except (TypeError, ValueError):
            raise StatsError(f"add_k must be a number >= 0, got {add_k!r}") from None
        if not math.isfinite(value) or value < 0:
            raise StatsError(f"add_k must be a finite number >= 0, got {add_k!r}")
        return value

    def with_add_k(self, add_k: float) -> BigramStats:
        """The same counts with another add-k smoothing constant."""
        return replace(self, add_k=self._check_add_k(add_k), _cache={})

    def permuted(self, variant: str = "contexts", seed: int = 0) -> BigramStats:
        """A control target: a copy whose conditional distributions are permuted, seeded.

        ``"contexts"``: the rows (next-token distributions) move to other contexts along one
        random cycle through every seen context, so no context keeps its own row: the same rows
        and row entropies, attached to the wrong contexts. ``"vocab"``: within each row the
        next-token ids are mapped to distinct random token ids (a permutation of the
        vocabulary drawn per row): every context keeps its row's probabilities and entropy but
        predicts the wrong tokens. Both variants permute a trigram table the same way, and keep
        the unigram backoff, ``add_k`` and the tokenizer fingerprint unchanged."""
        if variant not in PERMUTATION_VARIANTS:
            raise StatsError(f"unknown permutation variant {variant!r}; use one of {', '.join(PERMUTATION_VARIANTS)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise StatsError(f"seed must be an integer, got {seed!r}")
        rng = np.random.default_rng([int(seed), 0 if variant == "contexts" else 1])
        permute = _permute_rows if variant == "contexts" else _permute_vocab_within_rows
        bigram = permute(self.bigram, self.vocab_size, rng)
        trigram = None if self.trigram is None else permute(self.trigram, self.vocab_size, rng)
        return replace(self, bigram=bigram, trigram=trigram, _cache={})

    def merge(self, other: BigramStats) -> BigramStats:
        """Stats of the union of both corpora (counts add up exactly)."""
        if not isinstance(other, BigramStats):
            raise StatsError(f"can only merge BigramStats, got {type(other).__name__}")
        if other.vocab_size != self.vocab_size:
            raise StatsError(
                f"cannot merge stats of vocab_size {other.vocab_size} into {self.vocab_size}; count "
                "every shard with the same tokenizer"
            )
        if other.order != self.order:
            raise StatsError(f"cannot merge order-{other.order} stats into order-{self.order} stats")
        if other.add_k != self.add_k:
            raise StatsError(f"cannot merge stats with add_k {other.add_k} and {self.add_k}; use with_add_k first")
        fingerprints = {f for f in (self.tokenizer_fingerprint, other.tokenizer_fingerprint) if f}
        if len(fingerprints) > 1:
            raise StatsError("cannot merge stats counted with different tokenizers")
        V = self.vocab_size
        trigram = self.trigram.merged(other.trigram, V, (V + 1) ** 2) if self.trigram is not None else None
        return BigramStats(
            V,
            self.order,
            self.add_k,
            self.unigram_counts + other.unigram_counts,
            self.bigram.merged(other.bigram, V, V + 1),
            trigram,
            self.n_sequences + other.n_sequences,
            next(iter(fingerprints), None),
        )

    def __add__(self, other: BigramStats) -> BigramStats:
        return self.merge(other)

    # ---------------------------------------------------------------- basic facts

    @property
    def start_id(self) -> int:
        """Context id of the START placeholder (``vocab_size``)."""
        return self.vocab_size

    @property
    def n_tokens(self) -> int:
        """Number of tokens counted."""
        return int(self.unigram_counts.sum())

    @property
    def n_contexts(self) -> int:
        """Number of seen bigram contexts (START included)."""
        return len(self.bigram.contexts)

    def __repr__(self) -> str:
        return (
            f"BigramStats(vocab_size={self.vocab_size}, order={self.order}, add_k={self.add_k}, "
            f"n_tokens={self.n_tokens}, n_sequences={self.n_sequences}, bigram_nnz={self.bigram.nnz})"
        )

    def counts_matrix(self):
        """Bigram counts as a ``scipy.sparse.csr_matrix`` of shape ``(V + 1, V)`` (row V = START)."""
        from scipy import sparse

        V = self.vocab_size
        indptr = np.zeros(V + 2, dtype=np.int64)
        indptr[self.bigram.contexts + 1] = np.diff(self.bigram.indptr)
        return sparse.csr_matrix((self.bigram.counts, self.bigram.next_ids, np.cumsum(indptr)), shape=(V + 1, V))

    def unigram_probs(self) -> Float[np.ndarray, " vocab"]:
        """The backoff distribution of unseen contexts: add-k unigram, or uniform if empty."""
        if "unigram" not in self._cache:
            V, k = self.vocab_size, self.add_k
            total = float(self.unigram_counts.sum())
            if total + k * V > 0:
                probs = (self.unigram_counts + k) / (total + k * V)
            else:
                probs = np.full(V, 1.0 / V)
            self._cache["unigram"] = probs
        return self._cache["unigram"]

    def check_tokenizer(self, tokenizer) -> None:
        """StatsError unless ``tokenizer`` has this vocabulary size (and fingerprint, if known)."""
        from bigram_circuits.data import tokenizer_fingerprint

        if len(tokenizer) != self.vocab_size:
            raise StatsError(
                f"stats have vocab_size {self.vocab_size} but the tokenizer has {len(tokenizer)} tokens; "
                "count the corpus with this tokenizer"
            )
        fingerprint = tokenizer_fingerprint(tokenizer)
        if self.tokenizer_fingerprint and fingerprint != self.tokenizer_fingerprint:
            raise StatsError(
                f"stats were counted with tokenizer {self.tokenizer_fingerprint}, not {fingerprint}; "
                "count the corpus with this tokenizer"
            )

    # ---------------------------------------------------------------- context resolution

    def _context_arrays(self, current: Any, what: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(current, previous-or-None) int64 arrays from a query's ``current`` argument; START
        (``vocab_size``) is a valid context id."""
        arr = _as_int_array(current, what)
        hint = f"contexts of vocab_size {self.vocab_size} (START = {self.start_id})"
        _check_range(arr, self.vocab_size + 1, what, hint)
        arr = arr.astype(np.int64, copy=False)
        if self.order == 2:
            return arr, None
        if arr.shape[-1] != 2:
            raise TokenError(
                f"order-3 stats need (previous, current) pairs in a last axis of size 2, got shape "
                f"{tuple(arr.shape)}; use sequence_contexts(tokens) to build them"
            )
        return arr[..., 1], arr[..., 0]

    def _resolve(self, current: np.ndarray, previous: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Per query: which table holds its distribution (0 = bigram, 1 = trigram, -1 = unigram
        backoff) and the row in it."""
        flat_current = current.reshape(-1)
        level = np.full(flat_current.shape, -1, dtype=np.int8)
        rows = np.full(flat_current.shape, -1, dtype=np.int64)
        if previous is not None and self.trigram is not None:
            tri_rows = self.trigram.find_rows(previous.reshape(-1) * (self.vocab_size + 1) + flat_current)
            seen = tri_rows >= 0
            level[seen], rows[seen] = 1, tri_rows[seen]
        todo = level < 0
        bi_rows = self.bigram.find_rows(flat_current[todo])
        seen_bi = bi_rows >= 0
        idx = np.flatnonzero(todo)[seen_bi]
        level[idx], rows[idx] = 0, bi_rows[seen_bi]
        return level, rows

    def _tables(self) -> tuple[CountTable, ...]:
        return (self.bigram,) if self.trigram is None else (self.bigram, self.trigram)

    def sequence_contexts(self, tokens: Any) -> Integer[np.ndarray, "*batch pos"] | Integer[np.ndarray, "*batch pos 2"]:
        """The context of every position of sequences ``tokens [..., pos]``: the tokens
        themselves (order 2, ``[..., pos]``), or (previous, current) pairs with previous = START
        at position 0 (order 3, ``[..., pos, 2]``)."""
        arr = _as_int_array(tokens, "tokens")
        _check_range(arr, self.vocab_size, "tokens", f"vocab_size {self.vocab_size}")
        arr = arr.astype(np.int64, copy=False)
        if self.order == 2:
            return arr
        previous = np.empty_like(arr)
        previous[..., 0] = self.start_id
        previous[..., 1:] = arr[..., :-1]
        return np.stack([previous, arr], axis=-1)

    # ---------------------------------------------------------------- probabilities

    def prob(self, current: Any, next_tokens: Any) -> Float[np.ndarray, "*queries"] | float:
        """``P(next | current)`` with backoff; ``current`` holds token ids (START allowed) for
        order 2, (previous, current) pairs in a trailing axis of size 2 for order 3."""
        cur, prev = self._context_arrays(current, "current")
        nxt = _as_int_array(next_tokens, "next_tokens")
        _check_range(nxt, self.vocab_size, "next_tokens", f"vocab_size {self.vocab_size}")
        try:
            cur_b, nxt_b = np.broadcast_arrays(cur, nxt.astype(np.int64))
            prev_b = None if prev is None else np.broadcast_to(prev, cur_b.shape)
        except ValueError:
            raise TokenError(
                f"current {tuple(cur.shape)} and next_tokens {tuple(nxt.shape)} shapes do not match"
            ) from None
        level, rows = self._resolve(cur_b, prev_b)
        flat_next = nxt_b.reshape(-1)
        V, k = self.vocab_size, self.add_k
        out = self.unigram_probs()[flat_next].copy()
        for t, table in enumerate(self._tables()):
            sel = np.flatnonzero(level == t)
            if len(sel):
                counts = table.lookup(rows[sel], flat_next[sel])
                out[sel] = (counts + k) / (table.totals[rows[sel]] + k * V)
        return out.reshape(cur_b.shape)

    def surprisal(self, current: Any, next_tokens: Any) -> Float[np.ndarray, "*queries"] | float:
        """``-log P(next | current)`` in nats (``inf`` where the probability is 0)."""
        with np.errstate(divide="ignore"):
            return -np.log(self.prob(current, next_tokens))

    def next_token_surprisal(self, tokens: Any) -> Float[np.ndarray, "*batch pos_minus_1"]:
        """Surprisal of each actual next token of sequences ``tokens [..., pos]``: element i is
        ``-log P(tokens[..., i + 1] | context at i)``."""
        contexts = self.sequence_contexts(tokens)
        if contexts.shape[-2 if self.order == 3 else -1] < 2:
            raise TokenError("sequences need at least 2 tokens to have a next token")
        if self.order == 2:
            return self.surprisal(contexts[..., :-1], contexts[..., 1:])
        return self.surprisal(contexts[..., :-1, :], contexts[..., 1:, 1])

    def distribution(self, current: Any) -> Float[np.ndarray, " vocab"]:
        """The full distribution ``P(. | current)`` of one context as a float64 vector."""
        cur, prev = self._context_arrays(current, "current")
        if cur.size != 1:
            raise TokenError("distribution() takes one context; use target_rows for many")
        return self._target_rows_for(cur.reshape(1), None if prev is None else prev.reshape(1)).dense()[0]

    def _row_entropies(self, table_index: int) -> np.ndarray:
        """Entropy (nats) of every stored row of one table, add-k smoothing included."""
        key = f"entropy{table_index}"
        if key not in self._cache:
            table = self._tables()[table_index]
            V, k = self.vocab_size, self.add_k
            if table.nnz == 0:
                self._cache[key] = np.zeros(0)
            else:
                denom = np.repeat(table.totals + k * V, np.diff(table.indptr))
                p = (table.counts + k) / denom
                h = -np.add.reduceat(p * np.log(p), table.indptr[:-1])
                if k > 0:
                    q = k / (table.totals + k * V)
                    h -= (V - np.diff(table.indptr)) * q * np.log(q)
                self._cache[key] = h
        return self._cache[key]

    def entropy(self, current: Any) -> Float[np.ndarray, "*queries"] | float:
        """Entropy in nats of ``P(. | current)`` for each context (backoff included)."""
        cur, prev = self._context_arrays(current, "current")
        level, rows = self._resolve(cur, prev)
        p = self.unigram_probs()
        nz = p[p > 0]
        out = np.full(level.shape, float(-(nz * np.log(nz)).sum()))
        for t in range(len(self._tables())):
            sel = np.flatnonzero(level == t)
            out[sel] = self._row_entropies(t)[rows[sel]]
        return out.reshape(cur.shape)

    def top_k(self, current: Any, k: int = 10, tokenizer=None) -> pd.DataFrame:
        """The ``k`` most likely continuations of one context, as a DataFrame with columns
        ``next_token``, ``probability``, ``count`` (count behind the probability), ``source``
        (``"trigram"``, ``"bigram"``, ``"unigram"`` or ``"uniform"``) and, given a tokenizer, ``text``."""
        cur, prev = self._context_arrays(current, "current")
        if cur.size != 1:
            raise TokenError("top_k() takes one context")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise StatsError(f"k must be a positive integer, got {k!r}")
        level, rows = self._resolve(cur.reshape(1), None if prev is None else prev.reshape(1))
        if level[0] >= 0:
            table = self._tables()[level[0]]
            lo, hi = table.indptr[rows[0]], table.indptr[rows[0] + 1]
            ids, counts = table.next_ids[lo:hi].astype(np.int64), table.counts[lo:hi]
            source = "trigram" if level[0] == 1 else "bigram"
        else:
            ids = np.flatnonzero(self.unigram_counts)
            counts = self.unigram_counts[ids]
            source = "unigram" if len(ids) else "uniform"
            if not len(ids):
                ids, counts = np.arange(self.vocab_size), np.zeros(self.vocab_size, np.int64)
        order = np.lexsort((ids, -counts))[: int(k)]  # ties: smaller id first
        ids, counts = ids[order], counts[order]
        if prev is None:
            context = np.full(len(ids), int(cur.reshape(-1)[0]))
        else:
            context = np.tile([int(prev.reshape(-1)[0]), int(cur.reshape(-1)[0])], (len(ids), 1))
        probs = self.prob(context, ids)
        frame = pd.DataFrame({"next_token": ids, "probability": probs, "count": counts, "source": source})
        if tokenizer is not None:
            frame["text"] = [tokenizer.decode([int(i)]) for i in ids]
        return frame

    # ---------------------------------------------------------------- targets and loss

    def target_rows(self, tokens: Any) -> TargetRows:
        """Sparse targets ``P(. | context)`` of every position of sequences ``tokens [..., pos]``
        (context = current token; with order 3 also the previous one, START at position 0)."""
        contexts = self.sequence_contexts(tokens)
        if self.order == 2:
            return self._target_rows_for(contexts, None)
        return self._target_rows_for(contexts[..., 1], contexts[..., 0])

    def _target_rows_for(self, cur: np.ndarray, prev: np.ndarray | None) -> TargetRows:
        level, rows = self._resolve(cur, prev)
        V, k = self.vocab_size, self.add_k
        n = len(level)
        scale = np.zeros(n)
        const = np.zeros(n)
        for t, table in enumerate(self._tables()):
            sel = np.flatnonzero(level == t)
            denom = table.totals[rows[sel]] + k * V
            scale[sel] = 1.0 / denom
            const[sel] = k / denom
        return TargetRows(
            shape=tuple(cur.shape),
            vocab_size=V,
            tables=self._tables(),
            table_index=level,
            row=rows,
            scale=scale,
            const=const,
            backoff=(level < 0).astype(np.float64),
            dense_probs=self.unigram_probs(),
        )

    def dense_targets(self, tokens: Any) -> Float[np.ndarray, "*batch pos vocab"]:
        """Dense float64 targets ``[..., pos, V]`` (tests and small cases only; see TargetRows.dense)."""
        return self.target_rows(tokens).dense()

    def soft_cross_entropy(
        self,
        logits: Float[torch.Tensor, "*batch pos vocab_padded"],
        current_tokens: Integer[torch.Tensor, "*batch pos"] | Integer[np.ndarray, "*batch pos"],
        *,
        reduction: str = "mean",
        chunk_bytes: int | None = None,
    ) -> torch.Tensor:
        """``-sum_j P(j | context) log_softmax(logits[..., :V])_j`` averaged over positions
        (``reduction="mean"``), summed (``"sum"``) or per position (``"none"``). Logits at
        position i are scored against the distribution after ``current_tokens[..., i]``; logits
        wider than V (padded unembedding) are truncated to V. Differentiable in ``logits``; works
        on any device; ``chunk_bytes`` bounds the logits handled at once (default 32 MB), so the
        memory beyond the logits (and their gradient) stays about twice that."""
        if not isinstance(logits, torch.Tensor) or not torch.is_floating_point(logits):
            raise StatsError("logits must be a floating-point torch tensor [batch, pos, vocab]")
        if reduction not in ("mean", "sum", "none"):
            raise StatsError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        tokens = _as_int_array(current_tokens, "current_tokens")
        if tuple(logits.shape[:-1]) != tuple(tokens.shape):
            raise StatsError(
                f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}; logits must "
                "be [batch, pos, vocab] for tokens [batch, pos]"
            )
        if logits.shape[-1] < self.vocab_size:
            raise StatsError(
                f"logits have {logits.shape[-1]} classes but the stats vocabulary has {self.vocab_size}; "
                "use stats counted with this model's tokenizer"
            )
        rows = self.target_rows(tokens)
        if chunk_bytes is None:
            chunk_bytes = _LOSS_CHUNK_BYTES
        logits2d = logits.reshape(-1, logits.shape[-1])
        if not logits2d.is_contiguous():
            logits2d = logits2d.contiguous()
        per_position = _SparseSoftCrossEntropy.apply(logits2d, rows, int(chunk_bytes))
        if reduction == "mean":
            return per_position.mean()
        if reduction == "sum":
            return per_position.sum()
        return per_position.reshape(tokens.shape)

    # ---------------------------------------------------------------- save / load

    def save(self, path: str | os.PathLike, tokenizer=None) -> Path:
        """Write a compressed ``.npz`` (via a temp file + rename) with the vocab size, order,
        add-k and the tokenizer's fingerprint (when a tokenizer is given or already known)."""
        from bigram_circuits.data import tokenizer_fingerprint

        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
            fingerprint = tokenizer_fingerprint(tokenizer)
        else:
            fingerprint = self.tokenizer_fingerprint or ""
        arrays = {
            "format_version": np.array(STATS_FORMAT_VERSION),
            "vocab_size": np.array(self.vocab_size),
            "order": np.array(self.order),
            "add_k": np.array(self.add_k),
            "n_sequences": np.array(self.n_sequences),
            "tokenizer_fingerprint": np.array(fingerprint),
            "unigram_counts": self.unigram_counts,
        }
        for name, table in (("bigram", self.bigram), ("trigram", self.trigram)):
            if table is not None:
                arrays.update(
                    {
                        f"{name}_contexts": table.contexts,
                        f"{name}_indptr": table.indptr,
                        f"{name}_next_ids": table.next_ids,
                        f"{name}_counts": table.counts,
                    }
                )
        path = Path(path)
        with atomic_write(path) as handle:
            np.savez_compressed(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer=None, vocab_size: int | None = None) -> BigramStats:
        """Read stats written by :meth:`save`; StatsError if the file is missing, corrupt, or
        does not match ``tokenizer`` (size and fingerprint) or ``vocab_size``."""
        path = Path(path)
        if not path.is_file():
            raise StatsError(f"no stats file at {path}; create one with BigramStats.from_tokens(...).save(path)")
        try:
            npz = np.load(path, allow_pickle=False)  # never unpickles: no code runs on load
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise StatsError(f"{path} is a single .npy array, not an n-gram stats file; count again")
            with npz:
                data = {name: npz[name] for name in npz.files}
            stats = cls._from_arrays(data)
        except StatsError:
            raise
        except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
            raise StatsError(
                f"{path} is not a valid n-gram stats file ({type(exc).__name__}); delete it and count again"
            ) from None
        if vocab_size is not None and int(vocab_size) != stats.vocab_size:
            raise StatsError(
                f"{path} holds stats of vocab_size {stats.vocab_size}, expected {vocab_size}; count the "
                "corpus with this model's tokenizer"
            )
        if tokenizer is not None:
            stats.check_tokenizer(tokenizer)
        return stats

    @classmethod
    def _from_arrays(cls, data: dict[str, np.ndarray]) -> BigramStats:
        version = int(data["format_version"])
        if version != STATS_FORMAT_VERSION:
            raise StatsError(
                f"stats file format {version} is not supported (expected {STATS_FORMAT_VERSION}); count again"
            )
        V = _check_vocab_size(int(data["vocab_size"]))
        order = cls._check_order(int(data["order"]), V)
        tables = {}
        for name in ("bigram", "trigram") if order == 3 else ("bigram",):
            table = CountTable(
                data[f"{name}_contexts"].astype(np.int64),
                data[f"{name}_indptr"].astype(np.int64),
                data[f"{name}_next_ids"].astype(np.int32),
                data[f"{name}_counts"].astype(np.int64),
            )
            n_ctx_ids = (V + 1) ** (order - 1 if name == "trigram" else 1)
            ok = (
                len(table.indptr) == len(table.contexts) + 1
                and table.indptr[0] == 0
                and table.indptr[-1] == table.nnz
                and len(table.counts) == table.nnz
                and np.all(np.diff(table.indptr) > 0)
                and np.all(np.diff(table.contexts) > 0)
                and (table.nnz == 0 or (table.next_ids.min() >= 0 and table.next_ids.max() < V))
                and (len(table.contexts) == 0 or (table.contexts[0] >= 0 and table.contexts[-1] < n_ctx_ids))
                and (table.nnz == 0 or table.counts.min() > 0)
            )
            if not ok:
                raise StatsError(f"the stats file's {name} table is inconsistent; delete the file and count again")
            tables[name] = table
        unigram = data["unigram_counts"].astype(np.int64)
        if unigram.shape != (V,):
            raise StatsError(
                f"the stats file's unigram counts have shape {unigram.shape}, not ({V},); delete it and count again"
            )
        fingerprint = str(data["tokenizer_fingerprint"]) or None
        return cls(
            V,
            order,
            cls._check_add_k(float(data["add_k"])),
            unigram,
            tables["bigram"],
            tables.get("trigram"),
            int(data["n_sequences"]),
            fingerprint,
        )
