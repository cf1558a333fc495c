"""Tokens/second of `model.generate`, and the figures that make a speed number meaningful.

Shared by bench/e2e.py, the CLI and the demo. Decoding one token reads every weight once, so
weight bytes x decode steps/s is the memory bandwidth the weights alone consume: the figure a
low-rank model improves, and the one to set beside the GPU's copy bandwidth.

On the CPU every timing runs in `speed_dtype`: bf16 where the CPU has fast bf16 matmuls (the compressed layers'
packed int8/int4 kernels are fast for bf16 activations only, and dense bf16 beats dense fp32 at decode), so dense
and compressed are always timed in the same dtype, whatever dtype they were loaded in (loading.runtime picks fp32
on the CPU for quality work). The thread count is the other CPU knob: `decode_threads` picks 1 or all threads,
whichever decodes the dense model faster, and the demo and `bench` time both models at that count.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch import nn

from triton_lowrank.core.nbytes import tensor_bytes

GENERATION_MODES = ("eager", "static_compiled")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored tensors (parameters and persistent buffers), tied tensors once."""
    return tensor_bytes(model.state_dict().values())


def speed_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype decode is timed in on `device`: on the CPU bf16 where oneDNN has bf16 matmuls, else fp32;
    None (the model's own) on a GPU, where the loader already picks a half dtype."""
    if torch.device(device).type != "cpu":
        return None
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
        else torch.float32


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (its activations' dtype)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def in_speed_dtype(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` itself if it already runs in speed_dtype(device), else a copy cast to it (the caller's model keeps
    its dtype: a cast there and back would round fp32 weights through bf16)."""
    dtype = speed_dtype(device)
    if dtype is None or model_dtype(model) == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


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


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the body with `threads` torch threads (None: as they are), then restore the count."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode_threads(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 16) -> int | None:
    """On the CPU, the torch thread count, 1 or all of them, at which `model` (the dense baseline) decodes faster,
    from a short greedy run at each (best of two); None on a GPU. At batch 1 a small model's ops are too short to
    share: on an idle 2-core machine the embedded GPT-2 decodes 1.7-1.9x faster on 1 thread than on 2, dense
    and compressed alike, so a comparison at the default count would measure thread hand-offs."""
    if input_ids.device.type != "cpu":
        return None
    every = torch.get_num_threads()
    if every == 1:
        return 1
    model, seconds = in_speed_dtype(model, input_ids.device), {}  # cast once, not per run
    for threads in (1, every):
        runs = [measure_generation(model, input_ids, new_tokens, warmup=False, threads=threads)["seconds"]
                for _ in range(2)]
        seconds[threads] = min(runs)
    return min(seconds, key=seconds.get)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_generation(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 128, mode: str = "eager", warmup: bool = True,
    cast: bool = True, threads: int | None = None,
) -> dict:
    """Time one greedy generate() of `new_tokens` tokens per row of `input_ids` [batch, prompt].

    With `cast` (the default) the model is timed in speed_dtype (on the CPU a bf16 copy of a model loaded in
    another dtype), so every dense-versus-compressed comparison runs both in the same, fast dtype; `dtype` in the
    result says which.

    The warm-up run (which pays for torch.compile and CUDA graph capture in "static_compiled") is
    timed separately as warmup_s. Timings include the prompt's prefill. On CUDA, peak_gpu_bytes is
    the peak allocated during the timed run (weights, cache, activations); None on CPU. `threads` runs both
    generate() calls with that many torch threads (decode_threads picks it on the CPU); None keeps the count.
    """
    device = input_ids.device
    if cast:
        model = in_speed_dtype(model, device)
    with torch_threads(threads):
        result = _time_generate(model, input_ids, new_tokens, mode, warmup)
    return {**result, "threads": (threads or torch.get_num_threads()) if device.type == "cpu" else None}


def _time_generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, mode: str, warmup: bool) -> dict:
    device = input_ids.device
    kwargs = generate_kwargs(model, new_tokens, mode)
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
        "dtype": str(model_dtype(model)).removeprefix("torch."),
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


