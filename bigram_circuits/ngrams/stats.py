"""BigramStats: the n-gram counts of a corpus, their backoff distributions, the soft-target
loss against them, permuted controls and the stats file.

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
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Integer

from bigram_circuits.data import tokenizer_fingerprint
from bigram_circuits.errors import StatsError, TokenError
from bigram_circuits.io import atomic_write
from bigram_circuits.ngrams.counting import (
    DEFAULT_CHUNK_TOKENS,
    CountTable,
    NgramCounter,
    as_int_array,
    check_range,
    check_vocab_size,
    token_blocks,
)
from bigram_circuits.ngrams.loss import TargetRows, sparse_soft_cross_entropy

__all__ = ["PERMUTATION_VARIANTS", "STATS_FORMAT_VERSION", "BigramStats"]

STATS_FORMAT_VERSION = 1
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
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
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

        vocab_size = check_vocab_size(vocab_size)
        order = cls._check_order(order, vocab_size)
        add_k = cls._check_add_k(add_k)
        if n_threads is None:
            n_threads = min(8, os.cpu_count() or 1)
        counter = NgramCounter(vocab_size, order, chunk_tokens, max(1, int(n_threads)))
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
            for block in token_blocks(tokens, vocab_size, seq_len):
                counter.add(block, progress)
        if counter.n_tokens == 0:
            raise TokenError("no tokens to count; pass a non-empty token array or dataset")
        return cls.from_counter(counter, add_k)

    @classmethod
    def from_counter(cls, counter: NgramCounter, add_k: float = 0.0) -> BigramStats:
        """The statistics of what ``counter`` has counted (its vocabulary size and order)."""
        vocab_size = counter.vocab_size
        bigram = CountTable.from_keys(*counter.bigram.result(), vocab_size, vocab_size + 1)
        # Every counted token is the next token of exactly one bigram (START included).
        unigram = np.rint(np.bincount(bigram.next_ids, weights=bigram.counts, minlength=vocab_size)).astype(np.int64)
        trigram = None
        if counter.trigram is not None:
            trigram = CountTable.from_keys(*counter.trigram.result(), vocab_size, (vocab_size + 1) ** 2)
        return cls(vocab_size, counter.order, add_k, unigram, bigram, trigram, counter.n_sequences)

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
        arr = as_int_array(current, what)
        hint = f"contexts of vocab_size {self.vocab_size} (START = {self.start_id})"
        check_range(arr, self.vocab_size + 1, what, hint)
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
        arr = as_int_array(tokens, "tokens")
        check_range(arr, self.vocab_size, "tokens", f"vocab_size {self.vocab_size}")
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
        nxt = as_int_array(next_tokens, "next_tokens")
        check_range(nxt, self.vocab_size, "next_tokens", f"vocab_size {self.vocab_size}")
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
        tokens = as_int_array(current_tokens, "current_tokens")
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
        logits2d = logits.reshape(-1, logits.shape[-1])
        if not logits2d.is_contiguous():
            logits2d = logits2d.contiguous()
        per_position = sparse_soft_cross_entropy(logits2d, rows, chunk_bytes)
        if reduction == "mean":
            return per_position.mean()
        if reduction == "sum":
            return per_position.sum()
        return per_position.reshape(tokens.shape)

    # ---------------------------------------------------------------- save / load

    def save(self, path: str | os.PathLike, tokenizer=None) -> Path:
        """Write a compressed ``.npz`` (via a temp file + rename) with the vocab size, order,
        add-k and the tokenizer's fingerprint (when a tokenizer is given or already known)."""
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
        V = check_vocab_size(int(data["vocab_size"]))
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
