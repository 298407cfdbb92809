#!/usr/bin/env bash
# The one script to run when an H100/H200 is at hand, in one go, inside 420 s:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # else $OUT, else ./gpu_out
#
# Steps, by value (docs/benchmarks.md gives the time plan): environment; build the CUDA
# extension once; the GPU tests; the headline problem (bf16 M=8192 K=N=4096 r=16); the
# kernels' SASS and tuned configs; merge bandwidth against a device copy; the card's
# ceilings; the rest of the linear matrix; the layer; merge precision; a distributed run;
# the report. Each benchmark writes its rows as it goes, so a cut step keeps what ran.
#
# Output folder (8 files at most): gpu_check.log (written directly, summary included),
# environment.txt (versions, driver, toolkit), kernels.txt (tuned configs, SASS counts),
# gpu_tests.xml (JUnit), the benchmark CSV files and the plot. The build and Triton's
# cache go to a fresh folder per run, outside it.
#
# Uses `python3` (override with PYTHON=...) on this checkout (PYTHONPATH=.), installs
# nothing. Every step runs under `timeout` (its cap, never past the run's budget,
# LORASC_GPU_CHECK_BUDGET_S, default 420 s; SIGINT first, so pytest still writes its XML),
# and a failing step does not stop the later ones. The summary lists each step's status
# and duration, and the providers that failed, by name.
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
: >"$LOG"
# The log file is written directly; the console gets a copy that follows it.
tail -n +1 -f "$LOG" &
TAIL_PID=$!
exec >>"$LOG" 2>&1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lorasc_gpu_check.XXXXXX")"
trap 'sleep 1; kill $TAIL_PID; rm -rf "$WORK"' EXIT
export LOG OUT_DIR WORK PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTHON="${PYTHON:-python3}"
# One build per run, in its own folder; later steps load its file and never build.
export LORASC_BUILD_DIR="$WORK/build" TRITON_CACHE_DIR="$WORK/triton_cache"
export LORASC_CUDA_EXTENSION="$WORK/build_step_did_not_finish/lorasc_kernels_cuda.so"
export TRITON_PRINT_AUTOTUNING=1
BUDGET_S="${LORASC_GPU_CHECK_BUDGET_S:-420}"
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
STEPS=(
    "env|30|any|print_environment 2>&1 | tee \$OUT_DIR/environment.txt"
    "build_cuda|150|gpu|build_cuda_extension"
    "gpu_tests|130|gpu|\$PYTHON -m pytest -q -m gpu -p no:cacheprovider --junitxml=\$OUT_DIR/gpu_tests.xml tests"
    "headline|120|any|\$PYTHON -m benchmarks --only linear --problems headline --out \$OUT_DIR \$BENCH_ARGS \$(skip_unbuilt_cuda)"
    "kernels|20|gpu|describe_kernels >\$OUT_DIR/kernels.txt; rc=\$?; cat \$OUT_DIR/kernels.txt; exit \$rc"
    "bench_merge|30|any|\$PYTHON -m benchmarks --only merge --out \$OUT_DIR \$BENCH_ARGS \$(skip_unbuilt_cuda)"
    "bench_fp8|60|any|\$PYTHON -m benchmarks.bench_fp8 --out-dir \$OUT_DIR \$BENCH_ARGS"
    "ceilings|15|any|\$PYTHON -m benchmarks --ceilings \$BENCH_ARGS"
    "bench_linear|90|any|\$PYTHON -m benchmarks --only linear --problems rest --out \$OUT_DIR \$BENCH_ARGS \$(skip_unbuilt_cuda)"
    "bench_layer|40|any|\$PYTHON -m benchmarks --only layer --out \$OUT_DIR \$BENCH_ARGS \$(skip_unbuilt_cuda)"
    "bench_precision|45|any|\$PYTHON -m benchmarks --only precision --out \$OUT_DIR \$BENCH_ARGS"
    "distributed|60|gpu|\$PYTHON -m torch.distributed.run --standalone --nproc-per-node gpu examples/torchrun_ddp.py --steps 20 --steps-per-cascade 5"
    "report|30|any|\$PYTHON -m benchmarks --summary \$OUT_DIR >\$WORK/report.txt; rc=\$?; cat \$WORK/report.txt; exit \$rc"
)

print_environment() {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
        2>/dev/null || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import importlib.metadata, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
for name in ("triton", "peft", "transformers", "numpy"):
    try:
        print(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name}: not installed")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}")
EOF
    local cuda_home
    if cuda_home="$("$PYTHON" -m lorasc_kernels._build --cuda-home)"; then
        "$cuda_home/bin/nvcc" --version | tail -n 2
    fi
}

# Builds into $LORASC_BUILD_DIR and prints the extension's file, which later steps load.
build_cuda_extension() {
    "$PYTHON" -m lorasc_kernels._build --build >"$WORK/extension_path"
}

