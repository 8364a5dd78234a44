"""Command-line options generated from config dataclasses and command functions: the one option
generator of ``bigram-circuits`` (:mod:`bigram_circuits.cli`) and of the study script
(``benchmarks/smollm2_study.py``).

An option is a dataclass field or a keyword parameter of a command function. A field holding a
dataclass (``FiguresConfig.search``, a :class:`~bigram_circuits.search.SearchConfig`) is
flattened: its fields are options of their own (``--lr``, ``--max-steps``), optionally only
those its :func:`nested_options` name. The flag is the name with dashes (:data:`FLAGS` and
:func:`nested_options` rename a few); the type comes from the annotation (int, float, str,
``Path``, ``X | None`` (``none`` gives None), ``Literal`` choices, tuples: comma-separated or
several values); the default is the Python default; the help text is the comment written on the
field or parameter (:func:`field_comments`), else the comment of the same name in
:class:`SharedParameters`.

Defaults are not put in the parsed namespace: an option the user does not give is not passed
(:func:`given`), so the Python default applies, and :func:`build` makes the config of the given
options. :func:`arguments` is the reverse: the options that turn one config into another.
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import dataclasses
import functools
import inspect
import io
import shlex
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FLAGS",
    "Option",
    "SharedParameters",
    "add_options",
    "arguments",
    "build",
    "field_comments",
    "given",
    "nested_options",
    "options_of",
]

# Flag names that differ from the parameter's name in every command.
FLAGS = {"granularities": "granularity", "out_dir": "out", "show_progress": "progress", "cache_dir": "cache"}

Lists = Literal["comma", "spaces"]


class SharedParameters:
    """Keyword parameters that several commands take, each with its help text written once: the
    help of a field or parameter of that name that has no comment of its own."""

    model: str  # default (bundled), smollm2, a Hugging Face model directory, a GGUF file or a hub id
    corpus: str  # default (bundled), a named source or a text file
    granularities: tuple[str, ...]  # mask unit(s), comma-separated: weight (the paper's), neuron, head
    device: str  # torch device (cpu, cuda, cuda:1, ...)
    batch_size: int  # windows per batch
    out_dir: str  # output directory
    png: bool  # PNGs next to the HTML (needs Chromium)
    show_progress: bool  # progress bars
    progress: bool  # progress bars


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option: ``dest`` is where its value goes (``search.lr`` for a field of a
    nested dataclass), ``default`` is ``inspect.Parameter.empty`` for a parameter without one."""

    dest: str
    flag: str
    hint: Any
    default: Any
    help: str
    required: bool = False


def nested_options(options: Sequence[str] | None = None, *, flags: Mapping[str, str] | None = None) -> dict:
    """The ``metadata`` of a field holding a nested config
    (``search: SearchConfig = field(default_factory=..., metadata=nested_options(...))``):
    ``options`` names the nested fields that are command-line options (default: all), in their
    order; ``flags`` renames some of them (``{"max_steps": "steps"}``: ``--steps``)."""
    return {"options": tuple(options) if options is not None else None, "flags": dict(flags or {})}


# ----------------------------------------------------------------------------- help texts

_NOT_HELP = ("type:", "noqa", "pragma", "fmt:")


@functools.cache
def field_comments(source: Any) -> dict[str, str]:
    """The help text of each field of a dataclass (or keyword parameter of a function): the
    comment on its own line(s) (``name: type = default  # help``), else the comment lines right
    above it. A line that holds several parameters gives none of them a comment."""
    try:
        text = textwrap.dedent(inspect.getsource(source))
        node = ast.parse(text).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return {}
    comments = {
        token.start[0]: token.string[1:].strip()
        for token in tokenize.generate_tokens(io.StringIO(text).readline)
        if token.type == tokenize.COMMENT and not token.string[1:].strip().startswith(_NOT_HELP)
    }
    if isinstance(node, ast.ClassDef):
        spans = [
            (item.target.id, item.lineno, item.end_lineno or item.lineno)
            for item in node.body
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
        ]
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        arguments = node.args
        positional = arguments.posonlyargs + arguments.args
        defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
        pairs = list(zip(positional, defaults)) + list(zip(arguments.kwonlyargs, arguments.kw_defaults))
        spans = [(arg.arg, arg.lineno, (default or arg).end_lineno or arg.lineno) for arg, default in pairs]
    else:
        return {}
    lines = text.splitlines()
    found = {}
    for name, first, last in spans:
        if any(other != name and start <= last and first <= end for other, start, end in spans):
            continue  # several parameters on one line: whose comment is it?
        own = [comments[n] for n in range(first, last + 1) if n in comments]
        if not own:  # the comment lines right above
            above = first - 1
            while above in comments and lines[above - 1].lstrip().startswith("#"):
                above -= 1
            own = [comments[n] for n in range(above + 1, first)]
        if own:
            found[name] = " ".join(own)
    return found


