"""The CLI is generated from the commands' functions and config dataclasses: every field is an
option with the Python default in its help, unset options are not passed, and Ctrl-C prints
what the interrupted command kept."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from bigram_circuits import cli
from bigram_circuits.app import options
from bigram_circuits.app.buildup import BuildUpConfig
from bigram_circuits.app.demo import DemoConfig
from bigram_circuits.app.figures import FiguresConfig
from bigram_circuits.search import SearchConfig
from bigram_circuits.training import TrainConfig


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def _expected_options(config: type, skip: tuple[str, ...]) -> list[tuple[str, object]]:
    """``(flag, default)`` of every field of ``config``, a nested config's fields flattened (only
    those its ``nested_options`` name, under their flag names)."""
    found = []
    defaults = config()
    for field in dataclasses.fields(config):
        value = getattr(defaults, field.name)
        if field.name in skip:
            continue
        if dataclasses.is_dataclass(value):
            names = field.metadata.get("options") or [f.name for f in dataclasses.fields(value)]
            flags = field.metadata.get("flags", {})
            found += [(flags.get(name, name), getattr(value, name)) for name in names if name not in skip]
        else:
            found.append((options.FLAGS.get(field.name, field.name), value))
    return found


@pytest.mark.parametrize(
    ("argv", "config", "skip"),
    [
        (("find",), SearchConfig, ("lam", "seed")),
        (("figures",), FiguresConfig, ("prompts",)),
        (("demo",), DemoConfig, ()),
        (("build-up",), BuildUpConfig, ()),
        (("train-default",), TrainConfig, ()),
    ],
)
def test_every_config_field_is_an_option_with_its_python_default(capsys, argv, config, skip):
    text = _help(capsys, *argv)
    for name, default in _expected_options(config, skip):
        flag = name.replace("_", "-")
        if isinstance(default, bool):
            assert (f"--no-{flag}" if default else f"--{flag}") in text
        else:
            assert f"--{flag} " in text
            # A help text that names its default itself (e.g. "default (bundled), ...") is not repeated.
            assert f"(default {options._show(default)})" in text or "default (bundled)" in text


def test_nested_search_settings_keep_their_flags_and_reach_the_config():
    """FiguresConfig and DemoConfig nest SearchConfig: its fields keep their flat flags
    (``--max-steps``; the demo's ``--steps``), and what is not given keeps the pipeline's default."""
    parser = cli.build_parser()
    args = parser.parse_args(["figures", "--max-steps", "5", "--lr", "0.02", "--seed", "3"])
    config = options.build(FiguresConfig, options.given(args, args.func.keywords["config"]))
    assert config.search.max_steps == 5 and config.search.lr == 0.02 and config.seed == 3
    assert config.search.batch_size == FiguresConfig().search.batch_size == 8
    assert config.search_config().seed == 3 and config.search_config().checkpoint_every == 25
    args = parser.parse_args(["demo", "--steps", "3", "--lam", "2"])
    demo = options.build(DemoConfig, options.given(args, args.func.keywords["demo"]))
    assert (demo.search.max_steps, demo.search.lam, demo.search.seq_len) == (3, 2.0, 64)


def test_every_option_has_a_help_text():
    """Each help text comes from the comment on its field or parameter (or the shared one), never
    only the option's name."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, sub_parser in commands.items():
        for action in sub_parser._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS):
                continue
            text = action.help.removeprefix("turn off: ").split(" (default")[0]
            assert text != action.dest.split(".")[-1].replace("_", " "), (command, action.option_strings)


def test_help_texts_are_the_comments_on_fields_and_parameters(capsys):
    assert "mask learning rate (default None: per granularity" in _help(capsys, "find")  # SearchConfig.lr
    assert "a named schedule (search.SCHEDULES)" in _help(capsys, "find")  # find_command's parameter
    text = _help(capsys, "figures")
    assert "--lr FLOAT mask learning rate" in text  # the same field, nested in FiguresConfig
    assert "lambdas of the bigram sweep (Fig 1, Table 1)" in text  # FiguresConfig.bigram_lambdas
    assert "torch device (cpu, cuda, cuda:1, ...)" in text  # the shared parameter
    assert "peak learning rate (cosine decay to min_lr)" in _help(capsys, "train-default")  # TrainConfig.lr


