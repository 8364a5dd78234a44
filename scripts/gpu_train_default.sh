#!/usr/bin/env bash
# Train the default model with the project's own script on a CUDA machine (same config as on
# CPU) and pack the result so that it fits the device tool's return limits (8 files, 64 MiB):
# final weights + 4 checkpoints (fp16) + a tar of the small files. Step 0 is re-created from the
# seed on the CPU by `install` and checked against the hash in metrics.json.
set -euo pipefail
export PYTHONUNBUFFERED=1 BIGRAM_CIRCUITS_CACHE="${BIGRAM_CIRCUITS_CACHE:-$PWD/.gpu_cache}"
OUT="${OUT:-runs/gpu_out}"
RUN=/tmp/default_model_run
nvidia-smi -L || true
python3 - <<PY
import sys, time
sys.path.insert(0, ".")
from bigram_circuits.training import TrainConfig, train_default_model
t = time.time()
m = train_default_model("$RUN", TrainConfig(device="cuda"))
print("train+eval seconds", time.time() - t, "eval loss", m["final_eval_loss_nats"],
      "unigram entropy", m["eval_unigram_entropy_nats"])
PY
mkdir -p "$OUT"
cp "$RUN/model.safetensors" "$OUT/"
for step in 128 512 1024 2048; do cp "$RUN/checkpoints/step_$step.safetensors" "$OUT/"; done
tar -C "$RUN" -czf "$OUT/small_files.tgz" --exclude='*.safetensors' --exclude=checkpoints .
ls -la "$OUT"