def _help(source: Any, name: str) -> str:
    return field_comments(source).get(name) or field_comments(SharedParameters).get(name) or name.replace("_", " ")


# ----------------------------------------------------------------------------- options of a source


def _defaults(config: Any) -> Any:
    """An instance holding the defaults: ``config`` itself, or its class's default instance."""
    return config() if isinstance(config, type) else config


def options_of(
    source: Any,
    names: Iterable[str] | None = None,
    *,
    exclude: Iterable[str] = (),
    required: Iterable[str] = (),
    helps: Mapping[str, str] | None = None,
) -> list[Option]:
    """The options of a dataclass (a class, or an instance whose values are the defaults; every
    field unless ``names``, nested dataclasses flattened) or of a function's keyword parameters
    (``names``). ``exclude`` leaves out fields (``"prompts"``, or ``"search.seed"`` in a nested
    one); ``required`` names options the command needs although the Python API has a default;
    ``helps`` gives a help text that cannot be a comment (e.g. one built from a registry)."""
    exclude, required, helps = set(exclude), set(required), dict(helps or {})
    if dataclasses.is_dataclass(source):
        found = _dataclass_options(source, names, exclude, "", {})
    else:
        hints = typing.get_type_hints(source)
        parameters = inspect.signature(source).parameters
        # A name the function does not declare is left out (e.g. a wrapper taking **kwargs).
        found = [
            Option(name, FLAGS.get(name, name), hints[name], parameters[name].default, _help(source, name))
            for name in names or ()
            if name in hints and name in parameters and name not in exclude
        ]
    return [
        dataclasses.replace(
            option,
            flag="--" + option.flag.replace("_", "-"),
            help=helps.get(option.dest, option.help),
            required=option.default is inspect.Parameter.empty or option.dest in required,
        )
        for option in found
    ]


