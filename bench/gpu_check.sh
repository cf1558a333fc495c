#!/usr/bin/env bash
# One-command GPU check, run from the repo root on a bare GPU machine (no network, no pip index):
#   bash bench/gpu_check.sh              # < 8 min on an H100 / H200, the install included
#   bash bench/gpu_check.sh --dry-run    # the same steps on a CPU, tiny sizes, Triton's interpreter (CI: ~2 min)
# Steps, each with its own time limit inside one overall budget (GPU_CHECK_BUDGET seconds; default 460, so the whole
# check stays under 8 minutes):
# install (editable, no build isolation; PYTHONPATH fallback), the GPU tests, a subset of the kernel tests on CUDA,
# the kernel benchmark against cuBLAS and the unfused two-matmul path (cold L2; it stops starting cases when its
# share of the budget is spent), the end-to-end generate benchmark (eager and static-compiled), the static sm_90
# report with its estimates beside the times just measured, and the summary table, printed last.
# Results go to bench/results/<gpu>/ ($BENCH_RESULTS_DIR where set). Each step's files are written as it goes
# (the benchmarks rewrite their JSON after every case) and, with $OUT set, the results folder is archived to
# $OUT/results.tar.gz after every step, so a run cut short still leaves numbers. GPU-only steps are skipped in the
# dry run with a line saying so.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
BUDGET=${GPU_CHECK_BUDGET:-460}
[ "$DRY" = 1 ] && BUDGET=${GPU_CHECK_BUDGET:-900}  # a shared 2-core CI machine: ~1 min of CPU, wall time varies
status=0
START=$SECONDS

if [ "$DRY" = 1 ]; then
    export BENCH_RESULTS_DIR=${BENCH_RESULTS_DIR:-$PWD/bench/results/dry-run}
    RESULTS=$BENCH_RESULTS_DIR
else
    RESULTS=""
fi

archive() {
    if [ -n "${OUT:-}" ] && [ -n "$RESULTS" ] && [ -d "$RESULTS" ]; then
        # The device tool returns at most a few files: ship the whole results folder as one archive.
        tar -czf "$OUT/results.tar.gz.tmp" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" \
            && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
    fi
}

step() {  # step <timeout-seconds> <name> <command...>: bounded by what is left of the budget
    local limit=$1 name=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 15 ]; then
        echo "==== [$name] SKIPPED: the ${BUDGET}s budget is spent ===="
        status=1
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "==== [$name] (timeout ${limit}s, $((SECONDS - START))s used) ===="
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    echo "==== [$name] rc=$rc in $((SECONDS - start))s ===="
    [ -n "$RESULTS" ] && mkdir -p "$RESULTS" && echo "$name rc=$rc $((SECONDS - start))s" >> "$RESULTS/gpu_check_steps.txt"
    [ "$rc" -eq 0 ] || status=1
    archive
    return 0
}

gpu_only() {  # gpu_only <name>: say why a step does not run in the dry run
    echo "==== [$1] SKIPPED in --dry-run: needs a GPU ===="
}

if [ "$DRY" = 1 ]; then
    gpu_only install  # a CPU checkout imports as it is
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    step 60 install "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    if ! "$PY" -c "import triton_lowrank.kernels.launch" 2>/dev/null; then
        # An old setuptools without `wheel` cannot build the editable install; a source checkout imports as it is.
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        echo "editable install unavailable; importing the checkout from PYTHONPATH=$PWD"
        "$PY" -c "import triton_lowrank.kernels.launch" || exit 1
    fi
    RESULTS=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from common import results_dir; print(results_dir())")
fi
mkdir -p "$RESULTS"
: > "$RESULTS/gpu_check_steps.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"

if [ "$DRY" = 1 ]; then
    gpu_only gpu-tests
    gpu_only kernel-tests  # CI runs them under the interpreter already
    step 300 bench-kernels "$PY" bench/kernel_bench.py --dry-run --no-plots
    step 300 bench-e2e "$PY" bench/e2e.py --dry-run
    step 240 sass-report bash -c "set -o pipefail; env -u TRITON_INTERPRET '$PY' bench/sass_report.py --dry-run \
        --json '$RESULTS/sass_report.json' | tee '$RESULTS/sass_report.txt'"
else
    step 60 gpu-tests "$PY" -m pytest -q -x -m gpu tests/
    step 60 kernel-tests "$PY" -m pytest -q tests/test_kernels.py tests/test_hybrid_kernels.py \
        -k "default or workspace or variants or fp32 or model or layer or one_launch"
    # the benchmark stops starting cases 25 s before its limit and keeps what it measured
    step 150 bench-kernels "$PY" bench/kernel_bench.py --no-plots --budget 125
    step 90 bench-e2e "$PY" bench/e2e.py --quick
    # the static sm_90 report last, so each estimate prints beside the time just measured
    step 50 sass-report bash -c "set -o pipefail; env -u TRITON_INTERPRET '$PY' bench/sass_report.py --proxy \
        --jobs 8 --json '$RESULTS/sass_report.json' | tee '$RESULTS/sass_report.txt'"
fi

"$PY" bench/summary.py "$RESULTS" | tee "$RESULTS/summary.txt"
archive
echo "gpu_check: $((SECONDS - START))s of the ${BUDGET}s budget; results in $RESULTS"
exit $status
