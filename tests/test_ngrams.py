"""N-gram statistics: counts, backoff probabilities and the sparse soft cross-entropy, each
checked against a naive pure-Python reference."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from bigram_circuits import data
from bigram_circuits.errors import StatsError, TokenError
from bigram_circuits.ngrams import BigramStats, CountTable, counting
from bigram_circuits.ngrams.loss import _chunk_plan

# ------------------------------------------------------------------------------ naive reference


def naive_counts(sequences, vocab_size: int, order: int) -> dict[tuple, Counter]:
    """context tuple -> Counter of next tokens; contexts start as START (= vocab_size)."""
    counts: dict[tuple, Counter] = defaultdict(Counter)
    for seq in sequences:
        context = [vocab_size] * (order - 1)
        for token in seq:
            counts[tuple(context)][int(token)] += 1
            context = (context + [int(token)])[1:]
    return counts


class NaiveModel:
    """The documented backoff chain, one probability at a time."""

    def __init__(self, sequences, vocab_size: int, order: int = 2, add_k: float = 0.0):
        self.V, self.order, self.k = vocab_size, order, add_k
        self.levels = {n: naive_counts(sequences, vocab_size, n) for n in range(2, order + 1)}
        self.unigram = Counter(int(t) for seq in sequences for t in seq)

    def prob(self, context: tuple, token: int) -> float:
        V, k = self.V, self.k
        for n in range(self.order, 1, -1):
            row = self.levels[n].get(tuple(context[-(n - 1) :]))
            if row:
                return (row[token] + k) / (sum(row.values()) + k * V)
        total = sum(self.unigram.values())
        if total + k * V == 0:
            return 1.0 / V
        return (self.unigram[token] + k) / (total + k * V)

    def dense(self, context: tuple) -> np.ndarray:
        return np.array([self.prob(context, j) for j in range(self.V)])


def random_windows(rng, n_seq: int, seq_len: int, vocab_size: int, skew: float = 1.5) -> np.ndarray:
    """Zipf-ish random windows that leave some tokens unseen."""
    weights = 1.0 / (np.arange(vocab_size) + 1.0) ** skew
    weights[-3:] = 0  # the last 3 ids never occur: unseen contexts and unseen tokens
    return rng.choice(vocab_size, size=(n_seq, seq_len), p=weights / weights.sum())


def assert_counts_equal(stats: BigramStats, reference: dict[tuple, Counter]) -> None:
    matrix = stats.counts_matrix().tocoo()
    got = Counter({((int(r),), int(c)): int(v) for r, c, v in zip(matrix.row, matrix.col, matrix.data)})
    want = Counter({(ctx, tok): n for ctx, row in reference.items() for tok, n in row.items()})
    assert got == want


class FakeTokenizer:
    """Just enough of a tokenizer for fingerprints, sizes and decoding."""

    def __init__(self, vocab_size: int, salt: str = ""):
        self.vocab = {f"{salt}tok{i}": i for i in range(vocab_size)}

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    windows = random_windows(rng, 60, 24, 41)
    return windows, 41


# ------------------------------------------------------------------------------ counting


def test_counts_match_naive_reference(corpus):
    windows, V = corpus
    stats = BigramStats.from_tokens(windows, V, show_progress=False)
    assert_counts_equal(stats, naive_counts(windows, V, 2))
    np.testing.assert_array_equal(stats.unigram_counts, np.bincount(windows.ravel(), minlength=V))
    assert stats.n_tokens == windows.size and stats.n_sequences == len(windows)
    assert stats.start_id == V
    # START row holds exactly the first tokens of the sequences.
    start_row = stats.counts_matrix()[V].toarray().ravel()
    np.testing.assert_array_equal(start_row, np.bincount(windows[:, 0], minlength=V))


def test_input_forms_and_streaming_chunks_agree(corpus):
    windows, V = corpus
    whole = BigramStats.from_tokens(windows, V, show_progress=False)
    chunked = BigramStats.from_tokens(windows, V, chunk_tokens=50, show_progress=False)
    streamed = BigramStats.from_tokens(iter(np.array_split(windows, 7)), V, show_progress=False)
    as_tensor = BigramStats.from_tokens(torch.from_numpy(windows), V, show_progress=False)
    as_rows = BigramStats.from_tokens([row for row in windows], V, show_progress=False)
    as_uint16 = BigramStats.from_tokens(windows.astype(np.uint16), V, show_progress=False)
    for other in (chunked, streamed, as_tensor, as_rows, as_uint16):
        assert_counts_equal(other, naive_counts(windows, V, 2))
        assert other.n_sequences == whole.n_sequences

    # One long 1-D sequence, counted in pieces that carry the previous token across chunks.
    sequence = windows.ravel()
    for order in (2, 3):
        one = BigramStats.from_tokens(sequence, V, order=order, show_progress=False)
        pieces = BigramStats.from_tokens(sequence, V, order=order, chunk_tokens=13, show_progress=False)
        as_list = BigramStats.from_tokens(sequence.tolist(), V, order=order, show_progress=False)
        for other in (pieces, as_list):
            assert other.n_sequences == 1
            np.testing.assert_array_equal(other.bigram.keys(V), one.bigram.keys(V))
            np.testing.assert_array_equal(other.bigram.counts, one.bigram.counts)
            if order == 3:
                np.testing.assert_array_equal(other.trigram.keys(V), one.trigram.keys(V))
                np.testing.assert_array_equal(other.trigram.counts, one.trigram.counts)
    assert_counts_equal(
        BigramStats.from_tokens(sequence, V, chunk_tokens=13, show_progress=False), naive_counts([sequence], V, 2)
    )


def assert_tables_equal(got: BigramStats, want: BigramStats) -> None:
    for name in ("bigram", "trigram"):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None
            continue
        for field in ("contexts", "indptr", "next_ids", "counts"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(got.unigram_counts, want.unigram_counts)
    assert got.n_sequences == want.n_sequences


@pytest.mark.parametrize("order", [2, 3])
def test_threaded_counting_matches_one_thread(corpus, monkeypatch, order):
    windows, V = corpus
    monkeypatch.setattr(counting, "_MIN_THREADED_KEYS", 16)  # small data through the threaded path
    serial = BigramStats.from_tokens(windows, V, order=order, n_threads=1, show_progress=False)
    for n_threads in (2, 5):
        threaded = BigramStats.from_tokens(
            windows, V, order=order, n_threads=n_threads, chunk_tokens=300, show_progress=False
        )
        assert_tables_equal(threaded, serial)
    constant = np.full((4, 30), 7)  # one distinct key: the key ranges collapse
    assert_tables_equal(
        BigramStats.from_tokens(constant, V, order=order, n_threads=4, show_progress=False),
        BigramStats.from_tokens(constant, V, order=order, n_threads=1, show_progress=False),
    )


def test_token_dataset_is_counted_as_windows(corpus):
    windows, V = corpus
    dataset = data.TokenDataset(tokens=windows.ravel().astype(np.uint16), vocab_size=V, eos_token_id=0)
    stats = BigramStats.from_tokens(dataset, V, seq_len=24, show_progress=False)
    assert_counts_equal(stats, naive_counts(windows, V, 2))
    with pytest.raises(StatsError, match="vocab_size"):
        BigramStats.from_tokens(dataset, V + 1, show_progress=False)


@pytest.mark.parametrize("order", [2, 3])
def test_shards_merge_to_the_whole(corpus, order):
    windows, V = corpus
    whole = BigramStats.from_tokens(windows, V, order=order, show_progress=False)
    a = BigramStats.from_tokens(windows[:25], V, order=order, show_progress=False)
    b = BigramStats.from_tokens(windows[25:], V, order=order, show_progress=False)
    assert_tables_equal(a + b, whole)
    with pytest.raises(StatsError, match="vocab_size"):
        a.merge(BigramStats.from_tokens(windows, V + 5, order=order, show_progress=False))
    with pytest.raises(StatsError, match="add_k"):
        a.merge(b.with_add_k(1.0))


@pytest.mark.parametrize("vocab_size", [70_000, 250_000])
def test_large_vocabularies_use_wide_keys(vocab_size):
    rng = np.random.default_rng(1)
    windows = rng.integers(0, vocab_size, size=(30, 16))
    windows[:, 3] = vocab_size - 1  # the largest id, next to START-sized keys
    stats = BigramStats.from_tokens(windows, vocab_size, show_progress=False)
    assert_counts_equal(stats, naive_counts(windows, vocab_size, 2))
    tri = BigramStats.from_tokens(windows, vocab_size, order=3, show_progress=False)
    naive = NaiveModel(windows, vocab_size, order=3)
    ctx, nxt = (int(windows[0, 3]), int(windows[0, 4])), int(windows[0, 5])
    assert tri.prob(np.array(ctx), nxt) == pytest.approx(naive.prob(ctx, nxt))


# ------------------------------------------------------------------------------ distributions


@pytest.mark.parametrize("add_k", [0.0, 0.5])
def test_probabilities_and_backoff_match_naive(corpus, add_k):
    windows, V = corpus
    stats = BigramStats.from_tokens(windows, V, add_k=add_k, show_progress=False)
    naive = NaiveModel(windows, V, add_k=add_k)
    contexts = np.arange(V + 1)  # every token, unseen ones and START included
    dense = stats.target_rows(np.arange(V)).dense()
    for c in contexts:
        want = naive.dense((int(c),))
        np.testing.assert_allclose(stats.distribution(int(c)), want, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(stats.prob(np.full(V, c), np.arange(V)), want, rtol=1e-12, atol=1e-15)
        if c < V:
            np.testing.assert_allclose(dense[c], want, rtol=1e-12, atol=1e-15)
        assert stats.distribution(int(c)).sum() == pytest.approx(1.0, abs=1e-12)
    unseen = V - 1  # never occurs: backs off to the unigram distribution
    np.testing.assert_allclose(stats.distribution(unseen), stats.unigram_probs())
    if add_k == 0:
        assert stats.prob(unseen, unseen) == 0.0 and stats.surprisal(unseen, unseen) == math.inf


def test_nothing_counted_is_uniform():
    V = 7
    empty = BigramStats(V, 2, 0.0, np.zeros(V, np.int64), CountTable.empty())
    np.testing.assert_allclose(empty.distribution(3), np.full(V, 1 / V))
    assert empty.entropy(3) == pytest.approx(math.log(V))
    logits = torch.randn(1, 4, V, dtype=torch.float64)
    want = -torch.log_softmax(logits, -1).mean(-1).mean()
    assert float(empty.soft_cross_entropy(logits, np.array([[0, 1, 2, 3]]))) == pytest.approx(float(want))


def test_trigram_backs_off_to_bigram_then_unigram(corpus):
    windows, V = corpus
    stats = BigramStats.from_tokens(windows, V, order=3, show_progress=False)
    naive = NaiveModel(windows, V, order=3)
    seen_pair = (int(windows[2, 5]), int(windows[2, 6]))
    rng = np.random.default_rng(3)
    pairs = [seen_pair, (V, int(windows[0, 0])), (V, V), (V - 1, int(windows[0, 0])), (V - 2, V - 1)]
    pairs += [tuple(int(x) for x in rng.integers(0, V, 2)) for _ in range(20)]
    for pair in pairs:
        np.testing.assert_allclose(stats.distribution(np.array(pair)), naive.dense(pair), rtol=1e-12, atol=1e-15)
    # Sequence contexts: (START, t0) at position 0, then (t_{i-1}, t_i).
    contexts = stats.sequence_contexts(windows[:2])
    assert tuple(contexts[0, 0]) == (V, windows[0, 0]) and tuple(contexts[1, 3]) == (windows[1, 2], windows[1, 3])
    with pytest.raises(TokenError, match="pairs"):
        stats.prob(np.array([1, 2, 3]), np.array([1, 2, 3]))


def test_surprisal_entropy_and_top_k(corpus):
    windows, V = corpus
    stats = BigramStats.from_tokens(windows, V, show_progress=False)
    naive = NaiveModel(windows, V)
    held_out = random_windows(np.random.default_rng(9), 3, 10, V)
    got = stats.next_token_surprisal(held_out)
    assert got.shape == (3, 9)
    for b in range(3):
        for i in range(9):
            p = naive.prob((int(held_out[b, i]),), int(held_out[b, i + 1]))
            assert got[b, i] == (math.inf if p == 0 else pytest.approx(-math.log(p)))
    for c in (0, 5, V - 1, V):
        p = naive.dense((c,))
        nz = p[p > 0]
        assert stats.entropy(c) == pytest.approx(float(-(nz * np.log(nz)).sum()))
    smoothed = stats.with_add_k(0.3)
    p = NaiveModel(windows, V, add_k=0.3).dense((0,))
    assert smoothed.entropy(0) == pytest.approx(float(-(p * np.log(p)).sum()))
    np.testing.assert_allclose(
        stats.entropy(np.array([[0, 5], [V - 1, V]])),
        [[stats.entropy(0), stats.entropy(5)], [stats.entropy(V - 1), stats.entropy(V)]],
    )

    top = stats.top_k(0, k=5, tokenizer=FakeTokenizer(V))
    assert list(top.columns) == ["next_token", "probability", "count", "source", "text"]
    assert len(top) <= 5 and top["source"].eq("bigram").all()
    assert top["probability"].is_monotonic_decreasing
    dist = stats.distribution(0)
    assert top["probability"].iloc[0] == pytest.approx(dist.max())
    np.testing.assert_allclose(top["probability"], dist[top["next_token"]])
    assert top["text"].iloc[0] == f"<{top['next_token'].iloc[0]}>"
    assert stats.top_k(V - 1, k=3)["source"].eq("unigram").all()
    tri = BigramStats.from_tokens(windows, V, order=3, show_progress=False)
    assert tri.top_k(np.array([V, int(windows[0, 0])]), k=3)["source"].eq("trigram").all()


# ------------------------------------------------------------------------------ soft cross-entropy


def dense_reference(stats: BigramStats, logits: torch.Tensor, tokens) -> torch.Tensor:
    target = torch.from_numpy(stats.dense_targets(tokens))
    logp = torch.log_softmax(logits[..., : stats.vocab_size].double(), dim=-1)
    return -(target * logp).sum(-1)


@pytest.mark.parametrize("order,add_k", [(2, 0.0), (2, 0.25), (3, 0.0)])
def test_soft_cross_entropy_matches_dense(corpus, order, add_k):
    windows, V = corpus
    stats = BigramStats.from_tokens(windows, V, order=order, add_k=add_k, show_progress=False)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, V, size=(3, 17))
    tokens[0, :4] = V - 1  # unseen contexts: unigram backoff
    logits = torch.randn(3, 17, V + 6, dtype=torch.float64, requires_grad=True)  # padded unembedding
    for chunk_bytes in (None, 3 * (V + 6) * 4):  # one chunk, and many chunks of 3 rows
        loss = stats.soft_cross_entropy(logits, tokens, chunk_bytes=chunk_bytes)
        (grad,) = torch.autograd.grad(loss, logits)
        reference = dense_reference(stats, logits, tokens).mean()
        (ref_grad,) = torch.autograd.grad(reference, logits)
        assert abs(loss.item() - reference.item()) < 1e-10
        torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-9)
        assert torch.all(grad[..., V:] == 0)
    per_position = stats.soft_cross_entropy(logits, torch.from_numpy(tokens), reduction="none")
    torch.testing.assert_close(per_position, dense_reference(stats, logits, tokens))
    summed = stats.soft_cross_entropy(logits, tokens, reduction="sum")
    assert summed.item() == pytest.approx(per_position.sum().item())


def test_soft_cross_entropy_float32_and_bfloat16(corpus):
    windows, V = corpus
    stats = BigramStats.from_tokens(windows, V, show_progress=False)
    tokens = np.random.default_rng(5).integers(0, V, size=(4, 9))
    logits64 = torch.randn(4, 9, V, dtype=torch.float64) * 3
    reference = float(dense_reference(stats, logits64, tokens).mean())
    logits32 = logits64.float().requires_grad_(True)
    loss32 = stats.soft_cross_entropy(logits32, tokens)
    assert loss32.dtype == torch.float32 and abs(loss32.item() - reference) < 1e-5
    loss32.backward()
    ref_logits = logits64.clone().requires_grad_(True)
    dense_reference(stats, ref_logits, tokens).mean().backward()
    torch.testing.assert_close(logits32.grad.double(), ref_logits.grad, atol=1e-6, rtol=1e-4)
    logits16 = logits64.bfloat16().requires_grad_(True)
    loss16 = stats.soft_cross_entropy(logits16, tokens)
    loss16.backward()
    assert logits16.grad.dtype == torch.bfloat16 and abs(loss16.item() - reference) < 0.05


def test_chunk_plan_bounds_rows_and_entries():
    lengths = np.array([5, 1, 1, 9, 2, 2, 2, 30, 1])
    plan = _chunk_plan(lengths, rows_per_chunk=3, entries_per_chunk=6)
    assert plan[0] == (0, 2) and sum(hi - lo for lo, hi in plan) == len(lengths)
    assert [lo for lo, _ in plan[1:]] == [hi for _, hi in plan[:-1]]
    for lo, hi in plan:
        assert hi - lo <= 3
        assert lengths[lo:hi].sum() <= 6 or hi - lo == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_soft_cross_entropy_on_cuda_matches_cpu(corpus):
    windows, V = corpus
    stats = BigramStats.from_tokens(windows, V, add_k=0.1, show_progress=False)
    tokens = np.random.default_rng(6).integers(0, V, size=(5, 11))
    logits = torch.randn(5, 11, V + 3, dtype=torch.float64)
    cpu = logits.clone().requires_grad_(True)
    gpu = logits.cuda().requires_grad_(True)
    loss_cpu = stats.soft_cross_entropy(cpu, tokens)
    loss_gpu = stats.soft_cross_entropy(gpu, torch.from_numpy(tokens).cuda())
    loss_cpu.backward()
    loss_gpu.backward()
    assert loss_gpu.device.type == "cuda"
    assert loss_gpu.item() == pytest.approx(loss_cpu.item(), abs=1e-10)
    torch.testing.assert_close(gpu.grad.cpu(), cpu.grad)


# ------------------------------------------------------------------------------ save / load


def test_save_load_roundtrip_and_checks(tmp_path, corpus):
    windows, V = corpus
    stats = BigramStats.from_tokens(windows, V, order=3, add_k=0.2, show_progress=False)
    tokenizer = FakeTokenizer(V)
    path = stats.save(tmp_path / "stats.npz", tokenizer=tokenizer)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = BigramStats.load(path, tokenizer=tokenizer, vocab_size=V)
    assert (loaded.vocab_size, loaded.order, loaded.add_k, loaded.n_sequences) == (V, 3, 0.2, stats.n_sequences)
    assert loaded.tokenizer_fingerprint == data.tokenizer_fingerprint(tokenizer)
    for name in ("bigram", "trigram"):
        np.testing.assert_array_equal(getattr(loaded, name).keys(V), getattr(stats, name).keys(V))
        np.testing.assert_array_equal(getattr(loaded, name).counts, getattr(stats, name).counts)
    np.testing.assert_array_equal(loaded.unigram_counts, stats.unigram_counts)

    with pytest.raises(StatsError, match="tokenizer") as err:
        BigramStats.load(path, tokenizer=FakeTokenizer(V, salt="other"))
    assert "\n" not in str(err.value)
    with pytest.raises(StatsError, match="vocab_size"):
        BigramStats.load(path, tokenizer=FakeTokenizer(V + 1))
    with pytest.raises(StatsError, match="expected 99"):
        BigramStats.load(path, vocab_size=99)
    with pytest.raises(StatsError, match="no stats file"):
        BigramStats.load(tmp_path / "missing.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(StatsError, match="not a valid"):
        BigramStats.load(truncated)
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(StatsError, match="not a valid"):
        BigramStats.load(pickled)
    with pytest.raises(StatsError, match="vocab_size"):
        stats.save(tmp_path / "x.npz", tokenizer=FakeTokenizer(V + 2))
    # Well-formed arrays that contradict each other: one line saying to count again, not a bare ValueError.
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    for name, bad, message in (
        ("bigram_counts", np.zeros_like(arrays["bigram_counts"]), "bigram table is inconsistent"),
        ("unigram_counts", arrays["unigram_counts"][:-1], "unigram counts have shape"),
    ):
        edited = tmp_path / f"edited_{name}.npz"
        np.savez(edited, **{**arrays, name: bad})
        with pytest.raises(StatsError, match=message) as err:
            BigramStats.load(edited)
        assert "count again" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.usefixtures("no_runtime_typecheck")
def test_bad_inputs_give_one_line_errors(corpus):
    windows, V = corpus
    stats = BigramStats.from_tokens(windows, V, show_progress=False)
    cases = [
        (TokenError, "out of range", lambda: BigramStats.from_tokens(np.array([[1, V]]), V, show_progress=False)),
        (TokenError, "negative", lambda: BigramStats.from_tokens(np.array([[1, -2]]), V, show_progress=False)),
        (TokenError, "empty", lambda: BigramStats.from_tokens(np.zeros((0, 5), np.int64), V, show_progress=False)),
        (TokenError, "empty", lambda: BigramStats.from_tokens([], V, show_progress=False)),
        (TokenError, "no tokens", lambda: BigramStats.from_tokens(iter([]), V, show_progress=False)),
        (TokenError, "integer", lambda: BigramStats.from_tokens(np.array([[1.0, 2.0]]), V, show_progress=False)),
        (TokenError, "integer", lambda: BigramStats.from_tokens(np.array([True, False]), V, show_progress=False)),
        (TokenError, "text", lambda: BigramStats.from_tokens("some text", V, show_progress=False)),
        (TokenError, "shape", lambda: BigramStats.from_tokens(np.zeros((2, 2, 2), np.int64), V, show_progress=False)),
        (StatsError, "vocab_size", lambda: BigramStats.from_tokens(windows, 0, show_progress=False)),
        (StatsError, "order", lambda: BigramStats.from_tokens(windows, V, order=4, show_progress=False)),
        (StatsError, "add_k", lambda: BigramStats.from_tokens(windows, V, add_k=-1, show_progress=False)),
        (StatsError, "classes", lambda: stats.soft_cross_entropy(torch.zeros(1, 2, V - 1), np.array([[1, 2]]))),
        (StatsError, "do not match", lambda: stats.soft_cross_entropy(torch.zeros(1, 3, V), np.array([[1, 2]]))),
        (
            StatsError,
            "floating",
            lambda: stats.soft_cross_entropy(torch.zeros(1, 2, V, dtype=torch.long), np.array([[1, 2]])),
        ),
        (TokenError, "out of range", lambda: stats.soft_cross_entropy(torch.zeros(1, 2, V), np.array([[1, V]]))),
        (TokenError, "integer", lambda: stats.soft_cross_entropy(torch.zeros(1, 2, V), torch.zeros(1, 2))),
        (TokenError, "out of range", lambda: stats.prob(V + 1, 0)),
        (TokenError, "out of range", lambda: stats.prob(0, V)),
        (TokenError, "at least 2", lambda: stats.next_token_surprisal(np.array([[3]]))),
        (StatsError, "dense target", lambda: stats.target_rows(np.zeros((10, 10), np.int64)).dense(max_elements=100)),
    ]
    for error, pattern, call in cases:
        with pytest.raises(error, match=pattern) as info:
            call()
        assert "\n" not in str(info.value), pattern


# ------------------------------------------------------------------------------ real corpus


@pytest.fixture(scope="module")
def real_tokens(tmp_path_factory):
    """A slice of the State of the Union corpus, tokenized with a tokenizer trained on it."""
    from bigram_circuits.training import train_tokenizer

    try:
        documents = data.load_documents("sotu")[:12]
    except Exception as exc:
        pytest.skip(f"sotu corpus unavailable: {exc}")
    tokenizer = train_tokenizer(documents, 400, tmp_path_factory.mktemp("sotu_tok"))
    return data.tokenize_documents(documents, tokenizer, show_progress=False), tokenizer


def test_real_corpus_counts_probabilities_and_loss(real_tokens, tmp_path):
    dataset, tokenizer = real_tokens
    V = len(tokenizer)
    windows = np.asarray(dataset.windows(64))
    stats = BigramStats.from_tokens(dataset, V, seq_len=64, show_progress=False)
    assert_counts_equal(stats, naive_counts(windows, V, 2))
    naive = NaiveModel(windows, V)
    the = tokenizer.encode(" the")[0]
    np.testing.assert_allclose(stats.distribution(the), naive.dense((the,)), rtol=1e-12, atol=1e-15)
    top = stats.top_k(the, k=5, tokenizer=tokenizer)
    assert top["probability"].iloc[0] == pytest.approx(naive.dense((the,)).max())
    batch = windows[:4]
    logits = torch.randn(4, 64, V, dtype=torch.float64)
    assert float(stats.soft_cross_entropy(logits, batch)) == pytest.approx(
        float(dense_reference(stats, logits, batch).mean()), abs=1e-10
    )
    path = stats.save(tmp_path / "sotu.npz", tokenizer=tokenizer)
    assert BigramStats.load(path, tokenizer=tokenizer).n_tokens == stats.n_tokens
