#!/usr/bin/env bash
# Install the wheelhouse's packages without network access into a folder of their own:
#   bash benchmarks/gpu_install.sh <python> <target folder>
# then put the folder on PYTHONPATH. benchmarks/run_gpu.sh runs exactly this, and
# tests/test_gpu_runbook.py runs it into a fresh environment that lacks those packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$1 TARGET=$2
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$TARGET" benchmarks/wheelhouse/*.whl
