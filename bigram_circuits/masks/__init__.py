"""Learnable masks over a TransformerBridge: granularities, parameterisations and attachment.

Granularities (combine freely, e.g. ``("neuron", "head")``):

- ``"neuron"``: one entry per MLP neuron, applied to ``blocks.{L}.mlp.hook_post``
  ([batch, pos, d_mlp]); mask key ``blocks.{L}.mlp.hook_post``.
- ``"head"``: one entry per attention head, applied to ``blocks.{L}.attn.hook_z``
  ([batch, pos, n_heads, d_head]); mask key ``blocks.{L}.attn.hook_z``.
- ``"weight"``: one entry per weight of every attention (Q, K, V, O) and MLP (in, out, and
  gate for gated MLPs) matrix; mask keys ``blocks.{L}.attn.{q,k,v,o}.weight`` and
  ``blocks.{L}.mlp.{in,gate,out}.weight``. Embeddings, unembedding, layernorms and biases are
  never masked, and weights that are exactly zero are never kept (as in the paper).

Each granularity is a :class:`GranularitySpec` in a registry (:func:`register_granularity`,
:data:`GRANULARITY_REGISTRY`): its components for a model, how its masks attach, how its entries
expand to weight masks, its default learning rate and its typed key. The three above are
:class:`NeuronGranularity`, :class:`HeadGranularity` and :class:`WeightGranularity`; code that
handles masks asks the registry (:func:`get_granularity`, :func:`granularity_of_key`) instead of
branching on names.

The built-in keys are built and parsed only by :class:`MaskKey` (``str(MaskKey.head(0)) ==
"blocks.0.attn.hook_z"``, ``MaskKey.parse("blocks.0.mlp.in.weight")``); any registered key by
:func:`parse_mask_key`. Mask dicts and saved files hold the keys' strings.

Weight masks are stored in one canonical layout, ``[out_features, in_features]`` (the
``nn.Linear`` convention), whatever the module's own layout (GPT-2's ``Conv1D`` is transposed).

Parameterisations:

- ``"continuous"``: continuous sparsification (Savarese et al. 2020), as in the paper. A real
  logit per entry (init 0), soft mask ``sigmoid(T * m)``; the search multiplies ``T`` by 1.001
  per step; the final mask is ``m > 0``.
- ``"hard_concrete"``: hard concrete gates (Louizos et al. 2018), stretch (-0.1, 1.1),
  beta 2/3, sampled while training, deterministic in eval mode, closed-form expected L0.
  The final mask is also ``m > 0`` (the deterministic gate is above 0.5 exactly then).

Both implement :class:`MaskParameterization` (``sample``, ``probability``, ``logit_at``);
:class:`MaskSet` takes a name or any instance.

Applying masks: :func:`attach_masks` is the one mechanism (forward hooks on the HookPoints for
neurons and heads, ``torch.nn.utils.parametrize`` for weights, one application per bridge at a
time); :meth:`MaskSet.attach` (soft masks), :func:`apply_binary_masks` and
``Subnetwork.applied`` (boolean masks, keep or ablate) and ``Candidate.applied`` are built on it.

A mask entry's size in the paper's unit (weights gated): a weight gates 1 weight; a neuron
gates its row of every MLP input matrix and its column of the output matrix; a head gates its
d_head rows of Q (and its share of K and V under grouped-query attention) and its d_head
columns of O.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import math
import re
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import nn
from torch.nn.utils import parametrize
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.devices import input_device
from bigram_circuits.errors import MaskError

__all__ = [
    "ATTN_MATRICES",
    "DEFAULT_GRANULARITIES",
    "DEFAULT_LEARNING_RATES",
    "GRANULARITIES",
    "GRANULARITY_REGISTRY",
    "MLP_MATRICES",
    "PARAMETERIZATIONS",
    "RUN_MODES",
    "Attachment",
    "Block",
    "BuiltinGranularity",
    "ContinuousSparsification",
    "ForwardMasks",
    "Granularity",
    "GranularitySpec",
    "HardConcrete",
    "HeadGranularity",
    "MaskComponent",
    "MaskKey",
    "MaskKind",
    "MaskParameterization",
    "MaskSet",
    "Matrix",
    "ModelGeometry",
    "NeuronGranularity",
    "ParameterizationName",
    "PenaltyWeighting",
    "RunMode",
    "TypedMaskKey",
    "UnitGranularity",
    "WeightGranularity",
    "apply_binary_masks",
    "attach_masks",
    "author_dict_to_weight_masks",
    "author_parameter_names",
    "component_device",
    "expand_to_weight_masks",
    "get_granularity",
    "granularity_of_key",
    "make_parameterization",
    "mask_components",
    "masks_attached",
    "model_geometry",
    "parse_granularities",
    "parse_mask_key",
    "register_granularity",
    "registered_granularities",
    "unregister_granularity",
    "weight_masks_to_author_dict",
    "weight_tensor",
]

# --------------------------------------------------------------------------- vocabulary

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


_ATTACHED_FLAG = "_bigram_circuits_masks_attached"


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes a mask depends on, read from a bridge (saved with every subnetwork)."""

    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    gated_mlp: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelGeometry:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class MaskComponent:
    """One masked tensor: where it applies, its canonical shape and its size per entry.

    ``kind`` is ``neuron``, ``head`` or a matrix name (``q``, ``k``, ``v``, ``o``, ``in``,
    ``gate``, ``out``) for the built-in granularities, and what its granularity says otherwise;
    ``block`` is ``attn`` or ``mlp`` (used for per-layer shares). ``key`` is ``str(mask_key)``
    (a string, as in mask dicts and saved files); ``granularity`` names its
    :class:`GranularitySpec` in the registry.
    """

    key: str
    granularity: Granularity
    layer: int
    block: str
    kind: str
    shape: tuple[int, ...]
    params_per_entry: float

    @classmethod
    def of(cls, key: MaskKey, shape: Sequence[int], params_per_entry: float) -> MaskComponent:
        """The component of ``key`` (its string, granularity, layer, block and kind)."""
        return cls(
            key=str(key),
            granularity=key.granularity,
            layer=key.layer,
            block=key.block,
            kind=key.kind,
            shape=tuple(int(s) for s in shape),
            params_per_entry=float(params_per_entry),
        )

    @property
    def mask_key(self) -> TypedMaskKey:
        """The typed key of this component (its granularity's key type; :class:`MaskKey` for
        the built-in ones)."""
        return get_granularity(self.granularity).parse_key_or_raise(self.key)

    @property
    def n_entries(self) -> int:
        return int(math.prod(self.shape))

    @property
    def total_params(self) -> float:
        return self.n_entries * self.params_per_entry

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> MaskComponent:
        return cls(
            key=str(data["key"]),
            granularity=str(data["granularity"]),
            layer=int(data["layer"]),
            block=str(data["block"]),
            kind=str(data["kind"]),
            shape=tuple(int(s) for s in data["shape"]),
            params_per_entry=float(data["params_per_entry"]),
        )


def parse_granularities(granularities: str | Sequence[str]) -> tuple[Granularity, ...]:
    """Normalise ``"neuron,head"`` or ``["head", "neuron"]`` to a canonical ordered tuple of
    registered granularity names (registry order; any case in; ``MaskError`` for a name that is
    not registered, see :func:`register_granularity`)."""
    items = granularities.split(",") if isinstance(granularities, str) else list(granularities)
    names = {str(g).strip().lower() for g in items if str(g).strip()}
    known = registered_granularities()
    unknown = names - set(known)
    if unknown or not names:
        raise MaskError(f"unknown granularity {sorted(unknown) or granularities!r}; use any of {', '.join(known)}")
    return tuple(g for g in known if g in names)


def _linear_bridges(bridge: TransformerBridge, layer: int) -> dict[str, tuple[str, nn.Module]]:
    """The LinearBridge submodules the forward pass actually uses: ``kind -> (block, module)``.

    Fused QKV models (GPT-2, GPT-NeoX) run through the bridge's split ``q``/``k``/``v`` copies,
    not the fused matrix, so those are the ones to mask.
    """
    block = bridge.blocks[layer]
    found: dict[str, tuple[str, nn.Module]] = {}
    for block_name, parent, kinds in (
        ("attn", getattr(block, "attn", None), ("q", "k", "v", "o")),
        ("mlp", getattr(block, "mlp", None), ("in", "gate", "out")),
    ):
        if parent is None:
            continue
        for kind in kinds:
            module = parent._modules.get(kind)
            if module is not None and getattr(module, "original_component", None) is not None:
                found[kind] = (block_name, module)
    return found


