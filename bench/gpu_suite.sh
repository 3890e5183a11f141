#!/usr/bin/env bash
# Every GPU check of fastmlr in one command, on a machine with an NVIDIA GPU:
#
#   bash bench/gpu_suite.sh            # from the repository root (or anywhere: it cd's there)
#
# 1. the CUDA tests (pytest -m cuda: each Triton kernel against its torch reference on the GPU) and the
#    TensorRT / Torch-TensorRT export tests (they skip, saying why, where those are not installed);
# 2. the global-to-local benchmark (bench/bench_g2l.py --device cuda);
# 3. the per-category attention benchmark (bench/bench_attention.py --device cuda);
# 4. MCAR Table IX at ResNet-101 448x448, batch 1 and 8 (bench/latency.py): eager, and TensorRT /
#    Torch-TensorRT where they are installed; then torch.compile (last: compiling every stage of
#    ResNet-101 MCAR is the slowest step).
#
# Results go to bench/results/<gpu>-*.{json,md} (<gpu>: the GPU's name, e.g. nvidia-h100-80gb-hbm3),
# everything printed also to bench/results/<gpu>-suite.log. The steps run in that order within a
# time budget (GPU_SUITE_BUDGET_S, default 450 s, so that the whole command ends within 8 minutes);
# each step also has a cap of its own. A step that would start past the budget is skipped, one that
# runs past its cap is stopped, and the summary at the end lists every step that did not run or
# did not finish, and why (no TensorRT, out of time, a failure).
#
# The installed torch / triton are used as they are: this script never installs or upgrades them.
# When fastmlr is not importable it is installed in editable mode without dependencies, and only the
# small packages it needs are added, pinned against the installed torch, torchvision and triton.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${GPU_SUITE_BUDGET_S:-450}
PYTHON=${PYTHON:-python}
SKIPPED=()
FAILED=()
START=$SECONDS

LOG=/dev/null
skip() { SKIPPED+=("$1: $2"); echo "== skipped $1: $2" | tee -a "$LOG"; }

# Runs "$@" as step $1 for at most $2 seconds (and never past the budget), its output also appended
# to $LOG; records a failure or a stop in the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 20)); then
        skip "$name" "out of time (budget ${BUDGET_S}s spent)"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit}s)" | tee -a "$LOG"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        FAILED+=("$name: stopped after ${limit}s (raise GPU_SUITE_BUDGET_S to let it finish)")
    elif ((rc != 0)); then
        FAILED+=("$name: exit status $rc")
    fi
}

have() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

# ---- environment -------------------------------------------------------------------------------
if ! have torch; then
    echo "gpu_suite.sh: torch is not installed; install a CUDA build of torch first" >&2
    exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: torch sees no CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi
if ! have fastmlr || ! have onnxruntime || ! have pytest; then
    echo "== installing fastmlr (editable, no dependencies) and its small dependencies; torch stays as it is"
    constraints=$(mktemp)
    "$PYTHON" -m pip freeze | grep -iE '^(torch|torchvision|triton)==' >"$constraints"
    "$PYTHON" -m pip install --quiet --no-deps -e . &&
        "$PYTHON" -m pip install --quiet -c "$constraints" numpy pillow onnx onnxscript onnxruntime-gpu pytest hypothesis ||
        { echo "gpu_suite.sh: installing fastmlr's dependencies failed" >&2; exit 2; }
    rm -f "$constraints"
fi

GPU=$("$PYTHON" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
OUT=bench/results/$GPU
LOG=${OUT}-suite.log
CACHE=${TMPDIR:-/tmp}/fastmlr-gpu-suite-$GPU  # exported ONNX files and TensorRT engines, reused by a rerun
: >"$LOG"
echo "GPU: $GPU; results: ${OUT}-*" | tee -a "$LOG"
export TRITON_INTERPRET=0  # compiled Triton kernels (the tests' default is the CPU interpreter)

# ---- 1. tests ----------------------------------------------------------------------------------
step "CUDA tests" 90 "$PYTHON" -m pytest tests -m cuda -q -rs
step "TensorRT export tests" 90 "$PYTHON" -m pytest tests/test_export_trt.py -q -rs

# ---- 2, 3. kernel benchmarks -------------------------------------------------------------------
step "global-to-local benchmark" 60 "$PYTHON" bench/bench_g2l.py --device cuda --repeats 5 --overwrite --out "${OUT}-g2l.json"
step "attention benchmark" 90 "$PYTHON" bench/bench_attention.py --device cuda --overwrite --out "${OUT}-attention.json"

# ---- 4. Table IX, ResNet-101 448 -----------------------------------------------------------------
backends=eager
have tensorrt && backends+=,trt || skip "Table IX with trt" "TensorRT is not installed (pip install tensorrt)"
have torch_tensorrt && backends+=,torch-trt ||
    skip "Table IX with torch-trt" "Torch-TensorRT is not installed (pip install torch-tensorrt)"
table_ix() {  # batch, backends, cap in seconds, results name
    step "Table IX resnet101 448 batch $1 ($2)" "$3" \
        "$PYTHON" bench/latency.py --model mcar --backbone resnet101 --size 448 --batch "$1" --device cuda \
        --backend "$2" --warmup 3 --iters 20 --cache-dir "$CACHE" --overwrite --out "${OUT}-$4.json" --out "${OUT}-$4.md"
}
table_ix 1 "$backends" 90 table-ix-r101-448-b1
table_ix 8 "$backends" 90 table-ix-r101-448-b8
table_ix 1 compile 150 table-ix-r101-448-b1-compile
table_ix 8 compile 150 table-ix-r101-448-b8-compile

# ---- summary -----------------------------------------------------------------------------------
{
    echo
    echo "gpu_suite.sh: finished in $((SECONDS - START))s on $GPU; results in bench/results/${GPU}-*"
    for line in ${SKIPPED[@]+"${SKIPPED[@]}"}; do echo "  skipped: $line"; done
    for line in ${FAILED[@]+"${FAILED[@]}"}; do echo "  FAILED:  $line"; done
} | tee -a "$LOG"
((${#FAILED[@]} == 0))