# The tuned configs (TRITON_PRINT_AUTOTUNING lines of the log so far), what the GEMM
# dispatch chose ("gemm dispatch:" lines), and the count of tensor-core, FMA and TMA-load
# instructions in the SASS of every fused linear kernel compiled so far: Triton's two
# variants (its cache) and the CUDA extension's. HGMMA: Hopper's warpgroup MMA; HMMA: the
# warp-level MMA of earlier GPUs; FFMA: fp32 fused multiply-add on CUDA cores; UTMALDG: a
# TMA tile load (the persistent variant).
describe_kernels() {
    echo "== tuned configs (Triton autotuner)"
    awk '/^Triton autotuning for function/ { n = 4; line = "" }
         n > 0 { line = line $0 " "; if (--n == 0) { print line; found = 1 } }
         END { if (!found) print "none in the log" }' "$LOG"
    echo "== GEMM variants chosen by the dispatch (ours-triton)"
    local chosen
    chosen="$(grep -a '^gemm dispatch:' "$LOG" | sort -u)"
    echo "${chosen:-none in the log}"
    local cuobjdump candidate
    for candidate in "$(command -v cuobjdump)" \
        "$("$PYTHON" -m lorasc_kernels._build --cuda-home 2>/dev/null)/bin/cuobjdump" \
        "$("$PYTHON" -c 'import pathlib, triton
print(pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")')"; do
        [ -x "$candidate" ] && cuobjdump=$candidate && break
    done
    [ -n "${cuobjdump:-}" ] || { echo "cuobjdump: not found"; return 1; }
    echo "== SASS instruction counts ($cuobjdump)"
    printf '%-6s %-6s %-6s %-7s %-24s %s\n' HGMMA HMMA FFMA UTMALDG "warps stages shared" file
    local file sass launch
    for file in $(find "$TRITON_CACHE_DIR" \( -name '*fused_lowrank*.cubin' \
                    -o -name '*persistent_lowrank*.cubin' \) 2>/dev/null) \
                $(cat "$WORK/extension_path" 2>/dev/null); do
        sass="$("$cuobjdump" -sass "$file" 2>&1)" || { echo "cuobjdump failed on $file"; return 1; }
        launch="$("$PYTHON" -c 'import json, sys
m = json.load(open(sys.argv[1]))
print(m["num_warps"], m["num_stages"], m["shared"])' "${file%.cubin}.json" 2>/dev/null \
            || echo "(CUDA extension)")"
        printf '%-6s %-6s %-6s %-7s %-24s %s\n' "$(grep -c HGMMA <<<"$sass")" \
            "$(grep -c HMMA <<<"$sass")" "$(grep -c FFMA <<<"$sass")" \
            "$(grep -c UTMALDG <<<"$sass")" "$launch" "$file"
    done
}

# Benchmarks leave our CUDA backend out, saying why, unless the build step made it.
skip_unbuilt_cuda() {
    if [ ! -f "$LORASC_CUDA_EXTENSION" ]; then
        echo "skip ours-cuda: the build step made no extension ($LORASC_CUDA_EXTENSION)" >&2
        echo "--skip-backends cuda"
    fi
}
export -f print_environment build_cuda_extension describe_kernels skip_unbuilt_cuda

selected() {
    [ -z "$ONLY_STEPS" ] || [[ ",$ONLY_STEPS," == *",$1,"* ]]
}

SUMMARY=()
FAILED=0
add_summary() {
    SUMMARY+=("$(printf '%-16s %s' "$1" "$2")")
}

run_step() {
    local name=$1 cap=$2 needs=$3 command=$4
    local left=$((BUDGET_S - (SECONDS - START_S) - RESERVE_S))
    [ "$name" = report ] && left=$((left + RESERVE_S))
    if ! selected "$name"; then
        add_summary "$name" "skipped (not selected)"
        return
    fi
    echo
    echo "=== $name ($(date -u +%H:%M:%S), cap ${cap} s, ${left} s of budget left) ==="
    if [ "$needs" = gpu ] && [ "$MODE" != gpu ]; then
        echo "skipped: needs a GPU"
        add_summary "$name" "skipped (needs a GPU)"
        return
    fi
    if [ "$left" -lt 5 ]; then
        echo "skipped: the run's budget of ${BUDGET_S} s is spent"
        add_summary "$name" "skipped (budget spent)"
        FAILED=1
        return
    fi
    [ "$left" -lt "$cap" ] && cap=$left
    local began=$SECONDS status rc failed_providers
    timeout -s INT -k 10 "$cap" bash -c "$command" 2>&1 | tee "$WORK/step.out"
    rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${cap} s"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    failed_providers="$(grep -a -o '^FAILED provider [^ ]*' "$WORK/step.out" \
        | awk '{print $3}' | sort -u | paste -sd, -)"
    if [ -n "$failed_providers" ]; then
        [ $rc = 0 ] && status="FAILED" && FAILED=1
        status="$status, failed providers: $failed_providers"
    fi
    if [ "$name" = build_cuda ] && [ $rc = 0 ]; then
        LORASC_CUDA_EXTENSION="$(tail -n 1 "$WORK/extension_path")"
    fi
    add_summary "$name" "$(printf '%-40s %4d s' "$status" $((SECONDS - began)))"
}

print_summary() {
    echo
    echo "=== summary (mode $MODE, $((SECONDS - START_S)) s in all) ==="
    printf '%s\n' "${SUMMARY[@]}"
    echo
    cat "$WORK/report.txt" 2>/dev/null
}
# Killed from outside: the summary of what ran still reaches the log.
trap 'print_summary; echo "gpu_check: interrupted"; exit 130' INT TERM

echo "gpu_check: mode $MODE, output in $OUT_DIR, work folder $WORK, budget ${BUDGET_S} s"
for step in "${STEPS[@]}"; do
    IFS='|' read -r name cap needs command <<<"$step"
    run_step "$name" "$cap" "$needs" "$command"
done
print_summary
exit $FAILED
