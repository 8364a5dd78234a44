"""The vocabulary of masks: the ``Literal`` names (granularities, blocks, matrices, run modes,
parameterizations, penalty weightings), the built-in tuples of them, and the mask keys:
:class:`MaskKey`, the one place the built-in key strings are built and parsed, and
:class:`TypedMaskKey`, what any granularity's typed key provides."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from bigram_circuits.errors import MaskError

__all__ = [
    "ATTN_MATRICES",
    "DEFAULT_GRANULARITIES",
    "GRANULARITIES",
    "MLP_MATRICES",
    "PARAMETERIZATIONS",
    "RUN_MODES",
    "Block",
    "BuiltinGranularity",
    "Granularity",
    "MaskKey",
    "MaskKind",
    "Matrix",
    "ParameterizationName",
    "PenaltyWeighting",
    "RunMode",
    "TypedMaskKey",
    "UnitGranularity",
    "check_run_mode",
]


# A granularity's registered name (``GranularitySpec.name``): the built-ins "neuron", "head" and
# "weight", or any name given to :func:`register_granularity`.
Granularity = str
BuiltinGranularity = Literal["neuron", "head", "weight"]
UnitGranularity = Literal["neuron", "head"]
ParameterizationName = Literal["continuous", "hard_concrete"]
PenaltyWeighting = Literal["params", "entries"]
RunMode = Literal["keep", "ablate"]  # keep only the masked-in entries, or remove them (keep the complement)
Block = Literal["attn", "mlp"]
Matrix = Literal["q", "k", "v", "o", "in", "gate", "out"]
MaskKind = Literal["head", "neuron", "q", "k", "v", "o", "in", "gate", "out"]

# The built-in granularities (:func:`registered_granularities` adds any registered since).
GRANULARITIES: tuple[BuiltinGranularity, ...] = ("neuron", "head", "weight")
# The paper's unit: what searches, sweeps, ``find`` and ``figures`` use unless told otherwise.
DEFAULT_GRANULARITIES: tuple[Granularity, ...] = ("weight",)
PARAMETERIZATIONS: tuple[ParameterizationName, ...] = ("continuous", "hard_concrete")
RUN_MODES: tuple[RunMode, ...] = ("keep", "ablate")
ATTN_MATRICES: tuple[Matrix, ...] = ("q", "k", "v", "o")
MLP_MATRICES: tuple[Matrix, ...] = ("in", "gate", "out")

# Unit granularity -> (block, hook point under the block) it is applied at.
_UNIT_HOOKS: dict[str, tuple[Block, str]] = {"head": ("attn", "hook_z"), "neuron": ("mlp", "hook_post")}
_KEY_PATTERN = re.compile(r"blocks\.(0|[1-9][0-9]*)\.(attn|mlp)\.(?:(hook_z|hook_post)|(q|k|v|o|in|gate|out)\.weight)")
_UNKNOWN_KEY = "unknown mask key {!r}; keys look like blocks.0.mlp.hook_post or blocks.0.attn.q.weight"


def check_run_mode(mode: object) -> RunMode:
    """``mode`` if it is a :data:`RunMode`, else a MaskError: the one check of a run mode, made where a
    mode enters (:class:`~bigram_circuits.runspec.RunSpec` for the analyses,
    :func:`~bigram_circuits.masks.apply_binary_masks` for a subnetwork's ``applied``)."""
    if mode not in RUN_MODES:
        raise MaskError(f"run mode must be 'keep' or 'ablate', got {mode!r}")
    return mode


def _block_of(kind: str) -> Block | None:
    if kind in _UNIT_HOOKS:
        return _UNIT_HOOKS[kind][0]
    if kind in ATTN_MATRICES:
        return "attn"
    if kind in MLP_MATRICES:
        return "mlp"
    return None


@dataclass(frozen=True, order=True)
class MaskKey:
    """One mask key: the heads (``kind="head"``) or neurons (``"neuron"``) of a layer, or one of
    its weight matrices (``kind`` a matrix name). The only place mask-key strings are built and
    parsed; ``str(key)`` is the string used in mask dicts and saved files:

    - heads: ``blocks.{L}.attn.hook_z`` (:attr:`hook_name`, the HookPoint it gates),
    - neurons: ``blocks.{L}.mlp.hook_post``,
    - weights: ``blocks.{L}.attn.{q,k,v,o}.weight`` / ``blocks.{L}.mlp.{in,gate,out}.weight``
      (:attr:`parameter_name`).

    ``MaskKey.parse(str(key)) == key`` for every key.
    """

    layer: int
    block: Block
    kind: MaskKind

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise MaskError(f"a mask key's layer must be an int >= 0, got {self.layer!r}")
        expected = _block_of(self.kind)
        if expected is None or expected != self.block:
            raise MaskError(
                f"no mask key for kind {self.kind!r} in block {self.block!r}; kinds: head (attn), neuron (mlp), "
                f"{', '.join(ATTN_MATRICES)} (attn), {', '.join(MLP_MATRICES)} (mlp)"
            )

    @classmethod
    def head(cls, layer: int) -> MaskKey:
        """The key of ``layer``'s attention heads (values [n_heads])."""
        return cls(int(layer), "attn", "head")

    @classmethod
    def neuron(cls, layer: int) -> MaskKey:
        """The key of ``layer``'s MLP neurons (values [d_mlp])."""
        return cls(int(layer), "mlp", "neuron")

    @classmethod
    def unit(cls, granularity: UnitGranularity, layer: int) -> MaskKey:
        """The head or neuron key of ``layer``."""
        if granularity not in _UNIT_HOOKS:
            raise MaskError(f"unit granularity must be 'neuron' or 'head', got {granularity!r}")
        return cls(int(layer), _UNIT_HOOKS[granularity][0], granularity)

    @classmethod
    def weight(cls, layer: int, kind: Matrix) -> MaskKey:
        """The key of one weight matrix of ``layer`` (``kind`` in q, k, v, o, in, gate, out)."""
        block = "attn" if kind in ATTN_MATRICES else "mlp"
        return cls(int(layer), block, kind)

    @classmethod
    def parse(cls, text: str | MaskKey) -> MaskKey:
        """The key a mask-key string names; ``MaskError`` for anything else."""
        if isinstance(text, MaskKey):
            return text
        found = cls.try_parse(text)
        if found is None:
            raise MaskError(_UNKNOWN_KEY.format(text))
        return found

    @classmethod
    def try_parse(cls, text: object) -> MaskKey | None:
        """:meth:`parse`, or ``None`` when ``text`` is no mask key."""
        if isinstance(text, MaskKey):
            return text
        match = _KEY_PATTERN.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            return None
        layer, block, hook, matrix = match.groups()
        if hook is not None:
            kind = next(g for g, (b, h) in _UNIT_HOOKS.items() if h == hook)
            return cls(int(layer), block, kind) if _UNIT_HOOKS[kind][0] == block else None
        return cls(int(layer), block, matrix) if _block_of(matrix) == block else None

    @classmethod
    def is_unit_key(cls, text: object) -> bool:
        """Whether ``text`` is a head or neuron mask key."""
        found = cls.try_parse(text)
        return found is not None and found.is_unit

    @staticmethod
    def hook_template(granularity: UnitGranularity) -> str:
        """The HookPoint name of a unit granularity with a ``{layer}`` field (for str.format)."""
        if granularity not in _UNIT_HOOKS:
            raise MaskError(f"unit granularity must be 'neuron' or 'head', got {granularity!r}")
        block, hook = _UNIT_HOOKS[granularity]
        return "blocks.{layer}." + f"{block}.{hook}"

    @property
    def granularity(self) -> Granularity:
        return self.kind if self.kind in _UNIT_HOOKS else "weight"  # type: ignore[return-value]

    @property
    def is_unit(self) -> bool:
        """Whether the key masks heads or neurons (an activation), not a weight matrix."""
        return self.kind in _UNIT_HOOKS

    @property
    def hook_name(self) -> str:
        """The HookPoint a head/neuron key gates (``MaskError`` for a weight key)."""
        if not self.is_unit:
            raise MaskError(f"weight mask key {self.parameter_name!r} gates a matrix, not a hook point")
        return self.hook_template(self.kind).format(layer=self.layer)  # type: ignore[arg-type]

    @property
    def parameter_name(self) -> str:
        """The name of a weight key (``MaskError`` for a head/neuron key)."""
        if self.is_unit:
            raise MaskError(f"mask key {self.hook_name!r} gates activations, not a weight matrix")
        return f"blocks.{self.layer}.{self.block}.{self.kind}.weight"

    def __str__(self) -> str:
        return self.hook_name if self.is_unit else self.parameter_name


@runtime_checkable
class TypedMaskKey(Protocol):
    """A granularity's typed mask key: ``str(key)`` is the string mask dicts and saved files
    hold, ``layer`` the layer its component belongs to (:class:`MaskKey` for the built-ins; a
    future ``EdgeKey(src, dst)`` would be another)."""

    @property
    def layer(self) -> int: ...
