"""Benchmark of bigram_circuits.masks: training-step time with masks vs the unmasked model.

    python benchmarks/bench_masks.py                         # CPU, Pythia-70M shape, batch 8x128
    python benchmarks/bench_masks.py --device cuda --size 160m --out /tmp/gpu.json

Model: a randomly initialised GPT-NeoX with Pythia's shapes (70m: 6 layers, d_model 512,
8 heads, d_mlp 2048; 160m: 12 layers, d_model 768, 12 heads, d_mlp 3072; vocab 50,304), booted
as a TransformerBridge. Loss: next-token cross-entropy on random tokens (plus the sparsity
penalty for masked variants).

Variants, each one forward + backward (no optimizer step unless named):

- ``unmasked_train``: the unmasked model with every parameter trainable (a plain training
  step's forward + backward): the headline baseline.
- ``unmasked_matched_weights``: unmasked, only the attention/MLP weight matrices trainable
  (exactly the weight gradients a weight-mask search needs).
- ``unmasked_matched_activations``: unmasked, only the token embedding trainable (the gradient
  flows through every activation, as neuron/head masks need, with no weight-matrix gradients).
- ``neuron_head``: neuron + head masks (continuous sparsification), base weights frozen.
- ``weight``: weight masks on every Q, K, V, O, MLP-in and MLP-out matrix, base frozen.
- ``*_search_step``: the same plus AdamW on the mask logits, the temperature update and the
  stopping-rule counts, i.e. one full step of ``bigram_circuits.search``.

Variants run round-robin (one step of each in turn) so background load affects all alike; the
median of the repeats is reported, as wall time and as process CPU time. On a CPU shared with
other jobs, wall time mostly measures the other jobs; with ``--threads 1`` the process CPU time
measures the step's own work, so the CPU ratios use it (``ratio_basis``). Reference: NeuroSurgeon's
weight masks measured 1.21x the unmasked step on the same model shape and batch on CPU (figure
given in the project issue, not re-measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.masks import MaskSet

SIZES = {
    "70m": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048},
    "160m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
VOCAB = 50_304


def build_bridge(size: str, device: str, workdir: Path):
    """A random Pythia-``size``-shaped GPT-NeoX bridge (vocab :data:`VOCAB`)."""
    return random_pythia_bridge({"vocab_size": VOCAB, **SIZES[size]}, device, workdir)


def random_pythia_bridge(shape: dict, device, workdir: Path):
    """A random GPT-NeoX bridge of ``shape`` (GPTNeoXConfig fields: hidden_size, layers, heads,
    intermediate_size, vocab_size), weights seeded, with a stand-in tokenizer; files in ``workdir``.
    Also used by ``benchmarks/gpu_check.py``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from bigram_circuits.models import load_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["a small stand-in tokenizer for a benchmark"] * 20, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    ).save_pretrained(str(workdir))
    torch.manual_seed(0)
    config = GPTNeoXConfig(max_position_embeddings=2048, rotary_pct=0.25, tie_word_embeddings=False, **shape)
    GPTNeoXForCausalLM(config).save_pretrained(str(workdir))
    bridge, _ = load_model(workdir, device=device)
    return bridge


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_variants(bridge, tokens: torch.Tensor):
    """name -> callable running one step of that variant (sets requires_grad itself)."""
    params = dict(bridge.named_parameters())
    matrices = {
        id(c.original_component.weight)
        for b in bridge.blocks
        for parent in (b.attn, b.mlp)
        for k in ("q", "k", "v", "o", "in", "out")
        if (c := parent._modules.get(k)) is not None
    }
    embed = bridge.embed.original_component.weight

    def set_trainable(predicate) -> None:
        for p in params.values():
            p.requires_grad_(predicate(p))
            p.grad = None

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    def unmasked(predicate):
        def step():
            set_trainable(predicate)
            loss_of(bridge(tokens)).backward()

        return step

    mask_sets = {
        "neuron_head": MaskSet.for_model(bridge, ("neuron", "head")),
        "weight": MaskSet.for_model(bridge, ("weight",)),
    }
    optimizers = {name: torch.optim.AdamW(ms.parameters(), lr=1e-3) for name, ms in mask_sets.items()}

    def masked(name, search_step=False):
        mask_set = mask_sets[name]

        def step():
            set_trainable(lambda p: False)
            with mask_set.attach(bridge) as forward_masks:
                loss = loss_of(bridge(tokens)) + mask_set.penalty(forward_masks)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            if search_step:
                optimizers[name].step()
                mask_set.temperature *= 1.001
                mask_set.decision_counts()

        return step

    return {
        "unmasked_train": unmasked(lambda p: True),
        "unmasked_matched_weights": unmasked(lambda p: id(p) in matrices),
        "unmasked_matched_activations": unmasked(lambda p: p is embed),
        "neuron_head": masked("neuron_head"),
        "weight": masked("weight"),
        "neuron_head_search_step": masked("neuron_head", search_step=True),
        "weight_search_step": masked("weight", search_step=True),
    }, {name: sum(p.numel() for p in ms.parameters()) for name, ms in mask_sets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="70m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_masks.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        bridge = build_bridge(args.size, args.device, Path(tmp))
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)
    variants, mask_entries = make_variants(bridge, tokens)
    for _ in range(args.warmup):
        for step in variants.values():
            step()
    _sync(args.device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for _ in range(args.repeats):
        for name, step in variants.items():
            _sync(args.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    wall = {name: statistics.median(ts) for name, ts in times.items()}
    cpu = {name: statistics.median(ts) for name, ts in cpu_times.items()}
    basis = "cpu_time" if args.device == "cpu" else "wall_time"
    median = cpu if basis == "cpu_time" else wall
    base = median["unmasked_train"]
    result = {
        "benchmark": "bench_masks",
        "model": f"random GPT-NeoX, Pythia-{args.size} shape, vocab {VOCAB}",
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "batch": [args.batch, args.seq],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "repeats": args.repeats,
        "mask_entries": mask_entries,
        "ratio_basis": basis,
        "median_step_s": median,
        "median_wall_s": wall,
        "median_cpu_s": cpu,
        "all_wall_s": times,
        "all_cpu_s": cpu_times,
        "ratio_vs_unmasked_train": {name: m / base for name, m in median.items()},
        "ratio_neuron_head_vs_matched": median["neuron_head"] / median["unmasked_matched_activations"],
        "ratio_weight_vs_matched": median["weight"] / median["unmasked_matched_weights"],
        "goals": {"neuron_head_vs_unmasked": 1.10, "weight_vs_unmasked": 1.15, "neurosurgeon_weight_reference": 1.21},
    }
    text = json.dumps(result, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
