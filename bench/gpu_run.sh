#!/usr/bin/env bash
# One prepared GPU session (device tool): the FSDP test, then the decoder's MFU with the U-Net
# compiled block by block. Expects wheels for what the CUDA image lacks in .whl/ (pydantic,
# diffusers, av, webdataset). Eager sweep of 2026-11-27 (NCHW / channels_last / batch 32 with
# checkpointing): `bench` lines below with --no-channels-last, --batch-size 32 --grad-checkpoint.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAV_CACHE=/tmp/mav-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/device.txt"
bench() { timeout "$1" python3 bench/train_step.py --size base --device cuda --stages decoder "${@:2}" 2>&1 \
  | grep -v -e Warning -e warn -e '^Loading' -e '^Writing' | tee -a "$OUT/train_step.txt"; }
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:warnings --tb=short tests/test_models_gpu.py -k fsdp \
  > "$OUT/gpu_tests.txt" 2>&1
grep -v -e '^\s*$' "$OUT/gpu_tests.txt" | tail -30
echo "== channels_last, batch 16, compile blocks" | tee -a "$OUT/train_step.txt"; bench 230 --batch-size 16 --compile
