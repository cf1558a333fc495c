#!/usr/bin/env bash
# One-command GPU check, run from the repo root on the GPU machine (no network, no pip index):
#   bash bench/gpu_check.sh
# Installs the package editable without build isolation (the image has setuptools but no package
# index; kernels/ maps to triton_lowrank.kernels, so PYTHONPATH alone is not enough), runs the GPU tests and the kernel tests on CUDA, the quick kernel benchmark with
# autotune timing (and tuned_winners.json), the static sm_90 report with its estimates beside those measurements,
# bench/e2e.py --quick, archives results to $OUT, and prints the summary table
# last. Each step has its own timeout so one hang cannot eat the whole lease.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
step() {  # step <timeout-seconds> <name> <command...>
    local limit=$1 name=$2; shift 2
    echo "==== [$name] (timeout ${limit}s) ===="
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "==== [$name] rc=$rc in $((SECONDS - start))s ===="
    [ "$rc" -eq 0 ] || status=1
    return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step 90 install "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
if ! "$PY" -c "import triton_lowrank.kernels.launch" 2>/dev/null; then
    # An old setuptools without `wheel` cannot build the editable install; a source checkout imports as it is.
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "editable install unavailable; importing the checkout from PYTHONPATH=$PWD"
    "$PY" -c "import triton_lowrank.kernels.launch" || exit 1
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step 120 gpu-tests "$PY" -m pytest -q -m gpu tests/
step 240 kernel-tests "$PY" -m pytest -q tests/test_kernels.py tests/test_autotune.py
step 150 hybrid-kernel-tests "$PY" -m pytest -q tests/test_hybrid_kernels.py -k "default or workspace or model or fp32"
step 210 bench-kernels "$PY" bench/kernel_bench.py --autotune
RESULTS=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from common import results_dir; print(results_dir())")
# The static sm_90 report after the benchmark, so each estimate prints beside the time just measured.
step 240 sass-report bash -c "set -o pipefail; env -u TRITON_INTERPRET '$PY' bench/sass_report.py --json '$RESULTS/sass_report.json' \
    | tee '$RESULTS/sass_report.txt'"
step 180 bench-e2e "$PY" bench/e2e.py --quick

"$PY" bench/summary.py "$RESULTS" | tee "$RESULTS/summary.txt"
if [ -n "${OUT:-}" ]; then
    # The device tool returns at most 8 files: ship the whole results folder as one archive.
    tar -czf "$OUT/results.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && echo "results -> \$OUT/results.tar.gz"
fi
exit $status
