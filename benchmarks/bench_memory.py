"""Peak memory of the two heaviest everyday jobs, each measured in a fresh subprocess.

    python benchmarks/bench_memory.py            # writes benchmarks/results/bench_memory.json

1. ``count``: bigram counts of a synthetic corpus of 20M tokens over a 50,000-token vocabulary
   (i.i.d. Zipf(1.0), the pessimistic case for sparsity: every frequent context sees most of the
   vocabulary), read from a memory-mapped ``.npy`` file as ``load_token_dataset`` provides it,
   with ``BigramStats.from_tokens`` defaults (128-token sequences, 2**24-token chunks).
2. ``search``: ``find_command`` on the bundled default model (4 layers, d_model 256, vocab 6,144):
   load the model and the default corpus, count its bigram stats, then one lambda of a neuron+head
   search for ``SEARCH_STEPS`` steps (batch 32 x 128 tokens, 4,096 training windows) and the
   binary-mask metrics on 64 held-out windows.

3. ``weight:MODEL`` (``--weight-masks``; MODEL ``default`` or ``smollm2``, ``load_model``'s names):
   ``WEIGHT_STEPS`` steps of a weight-mask search (``search``, continuous sparsification, the
   next-token target, batch ``WEIGHT_BATCH`` of random token windows, no checkpoint or stability
   check, 2 held-out windows), so the mask logits, their gradients and both AdamW moments exist.
   Only these children run, and their results are merged into the JSON under ``weight_masks``.

Each child reports ``ru_maxrss`` (peak resident set size of the whole process: Python, torch and
the data included) and its RSS right after the imports, so ``peak_mb - after_imports_mb`` is what
the job itself added. The bounds in ``BOUNDS_MB`` are reference points (about 1.6x the peaks
first measured), not guarantees: no test checks memory; the result records whether each
measurement is within its bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COUNT_TOKENS = 20_000_000
COUNT_VOCAB = 50_000
SEARCH_STEPS = 10
WEIGHT_STEPS = 2
WEIGHT_BATCH = {"default": (8, 128), "smollm2": (4, 64)}
# Reference peak-RSS bounds (whole process, MiB): about 1.6x the measured peaks.
BOUNDS_MB = {"count": 1536, "search": 2560}


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def zipf_tokens(n_tokens: int, vocab: int, seed: int = 0, chunk: int = 2_000_000):
    """``n_tokens`` i.i.d. Zipf(1.0) token ids as uint16, made in chunks to stay small."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / (np.arange(vocab) + 2.7))
    relabel = rng.permutation(vocab)
    out = np.empty(n_tokens, dtype=np.uint16)
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
        out[start : start + n] = relabel[np.minimum(ranks, vocab - 1)]
    return out


def child_count(tokens_path: str) -> dict:
    import numpy as np

    from bigram_circuits.data import TokenDataset
    from bigram_circuits.ngrams import BigramStats

    after_imports = rss_mb()
    tokens = np.load(tokens_path, mmap_mode="r")
    started = time.perf_counter()
    stats = BigramStats.from_tokens(TokenDataset(tokens, COUNT_VOCAB, 0), COUNT_VOCAB, show_progress=False)
    seconds = time.perf_counter() - started
    return {
        "after_imports_mb": after_imports,
        "peak_mb": peak_mb(),
        "seconds": seconds,
        "tokens": len(tokens),
        "vocab_size": COUNT_VOCAB,
        "bigram_nnz": int(stats.bigram.nnz),
    }


def child_search(out_dir: str) -> dict:
    import torch

    from bigram_circuits.app.find import find_command

    torch.manual_seed(0)
    after_imports = rss_mb()
    started = time.perf_counter()
    table = find_command(
        model="default",
        granularities=("neuron", "head"),
        lambdas=[1.0],
        out_dir=out_dir,
        corpus="default",
        max_train_windows=4096,
        max_eval_windows=64,
        show_progress=False,
        max_steps=SEARCH_STEPS,
        batch_size=32,
        seq_len=128,
        stability_check=False,
    )
    seconds = time.perf_counter() - started
    return {
        "after_imports_mb": after_imports,
        "peak_mb": peak_mb(),
        "seconds": seconds,
        "steps": int(table["steps"].iloc[0]),
        "batch": [32, 128],
        "granularities": ["neuron", "head"],
        "torch_threads": torch.get_num_threads(),
    }


