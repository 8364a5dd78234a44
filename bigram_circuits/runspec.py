"""How to run a bridge: the full model, or a subnetwork kept alone or removed.

:class:`RunSpec` names a run (the full model, or a subnetwork kept or ablated; its mode is
checked when it is made) and :meth:`RunSpec.context` is the ``with`` block under which the
bridge computes it. Every analysis takes its run as one argument, ``run``, a :data:`RunLike`:
a ``RunSpec``, ``None`` (the full model), a subnetwork (kept), or a ``(subnetwork, mode)``
pair, which :meth:`RunSpec.coerce` turns into a ``RunSpec``. Anything with an
``applied(bridge, mode)`` method is a subnetwork here (:class:`SubnetworkLike`): a
:class:`~bigram_circuits.subnetwork.Subnetwork`, a circuit
:class:`~bigram_circuits.circuits.ablation.Candidate`, or a test double. The evaluation core,
the lenses, similarity, patching, the ablations and the build-up all take runs in this form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.errors import MaskError
from bigram_circuits.masks import RunMode, check_run_mode

__all__ = ["MaskedSubnetwork", "RunLike", "RunSpec", "SubnetworkLike", "run_context"]


@runtime_checkable
class SubnetworkLike(Protocol):
    """Anything that can be applied to a bridge for the duration of a ``with`` block
    (:class:`~bigram_circuits.subnetwork.Subnetwork`, :class:`~bigram_circuits.circuits.ablation.Candidate`)."""

    def applied(self, bridge: TransformerBridge, mode: RunMode = "keep") -> ContextManager[Any]:
        """Keep only the subnetwork (``"keep"``) or remove it (``"ablate"``) inside the block."""
        ...


@runtime_checkable
class MaskedSubnetwork(SubnetworkLike, Protocol):
    """A subnetwork given by boolean masks keyed by mask key (see :class:`bigram_circuits.masks.MaskKey`)
    that can make a copy of itself with other masks: what
    :func:`~bigram_circuits.circuits.ablation.add_candidate` combines with a candidate."""

    masks: Mapping[str, torch.Tensor]
    metadata: Mapping[str, Any]

    def with_masks(self, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> MaskedSubnetwork:
        """The same kind of subnetwork, of the same model, with ``masks`` (every key) and ``metadata``."""
        ...


@dataclass(frozen=True)
class RunSpec:
    """How to run the bridge: full model (``subnetwork=None``) or a subnetwork kept/ablated."""

    subnetwork: SubnetworkLike | None = None
    mode: RunMode = "keep"
    label: str | None = None

    def __post_init__(self) -> None:
        check_run_mode(self.mode)
        if self.subnetwork is not None and not isinstance(self.subnetwork, SubnetworkLike):
            raise MaskError(
                f"a run's subnetwork needs an applied(bridge, mode) method; got {type(self.subnetwork).__name__}"
            )

    @classmethod
    def coerce(cls, run: RunLike) -> RunSpec:
        """Accept a RunSpec, ``None`` (full model), a subnetwork, or a ``(subnetwork, mode)`` pair."""
        if isinstance(run, RunSpec):
            return run
        if run is None:
            return cls()
        if isinstance(run, tuple):
            if len(run) != 2:
                raise MaskError("a run tuple must be (subnetwork_or_None, mode), e.g. (subnetwork, 'keep')")
            return cls(subnetwork=run[0], mode=run[1])
        return cls(subnetwork=run)

    def context(self, bridge: TransformerBridge) -> ContextManager[Any]:
        """The context manager under which the bridge computes this run:
        ``subnetwork.applied(bridge, mode=mode)``, or a no-op context for the full model."""
        if self.subnetwork is None:
            return contextlib.nullcontext()
        return self.subnetwork.applied(bridge, mode=self.mode)

    @property
    def name(self) -> str:
        """A short label for tables: the given label, ``full`` or ``subnetwork:keep``/``:ablate``."""
        if self.label is not None:
            return self.label
        return "full" if self.subnetwork is None else f"subnetwork:{self.mode}"


# What an analysis's ``run`` argument accepts (:meth:`RunSpec.coerce` turns it into a RunSpec).
RunLike = RunSpec | tuple | SubnetworkLike | None


def run_context(
    bridge: TransformerBridge, subnetwork: SubnetworkLike | None = None, mode: RunMode = "keep"
) -> ContextManager[Any]:
    """``RunSpec(subnetwork, mode).context(bridge)``: ``subnetwork.applied(bridge, mode=mode)``, or a
    no-op context for the full model."""
    return RunSpec(subnetwork, mode).context(bridge)
