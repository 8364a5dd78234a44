"""Timed weight-mask bigram search on a Pythia-160M-shaped random model (GPU or CPU).

    python benchmarks/bench_search_gpu.py --device cuda --steps 300 --out results.json

Tokens are synthetic (Zipfian over the 50,304 vocab, with a random bigram structure), so only
the time per search step and the memory are meaningful, not the subnetwork. Reports the
median step time of ``bigram_circuits.search.search`` with the bigram target (sparse soft
cross-entropy) at batch 32x128, and the projected time for the paper's 5k-15k steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_masks import VOCAB, build_bridge  # noqa: E402

from bigram_circuits.ngrams import BigramStats  # noqa: E402
from bigram_circuits.search import SearchConfig, Target, search  # noqa: E402


def synthetic_windows(n_windows: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """A Markov chain whose next token is a Zipfian draw shifted by the current token."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, VOCAB + 1)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()
    offsets = rng.choice(VOCAB, size=(n_windows, seq_len), p=zipf)
    windows = np.empty((n_windows, seq_len), dtype=np.int64)
    windows[:, 0] = offsets[:, 0]
    for i in range(1, seq_len):
        windows[:, i] = (windows[:, i - 1] * 7 + offsets[:, i]) % VOCAB
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="160m")
    parser.add_argument("--granularity", default="weight")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_search_gpu.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        bridge = build_bridge(args.size, args.device, Path(workdir))
        windows = synthetic_windows(args.steps * 32 // 4 + 64, 128)
        stats = BigramStats.from_tokens(windows, VOCAB)
        step_times: list[float] = []
        last = [time.perf_counter()]

        def on_step(step: int, info: dict) -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now

        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        config = SearchConfig(lam=10.0, max_steps=args.steps, batch_size=32, stability_check=False,
                              stop_undecided_fraction=0.0, checkpoint_every=10**6, eval_batches=2)
        started = time.perf_counter()
        result = search(bridge, windows, Target.bigram(stats), args.granularity, config,
                        eval_windows=windows[:64], show_progress=False, callback=on_step)
        total = time.perf_counter() - started
    steady = sorted(step_times[5:]) or sorted(step_times)
    median = steady[len(steady) // 2]
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "size": args.size,
        "granularity": args.granularity,
        "steps": len(step_times),
        "batch": "32x128",
        "median_step_s": median,
        "total_s_including_eval": total,
        "projected_5k_steps_min": 5000 * median / 60,
        "projected_15k_steps_min": 15000 * median / 60,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if args.device.startswith("cuda") else None,
        "final_density": float(result.subnetwork.density),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
