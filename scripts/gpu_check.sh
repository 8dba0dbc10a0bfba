#!/usr/bin/env bash
# GPU checks (run where a CUDA GPU exists; never part of the test suite):
#  1. each model trains 2 epochs with AMP on CUDA and prints its throughput (and without AMP for cgcnn/csgcnn);
#  2. the smoke search runs with --gpus-per-worker 1, directly in the Tune trial and through Ray Train.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (expects the venv from `make install` or a python with crystaltune)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(realpath -s "${PY:-.venv/bin/python}")  # absolute, symlink kept (venv)
OUT=${1:-gpu-check}
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled
$PY - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PYEOF
for model in cgcnn csgcnn csgann csginn flowgnn; do
  $PY -m crystaltune.bench train --dataset perovskites --model "$model" --epochs 2 --batch-size 256 \
      --device cuda --amp --json | tee "$OUT/train-$model-amp.json"
done
for model in cgcnn csgcnn; do
  $PY -m crystaltune.bench train --dataset perovskites --model "$model" --epochs 2 --batch-size 256 \
      --device cuda --json | tee "$OUT/train-$model-fp32.json"
done
(cd "$OUT" && "$PY" -m crystaltune.search smoke --gpus-per-worker 1 --output smoke-gpu --json | tail -30) | tee "$OUT/smoke-gpu.txt"
(cd "$OUT" && "$PY" -m crystaltune.search smoke --gpus-per-worker 1 --executor train --output smoke-gpu-train \
   --tracking-uri "sqlite:///$PWD/mlflow-train.db" --json | tail -30) | tee "$OUT/smoke-gpu-train.txt"
echo "GPU check done: $OUT"
