"""Loading models for the tools (CLI, demo, benches): dense or compressed folders, on the right device and dtype."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .checkpoint import load_compressed
from .checkpoint_format import QUANT_METHOD


def checkpoint_dtype(source: str | Path) -> torch.dtype | None:
    """The float dtype a model's checkpoint is stored in, as its config says (None if unknown)."""
    try:
        dtype = AutoConfig.from_pretrained(source).dtype
    except (OSError, ValueError):
        return None
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def runtime(source: str | Path | None = None) -> tuple[torch.device, torch.dtype]:
    """On CUDA the checkpoint's half dtype (bf16 models overflow in fp16), else fp16, for the Triton
    kernels; fp32 on the CPU, where half-precision matmuls are ~10x slower."""
    if torch.cuda.is_available():
        stored = None if source is None else checkpoint_dtype(source)
        return torch.device("cuda"), torch.bfloat16 if stored == torch.bfloat16 else torch.float16
    return torch.device("cpu"), torch.float32


def is_compressed_folder(path: str | Path) -> bool:
    """True for a folder written by save_compressed (its config names our quant_method)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    quantization = json.loads(config.read_text()).get("quantization_config") or {}
    return quantization.get("quant_method") == QUANT_METHOD


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """A dense or compressed causal LM from a local folder (or a hub id that from_pretrained resolves)."""
    if is_compressed_folder(path):
        return load_compressed(path, device_map=str(device), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(path)
