"""Devices: the one place a device request becomes a ``torch.device``, and the one place the
device of a loaded model is read.

:func:`resolve_device` turns what a user asks for (``--device`` / ``device=``) into a
``torch.device``; the application layer calls it once per command, before any long work, and
passes the result down. Its rules:

- ``None`` and ``"cpu"`` are the CPU; ``"auto"`` is CUDA if CUDA is available, else the CPU.
- ``"cuda"`` (and ``"auto"`` with CUDA) is the current CUDA device (``cuda:0`` unless the
  process chose another); under torchrun (``LOCAL_RANK`` set) it is each rank's own GPU,
  ``cuda:{LOCAL_RANK}``.
- An explicit ``"cuda:N"`` (or an int ``N``) under torchrun with more than one rank on this
  machine would put every rank on the same GPU, so it is refused unless
  ``$BIGRAM_CIRCUITS_SHARE_GPU=1`` says that is meant.
- A ``torch.device`` with an index (or the CPU) is taken as resolved already: it is only
  checked to be present, so resolving a result again returns it unchanged (also under
  torchrun, where a script may choose a device for each rank itself).
- An impossible request (CUDA without CUDA, ``cuda:N`` beyond the GPUs present, torchrun
  ranks beyond the GPUs present, ``mps`` or ``xpu`` that is absent, ``meta``, an unknown
  name) raises one :class:`~bigram_circuits.errors.DeviceError` (a ``ConfigError``) whose one
  line says what to do.

:func:`input_device` is where a loaded model takes its token ids (the embedding's device, also
under a ``device_map``); every library function that moves tokens to a model asks it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from bigram_circuits.errors import DeviceError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["SHARE_GPU_ENV", "available_devices", "input_device", "resolve_device", "torchrun_ranks"]

SHARE_GPU_ENV = "BIGRAM_CIRCUITS_SHARE_GPU"
_CPU = torch.device("cpu")


def available_devices() -> list[str]:
    """The torch devices present here, e.g. ``["cpu"]`` or ``["cpu", "cuda:0", "cuda:1"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    return found


def torchrun_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(local_rank, ranks on this machine)`` when torchrun started this process (``LOCAL_RANK``
    set; the count is ``LOCAL_WORLD_SIZE``, else ``WORLD_SIZE``, else 1), else ``None``."""
    env = os.environ if environ is None else environ
    if "LOCAL_RANK" not in env:
        return None
    try:
        local_rank = int(env["LOCAL_RANK"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    except ValueError as exc:
        raise DeviceError(
            f"LOCAL_RANK / LOCAL_WORLD_SIZE are not integers ({exc}); launch through torchrun or unset them"
        ) from exc
    return local_rank, local_world


def resolve_device(
    request: str | int | torch.device | None = "cpu", *, environ: Mapping[str, str] | None = None
) -> torch.device:
    """The ``torch.device`` this process uses for ``request``, checked to be present (rules in the
    module docstring). ``environ`` replaces ``os.environ`` (the torchrun variables).

    Raises:
        DeviceError: an impossible request; the one-line message says what to pass instead.
    """
    present = available_devices()
    hint = f"devices present: {', '.join(present)}; pass one of them (e.g. --device cpu)"
    if request is None:
        return _CPU
    if isinstance(request, torch.device) and (request.type == "cpu" or request.index is not None):
        return _present(request, hint)  # resolved already
    text = f"cuda:{request}" if isinstance(request, int) else str(request).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return _CPU
        text = "cuda"
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DeviceError(f"unknown device {str(request)!r}; {hint}") from exc
    if parsed.type != "cuda":
        if parsed.index is None and any(p.split(":")[0] == parsed.type for p in present[1:]):
            return torch.device(parsed.type, 0)  # "xpu": the first one
        return _present(parsed, hint)
    ranks = torchrun_ranks(environ)
    if parsed.index is None:
        if ranks is not None:
            return _local_gpu(ranks[0], text, hint)
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        return _present(torch.device("cuda", index), hint, asked=text)
    env = os.environ if environ is None else environ
    if ranks is not None and ranks[1] > 1 and env.get(SHARE_GPU_ENV, "") != "1":
        raise DeviceError(
            f"device {text!r} would put all {ranks[1]} torchrun ranks of this machine on one GPU; "
            f"pass --device cuda (each rank takes cuda:LOCAL_RANK), or set {SHARE_GPU_ENV}=1 to share that GPU"
        )
    return _present(parsed, hint)


def _local_gpu(local_rank: int, asked: str, hint: str) -> torch.device:
    """Rank ``LOCAL_RANK``'s own GPU for a ``cuda`` / ``auto`` request under torchrun."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count and not 0 <= local_rank < count:
        raise DeviceError(
            f"device {asked!r} gives each torchrun rank its own GPU, but LOCAL_RANK is {local_rank} and "
            f"{count} GPUs are present; launch at most --nproc-per-node {count} (or pass --device cpu)"
        )
    return _present(torch.device("cuda", local_rank), hint, asked=asked)


def _present(device: torch.device, hint: str, asked: str | None = None) -> torch.device:
    """``device`` if it exists here, else one :class:`DeviceError` line naming the devices present."""
    asked = str(device) if asked is None else asked
    if device.type == "cpu":
        return _CPU
    if device.type == "meta":
        raise DeviceError(f"device 'meta' holds no data and cannot run a model; {hint}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {asked!r} is not available (no CUDA here); {hint}")
        count = torch.cuda.device_count()
        if not 0 <= int(device.index or 0) < count:
            raise DeviceError(f"device {asked!r} is not available ({count} CUDA devices); {hint}")
        return device
    name = device.type if device.index is None else f"{device.type}:{device.index}"
    if name not in available_devices():
        raise DeviceError(f"device {asked!r} is not available; {hint}")
    return device


def input_device(bridge: TransformerBridge) -> torch.device:
    """The device a loaded model takes its token ids on: ``cfg.device`` (the embedding's device,
    also under a ``device_map``), else its first parameter's device, else the CPU."""
    cfg_device = getattr(getattr(bridge, "cfg", None), "device", None)
    if cfg_device is not None:
        return torch.device(cfg_device)
    for param in bridge.parameters():
        if param.device.type != "meta":
            return param.device
    return _CPU
