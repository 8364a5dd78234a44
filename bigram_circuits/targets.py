"""Search targets and their registry: what a masked model must reproduce, by name.

A :class:`Target` is a loss ``target(logits, tokens, reference_logits)``. Each named target is a
:class:`TargetSpec` in one registry (:func:`register_target`); :meth:`Target.from_name`, the
``--target`` option of ``bigram-circuits find`` (its check and its help text) and ``find`` (whether
to count bigram statistics at all) all read it, so a new target is one :func:`register_target`
call. A spec with an ``argument`` also takes ``NAME:N`` (a non-negative integer, e.g. a seed):
``permuted_contexts:3``.

Built-in targets: ``bigram`` (the paper's: P(next | current) of :class:`BigramStats`),
``full_model`` (aliases ``full``, ``optimal``: the full model's own distribution, the paper's
"optimal subnetwork"), ``next_token`` (the true next token) and the faithfulness controls
``permuted_contexts[:SEED]`` / ``permuted_vocab[:SEED]`` (the bigram target on
:meth:`BigramStats.permuted`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bigram_circuits.errors import SearchError
from bigram_circuits.ngrams import BigramStats

__all__ = [
    "Target",
    "TargetRequest",
    "TargetSpec",
    "register_target",
    "target_help",
    "target_spec",
    "target_specs",
    "unregister_target",
]


def _soft_xent(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over positions of -sum_j softmax(reference)_j log_softmax(logits)_j."""
    probs = torch.softmax(reference.float(), dim=-1)
    return -(probs * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


@dataclass
class Target:
    """What the masked model must reproduce. Build with :meth:`bigram`, :meth:`full_model`,
    :meth:`next_token`, :meth:`custom` or by name (:meth:`from_name`); call as
    ``target(logits, tokens, reference_logits)``.
    ``needs_reference``: the search also runs the unmasked model (no grad) for each batch.
    ``stats``: bigram statistics the search measures each run's ``bigram_r`` against (none: no r).
    ``selection_metric``: the sweep-table column (higher is better) on which
    :func:`~bigram_circuits.search.sweep` chooses its subnetwork (``choose_subnetwork``); ``None``
    or a column without values: no run is chosen."""

    name: str
    loss_fn: Callable[..., torch.Tensor]
    needs_reference: bool = False
    stats: object | None = None
    vocab_size: int | None = None
    selection_metric: str | None = "bigram_r"

    @classmethod
    def bigram(cls, stats: BigramStats) -> Target:
        """Soft cross-entropy against P(next | current) of bigram stats (the paper's target)."""
        return cls(
            "bigram",
            lambda logits, tokens, ref: stats.soft_cross_entropy(logits, tokens),
            stats=stats,
            vocab_size=int(stats.vocab_size),
        )

    @classmethod
    def full_model(cls, vocab_size: int | None = None) -> Target:
        """Soft cross-entropy against the full model's own next-token distribution."""

        def loss(logits, tokens, ref):
            return _soft_xent(logits[..., :vocab_size], ref[..., :vocab_size])

        return cls("full_model", loss, needs_reference=True, vocab_size=vocab_size, selection_metric=None)

    @classmethod
    def next_token(cls, vocab_size: int | None = None) -> Target:
        """Cross-entropy of the true next token (language-modelling loss)."""

        def loss(logits, tokens, ref):
            cut = logits[:, :-1, :vocab_size].float()
            return torch.nn.functional.cross_entropy(cut.flatten(0, 1), tokens[:, 1:].flatten())

        return cls("next_token", loss, vocab_size=vocab_size, selection_metric=None)

    @classmethod
    def custom(cls, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str = "custom") -> Target:
        """Any ``fn(logits [batch, pos, vocab], tokens [batch, pos]) -> scalar tensor``."""
        return cls(name, lambda logits, tokens, ref: fn(logits, tokens))

    @classmethod
    def from_name(cls, name: str, stats: BigramStats | None = None, vocab_size: int | None = None) -> Target:
        """The registered target ``name`` (:func:`target_spec`: a name, an alias or ``NAME:N``),
        built by its spec's factory. Built in: ``"bigram"`` (needs ``stats``), ``"full_model"``
        (``"full"``, ``"optimal"``), ``"next_token"``, and the controls ``"permuted_contexts"`` /
        ``"permuted_vocab"`` (need ``stats``): the bigram target on ``stats.permuted("contexts" |
        "vocab", seed)`` (:meth:`BigramStats.permuted`; seed 0, or ``"permuted_contexts:SEED"``),
        whose ``stats`` (and so the search's r) are the permuted table. A target whose spec
        ``needs_stats`` raises :class:`SearchError` without ``stats``."""
        spec, argument = _lookup(name)
        if spec.needs_stats and stats is None:
            raise SearchError(f"the {name} target needs bigram stats; pass stats=BigramStats...")
        return spec.factory(TargetRequest(name, stats, vocab_size, argument))

    def __call__(self, logits, tokens, reference=None) -> torch.Tensor:
        return self.loss_fn(logits, tokens, reference)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class TargetRequest:
    """What a target factory gets: the ``name`` asked for (as given: ``"permuted_vocab:2"``,
    ``"full"``), the bigram ``stats`` (``None`` unless the spec ``needs_stats`` or the caller had
    them), the model's ``vocab_size`` and the ``NAME:N`` ``argument`` (``None`` when not given)."""

    name: str
    stats: BigramStats | None = None
    vocab_size: int | None = None
    argument: int | None = None


@dataclass(frozen=True)
class TargetSpec:
    """A named target: ``factory(request) -> Target``; ``needs_stats``: it needs bigram statistics
    (``find`` counts them only then); ``aliases``: other names for it; ``argument``: the metavar
    of ``NAME:N`` (a non-negative integer, e.g. ``"SEED"``; ``None``: no argument); ``help``: one
    phrase for ``--help``."""

    name: str
    factory: Callable[[TargetRequest], Target]
    needs_stats: bool = False
    aliases: tuple[str, ...] = ()
    argument: str | None = None
    help: str = ""

    @property
    def usage(self) -> str:
        """The name as ``--help`` and errors show it: ``permuted_vocab[:SEED]``."""
        return f"{self.name}[:{self.argument}]" if self.argument else self.name


_REGISTRY: dict[str, TargetSpec] = {}  # by name, in registration order


def register_target(
    name: str,
    factory: Callable[[TargetRequest], Target],
    *,
    needs_stats: bool = False,
    aliases: tuple[str, ...] = (),
    argument: str | None = None,
    help: str = "",
    replace: bool = False,
) -> TargetSpec:
    """Register a named target (see :class:`TargetSpec`) and return its spec. A name or alias
    already taken by another target is refused unless ``replace`` (which drops that target)."""
    spec = TargetSpec(name, factory, needs_stats, tuple(aliases), argument, help)
    for taken in (name, *spec.aliases):
        if not taken or ":" in taken or taken != taken.strip():
            raise SearchError(f"target name {taken!r} is not usable; use a non-empty name without ':' or spaces")
        owner = next((s for s in _REGISTRY.values() if taken in (s.name, *s.aliases)), None)
        if owner is not None and not replace:
            raise SearchError(f"target name {taken!r} is taken by {owner.name!r}; pass replace=True to replace it")
        if owner is not None:
            _REGISTRY.pop(owner.name)
    _REGISTRY[name] = spec
    return spec


def unregister_target(name: str) -> None:
    """Remove the registered target ``name`` (its aliases go with it)."""
    if _REGISTRY.pop(name, None) is None:
        raise SearchError(f"no target {name!r} is registered; the targets are {_usages()}")


def target_specs() -> tuple[TargetSpec, ...]:
    """Every registered target, in registration order."""
    return tuple(_REGISTRY.values())


def target_spec(name: str) -> TargetSpec:
    """The spec of a target name, alias or ``NAME:N``; an unknown one is one :class:`SearchError`
    line that lists the targets. Checks the name only: builds nothing, needs no statistics."""
    return _lookup(name)[0]


def target_help() -> str:
    """One line for ``--help``: every registered target with its help phrase and aliases."""
    parts = []
    for spec in _REGISTRY.values():
        notes = [spec.help] if spec.help else []
        if spec.aliases:
            notes.append("also " + ", ".join(spec.aliases))
        parts.append(f"{spec.usage} ({'; '.join(notes)})" if notes else spec.usage)
    return ", ".join(parts)


def _usages() -> str:
    usages = [spec.usage for spec in _REGISTRY.values()]
    return ", ".join(usages[:-1]) + " or " + usages[-1] if len(usages) > 1 else "".join(usages)


def _lookup(name: str) -> tuple[TargetSpec, int | None]:
    base, colon, argument = name.partition(":")
    spec = next((s for s in _REGISTRY.values() if base in (s.name, *s.aliases)), None)
    if spec is not None and not colon:
        return spec, None
    if spec is not None and spec.argument and (argument == "" or argument.isdigit()):
        return spec, int(argument or 0)
    raise SearchError(f"unknown target {name!r}; use {_usages()}")


# --------------------------------------------------------------------------- built-in targets


def _permuted(variant: str) -> Callable[[TargetRequest], Target]:
    def build(request: TargetRequest) -> Target:
        table = request.stats.permuted(variant, request.argument or 0)
        return dataclasses.replace(Target.bigram(table), name=request.name)

    return build


register_target("bigram", lambda r: Target.bigram(r.stats), needs_stats=True, help="the paper's")
register_target(
    "full_model",
    lambda r: Target.full_model(r.vocab_size),
    aliases=("full", "optimal"),
    help="the full model's distribution: optimal subnetwork",
)
register_target("next_token", lambda r: Target.next_token(r.vocab_size), help="the true next token")
register_target(
    "permuted_contexts",
    _permuted("contexts"),
    needs_stats=True,
    argument="SEED",
    help="control: bigram rows moved to other contexts; r is against the permuted table",
)
register_target(
    "permuted_vocab",
    _permuted("vocab"),
    needs_stats=True,
    argument="SEED",
    help="control: next tokens permuted within each bigram row; r is against the permuted table",
)
