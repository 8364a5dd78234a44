"""Small regeneration of the paper's figures and tables, plus find + evaluate + lens, through
the CLI; writes every numeric result as one JSON so two versions of the code can be compared.

Used to show that a refactor keeps behaviour: run it on the old commit and on the new one
(one heavy job at a time, one torch thread), then ``--compare old.json new.json``.

    python benchmarks/regeneration_check.py --out runs/regen_new --json new.json
    python benchmarks/regeneration_check.py --compare old.json new.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

# Small enough for about 5 minutes of one CPU thread; every stage of the pipeline still runs.
FIGURES = [
    "--max-steps",
    "40",
    "--bigram-lambdas",
    "1,10",
    "--optimal-lambdas",
    "10",
    "--checkpoint-lambdas",
    "10",
    "--max-checkpoints",
    "2",
    "--headline-seeds",
    "0,1",
    "--train-windows",
    "256",
    "--eval-windows",
    "64",
    "--analysis-tokens",
    "4096",
    "--ablation-windows",
    "16",
    "--random-seeds",
    "0,1",
    "--overlap-samples",
    "500",
    "--generation-tokens",
    "8",
    "--linear-map-steps",
    "30",
    "--target-fractions",
    "0.05",
]
FIND = [
    "--lambdas",
    "10",
    "--max-steps",
    "40",
    "--batch-size",
    "8",
    "--seq-len",
    "64",
    "--max-train-windows",
    "256",
    "--max-eval-windows",
    "64",
    "--temperature-growth",
    "1.04",
]
EVALUATE = ["--n-eval-windows", "32", "--n-random", "2", "--max-new-tokens", "8"]


def _cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "bigram_circuits.cli", *args], check=True, env=env)


def _numbers(folder: Path) -> dict[str, list]:
    """Every CSV under ``folder``: its numeric columns, rounded to 6 significant digits."""
    found = {}
    for path in sorted(folder.rglob("*.csv")):
        frame = pd.read_csv(path)
        # Timings differ run to run; every other number must be identical.
        numeric = frame.select_dtypes("number").drop(
            columns=[c for c in frame if c.endswith("time_s")], errors="ignore"
        )
        found[str(path.relative_to(folder))] = [
            [float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v for v in row]
            for row in numeric.itertuples(index=False)
        ]
    return found


def regenerate(out: Path) -> dict:
    timings = {}
    start = time.time()
    _cli("figures", "--out", str(out / "figures"), "--cache", str(out / "cache"), "--no-png", "--no-progress", *FIGURES)
    timings["figures_s"] = time.time() - start
    start = time.time()
    _cli("find", "--out", str(out / "find"), "--no-progress", *FIND)
    _cli("evaluate", str(out / "find"), "--out", str(out / "evaluation"), "--no-progress", *EVALUATE)
    timings["find_evaluate_s"] = time.time() - start
    return {
        "timings": timings,
        "figures": _numbers(out / "figures"),
        "evaluation": _numbers(out / "evaluation"),
        "find": _numbers(out / "find"),
    }


def compare(old: dict, new: dict) -> int:
    differences = 0
    for part in ("figures", "evaluation", "find"):
        for name in sorted(set(old[part]) | set(new[part])):
            if old[part].get(name) != new[part].get(name):
                differences += 1
                print(f"differs: {part}/{name}")
    same = sum(len(old[part]) for part in ("figures", "evaluation", "find")) - differences
    print(f"{same} tables identical, {differences} differ")
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/regeneration_check")
    parser.add_argument("--json", default="benchmarks/results/regeneration_check.json")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    if args.compare:
        old, new = (json.loads(Path(p).read_text()) for p in args.compare)
        return compare(old, new)
    result = regenerate(Path(args.out))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["timings"]), "->", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
