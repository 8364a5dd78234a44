#!/usr/bin/env bash
# The SmolLM2-135M study at weight masks with one named schedule, in resumable stages on two
# lanes (one torch thread each). Rerun the same command after a stop: every finished search is
# reused, every running one resumes from its last checkpoint.
#
#   bash scripts/smollm2_study.sh slow             # SCHEDULE (search.SCHEDULES)
#   LR=0.02 STEPS=300 bash scripts/smollm2_study.sh fast
#   BATCH=16 LAMBDAS="0 1 10 30 100" bash scripts/smollm2_study.sh slow   # 16 x 32 tokens per step
#
# LR and STEPS must be those of the schedule comparison's runs for them to be reused
# (scripts/schedule_comparison.sh: slow 0.01 / 500, the others 0.02 / 300).
#
# 1. LAMBDAS (default 0 1 10 100; runs/schedules/NAME_lambda_LAM from the schedule comparison are
#    copied in when present: same config, so they are reused, not rerun; NAME is SCHEDULE at
#    BATCH 4, else SCHEDULE-batchBATCH);
# 2. the chosen lambda (the paper's rule, from sweep.csv) with seeds 1 and 2 (the comparison's
#    runs/schedules/NAME-seedN_lambda_CHOSEN are copied in when present);
# 3. the optimal subnetwork (target: the full model) and the control searches (CONTROLS, by
#    default random_init random_init_trained_embeddings permuted_contexts) at the chosen lambda;
# 4. benchmarks/smollm2_study.py, which reuses all of the above and adds the ablation against 3
#    random controls, generations, overlap, Table 2, partial ablation, seed-vs-seed overlap,
#    layers, rotation, similarity and the noise ceiling, and writes
#    benchmarks/results/smollm2_study.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
SCHEDULE=${1:?usage: scripts/smollm2_study.sh SCHEDULE}
BATCH=${BATCH:-4}  # windows of 32 tokens per step
NAME=$SCHEDULE; [ "$BATCH" = 4 ] || NAME=$SCHEDULE-batch$BATCH
SUFFIX=""; [ "$BATCH" = 4 ] || SUFFIX=_b$BATCH
OUT=${OUT:-runs/smollm2_weight_$SCHEDULE$SUFFIX}
read -r -a LAMBDAS <<< "${LAMBDAS:-0 1 10 100}"
BC=${BC:-.venv/bin/bigram-circuits}
LR=${LR:-0.01}
STEPS=${STEPS:-500}
read -r -a CONTROLS <<< "${CONTROLS:-random_init random_init_trained_embeddings permuted_contexts}"
SIZES=(--batch-size "$BATCH" --seq-len 32 --lr "$LR" --max-steps "$STEPS" --max-attempts 1 --checkpoint-every 25)
COMMON=(--model smollm2 "${SIZES[@]}" --max-train-windows 8192 --max-eval-windows 256 --no-progress
        --schedule "$SCHEDULE")
find_() { OMP_NUM_THREADS=1 "$BC" find "${COMMON[@]}" "$@"; }
mkdir -p "$OUT"
for lam in "${LAMBDAS[@]}"; do  # the comparison's runs of this schedule, if finished
  from=runs/schedules/${NAME}_lambda_$lam
  if [ -f "$from/lambda_$lam/subnetwork.json" ] && [ ! -e "$OUT/lambda_$lam" ]; then
    cp -r "$from/lambda_$lam" "$OUT/"; cp -n "$from/bigram_stats.npz" "$OUT/" || true
  fi
done
# 1. the sweep, lambdas alternating between two lanes, then one call that reuses them all and
# writes sweep.csv
lambdas_of_lane() { local i; for i in "${!LAMBDAS[@]}"; do if [ $((i % 2)) = "$1" ]; then echo "${LAMBDAS[$i]}"; fi; done; }
{ for lam in $(lambdas_of_lane 0); do find_ --lambdas "$lam" --out "$OUT"; done; } &
{ for lam in $(lambdas_of_lane 1); do find_ --lambdas "$lam" --out "$OUT"; done; } &
wait
find_ --lambdas "$(IFS=,; echo "${LAMBDAS[*]}")" --out "$OUT"
CHOSEN=$(.venv/bin/python -c "import pandas as p; t=p.read_csv('$OUT/sweep.csv'); print(f\"{t[t.chosen]['lambda'].iloc[0]:g}\")")
echo "chosen lambda: $CHOSEN"
STUDY=(.venv/bin/python benchmarks/smollm2_study.py --schedule "$SCHEDULE"
  --lambdas "${LAMBDAS[@]}" --seeds 1 2 --max-steps "$STEPS" --max-attempts 1 --batch-size "$BATCH" --seq-len 32 --lr "$LR"
  --train-windows 8192 --eval-windows 256 --checkpoint-every 25 --eval-batches 8 --time-budget-s 1e9
  --controls "${CONTROLS[@]}" --out "$OUT")
# 2-3. every other search at the chosen lambda, from one queue on two lanes (a finished one is
# reused in seconds): seeds 1 and 2 (OUT/seed_N, as the study lays them out), the optimal
# subnetwork (target: the full model; OUT/optimal) and the controls (OUT/controls/NAME).
job() {
  case $1 in
    seed_*) mkdir -p "$OUT/$1"; cp -n "$OUT/bigram_stats.npz" "$OUT/$1/" || true
            from=runs/schedules/${NAME}-seed${1#seed_}_lambda_$CHOSEN/lambda_$CHOSEN  # lane e of the comparison
            if [ -f "$from/subnetwork.json" ] && [ ! -e "$OUT/$1/lambda_$CHOSEN" ]; then cp -r "$from" "$OUT/$1/"; fi
            find_ --lambdas "$CHOSEN" --seeds "${1#seed_}" --out "$OUT/$1" ;;
    optimal) mkdir -p "$OUT/optimal"; cp -n "$OUT/bigram_stats.npz" "$OUT/optimal/" || true
             find_ --target full_model --lambdas "$CHOSEN" --out "$OUT/optimal" ;;
    *) OMP_NUM_THREADS=1 "${STUDY[@]}" --threads 1 --only-control "$1" ;;
  esac
}
JOBS=(seed_1 seed_2 optimal "${CONTROLS[@]}")
CLAIMS=$(mktemp -d)
lane() { for j in "${JOBS[@]}"; do if mkdir "$CLAIMS/$j" 2>/dev/null; then job "$j"; fi; done; }
lane & lane & wait
rm -rf "$CLAIMS"
# 4. the study (reuses every search above)
OMP_NUM_THREADS=2 "${STUDY[@]}" --threads 2