def _weight_layout(module: nn.Module) -> bool:
    """Whether the wrapped module stores its weight as ``[in, out]`` (True) or ``[out, in]``."""
    inner = module.original_component
    if isinstance(inner, nn.Linear):
        return False
    if type(inner).__name__ == "Conv1D":  # transformers' GPT-2 projection: weight is [in, out]
        return True
    raise MaskError(
        f"cannot mask weights of {type(inner).__name__} in {module.name!r}; weight masks support "
        "nn.Linear and Conv1D projections (use --granularity neuron,head)"
    )


def model_geometry(bridge: TransformerBridge) -> ModelGeometry:
    """Read the architecture shapes from a bridge (checked against its modules)."""
    cfg = bridge.cfg
    n_layers = int(cfg.n_layers)
    if n_layers < 1:
        raise MaskError("the model has no transformer blocks to mask")
    modules = _linear_bridges(bridge, 0)
    if "in" not in modules or "o" not in modules:
        raise MaskError(
            f"cannot find attention/MLP projections in {cfg.architecture}; supported: GPT-2, "
            "GPT-NeoX/Pythia and LLaMA-style models"
        )
    in_module = modules["in"][1]
    in_weight = in_module.original_component.weight
    d_mlp = int(in_weight.shape[1] if _weight_layout(in_module) else in_weight.shape[0])
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    return ModelGeometry(
        architecture=str(cfg.architecture),
        n_layers=n_layers,
        d_model=int(cfg.d_model),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=int(cfg.d_head),
        d_mlp=d_mlp,
        gated_mlp="gate" in modules,
    )


# Within a layer, the built-in granularities' components come in this (historical) order;
# registered ones follow in registration order.
_COMPONENT_ORDER = ("head", "neuron", "weight")


def mask_components(
    bridge: TransformerBridge, granularities: str | Sequence[str] = DEFAULT_GRANULARITIES
) -> list[MaskComponent]:
    """All mask components of a bridge for the given granularities, in a fixed order: by layer,
    then by granularity, then as each granularity lists them (:meth:`GranularitySpec.components`)."""
    grans = parse_granularities(granularities)
    geo = model_geometry(bridge)
    names = [*_COMPONENT_ORDER, *(g for g in registered_granularities() if g not in _COMPONENT_ORDER)]
    components = [c for g in grans for c in get_granularity(g).components(bridge, geo)]
    return sorted(components, key=lambda c: (c.layer, names.index(c.granularity)))  # stable


def _weight_module(bridge: TransformerBridge, component: MaskComponent) -> tuple[nn.Module, bool]:
    """The module holding a weight component's matrix, and whether its layout is transposed."""
    modules = _linear_bridges(bridge, component.layer)
    if component.kind not in modules:
        raise MaskError(f"mask key {component.key!r} has no matching module in this model")
    module = modules[component.kind][1]
    return module.original_component, _weight_layout(module)


def _offloaded_weight(module: nn.Module) -> torch.Tensor | None:
    """The real weight of a module whose weight accelerate offloaded (CPU/disk), else None.

    Under a ``device_map`` with ``"disk"`` (or offloaded ``"cpu"``) targets, accelerate keeps
    such a module's parameters on the ``meta`` device and loads them from ``_hf_hook.weights_map``
    for each forward pass; this reads that stored copy (a CPU tensor or a disk memmap)."""
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if not getattr(hook, "offload", False) or weights_map is None:
        return None
    try:
        return weights_map["weight"]
    except KeyError:
        return None


def _execution_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """Where ``module`` computes: accelerate's execution device for an offloaded module, else
    the device of its first non-meta parameter, else ``fallback``."""
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None and getattr(hook, "offload", False):
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    return fallback


def component_device(bridge: TransformerBridge, component: MaskComponent) -> torch.device:
    """The device of the tensor a mask component gates: the weight matrix's (its execution
    device when accelerate offloaded it), the MLP output projection's for neurons (its input is
    ``hook_post``), the attention output projection's for heads (its input is ``hook_z``).

    With the model on one device this is that device; under a ``device_map`` each layer's masks
    live on that layer's device, so no mask crosses devices in the forward pass."""
    return get_granularity(component.granularity).device(bridge, component)


def weight_tensor(bridge: TransformerBridge, component: MaskComponent) -> Float[torch.Tensor, "out in"]:
    """A weight component's matrix in the canonical ``[out, in]`` layout (a view, no copy; the
    stored copy when accelerate offloaded the module's weight to CPU or disk)."""
    module, transposed = _weight_module(bridge, component)
    weight = module.weight
    if weight.device.type == "meta":
        stored = _offloaded_weight(module)
        if stored is not None:
            weight = stored
    return weight.T if transposed else weight


# --------------------------------------------------------------------------- attachment


