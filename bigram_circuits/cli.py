"""Command line: ``bigram-circuits demo | train-default | find | evaluate | lens | patch |
figures | build-up | view | push``.

Each sub-command calls one function of the application layer (:mod:`bigram_circuits.app`).
Its options are generated from that function's keyword arguments and its config dataclass
(``SearchConfig``, ``FiguresConfig``, ``DemoConfig``, ``BuildUpConfig``, ``TrainConfig``), so
``--help`` shows the Python API's defaults and no default is written twice; an option the user
does not give is not passed at all. Errors from the package, OS errors (missing files, disk
full, permission denied) and bad arguments are printed as one line (``error: ...``) with exit
status 2, never as a traceback; Ctrl-C prints what the interrupted command kept.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import functools
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


Names = tuple[str, ...]


def cmd_demo(args: argparse.Namespace, demo: Names) -> int:
    from bigram_circuits.app.demo import DemoConfig, run_demo

    run_demo(DemoConfig(**_given(args, demo)))
    return 0


def cmd_train_default(args: argparse.Namespace, train: Names) -> int:
    from bigram_circuits.training import TrainConfig, install_default_model, train_default_model

    metrics = train_default_model(args.out, TrainConfig(**_given(args, train)))
    print(
        f"eval loss {metrics['final_eval_loss_nats']:.3f} nats vs unigram entropy "
        f"{metrics['eval_unigram_entropy_nats']:.3f}; model card: {args.out}/MODEL_CARD.md"
    )
    if args.install:
        print(f"installed into {install_default_model(args.out)}")
    return 0


def cmd_find(args: argparse.Namespace, find: Names, search: Names) -> int:
    from bigram_circuits.app.find import find_command

    table = find_command(**_given(args, find), **_given(args, search))
    print(table.to_string(index=False))
    return 0


def cmd_evaluate(args: argparse.Namespace, evaluate: Names) -> int:
    from bigram_circuits.app.evaluate import evaluate_run

    tables = evaluate_run(args.run, **_given(args, evaluate))
    for name, table in tables.items():
        print(f"\n## {name}\n{table.to_string()}")
    return 0


def cmd_lens(args: argparse.Namespace, lens: Names) -> int:
    from bigram_circuits.app.lens import lens_command

    table = lens_command(args.run, **_given(args, lens))
    print(table.to_string(index=False))
    return 0


def cmd_patch(args: argparse.Namespace, patch: Names) -> int:
    from bigram_circuits.app.patch import patch_command

    table = patch_command(**_given(args, patch))
    print(table.to_string(index=False))
    return 0


def cmd_figures(args: argparse.Namespace, figures: Names, config: Names) -> int:
    from bigram_circuits.app.figures import FiguresConfig, figures_command

    written = figures_command(config=FiguresConfig(**_given(args, config)), **_given(args, figures))
    for path in written:
        print(path)
    return 0


def cmd_build_up(args: argparse.Namespace, build_up: Names, config: Names) -> int:
    """``build-up``: candidates from three methods added to the bigram base (and an optimal base)."""
    from bigram_circuits.app.buildup import BuildUpConfig, build_up_command

    tables = build_up_command(config=BuildUpConfig(**_given(args, config)), **_given(args, build_up))
    print(tables["candidates"].to_string(index=False))
    columns = [
        "task",
        "base",
        "candidate",
        "heads",
        "base_value",
        "full_value",
        "gap",
        "with_candidate",
        "recovered",
        "random_recovered",
        "random_recovered_std",
        "full_minus_recovered",
    ]
    print("\n" + tables["build_up_report"][columns].round(3).to_string(index=False))
    if getattr(args, "out", None) is not None:
        print(f"tables and figure written to {args.out}")
    return 0


def cmd_view(args: argparse.Namespace, view: Names) -> int:
    """``view``: one or two subnetworks as a self-contained offline HTML page."""
    from bigram_circuits.app.view import view_command

    print(view_command(args.run, args.other, **_given(args, view)))
    return 0


def cmd_push(args: argparse.Namespace, push: Names) -> int:
    """``push``: a subnetwork with its model card to a Hugging Face Hub model repo."""
    from bigram_circuits.app.view import push_command

    print(push_command(args.run, **_given(args, push)))
    return 0


# What Ctrl-C leaves behind, per command (every file is written whole, so nothing is half-written).
_RESUMES = "interrupted: completed steps are checkpointed; rerun the same command to resume"
_NOTHING_KEPT = "interrupted: files already written are whole, the rest was not written; rerun the command"
INTERRUPTED = {
    "demo": _RESUMES,
    "find": _RESUMES,
    "figures": "interrupted: finished stages are cached; rerun the same command to resume",
    "train-default": "interrupted: checkpoints written so far are kept; training restarts from step 0 when rerun",
    "evaluate": _NOTHING_KEPT,
    "lens": _NOTHING_KEPT,
    "patch": _NOTHING_KEPT,
    "build-up": _NOTHING_KEPT,
    "view": _NOTHING_KEPT,
    "push": "interrupted: a Hub commit is all or nothing; rerun the command to push",
}


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
    "schedule": "a named schedule (search.SCHEDULES): fast (the defaults), paper, settle, warm_settle, slow; "
    "other options given override it",
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
    "only": "all (every stage) or controls (the faithfulness-controls stage alone; earlier stages from the cache)",
    "resume": "reuse finished runs and continue interrupted ones in the output directory",
    "show_progress": "progress bars",
    "progress": "progress bars",
    "batch_size": "windows per batch",
    "temperature": "sampling temperature of the generations",
    "max_new_tokens": "tokens per generation",
}
_RENAMED = {"granularities": "granularity", "out_dir": "out", "show_progress": "progress", "cache_dir": "cache"}


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


def _literal_choices(hint) -> tuple[str, ...] | None:
    """The values of a ``Literal[...]`` option (``str | None`` and others have none)."""
    if typing.get_origin(hint) is typing.Literal:
        return tuple(str(v) for v in typing.get_args(hint))
    return None


def _show(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    return "None" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@functools.cache
def field_comments(config: type) -> dict[str, str]:
    """``name: type = default  # comment`` lines of a dataclass: the comment is the option's help."""
    try:
        lines = inspect.getsource(config).splitlines()
    except (OSError, TypeError):
        return {}
    found = {}
    for line in lines:
        head, _, comment = line.partition("  # ")
        name = head.strip().split(":")[0]
        if comment and name.isidentifier() and ":" in head:
            found[name] = comment.strip()
    return found


