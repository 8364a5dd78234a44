"""Loop the spawned sharded-search worker of ``tests/test_sharded_search.py`` to catch its rare SIGSEGV.

CI once saw a spawned gloo rank of that worker die of SIGSEGV (about one run in ten). This script
runs the same worker (two gloo ranks, eight sharded searches each) again and again, one iteration
at a time, with faulthandler on in every rank and core dumps allowed, and writes one JSON line per
iteration (its seconds and how it ended) to ``--log``. A rank's faulthandler traceback goes to that
rank's stderr; a core file, if the kernel writes one, lands in the working directory (``bt`` in
gdb: ``gdb .venv/bin/python core.PID``).

    ulimit -c unlimited
    PYTHONFAULTHANDLER=1 .venv/bin/python scripts/sharded_sigsegv_loop.py --minutes 15 --log /tmp/segv.jsonl
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Run iterations until ``--iterations`` or ``--minutes`` is reached; 1 if any rank died."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="stop starting iterations after this long")
    parser.add_argument("--iterations", type=int, default=1000, help="at most this many iterations")
    parser.add_argument("--log", type=Path, required=True, help="one JSON line per iteration")
    args = parser.parse_args(argv)

    os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # inherited by the spawned ranks
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    faulthandler.enable()
    _soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # the ranks inherit the core limit
    sys.path.insert(0, str(ROOT / "tests"))

    import torch.multiprocessing as mp
    from conftest import TINY_NEOX_PADDED_VOCAB, free_port, make_tiny_model_dir
    from test_sharded_search import STOP_AT, _run, _worker
    from torch.multiprocessing.spawn import ProcessExitedException

    from bigram_circuits.models import load_model

    failures = 0
    deadline = time.monotonic() + 60 * args.minutes
    with tempfile.TemporaryDirectory(prefix="sharded_sigsegv_") as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_model_dir("neox", tmp / "model", vocab_size=TINY_NEOX_PADDED_VOCAB)
        bridge, _ = load_model(model_dir)
        crashed = tmp / "crashed"
        _run(bridge, crashed, stop_at=STOP_AT)  # the one-process run that C resumes sharded, as in the test
        for iteration in range(args.iterations):
            if time.monotonic() > deadline:
                break
            root = tmp / f"iteration_{iteration}"
            shutil.copytree(crashed, root / "C")
            start = time.monotonic()
            outcome: dict = {"iteration": iteration, "result": "ok"}
            try:
                mp.start_processes(
                    _worker,
                    args=(2, free_port(), str(model_dir), str(root)),
                    nprocs=2,
                    join=True,
                    start_method="spawn",
                )
            except ProcessExitedException as error:
                failures += 1
                outcome.update(
                    result="died", signal=error.signal_name, exit_code=error.exit_code, rank=error.error_index
                )
            except Exception as error:  # a rank's Python exception is recorded, not fatal
                failures += 1
                outcome.update(result="raised", error=str(error).splitlines()[-1][:300])
            outcome["seconds"] = round(time.monotonic() - start, 1)
            with args.log.open("a") as log:
                log.write(json.dumps(outcome) + "\n")
            print(json.dumps(outcome), flush=True)
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