def _storage_address(tensor: torch.Tensor) -> int | None:
    """The address of ``tensor``'s storage (None for tensors without one: meta, subclasses)."""
    if tensor.device.type == "meta" or (type(tensor) is not torch.Tensor and not isinstance(tensor, nn.Parameter)):
        return None
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class _MaskedWeights:
    """Masked weights ``W * mask`` that autograd need not keep: saved-tensor hooks that store a
    masked weight (or a view of it) saved for the backward as a recipe and recompute it when the
    backward needs it. The recipe is ``(W, mask)`` (the frozen weight, alive anyway, and the
    mask), or ``(W, remake)`` for a mask with a recipe of its own (``MaskSet.soft_mask`` for
    deterministic masks), so that neither the product nor the mask is kept. The same product of
    the same tensors, so the gradients are bitwise those of keeping it, and a forward pass no
    longer holds 4 bytes per masked weight of the whole model until its backward."""

    def __init__(self):
        # storage address -> (weak reference to the product, weight, mask); a dead reference
        # means the product is gone and the address may belong to another tensor now.
        self._products: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}

    def product(
        self, weight: torch.Tensor, mask: torch.Tensor, remake: Callable[[], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``weight * mask``, remembered so that autograd saves a recipe for it: ``(weight, mask)``,
        or ``(weight, remake)`` when ``remake()`` recomputes the mask (then the mask need not be kept)."""
        masked = weight * mask
        if torch.is_grad_enabled() and masked.requires_grad:
            held = mask if remake is None else remake
            self._products[masked.untyped_storage().data_ptr()] = (weakref.ref(masked), weight, held)
        return masked

    def pack(self, tensor: torch.Tensor):
        if not self._products:
            return tensor
        address = _storage_address(tensor)
        found = self._products.get(address) if address is not None else None
        if found is None:
            return tensor
        reference, weight, mask = found
        product = reference()
        if product is None or _storage_address(product) != address:  # gone: another tensor's storage now
            del self._products[address]
            return tensor
        view = (tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        mask_version = None if callable(mask) else mask._version
        return (_MaskedWeights, weight, mask, weight._version, mask_version, view)

    @staticmethod
    def unpack(packed):
        if not (isinstance(packed, tuple) and packed and packed[0] is _MaskedWeights):
            return packed
        _, weight, mask, weight_version, mask_version, (shape, stride, offset) = packed
        if weight._version != weight_version or (not callable(mask) and mask._version != mask_version):
            # What autograd's own version check would have refused for a kept masked weight.
            raise MaskError(
                "a masked weight's weight or mask was modified in place between the forward and the "
                "backward pass; call backward before changing them"
            )
        if callable(mask):
            mask = mask()  # recomputed from the logits (checks their version)
        # In the backward's grad mode: no graph, unless it builds one (create_graph=True).
        return torch.as_strided(weight * mask, shape, stride, offset)

    def hooks(self):
        """The saved-tensor hooks (a context manager) for the forward passes of the block."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _WeightMaskParametrization(nn.Module):
    """``weight -> weight * mask`` where the mask is fetched at every forward (soft or fixed)."""

    def __init__(
        self,
        mask_for: Callable[[], torch.Tensor],
        transposed: bool,
        module: nn.Module | None = None,
        products: _MaskedWeights | None = None,
    ):
        super().__init__()
        self._mask_for = mask_for
        self._transposed = transposed
        # Offloaded modules (accelerate, device_map with "disk"/"cpu" targets) keep the weight on
        # the meta device; their hook cannot load a parametrized weight, so it is read here.
        # Held in a tuple: not a submodule (the module holds this parametrization: no cycle for .train()).
        self._offloaded = (module,) if module is not None and _offloaded_weight(module) is not None else ()
        self._products = products

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.device.type == "meta" and self._offloaded:
            device = _execution_device(self._offloaded[0], torch.device("cpu"))
            weight = _offloaded_weight(self._offloaded[0]).to(device)
        mask = self._mask_for()
        recompute = getattr(mask, "_recompute", None)  # MaskSet.soft_mask's recipe, if any
        mask = mask.to(weight.device)
        mask = mask.T if self._transposed else mask
        if self._products is None:
            return weight * mask
        remake = None
        if recompute is not None:
            device, transposed = weight.device, self._transposed

            def remake() -> torch.Tensor:
                again = recompute().to(device)
                return again.T if transposed else again

        return self._products.product(weight, mask, remake)


def masks_attached(bridge: TransformerBridge) -> bool:
    """Whether a mask set or subnetwork is applied to ``bridge`` right now."""
    return bool(getattr(bridge, _ATTACHED_FLAG, False))


# Hook levels of our attachments: negative, so they never collide with the levels TransformerLens'
# own ``hooks()`` / ``run_with_cache`` contexts use (1, 2, ...).
_HOOK_LEVELS = itertools.count(1)


@contextlib.contextmanager
def _exclusive(bridge: TransformerBridge) -> Iterator[None]:
    """Mark ``bridge`` as masked inside the block; refuse a second attachment."""
    if getattr(bridge, _ATTACHED_FLAG, False):
        raise MaskError("masks are already applied to this model; exit the other `with` block first")
    object.__setattr__(bridge, _ATTACHED_FLAG, True)
    try:
        yield
    finally:
        object.__setattr__(bridge, _ATTACHED_FLAG, False)


@contextlib.contextmanager
def _activation_hook(hook_point, hook_fn: Callable, level: int) -> Iterator[None]:
    """``hook_fn`` as a forward hook on ``hook_point`` inside the block: added first (so caches
    and user hooks see its output) and permanent (so ``reset_hooks()`` leaves it alone); removed
    on exit by its level, through ``HookPoint.remove_hooks`` (public TransformerLens API; no
    reliance on what ``add_hook`` returns)."""
    hook_point.add_hook(hook_fn, dir="fwd", is_permanent=True, level=level, prepend=True)
    try:
        yield
    finally:
        hook_point.remove_hooks("fwd", including_permanent=True, level=level)


@contextlib.contextmanager
def _weight_parametrization(module: nn.Module, parametrization: nn.Module) -> Iterator[None]:
    """``module.weight`` computed by ``parametrization`` inside the block (the original weight
    is restored unchanged on exit). The parametrization takes the module's train/eval mode, so
    an eval-mode bridge stays in eval mode throughout (TransformerLens' analyses check)."""
    parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
    module.parametrizations.train(module.training)
    try:
        yield
    finally:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def _unit_hook(granularity: str, mask_of: Callable[[], torch.Tensor]) -> Callable:
    """A hook multiplying a neuron activation [b, p, d_mlp] or head output [b, p, h, d_head] by a mask."""
    if granularity == "neuron":

        def hook_fn(act, hook):
            return act * mask_of().to(act.device, act.dtype)
    else:

        def hook_fn(act, hook):
            return act * mask_of().to(act.device, act.dtype)[:, None]

    return hook_fn


@contextlib.contextmanager
def attach_masks(
    bridge: TransformerBridge,
    components: Sequence[MaskComponent],
    mask_for: Callable[[str], torch.Tensor],
    recompute: bool = True,
) -> Iterator[None]:
    """Multiply every component's activation or weight by ``mask_for(key)`` inside the block.

    The one way masks are applied (mask sets, subnetworks, candidates all come here).
    ``mask_for`` is called at every forward pass (so a learnable soft mask stays differentiable).
    Neuron and head masks are forward hooks on the HookPoints (added first, so caches and user
    hooks see masked activations; permanent, so ``reset_hooks()`` leaves them alone); weight
    masks are ``torch.nn.utils.parametrize`` parametrizations. Everything is removed on exit,
    also when the block raises. Only one mask attachment per bridge at a time: a second (nested)
    one raises ``MaskError``. ``recompute``: masked weights ``W * mask`` are recomputed for the
    backward instead of kept (:class:`_MaskedWeights`; bitwise the same gradients, 4 bytes per
    masked weight less until the backward, one more pass over them in it).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(_exclusive(bridge))
        # masked weights recomputed for the backward instead of kept
        attachment = Attachment(bridge, stack, -next(_HOOK_LEVELS), _MaskedWeights() if recompute else None)
        for component in components:
            key = component.key

            def mask_of(key: str = key) -> torch.Tensor:  # bound per component
                return mask_for(key)

            stack.enter_context(get_granularity(component.granularity).attach(component, mask_of, attachment))
        yield


@contextlib.contextmanager
def apply_binary_masks(
    bridge: TransformerBridge,
    masks: Mapping[str, torch.Tensor],
    mode: RunMode = "keep",
    components: Sequence[MaskComponent] | None = None,
) -> Iterator:
    """Run ``bridge`` with fixed boolean masks (True = kept) inside the block; yields the bridge.

    ``mode="keep"`` keeps the True entries, ``"ablate"`` the False ones. ``masks`` may cover any
    subset of the bridge's mask keys (``components`` says what they are; by default the
    bridge's own components of those keys). Each mask goes to the device of the tensor it gates
    in the model's dtype. Built on :func:`attach_masks`, so the same exclusivity applies.
    """
    if mode not in RUN_MODES:
        raise MaskError(f"mode must be 'keep' or 'ablate', got {mode!r}")
    if components is None:
        keys = {str(parse_mask_key(key)) for key in masks}
        grans = parse_granularities(sorted({granularity_of_key(key).name for key in masks})) if masks else ()
        components = [c for c in mask_components(bridge, grans) if c.key in keys] if grans else []
        missing = sorted(keys - {c.key for c in components})
        if missing:
            raise MaskError(f"hook {missing[0]!r} does not exist on this model; check the granularity")
    by_key = {c.key: c for c in components}
    dtype = next(bridge.parameters()).dtype
    # Each mask goes to the device of the tensor it gates (layers may live on several devices).
    floats = {}
    for key, mask in masks.items():
        mask = torch.as_tensor(mask).bool()
        floats[key] = (mask if mode == "keep" else ~mask).to(device=component_device(bridge, by_key[key]), dtype=dtype)
    with attach_masks(bridge, list(components), floats.__getitem__):
        yield bridge


# --------------------------------------------------------------------------- granularities
#
# A granularity is one :class:`GranularitySpec` in a registry: what it masks in a model of a
# given geometry (its components), how a mask attaches (a hook or a weight parametrization), how
# its entries expand to weight masks (sizes, overlap, layer shares, the authors' format), its
# learning rate and its key type. Everything that handles masks asks the registry; adding a
# granularity is one subclass and one :func:`register_granularity` call.


@runtime_checkable
class TypedMaskKey(Protocol):
    """A granularity's typed mask key: ``str(key)`` is the string mask dicts and saved files
    hold, ``layer`` the layer its component belongs to (:class:`MaskKey` for the built-ins; a
    future ``EdgeKey(src, dst)`` would be another)."""

    @property
    def layer(self) -> int: ...


class Attachment:
    """What one :func:`attach_masks` call lends each granularity's :meth:`GranularitySpec.attach`:
    the bridge, a forward hook on a HookPoint (:meth:`hook`) and a weight parametrization
    (:meth:`weight`), both removed when the attachment ends."""

    def __init__(
        self, bridge: TransformerBridge, stack: contextlib.ExitStack, level: int, products: _MaskedWeights | None
    ):
        self.bridge = bridge
        self._stack = stack
        self._level = level
        self._products = products
        self._saving_recipes = False

    def hook(self, hook_name: str, hook_fn: Callable) -> contextlib.AbstractContextManager:
        """``hook_fn(activation, hook)`` as a forward hook on the HookPoint ``hook_name`` (added
        first, so caches and user hooks see its output; permanent, so ``reset_hooks()`` leaves it)."""
        if hook_name not in self.bridge.hook_dict:
            raise MaskError(f"hook {hook_name!r} does not exist on this model; check the granularity")
        return _activation_hook(self.bridge.hook_dict[hook_name], hook_fn, self._level)

    def weight(
        self, module: nn.Module, mask_of: Callable[[], torch.Tensor], transposed: bool
    ) -> contextlib.AbstractContextManager:
        """``module.weight * mask_of()`` (``mask_of()`` in the canonical ``[out, in]`` layout;
        ``transposed``: the module stores ``[in, out]``), recomputed for the backward instead
        of kept when the attachment recomputes (:class:`_MaskedWeights`)."""
        if self._products is not None and not self._saving_recipes:
            self._stack.enter_context(self._products.hooks())
            self._saving_recipes = True
        parametrization = _WeightMaskParametrization(mask_of, transposed, module, self._products)
        return _weight_parametrization(module, parametrization)


class GranularitySpec(abc.ABC):
    """One granularity of masks (subclass it and :func:`register_granularity` an instance).

    ``name`` is what ``--granularity``, saved components and :func:`parse_granularities` call
    it (lower case); ``default_lr`` the search's learning rate for its logits when none is given.
    Its keys must not parse as another granularity's keys, and each component's expansion
    (:meth:`expand`) stays within the component's layer.
    """

    name: str
    default_lr: float

    @abc.abstractmethod
    def components(self, bridge: TransformerBridge, geometry: ModelGeometry) -> list[MaskComponent]:
        """Every component of ``bridge`` at this granularity (a fixed order, layer by layer)."""

    @abc.abstractmethod
    def parse_key(self, text: str) -> TypedMaskKey | None:
        """The typed key ``text`` names if it is a key of this granularity, else ``None``."""

    @abc.abstractmethod
    def attach(
        self, component: MaskComponent, mask_of: Callable[[], torch.Tensor], attachment: Attachment
    ) -> contextlib.AbstractContextManager:
        """A context manager that applies ``mask_of()`` (called at every forward pass; the
        component's shape) to ``attachment.bridge`` while it is entered."""

    @abc.abstractmethod
    def expand(
        self, key: TypedMaskKey, mask: Bool[torch.Tensor, "*shape"], geometry: ModelGeometry
    ) -> dict[str, Bool[torch.Tensor, "..."]]:
        """The weight masks equivalent to ``key``'s ``mask``: weight mask key (``MaskKey.weight``)
        -> a boolean tensor that broadcasts to that matrix's canonical ``[out, in]`` shape (True
        where a kept entry gates the weight). Matrices the model lacks are ignored."""

    @abc.abstractmethod
    def weight_kinds(self, key: TypedMaskKey) -> tuple[Matrix, ...]:
        """The kinds of weight matrix (``q`` ... ``out``) of ``key.layer`` its entries can gate."""

    def parse_key_or_raise(self, text: str) -> TypedMaskKey:
        """:meth:`parse_key`, with ``MaskError`` for a string that is not one of its keys."""
        found = self.parse_key(text)
        if found is None:
            raise MaskError(f"{text!r} is not a {self.name} mask key")
        return found

    def always_off(self, bridge: TransformerBridge, component: MaskComponent) -> Bool[torch.Tensor, "*shape"] | None:
        """Entries never kept (a search's binary mask excludes them), or ``None`` for none."""
        return None

    def device(self, bridge: TransformerBridge, component: MaskComponent) -> torch.device:
        """Where the component's mask lives: the device of the last matrix it gates (where its
        output is read), else the model's input device."""
        modules = _linear_bridges(bridge, component.layer)
        kinds = [k for k in self.weight_kinds(self.parse_key_or_raise(component.key)) if k in modules]
        fallback = input_device(bridge)
        return _execution_device(modules[kinds[-1]][1].original_component, fallback) if kinds else fallback


class _UnitGranularity(GranularitySpec):
    """Neurons or heads: one entry per unit, a forward hook on the HookPoint that carries them."""

    def parse_key(self, text: str) -> MaskKey | None:
        found = MaskKey.try_parse(text)
        return found if found is not None and found.kind == self.name else None

    def attach(
        self, component: MaskComponent, mask_of: Callable[[], torch.Tensor], attachment: Attachment
    ) -> contextlib.AbstractContextManager:
        hook_name = MaskKey.parse(component.key).hook_name
        return attachment.hook(hook_name, _unit_hook(self.name, mask_of))


class NeuronGranularity(_UnitGranularity):
    """One entry per MLP neuron (``blocks.{L}.mlp.hook_post``); gates its MLP input row(s) and
    output column."""

    name = "neuron"
    default_lr = 0.05

    def components(self, bridge: TransformerBridge, geometry: ModelGeometry) -> list[MaskComponent]:
        g = geometry
        size = float(g.d_model * ((2 if g.gated_mlp else 1) + 1))
        return [MaskComponent.of(MaskKey.neuron(layer), (g.d_mlp,), size) for layer in range(g.n_layers)]

    def expand(
        self, key: TypedMaskKey, mask: Bool[torch.Tensor, " d_mlp"], geometry: ModelGeometry
    ) -> dict[str, Bool[torch.Tensor, "..."]]:
        rows = {str(MaskKey.weight(key.layer, kind)): mask[:, None] for kind in ("in", "gate")}
        return {**rows, str(MaskKey.weight(key.layer, "out")): mask[None, :]}

    def weight_kinds(self, key: TypedMaskKey) -> tuple[Matrix, ...]:
        return MLP_MATRICES


class HeadGranularity(_UnitGranularity):
    """One entry per attention head (``blocks.{L}.attn.hook_z``); gates its Q rows (and its K/V
    group's rows) and its O columns."""

    name = "head"
    default_lr = 0.05

    def components(self, bridge: TransformerBridge, geometry: ModelGeometry) -> list[MaskComponent]:
        g = geometry
        size = g.d_model * g.d_head * (2 + 2 * g.n_kv_heads / g.n_heads)
        return [MaskComponent.of(MaskKey.head(layer), (g.n_heads,), size) for layer in range(g.n_layers)]

    def expand(
        self, key: TypedMaskKey, mask: Bool[torch.Tensor, " n_heads"], geometry: ModelGeometry
    ) -> dict[str, Bool[torch.Tensor, "..."]]:
        g = geometry
        rows_q = mask.repeat_interleave(g.d_head)
        rows_kv = mask.view(g.n_kv_heads, g.n_heads // g.n_kv_heads).any(dim=1).repeat_interleave(g.d_head)
        rows = {"q": rows_q[:, None], "k": rows_kv[:, None], "v": rows_kv[:, None], "o": rows_q[None, :]}
        return {str(MaskKey.weight(key.layer, kind)): gate for kind, gate in rows.items()}

    def weight_kinds(self, key: TypedMaskKey) -> tuple[Matrix, ...]:
        return ATTN_MATRICES


class WeightGranularity(GranularitySpec):
    """One entry per weight of every attention and MLP matrix (``blocks.{L}.attn.q.weight`` ...),
    a ``torch.nn.utils.parametrize`` parametrization; exactly-zero weights are always off."""

    name = "weight"
    default_lr = 0.01

    def components(self, bridge: TransformerBridge, geometry: ModelGeometry) -> list[MaskComponent]:
        found = []
        for layer in range(geometry.n_layers):
            for kind, (_, module) in _linear_bridges(bridge, layer).items():
                weight = module.original_component.weight
                shape = tuple(weight.shape[::-1]) if _weight_layout(module) else tuple(weight.shape)
                found.append(MaskComponent.of(MaskKey.weight(layer, kind), shape, 1.0))
        return found

    def parse_key(self, text: str) -> MaskKey | None:
        found = MaskKey.try_parse(text)
        return found if found is not None and not found.is_unit else None

    def attach(
        self, component: MaskComponent, mask_of: Callable[[], torch.Tensor], attachment: Attachment
    ) -> contextlib.AbstractContextManager:
        module, transposed = _weight_module(attachment.bridge, component)
        return attachment.weight(module, mask_of, transposed)

    def expand(
        self, key: TypedMaskKey, mask: Bool[torch.Tensor, "out in"], geometry: ModelGeometry
    ) -> dict[str, Bool[torch.Tensor, "out in"]]:
        return {str(key): mask}

    def weight_kinds(self, key: TypedMaskKey) -> tuple[Matrix, ...]:
        return (key.kind,)

    def always_off(self, bridge: TransformerBridge, component: MaskComponent) -> Bool[torch.Tensor, "out in"]:
        return weight_tensor(bridge, component) == 0

    def device(self, bridge: TransformerBridge, component: MaskComponent) -> torch.device:
        module, _ = _weight_module(bridge, component)
        return _execution_device(module, input_device(bridge))


_REGISTRY: dict[str, GranularitySpec] = {}
# The registry, read-only (register through register_granularity).
GRANULARITY_REGISTRY: Mapping[str, GranularitySpec] = types.MappingProxyType(_REGISTRY)


def register_granularity(spec: GranularitySpec) -> GranularitySpec:
    """Add ``spec`` to the registry (its ``name`` must be new and lower case); returns it."""
    if not isinstance(spec, GranularitySpec):
        raise MaskError(f"{type(spec).__name__} is not a GranularitySpec; subclass masks.GranularitySpec")
    name = getattr(spec, "name", None)
    if not isinstance(name, str) or not name or name != name.strip().lower() or "," in name:
        raise MaskError(f"a granularity's name must be a lower-case word without commas, got {name!r}")
    if name in _REGISTRY:
        raise MaskError(f"granularity {name!r} is already registered; pick another name or unregister it first")
    if not isinstance(getattr(spec, "default_lr", None), (int, float)):
        raise MaskError(f"granularity {name!r} needs a float default_lr (the search's learning rate)")
    _REGISTRY[name] = spec
    return spec


def unregister_granularity(name: str) -> None:
    """Remove a registered granularity (the built-in ones stay)."""
    if name in GRANULARITIES:
        raise MaskError(f"the built-in granularity {name!r} cannot be unregistered")
    if _REGISTRY.pop(name, None) is None:
        raise MaskError(f"no granularity {name!r} is registered; registered: {', '.join(_REGISTRY)}")


class _DefaultLearningRates(Mapping[str, float]):
    """Each registered granularity's ``default_lr`` by name (a live view of the registry)."""

    def __getitem__(self, name: str) -> float:
        if name not in _REGISTRY:
            raise KeyError(name)
        return float(_REGISTRY[name].default_lr)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


# The search's learning rate per granularity when none is given (registered ones included).
DEFAULT_LEARNING_RATES: Mapping[str, float] = _DefaultLearningRates()


def registered_granularities() -> tuple[Granularity, ...]:
    """Every registered granularity's name, in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def get_granularity(name: str) -> GranularitySpec:
    """The registered granularity called ``name`` (``MaskError`` for an unknown one)."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise MaskError(f"unknown granularity {name!r}; use any of {', '.join(_REGISTRY)}")
    return spec


def granularity_of_key(key: str | TypedMaskKey) -> GranularitySpec:
    """The granularity whose keys include ``key`` (``MaskError`` for no mask key)."""
    text = str(key)
    for spec in _REGISTRY.values():
        if spec.parse_key(text) is not None:
            return spec
    raise MaskError(_UNKNOWN_KEY.format(text))


def parse_mask_key(key: str | TypedMaskKey) -> TypedMaskKey:
    """The typed key a mask-key string names, of whichever granularity it belongs to."""
    return granularity_of_key(key).parse_key_or_raise(str(key))


for _spec in (NeuronGranularity(), HeadGranularity(), WeightGranularity()):
    register_granularity(_spec)
del _spec


# --------------------------------------------------------------------------- parameterisations


@runtime_checkable
class MaskParameterization(Protocol):
    """How mask logits become masks: the strategy a :class:`MaskSet` takes.

    ``name`` is what configs and saved runs call it; ``sample_is_probability`` says that
    :meth:`sample` equals :meth:`probability` (so the penalty may be summed from the forward
    pass's masks, sharing their graph); ``stochastic`` that :meth:`sample` draws noise from the
    mask set's generator while training. The final (binary) mask is always ``logit > 0``.
    """

    name: str
    sample_is_probability: bool
    stochastic: bool

    def sample(
        self,
        logits: Float[torch.Tensor, "*shape"],
        temperature: float,
        training: bool,
        generator: torch.Generator | None,
    ) -> Float[torch.Tensor, "*shape"]:
        """The mask the forward pass multiplies by (differentiable w.r.t. ``logits``)."""
        ...

    def probability(self, logits: Float[torch.Tensor, "*shape"], temperature: float) -> Float[torch.Tensor, "*shape"]:
        """The soft mask / P(entry on): the sparsity penalty, densities and the stopping rule."""
        ...

    def logit_at(self, p: float, temperature: float) -> float:
        """The logit at which :meth:`probability` equals ``p``."""
        ...


class _SoftMask(torch.autograd.Function):
    """``sigmoid(T * logits)`` that saves only the logits (a parameter, alive anyway) and
    recomputes the sigmoid in the backward: the same kernels as autograd's own
    (``sigmoid_backward``, then ``x T``), so bitwise the same gradients, without keeping the soft
    mask (4 bytes per entry) from the forward pass to the backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.temperature = temperature
        return torch.sigmoid(logits * temperature)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        soft = torch.sigmoid(logits * ctx.temperature)
        return torch.ops.aten.sigmoid_backward(grad, soft) * ctx.temperature, None


class ContinuousSparsification:
    """Soft mask ``sigmoid(T * m)`` (Savarese et al. 2020); final mask ``m > 0``."""

    name = "continuous"
    sample_is_probability = True  # the forward mask is the penalty's soft mask
    stochastic = False

    def logit_at(self, p: float, temperature: float) -> float:
        """The logit at which the soft mask equals ``p``."""
        return math.log(p / (1.0 - p)) / temperature

    def sample(
        self, logits: torch.Tensor, temperature: float, training: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        return _SoftMask.apply(logits, float(temperature))

    def sample_kept(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """The same mask through autograd's own sigmoid, which keeps it for the backward (one
        pass over the logits less there, 4 bytes per entry more until then)."""
        return torch.sigmoid(logits * float(temperature))

    def probability(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """The soft mask; used for the sparsity penalty, densities and the stopping rule."""
        return torch.sigmoid(logits * temperature)


class HardConcrete:
    """Hard concrete gates (Louizos et al. 2018): stretch (gamma, zeta), temperature beta.

    ``probability`` is the closed-form expected L0, P(gate != 0).
    """

    name = "hard_concrete"
    sample_is_probability = False
    stochastic = True

    def __init__(self, beta: float = 2.0 / 3.0, gamma: float = -0.1, zeta: float = 1.1):
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self._l0_shift = beta * math.log(-gamma / zeta)

    def sample(
        self, logits: torch.Tensor, temperature: float, training: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        if training:
            # Noise is drawn on the generator's device (one stream for masks on several devices).
            noise_device = generator.device if generator is not None else logits.device
            u = torch.rand(logits.shape, generator=generator, device=noise_device, dtype=logits.dtype)
            u = u.to(logits.device)
            u = u.clamp(1e-6, 1.0 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / self.beta)
        else:
            s = torch.sigmoid(logits)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def probability(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.sigmoid(logits - self._l0_shift)

    def logit_at(self, p: float, temperature: float) -> float:
        """The logit at which P(gate != 0) equals ``p``."""
        return math.log(p / (1.0 - p)) + self._l0_shift


def make_parameterization(name: ParameterizationName | MaskParameterization) -> MaskParameterization:
    """The parameterization called ``name`` (an instance is returned as it is)."""
    if not isinstance(name, str):
        if isinstance(name, MaskParameterization):
            return name
        raise MaskError(
            f"{type(name).__name__} is not a mask parameterization (needs name, sample, "
            "probability, logit_at, sample_is_probability, stochastic)"
        )
    if name == "continuous":
        return ContinuousSparsification()
    if name == "hard_concrete":
        return HardConcrete()
    raise MaskError(f"unknown parameterization {name!r}; use 'continuous' or 'hard_concrete'")


_make_parameterization = make_parameterization  # the old private name


class ForwardMasks(Mapping[str, torch.Tensor]):
    """The masks the forward passes inside one :meth:`MaskSet.attach` block used, by key.

    Each key's mask is computed the first time the forward pass needs it (so hard concrete
    noise is drawn in the forward pass's order) and reused for the rest of the block. Yielded by
    ``attach``; pass it to :meth:`MaskSet.penalty` to sum the penalty from these very tensors:
    :attr:`sums` holds each key's ``mask.sum()``, taken when the mask was made.
    ``compute(key)`` returns ``(masks, probabilities)``: the forward masks of ``key`` and of any
    other keys computed in the same pass (a sharded mask set computes a whole layer at once,
    while FSDP2 has its logits gathered), and, for parameterizations whose forward mask is not
    its probability, the probabilities of those keys (kept in :attr:`probabilities` for the
    penalty; empty otherwise). After :meth:`release` (``attach`` calls it on exit for
    deterministic masks) the masks are held weakly, so they are freed rather than kept until the
    backward; asking for one again recomputes it (the same values).
    """

    def __init__(
        self,
        compute: Callable[[str], tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
        masks: Mapping[str, torch.Tensor] | None = None,
    ):
        self._compute = compute
        self._weak = False
        self._masks: dict[str, torch.Tensor | weakref.ref] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.probabilities: dict[str, torch.Tensor] = {}
        self._store(dict(masks or {}))

    def _store(self, masks: Mapping[str, torch.Tensor]) -> None:
        for key, mask in masks.items():
            if key not in self.sums:  # the penalty's term, from the first mask of the block
                penalty_sum = getattr(mask, "_penalty_sum", None)
                self.sums[key] = mask.sum() if penalty_sum is None else penalty_sum
            self._masks[key] = weakref.ref(mask) if self._weak else mask

    def release(self) -> None:
        """Hold the masks weakly from now on (what the backward needs of them can be recomputed)."""
        self._weak = True
        self._masks = {key: weakref.ref(m) if torch.is_tensor(m) else m for key, m in self._masks.items()}

    def _alive(self, key: str) -> torch.Tensor | None:
        held = self._masks.get(key)
        return held() if isinstance(held, weakref.ref) else held

    def mask(self, key: str) -> torch.Tensor:
        """``key``'s mask for this block (computed now on first use, or again if it was freed)."""
        found = self._alive(key)
        if found is None:
            masks, probabilities = self._compute(key)
            self._store(masks)
            self.probabilities.update(probabilities)
            found = masks[key]
        return found

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._masks:
            raise KeyError(key)
        return self.mask(key)

    def __contains__(self, key: object) -> bool:  # without recomputing a freed mask
        return key in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)


def _safe(key: str) -> str:
    return key.replace(".", "__")


class MaskSet(nn.Module):
    """Learnable mask logits keyed by component name, with soft/binary views and densities.

    Build with :meth:`for_model`; use ``with mask_set.attach(bridge) as used:`` to run the bridge
    with the current soft masks (differentiable w.r.t. the logits; ``used`` holds the masks that
    forward used, see :class:`ForwardMasks`). The mask strategy is a
    :class:`MaskParameterization` (a name or an instance). ``temperature`` (a float, saved in
    the state dict) is what the search multiplies after every step; ``penalty()`` is
    ``sum(soft mask x size) / total size``
    (``penalty_weighting="params"``: entries weighted by the weights they gate, identical to the
    paper's ``sum(soft mask) / |M|`` for weight masks) or the plain mean over entries
    (``"entries"``).
    """

    # Deterministic masks carry a recipe (``mask._recompute``), so the masked weights the backward
    # needs are recomputed from the logits and the soft masks need not be kept (a sharded set's
    # logits are gathered only inside its layers' forward, so it keeps its masks).
    recomputable_masks: bool = True

    def __init__(
        self,
        components: Sequence[MaskComponent],
        parameterization: ParameterizationName | MaskParameterization = "continuous",
        init: float = 0.0,
        always_off: Mapping[str, torch.Tensor] | None = None,
        penalty_weighting: PenaltyWeighting = "params",
        device: torch.device | str = "cpu",
        devices: Mapping[str, torch.device | str] | None = None,
    ):
        super().__init__()
        if not components:
            raise MaskError("no mask components given; pick at least one granularity")
        if penalty_weighting not in {"params", "entries"}:
            raise MaskError(f"penalty_weighting must be 'params' or 'entries', got {penalty_weighting!r}")
        self.components: dict[str, MaskComponent] = {c.key: c for c in components}
        self.parameterization: MaskParameterization = make_parameterization(parameterization)
        self.penalty_weighting = penalty_weighting
        # Each key's logits live where its gated tensor lives (``devices``, e.g. one device per
        # layer under a device_map); keys not in ``devices`` go to ``device``.
        placement = {c.key: torch.device((devices or {}).get(c.key, device)) for c in components}
        self.device = torch.device(device)
        self.logits = nn.ParameterDict(
            {_safe(c.key): nn.Parameter(self._initial_logits(c, float(init), placement[c.key])) for c in components}
        )
        # A Python float (saved through get_extra_state) so reading it never syncs a GPU.
        self.temperature: float = 1.0
        # Whether the backward recomputes soft masks and masked weights instead of keeping them
        # (memory against one more pass over them; the search sets it per run).
        self.recompute: bool = True
        self._allowed_cache: dict = {}  # key -> (buffer version, ~always_off); ("index", key) -> flat indices
        self._always_off: dict[str, torch.Tensor] = {}
        for key, off in (always_off or {}).items():
            if off.any():
                name = f"off__{_safe(key)}"
                self.register_buffer(name, off.to(device=placement.get(key, device), dtype=torch.bool))
                self._always_off[key] = name
        weights = {c.key: (c.params_per_entry if penalty_weighting == "params" else 1.0) for c in components}
        self._penalty_weight = weights
        self._penalty_total = sum(c.n_entries * weights[c.key] for c in components)
        self.generator: torch.Generator | None = None
        if self.parameterization.stochastic:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(0)

    def _initial_logits(self, component: MaskComponent, init: float, device: torch.device) -> torch.Tensor:
        """A new logit tensor of ``component`` filled with ``init`` (a sharded set makes it on
        ``meta`` and fills only its own rows once sharded)."""
        return torch.full(component.shape, init, device=device)

    def get_extra_state(self) -> dict:
        return {"temperature": self.temperature}

    def set_extra_state(self, state: dict) -> None:
        self.temperature = float(state["temperature"])

    # ---- construction

    @classmethod
    def for_model(
        cls,
        bridge: TransformerBridge,
        granularities: str | Sequence[str] = DEFAULT_GRANULARITIES,
        parameterization: ParameterizationName | MaskParameterization = "continuous",
        init: float = 0.0,
        penalty_weighting: PenaltyWeighting = "params",
    ) -> MaskSet:
        """Mask logits for every component of ``bridge`` at the given granularities."""
        components = mask_components(bridge, granularities)
        device = input_device(bridge)
        devices = {c.key: component_device(bridge, c) for c in components}
        always_off = {}
        for c in components:
            with torch.no_grad():
                off = get_granularity(c.granularity).always_off(bridge, c)
            if off is not None:
                always_off[c.key] = off
        return cls(components, parameterization, init, always_off, penalty_weighting, device, devices)

    @property
    def keys(self) -> list[str]:
        return list(self.components)

    @property
    def granularities(self) -> tuple[Granularity, ...]:
        return parse_granularities([c.granularity for c in self.components.values()])

    def parameter(self, key: str) -> nn.Parameter:
        """The learnable logits of ``key`` (what an optimizer updates; a shard of them when the
        set is sharded over ranks, :class:`bigram_circuits.distributed.ShardedMaskSet`)."""
        return self.logits[_safe(key)]

    def logit(self, key: str) -> torch.Tensor:
        """The full logits of ``key`` (the parameter itself here)."""
        return self.logits[_safe(key)]

    def seed(self, seed: int) -> None:
        """Seed the hard concrete noise (no effect for continuous sparsification)."""
        if self.generator is not None:
            self.generator.manual_seed(int(seed))

    # ---- views

    def _allowed(self, key: str) -> torch.Tensor | None:
        """``~always_off`` of ``key`` (None if every entry may be on), made once per buffer version."""
        name = self._always_off.get(key)
        if name is None:
            return None
        off = getattr(self, name)
        cached = self._allowed_cache.get(key)
        if cached is None or cached[0] != off._version or cached[1].shape != off.shape:
            cached = self._allowed_cache[key] = (off._version, ~off)
        return cached[1]

    def soft_mask(self, key: str, zero_always_off: bool = True) -> torch.Tensor:
        """A fresh forward mask of ``key`` (sampled gates while training for hard concrete: each
        call draws new noise). Inside :meth:`attach` the forward pass computes it once per key
        (see :class:`ForwardMasks`).

        ``zero_always_off=False`` (what :meth:`attach` uses) leaves the entries of exactly-zero
        weights as they are: ``W * mask`` is 0 there anyway, so the forward pass and every other
        entry's gradient are the same, without a pass over the mask to zero them; the mask then
        carries ``_penalty_sum``, its sum without those entries, for the penalty."""
        logit, temperature, training = self.logit(key), self.temperature, self.training
        parameterization = self.parameterization
        allowed = self._allowed(key) if zero_always_off else None
        recompute = self.recompute and self.recomputable_masks
        kept = getattr(parameterization, "sample_kept", None) if not recompute else None

        def make(generator: torch.Generator | None) -> torch.Tensor:
            if kept is not None:
                mask = kept(logit, temperature)
            else:
                mask = parameterization.sample(logit, temperature, training, generator)
            # where() rather than x allowed: one pass, no bool -> float copy; the same values
            return mask if allowed is None else torch.where(allowed, mask, 0.0)

        mask = make(self.generator)
        if recompute and not parameterization.stochastic:
            version = logit._version

            def recompute() -> torch.Tensor:  # the same mask again (no noise), for the backward
                if logit._version != version:
                    raise MaskError(
                        f"the logits of {key} were modified in place between the forward and the backward pass; "
                        "call backward before changing them"
                    )
                return make(None)

            mask._recompute = recompute  # read by the weight parametrization (_MaskedWeights)
        if not zero_always_off and key in self._always_off:
            # The penalty's value counts only entries that may be on; their gradients are those of
            # the zeroed mask (the off entries' logits drift, but a binary mask never keeps them).
            mask._penalty_sum = mask.sum() - mask.detach().flatten()[self._off_index(key)].sum()
        return mask

    def _off_index(self, key: str) -> torch.Tensor:
        """Flat indices of ``key``'s always-off entries, made once per buffer version."""
        off = getattr(self, self._always_off[key])
        cached = self._allowed_cache.get(("index", key))
        if cached is None or cached[0] != off._version:
            cached = self._allowed_cache[("index", key)] = (off._version, off.flatten().nonzero().flatten())
        return cached[1]

    def probability(self, key: str) -> torch.Tensor:
        """Soft mask (continuous) or P(gate on) (hard concrete), zero where always off."""
        p = self.parameterization.probability(self.logit(key), self.temperature)
        allowed = self._allowed(key)
        return p if allowed is None else torch.where(allowed, p, 0.0)

    def soft(self) -> dict[str, Float[torch.Tensor, ...]]:
        """Detached soft masks (probabilities) per key."""
        with torch.no_grad():
            return {key: self.probability(key).detach().clone() for key in self.components}

    def binary(self, top_k: int | None = None) -> dict[str, Bool[torch.Tensor, ...]]:
        """The final masks: ``logit > 0`` (never an always-off entry), or the ``top_k`` entries
        with the largest logits over all components (an exact target size)."""
        with torch.no_grad():
            if top_k is None:
                out = {}
                for key in self.components:
                    keep = self.logit(key) > 0
                    allowed = self._allowed(key)
                    out[key] = (keep if allowed is None else keep & allowed).cpu()
                return out
            scores = []
            for key in self.components:
                logit = self.logit(key).detach().float()
                allowed = self._allowed(key)
                scores.append((logit if allowed is None else logit.masked_fill(~allowed, -math.inf)).flatten().cpu())
            flat = torch.cat(scores)
            if not 0 <= top_k <= int(torch.isfinite(flat).sum()):
                raise MaskError(f"top_k={top_k} is outside 0..{int(torch.isfinite(flat).sum())} maskable entries")
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[torch.topk(flat, top_k).indices] = True
            out, offset = {}, 0
            for key, c in self.components.items():
                out[key] = keep[offset : offset + c.n_entries].reshape(c.shape)
                offset += c.n_entries
            return out

    # ---- objective pieces

    def penalty(self, forward_masks: Mapping[str, torch.Tensor] | None = None) -> Float[torch.Tensor, ""]:
        """Weighted mean of the soft mask (the sparsity term, multiplied by lambda in the loss).

        A function of the logits, the temperature and ``forward_masks`` only. ``forward_masks``
        (what ``attach`` yielded: the masks of the forward pass this penalty goes with): when
        the parameterization's forward mask is its probability (continuous sparsification) and
        it holds every key, the penalty is summed from those very tensors, sharing their graph
        (one sigmoid per step instead of two; the same value, and the same gradients as one
        graph). Otherwise the probabilities are computed here."""
        reuse = (
            forward_masks is not None
            and self.parameterization.sample_is_probability
            and all(key in forward_masks for key in self.components)
        )
        computed = getattr(forward_masks, "probabilities", {})  # P(on) computed with the forward masks
        sums = getattr(forward_masks, "sums", {})  # mask.sum() taken as each mask was made
        total = None
        for key in self.components:
            if reuse:
                p_sum = sums[key] if key in sums else forward_masks[key].sum()
            else:
                p_sum = (computed[key] if key in computed else self.probability(key)).sum()
            term = (p_sum * self._penalty_weight[key]).to(self.device)  # masks may span devices
            total = term if total is None else total + term
        return total / self._penalty_total

    def decision_counts(self, low: float = 0.1, high: float = 0.9) -> tuple[int, int, int]:
        """``(undecided, on, total)``: entries with soft mask in [low, high], above high, all.

        Compares logits with the logits of ``low`` and ``high`` (no sigmoid pass)."""
        undecided = on = total = 0
        lo = self.parameterization.logit_at(low, self.temperature)
        hi = self.parameterization.logit_at(high, self.temperature)
        with torch.no_grad():
            for key, c in self.components.items():
                logit = self.logit(key)
                # count_nonzero, not bool.sum(): the same integers, about 3x faster on the CPU
                n_above, n_from_low = int(torch.count_nonzero(logit > hi)), int(torch.count_nonzero(logit >= lo))
                if key in self._always_off:  # always-off entries are decided (off): count them out
                    off = logit.flatten()[self._off_index(key)]
                    off_above, off_from_low = int(torch.count_nonzero(off > hi)), int(torch.count_nonzero(off >= lo))
                    n_above, n_from_low = n_above - off_above, n_from_low - off_from_low
                on += n_above
                undecided += n_from_low - n_above
                total += c.n_entries
        return undecided, on, total

    def density(self) -> pd.DataFrame:
        """Per component: entries, soft density (mean soft mask), hard density (binary) and
        kept/total size in the paper's unit."""
        rows = []
        binary = self.binary()
        soft = self.soft()
        for key, c in self.components.items():
            kept = int(binary[key].sum())
            rows.append(
                {
                    "key": key,
                    "granularity": c.granularity,
                    "layer": c.layer,
                    "block": c.block,
                    "kind": c.kind,
                    "entries": c.n_entries,
                    "soft_density": float(soft[key].float().mean()),
                    "hard_density": kept / c.n_entries,
                    "kept_params": kept * c.params_per_entry,
                    "total_params": c.total_params,
                }
            )
        return pd.DataFrame(rows)

    def overall_density(self, binary: bool = True) -> float:
        """Kept share of all entries (binary) or mean soft mask over all entries."""
        masks = self.binary() if binary else self.soft()
        kept = sum(float(m.float().sum()) for m in masks.values())
        return kept / sum(c.n_entries for c in self.components.values())

    def all_finite(self) -> bool:
        """Whether every logit is finite (on every rank, for a sharded set)."""
        with torch.no_grad():
            return all(bool(torch.isfinite(self.parameter(key)).all()) for key in self.components)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` for an optimizer over :meth:`parameter` tensors, in the
        one-process layout (a sharded set gathers the moments; every rank must call it then)."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load an :meth:`optimizer_state_dict` (written by any number of ranks) into ``optimizer``."""
        optimizer.load_state_dict(state)

    def forward(self) -> dict[str, Float[torch.Tensor, ...]]:
        """Every key's forward mask (sampled gates while training for hard concrete), in
        component order."""
        return {key: self.soft_mask(key) for key in self.components}

    def forward_masks_of(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What a forward pass computes when it first needs ``key``: ``({key: soft mask}, {})``
        (see :class:`ForwardMasks`; a sharded set computes ``key``'s whole layer)."""
        return {key: self.soft_mask(key, zero_always_off=False)}, {}

    @contextlib.contextmanager
    def attach(self, bridge: TransformerBridge) -> Iterator[ForwardMasks]:
        """Run ``bridge`` with the current soft masks inside the block; yields the
        :class:`ForwardMasks` of the block (each key's mask computed once, on first use by the
        forward pass, and shared by every forward pass in the block)."""
        used = ForwardMasks(self.forward_masks_of)
        try:
            recompute = self.recompute and self.recomputable_masks
            with attach_masks(bridge, list(self.components.values()), used.mask, recompute=recompute):
                yield used
        finally:
            if self.recompute and self.recomputable_masks and not self.parameterization.stochastic:
                used.release()  # the weight masks' recipes remake them for the backward


# --------------------------------------------------------------------------- weight-level views


def _matrix_shapes(geometry: ModelGeometry) -> dict[str, tuple[int, int]]:
    """The canonical ``[out, in]`` shape of every weight matrix kind of one layer."""
    g = geometry
    d_q, d_kv = g.n_heads * g.d_head, g.n_kv_heads * g.d_head
    return {
        "q": (d_q, g.d_model),
        "k": (d_kv, g.d_model),
        "v": (d_kv, g.d_model),
        "o": (g.d_model, d_q),
        "in": (g.d_mlp, g.d_model),
        "gate": (g.d_mlp, g.d_model),
        "out": (g.d_model, g.d_mlp),
    }


def expand_to_weight_masks(
    geometry: ModelGeometry,
    components: Mapping[str, MaskComponent],
    masks: Mapping[str, torch.Tensor],
    layers: Sequence[int] | None = None,
) -> dict[str, Bool[torch.Tensor, "out in"]]:
    """Weight-level masks (canonical layout) equivalent to any mix of masks of any granularities
    (each expanded by its :meth:`GranularitySpec.expand`, within its component's layer).

    A neuron keeps its row of each MLP input matrix and its column of the output matrix; a head
    keeps its rows of Q, K, V (for grouped K/V heads: if any of its query heads is kept) and its
    columns of O. Where several granularities cover a weight, it is kept only if all keep it.
    ``layers`` restricts the result to those layers (bounded memory for large models).
    """
    g = geometry
    shapes = _matrix_shapes(g)
    kinds = (*ATTN_MATRICES, *MLP_MATRICES) if g.gated_mlp else (*ATTN_MATRICES, "in", "out")
    layer_set = set(range(g.n_layers) if layers is None else layers)
    out: dict[str, torch.Tensor] = {}
    for layer in sorted(layer_set):
        for kind in kinds:
            out[str(MaskKey.weight(layer, kind))] = torch.ones(shapes[kind], dtype=torch.bool)
    for key, mask in masks.items():
        c = components[key]
        if c.layer not in layer_set:
            continue
        spec = get_granularity(c.granularity)
        for weight_key, gate in spec.expand(spec.parse_key_or_raise(key), mask.to(torch.bool).cpu(), g).items():
            if weight_key in out:  # a matrix this model lacks (an ungated MLP's gate) gates nothing
                out[weight_key] &= gate
    return out


# --------------------------------------------------------------------------- authors' mask dicts
#
# The authors' released masks are dicts ``HF parameter name -> numpy bool array`` in the HF
# parameter's own layout (plus an "orig_model_name" string). Fused QKV matrices map to our
# split q/k/v masks following the layout HF's forward actually uses:
#   GPT-NeoX query_key_value.weight [3*d_model, d_model]: rows grouped per head, (q, k, v) each
#   d_head rows inside a head; GPT-2 c_attn.weight (Conv1D, [d_model, 3*d_model]): columns
#   [q | k | v].


_NEOX = "GPTNeoXForCausalLM"
_GPT2 = "GPT2LMHeadModel"
_LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def author_parameter_names(geometry: ModelGeometry) -> dict[str, str]:
    """HF parameter name per weight mask key (fused QKV: q, k and v map to the same name)."""
    arch = geometry.architecture
    names: dict[str, str] = {}
    for layer in range(geometry.n_layers):
        if arch == _NEOX:
            p = f"gpt_neox.layers.{layer}"
            table = {
                "q": f"{p}.attention.query_key_value.weight",
                "k": f"{p}.attention.query_key_value.weight",
                "v": f"{p}.attention.query_key_value.weight",
                "o": f"{p}.attention.dense.weight",
                "in": f"{p}.mlp.dense_h_to_4h.weight",
                "out": f"{p}.mlp.dense_4h_to_h.weight",
            }
        elif arch == _GPT2:
            p = f"transformer.h.{layer}"
            table = {
                "q": f"{p}.attn.c_attn.weight",
                "k": f"{p}.attn.c_attn.weight",
                "v": f"{p}.attn.c_attn.weight",
                "o": f"{p}.attn.c_proj.weight",
                "in": f"{p}.mlp.c_fc.weight",
                "out": f"{p}.mlp.c_proj.weight",
            }
        elif arch in _LLAMA_LIKE:
            p = f"model.layers.{layer}"
            table = {k: f"{p}.self_attn.{k}_proj.weight" for k in ("q", "k", "v", "o")}
            table.update(
                {
                    "in": f"{p}.mlp.up_proj.weight",
                    "gate": f"{p}.mlp.gate_proj.weight",
                    "out": f"{p}.mlp.down_proj.weight",
                }
            )
        else:
            raise MaskError(
                f"no HF parameter-name mapping for {arch}; authors' mask dicts are supported for "
                "GPT-NeoX, GPT-2 and LLaMA-style models"
            )
        for kind, name in table.items():
            names[str(MaskKey.weight(layer, kind))] = name
    return names


def weight_masks_to_author_dict(
    geometry: ModelGeometry, weight_masks: Mapping[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Canonical weight masks -> ``{HF parameter name: numpy bool array in HF layout}``."""
    g = geometry
    out: dict[str, np.ndarray] = {}
    for key, name in author_parameter_names(g).items():
        mask_key = MaskKey.parse(key)
        kind = mask_key.kind
        mask = weight_masks[key].to(torch.bool).cpu().numpy()
        fused = g.architecture in (_NEOX, _GPT2) and kind in ("q", "k", "v")
        if fused and kind != "q":
            continue  # written together with q
        if fused:
            qkv = [weight_masks[str(MaskKey.weight(mask_key.layer, x))].to(torch.bool).cpu().numpy() for x in "qkv"]
            if g.architecture == _NEOX:
                per_head = np.stack([m.reshape(g.n_heads, g.d_head, g.d_model) for m in qkv], axis=1)
                out[name] = per_head.reshape(3 * g.n_heads * g.d_head, g.d_model)
            else:
                out[name] = np.ascontiguousarray(np.concatenate(qkv, axis=0).T)
        elif g.architecture == _GPT2:
            out[name] = np.ascontiguousarray(mask.T)  # Conv1D stores [in, out]
        else:
            out[name] = mask.copy()
    return out


def author_dict_to_weight_masks(
    geometry: ModelGeometry, author: Mapping[str, np.ndarray]
) -> dict[str, Bool[torch.Tensor, "out in"]]:
    """``{HF parameter name: bool array}`` -> canonical weight masks (inverse of the above)."""
    g = geometry
    names = author_parameter_names(g)
    missing = sorted({n for n in names.values() if n not in author})
    if missing:
        raise MaskError(
            f"mask dict lacks {len(missing)} parameters of this model (e.g. {missing[0]}); "
            "was it made for another model?"
        )

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(author[name])
        if arr.shape != shape:
            raise MaskError(f"mask {name} has shape {arr.shape}, expected {shape}; was it made for another model?")
        return arr.astype(bool)

    d_q = g.n_heads * g.d_head
    out: dict[str, torch.Tensor] = {}
    for key, name in names.items():
        kind = MaskKey.parse(key).kind
        if g.architecture == _NEOX and kind in ("q", "k", "v"):
            fused = fetch(name, (3 * d_q, g.d_model)).reshape(g.n_heads, 3, g.d_head, g.d_model)
            arr = fused[:, "qkv".index(kind)].reshape(d_q, g.d_model)
        elif g.architecture == _GPT2 and kind in ("q", "k", "v"):
            i = "qkv".index(kind)
            arr = fetch(name, (g.d_model, 3 * d_q))[:, i * d_q : (i + 1) * d_q].T
        elif g.architecture == _GPT2:
            shape = {"o": (d_q, g.d_model), "in": (g.d_model, g.d_mlp), "out": (g.d_mlp, g.d_model)}[kind]
            arr = fetch(name, shape).T
        else:
            arr = fetch(name, _matrix_shapes(g)[kind])
        out[key] = torch.from_numpy(np.ascontiguousarray(arr))
    return out
