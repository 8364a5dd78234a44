"""Benchmark of bigram_circuits.ngrams: counting throughput and the sparse soft cross-entropy
against the dense (batch, pos, vocab) target of the paper's code.

    python benchmarks/bench_ngrams.py                      # CPU, writes benchmarks/results/bench_ngrams.json
    python benchmarks/bench_ngrams.py --device cuda --out /tmp/gpu.json

Data: i.i.d. Zipfian tokens (exponent 1.0, ids shuffled) at vocab 50,277 in 128-token
sequences. Independent tokens make every frequent context's row as wide as the unigram, so the
sparse rows are far denser than in real text: a pessimistic case for the sparse loss.

Memory: on CPU each variant runs once in a fresh subprocess that first loads the stats and
allocates the logits; "peak_extra_mb" is the process's peak RSS (ru_maxrss) after the variant
minus its RSS just before it, i.e. everything the variant allocated at its peak (targets,
log-softmax temporaries, the gradient when backward runs). On CUDA it is
torch.cuda.max_memory_allocated() minus the memory allocated before the variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.ngrams import BigramStats

VOCAB = 50_277
PADDED_VOCAB = 50_304  # Pythia pads its unembedding to a multiple of 128
BATCH, SEQ = 32, 128


def zipf_tokens(n_tokens: int, vocab: int, seed: int, exponent: float = 1.0) -> np.ndarray:
    """``n_tokens`` i.i.d. Zipfian token ids (uint16 when they fit), shuffled id order."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / (np.arange(vocab) + 2.7) ** exponent
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(n_tokens) * cdf[-1], side="right")
    ids = rng.permutation(vocab)[np.minimum(ranks, vocab - 1)]
    return ids.astype(np.uint16 if vocab <= 65536 else np.uint32)


def naive_dict_count(windows: np.ndarray, vocab: int) -> float:
    """Tokens per second of a dict-of-Counters count, as in the paper's code."""
    start = time.perf_counter()
    counts: dict = defaultdict(Counter)
    for row in windows.tolist():
        previous = vocab
        for token in row:
            counts[previous][token] += 1
            previous = token
    return windows.size / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def sparse_loss(stats: BigramStats, logits: torch.Tensor, tokens: torch.Tensor, backward: bool) -> float:
    loss = stats.soft_cross_entropy(logits, tokens)
    if backward:
        loss.backward()
        logits.grad = None
    return loss.detach().item()


def dense_loss(stats: BigramStats, logits: torch.Tensor, tokens: torch.Tensor, backward: bool) -> float:
    """The paper's construction: a dense float64 (batch, pos, vocab) target, then
    -(target * log_softmax(logits[..., :V])).sum(-1).mean()."""
    target = torch.from_numpy(stats.target_rows(tokens.cpu()).dense(max_elements=1 << 40))
    target = target.to(device=logits.device, dtype=logits.dtype)
    loss = -(target * torch.log_softmax(logits[..., : stats.vocab_size], dim=-1)).sum(-1).mean()
    if backward:
        loss.backward()
        logits.grad = None
    return loss.detach().item()


