"""The one prepared GPU check: suite on the device, timed 160M-shape search, default-model sweep.

    python benchmarks/gpu_check.py                      # on a lent GPU: cuda, under 8 minutes
    python benchmarks/gpu_check.py --device cpu --size tiny --steps 3 ...   # the CPU rehearsal

Stages (each bounded by its own time limit; the JSON is rewritten after every stage, so a stage
that runs out of time still leaves the earlier results):

1. ``tests``: the test suite with ``BIGRAM_CIRCUITS_TEST_DEVICE=<device>`` (``-m "not slow"``,
   notebooks excluded), pass/fail/skip counts from its JUnit XML.
2. ``search``: a weight-mask bigram search of a randomly initialised Pythia-160M-shaped GPT-NeoX
   (batch 32 x 128, 300 steps, lambda 10, every step run): median step time, peak GPU memory,
   the time the paper's 5k-15k steps would take. Tokens are a synthetic Zipfian Markov chain,
   so only time and memory mean anything.
3. ``sweep``: ``find`` on the default model with weight masks, lambdas 0, 1, 10, 100 (the
   paper's granularity): per-lambda weights kept, bigram r, steps, stop reason, wall time.

Writes one JSON (default ``benchmarks/results/gpu_check.json``) with the device, versions and
each stage's timings and results. Replaces the older ``gpu.sh`` + ``bench_search_gpu.py`` pair
(``gpu.sh`` now only prepares a bare device machine and calls this script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigram_circuits.models import resolve_device

# GPT-NeoX shapes: Pythia-160M and a tiny one for the CPU rehearsal.
SHAPES = {
    "160m": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 50_304,
    },
    "70m": {
        "hidden_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
        "vocab_size": 50_304,
    },
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 512,
    },
}
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_random_model(size: str, device: torch.device, workdir: Path):
    """A randomly initialised (seeded) Pythia-shaped GPT-NeoX bridge with a stand-in tokenizer
    (``bench_masks.random_pythia_bridge``, the same model the mask benchmark times)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_masks", Path(__file__).with_name("bench_masks.py"))
    bench_masks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_masks)
    return bench_masks.random_pythia_bridge(SHAPES[size], device, workdir)


