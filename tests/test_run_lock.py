"""One writer per run directory: a second search or `find` on a directory in use fails with one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bigram_circuits import cli
from bigram_circuits.data import tokenize_documents
from bigram_circuits.errors import OutputError
from bigram_circuits.io import run_directory_lock
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import SearchConfig, Target, search

SEQ = 16


def test_a_locked_run_directory_refuses_a_second_search(tiny_neox, tiny_text, tmp_path):
    bridge, tokenizer = tiny_neox
    tiny_windows = tokenize_documents(tiny_text, tokenizer, show_progress=False).windows(SEQ)
    stats = BigramStats.from_tokens(tiny_windows, len(tokenizer), seq_len=SEQ, show_progress=False)
    config = SearchConfig(batch_size=4, seq_len=SEQ, max_steps=2, stability_check=False, eval_batches=1)
    run = tmp_path / "run"
    # flock: another descriptor conflicts even in this process
    with run_directory_lock(run), pytest.raises(OutputError, match="another process is writing"):
        search(bridge, tiny_windows, Target.bigram(stats), "weight", config, run, show_progress=False)
    assert not (run / "checkpoint.pt").exists()
    # Released: the same search now runs, and a lock left by a finished run does not block.
    search(bridge, tiny_windows, Target.bigram(stats), "weight", config, run, show_progress=False)
    assert (run / "subnetwork.json").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="advisory locks are POSIX flock")
def test_cli_find_on_a_directory_another_process_writes_is_one_error_line(tmp_path, tiny_neox_dir, capsys):
    run = tmp_path / "run"
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time, pathlib; from bigram_circuits.io import run_directory_lock\n"
                f"with run_directory_lock({str(run)!r}):\n"
                f"    pathlib.Path({str(ready)!r}).write_text('1'); time.sleep(60)"
            ),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the lock holder did not start"
        code = cli.main(["find", "--out", str(run), "--model", str(tiny_neox_dir), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: another process is writing")
    finally:
        holder.kill()
        holder.wait()