def _status_bytes(field: str) -> int:
    """A memory field (VmRSS, VmHWM) of /proc/self/status in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child_peak_memory(stats_path: str, variant: str, seed: int) -> dict:
    """Run one loss variant once in this (fresh) process and report its peak extra memory."""
    stats = BigramStats.load(stats_path)
    tokens = torch.from_numpy(zipf_tokens(BATCH * SEQ, VOCAB, seed + 1).astype(np.int64).reshape(BATCH, SEQ))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.empty(BATCH, SEQ, PADDED_VOCAB).normal_(generator=generator).requires_grad_(True)
    backward = variant.endswith("backward")
    fn = sparse_loss if variant.startswith("sparse") else dense_loss
    was_reset = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS")
    setup_slack = _status_bytes("VmHWM") - rss_before
    fn(stats, logits, tokens, backward)
    peak = _status_bytes("VmHWM")
    return {
        "variant": variant,
        "peak_extra_mb": (peak - rss_before) / 2**20,
        "peak_reset_before_call": was_reset,
        # Without a reset, a peak below the setup's own high-water mark cannot be seen.
        "setup_peak_slack_mb": setup_slack / 2**20,
    }


def cuda_peak_memory(stats: BigramStats, variant: str, seed: int, device: str) -> dict:
    tokens = torch.from_numpy(zipf_tokens(BATCH * SEQ, VOCAB, seed + 1).astype(np.int64).reshape(BATCH, SEQ))
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(BATCH, SEQ, PADDED_VOCAB, device=device).normal_(generator=generator)
    logits.requires_grad_(True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn = sparse_loss if variant.startswith("sparse") else dense_loss
    fn(stats, logits, tokens.to(device), variant.endswith("backward"))
    torch.cuda.synchronize()
    return {"variant": variant, "peak_extra_mb": (torch.cuda.max_memory_allocated() - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16_000_000, help="tokens to count (>= 10M for the goal)")
    parser.add_argument("--device", default="cpu", help="device of the loss benchmark (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_ngrams.json")
    parser.add_argument("--child", nargs=2, metavar=("STATS", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_peak_memory(args.child[0], args.child[1], args.seed)))
        return

    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        },
        "data": f"i.i.d. Zipf(1.0) tokens, vocab {VOCAB}, 128-token sequences (pessimistic for sparsity)",
    }

    # ---- counting throughput (single process, numpy)
    windows = zipf_tokens(args.tokens, VOCAB, args.seed).reshape(-1, SEQ)
    n_tokens = windows.size
    one_thread_times = time_call(
        lambda: BigramStats.from_tokens(windows, VOCAB, n_threads=1, show_progress=False), "cpu", args.repeats
    )
    count_times = time_call(lambda: BigramStats.from_tokens(windows, VOCAB, show_progress=False), "cpu", args.repeats)
    stats = BigramStats.from_tokens(windows, VOCAB, show_progress=False)
    naive_rate = naive_dict_count(windows[:2000], VOCAB)
    result["counting"] = {
        "tokens": int(n_tokens),
        "vocab_size": VOCAB,
        "default_threads": min(8, os.cpu_count() or 1),
        "seconds": count_times,
        "tokens_per_s_best": n_tokens / min(count_times),
        "tokens_per_s_median": n_tokens / float(np.median(count_times)),
        "one_thread_seconds": one_thread_times,
        "one_thread_tokens_per_s_median": n_tokens / float(np.median(one_thread_times)),
        "goal_tokens_per_s": 50e6,
        "naive_dict_tokens_per_s": naive_rate,
        "bigram_nnz": stats.bigram.nnz,
        "seen_contexts": stats.n_contexts,
    }
    print(json.dumps(result["counting"], indent=1), flush=True)

    # ---- loss on one 32 x 128 batch
    device = args.device
    tokens = torch.from_numpy(zipf_tokens(BATCH * SEQ, VOCAB, args.seed + 1).astype(np.int64).reshape(BATCH, SEQ))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    logits = torch.empty(BATCH, SEQ, PADDED_VOCAB, device=device).normal_(generator=generator).requires_grad_(True)
    tokens_dev = tokens.to(device)
    rows = stats.target_rows(tokens)
    reps = args.repeats
    timings = {
        "sparse_target_rows": time_call(lambda: stats.target_rows(tokens), "cpu", reps),
        "sparse_forward": time_call(lambda: sparse_loss(stats, logits, tokens_dev, False), device, reps),
        "sparse_forward_backward": time_call(lambda: sparse_loss(stats, logits, tokens_dev, True), device, reps),
        "dense_target": time_call(lambda: stats.target_rows(tokens).dense(max_elements=1 << 40), "cpu", reps),
        "dense_forward": time_call(lambda: dense_loss(stats, logits, tokens_dev, False), device, reps),
        "dense_forward_backward": time_call(lambda: dense_loss(stats, logits, tokens_dev, True), device, reps),
        "log_softmax_only": time_call(lambda: torch.log_softmax(logits.detach()[..., :VOCAB], -1), device, reps),
    }
    sparse_value = sparse_loss(stats, logits, tokens_dev, False)
    dense_value = dense_loss(stats, logits, tokens_dev, False)
    result["loss"] = {
        "batch": [BATCH, SEQ],
        "logits_width": PADDED_VOCAB,
        "logits_dtype": "float32",
        "sparse_entries_in_batch": int(rows.row_lengths().sum()),
        "backed_off_positions": int(rows.backoff.sum()),
        "seconds_median": {name: float(np.median(t)) for name, t in timings.items()},
        "seconds_all": timings,
        "sparse_value": sparse_value,
        "dense_value": dense_value,
        "abs_difference": abs(sparse_value - dense_value),
        "dense_target_bytes": BATCH * SEQ * VOCAB * 8,
        "logits_bytes": BATCH * SEQ * PADDED_VOCAB * 4,
        "goal": {"seconds": 0.05, "memory_mb": 64},
    }

    # ---- peak memory per variant
    variants = ["sparse_forward", "sparse_forward_backward", "dense_forward", "dense_forward_backward"]
    memory = []
    if device.startswith("cuda"):
        for variant in variants:
            memory.append(cuda_peak_memory(stats, variant, args.seed, device))
            torch.cuda.empty_cache()
        method = "torch.cuda.max_memory_allocated() minus memory allocated before the call"
    else:
        del logits
        with tempfile.TemporaryDirectory() as tmp:
            stats_path = str(Path(tmp) / "stats.npz")
            stats.save(stats_path)
            for variant in variants:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", stats_path, variant, "--seed", str(args.seed)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
        method = (
            "fresh subprocess per variant: VmHWM (peak RSS, reset via /proc/self/clear_refs before "
            "the call) minus VmRSS just before the call"
        )
    for entry in memory:  # a backward pass must allocate the gradient: report what comes on top
        if entry["variant"].endswith("backward"):
            entry["peak_extra_beyond_gradient_mb"] = entry["peak_extra_mb"] - BATCH * SEQ * PADDED_VOCAB * 4 / 2**20
    result["loss"]["peak_memory"] = {"method": method, "variants": memory}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(text + "\n")
    os.replace(tmp_out, args.out)
    print(text)


if __name__ == "__main__":
    main()
