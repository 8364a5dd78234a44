"""Command line: ``bigram-circuits demo | train-default | find | evaluate | lens | patch | figures``.

Each sub-command is a thin layer over the Python API; errors from the package, OS errors
(missing files, disk full, permission denied) and bad arguments are printed as one line
(``error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import sys
import types
import typing
from collections.abc import Sequence

from bigram_circuits.errors import BigramCircuitsError


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error: ...`` line (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {_one_line(message)} (see `{self.prog} --help`)\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def cmd_demo(args: argparse.Namespace) -> int:
    from bigram_circuits.app.demo import DemoConfig, run_demo

    run_demo(DemoConfig(**_given(args, [f.name for f in dataclasses.fields(DemoConfig)])))
    return 0


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
    from bigram_circuits.app.find import find_command

    table = find_command(**_given(args, _FIND_OPTIONS), **_given(args, _SEARCH_OPTIONS))
    print(table.to_string(index=False))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bigram_circuits.app.evaluate import evaluate_run

    tables = evaluate_run(args.run, **_given(args, _EVALUATE_OPTIONS))
    for name, table in tables.items():
        print(f"\n## {name}\n{table.to_string()}")
    return 0


def cmd_lens(args: argparse.Namespace) -> int:
    from bigram_circuits.app.lens import lens_command

    table = lens_command(args.run, **_given(args, _LENS_OPTIONS))
    print(table.to_string(index=False))
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    from bigram_circuits.app.patch import patch_command

    table = patch_command(
        model=args.model, clean=args.clean, corrupted=args.corrupted, component=args.component,
        run=args.run, out=args.out,
    )
    print(table.to_string(index=False))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from bigram_circuits.app.figures import FiguresConfig, figures_command

    config = FiguresConfig(**_given(args, _FIGURES_CONFIG_OPTIONS))
    written = figures_command(config=config, **_given(args, _FIGURES_OPTIONS))
    for path in written:
        print(path)
    return 0


def cmd_build_up(args: argparse.Namespace) -> int:
    """``build-up``: candidates from three methods added to the bigram base (and an optimal base)."""
    from dataclasses import fields

    from bigram_circuits.app.buildup import build_up_command
    from bigram_circuits.circuits.buildup import BuildUpConfig

    names = {f.name for f in fields(BuildUpConfig)}
    config = BuildUpConfig(**{k: v for k, v in vars(args).items() if k in names})
    tables = build_up_command(model=args.model, base=args.base, out=args.out, optimal=args.optimal,
                              config=config, device=args.device, png=args.png, progress=args.progress)
    print(tables["candidates"].to_string(index=False))
    columns = ["task", "base", "candidate", "heads", "base_value", "full_value", "gap", "with_candidate",
               "recovered", "random_recovered", "random_recovered_std", "full_minus_recovered"]
    print("\n" + tables["build_up_report"][columns].round(3).to_string(index=False))
    if args.out is not None:
        print(f"tables and figure written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- options from signatures
#
# Options of find / evaluate / lens / figures are generated from the config dataclasses and the
# command functions' keyword arguments, so `--help` shows the Python API's defaults and no
# default is written twice. An option the user does not give is not passed at all.

_HELP = {
    "lr": "mask learning rate (default None: per granularity, weight 0.01, neuron/head 0.05)",
    "temperature_init": "mask temperature at step 0",
    "temperature_growth": "temperature factor per step (the paper: 1.001)",
    "parameterization": "continuous (the paper's) or hard_concrete",
    "keep_top_k": "keep exactly the k largest mask logits instead of logit > 0",
    "max_steps": "steps per lambda (fewer when the stopping rule fires)",
    "time_budget_s": "search time per lambda, in seconds",
    "checkpoint_every": "steps between checkpoints",
    "seq_len": "tokens per window (<= the model's context)",
    "weight_decay": "AdamW weight decay of the mask logits",
    "init": "initial mask logit",
    "penalty_weighting": "params (weight each entry by the weights it gates) or entries",
    "stability_check": "retry a run whose loss spiked (the paper's check)",
    "max_attempts": "runs per lambda when the stability check fails",
    "eval_batches": "batches for each run's held-out target loss",
    "min_steps": "steps before the stopping rule may fire",
    "granularities": "mask unit(s), comma-separated: weight (the paper's), neuron, head",
    "lambdas": "comma-separated sparsity weights",
    "seeds": "comma-separated seeds; several seeds run the sweep once per seed (OUT/seed_N)",
    "paper": "the paper's schedule for weight masks (SearchConfig.paper(): lr 5e-5, T x1.001, batch 32, "
             "15k steps); other options given override it",
    "target": "bigram (the paper's), full_model (optimal subnetwork) or next_token",
    "device": "torch device (cpu, cuda, cuda:1, ...)",
    "max_train_windows": "training windows (of seq_len tokens)",
    "max_eval_windows": "held-out windows for r and the target loss",
    "n_eval_windows": "held-out windows of the run's seq_len",
    "n_tokens": "held-out tokens for the lenses and similarity",
    "n_random": "random pairs for the overlap null",
    "optimal": "an optimal-subnetwork run to compare with (default: RUN/optimal if it exists)",
    "png": "PNGs next to the HTML (needs Chromium)",
    "model": "default (bundled), smollm2, a Hugging Face model directory, a GGUF file or a hub id",
    "corpus": "default (bundled), a named source or a text file",
    "out_dir": "output directory",
    "out": "output directory (default RUN/circuits)",
    "cache_dir": "cache of intermediate results (resumable)",
    "resume": "reuse finished runs and continue interrupted ones in the output directory",
    "show_progress": "progress bars",
    "progress": "progress bars",
    "batch_size": "windows per batch",
    "temperature": "sampling temperature of the generations",
    "max_new_tokens": "tokens per generation",
}
_RENAMED = {"granularities": "granularity", "out_dir": "out", "show_progress": "progress",
            "cache_dir": "cache"}


def _element_parser(kind: type):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from exc
    return parse


def _scalar_parser(kind: type, optional: bool):
    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from exc
    parse.__name__ = kind.__name__
    return parse


def _parser_for(hint) -> tuple[object, str]:
    """An argparse ``type`` for a type hint (scalars, optionals, sequences) and its metavar."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        sequences = [k for k in kinds if typing.get_origin(k) in (tuple, list, collections.abc.Sequence)]
        if sequences:  # e.g. str | Sequence[str]: a comma-separated list
            return _parser_for(sequences[0])
        first = kinds[0]
        kind = first if first in (int, float, str) else str  # e.g. str | os.PathLike
        return _scalar_parser(kind, type(None) in args), kind.__name__.upper()
    if typing.get_origin(hint) in (tuple, list, collections.abc.Sequence):
        kind = args[0] if args and args[0] in (int, float, str) else str
        return _element_parser(kind), f"{kind.__name__.upper()},..."
    kind = hint if hint in (int, float, str) else str
    return _scalar_parser(kind, False), kind.__name__.upper()


