"""The trainable masks: :class:`MaskSet`, learnable logits per mask component with soft and
binary views, densities and the sparsity penalty, and :class:`ForwardMasks`, the masks the
forward passes of one ``MaskSet.attach`` block used. (The set sharded over ranks is
:class:`bigram_circuits.distributed.ShardedMaskSet`.)"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import nn
from transformer_lens.model_bridge import TransformerBridge

from bigram_circuits.devices import input_device
from bigram_circuits.errors import MaskError
from bigram_circuits.masks.attach import attach_masks
from bigram_circuits.masks.granularities import (
    MaskComponent,
    component_device,
    get_granularity,
    mask_components,
    parse_granularities,
)
from bigram_circuits.masks.parameterizations import MaskParameterization, make_parameterization
from bigram_circuits.masks.vocabulary import (
    DEFAULT_GRANULARITIES,
    Granularity,
    ParameterizationName,
    PenaltyWeighting,
)

__all__ = ["ForwardMasks", "MaskSet"]


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


# Entries per chunk of the decision counts: both comparisons of a chunk run while it is in cache
# (4 MiB of float32), one pass over the logits instead of two (a quarter faster on 106M logits).
_COUNT_CHUNK = 1 << 20


def _count_at_least(logit: torch.Tensor, above: float, from_low: float) -> tuple[int, int]:
    """``(#entries > above, #entries >= from_low)``: exact counts, in cache-sized chunks.
    ``count_nonzero``, not ``bool.sum()``: the same integers, about 3x faster on the CPU."""
    n_above = torch.zeros((), dtype=torch.int64, device=logit.device)
    n_from_low = torch.zeros((), dtype=torch.int64, device=logit.device)
    for chunk in logit.detach().reshape(-1).split(_COUNT_CHUNK):
        n_above += torch.count_nonzero(chunk > above)
        n_from_low += torch.count_nonzero(chunk >= from_low)
    return int(n_above), int(n_from_low)


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
        sample = parameterization.sample if recompute else parameterization.sample_kept

        def make(generator: torch.Generator | None) -> torch.Tensor:
            mask = sample(logit, temperature, training, generator)
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
        made_here = isinstance(forward_masks, ForwardMasks)
        computed = forward_masks.probabilities if made_here else {}  # P(on) computed with the forward masks
        sums = forward_masks.sums if made_here else {}  # mask.sum() taken as each mask was made
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
                n_above, n_from_low = _count_at_least(logit, hi, lo)
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
