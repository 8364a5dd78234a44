#!/usr/bin/env bash
# Prepare a bare device machine, then run the one GPU check (benchmarks/gpu_check.py):
# the test suite on CUDA, a timed weight-mask search of a Pythia-160M-shaped model (32 x 128,
# 300 steps) and the default model's weight-mask lambda sweep, written to one JSON.
# On the lent device machine, wheels for packages its image lacks travel in .whl/ and the corpus
# archives + default model in .gpu_cache/. Extra arguments go to gpu_check.py.
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu_check.json}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 BIGRAM_CIRCUITS_CACHE="${BIGRAM_CIRCUITS_CACHE:-$PWD/.gpu_cache}"
[ -d .gpu_cache/default_model ] && export BIGRAM_CIRCUITS_DEFAULT_MODEL="$PWD/.gpu_cache/default_model"
nvidia-smi -L || true
python3 benchmarks/gpu_check.py --device cuda --out "$OUT" "$@" 2>&1 | grep -v "it/s"
