#!/usr/bin/env bash
# Schedule comparison on SmolLM2-135M at weight masks (issue: a schedule that learns before it
# hardens). Each (schedule, lambda) is one resumable `find` run; two lanes run side by side
# (one torch thread each). Rerun the same command to resume. Aggregate with
# `python benchmarks/schedule_comparison.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
BC=${BC:-.venv/bin/bigram-circuits}
COMMON=(--model smollm2 --batch-size 4 --seq-len 32 --lr 0.02 --max-steps 300 --max-attempts 1
        --max-train-windows 8192 --max-eval-windows 256 --checkpoint-every 25 --no-progress)
run() {  # schedule lambda
  OMP_NUM_THREADS=1 "$BC" find "${COMMON[@]}" --schedule "$1" --lambdas "$2" --out "runs/schedules/$1_lambda_$2"
}
lane_a() { run fast 0; run fast 10; run settle 0; }
lane_b() { run settle 10; run warm_settle 0; run warm_settle 10; }
case "${1:-both}" in
  a) lane_a ;;
  b) lane_b ;;
  both) lane_a & lane_b & wait ;;
esac