def _dataclass_options(
    config: Any, names: Iterable[str] | None, exclude: set[str], prefix: str, flags: Mapping[str, str]
) -> list[Option]:
    cls = config if isinstance(config, type) else type(config)
    defaults = _defaults(config)
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    found = []
    for name in fields if names is None else names:
        dest = prefix + name
        if dest in exclude or name not in fields:
            continue
        value = getattr(defaults, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # nested: flattened
            meta = fields[name].metadata
            found += _dataclass_options(value, meta.get("options"), exclude, dest + ".", meta.get("flags", {}))
        else:
            flag = flags.get(name, FLAGS.get(name, name))
            found.append(Option(dest, flag, hints[name], value, _help(cls, name)))
    return found


# ----------------------------------------------------------------------------- argparse


def _element_parser(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from exc

    return parse


def _scalar_parser(kind: type, optional: bool) -> Callable[[str], Any]:
    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from exc

    parse.__name__ = kind.__name__
    return parse


_SEQUENCES = (tuple, list, collections.abc.Sequence)
_SCALARS = (int, float, str, Path)


def _parser_for(hint: Any, lists: Lists) -> tuple[Callable[[str], Any], str, bool]:
    """An argparse ``type`` for a type hint, its metavar, and whether it takes several values."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        sequences = [k for k in kinds if typing.get_origin(k) in _SEQUENCES]
        if sequences:  # e.g. str | Sequence[str]: a list
            return _parser_for(sequences[0], lists)
        kind = kinds[0] if kinds[0] in _SCALARS else str  # e.g. str | os.PathLike
        return _scalar_parser(kind, type(None) in args), kind.__name__.upper(), False
    if typing.get_origin(hint) in _SEQUENCES:
        kind = args[0] if args and args[0] in _SCALARS else str
        if lists == "spaces":
            return _scalar_parser(kind, False), kind.__name__.upper(), True
        return _element_parser(kind), f"{kind.__name__.upper()},...", False
    kind = hint if hint in _SCALARS else str
    return _scalar_parser(kind, False), kind.__name__.upper(), False


def _literal_choices(hint: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal[...]`` option (``str | None`` and others have none)."""
    if typing.get_origin(hint) is typing.Literal:
        return tuple(str(v) for v in typing.get_args(hint))
    return None


def _show(value: Any, lists: Lists = "comma") -> str:
    if isinstance(value, (tuple, list)):
        return (" " if lists == "spaces" else ",").join(_show(v, lists) for v in value)
    if value is None:
        return "None"
    if isinstance(value, float):
        return f"{value:g}"
    return shlex.quote(str(value)) if lists == "spaces" else str(value)


def add_options(
    parser: argparse.ArgumentParser,
    options: Sequence[Option],
    title: str | None = None,
    *,
    choices: Mapping[str, Sequence[str]] | None = None,
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
    lists: Lists = "comma",
) -> tuple[str, ...]:
    """Add one ``--flag`` per option (a ``True`` bool is ``--no-flag``); returns their dests, for
    :func:`given`. Defaults are suppressed, so an option not given is not in the namespace.
    ``parsers`` replace the parser of the option's type hint (e.g. ``find --target``: a
    registered target; its ``metavar`` attribute, if any, is shown); tuples are comma-separated
    (``lists="comma"``) or several values (``"spaces"``)."""
    group = parser.add_argument_group(title) if title else parser
    for option in options:
        text = option.help
        if isinstance(option.default, bool):
            if option.default:
                flag, action, text = "--no-" + option.flag[2:], "store_false", f"turn off: {text}"
            else:
                flag, action = option.flag, "store_true"
            group.add_argument(flag, dest=option.dest, action=action, default=argparse.SUPPRESS, help=text)
            continue
        kind, metavar, several = _parser_for(option.hint, lists)
        if option.dest in (parsers or {}):
            kind = parsers[option.dest]
            metavar = getattr(kind, "metavar", metavar)
        if not option.required and "default" not in text:
            text = f"{text} (default {_show(option.default, lists)})"
        allowed = (choices or {}).get(option.dest) or _literal_choices(option.hint)
        group.add_argument(
            option.flag,
            dest=option.dest,
            type=kind,
            nargs="+" if several else None,
            metavar="{" + ",".join(allowed) + "}" if allowed else metavar,
            required=option.required,
            choices=allowed,
            default=argparse.SUPPRESS,
            help=text,
        )
    return tuple(option.dest for option in options)


def given(args: argparse.Namespace, dests: Iterable[str]) -> dict[str, Any]:
    """The options of ``dests`` the user gave (several values as a tuple)."""
    values = {dest: getattr(args, dest) for dest in dests if hasattr(args, dest)}
    return {dest: tuple(value) if isinstance(value, list) else value for dest, value in values.items()}


# ----------------------------------------------------------------------------- configs from options


def build(config: Any, values: Mapping[str, Any]) -> Any:
    """``config`` (a dataclass, or an instance holding the defaults) with ``values`` set; a
    dotted name (``search.lr``) sets a field of a nested dataclass."""
    base = _defaults(config)
    top: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {}
    for dest, value in values.items():
        head, _, rest = dest.partition(".")
        if rest:
            inner.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, sub in inner.items():
        top[head] = build(top.get(head, getattr(base, head)), sub)
    return dataclasses.replace(base, **top)


def _value(config: Any, dest: str) -> Any:
    for part in dest.split("."):
        config = getattr(config, part)
    return config


def arguments(config: Any, base: Any, options: Iterable[Option], *, lists: Lists = "comma") -> list[str]:
    """The command-line arguments that turn ``base`` into ``config``: each option whose value
    differs, with its value (quoted where a shell needs it)."""
    found: list[str] = []
    for option in options:
        value = _value(config, option.dest)
        if value == _value(base, option.dest):
            continue
        if isinstance(value, bool):
            found.append(option.flag if value else "--no-" + option.flag[2:])
        elif isinstance(value, (tuple, list)) and lists == "spaces":
            found += [option.flag, *(_show(v, lists) for v in value)]
        else:
            found += [option.flag, _show(value, lists)]
    return found
