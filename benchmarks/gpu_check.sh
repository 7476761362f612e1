#!/usr/bin/env bash
# The GPU half of issue 7 in one run (sized for 10 minutes on an H100/H200; not yet run): SDXL-sized (random-weight,
# real-config) LoRA steps at 512 and 1024 px under a 16 GB cap, the memory estimator against the
# measured peaks, and a 2x2 sweep of whole trials on a random-weight SDXL folder loaded through
# from_pretrained, with and without the shared cache and the kept base.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # figures go to OUT_DIR (default: gpu-check/)
#
# On a machine with PyTorch but without sdsweep's other dependencies and no network (the device
# machine), first fetch their wheels where pip works, then carry .whl/ along:
#
#   bash benchmarks/gpu_check.sh --fetch-wheels     # writes .whl/ (about 51 MB, Python 3.12, x86-64)
#
# and the check installs them into /tmp/site before it starts (W&B is not needed: tracking is off).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  rm -rf .whl && mkdir -p .whl
  for spec in diffusers hydra-core omegaconf open_clip_torch ftfy wcwidth prodigyopt bitsandbytes peft; do
    version=$(python3 -m pip show "$spec" 2>/dev/null | awk '/^Version:/{print $2}')
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$spec${version:+==$version}"
  done
  python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl  # hydra's parser: sdist only
  python3 -m pip wheel -q --no-deps . -w .whl                                 # sdsweep itself, conf/ included
  du -sh .whl
  exit 0
fi

out=${1:-gpu-check}
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import diffusers, hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# 1. one SDXL LoRA step: it/s, peak VRAM under 16 GB, MFU (checkpointing off and on), then compiled
python3 benchmarks/step_speed.py --cap-gb 16 --steps 10 | tee "$out/step_speed.txt"
python3 benchmarks/step_speed.py --cap-gb 16 --steps 10 --resolutions 1024 --compile | tee "$out/step_speed_compile.txt"
# 2. the estimator's prediction against the measured peak (goal: within 15 %)
python3 benchmarks/estimate_vs_measured.py | tee "$out/estimate_vs_measured.txt"
# 3. whole trials: a 2x2 sweep on a random-weight SDXL folder, sdsweep vs a script run per cell
python3 benchmarks/sdxl_random.py /tmp/sdxl-random | tee "$out/sdxl_random.txt"
python3 benchmarks/sweep_speed.py --steps 30 --set model=sdxl model.pretrained=/tmp/sdxl-random \
  precision=bf16 data.resolution=512 data.crop=center train.batch_size=1 \
  | tee "$out/sweep_speed.txt"
