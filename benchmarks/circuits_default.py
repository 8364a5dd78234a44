"""Circuit analyses of the bundled default model: the paper's mechanistic "must show" numbers.

    python benchmarks/circuits_default.py                       # newest run under runs/ (if any)
    python benchmarks/circuits_default.py --run runs/find --n-tokens 32768 --threads 1

For the full model, the bigram subnetwork of a ``bigram-circuits find`` run and a random
subnetwork of the same shape (same kept count per layer and granularity):

- linear lens per layer: rotation (median |angle| of the ridge map's eigenvalues) to the input
  embeddings and to the last layer, recall@k and held-out R^2 (paper Fig. 3);
- logit lens per layer: KL to the run's own output and bigram r;
- layer covariance similarity matrices (paper Fig. 4);
- induction: previous-token and induction head scores of the full model on repeated random
  token sequences, and the loss on the second half of those sequences for bigram only,
  bigram + induction circuit, bigram + random heads and the full model (sufficiency), plus the
  full model without the induction circuit (necessity).

Without a run (no bigram subnetwork yet) the random control is a neuron/head subnetwork of
``--random-density``. Writes JSON to ``benchmarks/results/circuits_default.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.circuits.ablation import (
    Candidate,
    RepeatedSequenceLoss,
    head_scores,
    necessity,
    select_heads,
    sufficiency,
)
from bigram_circuits.circuits.lens import LinearLensConfig, lens_report, logit_lens_report
from bigram_circuits.circuits.similarity import similarity_report
from bigram_circuits.data import load_token_dataset
from bigram_circuits.errors import MaskError
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.models import load_model, model_id, model_vocab_size
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.rundir import RunDir
from bigram_circuits.subnetwork import Subnetwork


def newest_run(runs_dir: Path, fingerprint: str) -> Path | None:
    """The most recently written run under ``runs_dir`` whose subnetwork fits this model."""
    candidates = []
    markers = [RunDir(d).sweep_file for d in runs_dir.glob("*") if RunDir(d).sweep_file.exists()]
    for marker in markers + list(runs_dir.glob(f"**/{RunDir.SUBNETWORK}")):
        try:
            fits = Subnetwork.load(RunDir(marker.parent).subnetwork_dir()).model_id == fingerprint
        except (MaskError, OSError, KeyError, ValueError):  # an unfinished or foreign run
            fits = False
        if fits:
            candidates.append((marker.stat().st_mtime, marker.parent))
    return max(candidates)[1] if candidates else None


def random_units(bridge, density: float, seed: int) -> Subnetwork:
    """A neuron/head subnetwork keeping ``density`` of every layer's neurons and heads."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for key, mask in Subnetwork.full(bridge, ("neuron", "head")).masks.items():
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[: max(1, round(density * mask.numel()))]] = True
        masks[key] = flat.reshape(mask.shape)
    return Subnetwork.from_masks(bridge, masks, {"kind": "random", "density": density, "seed": seed})