def synthetic_windows(n_windows: int, seq_len: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A Markov chain whose next token is a Zipfian draw shifted by the current token."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()
    offsets = rng.choice(vocab, size=(n_windows, seq_len), p=zipf)
    windows = np.empty((n_windows, seq_len), dtype=np.int64)
    windows[:, 0] = offsets[:, 0]
    for i in range(1, seq_len):
        windows[:, i] = (windows[:, i - 1] * 7 + offsets[:, i]) % vocab
    return windows


def stage_tests(device: torch.device, targets: list[str], timeout_s: float, workdir: Path) -> dict:
    """The test suite on ``device`` (a subprocess), with counts from its JUnit XML."""
    junit = workdir / "junit.xml"
    env = {**os.environ, "BIGRAM_CIRCUITS_TEST_DEVICE": str(device), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not slow",
        f"--junitxml={junit}",
        "-o",
        "addopts=",
        *targets,
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        returncode, tail = done.returncode, (done.stdout + done.stderr)[-4000:]
    except subprocess.TimeoutExpired as exc:
        returncode, tail = None, f"timed out after {timeout_s:.0f} s: {(exc.stdout or '')[-2000:]}"
    result = {
        "targets": targets,
        "device": str(device),
        "returncode": returncode,
        "wall_s": time.perf_counter() - started,
        "output_tail": tail,
    }
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        result.update(counts)
        result["failed_tests"] = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ][:20]
    return result


def stage_search(device: torch.device, size: str, steps: int, batch: int, seq_len: int, workdir: Path) -> dict:
    """A timed weight-mask bigram search of a random Pythia-shaped model (every step run)."""
    from bigram_circuits.ngrams import BigramStats
    from bigram_circuits.search import SearchConfig, Target, search

    bridge = build_random_model(size, device, workdir)
    vocab = SHAPES[size]["vocab_size"]
    windows = synthetic_windows(max(steps * batch // 4, 2 * batch) + 64, seq_len, vocab)
    stats = BigramStats.from_tokens(windows, vocab, seq_len=seq_len, show_progress=False)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, row: dict) -> None:
        _sync(device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = SearchConfig(
        lam=10.0,
        max_steps=steps,
        batch_size=batch,
        seq_len=seq_len,
        stability_check=False,
        stop_undecided_fraction=0.0,
        checkpoint_every=10**6,
        eval_batches=2,
    )
    started = time.perf_counter()
    last[0] = started
    result = search(
        bridge,
        windows,
        Target.bigram(stats),
        "weight",
        config,
        eval_windows=windows[:64],
        show_progress=False,
        callback=on_step,
    )
    total = time.perf_counter() - started
    steady = sorted(step_times[5:]) or sorted(step_times)
    median = steady[len(steady) // 2]
    n_masked = sum(c.n_entries for c in result.subnetwork.components.values())
    return {
        "size": size,
        "shape": SHAPES[size],
        "granularity": "weight",
        "batch": f"{batch}x{seq_len}",
        "steps": len(step_times),
        "median_step_s": median,
        "first_step_s": step_times[0] if step_times else None,
        "total_s_including_eval": total,
        "projected_5k_steps_min": 5000 * median / 60,
        "projected_15k_steps_min": 15000 * median / 60,
        "masked_weights": n_masked,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "final_density": float(result.subnetwork.density),
        "bigram_r": result.metrics.get("bigram_r"),
    }


def stage_sweep(
    device: torch.device,
    model: str,
    corpus: str,
    lambdas: list[float],
    max_steps: int,
    time_budget_s: float,
    max_train_windows: int,
    max_eval_windows: int,
    out_dir: Path,
    **config_options,
) -> dict:
    """``find`` with weight masks over ``lambdas`` on ``model`` (the paper's granularity)."""
    from bigram_circuits.app.find import find_command

    started = time.perf_counter()
    table = find_command(
        model=model,
        granularities="weight",
        lambdas=lambdas,
        out_dir=out_dir,
        corpus=corpus,
        device=str(device),
        max_train_windows=max_train_windows,
        max_eval_windows=max_eval_windows,
        show_progress=False,
        max_steps=max_steps,
        time_budget_s=time_budget_s,
        **config_options,
    )
    columns = [
        c
        for c in (
            "lambda",
            "n_params",
            "percent_params",
            "density",
            "bigram_r",
            "target_loss",
            "steps",
            "stop_reason",
            "stable",
            "wall_time_s",
            "chosen",
        )
        if c in table.columns
    ]
    return {
        "model": model,
        "corpus": corpus,
        "lambdas": lambdas,
        "max_steps": max_steps,
        **config_options,
        "time_budget_s_per_lambda": time_budget_s,
        "wall_s": time.perf_counter() - started,
        "rows": json.loads(table[columns].to_json(orient="records")),
    }


def _environment(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host_cpus": os.cpu_count(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON report")
    parser.add_argument("--stages", default="tests,search,sweep", help="comma-separated subset")
    parser.add_argument("--tests", default="tests", help="pytest targets, comma-separated")
    parser.add_argument("--tests-timeout-s", type=float, default=180.0)
    parser.add_argument("--size", choices=sorted(SHAPES), default="160m")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--model", default="default", help="model of the sweep")
    parser.add_argument("--corpus", default="default", help="corpus of the sweep")
    parser.add_argument("--sweep-lambdas", default="0,1,10,100")
    parser.add_argument("--sweep-steps", type=int, default=2000, help="max steps per lambda")
    parser.add_argument("--sweep-time-budget-s", type=float, default=35.0, help="per lambda")
    parser.add_argument("--sweep-train-windows", type=int, default=4096)
    parser.add_argument("--sweep-eval-windows", type=int, default=256)
    parser.add_argument("--sweep-seq-len", type=int, default=128)
    parser.add_argument("--sweep-batch", type=int, default=32)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    report: dict = {
        "script": "benchmarks/gpu_check.py",
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "environment": _environment(device),
        "stages": {},
    }
    started = time.perf_counter()

    def save() -> None:
        report["total_wall_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)
        for stage in stages:
            stage_started = time.perf_counter()
            print(f"[gpu_check] {stage} on {device} ...", flush=True)
            try:
                if stage == "tests":
                    result = stage_tests(device, [t for t in args.tests.split(",") if t], args.tests_timeout_s, workdir)
                elif stage == "search":
                    (workdir / "model").mkdir()
                    result = stage_search(device, args.size, args.steps, args.batch, args.seq_len, workdir / "model")
                elif stage == "sweep":
                    lambdas = [float(x) for x in args.sweep_lambdas.split(",") if x.strip()]
                    result = stage_sweep(
                        device,
                        args.model,
                        args.corpus,
                        lambdas,
                        args.sweep_steps,
                        args.sweep_time_budget_s,
                        args.sweep_train_windows,
                        args.sweep_eval_windows,
                        workdir / "sweep",
                        seq_len=args.sweep_seq_len,
                        batch_size=args.sweep_batch,
                    )
                else:
                    result = {"error": f"unknown stage {stage!r}; use tests, search, sweep"}
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"}
            result["stage_wall_s"] = time.perf_counter() - stage_started
            report["stages"][stage] = result
            save()
            print(f"[gpu_check] {stage}: {result.get('error') or 'done'} in {result['stage_wall_s']:.1f} s", flush=True)
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "stages"}, indent=1))
    return report


if __name__ == "__main__":
    main()
