"""Tokens/second of `model.generate`, and the figures that make a speed number meaningful.

Shared by bench/e2e.py, the CLI and the demo. Decoding one token reads every weight once, so
weight bytes x decode steps/s is the memory bandwidth the weights alone consume: the figure a
low-rank model improves, and the one to set beside the GPU's copy bandwidth.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from triton_lowrank.core.nbytes import tensor_bytes

GENERATION_MODES = ("eager", "static_compiled")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored tensors (parameters and persistent buffers), tied tensors once."""
    return tensor_bytes(model.state_dict().values())


def generate_kwargs(model: nn.Module, new_tokens: int, mode: str) -> dict:
    """Greedy decoding of exactly `new_tokens` tokens. "static_compiled" asks for a static cache, whose
    forward transformers compiles by itself (its default CompileConfig: inductor, reduce-overhead) on
    CUDA when the model allows it (hf_quantizer.is_compileable); on CPU it runs uncompiled."""
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode must be one of {GENERATION_MODES}, got {mode!r}")
    eos = model.generation_config.eos_token_id
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # an early EOS would shorten the run and inflate tokens/s
        do_sample=False,
        pad_token_id=model.generation_config.pad_token_id or (eos[0] if isinstance(eos, list) else eos) or 0,
    )
    if mode == "static_compiled":
        kwargs["cache_implementation"] = "static"
    return kwargs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_generation(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 128, mode: str = "eager", warmup: bool = True
) -> dict:
    """Time one greedy generate() of `new_tokens` tokens per row of `input_ids` [batch, prompt].

    The warm-up run (which pays for torch.compile and CUDA graph capture in "static_compiled") is
    timed separately as warmup_s. Timings include the prompt's prefill. On CUDA, peak_gpu_bytes is
    the peak allocated during the timed run (weights, cache, activations); None on CPU.
    """
    kwargs = generate_kwargs(model, new_tokens, mode)
    device = input_ids.device
    attention_mask = torch.ones_like(input_ids)
    warmup_s = None
    if warmup:
        _sync(device)
        start = time.perf_counter()
        model.generate(input_ids, attention_mask=attention_mask, **kwargs)
        _sync(device)
        warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    sequences = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    steps = sequences.shape[1] - input_ids.shape[1]
    batch = input_ids.shape[0]
    stored = weight_bytes(model)
    return {
        "mode": mode,
        "batch": batch,
        "prompt_tokens": input_ids.shape[1],
        "new_tokens": steps,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "steps_per_s": steps / seconds,  # decode steps: each reads all weights once, whatever the batch
        "tokens_per_s": batch * steps / seconds,
        "weight_bytes": stored,
        "weight_gb_per_s": stored * steps / seconds / 1e9,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