def _options_of(source, names: Sequence[str]) -> list[tuple[str, object, object]]:
    """``(name, type hint, default)`` of dataclass fields or keyword parameters of a function."""
    hints = typing.get_type_hints(source)
    if dataclasses.is_dataclass(source):
        defaults = {
            f.name: f.default_factory()
            if f.default is dataclasses.MISSING  # type: ignore[misc]
            and f.default_factory is not dataclasses.MISSING
            else f.default
            for f in dataclasses.fields(source)
        }
    else:
        defaults = {n: p.default for n, p in inspect.signature(source).parameters.items()}
    # A name the source does not declare is left out (e.g. a wrapper taking **kwargs).
    return [(name, hints[name], defaults[name]) for name in names if name in hints and name in defaults]


def _help_of(source, name: str, helps: dict[str, str] | None) -> str:
    """An option's help: given here, else the dataclass field's comment, else the shared text."""
    comments = field_comments(source) if dataclasses.is_dataclass(source) else {}
    return (helps or {}).get(name) or comments.get(name) or _HELP.get(name, name.replace("_", " "))


def _add_options(
    parser: argparse.ArgumentParser,
    options,
    title: str | None = None,
    required: Sequence[str] = (),
    helps: dict[str, str] | None = None,
    choices: dict[str, Sequence[str]] | None = None,
    parsers: dict[str, collections.abc.Callable[[str], object]] | None = None,
) -> list[str]:
    """Add one ``--flag`` per option (defaults suppressed, so unset options are not passed);
    returns the option names, for :func:`_given`. ``required`` names options the CLI needs
    although the function has a default (e.g. ``find --out``); ``parsers`` replace the parser
    of the option's type hint (e.g. ``find --target``: a registered target; its ``metavar``
    attribute, if any, is shown)."""
    group = parser.add_argument_group(title) if title else parser
    for name, hint, default in options:
        flag = "--" + _RENAMED.get(name, name).replace("_", "-")
        text = (helps or {}).get(name) or _HELP.get(name, name.replace("_", " "))
        if isinstance(default, bool):
            if default:
                group.add_argument(
                    "--no-" + flag[2:],
                    dest=name,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help=f"turn off: {text}",
                )
            else:
                group.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        kind, metavar = _parser_for(hint)
        if name in (parsers or {}):
            kind = parsers[name]
            metavar = getattr(kind, "metavar", metavar)
        needed = default is inspect.Parameter.empty or name in required
        help_text = text if needed or "default" in text else f"{text} (default {_show(default)})"
        allowed = (choices or {}).get(name) or _literal_choices(hint)
        group.add_argument(
            flag,
            dest=name,
            type=kind,
            metavar="{" + ",".join(allowed) + "}" if allowed else metavar,
            required=needed,
            choices=allowed,
            default=argparse.SUPPRESS,
            help=help_text,
        )
    return [name for name, _, _ in options]


