#!/usr/bin/env bash
# One prepared GPU session (device tool): the decoder's MFU sweep, the GPU tests, a profile.
# Expects wheels for the packages the CUDA image lacks in .whl/ (pydantic, diffusers, av, webdataset).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAV_CACHE=/tmp/mav-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/device.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/device.txt"
bench() { timeout "$1" python3 bench/train_step.py --size base --device cuda --stages decoder "${@:2}" 2>&1 \
  | grep -v -e Warning -e warn -e '^Loading' | tee -a "$OUT/train_step.txt"; }
echo "== NCHW, batch 8" | tee -a "$OUT/train_step.txt"; bench 60 --no-channels-last
echo "== channels_last, batch 8 (+ profile)" | tee -a "$OUT/train_step.txt"; bench 60 --profile "$OUT/profile.txt"
echo "== channels_last, batch 32, checkpointing" | tee -a "$OUT/train_step.txt"; bench 90 --batch-size 32 --grad-checkpoint
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_models_gpu.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
echo "== channels_last, batch 16, compile" | tee -a "$OUT/train_step.txt"; bench 200 --batch-size 16 --compile
cat "$OUT/train_step.txt"
