"""The bigram target's noise ceiling per model (tokenizer): how well a bigram table counted on
one half of the training split predicts the bigram surprisal of a table from the other half.

    python benchmarks/noise_ceiling.py                       # default and smollm2, seq_len 32 and 128

For each model's tokenizer and each ``--seq-len``: :func:`bigram_circuits.evaluate.noise_ceiling`
on the default corpus (training windows split at random in halves; ``--eval-windows`` held-out
windows), for ``--seeds`` splits. Writes ``benchmarks/results/noise_ceiling.json``: one row per
(model, seq_len, seed) with ``r_dropped``, ``r_clipped``, ``unseen_share``. A subnetwork's r
against the full training split's table should be read beside this number, not beside 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.data import load_token_dataset
from bigram_circuits.evaluate import noise_ceiling
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.models import load_model, model_vocab_size

RESULTS = REPO / "benchmarks" / "results" / "noise_ceiling.json"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["default", "smollm2"])
    parser.add_argument("--seq-len", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for model in args.models:
        bridge, tokenizer = load_model(model)  # the tokenizer, and the vocabulary size the searches use
        vocab = model_vocab_size(bridge, tokenizer)
        del bridge
        train = load_token_dataset("default", tokenizer, split="train", show_progress=False)
        held_out = load_token_dataset("default", tokenizer, split="eval", show_progress=False)
        for seq_len in args.seq_len:
            for seed in args.seeds:
                ceiling = noise_ceiling(
                    train.windows(seq_len), held_out.windows(seq_len, args.eval_windows), vocab, seed=seed
                )
                rows.append({"model": model, "seq_len": seq_len, "n_train_tokens": len(train), **ceiling})
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "rows": rows,
        "corpus": "default",
        "command": "python benchmarks/noise_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, json.dumps(result, indent=2).encode("utf-8"))
    return rows


if __name__ == "__main__":
    main()