def child_weight(model: str) -> dict:
    """Peak RSS of ``WEIGHT_STEPS`` weight-mask search steps on ``model`` (see the module docstring)."""
    import numpy as np
    import torch

    from bigram_circuits.models import load_model
    from bigram_circuits.search import SearchConfig, Target, search

    torch.manual_seed(0)
    after_imports = rss_mb()
    started = time.perf_counter()
    bridge, _ = load_model(model)
    after_model = rss_mb()
    parameters = sum(p.numel() for p in bridge.parameters())
    batch, seq_len = WEIGHT_BATCH[model]
    rng = np.random.default_rng(0)
    windows = rng.integers(0, bridge.cfg.d_vocab, (batch * WEIGHT_STEPS, seq_len))
    config = SearchConfig(
        lam=1.0,
        batch_size=batch,
        seq_len=seq_len,
        max_steps=WEIGHT_STEPS,
        checkpoint_every=10**6,
        stability_check=False,
        eval_batches=1,
    )
    with tempfile.TemporaryDirectory() as out:
        result = search(
            bridge,
            windows,
            Target.next_token(),
            "weight",
            config,
            out,
            eval_windows=windows[:2],
            show_progress=False,
        )
        masked = int(result.subnetwork.n_entries)
    seconds = time.perf_counter() - started
    peak = peak_mb()
    return {
        "model": model,
        "after_imports_mb": after_imports,
        "after_model_mb": after_model,
        "peak_mb": peak,
        "search_added_mb": peak - after_model,
        "model_parameters": parameters,
        "masked_weights": masked,
        "search_added_bytes_per_masked_weight": (peak - after_model) * 2**20 / masked,
        "steps": WEIGHT_STEPS,
        "batch": [batch, seq_len],
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(kind: str, argument: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, argument], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_memory.json"))
    parser.add_argument(
        "--weight-masks",
        nargs="+",
        choices=sorted(WEIGHT_BATCH),
        help="only measure weight-mask search steps on these models; merged into --out",
    )
    args = parser.parse_args()
    if args.child:
        kind, argument = args.child
        children = {"count": child_count, "search": child_search, "weight": child_weight}
        print(json.dumps(children[kind](argument)))
        return
    if args.weight_masks:
        measure_weight_masks(args.weight_masks, Path(args.out))
        return

    import numpy as np
    import torch

    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "method": "each job in a fresh subprocess; peak_mb = ru_maxrss of that process (whole process)",
        "bounds_mb": BOUNDS_MB,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tokens_path = Path(tmp) / "tokens.npy"
        np.save(tokens_path, zipf_tokens(COUNT_TOKENS, COUNT_VOCAB))
        results["count"] = run_child("count", str(tokens_path))
        results["search"] = run_child("search", str(Path(tmp) / "search_run"))
    for kind in ("count", "search"):
        results[kind]["within_bound"] = results[kind]["peak_mb"] <= BOUNDS_MB[kind]
        print(
            f"{kind}: peak {results[kind]['peak_mb']:.0f} MiB (after imports {results[kind]['after_imports_mb']:.0f}"
            f" MiB; bound {BOUNDS_MB[kind]} MiB) in {results[kind]['seconds']:.1f} s"
        )
    from bigram_circuits.io import atomic_write_bytes

    out = Path(args.out)
    atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode("utf-8"))
    print(f"wrote {out}")


def measure_weight_masks(models: list[str], out: Path) -> None:
    """Run the ``weight`` child for each model and merge the results into ``out`` (``weight_masks``)."""
    from bigram_circuits.io import atomic_write_bytes

    results = json.loads(out.read_text()) if out.exists() else {}
    section = results.setdefault(
        "weight_masks",
        {
            "method": (
                f"{WEIGHT_STEPS} steps of search(granularity 'weight', continuous, next-token target, random "
                "windows) in a fresh subprocess; peak_mb = ru_maxrss (whole process); search_added_mb = peak "
                "minus the RSS after load_model"
            ),
            "cpu_count": os.cpu_count(),
        },
    )
    for model in models:
        section[model] = measured = run_child("weight", model)
        print(
            f"weight masks, {model}: peak {measured['peak_mb']:.0f} MiB, model loaded {measured['after_model_mb']:.0f}"
            f" MiB, search added {measured['search_added_mb']:.0f} MiB for {measured['masked_weights']} masked"
            f" weights, {measured['seconds']:.0f} s"
        )
    atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode("utf-8"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
