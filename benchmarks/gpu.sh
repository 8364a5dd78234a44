#!/usr/bin/env bash
# The one prepared GPU script (anyone with a CUDA machine can rerun it from the repo root):
#  1. mask overhead benchmark on Pythia-70M and Pythia-160M shapes (bench_masks.py --device cuda)
#  2. a timed weight-mask bigram search on a Pythia-160M-shaped model (bench_search_gpu.py)
#  3. weight-level (the paper's granularity) bigram subnetworks of the bundled default model,
#     lambda in {0, 1, 10, 100}, packed as weight_sweep.tgz (masks, sweep.csv, histories).
# Results go to $OUT (default runs/gpu). On the lent device machine, wheels for packages its
# image lacks travel in .whl/ and the corpus archives + default model in .gpu_cache/.
set -uo pipefail
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 BIGRAM_CIRCUITS_CACHE="${BIGRAM_CIRCUITS_CACHE:-$PWD/.gpu_cache}"
[ -d .gpu_cache/default_model ] && export BIGRAM_CIRCUITS_DEFAULT_MODEL="$PWD/.gpu_cache/default_model"
nvidia-smi -L
python3 benchmarks/bench_masks.py --device cuda --size 70m --out "$OUT/bench_masks_cuda_70m.json" 2>&1 | grep -v "it/s"
python3 benchmarks/bench_masks.py --device cuda --size 160m --out "$OUT/bench_masks_cuda_160m.json" 2>&1 | grep -v "it/s"
python3 benchmarks/bench_search_gpu.py --device cuda --size 160m --steps 300 --out "$OUT/bench_search_160m.json" 2>&1 | grep -v "it/s"
SWEEP=/tmp/weight_sweep
for lam in 0 1 10 100; do
  python3 -m bigram_circuits.cli find --model default --granularity weight --lambdas "$lam" \
    --device cuda --max-steps 4000 --time-budget-s 75 --out "$SWEEP" 2>&1 | grep -v "it/s\|step/s" | tail -8
  tar -C "$SWEEP" -czf "$OUT/weight_sweep.tgz" --exclude='checkpoint.pt' --exclude='*.npz' .
done
ls -la "$OUT"
