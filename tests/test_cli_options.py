"""The CLI is generated from the commands' functions and config dataclasses: every field is an
option with the Python default in its help, unset options are not passed, and Ctrl-C prints
what the interrupted command kept."""

from __future__ import annotations

import dataclasses

import pytest

from bigram_circuits import cli
from bigram_circuits.app.buildup import BuildUpConfig
from bigram_circuits.app.demo import DemoConfig
from bigram_circuits.app.figures import FiguresConfig
from bigram_circuits.search import SearchConfig
from bigram_circuits.training import TrainConfig


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("argv", "config", "skip"),
    [
        (("find",), SearchConfig, ("lam", "seed")),
        (("figures",), FiguresConfig, ("prompts", "granularities")),
        (("demo",), DemoConfig, ()),
        (("build-up",), BuildUpConfig, ()),
        (("train-default",), TrainConfig, ()),
    ],
)
def test_every_config_field_is_an_option_with_its_python_default(capsys, argv, config, skip):
    text = _help(capsys, *argv)
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        flag = field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, bool):
            assert (f"--no-{flag}" if default else f"--{flag}") in text
        else:
            assert f"--{flag} " in text
            # A help text that names its default itself (e.g. "default (bundled), ...") is not repeated.
            assert f"(default {cli._show(default)})" in text or "default (bundled)" in text


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
