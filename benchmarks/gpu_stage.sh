#!/usr/bin/env bash
# Stage what a lent GPU machine needs beside the checkout (both git-ignored, carried with the call):
#   benchmarks/wheelhouse/               the wheels it lacks (bash benchmarks/gpu_wheelhouse.sh)
#   benchmarks/data/cifar10_subset.npz   a copy of ../shared/data/cifar10_subset.npz (../shared does not travel)
# and check that together they fit the 64 MiB a call may carry.
#   bash benchmarks/gpu_stage.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${SUBSET_SOURCE:-../shared/data/cifar10_subset.npz}
bash benchmarks/gpu_wheelhouse.sh >/dev/null
if [ ! -f "$SOURCE" ]; then
    echo "error: $SOURCE is missing: put the subset there or give its path in SUBSET_SOURCE." >&2
    exit 2
fi
mkdir -p benchmarks/data
cp "$SOURCE" benchmarks/data/cifar10_subset.npz
total=$(du -cb benchmarks/wheelhouse benchmarks/data | tail -1 | cut -f1)
if [ "$total" -ge $((64 * 1024 * 1024)) ]; then
    echo "error: the carried folders hold $total bytes, more than the 64 MiB a call may carry: remove stale wheels from benchmarks/wheelhouse." >&2
    exit 2
fi
echo "staged $total bytes; carry: [\"benchmarks/wheelhouse\", \"benchmarks/data\"]"
