#!/usr/bin/env bash
# Creates .venv and installs triton_lowrank (editable) with its test tools.
# Where no NVIDIA driver exists, torch is pinned to the CPU build that lies on local disk;
# an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e ".[dev]"
echo "triton_lowrank installed in .venv"
