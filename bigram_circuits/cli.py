"""Command line: ``bigram-circuits demo | train-default | find | evaluate | lens | patch |
figures | build-up | view | push``.

Each sub-command calls one function of the application layer (:mod:`bigram_circuits.app`).
Its options are generated (:mod:`bigram_circuits.app.options`) from that function's keyword
arguments and its config dataclass (``SearchConfig``, ``FiguresConfig``, ``DemoConfig``,
``BuildUpConfig``, ``TrainConfig``; a nested config's fields are options of their own), so
``--help`` shows the Python API's defaults and no default is written twice, and each help text
is the comment on its field or parameter; an option the user does not give is not passed at all.
Errors from the package, OS errors (missing files, disk full, permission denied) and bad
arguments are printed as one line (``error: ...``) with exit status 2, never as a traceback;
Ctrl-C prints what the interrupted command kept.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

from bigram_circuits.app.options import add_options, build, given, options_of
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

    run_demo(build(DemoConfig, given(args, demo)))
    return 0


def cmd_train_default(args: argparse.Namespace, train: Names) -> int:
    from bigram_circuits.training import TrainConfig, install_default_model, train_default_model

    metrics = train_default_model(args.out, build(TrainConfig, given(args, train)))
    print(
        f"eval loss {metrics['final_eval_loss_nats']:.3f} nats vs unigram entropy "
        f"{metrics['eval_unigram_entropy_nats']:.3f}; model card: {args.out}/MODEL_CARD.md"
    )
    if args.install:
        print(f"installed into {install_default_model(args.out)}")
    return 0


def cmd_find(args: argparse.Namespace, find: Names, search: Names) -> int:
    from bigram_circuits.app.find import find_command

    table = find_command(**given(args, find), **given(args, search))
    print(table.to_string(index=False))
    return 0


def cmd_evaluate(args: argparse.Namespace, evaluate: Names) -> int:
    from bigram_circuits.app.evaluate import evaluate_run

    tables = evaluate_run(args.run, **given(args, evaluate))
    for name, table in tables.items():
        print(f"\n## {name}\n{table.to_string()}")
    return 0


def cmd_lens(args: argparse.Namespace, lens: Names) -> int:
    from bigram_circuits.app.lens import lens_command

    table = lens_command(args.run, **given(args, lens))
    print(table.to_string(index=False))
    return 0


def cmd_patch(args: argparse.Namespace, patch: Names) -> int:
    from bigram_circuits.app.patch import patch_command

    table = patch_command(**given(args, patch))
    print(table.to_string(index=False))
    return 0


def cmd_figures(args: argparse.Namespace, figures: Names, config: Names) -> int:
    from bigram_circuits.app.figures import FiguresConfig, figures_command

    written = figures_command(config=build(FiguresConfig, given(args, config)), **given(args, figures))
    for path in written:
        print(path)
    return 0


def cmd_build_up(args: argparse.Namespace, build_up: Names, config: Names) -> int:
    """``build-up``: candidates from three methods added to the bigram base (and an optimal base)."""
    from bigram_circuits.app.buildup import BuildUpConfig, build_up_command

    tables = build_up_command(config=build(BuildUpConfig, given(args, config)), **given(args, build_up))
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

    print(view_command(args.run, args.other, **given(args, view)))
    return 0


def cmd_push(args: argparse.Namespace, push: Names) -> int:
    """``push``: a subnetwork with its model card to a Hugging Face Hub model repo."""
    from bigram_circuits.app.view import push_command

    print(push_command(args.run, **given(args, push)))
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


# ----------------------------------------------------------------------------- options
#
# Options are generated from the config dataclasses and the command functions' keyword arguments
# (bigram_circuits.app.options), so `--help` shows the Python API's defaults and each help text is
# the comment on its field or parameter. An option the user does not give is not passed at all.


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

    def options(
        source,
        names: Sequence[str] | None = None,
        title: str | None = None,
        *,
        exclude: Sequence[str] = (),
        required: Sequence[str] = (),
        helps: dict[str, str] | None = None,
        **kwargs,
    ):
        found = options_of(source, names, exclude=exclude, required=required, helps=helps)
        return lambda sub_parser: add_options(sub_parser, found, title, **kwargs)

    command(
        "demo",
        cmd_demo,
        "load the default model, evaluate it and find a bigram subnetwork",
        demo=options(DemoConfig),
    )

    train = command(
        "train-default",
        cmd_train_default,
        "train the bundled default model from scratch",
        train=options(TrainConfig, title="training settings (TrainConfig)"),
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
        search=options(SearchConfig, title="search settings (SearchConfig)", exclude=("lam", "seed")),
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
        ),
    )
    command(
        "figures",
        cmd_figures,
        "regenerate every paper figure and table",
        "Regenerate every paper figure and table (weight masks by default; --granularity neuron,head draws "
        "the coarser masks, e.g. into figures/neuron_head).",
        figures=options(figures_command, ["model", "out_dir", "cache_dir", "device", "png", "show_progress", "only"]),
        config=options(FiguresConfig, title="figure settings (FiguresConfig)", exclude=("prompts",)),
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
        ),
        config=options(BuildUpConfig, title="build-up settings (BuildUpConfig)"),
    )
    view = command(
        "view",
        cmd_view,
        "one subnetwork, or two compared, as a self-contained offline HTML page",
        "Kept fraction per layer x matrix, a per-matrix drill-down, kept neurons/heads, the metrics and, for "
        "two subnetworks, their overlap per block against the random null; plotly inlined (opens offline).",
        run_argument=True,
        view=options(view_command, ["out", "n_random"]),
    )
    view.add_argument("other", nargs="?", default=None, help="a second run or subnetwork directory to compare")
    command(
        "push",
        cmd_push,
        "upload a run's subnetwork with its model card to a Hugging Face Hub model repo",
        "Upload the subnetwork (a saved subnetwork or a find run's chosen one) with a generated model card "
        "(README.md) to the Hub in one commit; the token is your `hf auth login` or HF_TOKEN unless --token.",
        run_argument=True,
        push=options(push_command, ["repo", "private", "token", "commit_message"]),
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
