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
the ranks use CUDA (each rank then takes ``cuda:{LOCAL_RANK}``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Integer

from bigram_circuits.errors import ConfigError, SearchError

__all__ = [
    "SINGLE_PROCESS",
    "ProcessGroup",
    "current",
    "data_parallel",
    "full_logits",
    "launched_by_torchrun",
    "main",
    "shard_mask_set",
]


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a data-parallel run (``world_size == 1``: a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes checkpoints and results (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

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
        """Average the gradients of ``module``'s parameters over ranks (one all-reduce per
        device, on a flat buffer)."""
        if not self.active:
            return
        import torch.distributed as dist

        by_device: dict[torch.device, list[torch.nn.Parameter]] = {}
        for param in module.parameters():
            if param.requires_grad:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                by_device.setdefault(param.grad.device, []).append(param)
        for params in by_device.values():
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

    def device_for(self, device: str | torch.device) -> str:
        """The device this rank uses when asked for ``device``: ``cuda`` -> ``cuda:{local_rank}``."""
        text = str(device)
        if self.active and text == "cuda":
            return f"cuda:{self.local_rank}"
        return text

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


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
) -> Iterator[ProcessGroup]:
    """Join (or start) a process group for the block; searches inside it run data-parallel.

    Under torchrun everything comes from the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); tests pass ``rank``, ``world_size`` and a
    ``tcp://`` ``init_method``. ``backend`` defaults to ``nccl`` when ``device`` is CUDA, else
    ``gloo``. An already initialised default group is reused (and left open).
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
    if backend is None:
        backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
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
    group = ProcessGroup(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)
    _ACTIVE.append(group)
    try:
        yield group
    finally:
        _ACTIVE.pop()
        if created:
            dist.destroy_process_group()


def shard_mask_set(mask_set: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """Shard a :class:`~bigram_circuits.masks.MaskSet`'s logits over the ranks with FSDP2
    (``torch.distributed.fsdp.fully_shard``): each rank keeps 1/N of every logit tensor (dim 0),
    so the logits, their gradients and an optimizer's moments over ``mask_set.parameters()``
    cost 16/N bytes per masked weight. Inside ``mask_set.attach(bridge)`` the full logits are
    gathered once per forward pass (FSDP2's pre-forward all-gather around ``mask_set()``) and
    the gradients reduce-scattered (averaged) in the backward pass, so ranks that each run their
    shard of a batch follow one process on the whole batch. Needs an initialised process group
    (:func:`data_parallel`); works on CPU with gloo. Returns the same module, now an
    ``FSDPModule``. Not yet wired into :func:`bigram_circuits.search.search` (see
    docs/scale_out.md)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("shard_mask_set needs a process group; call it inside data_parallel()")
    if mesh is None:
        device = next(mask_set.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    fully_shard(mask_set, mesh=mesh, reshard_after_forward=True)
    mask_set.gather_masks_in_forward = True
    return mask_set


def full_logits(mask_set: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) logit tensors of a mask set, keyed like its parameters (a
    collective: every rank must call it)."""
    out = {}
    for name, param in mask_set.named_parameters():
        out[name] = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
    return out
