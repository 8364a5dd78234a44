#!/usr/bin/env bash
# Schedule comparison on SmolLM2-135M at weight masks (issue: a schedule that learns before it
# hardens). Each (schedule, lambda) is one resumable `find` run in runs/schedules/; two lanes run
# side by side (one torch thread each). Rerun the same command to resume: finished runs are
# reused. Aggregate with `python benchmarks/schedule_comparison.py`.
#
# Budget: at most 45 min of CPU per run (the study's cap per lambda). fast, settle and
# warm_settle get 300 steps (lr 0.02); slow gets its own lr (0.01) and 500 steps. settle is run at
# lambda 10 only: at 300 steps its temperature starts too late to decide the masks (see the table).
# Lane c is a probe beyond the equal budget: slow at lambda 10, 30 and 100 with 4x the tokens per step
# (16 x 32), ~3x the CPU of its 4 x 32 run, to see whether batch noise limits r (`c` runs it alone).
set -euo pipefail
cd "$(dirname "$0")/.."
BC=${BC:-.venv/bin/bigram-circuits}
COMMON=(--model smollm2 --batch-size 4 --seq-len 32 --max-attempts 1
        --max-train-windows 8192 --max-eval-windows 256 --checkpoint-every 25 --no-progress)
run() {  # schedule lambda [options]; NAME names the run folder (default: the schedule)
  local schedule=$1 lam=$2; shift 2
  OMP_NUM_THREADS=1 "$BC" find "${COMMON[@]}" --schedule "$schedule" --lambdas "$lam" \
    --out "runs/schedules/${NAME:-$schedule}_lambda_$lam" "$@"
}
fixed=(--lr 0.02 --max-steps 300)
lane_a() { run fast 0 "${fixed[@]}"; run fast 10 "${fixed[@]}"; run slow 0 --max-steps 500; }
lane_b() { run settle 10 "${fixed[@]}"; run warm_settle 0 "${fixed[@]}"; run warm_settle 10 "${fixed[@]}"; run slow 10 --max-steps 500; }
lane_c() { for lam in 10 30 100; do NAME=slow-batch16 run slow "$lam" --max-steps 500 --lr 0.01 --batch-size 16; done; }
# Lane d: the default model, fast (the SearchConfig default) against slow at lambda 10 over seeds
# 0, 1, 2, at the figures pipeline's batch (8 x 64, 2048 training windows): whether slow may
# become the default (its r and size no worse). `python benchmarks/schedule_comparison.py --model default`.
lane_d() {
  for schedule in fast slow; do
    OMP_NUM_THREADS=1 "$BC" find --model default --schedule "$schedule" --lambdas 10 --seeds 0,1,2 \
      --batch-size 8 --seq-len 64 --max-attempts 1 --max-train-windows 2048 --max-eval-windows 256 \
      --checkpoint-every 25 --no-progress --out "runs/schedules_default/$schedule"
  done
}
# Lane e: seeds 1 and 2 of lambda 30 at 16 x 32 (seed 0 is lane c's: r 0.902 at 9.2%), side by side.
lane_e() {
  for seed in 1 2; do
    NAME=slow-batch16-seed$seed run slow 30 --max-steps 500 --lr 0.01 --batch-size 16 --seeds "$seed" &
  done
  wait
}
case "${1:-both}" in
  a) lane_a ;;
  b) lane_b ;;
  c) lane_c ;;
  d) lane_d ;;
  e) lane_e ;;
  both) lane_a & lane_b & wait ;;
esac
