"""A small GPT-2 checkpoint trained by this project, shipped as package data.

``embedded_model_path()`` returns the folder that ``from_pretrained`` loads offline::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from triton_lowrank.embedded import embedded_model_path

    folder = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(folder)   # GPT2LMHeadModel, fp16 weights
    tokenizer = AutoTokenizer.from_pretrained(folder)

The model (6 layers, n_embd 256, byte-level BPE vocabulary of 4096) was trained on
public-domain Project Gutenberg Shakespeare by ``scripts/train_embedded_model.py``; see
``bench/results/embedded_training.md`` for the command and the numbers.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EMBEDDED_MODEL_NAME", "embedded_model_path"]

EMBEDDED_MODEL_NAME = "gpt2-shakespeare"

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def embedded_model_path() -> Path:
    """Folder holding the shipped checkpoint (config, fp16 safetensors, tokenizer).

    Raises:
        FileNotFoundError: if the folder or one of its files is missing (for example an
            install without package data, or a checkout where the checkpoint was never
            trained: run ``python scripts/train_embedded_model.py``).
    """
    folder = Path(__file__).resolve().parent / EMBEDDED_MODEL_NAME
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"embedded model files missing from {folder}: {', '.join(missing)}. "
            "Reinstall triton_lowrank with its package data, or regenerate the checkpoint "
            "with `python scripts/train_embedded_model.py`."
        )
    return folder