def _target_name(text: str) -> str:
    """``find --target``: a registered target name, alias or ``NAME:N`` (the registry of
    :mod:`bigram_circuits.targets`); an unknown one is the registry's one-line error."""
    from bigram_circuits.errors import SearchError
    from bigram_circuits.targets import target_spec

    try:
        target_spec(text)
    except SearchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


_target_name.metavar = "TARGET"  # type: ignore[attr-defined]


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict:
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _fields(config: type, exclude: Sequence[str] = ()) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.name not in exclude]


def build_parser() -> argparse.ArgumentParser:
    """The ``bigram-circuits`` parser; each sub-command's ``func`` takes the parsed namespace."""
    from bigram_circuits.app.buildup import BuildUpConfig, build_up_command
    from bigram_circuits.app.demo import DemoConfig
    from bigram_circuits.app.evaluate import evaluate_run
    from bigram_circuits.app.figures import FiguresConfig, figures_command
    from bigram_circuits.app.find import find_command
    from bigram_circuits.app.lens import lens_command
    from bigram_circuits.app.patch import patch_command
    from bigram_circuits.app.view import push_command, view_command
    from bigram_circuits.circuits.patching import COMPONENTS
    from bigram_circuits.search import SearchConfig
    from bigram_circuits.targets import target_help
    from bigram_circuits.training import TrainConfig

    parser = _OneLineParser(prog="bigram-circuits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler, help: str, description: str | None = None, *, run_argument: bool = False, **groups
    ) -> argparse.ArgumentParser:
        """A sub-command whose handler gets, per keyword of ``groups``, the option names added
        (``run_argument``: a positional RUN directory first)."""
        sub_parser = sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".")
        if run_argument:
            sub_parser.add_argument("run", help="a `bigram-circuits find` run directory (or one lambda_* folder)")
        names = {group: tuple(add(sub_parser)) for group, add in groups.items()}
        sub_parser.set_defaults(func=functools.partial(handler, **names))
        return sub_parser

    def options(source, names: Sequence[str], title: str | None = None, helps: dict[str, str] | None = None, **kwargs):
        helps = {name: _help_of(source, name, helps) for name in names}
        return lambda sub_parser: _add_options(sub_parser, _options_of(source, names), title, helps=helps, **kwargs)

    command(
        "demo",
        cmd_demo,
        "load the default model, evaluate it and find a bigram subnetwork",
        demo=options(
            DemoConfig,
            _fields(DemoConfig),
            helps={
                "lam": "sparsity weight of the demo search",
                "steps": "search steps of the demo (at most)",
                "eval_windows": "held-out windows of 128 tokens",
                "no_search": "only load and evaluate the model",
                "out": "output directory (a finished search there is reused)",
                "granularity": _HELP["granularities"],
            },
        ),
    )

    train = command(
        "train-default",
        cmd_train_default,
        "train the bundled default model from scratch",
        train=options(
            TrainConfig,
            _fields(TrainConfig),
            "training settings (TrainConfig)",
            helps={
                "lr": "peak learning rate (cosine decay to min_lr)",
                "max_steps": "training steps",
                "weight_decay": "AdamW weight decay",
                "seq_len": "tokens per training window",
                "checkpoint_steps": "steps whose weights are kept (Fig 2)",
                "seed": "training seed",
            },
        ),
    )
    train.add_argument("--out", default="runs/default_model", help="output directory (default runs/default_model)")
    train.add_argument("--install", action="store_true", help="copy the result into the package")
    train.add_argument(
        "--steps", dest="max_steps", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )  # the spelling of earlier releases

    find = command(
        "find",
        cmd_find,
        "search bigram (or optimal) subnetworks over a lambda sweep",
        "Search subnetworks over a lambda sweep (weight masks by default).",
        find=options(
            find_command,
            [
                "out_dir",
                "model",
                "corpus",
                "granularities",
                "lambdas",
                "target",
                "seeds",
                "paper",
                "schedule",
                "device",
                "max_train_windows",
                "max_eval_windows",
                "resume",
                "show_progress",
            ],
            required=("out_dir",),
            helps={"target": target_help()},  # the registered targets (bigram_circuits.targets)
            parsers={"target": _target_name},
        ),
        search=options(SearchConfig, _fields(SearchConfig, ("lam", "seed")), "search settings (SearchConfig)"),
    )
    find.add_argument(
        "--seed", dest="seeds", type=lambda text: (int(text),), default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )  # the single-seed spelling of earlier releases

    command(
        "evaluate",
        cmd_evaluate,
        "metrics, ablation, overlap and layer tables of a run",
        run_argument=True,
        evaluate=options(
            evaluate_run,
            [
                "optimal",
                "n_eval_windows",
                "seeds",
                "n_random",
                "temperature",
                "max_new_tokens",
                "batch_size",
                "device",
                "out_dir",
                "show_progress",
            ],
        ),
    )
    command(
        "lens",
        cmd_lens,
        "logit lens, linear lens and rotation of a run's subnetwork",
        run_argument=True,
        lens=options(lens_command, ["n_tokens", "out", "device", "progress"]),
    )
    command(
        "patch",
        cmd_patch,
        "activation patching between a clean and a corrupted prompt",
        patch=options(
            patch_command,
            ["model", "clean", "corrupted", "component", "run", "out", "device"],
            required=("clean", "corrupted"),
            choices={"component": tuple(COMPONENTS)},
            helps={
                "clean": "the clean prompt",
                "corrupted": "the corrupted prompt",
                "run": "a run directory: patch with its subnetwork (and its model)",
                "out": "write the heatmap HTML here",
            },
        ),
    )
    command(
        "figures",
        cmd_figures,
        "regenerate every paper figure and table",
        "Regenerate every paper figure and table (weight masks by default; --granularity neuron,head draws "
        "the coarser masks, e.g. into figures/neuron_head).",
        figures=options(figures_command, ["model", "out_dir", "cache_dir", "device", "png", "show_progress", "only"]),
        config=options(FiguresConfig, _fields(FiguresConfig, ("prompts",)), "figure settings (FiguresConfig)"),
    )
    command(
        "build-up",
        cmd_build_up,
        "add candidate circuits (heads) to the bigram subnetwork and measure behaviours",
        "Candidates from head scores, attribution patching and activation patching; base / base + candidate "
        "/ base + random heads / full / full - candidate on in-context repetition and name copying; overlap "
        "of the base with each circuit.",
        build_up=options(
            build_up_command,
            ["model", "base", "optimal", "out", "device", "png", "progress"],
            required=("base",),
            helps={
                "model": "the model the base was found on",
                "base": "a `find` run (its chosen lambda) or a subnetwork directory",
                "optimal": "an optimal-subnetwork run to compare as a second base",
                "out": "write tables (CSV + Markdown) and the figure here",
            },
        ),
        config=options(
            BuildUpConfig,
            _fields(BuildUpConfig),
            "build-up settings (BuildUpConfig)",
            helps={
                "seeds": "seeds of the random-head controls",
                "seq_len": "tokens per task sequence",
                "top_k": "heads per candidate circuit",
                "seed": "seed of the task sequences",
            },
        ),
    )
    view = command(
        "view",
        cmd_view,
        "one subnetwork, or two compared, as a self-contained offline HTML page",
        "Kept fraction per layer x matrix, a per-matrix drill-down, kept neurons/heads, the metrics and, for "
        "two subnetworks, their overlap per block against the random null; plotly inlined (opens offline).",
        run_argument=True,
        view=options(
            view_command,
            ["out", "n_random"],
            helps={"out": "the HTML file to write"},
        ),
    )
    view.add_argument("other", nargs="?", default=None, help="a second run or subnetwork directory to compare")
    command(
        "push",
        cmd_push,
        "upload a run's subnetwork with its model card to a Hugging Face Hub model repo",
        "Upload the subnetwork (a saved subnetwork or a find run's chosen one) with a generated model card "
        "(README.md) to the Hub in one commit; the token is your `hf auth login` or HF_TOKEN unless --token.",
        run_argument=True,
        push=options(
            push_command,
            ["repo", "private", "token", "commit_message"],
            helps={
                "repo": "the Hub model repo id (owner/name); created if missing",
                "private": "create the repo private",
                "token": "a Hugging Face token (default: the saved login or HF_TOKEN)",
                "commit_message": "the commit message (default: a summary of the subnetwork)",
            },
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch's CPU thread pool exists, so its threads inherit it: subnormal floats flush to
    # zero (a hardening mask's subnormal weights slow CPU matrix products ~200x; search.flush_denormals).
    import torch

    torch.set_flush_denormal(True)
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line (the torchrun entry passes ``args.device`` resolved already)."""
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
        print(INTERRUPTED.get(args.command, _NOTHING_KEPT), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
