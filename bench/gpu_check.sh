#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent GPU machine (the device tool):
#   1. the CUDA tests (scores on CUDA, with the per-row steps on the GPU and on the host, match
#      the CPU);
#   2. bench/scoring_step.py: rows/s of the scoring step on CUDA (goal >= 20M rows/s for 30
#      features), fp32 and bf16;
#   3. bench/stream.py --device cuda: end to end through the embedded broker with the CUDA scorer.
#
# Here first:   bash bench/gpu_wheels.sh
# Then:         device run, carry [".whl"], command "bash bench/gpu_check.sh", timeout_s 560
# Figures land in $OUT (gpu.txt, pytest_gpu.txt, scoring_step.json, stream.txt); record them in
# docs/benchmarks.md. Each step has its own time limit, so one that hangs leaves the others' output.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== $1 ($(($(date +%s) - start)) s)"; }

step "gpu"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numpy, pandas; print(torch.__version__, numpy.__version__, pandas.__version__)" \
    | tee -a "$OUT/gpu.txt"

step "CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/core/test_model.py \
    tests/core/test_device_scoring.py 2>&1 | tee "$OUT/pytest_gpu.txt"

step "scoring step"
timeout 200 python3 bench/scoring_step.py --device cuda --rows 1000000 --repeat 3 --bf16 \
    2>&1 | tee "$OUT/scoring_step.json"

step "stream"
timeout 180 python3 bench/stream.py --device cuda --records 100000 --latency-seconds 10 \
    2>&1 | tee "$OUT/stream.txt"
step "done"
