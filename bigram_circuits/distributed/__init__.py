"""Data-parallel search: several processes share every batch, one of them writes.

Launch ``find`` under torchrun through this module (it joins the process group, then runs
the ordinary command line)::

    torchrun --nproc-per-node 2 -m bigram_circuits.distributed find --model default --out runs/dp

A script of your own calls :func:`bigram_circuits.search.search` (or ``sweep``) inside
``with data_parallel():``.

Each rank runs the forward and backward pass on its own contiguous shard of every global batch
(``batch_size`` rows, divided evenly over the ranks), the gradients of the mask logits are
averaged with one all-reduce per step, and the logged loss is the average over ranks. With
shards of equal size the average of the shard losses is the loss of the whole batch, so a run
with N ranks follows a single process with the same ``batch_size`` (up to float summation
order). Every rank holds the same mask logits and optimizer state; rank 0 alone writes
checkpoints and results, and every rank resumes from rank 0's checkpoint, so a killed run
continues exactly (also with another number of ranks, or as a single process).

The search asks :func:`current` for the active group; outside :func:`data_parallel` that is
:data:`SINGLE_PROCESS`, whose operations do nothing. Backend: ``gloo`` on CPU, ``nccl`` when
the ranks use CUDA. The device is resolved once, by :func:`bigram_circuits.devices.resolve_device`
(``cuda`` and ``auto``: each rank's own ``cuda:{LOCAL_RANK}``), and kept as ``ProcessGroup.device``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Integer
from torch import nn

from bigram_circuits.devices import resolve_device
from bigram_circuits.errors import ConfigError, MaskError, SearchError
from bigram_circuits.masks import ForwardMasks, MaskSet
from bigram_circuits.masks.maskset import _safe

__all__ = [
    "SINGLE_PROCESS",
    "ProcessGroup",
    "ShardedMaskSet",
    "current",
    "data_parallel",
    "full_logits",
    "launched_by_torchrun",
    "main",
    "shard_mask_set",
]


# Entries per gradient all-reduce (32 MiB of float32): large enough to keep gloo/NCCL efficient.
ALL_REDUCE_BUCKET = 1 << 23
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a data-parallel run (``world_size == 1``: a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    shard_masks: bool = False  # searches shard their mask logits over the ranks (ShardedMaskSet)
    device: torch.device = _CPU  # this rank's device, resolved by data_parallel

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes checkpoints and results (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether searches in this group shard their mask logits (asked for, and 2+ ranks)."""
        return self.shard_masks and self.active

    def shard(self, batch: Integer[np.ndarray, "batch seq"]) -> Integer[np.ndarray, "shard seq"]:
        """This rank's contiguous share of a global batch (all shards have the same size)."""
        if not self.active:
            return batch
        n = len(batch)
        if n % self.world_size:
            raise SearchError(
                f"batch_size {n} does not divide over {self.world_size} ranks; use a multiple of {self.world_size}"
            )
        size = n // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of ``values`` (a detached copy; identity for one process)."""
        if not self.active:
            return values
        import torch.distributed as dist

        reduced = values.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (keeps stop decisions in step)."""
        if not self.active:
            return bool(flag)
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def after_backward(self, module: torch.nn.Module) -> None:
        """Average the gradients of ``module``'s parameters over ranks: one all-reduce per bucket
        of at most :data:`ALL_REDUCE_BUCKET` entries on one device (a flat buffer of every
        gradient would add 4 bytes per mask entry to the step's peak memory)."""
        if not self.active:
            return
        import torch.distributed as dist

        by_device: dict[torch.device, list[list[torch.nn.Parameter]]] = {}
        for param in module.parameters():
            if param.requires_grad:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                buckets = by_device.setdefault(param.grad.device, [[]])
                if buckets[-1] and sum(p.numel() for p in buckets[-1]) + param.numel() > ALL_REDUCE_BUCKET:
                    buckets.append([])
                buckets[-1].append(param)
        for buckets in by_device.values():
            for params in buckets:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat /= self.world_size
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset : offset + p.grad.numel()].view_as(p.grad))
                    offset += p.grad.numel()

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a result the others will read)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def _device(self) -> torch.device:
        """Where collectives' small tensors live: this rank's GPU under NCCL, else the CPU."""
        return self.device if self.backend == "nccl" else _CPU


SINGLE_PROCESS = ProcessGroup()
_ACTIVE: list[ProcessGroup] = []


