#!/usr/bin/env bash
# StarSSE under FSDP2 (NCCL) vs one unsharded process, on a GPU machine: see benchmarks/gpu_fsdp_check.py.
# 2 processes with 2+ GPUs, else 1 (FSDP2 over a world of one: the same code path, nothing really split).
# Not run yet (no GPU here); tests/test_trainer_fsdp.py runs the same trainer code on 2 CPU processes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/ imports from the checkout
OUT=${1:-/tmp/gpu_fsdp_check}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then echo "no GPU: run tests/test_trainer_fsdp.py instead" >&2; exit 1; fi
N=$(( GPUS >= 2 ? 2 : 1 ))
mkdir -p "$OUT"
$PY -m accelerate.commands.launch --use_fsdp --fsdp_version 2 --num_processes "$N" --num_machines 1 \
  --mixed_precision no --dynamo_backend no \
  benchmarks/gpu_fsdp_check.py sharded "$OUT" --processes "$N"
CUDA_VISIBLE_DEVICES=0 $PY benchmarks/gpu_fsdp_check.py unsharded "$OUT" --processes "$N"
$PY benchmarks/gpu_fsdp_check.py compare "$OUT" --json docs/results/benchmarks/gpu_fsdp_check.json
