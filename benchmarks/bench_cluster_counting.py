"""Bigram counting on a local Dask cluster: 1 vs 2 worker processes, against one process.

    python benchmarks/bench_cluster_counting.py            # writes benchmarks/results/bench_cluster_counting.json
    python benchmarks/bench_cluster_counting.py --tokens 2000000 --out /tmp/b.json

Data: i.i.d. Zipfian tokens (exponent 1.0 over a shuffled vocabulary of 50,277 ids, as
bench_ngrams.py) in 128-token windows, counted (a) as an in-memory uint16 array (the driver
ships each shard's rows to a worker) and (b) as a .npy file that the workers memory-map
themselves (nothing shipped; the layout of a corpus on shared storage). Every cluster result is
checked to equal ``BigramStats.from_tokens`` in one process.

Timing: each cluster is started once (``LocalCluster(n_workers, threads_per_worker=1)``, its
start-up and a warm-up task that imports the package on every worker timed separately) and the
counts are taken with ``address=`` so start-up is not in them, with one shard per worker and
with ``--shards`` shards (every extra shard adds a merge); each measurement is the best of
``--repeats``. The one-process baseline runs ``from_tokens(..., n_threads=1)``. Wall times on a
shared machine depend on what else runs there: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.cluster import count_bigrams_on_cluster
from bigram_circuits.ngrams import BigramStats

VOCAB = 50_277


def zipf_windows(n_tokens: int, seq_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, VOCAB + 1)
    p /= p.sum()
    ids = rng.permutation(VOCAB).astype(np.uint16)
    tokens = ids[rng.choice(VOCAB, size=n_tokens, p=p)]
    n = n_tokens // seq_len
    return tokens[: n * seq_len].reshape(n, seq_len)


def same(a: BigramStats, b: BigramStats) -> bool:
    return (
        a.n_sequences == b.n_sequences
        and np.array_equal(a.unigram_counts, b.unigram_counts)
        and all(
            np.array_equal(getattr(a.bigram, f), getattr(b.bigram, f))
            for f in ("contexts", "indptr", "next_ids", "counts")
        )
    )


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shards", type=int, default=8, help="also timed: one shard per worker")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bench_cluster_counting.json"))
    args = parser.parse_args()
    from dask.distributed import LocalCluster

    load_before = os.getloadavg()
    windows = zipf_windows(args.tokens, args.seq_len)
    n_tokens = int(windows.size)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    token_file = tmp / "tokens.npy"
    np.save(token_file, windows)

    one_s, one_all, reference = best_of(
        args.repeats, lambda: BigramStats.from_tokens(windows, VOCAB, n_threads=1, show_progress=False)
    )
    results: dict = {"one_process": {"wall_s": one_s, "all_s": one_all, "tokens_per_s": n_tokens / one_s}}
    print(f"one process: {one_s:.2f} s ({n_tokens / one_s / 1e6:.1f} M tok/s)", flush=True)

    for n_workers in (1, 2):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        started = time.perf_counter() - start
        with cluster:
            address = cluster.scheduler_address
            start = time.perf_counter()
            count_bigrams_on_cluster(windows[: 4 * n_workers], VOCAB, n_shards=2 * n_workers, address=address)
            warm = time.perf_counter() - start
            entry = {"cluster_start_s": started, "warm_up_s": warm}
            for shards in (n_workers, args.shards):
                for mode, source in (("array", windows), ("file", [token_file])):
                    wall, all_s, stats = best_of(
                        args.repeats,
                        lambda source=source, address=address, shards=shards: count_bigrams_on_cluster(
                            source, VOCAB, n_shards=shards, address=address
                        ),
                    )
                    assert same(stats, reference), f"{n_workers} workers ({mode}) differ from one process"
                    entry[f"{mode}_{shards}_shards"] = {
                        "wall_s": wall,
                        "all_s": all_s,
                        "tokens_per_s": n_tokens / wall,
                        "equal_to_one_process": True,
                    }
                    print(
                        f"{n_workers} worker(s), {mode}, {shards} shards: {wall:.2f} s "
                        f"({n_tokens / wall / 1e6:.1f} M tok/s); start {started:.1f} s, warm-up {warm:.1f} s",
                        flush=True,
                    )
        results[f"workers_{n_workers}"] = entry

    for mode in ("array", "file"):
        for key in (f"{mode}_{{}}_shards", f"{mode}_{args.shards}_shards"):
            one, two = results["workers_1"][key.format(1)]["wall_s"], results["workers_2"][key.format(2)]["wall_s"]
            name = "one_shard_per_worker" if "{}" in key else f"{args.shards}_shards"
            results[f"speedup_2_vs_1_{mode}_{name}"] = one / two
    token_file.unlink()
    tmp.rmdir()
    report = {
        "benchmark": "bench_cluster_counting",
        "data": f"{n_tokens} i.i.d. Zipf(1.0) tokens, vocab {VOCAB}, {windows.shape[0]} windows of {args.seq_len}",
        "n_shards": args.shards,
        "repeats": args.repeats,
        "bigram_nnz": int(reference.bigram.nnz),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
            "shared": "other jobs were running on this machine; wall times depend on them",
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.startswith("speedup")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
