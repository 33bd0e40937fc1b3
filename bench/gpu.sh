#!/usr/bin/env bash
# The GPU benchmark, in one call on a lent GPU machine (the `device` tool), or on any CUDA host:
# a full-size random SDXL (no weights can be downloaded), then `chitrakar bench` under the
# presets the issue's targets name. Everything it measures lands in $OUT (JSON per preset,
# BENCHMARKS.md rows, measured-table rows), to be copied into the repository afterwards.
#
# Here, once, before the call (the GPU image has torch, transformers, peft and accelerate, but
# not these; see /work/.library/device/README.md):
#     bash bench/gpu.sh --download-wheels
# Then, through the device tool, with carry [".whl"] and a timeout_s of 600:
#     bash bench/gpu.sh
# torchao 0.17 is the release built for the torch 2.11 the GPU image has.
# Budget: about 9 minutes on an H100 (fp16 ~1.5 min, fast and int8-dynamic ~3 min each with
# the compilation, low-vram and lightning under a minute each). Each step has its own time
# limit so that one slow preset cannot cost the rest.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  diffusers==0.42.1 torchao==0.17.0
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  annotated-types==0.8.0 typing-inspection==0.4.5
)

if [ "${1:-}" = "--download-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >>.git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  exit
fi

OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CHITRAKAR_DATA_DIR=/tmp/chitrakar-data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

MODEL=/tmp/sdxl-random
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
cp chitrakar/measurements.jsonl "$OUT/measurements.jsonl"

timeout 120 python3 -m chitrakar model make-random --arch sdxl "$MODEL" 2>&1 | tail -n 2

bench() {  # bench LIMIT_S PRESET ARGS...
  local limit=$1 preset=$2
  shift 2
  echo "== $preset $*"
  timeout "$limit" python3 -m chitrakar bench --model "$MODEL" --label sdxl --preset "$preset" \
    --json "$OUT/bench-$preset.json" --record "$OUT/BENCHMARKS.md" \
    --table "$OUT/measurements.jsonl" "$@" 2>&1 | grep -v -e Warning -e warn | tail -n 8
}

# The targets: SDXL 1024², 30 steps, batch 1 (and batching's gain at 2, 4, 8); a memory
# preset under 8 GB; a few-step preset under 0.5 s.
bench 150 fp16 --size 1024 --steps 30 --batches 1,2,4,8 --runs 3
bench 200 fast --size 1024 --steps 30 --batches 1,4 --runs 3
bench 200 int8-dynamic --size 1024 --steps 30 --batches 1 --runs 3
bench 90 low-vram --size 1024 --steps 30 --batches 1 --runs 2
bench 60 lightning --size 1024 --steps 4 --batches 1,4 --runs 3
python3 -m chitrakar plan --gpu-mem 8GiB --model sdxl --table "$OUT/measurements.jsonl" \
  | tee "$OUT/plan-8gib.txt"
