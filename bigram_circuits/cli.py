"""Command line: ``bigram-circuits demo | train-default | find | evaluate | lens | patch | figures``.

Each sub-command is a thin layer over the Python API; errors from the package, OS errors
(missing files, disk full, permission denied) and bad arguments are printed as one line
(``error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from bigram_circuits.errors import BigramCircuitsError


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error: ...`` line (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {_one_line(message)} (see `{self.prog} --help`)\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _csv_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _csv_strings(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_demo(args: argparse.Namespace) -> int:
    """Load the default model, report size, eval loss and generations; then a quick search."""
    import torch

    from bigram_circuits.data import load_token_dataset
    from bigram_circuits.models import load_model
    from bigram_circuits.subnetwork import Subnetwork

    started = time.time()
    bridge, tokenizer = load_model(args.model)
    # Attention + MLP weight matrices (the paper's mask unit); the bridge also holds split
    # copies of fused QKV weights, so counting bridge.parameters() would double count.
    n_weights = Subnetwork.full(bridge).n_params_total()
    print(f"model {args.model!r}: {bridge.cfg.n_layers} layers, d_model {bridge.cfg.d_model}, "
          f"{n_weights:,} attention+MLP weights, vocab {len(tokenizer)}")
    windows = load_token_dataset(args.corpus, tokenizer, split="eval").windows(128, max_windows=args.eval_windows)
    with torch.no_grad():
        total, count = 0.0, 0
        for start in range(0, len(windows), 8):
            batch = torch.as_tensor(windows[start : start + 8].astype("int64"))
            logits = bridge(batch)[..., : len(tokenizer)]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += batch[:, 1:].numel()
    print(f"eval loss on {count:,} tokens of {args.corpus!r}: {total / count:.3f} nats "
          f"(perplexity {torch.tensor(total / count).exp().item():.1f})")
    for prompt in ("The President of the United States", "The city is located in"):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(20):
                next_id = bridge(ids)[0, -1, : len(tokenizer)].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        print(f"  {tokenizer.decode(ids[0])!r}")
    if not args.no_search:
        _demo_search(args, bridge, tokenizer)
    print(f"demo finished in {time.time() - started:.0f} s")
    return 0


def _demo_search(args: argparse.Namespace, bridge, tokenizer) -> None:
    """A short neuron + head bigram-subnetwork search on the loaded model, reported from the
    binary mask (resumable: rerunning the demo reuses ``args.out``)."""
    from bigram_circuits.data import load_token_dataset
    from bigram_circuits.models import model_vocab_size
    from bigram_circuits.ngrams import BigramStats
    from bigram_circuits.search import SearchConfig, Target, search

    vocab = model_vocab_size(bridge, tokenizer)
    train = load_token_dataset(args.corpus, tokenizer, split="train")
    evaluation = load_token_dataset(args.corpus, tokenizer, split="eval")
    stats = BigramStats.from_tokens(train, vocab)
    config = SearchConfig(lam=args.lam, max_steps=args.steps, batch_size=16, checkpoint_every=25)
    print(f"searching a bigram subnetwork (neuron + head masks, lambda {args.lam:g}, "
          f"at most {args.steps} steps) -> {args.out}")
    result = search(bridge, train.windows(128, 2048), Target.bigram(stats), ("neuron", "head"),
                    config, args.out, eval_windows=evaluation.windows(128, args.eval_windows))
    m = result.metrics
    print(f"bigram subnetwork: {m['n_params']:,} weights ({m['percent_params']:.1f}% of attention+MLP "
          f"weights), bigram r {m['bigram_r']:.3f} on held-out text (binary mask), "
          f"{m['steps']} steps, stopped by {m['stop_reason']}")
    layers = result.subnetwork.layer_distribution()
    print(layers.to_string(index=False))


def cmd_train_default(args: argparse.Namespace) -> int:
    from bigram_circuits.training import TrainConfig, install_default_model, train_default_model

    config = TrainConfig(max_steps=args.steps, seed=args.seed)
    metrics = train_default_model(args.out, config)
    print(f"eval loss {metrics['final_eval_loss_nats']:.3f} nats vs unigram entropy "
          f"{metrics['eval_unigram_entropy_nats']:.3f}; model card: {args.out}/MODEL_CARD.md")
    if args.install:
        print(f"installed into {install_default_model(args.out)}")
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    from bigram_circuits.search import find_command

    options = {"seed": args.seed}
    for name in ("max_steps", "time_budget_s", "checkpoint_every", "batch_size", "seq_len"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    table = find_command(
        model=args.model,
        granularities=args.granularity,
        lambdas=args.lambdas,
        out_dir=args.out,
        corpus=args.corpus,
        target=args.target,
        device=args.device,
        max_train_windows=args.max_train_windows,
        max_eval_windows=args.max_eval_windows,
        show_progress=not args.no_progress,
        **options,
    )
    print(table.to_string(index=False))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bigram_circuits.evaluate import evaluate_run

    tables = evaluate_run(args.run)
    for name, table in tables.items():
        print(f"\n## {name}\n{table.to_string()}")
    return 0


def cmd_lens(args: argparse.Namespace) -> int:
    from bigram_circuits.circuits.lens import lens_command

    table = lens_command(args.run, n_tokens=args.n_tokens)
    print(table.to_string(index=False))
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    from bigram_circuits.circuits.patching import patch_command

    table = patch_command(
        model=args.model, clean=args.clean, corrupted=args.corrupted, component=args.component,
        run=args.run, out=args.out,
    )
    print(table.to_string(index=False))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from bigram_circuits.figures import figures_command

    written = figures_command(model=args.model, out_dir=args.out, cache_dir=args.cache)
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="bigram-circuits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="load the default model, evaluate it and find a bigram subnetwork")
    demo.add_argument("--model", default="default")
    demo.add_argument("--corpus", default="default")
    demo.add_argument("--eval-windows", type=int, default=64)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--no-search", action="store_true", help="only load and evaluate the model")
    demo.add_argument("--lam", type=float, default=1.0, help="sparsity weight of the demo search")
    demo.add_argument("--steps", type=int, default=150, help="search steps of the demo")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train-default", help="train the bundled default model from scratch")
    train.add_argument("--out", default="runs/default_model")
    train.add_argument("--steps", type=int, default=3500)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--install", action="store_true", help="copy the result into the package")
    train.set_defaults(func=cmd_train_default)

    find = sub.add_parser("find", help="search bigram (or optimal) subnetworks over a lambda sweep")
    find.add_argument("--model", default="default")
    find.add_argument("--corpus", default="default")
    find.add_argument("--granularity", type=_csv_strings, default=["neuron", "head"])
    find.add_argument("--lambdas", type=_csv_floats, default=[0.0, 1.0, 10.0, 100.0])
    find.add_argument("--target", default="bigram", choices=["bigram", "full_model", "next_token"],
                      help="bigram distribution, the full model's own distribution (optimal "
                      "subnetwork), or the true next token")
    find.add_argument("--max-steps", type=int, default=None)
    find.add_argument("--time-budget-s", type=float, default=None, help="per lambda")
    find.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    find.add_argument("--batch-size", type=int, default=None)
    find.add_argument("--seq-len", type=int, default=None, help="tokens per window (<= the model's context)")
    find.add_argument("--max-train-windows", type=int, default=4096)
    find.add_argument("--max-eval-windows", type=int, default=256)
    find.add_argument("--no-progress", action="store_true", help="no progress bars")
    find.add_argument("--device", default="cpu")
    find.add_argument("--seed", type=int, default=0)
    find.add_argument("--out", required=True)
    find.set_defaults(func=cmd_find)

    evaluate = sub.add_parser("evaluate", help="metrics, ablation, overlap and layer tables of a run")
    evaluate.add_argument("run")
    evaluate.set_defaults(func=cmd_evaluate)

    lens = sub.add_parser("lens", help="logit lens, linear lens and rotation of a run's subnetwork")
    lens.add_argument("run")
    lens.add_argument("--n-tokens", type=int, default=16384)
    lens.set_defaults(func=cmd_lens)

    patch = sub.add_parser("patch", help="activation patching between a clean and a corrupted prompt")
    patch.add_argument("--model", default="default")
    patch.add_argument("--clean", required=True)
    patch.add_argument("--corrupted", required=True)
    patch.add_argument("--component", default="resid_pre",
                       choices=["resid_pre", "attn_out", "mlp_out", "head", "neuron"])
    patch.add_argument("--run", default=None, help="a run directory: patch with its subnetwork")
    patch.add_argument("--out", default=None, help="write the heatmap HTML here")
    patch.set_defaults(func=cmd_patch)

    figures = sub.add_parser("figures", help="regenerate every paper figure and table")
    figures.add_argument("--model", default="default")
    figures.add_argument("--out", default="figures")
    figures.add_argument("--cache", default="runs/figures_cache")
    figures.set_defaults(func=cmd_figures)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BigramCircuitsError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the package does not wrap (e.g. an input that vanished)
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: {_one_line(exc.strerror or exc)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed steps are checkpointed; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
