"""Granularities and their registry. A granularity is one :class:`GranularitySpec` in a
registry: what it masks in a model of a given geometry (its components, each a
:class:`MaskComponent`), how a mask attaches (a hook or a weight parametrization), how its
entries expand to weight masks (sizes, overlap, layer shares, the authors' format), its
learning rate and its key type; the built-ins are :class:`NeuronGranularity`,
:class:`HeadGranularity` and :class:`WeightGranularity`. Everything that handles masks asks the
registry (:func:`get_granularity`, :func:`granularity_of_key`, :func:`mask_components`); adding
a granularity is one subclass and one :func:`register_granularity` call."""

from __future__ import annotations

import abc
import contextlib
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Bool, Float
from torch import nn
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.devices import input_device
from bigram_circuits.errors import MaskError
from bigram_circuits.masks.geometry import (
    ModelGeometry,
    _execution_device,
    _linear_bridges,
    _offloaded_weight,
    _weight_layout,
    model_geometry,
)
from bigram_circuits.masks.hooks import Attachment, _unit_hook
from bigram_circuits.masks.vocabulary import (
    _UNKNOWN_KEY,
    ATTN_MATRICES,
    DEFAULT_GRANULARITIES,
    GRANULARITIES,
    MLP_MATRICES,
    Granularity,
    MaskKey,
    Matrix,
    TypedMaskKey,
)

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "GRANULARITY_REGISTRY",
    "GranularitySpec",
    "HeadGranularity",
    "MaskComponent",
    "NeuronGranularity",
    "WeightGranularity",
    "component_device",
    "get_granularity",
    "granularity_of_key",
    "mask_components",
    "parse_granularities",
    "parse_mask_key",
    "register_granularity",
    "registered_granularities",
    "unregister_granularity",
    "weight_tensor",
]


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


def _weight_module(bridge: TransformerBridge, component: MaskComponent) -> tuple[nn.Module, bool]:
    """The module holding a weight component's matrix, and whether its layout is transposed."""
    modules = _linear_bridges(bridge, component.layer)
    if component.kind not in modules:
        raise MaskError(f"mask key {component.key!r} has no matching module in this model")
    module = modules[component.kind][1]
    return module.original_component, _weight_layout(module)


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


def component_device(bridge: TransformerBridge, component: MaskComponent) -> torch.device:
    """The device of the tensor a mask component gates: the weight matrix's (its execution
    device when accelerate offloaded it), the MLP output projection's for neurons (its input is
    ``hook_post``), the attention output projection's for heads (its input is ``hook_z``).

    With the model on one device this is that device; under a ``device_map`` each layer's masks
    live on that layer's device, so no mask crosses devices in the forward pass."""
    return get_granularity(component.granularity).device(bridge, component)


for _spec in (NeuronGranularity(), HeadGranularity(), WeightGranularity()):
    register_granularity(_spec)
del _spec