@dataclasses.dataclass(frozen=True)
class _Inner:
    rate: float | None = None  # the rate
    # a comment above the field
    # over two lines
    names: tuple[str, ...] = ("a", "b")
    hidden: int = 1  # not an option


@dataclasses.dataclass(frozen=True)
class _Outer:
    path: Path = Path("out")  # where it goes
    inner: _Inner = dataclasses.field(
        default_factory=lambda: _Inner(rate=0.5),
        metadata=options.nested_options(("names", "rate"), flags={"rate": "speed"}),
    )
    count: int = 3
    verbose: bool = False  # say more


def test_generator_flattens_nested_dataclasses():
    found = options.options_of(_Outer)
    assert [(o.dest, o.flag) for o in found] == [
        ("path", "--path"),
        ("inner.names", "--names"),
        ("inner.rate", "--speed"),
        ("count", "--count"),
        ("verbose", "--verbose"),
    ]
    assert {o.dest: o.help for o in found} == {
        "path": "where it goes",
        "inner.names": "a comment above the field over two lines",
        "inner.rate": "the rate",
        "count": "count",
        "verbose": "say more",
    }
    assert next(o for o in found if o.dest == "inner.rate").default == 0.5  # the outer default's value

    for lists, argv, names in [
        ("comma", ["--names", "x,y", "--speed", "none", "--path", "p"], ("x", "y")),
        ("spaces", ["--names", "x", "y", "--speed", "none", "--path", "p"], ("x", "y")),
    ]:
        parser = argparse.ArgumentParser()
        dests = options.add_options(parser, found, lists=lists)
        values = options.given(parser.parse_args(argv), dests)
        assert values == {"inner.names": names, "inner.rate": None, "path": Path("p")}
        config = options.build(_Outer, values)
        assert config == _Outer(path=Path("p"), inner=_Inner(rate=None, names=names))
        again = options.arguments(config, _Outer(), found, lists=lists)  # the reverse: the options given
        assert again == ["--path", "p", "--names", *(["x,y"] if lists == "comma" else ["x", "y"]), "--speed", "None"]
        assert options.build(_Outer, options.given(parser.parse_args(again), dests)) == config
    parser = argparse.ArgumentParser()
    dests = options.add_options(parser, found)
    assert options.given(parser.parse_args([]), dests) == {}  # nothing given: nothing passed
    assert options.build(_Outer, {}) == _Outer()


def test_unset_options_are_not_passed(monkeypatch):
    import functools

    import pandas as pd

    import bigram_circuits.app.find as find_module

    seen = {}

    @functools.wraps(find_module.find_command)  # the same signature, so the same options
    def fake_find(**kwargs):
        seen.update(kwargs)
        return pd.DataFrame()

    monkeypatch.setattr(find_module, "find_command", fake_find)
    assert cli.main(["find", "--out", "x", "--lambdas", "1,10", "--max-steps", "5"]) == 0
    assert seen == {"out_dir": "x", "lambdas": (1.0, 10.0), "max_steps": 5}


@pytest.mark.parametrize(
    ("command", "module", "function", "expected"),
    [
        ("find", "bigram_circuits.app.find", "find_command", "checkpointed; rerun the same command to resume"),
        ("lens", "bigram_circuits.app.lens", "lens_command", "the rest was not written; rerun the command"),
    ],
)
def test_interrupt_message_says_what_the_command_kept(capsys, monkeypatch, command, module, function, expected):
    import functools
    import importlib

    real = getattr(importlib.import_module(module), function)

    @functools.wraps(real)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), function, interrupted)
    argv = ["find", "--out", "x"] if command == "find" else ["lens", "some/run"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
