#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on one GPU): CUDA vs CPU logits for every method, bf16 and
# fp16 + GradScaler training steps, a 1-process nccl DDP run, the bench at official batch sizes
# (+ evaluation at batch 100, memory at 1000 classes, torch.compile on/off) and the suite projection.
# Results: benchmarks/results/<gpu>/gpu-check.{json,md} (+ results.*, suite-base2new.*).
#   benchmarks/gpu/check.sh          # on a machine with one CUDA GPU
#   benchmarks/gpu/check.sh --dry    # the same code on CPU with the tiny model (CI; < 60 s)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if [[ " $* " == *" --dry "* ]]; then
  export CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
else
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
fi
exec timeout "${CHECK_TIMEOUT_S:-900}" "$PY" -m vlprompt.bench.gpucheck "$@"
