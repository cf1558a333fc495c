"""Loading models for the tools (CLI, demo, benches): dense or compressed folders, on the right device and dtype."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from triton_lowrank.checkpoint.format import CHECKSUM_KEY, CheckpointError, checkpoint_files, file_metadata
from triton_lowrank.checkpoint.save_load import is_compressed_folder, load_compressed, tokenizer_problem
from triton_lowrank.core.safe_io import read_json


class MissingTokenizer(ValueError):
    """The folder has no usable tokenizer (no files, or files that do not load)."""


def checkpoint_dtype(source: str | Path) -> torch.dtype | None:
    """The float dtype a model's checkpoint is stored in, as its config says (None if unknown)."""
    try:
        if Path(source).is_dir():
            read_json(Path(source) / "config.json", "config.json")  # bounded: a FIFO or /dev/zero is refused
        dtype = AutoConfig.from_pretrained(source).dtype
    except (OSError, ValueError):
        return None
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def max_context(config) -> int | None:
    """The most positions the model takes, as its config says (None if it does not say)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def runtime(source: str | Path | None = None) -> tuple[torch.device, torch.dtype]:
    """On CUDA the checkpoint's half dtype (bf16 models overflow in fp16), else fp16, for the Triton
    kernels; fp32 on the CPU, where half-precision matmuls are ~10x slower."""
    if torch.cuda.is_available():
        stored = None if source is None else checkpoint_dtype(source)
        return torch.device("cuda"), torch.bfloat16 if stored == torch.bfloat16 else torch.float16
    return torch.device("cpu"), torch.float32


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """A dense or compressed causal LM from a local folder (or a hub id that from_pretrained resolves).

    Weights carrying our checksums go through load_compressed even if config.json no longer names our
    quant_method: it says what is wrong, where from_pretrained would load random dense weights."""
    if is_compressed_folder(path) or _carries_our_checksums(path):
        return load_compressed(path, device_map=str(device), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _carries_our_checksums(path: str | Path) -> bool:
    if not Path(path).is_dir():
        return False
    try:
        return CHECKSUM_KEY in file_metadata(checkpoint_files(path)[0])
    except (CheckpointError, OSError):
        return False  # from_pretrained gives its own error for a folder it cannot read


def load_tokenizer(path: str | Path, model: nn.Module | None = None):
    """The folder's tokenizer, checked: at least two entries and (given `model`) no more tokens than its
    embedding has rows. MissingTokenizer when the folder has none that loads; ValueError naming the folder
    when it does not belong to the model. (transformers builds an empty tokenizer instead of failing.)"""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:  # tokenizers raises plain Exceptions for damaged files
        reason = " ".join(str(error).split())[:200]
        raise MissingTokenizer(f"{path}: no usable tokenizer ({type(error).__name__}: {reason})") from None
    problem = tokenizer_problem(tokenizer, model)
    if problem is not None:
        raise (MissingTokenizer if len(tokenizer) < 2 else ValueError)(f"{path}: {problem}")
    return tokenizer
