"""What a weight-mask search step costs over the model's own forward + backward.

    python benchmarks/bench_step_overhead.py                      # default model 32 x 128, SmolLM2 4 x 32
    python benchmarks/bench_step_overhead.py --models default --repeats 7 --label after

For each model, in one process and alternated (plain, masked, plain, masked, ...):

- ``plain_step_s``: one forward + backward of the unmasked model on the bigram target with
  ``requires_grad`` on every attention and MLP weight matrix (exactly the weight gradients a
  weight-mask step needs) and nothing else trainable: the floor any weight-mask step pays.
- ``masked_step_s``: one :func:`bigram_circuits.search.search_step` (weight masks, continuous
  sparsification, AdamW, temperature update) plus the stopping rule's decision counts, i.e. what
  ``search`` does per step.

Reported: the median of ``--repeats`` (at least 5) of each, as process CPU seconds (robust to
other jobs on a shared machine; the run uses ``--threads`` torch threads) and wall seconds, and
``ratio`` = masked / plain CPU. Writes ``benchmarks/results/bench_step_overhead.json`` (one entry
per ``--label``, so a before/after pair lives in one file).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.data import load_token_dataset
from bigram_circuits.distributed import current as current_group
from bigram_circuits.io import atomic_write_bytes
from bigram_circuits.masks import mask_components
from bigram_circuits.masks.granularities import _weight_module
from bigram_circuits.models import frozen_parameters, load_model, model_vocab_size
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, SearchState, Target, _gradients_finite, _run_identity, search_step

SHAPES = {"default": (32, 128), "smollm2": (4, 32)}
RESULTS = REPO / "benchmarks" / "results" / "bench_step_overhead.json"


def _timed(fn, tokens) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn(tokens)
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(model: str, repeats: int, config_overrides: dict, shape: tuple[int, int] | None = None) -> dict:
    """Alternated plain / masked steps on ``model``; medians and the CPU ratio; then the
    elementwise parts of a masked step over the mask logits, timed alone (``parts_s``)."""
    batch, seq = shape or SHAPES[model]
    bridge, tokenizer = load_model(model)
    vocab = model_vocab_size(bridge, tokenizer)
    train = load_token_dataset("default", tokenizer, split="train", show_progress=False)
    stats = BigramStats.from_tokens(train, vocab, seq_len=seq)
    windows = train.windows(seq, batch * (2 * repeats + 4))
    target = Target.bigram(stats)
    config = SearchConfig(lam=10.0, batch_size=batch, seq_len=seq, **config_overrides)
    batches = [torch.as_tensor(windows[i * batch : (i + 1) * batch].astype("int64")) for i in range(2 * repeats + 4)]
    with frozen_parameters(bridge):
        bridge.eval()
        matrices = [_weight_module(bridge, c)[0].weight for c in mask_components(bridge, ("weight",))]
        state = SearchState.fresh(bridge, config, _run_identity(config, ("weight",), target, model))

        def plain(tokens):
            for w in matrices:
                w.requires_grad_(True)
                w.grad = None
            target(bridge(tokens), tokens).backward()
            for w in matrices:
                w.requires_grad_(False)
                w.grad = None

        def masked(tokens):
            search_step(state, bridge, tokens, target, config)
            state.mask_set.decision_counts(config.undecided_low, config.undecided_high)

        plain(batches[0])  # warm-up: allocator, kernels
        masked(batches[1])
        plain_times, masked_times = [], []
        for i in range(repeats):
            plain_times.append(_timed(plain, batches[2 + 2 * i]))
            masked_times.append(_timed(masked, batches[3 + 2 * i]))
        # The parts of a masked step that touch every mask logit and nothing else (the
        # gradients of the last step are still there): each timed alone, median of repeats.
        group = current_group()
        parts = {
            "adamw_step": lambda _: state.optimizer.step(),
            "gradient_check": lambda _: _gradients_finite(state.optimizer, group),
            # from fresh probabilities: an upper bound, since a step's penalty reuses its forward masks
            "penalty_forward_backward": lambda _: state.mask_set.penalty().backward(),
            "decision_counts": lambda _: state.mask_set.decision_counts(config.undecided_low, config.undecided_high),
        }
        parts_s = {}
        for name, fn in parts.items():
            parts_s[name] = statistics.median(_timed(fn, None)[0] for _ in range(repeats))
    plain_cpu = statistics.median(t[0] for t in plain_times)
    masked_cpu = statistics.median(t[0] for t in masked_times)
    return {
        "batch": batch,
        "seq_len": seq,
        "n_mask_entries": sum(c.n_entries for c in state.mask_set.components.values()),
        "plain_step_s": plain_cpu,
        "masked_step_s": masked_cpu,
        "ratio": masked_cpu / plain_cpu,
        "plain_step_wall_s": statistics.median(t[1] for t in plain_times),
        "masked_step_wall_s": statistics.median(t[1] for t in masked_times),
        "plain_cpu_s_all": [t[0] for t in plain_times],
        "masked_cpu_s_all": [t[0] for t in masked_times],
        "parts_s": parts_s,
        "config": config_overrides,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="after", help="key of this measurement in the results file")
    parser.add_argument("--recompute", default=None, help="SearchConfig.recompute_masked_weights (auto/always/never)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--shape", action="append", default=[], metavar="MODEL=BxS", help="another batch for MODEL, e.g. smollm2=16x32"
    )
    args = parser.parse_args(argv)
    shapes = {}
    for text in args.shape:
        try:
            model, size = text.split("=")
            shapes[model] = tuple(int(v) for v in size.lower().split("x"))
        except ValueError:
            parser.error(f"--shape takes MODEL=BxS (e.g. smollm2=16x32), got {text!r}")
        if model not in SHAPES or len(shapes[model]) != 2:
            parser.error(f"--shape takes MODEL=BxS with MODEL in {', '.join(SHAPES)}, got {text!r}")
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (the median of at least 5)")
    torch.set_num_threads(args.threads)
    overrides = {} if args.recompute is None else {"recompute_masked_weights": args.recompute}
    rows = {model: measure(model, args.repeats, overrides) for model in args.models}
    for model, (batch, seq) in shapes.items():
        rows[f"{model}@{batch}x{seq}"] = measure(model, args.repeats, overrides, (batch, seq))
    for model, row in rows.items():
        print(
            f"{model}: plain {row['plain_step_s']:.3f} s, masked {row['masked_step_s']:.3f} s CPU, "
            f"ratio {row['ratio']:.2f}x"
        )
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = {
        "models": rows,
        "threads": args.threads,
        "repeats": args.repeats,
        "basis": "median process CPU seconds, plain and masked steps alternated in one process",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "command": "python benchmarks/bench_step_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, json.dumps(results, indent=2).encode("utf-8"))
    return results


if __name__ == "__main__":
    main()