def _show(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    return "None" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _options_of(source, names: Sequence[str]) -> list[tuple[str, object, object]]:
    """``(name, type hint, default)`` of dataclass fields or keyword parameters of a function."""
    hints = typing.get_type_hints(source)
    if dataclasses.is_dataclass(source):
        defaults = {f.name: f.default for f in dataclasses.fields(source)}
    else:
        defaults = {n: p.default for n, p in inspect.signature(source).parameters.items()}
    # A name the source does not declare is left out (e.g. a wrapper taking **kwargs).
    return [(name, hints[name], defaults[name]) for name in names if name in hints and name in defaults]


def _add_options(parser: argparse.ArgumentParser, options, title: str | None = None,
                 required: Sequence[str] = (), helps: dict[str, str] | None = None) -> list[str]:
    """Add one ``--flag`` per option (defaults suppressed, so unset options are not passed);
    returns the option names, for :func:`_given`. ``required`` names options the CLI needs
    although the function has a default (e.g. ``find --out``)."""
    group = parser.add_argument_group(title) if title else parser
    for name, hint, default in options:
        flag = "--" + _RENAMED.get(name, name).replace("_", "-")
        text = (helps or {}).get(name) or _HELP.get(name, name.replace("_", " "))
        if isinstance(default, bool):
            if default:
                group.add_argument("--no-" + flag[2:], dest=name, action="store_false", default=argparse.SUPPRESS,
                                   help=f"turn off: {text}")
            else:
                group.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        kind, metavar = _parser_for(hint)
        needed = default is inspect.Parameter.empty or name in required
        help_text = text if needed or "default" in text else f"{text} (default {_show(default)})"
        group.add_argument(flag, dest=name, type=kind, metavar=metavar, required=needed,
                           default=argparse.SUPPRESS, help=help_text)
    return [name for name, _, _ in options]


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict:
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


_FIND_OPTIONS: list[str] = []
_SEARCH_OPTIONS: list[str] = []
_EVALUATE_OPTIONS: list[str] = []
_LENS_OPTIONS: list[str] = []
_FIGURES_OPTIONS: list[str] = []
_FIGURES_CONFIG_OPTIONS: list[str] = []


def build_parser() -> argparse.ArgumentParser:
    from bigram_circuits.app.demo import DemoConfig

    parser = _OneLineParser(prog="bigram-circuits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="load the default model, evaluate it and find a bigram subnetwork")
    _add_options(demo, _options_of(DemoConfig, [f.name for f in dataclasses.fields(DemoConfig)]), helps={
        "lam": "sparsity weight of the demo search", "steps": "search steps of the demo (at most)",
        "eval_windows": "held-out windows of 128 tokens", "no_search": "only load and evaluate the model",
        "out": "output directory (a finished search there is reused)", "granularity": _HELP["granularities"]})
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train-default", help="train the bundled default model from scratch")
    train.add_argument("--out", default="runs/default_model")
    train.add_argument("--steps", type=int, default=3500)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--install", action="store_true", help="copy the result into the package")
    train.set_defaults(func=cmd_train_default)

    from bigram_circuits.app.evaluate import evaluate_run
    from bigram_circuits.app.figures import FiguresConfig, figures_command
    from bigram_circuits.app.find import find_command
    from bigram_circuits.app.lens import lens_command
    from bigram_circuits.search import SearchConfig

    find = sub.add_parser("find", help="search bigram (or optimal) subnetworks over a lambda sweep",
                          description="Search subnetworks over a lambda sweep (weight masks by default).")
    _FIND_OPTIONS[:] = _add_options(find, _options_of(find_command, [
        "out_dir", "model", "corpus", "granularities", "lambdas", "target", "seeds", "paper", "device",
        "max_train_windows", "max_eval_windows", "resume", "show_progress"]), required=("out_dir",))
    find.add_argument("--seed", dest="seeds", type=lambda text: (int(text),), default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS)  # the single-seed spelling of earlier releases
    search_fields = [f.name for f in dataclasses.fields(SearchConfig) if f.name not in ("lam", "seed")]
    _SEARCH_OPTIONS[:] = _add_options(find, _options_of(SearchConfig, search_fields), "search settings (SearchConfig)")
    find.set_defaults(func=cmd_find)

    evaluate = sub.add_parser("evaluate", help="metrics, ablation, overlap and layer tables of a run")
    evaluate.add_argument("run")
    _EVALUATE_OPTIONS[:] = _add_options(evaluate, _options_of(evaluate_run, [
        "optimal", "n_eval_windows", "seeds", "n_random", "temperature", "max_new_tokens", "batch_size",
        "device", "out_dir", "show_progress"]))
    evaluate.set_defaults(func=cmd_evaluate)

    lens = sub.add_parser("lens", help="logit lens, linear lens and rotation of a run's subnetwork")
    lens.add_argument("run")
    _LENS_OPTIONS[:] = _add_options(lens, _options_of(lens_command, ["n_tokens", "out", "device", "progress"]))
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

    figures = sub.add_parser("figures", help="regenerate every paper figure and table",
                             description="Regenerate every paper figure and table (weight masks by default; "
                             "--granularity neuron,head draws the coarser masks, e.g. into figures/neuron_head).")
    _FIGURES_OPTIONS[:] = _add_options(figures, _options_of(figures_command, [
        "model", "out_dir", "cache_dir", "device", "png", "show_progress"]))
    config_fields = [f.name for f in dataclasses.fields(FiguresConfig) if f.name not in ("prompts",)]
    _FIGURES_CONFIG_OPTIONS[:] = _add_options(figures, _options_of(FiguresConfig, config_fields),
                                              "figure settings (FiguresConfig)")
    figures.set_defaults(func=cmd_figures)

    from dataclasses import fields as config_fields_of

    from bigram_circuits.circuits.buildup import BuildUpConfig

    build_up = sub.add_parser(
        "build-up", help="add candidate circuits (heads) to the bigram subnetwork and measure behaviours",
        description="Candidates from head scores, attribution patching and activation patching; "
        "base / base + candidate / base + random heads / full / full - candidate on in-context "
        "repetition and name copying; overlap of the base with each circuit.")
    build_up.add_argument("--model", default="default", help="the model the base was found on")
    build_up.add_argument("--base", required=True, help="a `find` run (its chosen lambda) or a subnetwork directory")
    build_up.add_argument("--optimal", default=None, help="an optimal-subnetwork run to compare as a second base")
    build_up.add_argument("--out", default=None, help="write tables (CSV + Markdown) and the figure here")
    build_up.add_argument("--device", default="cpu")
    build_up.add_argument("--no-png", dest="png", action="store_false", help="HTML figure only")
    build_up.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    settings = build_up.add_argument_group("build-up settings (BuildUpConfig)")
    for field in config_fields_of(BuildUpConfig):
        flag = field.name.replace("_", "-")
        if isinstance(field.default, bool):
            settings.add_argument(f"--no-{flag}" if field.default else f"--{flag}", dest=field.name,
                                  action="store_false" if field.default else "store_true",
                                  default=argparse.SUPPRESS, help=f"{'turn off: ' if field.default else ''}{field.name}")
        elif isinstance(field.default, tuple):
            kind = type(field.default[0])
            settings.add_argument(
                f"--{flag}", dest=field.name, default=argparse.SUPPRESS, metavar=f"{kind.__name__.upper()},...",
                type=lambda text, kind=kind: tuple(kind(x) for x in text.split(",") if x.strip()),
                help=f"comma-separated (default {','.join(str(v) for v in field.default)})")
        else:
            settings.add_argument(f"--{flag}", dest=field.name, type=type(field.default), default=argparse.SUPPRESS,
                                  help=f"default {field.default}")
    build_up.set_defaults(func=cmd_build_up)
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
