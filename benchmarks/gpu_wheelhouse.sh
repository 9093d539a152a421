#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu_wheels.txt into benchmarks/wheelhouse/ (git-ignored), for a
# GPU machine without network access: benchmarks/run_gpu.sh installs them from there with --no-index.
# Quick (about 1 MB); the folder ends up holding exactly the pinned wheels. Needs PyPI or a mirror.
#   bash benchmarks/gpu_wheelhouse.sh          # PYTHON=<interpreter with pip> to choose the pip
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=benchmarks/wheelhouse
FRESH=$(mktemp -d)
trap 'rm -rf "$FRESH"' EXIT
# The lent machine runs CPython 3.12 on x86-64; these wheels are pure python, so the same files
# also install on the interpreter that runs the tests (tests/test_gpu_runbook.py).
grep -v '^\s*\(#\|$\)' benchmarks/gpu_wheels.txt | xargs "$PY" -m pip download -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$FRESH"
rm -rf "$DEST" && mkdir -p "$DEST" && mv "$FRESH"/*.whl "$DEST"/   # no stale versions left beside the pinned ones
ls "$DEST"/*.whl