def current() -> ProcessGroup:
    """The data-parallel group of the innermost :func:`data_parallel` block, else one process."""
    return _ACTIVE[-1] if _ACTIVE else SINGLE_PROCESS


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@contextlib.contextmanager
def data_parallel(
    backend: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str = "env://",
    device: str | torch.device | None = None,
    timeout_s: float = 1800.0,
    shard_masks: bool = False,
) -> Iterator[ProcessGroup]:
    """Join (or start) a process group for the block; searches inside it run data-parallel.

    Under torchrun everything comes from the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); tests pass ``rank``, ``world_size`` and a
    ``tcp://`` ``init_method``. ``device`` is this rank's device: a ``torch.device`` resolved by
    the caller, or a request (``"cuda"``, ``"auto"``, ...) resolved here by
    :func:`bigram_circuits.devices.resolve_device` (default: the CPU); it becomes
    ``ProcessGroup.device``. ``backend`` defaults to ``nccl`` when ``device`` is CUDA, else
    ``gloo``. An already initialised default group is reused (and left open). With
    ``shard_masks`` (and 2+ ranks) searches keep their mask logits in a :class:`ShardedMaskSet`
    (FSDP2, one unit per layer) instead of a full copy on every rank.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process")
    rank = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else int(world_size)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank {rank} is outside a world of {world_size} processes; launch with torchrun --nproc-per-node N"
        )
    device = resolve_device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    created = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        created = True
    group = ProcessGroup(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        shard_masks=bool(shard_masks),
        device=device,
    )
    _ACTIVE.append(group)
    try:
        yield group
    finally:
        _ACTIVE.pop()
        if created:
            dist.destroy_process_group()


class _LayerMasks(nn.Module):
    """One layer's mask logits: the unit FSDP2 gathers (forward) and reduce-scatters (backward)
    at once, so only one layer's full logits exist at a time."""

    def __init__(self):
        super().__init__()
        self.logits = nn.ParameterDict()

    def forward(self, compute: Callable[[torch.Tensor], tuple[dict, dict]], anchor: torch.Tensor):
        # FSDP2's hooks around this call gather the logits before ``compute`` reads them and
        # reduce-scatter their gradients in the backward pass, once the gradient of ``anchor``
        # (an input that requires grad, tied to every logit) says this layer's backward is done.
        return compute(anchor)


