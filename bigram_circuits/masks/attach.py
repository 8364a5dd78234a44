"""Applying masks: :func:`attach_masks`, the one mechanism (mask sets, subnetworks and candidates
all come here; one attachment per bridge at a time, see :func:`masks_attached`), and
:func:`apply_binary_masks`, fixed boolean masks kept or ablated, built on it."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.errors import MaskError
from bigram_circuits.masks.granularities import (
    MaskComponent,
    component_device,
    get_granularity,
    granularity_of_key,
    mask_components,
    parse_granularities,
    parse_mask_key,
)
from bigram_circuits.masks.hooks import Attachment, _MaskedWeights
from bigram_circuits.masks.vocabulary import RunMode, check_run_mode

__all__ = ["apply_binary_masks", "attach_masks", "masks_attached"]


_ATTACHED_FLAG = "_bigram_circuits_masks_attached"


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
    mode = check_run_mode(mode)
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
