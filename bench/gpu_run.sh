#!/usr/bin/env bash
# One prepared GPU session (device tool, about 6 minutes on an H200): the FSDP GPU test, the
# attention and temporal-conv kernels at the base decoder's shapes (bench/kernels.py), the base
# decoder's training step eager, then compiled block by block (with a profile), both channels_last.
# PARTS picks some of "fsdp kernels eager compiled chain" (chain, not in the default: every step of
# configs/base/pipeline.yaml trains 2 steps at its base size and the chain samples a 76x768x768
# video, an estimated 3 minutes); AB=1 adds the compiled step with inductor's own
# channels_last choice per block (--heuristic-layout, 2.5 minutes more), WIDE=1 the compiled step at
# 192 channels (3.5 minutes more). The FSDP test's clips need an ffmpeg binary, which the device image lacks:
# write them here first and carry them too (carry [".whl", ".gpu_test_data"]), with the base chain's
# 256 px clips and 768 px image-text pairs (under 1 MB):
#   .venv/bin/python -c "from pathlib import Path; from data_prep.synthetic import write_synthetic_dataset as w; \
#     w(Path('.gpu_test_data'), 'shapes', num_clips=8, frames=20, size=64, fps=12); \
#     from tests.test_models_gpu import write_base_chain_data; write_base_chain_data(Path('.gpu_test_data'))"
# Expects wheels for what the CUDA image lacks in .whl/ (pydantic, pydantic_core,
# annotated-types, typing-inspection, diffusers, av, webdataset, braceexpand, importlib_metadata,
# zipp): .whl is git-ignored, so the device call must name it in `carry`. The image's python3 is
# 3.12 (x86-64); pydantic 2.14 needs typing_extensions >= 4.16, which the image may predate. From
# the repo root, the .venv's versions (44 MB, with the 4 MB tree under the 64 MiB a call carries):
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing_extensions==4.16.0 diffusers==0.42.1 av==18.1.0 webdataset==1.0.2 braceexpand==0.1.7 \
#     importlib_metadata==9.1.0 zipp==4.1.2
# Results and their dates: bench/RESULTS.md.
set -uo pipefail
OUT=${OUT:-/tmp/out}
PARTS=${PARTS:-fsdp kernels eager compiled}
mkdir -p "$OUT"
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "no wheels in .whl/: run the device call with carry [\".whl\"]" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAV_CACHE=/tmp/mav-cache
# before any device minute goes to a run that cannot start (a wheel for another Python, a new import)
if ! python3 -c "import tests.test_models_gpu, bench.train_step, bench.kernels" 2>"$OUT/imports.txt"; then
  tail -3 "$OUT/imports.txt" >&2
  echo "the GPU tests or the benchmarks do not import here: see $OUT/imports.txt" >&2
  exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/device.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/device.txt"
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part fsdp; then  # the compiled channels_last bf16 path runs in the benchmark below
  # the test's clips, written here with an ffmpeg binary, which the device image lacks
  [ -d .gpu_test_data ] && export MAV_GPU_TEST_DATA=$PWD/.gpu_test_data
  timeout 170 python3 -m pytest -q -m gpu -k fsdp -p no:cacheprovider -p no:warnings --tb=short tests/test_models_gpu.py \
    > "$OUT/gpu_tests.txt" 2>&1
  grep -E '^(FAILED|ERROR|E  )|passed|failed' "$OUT/gpu_tests.txt" | tail -15
fi
if part chain; then  # configs/base/pipeline.yaml's steps at their sizes, then a sample (tiny CLIP: no hub here)
  [ -d .gpu_test_data ] && export MAV_GPU_TEST_DATA=$PWD/.gpu_test_data
  timeout 300 python3 -m pytest -q -m gpu -k base_pipeline -p no:cacheprovider -p no:warnings --tb=short \
    tests/test_models_gpu.py > "$OUT/gpu_chain.txt" 2>&1
  grep -E '^(FAILED|ERROR|E  )|passed|failed' "$OUT/gpu_chain.txt" | tail -15
fi
if part kernels; then
  timeout 100 python3 bench/kernels.py 2>&1 | tee "$OUT/kernels.txt"
fi
# the whole log in $OUT (a dynamo "falling back to eager" warning matters); the filtered one on screen
bench() { timeout "$1" python3 bench/train_step.py --size base --device cuda --stages decoder "${@:2}" 2>&1 \
  | tee -a "$OUT/train_step_full.txt" | grep -v -e Warning -e warn -e '^Loading' -e '^Writing' \
  | tee -a "$OUT/train_step.txt"; }
if part eager; then
  echo "== eager, channels_last, batch 16" | tee -a "$OUT/train_step.txt"
  bench 60 --channels-last --batch-size 16
fi
if part compiled; then
  echo "== compiled block by block, channels_last, batch 16 (+ profile)" | tee -a "$OUT/train_step.txt"
  bench 240 --channels-last --batch-size 16 --compile --profile "$OUT/profile_compiled.txt"
fi
if [ "${AB:-0}" = 1 ]; then
  echo "== compiled block by block, channels_last, batch 16, inductor's layout heuristic" | tee -a "$OUT/train_step.txt"
  bench 240 --channels-last --batch-size 16 --compile --heuristic-layout
fi
# width: at 128 channels the 64x64 level's ResBlocks move more bytes per FLOP than an H100's
# ridge point (about 300 FLOP/byte in bf16); at 192 they move less (RESULTS.md, next steps)
if [ "${WIDE:-0}" = 1 ]; then
  echo "== compiled block by block, channels_last, batch 16, 192 channels" | tee -a "$OUT/train_step.txt"
  bench 195 --channels-last --batch-size 16 --compile --set unet.channels=192
fi
