#!/usr/bin/env bash
# One prepared GPU session (device tool): evaluation and training-step benchmarks.
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
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/device.txt"
# eval (FVD) was recorded on 2026-11-26; this run sweeps the decoder's MFU (issue target >= 40 %)
python3 bench/train_step.py --size base --device cuda --stages decoder 2>&1 | tee "$OUT/train_step.txt"
python3 bench/train_step.py --size base --device cuda --stages decoder --batch-size 32 --grad-checkpoint 2>&1 \
  | tee -a "$OUT/train_step.txt"
timeout 240 python3 bench/train_step.py --size base --device cuda --stages decoder --batch-size 32 --grad-checkpoint \
  --compile 2>&1 | tee -a "$OUT/train_step.txt"