def records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--run", default=None, help="a `bigram-circuits find` run or subnetwork directory")
    parser.add_argument("--runs-dir", default=str(REPO / "runs"), help="where to look for the newest run")
    parser.add_argument("--corpus", default="default")
    parser.add_argument("--n-tokens", type=int, default=16384, help="tokens for the lens and similarity")
    parser.add_argument("--random-density", type=float, default=0.1)
    parser.add_argument("--repeat-len", type=int, default=32, help="length of each random half")
    parser.add_argument("--repeat-n", type=int, default=64)
    parser.add_argument(
        "--pool-size",
        type=int,
        default=2000,
        help="draw random tokens from this many frequent ones",
    )
    parser.add_argument("--induction-threshold", type=float, default=0.3)
    parser.add_argument("--previous-token-threshold", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "circuits_default.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    timings: dict[str, float] = {}

    bridge, tokenizer = load_model(args.model)
    vocab = model_vocab_size(bridge, tokenizer)
    fingerprint = model_id(bridge)
    run = Path(args.run) if args.run else newest_run(Path(args.runs_dir), fingerprint)
    bigram = Subnetwork.load(RunDir(run).subnetwork_dir()) if run is not None else None
    runs: dict[str, Subnetwork | None] = {"full": None}
    if bigram is not None:
        runs["bigram"] = bigram
        runs["random"] = bigram.random_control(seed=0)
    else:
        runs["random"] = random_units(bridge, args.random_density, seed=0)
    print(f"model {args.model} ({fingerprint}); runs: {list(runs)}; bigram subnetwork: {run}")

    evaluation = load_token_dataset(args.corpus, tokenizer, split="eval")
    windows = evaluation.windows(128)
    train = load_token_dataset(args.corpus, tokenizer, split="train")
    t0 = time.time()
    if run is not None:  # the run's bigram_stats.npz (tokenizer checked), else counted here and not saved
        stats = RunDir(run).bigram_stats(tokenizer, args.corpus, 128, vocab, train=train, save=False)
    else:
        stats = BigramStats.from_tokens(train, vocab)
    timings["bigram_stats_s"] = time.time() - t0
    # Random sequences are drawn from the most frequent tokens (EOS excluded): rare tokens of a
    # small model have barely trained embeddings.
    counts = np.bincount(np.asarray(train.tokens, dtype=np.int64), minlength=vocab)
    counts[tokenizer.eos_token_id] = 0
    pool = tuple(int(t) for t in np.argsort(-counts, kind="stable")[: args.pool_size])

    t0 = time.time()
    linear = lens_report(bridge, tokenizer, windows, runs, args.n_tokens, config=LinearLensConfig())
    timings["linear_lens_s"] = time.time() - t0
    t0 = time.time()
    logit = logit_lens_report(bridge, tokenizer, windows, runs, bigram_stats=stats, n_tokens=args.n_tokens)
    timings["logit_lens_s"] = time.time() - t0
    t0 = time.time()
    similarity = similarity_report(bridge, windows, runs, args.n_tokens)
    timings["similarity_s"] = time.time() - t0

    t0 = time.time()
    scores = head_scores(bridge, vocab, args.repeat_len, args.repeat_n, seed=1, pool=pool)
    induction = select_heads(scores, "induction_score", threshold=args.induction_threshold)
    if not induction:  # no clear induction head: take the two best
        induction = select_heads(scores, "induction_score", top_k=2)
    previous = select_heads(scores, "previous_token_score", threshold=args.previous_token_threshold)
    circuit = Candidate("induction circuit", heads=sorted(set(induction) | set(previous)))
    behaviour = RepeatedSequenceLoss(vocab, args.repeat_len, args.repeat_n, seed=0, pool=pool)
    base = runs.get("bigram", runs["random"])
    base_label = "bigram" if "bigram" in runs else "random"
    suff = sufficiency(bridge, base, circuit, behaviour, n_random_controls=3, seed=0, base_label=base_label)
    if set(induction) != set(circuit.heads):
        only = sufficiency(
            bridge,
            base,
            Candidate("induction heads", heads=induction),
            behaviour,
            n_random_controls=0,
            base_label=base_label,
        )
        suff = pd.concat([suff, only.iloc[[1]]], ignore_index=True)
    nec = necessity(bridge, circuit, behaviour, n_random_controls=3, seed=0)
    timings["induction_s"] = time.time() - t0

    summary = {
        "model": args.model,
        "model_id": fingerprint,
        "bigram_run": str(run) if run is not None else None,
        "bigram_summary": bigram.summary() if bigram is not None else None,
        "random_summary": runs["random"].summary(),
        "n_tokens": args.n_tokens,
        "corpus": args.corpus,
        "settings": {
            "ridge_alpha": 1.0,
            "test_fraction": LinearLensConfig().test_fraction,
            "recall_similarity": "cosine",
            "repeat_len": args.repeat_len,
            "repeat_n": args.repeat_n,
            "token_pool": f"{args.pool_size} most frequent train tokens (EOS excluded)",
            "induction_threshold": args.induction_threshold,
            "previous_token_threshold": args.previous_token_threshold,
        },
        "linear_lens": records(linear),
        "logit_lens": records(logit),
        "similarity": {label: matrix.round(4).to_numpy().tolist() for label, matrix in similarity.items()},
        "head_scores": records(scores),
        "induction_heads": induction,
        "previous_token_heads": previous,
        "sufficiency": records(suff),
        "necessity": records(nec),
        "timings_s": {**timings, "total_s": time.time() - started},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    out = Path(args.out)
    atomic_write_bytes(out, json.dumps(summary, indent=2).encode("utf-8"))

    pd.set_option("display.width", 200)
    rotation = linear.pivot_table(index="layer", columns=["target", "run"], values="rotation_deg", sort=False)
    print("\nmedian rotation (deg) per layer\n", rotation.round(1).to_string())
    print(
        "\nrecall@1 of the input token\n",
        linear[linear["target"] == "input"].pivot(index="layer", columns="run", values="recall@1").round(3).to_string(),
    )
    print("\nlogit lens\n", logit.round(3).to_string(index=False))
    for label, matrix in similarity.items():
        print(f"\ncovariance similarity ({label})\n", matrix.round(3).to_string())
    print("\nhead scores (top 8 by induction)\n", scores.head(8).round(3).to_string(index=False))
    print("\nsufficiency\n", suff.round(3).to_string(index=False))
    print("\nnecessity\n", nec.round(3).to_string(index=False))
    print(f"\nwrote {out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
