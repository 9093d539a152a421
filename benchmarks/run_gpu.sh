#!/usr/bin/env bash
# Every GPU measurement of the README's Performance table and the gpu-marked tests, in ONE call of
# under 10 minutes on a lent GPU machine without network access (benchmarks/README.md, "On a lent GPU"):
#   OUT=<folder> bash benchmarks/run_gpu.sh
# It needs two git-ignored folders carried beside the checkout (`bash benchmarks/gpu_stage.sh` makes both):
#   benchmarks/wheelhouse/               wheels of what the machine lacks (jsonargparse and its deps)
#   benchmarks/data/cifar10_subset.npz   the real subset (../shared does not travel)
# Every step is bounded (`timeout`) and the steps share one budget (GPU_BUDGET_S, default 520 s), so
# the call ends in time; a step that fails or runs out of time is recorded and the next one runs.
# Into $OUT (and benchmarks/results/): every *-cuda.json written, run_gpu.log, run_gpu-steps.json
# (8 files at most, the number a call brings back). Exit status 1 when a step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUBSET=benchmarks/data/cifar10_subset.npz
SITE=${GPU_SITE:-/tmp/project-site}
BUDGET=${GPU_BUDGET_S:-520}

refuse() { echo "error: $1" >&2; exit 2; }
[ -n "${OUT:-}" ] || refuse "OUT is not set: run OUT=<folder for the results> bash benchmarks/run_gpu.sh."
compgen -G "benchmarks/wheelhouse/*.whl" >/dev/null \
    || refuse "benchmarks/wheelhouse/ holds no wheels: build it with bash benchmarks/gpu_stage.sh and carry benchmarks/wheelhouse."
[ -f "$SUBSET" ] || refuse "$SUBSET is missing: stage it with bash benchmarks/gpu_stage.sh and carry benchmarks/data."
command -v "$PY" >/dev/null || refuse "$PY is not on PATH: give the interpreter in PYTHON."
[ "${GPU_RUNBOOK_DRY_RUN:-0}" = 1 ] || "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    || refuse "torch sees no CUDA GPU here: run this on the GPU machine."

mkdir -p "$OUT" benchmarks/results
LOG="$OUT/run_gpu.log"
STEPS=$(mktemp)
STAMP=$(mktemp)
: >"$LOG"
: >"$STEPS"
START=$SECONDS

collect() {  # the result files written since the start, and the steps so far, into $OUT
    find benchmarks/results -name '*-cuda.json' -newer "$STAMP" -exec cp {} "$OUT"/ \;
    "$PY" - "$STEPS" "$OUT/run_gpu-steps.json" "$((SECONDS - START))" "$BUDGET" <<'PY'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [{"step": n, "status": s, "exit_code": int(rc) if rc else None, "seconds": int(t), "command": c} for n, s, rc, t, c in rows]
json.dump({"seconds": int(sys.argv[3]), "budget_seconds": int(sys.argv[4]), "steps": steps}, open(sys.argv[2], "w"), indent=2)
PY
}

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (less when the budget is nearly spent).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 20 ]; then
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" skipped "" 0 "$*" >>"$STEPS"
        echo "== $name: skipped, the budget of $BUDGET s is spent" | tee -a "$LOG"
        return
    fi
    echo "== $name (at most $limit s): $*" | tee -a "$LOG"
    local begin=$SECONDS rc status
    # SIGINT first: pytest and Python then clean up (the tests kill the CLI processes they started).
    timeout -s INT -k 15 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status="timed out" ;; *) status=failed ;; esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" $((SECONDS - begin)) "$*" >>"$STEPS"
    echo "== $name: $status (exit $rc) after $((SECONDS - begin)) s" | tee -a "$LOG"
    [ "$status" = ok ] || tail -n 25 "$LOG"
    collect
}

echo "== install benchmarks/wheelhouse into $SITE (no network)" | tee -a "$LOG"
bash benchmarks/gpu_install.sh "$PY" "$SITE" >>"$LOG" 2>&1 || { tail -n 20 "$LOG"; refuse "installing the wheelhouse failed (see $LOG)."; }
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled MPLBACKEND=Agg
"$PY" -c "import jsonargparse, project.run.cli" >>"$LOG" 2>&1 || { tail -n 20 "$LOG"; refuse "the project does not import after the install (see $LOG)."; }

if [ "${GPU_RUNBOOK_DRY_RUN:-0}" = 1 ]; then  # tests/test_gpu_runbook.py: everything up to here, then one tiny step
    step "dry run" 60 "$PY" -m project fit --help
else
    step environment 20 bash -c "(nvidia-smi || true); $PY -c 'import torch, lightning; print(torch.__version__, torch.version.cuda, lightning.__version__, torch.cuda.get_device_name())'"
    # Lightning vs the plain loop, ResNet-18, bf16, channels_last, GPU-resident data; FLOP/s vs the bf16 matmul ceiling.
    step throughput 80 "$PY" benchmarks/throughput.py --device cuda --model resnet18 --batch-size 512 --precision bf16-mixed \
        --channels-last --warmup 20 --steps 100 --repeats 3
    # What has never run on a GPU: NCCL DDP and FSDP (full, sharded) on one device, 16-mixed with GradScaler,
    # bf16, inductor, the device pipeline and the random-state capture on CUDA.
    step "pytest -m gpu" 180 "$PY" -m pytest -q -rA -p no:cacheprovider -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py)
    # Data pipeline alone: GPU-resident vs DataLoader.
    step data_pipeline 50 "$PY" benchmarks/data_pipeline.py --device cuda --images 50000 --workers 0 4 --repeats 2
    # Seconds per full-size epoch (50,000 random images): ResNet-18 with the fast GPU preset, and the fast recipe.
    step "epoch resnet18" 45 "$PY" benchmarks/recipe.py epoch -c experiments/resnet18.yaml -c experiments/presets/gpu_speed.yaml \
        --images 50000 --epochs 3 --name epoch-resnet18-gpu_speed
    step "epoch resnet_fast" 40 "$PY" benchmarks/recipe.py epoch -c experiments/resnet_fast.yaml --images 50000 --epochs 3
    # Learning on real images: the fast recipe on the 5,170-image subset, tested on its 508 test images.
    step subset 60 "$PY" benchmarks/recipe.py subset -c experiments/resnet_fast.yaml --epochs 40 --batch-size 128 --lr 0.2 \
        --npz "$SUBSET" --name subset-resnet_fast-40ep
    # torch.compile of the net in both loops, last: inductor compiles each of the 4 runs (the later ones from its cache).
    step "throughput compile" 120 "$PY" benchmarks/throughput.py --device cuda --model resnet18 --batch-size 512 \
        --precision bf16-mixed --channels-last --compile --warmup 30 --steps 100 --repeats 2 --callbacks off
fi

collect
echo "== done in $((SECONDS - START)) s; in $OUT:" && ls "$OUT"
rm -f "$STEPS" "$STAMP"
! grep -q '"status": "\(failed\|timed out\)"' "$OUT/run_gpu-steps.json"   # exit 1 when a step did not succeed
