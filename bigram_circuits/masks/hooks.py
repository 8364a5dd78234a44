"""What one mask attachment puts on a bridge: forward hooks on HookPoints (added and removed by
level), ``torch.nn.utils.parametrize`` weight parametrizations, and saved-tensor hooks that
recompute masked weights for the backward instead of keeping them (:class:`_MaskedWeights`).
:class:`Attachment` lends the first two to each granularity's ``attach``."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.errors import MaskError
from bigram_circuits.masks.geometry import _execution_device, _offloaded_weight

__all__ = ["Attachment"]


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