class _Tie(torch.autograd.Function):
    """``logits`` unchanged, made to depend on ``anchor`` (a scalar) for autograd at no cost:
    the anchor's gradient (zero) is complete only after every tied logit's gradient is."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_zeros(())


class ShardedMaskSet(MaskSet):
    """A :class:`~bigram_circuits.masks.MaskSet` whose logits are sharded over the ranks with
    FSDP2 (``torch.distributed.fsdp.fully_shard``), one FSDP unit per layer.

    Each rank keeps 1/N of the rows of every logit tensor, so the logits, their gradients and an
    optimizer's moments over :meth:`parameter` tensors cost 16/N bytes per masked weight. When a
    forward pass inside :meth:`attach` first needs a layer's mask, that layer's logits are
    all-gathered, its masks computed (and, for hard concrete, its probabilities for the penalty)
    and the full logits freed again; in the backward pass the layer's gradients are
    reduce-scattered (averaged), so ranks that each run their shard of a batch follow one
    process on the whole batch. Outside a forward pass :meth:`logit` gathers a key's full logits
    (a collective: every rank must make the same calls in the same order), :meth:`decision_counts`
    counts on the local rows and sums over ranks, and :meth:`state_dict` / :meth:`load_state_dict`
    and :meth:`optimizer_state_dict` / :meth:`load_optimizer_state_dict` use the one-process
    layout of full tensors, so a checkpoint written by N ranks resumes on M ranks or on one
    process, and the other way round.

    Built like a ``MaskSet`` (``ShardedMaskSet.for_model(bridge, "weight")``) inside
    :func:`data_parallel` with at least two ranks, or from a ``MaskSet`` with
    :func:`shard_mask_set`. Works on CPU with gloo and on CUDA with NCCL. The logits of all keys
    must live on one device (no ``device_map`` split).
    """

    recomputable_masks = False  # the logits are gathered only inside a layer's forward

    def __init__(self, *args, mesh=None, **kwargs):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("sharded masks need a process group; build them inside data_parallel() with 2+ ranks")
        self._fill: dict[str, tuple[float, torch.device]] = {}
        super().__init__(*args, **kwargs)  # logits on meta (_initial_logits): no rank ever holds them all
        devices = {device for _, device in self._fill.values()}
        if len(devices) > 1:
            raise ConfigError(
                f"sharded masks need every logit on one device, got {sorted(map(str, devices))}; "
                "load the model without a device_map"
            )
        device = self._fill_device = devices.pop()
        self._anchor: torch.Tensor | None = None
        if mesh is None:
            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        self.units = nn.ModuleDict()
        for key, component in self.components.items():  # move each key's logits into its layer's unit
            name = str(component.layer)
            if name not in self.units:
                self.units[name] = _LayerMasks()
            self.units[name].logits[_safe(key)] = self.logits[_safe(key)]
            del self.logits[_safe(key)]
        for unit in self.units.values():
            fully_shard(unit, mesh=mesh, reshard_after_forward=True)
            unit.to_empty(device=device)  # this rank's rows only
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        with torch.no_grad():
            for key, (init, _) in self._fill.items():
                self._local(key).fill_(init)
        self._local_allowed: dict[str, torch.Tensor] = {}  # always-off buffers cut to this rank's rows
        for key in self._always_off:
            self._local_allowed[key] = self._allowed(key)[self._local_rows(key)]

    def _initial_logits(self, component, init: float, device: torch.device) -> torch.Tensor:
        self._fill[component.key] = (init, device)
        return torch.empty(component.shape, device="meta")

    # ---- layout

    def _unit(self, key: str) -> _LayerMasks:
        return self.units[str(self.components[key].layer)]

    def parameter(self, key: str) -> nn.Parameter:
        """This rank's shard of ``key``'s logits (a ``DTensor`` parameter; what the optimizer updates)."""
        return self._unit(key).logits[_safe(key)]

    def _local_rows(self, key: str) -> slice:
        """The rows of ``key``'s full logits this rank holds (FSDP2 shards dim 0 like ``torch.chunk``)."""
        rows = self.components[key].shape[0]
        size = -(-rows // self.world_size)
        return slice(min(self.rank * size, rows), min((self.rank + 1) * size, rows))

    def logit(self, key: str) -> torch.Tensor:
        """``key``'s full logits: inside a layer's forward the gathered tensor, elsewhere gathered
        now (a collective)."""
        value = self.parameter(key)
        if _is_dtensor(value):
            return value.full_tensor()
        return value if self._anchor is None else _Tie.apply(value, self._anchor)

    def _local(self, key: str) -> torch.Tensor:
        value = self.parameter(key)
        return value.to_local() if _is_dtensor(value) else value

    # ---- forward

    def forward_masks_of(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The masks (and, for hard concrete, the probabilities) of ``key``'s whole layer,
        computed while FSDP2 has that layer's logits gathered."""
        layer = self.components[key].layer
        keys = [k for k, c in self.components.items() if c.layer == layer]

        def compute(anchor: torch.Tensor) -> tuple[dict, dict]:
            self._anchor = anchor  # logit() ties each gathered logit to it
            try:
                masks = {k: self.soft_mask(k) for k in keys}
                stochastic = not self.parameterization.sample_is_probability  # the penalty needs P(on) too
                probabilities = {k: self.probability(k) for k in keys} if stochastic else {}
            finally:
                self._anchor = None
            return masks, probabilities

        # Without an input that requires grad FSDP2 would keep every layer's gathered logits and
        # gradients until the end of the backward pass; with it each layer is freed as it is done.
        anchor = torch.zeros((), device=self._fill_device, requires_grad=torch.is_grad_enabled())
        return self._unit(key)(compute, anchor)

    def penalty(self, forward_masks: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """As :meth:`MaskSet.penalty`, always from masks computed inside the layers' FSDP units
        (the layers a forward pass did not reach are computed now)."""
        if not isinstance(forward_masks, ForwardMasks):
            forward_masks = ForwardMasks(self.forward_masks_of, forward_masks)
        for key in self.components:
            forward_masks.mask(key)
        return super().penalty(forward_masks)

    # ---- counts, checks

    def decision_counts(self, low: float = 0.1, high: float = 0.9) -> tuple[int, int, int]:
        """As :meth:`MaskSet.decision_counts`, counted on each rank's rows and summed (a collective)."""
        lo = self.parameterization.logit_at(low, self.temperature)
        hi = self.parameterization.logit_at(high, self.temperature)
        counts = torch.zeros(2, dtype=torch.int64)
        with torch.no_grad():
            for key in self.components:
                logit = self._local(key)
                above = logit > hi
                middle = (logit >= lo) & ~above
                allowed = self._local_allowed.get(key)
                if allowed is not None:
                    above &= allowed
                    middle &= allowed
                counts += torch.stack([middle.sum(), above.sum()]).cpu()
        counts = _all_reduced(counts, self._collective_device())
        return int(counts[0]), int(counts[1]), sum(c.n_entries for c in self.components.values())

    def all_finite(self) -> bool:
        """Whether every logit is finite on every rank (a collective)."""
        with torch.no_grad():
            local = all(bool(torch.isfinite(self._local(key)).all()) for key in self.components)
        bad = _all_reduced(torch.tensor([0 if local else 1], dtype=torch.int64), self._collective_device())
        return int(bad[0]) == 0

    def _collective_device(self) -> torch.device:
        return torch.device("cpu") if self.device.type == "cpu" else self.device

    # ---- state in the one-process layout

    def state_dict(self, *args, **kwargs) -> dict:
        """The state of an unsharded :class:`MaskSet`: full logits (gathered one key at a time and
        moved to CPU), the always-off buffers and the temperature. A collective."""
        state = {}
        with torch.no_grad():
            for key in self.components:
                state[f"logits.{_safe(key)}"] = self.logit(key).detach().cpu()
        for name in self._always_off.values():
            state[name] = getattr(self, name)
        state["_extra_state"] = self.get_extra_state()
        return state

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load a (sharded or unsharded) mask set's :meth:`state_dict`: each rank copies its rows."""
        expected = {f"logits.{_safe(k)}" for k in self.components} | set(self._always_off.values()) | {"_extra_state"}
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise MaskError(
                f"mask state does not fit this mask set (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "it belongs to another model or granularity"
            )
        with torch.no_grad():
            for key, component in self.components.items():
                full = state_dict[f"logits.{_safe(key)}"]
                if tuple(full.shape) != component.shape:
                    raise MaskError(f"mask state of {key} has shape {tuple(full.shape)}, expected {component.shape}")
                local = self._local(key)
                local.copy_(full[self._local_rows(key)].to(device=local.device, dtype=local.dtype))
        self.set_extra_state(state_dict["_extra_state"])

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` with every sharded moment gathered to a full CPU tensor (the
        one-process layout; a collective)."""
        state = optimizer.state_dict()
        state["state"] = {
            index: {name: _full_cpu(value) for name, value in per_param.items()}
            for index, per_param in sorted(state["state"].items())
        }
        return state

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load an optimizer state in the one-process layout: each moment is cut to this rank's
        rows of its parameter."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        keys = {id(self.parameter(k)): k for k in self.components}
        sharded = {}
        for index, per_param in state["state"].items():
            param = params[int(index)]
            key = keys[id(param)]
            sharded[index] = {
                name: _shard_like(value, param, self._local_rows(key))
                if torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape)
                else value
                for name, value in per_param.items()
            }
        optimizer.load_state_dict({**state, "state": sharded})


def _is_dtensor(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _full_cpu(value):
    """A tensor's full value on CPU (gathered if it is a DTensor); other values as they are."""
    if _is_dtensor(value):
        return value.full_tensor().cpu()
    return value


def _shard_like(full: torch.Tensor, param: torch.Tensor, rows: slice) -> torch.Tensor:
    """``full``'s ``rows`` as a DTensor laid out like the sharded ``param``."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import DTensor

    local = full[rows].to(device=param.to_local().device, dtype=param.dtype).contiguous()
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def _all_reduced(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum over ranks of ``values`` (on CPU afterwards)."""
    import torch.distributed as dist

    values = values.to(device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def shard_mask_set(mask_set: MaskSet, mesh=None) -> ShardedMaskSet:
    """A :class:`ShardedMaskSet` with ``mask_set``'s components, settings, logits, temperature,
    noise state and mode (a new module; ``mask_set`` is left as it is). Needs an initialised
    process group (:func:`data_parallel`); every rank must pass the same mask set."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("shard_mask_set needs a process group; call it inside data_parallel()")
    always_off = {key: getattr(mask_set, name) for key, name in mask_set._always_off.items()}
    sharded = ShardedMaskSet(
        list(mask_set.components.values()),
        mask_set.parameterization,
        0.0,
        always_off,
        mask_set.penalty_weighting,
        mask_set.device,
        {key: mask_set.parameter(key).device for key in mask_set.components},
        mesh=mesh,
    )
    sharded.load_state_dict(mask_set.state_dict())
    if mask_set.generator is not None:
        sharded.generator.set_state(mask_set.generator.get_state())
    sharded.train(mask_set.training)
    return sharded


def full_logits(mask_set: MaskSet) -> dict[str, torch.Tensor]:
    """The full (unsharded) logit tensors of a mask set by key (a collective for a sharded set:
    every rank must call it)."""
    return {key: mask_set.logit(key).detach() for key in mask_set.components}
