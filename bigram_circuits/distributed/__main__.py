"""``torchrun --nproc-per-node N -m bigram_circuits.distributed [--shard-masks] <command> [options]``:
the ``bigram-circuits`` command line run data-parallel (application layer: it runs the CLI inside
:func:`bigram_circuits.distributed.data_parallel`). ``--shard-masks`` (before the command) keeps
each search's mask logits sharded over the ranks (FSDP2) instead of a full copy per rank."""

from __future__ import annotations

import contextlib
import io
import sys

from bigram_circuits.cli import build_parser
from bigram_circuits.cli import run as cli_run
from bigram_circuits.devices import resolve_device
from bigram_circuits.distributed import data_parallel
from bigram_circuits.errors import BigramCircuitsError

SHARD_MASKS = "--shard-masks"


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m bigram_circuits.distributed [--shard-masks] <command> [options]``: the
    ``bigram-circuits`` command line run data-parallel. Rank 0 prints and writes; other ranks
    print only errors. ``--device`` is resolved here, once for this rank (``cuda`` and ``auto``:
    ``cuda:{LOCAL_RANK}``), and the command receives that ``torch.device``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    shard_masks = bool(argv) and argv[0] == SHARD_MASKS
    if shard_masks:
        argv = argv[1:]
    elif SHARD_MASKS in argv:
        print(
            f"error: put {SHARD_MASKS} before the command: torchrun ... -m bigram_circuits.distributed "
            f"{SHARD_MASKS} find ...",
            file=sys.stderr,
        )
        return 2
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(getattr(args, "device", "cpu"))  # every command's default device is the CPU
        if hasattr(args, "device"):
            args.device = device
        with data_parallel(device=device, shard_masks=shard_masks) as group:
            if shard_masks and not group.sharded:
                print(
                    f"note: one process, so {SHARD_MASKS} has nothing to shard; launch with torchrun", file=sys.stderr
                )
            if not group.is_writer:
                with contextlib.redirect_stdout(io.StringIO()):
                    return cli_run(args)
            return cli_run(args)
    except BigramCircuitsError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
