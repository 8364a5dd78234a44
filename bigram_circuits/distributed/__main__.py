"""``torchrun --nproc-per-node N -m bigram_circuits.distributed [--shard-masks] <command> [options]``:
the ``bigram-circuits`` command line run data-parallel (application layer: it runs the CLI inside
:func:`bigram_circuits.distributed.data_parallel`). ``--shard-masks`` (before the command) keeps
each search's mask logits sharded over the ranks (FSDP2) instead of a full copy per rank."""

from __future__ import annotations

import contextlib
import io
import sys

from bigram_circuits.cli import main as cli_main
from bigram_circuits.distributed import data_parallel
from bigram_circuits.errors import BigramCircuitsError


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


SHARD_MASKS = "--shard-masks"


def main(argv: list[str] | None = None) -> int:
    """``torchrun ... -m bigram_circuits.distributed [--shard-masks] <command> [options]``: the
    ``bigram-circuits`` command line run data-parallel. Rank 0 prints and writes; other ranks
    print only errors."""
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
    try:
        with data_parallel(device=_option(argv, "--device"), shard_masks=shard_masks) as group:
            if shard_masks and not group.sharded:
                print(
                    f"note: one process, so {SHARD_MASKS} has nothing to shard; launch with torchrun", file=sys.stderr
                )
            if not group.is_writer:
                with contextlib.redirect_stdout(io.StringIO()):
                    return cli_main(argv)
            return cli_main(argv)
    except BigramCircuitsError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
