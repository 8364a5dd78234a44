"""The shapes masks depend on, read from a bridge: :class:`ModelGeometry`
(:func:`model_geometry`), the attention and MLP projections the forward pass actually uses and
the layout of their weights, the canonical ``[out, in]`` shape of each matrix kind, and where
a module (accelerate-offloaded ones included) computes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.errors import MaskError

__all__ = ["ModelGeometry", "model_geometry"]


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
