#!/usr/bin/env bash
# The one script to run when an H100/H200 is at hand, in one go, inside about 8 minutes:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # else $OUT, else ./gpu_out
#
# Steps: environment; the card's copy bandwidth and bf16 matmul rate; build the CUDA
# extension; the GPU-marked tests; the reduced benchmark matrix (linear, layer, merge,
# precision), each family its own step; a report that re-plots and prints the short table.
# Output folder: gpu_check.log (everything), the benchmark CSV files and plot.
#
# Uses `python3` (override with PYTHON=...) on this checkout (PYTHONPATH=.), installs
# nothing. Every step runs under `timeout` (its own cap, and never past the whole run's
# budget, LORASC_GPU_CHECK_BUDGET_S, default 480 s), and a failing step does not stop the
# later ones. The summary lists each step's status and duration; the short table comes last.
#
# Environment:
#   LORASC_GPU_CHECK_ALLOW_CPU=1   without a GPU, run the same steps at tiny sizes on the CPU
#                                  (Triton interpreted); GPU-only steps are skipped.
#   LORASC_GPU_CHECK_STEPS=a,b     run only the named steps (names as in STEPS below).
#   LORASC_GPU_CHECK_BUDGET_S=N    the whole run's time budget in seconds.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-./gpu_out}}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1
REPORT="$(mktemp)"
CUDA_BUILT="$(mktemp -u)"
trap 'rm -f "$REPORT" "$CUDA_BUILT"' EXIT
export OUT_DIR PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTHON="${PYTHON:-python3}"
BUDGET_S="${LORASC_GPU_CHECK_BUDGET_S:-480}"
ONLY_STEPS="${LORASC_GPU_CHECK_STEPS:-}"
START_S=$SECONDS
# Time kept back for the summary and the report after a step that runs out of budget.
RESERVE_S=15

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
then
    MODE=gpu
    export BENCH_ARGS="--device cuda"
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
elif [ "${LORASC_GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    MODE=cpu
    export BENCH_ARGS="--device cpu --quick" TRITON_INTERPRET=1
else
    echo "no CUDA GPU visible to $PYTHON; set LORASC_GPU_CHECK_ALLOW_CPU=1 for a dry run" >&2
    exit 2
fi

# Steps, run in this order: "name|cap in seconds|gpu (GPU only) or any|command".
# More steps (a distributed run, say) go here, before the report.
STEPS=(
    "env|20|any|print_environment"
    "ceilings|30|any|\$PYTHON -m benchmarks --ceilings \$BENCH_ARGS"
    "build_cuda|150|gpu|build_cuda_extension"
    "gpu_tests|120|gpu|\$PYTHON -m pytest -q -m gpu -p no:cacheprovider tests"
    "bench_linear|200|any|\$PYTHON -m benchmarks --only linear --out \$OUT_DIR \$BENCH_ARGS \$(skip_unbuilt_cuda)"
    "bench_layer|60|any|\$PYTHON -m benchmarks --only layer --out \$OUT_DIR \$BENCH_ARGS \$(skip_unbuilt_cuda)"
    "bench_merge|45|any|\$PYTHON -m benchmarks --only merge --out \$OUT_DIR \$BENCH_ARGS"
    "bench_precision|60|any|\$PYTHON -m benchmarks --only precision --out \$OUT_DIR \$BENCH_ARGS"
    "distributed|150|gpu|for mode in '' --fsdp; do \$PYTHON -m torch.distributed.run --standalone --nproc-per-node gpu examples/torchrun_ddp.py --steps 20 --steps-per-cascade 5 \$mode || exit 1; done"
    "report|20|any|\$PYTHON -m benchmarks --summary \$OUT_DIR >\$REPORT_FILE; rc=\$?; cat \$REPORT_FILE; exit \$rc"
)
export REPORT_FILE="$REPORT" CUDA_BUILT

print_environment() {
    date -u
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
        2>/dev/null || true
    "$PYTHON" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as error:
    print(f"triton: not importable ({error})")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}")
EOF
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2
    elif [ -x /usr/local/cuda/bin/nvcc ]; then /usr/local/cuda/bin/nvcc --version | tail -n 2
    else echo "nvcc: not found"; fi
}

build_cuda_extension() {
    "$PYTHON" - <<'EOF' && touch "$CUDA_BUILT"
import time

import torch

from lorasc_kernels.backends import cuda

start = time.perf_counter()
# ops() builds the extension (or loads the cached build) and registers its ops.
build = getattr(cuda, "ops", None) or cuda.load_extension
build(torch.device("cuda"))
print(f"CUDA extension ready in {time.perf_counter() - start:.0f} s")
EOF
}

# Benchmarks leave our CUDA backend out unless the build step made it (no second build).
skip_unbuilt_cuda() {
    [ -f "$CUDA_BUILT" ] || echo "--skip-backends cuda"
}
export -f print_environment build_cuda_extension skip_unbuilt_cuda

selected() {
    [ -z "$ONLY_STEPS" ] || [[ ",$ONLY_STEPS," == *",$1,"* ]]
}

SUMMARY=()
FAILED=0
run_step() {
    local name=$1 cap=$2 needs=$3 command=$4
    local left=$((BUDGET_S - (SECONDS - START_S) - RESERVE_S))
    [ "$name" = report ] && left=$((left + RESERVE_S))
    if ! selected "$name"; then
        SUMMARY+=("$(printf '%-16s %-30s' "$name" "skipped (not selected)")")
        return
    fi
    echo
    echo "=== $name ($(date -u +%H:%M:%S), cap ${cap} s, ${left} s of budget left) ==="
    if [ "$needs" = gpu ] && [ "$MODE" != gpu ]; then
        echo "skipped: needs a GPU"
        SUMMARY+=("$(printf '%-16s %-30s' "$name" "skipped (needs a GPU)")")
        return
    fi
    if [ "$left" -lt 5 ]; then
        echo "skipped: the run's budget of ${BUDGET_S} s is spent"
        SUMMARY+=("$(printf '%-16s %-30s' "$name" "skipped (budget spent)")")
        FAILED=1
        return
    fi
    [ "$left" -lt "$cap" ] && cap=$left
    local began=$SECONDS status rc
    timeout -k 10 "$cap" bash -c "$command"
    rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${cap} s"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    SUMMARY+=("$(printf '%-16s %-30s %4d s' "$name" "$status" $((SECONDS - began)))")
}

echo "gpu_check: mode $MODE, output in $OUT_DIR, budget ${BUDGET_S} s"
for step in "${STEPS[@]}"; do
    IFS='|' read -r name cap needs command <<<"$step"
    run_step "$name" "$cap" "$needs" "$command"
done
echo
echo "=== summary (mode $MODE, $((SECONDS - START_S)) s in all) ==="
printf '%s\n' "${SUMMARY[@]}"
echo
cat "$REPORT"
exit $FAILED
