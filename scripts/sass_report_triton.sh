#!/usr/bin/env bash
# The static sm_90 report (bench/sass_report.py) compiled by another Triton release, in a venv of its own: the GPU
# image lent to this project carries Triton 3.6.0 (its KINDS.md), older than the one CI installs, and Triton's passes
# lay out the same kernel differently from release to release, so what the GPU will run is read here first.
#   scripts/sass_report_triton.sh [VERSION] [sass_report.py args...]     (default 3.6.0)
#   e.g. scripts/sass_report_triton.sh 3.6.0 --json bench/results/sass/triton-3.6.0.json > bench/results/sass/triton-3.6.0.txt
set -euo pipefail
# pip notes each configured local index folder a package is absent from; only that noise is dropped.
exec 2> >(grep -v "^WARNING: Location .* is ignored: it is neither a file nor a directory" >&2)
cd "$(dirname "$0")/.."
VERSION=${1:-3.6.0}
shift || true
venv=.venv-triton-$VERSION
if [ ! -f "$venv/.ready" ]; then  # (a venv whose install failed is made again, not reused)
    rm -rf "$venv"
    python3 -m venv "$venv"
    log="$venv/install.log"
    # torch from local disk (the CPU build: the report compiles ahead of time, no GPU), then that Triton beside it
    grep -v '^triton==' constraints.txt > "$venv/constraints.txt"  # CI's pins, but this Triton
    if ! { "$venv/bin/python" -m pip install -q torch==2.13.0 "triton==$VERSION" \
           && "$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" -e .; } > "$log" 2>&1; then
        echo "sass_report_triton.sh: could not install Triton $VERSION with this package (pip's output: $log)" >&2
        exit 1
    fi
    touch "$venv/.ready"
fi
"$venv/bin/python" -c "import triton; print('Triton', triton.__version__)" >&2
env -u TRITON_INTERPRET "$venv/bin/python" bench/sass_report.py "$@"
