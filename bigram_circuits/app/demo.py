"""``bigram-circuits demo``: the paper's headline on the bundled model in a few minutes."""

from __future__ import annotations

import dataclasses
import math
import time

from bigram_circuits.app.options import nested_options
from bigram_circuits.data import TokenDataset, load_token_dataset
from bigram_circuits.devices import input_device
from bigram_circuits.evaluate import ablation_table, generate, mean_next_token_loss
from bigram_circuits.models import load_model, model_vocab_size
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, search
from bigram_circuits.subnetwork import Subnetwork

__all__ = ["DemoConfig", "run_demo"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of ``bigram-circuits demo``: the paper's headline on the bundled model in a few
    minutes on 2 CPU cores (weight masks at lambda 10, 16 x 64-token batches, T x1.03 per step)."""

    model: str = "default"
    corpus: str = "default"
    out: str = "runs/demo"  # output directory (a finished search there is reused)
    granularity: str = "weight"  # mask unit(s), comma-separated: weight (the paper's), neuron, head
    # the search: lambda 10, at most 400 steps (--steps) of 16 x 64 tokens, T x1.03 per step
    search: SearchConfig = dataclasses.field(
        default_factory=lambda: SearchConfig(
            lam=10.0, max_steps=400, batch_size=16, seq_len=64, temperature_growth=1.03, checkpoint_every=25
        ),
        metadata=nested_options(
            ("lam", "max_steps", "batch_size", "seq_len", "temperature_growth"), flags={"max_steps": "steps"}
        ),
        hash=False,  # SearchConfig is mutable; the other fields hash a frozen config
    )
    eval_windows: int = 64  # held-out windows of 128 tokens
    no_search: bool = False  # only load and evaluate the model


def run_demo(demo: DemoConfig) -> None:
    """Load the model, report its size, eval loss and generations; then find a bigram
    subnetwork and compare removing it with removing a random same-shape one (printed)."""
    started = time.time()
    bridge, tokenizer = load_model(demo.model)
    # Attention + MLP weight matrices (the paper's mask unit); the bridge also holds split
    # copies of fused QKV weights, so counting bridge.parameters() would double count.
    n_weights = Subnetwork.full(bridge, ("weight",)).n_params_total()
    print(
        f"model {demo.model!r}: {bridge.cfg.n_layers} layers, d_model {bridge.cfg.d_model}, "
        f"{n_weights:,} attention+MLP weights, vocab {len(tokenizer)}"
    )
    evaluation = load_token_dataset(demo.corpus, tokenizer, split="eval")
    windows = evaluation.windows(128, max_windows=demo.eval_windows)
    loss = mean_next_token_loss(bridge, windows, device=input_device(bridge), batch_size=8, vocab_size=len(tokenizer))
    count = windows[:, 1:].size
    print(f"eval loss on {count:,} tokens of {demo.corpus!r}: {loss:.3f} nats (perplexity {math.exp(loss):.1f})")
    for prompt in ("The President of the United States", "The city is located in"):
        text = generate(bridge, tokenizer, prompt, temperature=0, max_new_tokens=20)
        print(f"  {prompt + text!r}")
    if not demo.no_search:
        _demo_search(demo, bridge, tokenizer, evaluation)
    print(f"demo finished in {time.time() - started:.0f} s")


def _demo_search(demo: DemoConfig, bridge, tokenizer, evaluation: TokenDataset) -> None:
    """A bigram-subnetwork search on the loaded model (weight masks by default), then the
    paper's ablation: remove it vs remove a random subnetwork of the same shape. Every number
    comes from the saved binary mask; rerunning the demo reuses ``demo.out``."""
    vocab = model_vocab_size(bridge, tokenizer)
    train = load_token_dataset(demo.corpus, tokenizer, split="train")
    stats = BigramStats.from_tokens(train, vocab)
    config = demo.search
    print(
        f"searching a bigram subnetwork ({demo.granularity} masks, lambda {config.lam:g}, "
        f"at most {config.max_steps} steps of {config.batch_size} x {config.seq_len} tokens) -> {demo.out}"
    )
    result = search(
        bridge,
        train.windows(config.seq_len, 2048),
        Target.bigram(stats),
        demo.granularity,
        config,
        demo.out,
        eval_windows=evaluation.windows(128, demo.eval_windows),
    )
    m = result.metrics
    print(
        f"bigram subnetwork: {m['n_params']:,} weights ({m['percent_params']:.2f}% of attention+MLP "
        f"weights), bigram r {m['bigram_r']:.3f} on held-out text (binary mask), "
        f"{m['steps']} steps, stopped by {m['stop_reason']}"
    )
    layers = result.subnetwork.layer_distribution()
    top = layers.sort_values("kept_params", ascending=False).head(3)
    print(
        "where it sits: "
        + ", ".join(f"{r.block} {r.layer}: {100 * r.share_of_subnetwork:.0f}%" for r in top.itertuples())
    )
    table = ablation_table(
        bridge, stats, evaluation.windows(128, demo.eval_windows), result.subnetwork, seeds=(0,), show_progress=False
    )
    shown = table[["condition", "active_params", "lm_loss_nats", "loss_increase", "r_dropped"]].rename(
        columns={
            "active_params": "weights",
            "lm_loss_nats": "LM loss (nats)",
            "loss_increase": "vs full",
            "r_dropped": "bigram r",
        }
    )
    print(
        shown.to_string(
            index=False,
            formatters={
                "weights": "{:,.0f}".format,
                "LM loss (nats)": "{:.3f}".format,
                "vs full": "{:+.3f}".format,
                "bigram r": "{:.3f}".format,
            },
        )
    )
    print(
        f"removing the bigram subnetwork costs {table.attrs['loss_increase_ratio']:.1f}x the loss of "
        "removing a random subnetwork of the same shape"
    )
    prompt = "The President of the United States"
    for condition in ("bigram only", "bigram ablated"):
        mode = "keep" if condition == "bigram only" else "ablate"
        text = generate(bridge, tokenizer, prompt, (result.subnetwork, mode), temperature=0, max_new_tokens=12)
        print(f"  {condition}: {prompt + text!r}")
