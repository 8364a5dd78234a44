"""Sparse soft targets and the soft cross-entropy of model logits against them.

:meth:`~bigram_circuits.ngrams.BigramStats.soft_cross_entropy` computes
``mean_positions( -sum_j P(j | current) log_softmax(logits[..., :V])_j )``
as ``logsumexp(z) - sum_j P(j | c) z_j`` (valid because each ``P(. | c)`` sums to 1): the
second term gathers the logits at the non-zero entries of the sparse rows, plus a unigram
matrix-vector product for backed-off contexts and a row sum for the add-k constant. It runs
in chunks of positions with a custom backward (``softmax - P``), so memory beyond the logits
and their gradient stays a few tens of MB whatever the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Integer

from bigram_circuits.errors import StatsError
from bigram_circuits.ngrams.counting import CountTable

__all__ = ["TargetRows", "sparse_soft_cross_entropy"]

_LOSS_CHUNK_BYTES = 32 << 20  # logits bytes (and sparse entries) the loss handles at once
_DENSE_TARGET_LIMIT = 1 << 28  # elements of a dense target that dense_targets() agrees to build


@dataclass(frozen=True)
class TargetRows:
    """The distributions ``P(. | context)`` of a set of positions, in sparse form.

    For position ``r`` (flattened over ``shape``) and token ``j``::

        P(j) = backoff[r] * dense_probs[j] + const[r] + scale[r] * n_r(j)

    where ``n_r(j)`` is the count of ``j`` in row ``row[r]`` of ``tables[table_index[r]]``
    (``table_index[r] = -1``: no sparse part). ``backoff`` is 1 where the context was unseen
    (unigram backoff, or uniform when nothing was counted) and 0 otherwise; ``const`` is the
    add-k share ``k / (N(c) + kV)`` of a seen row. Build with
    :meth:`~bigram_circuits.ngrams.BigramStats.target_rows`.
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


def sparse_soft_cross_entropy(logits2d: torch.Tensor, rows: TargetRows, chunk_bytes: int | None = None) -> torch.Tensor:
    """Per-position ``logsumexp(z) - sum_j P(j) z_j`` of contiguous ``logits2d [n, width]``
    (columns beyond ``rows.vocab_size`` ignored) against the targets ``rows``; differentiable
    in ``logits2d`` (backward ``softmax - P``). ``chunk_bytes`` bounds the logits handled at
    once (default 32 MB)."""
    if chunk_bytes is None:
        chunk_bytes = _LOSS_CHUNK_BYTES
    return _SparseSoftCrossEntropy.apply(logits2d, rows, int(chunk_bytes))
