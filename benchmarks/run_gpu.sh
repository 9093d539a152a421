#!/usr/bin/env bash
# Every GPU measurement of the README's Performance table, in one command (about 10 minutes on one GPU):
#   bash benchmarks/run_gpu.sh            # results in benchmarks/results/*-cuda.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# Lightning vs the plain loop, ResNet-18, bf16, channels_last, GPU-resident data; FLOP/s vs the bf16 matmul ceiling.
$PY benchmarks/throughput.py --device cuda --model resnet18 --batch-size 512 --precision bf16-mixed --channels-last \
    --warmup 20 --steps 100 --repeats 5
# The same with torch.compile of the plain net in both loops.
$PY benchmarks/throughput.py --device cuda --model resnet18 --batch-size 512 --precision bf16-mixed --channels-last --compile \
    --warmup 30 --steps 100 --repeats 3 --callbacks off
# Data pipeline alone: GPU-resident vs DataLoader.
$PY benchmarks/data_pipeline.py --device cuda --images 50000 --workers 0 4 8
# Seconds per full-size epoch (50,000 random images): ResNet-18 with the fast GPU preset, and the fast recipe.
$PY benchmarks/recipe.py epoch -c experiments/resnet18.yaml -c experiments/presets/gpu_speed.yaml --images 50000 --epochs 3
$PY benchmarks/recipe.py epoch -c experiments/resnet_fast.yaml --images 50000 --epochs 3
# Learning on real images: the fast recipe on the 5,170-image subset, tested on its 508 test images.
$PY benchmarks/recipe.py subset -c experiments/resnet_fast.yaml --epochs 40 --batch-size 128 --lr 0.2
