"""The launcher every weight format shares: validate, choose kernels or the reference, pick a tile config,
allocate, launch. Each format's op (`formats/<name>/op.py`) checks its own storage and calls `run_format`.

`uses_kernels` is the one switch between the Triton kernels and the PyTorch reference:
  CUDA tensors                      -> Triton kernels
  CPU tensors, TRITON_INTERPRET=1   -> the same kernels through the Triton interpreter (how CI tests them)
  CPU tensors otherwise             -> the format's CPU implementation (PyTorch's weight-only int8/int4 CPU kernels
                                       on storage packed once per layer, bf16 activations; core/cpu_kernels.py),
                                       else its reference
Activations may be float16, bfloat16 or float32 (fp32 runs the kernels with IEEE fp32 dots).
Inference only: the ops have no autograd formula.

Tile configs come from a selector: the format's no-benchmark heuristic until the autotuner (which imports this
module) installs its own with `use_config_selector`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.format import WeightFormat, format_for_problem
from triton_lowrank.core.quant import SUPPORTED_BITS, storage_group_size
from triton_lowrank.kernels.configs import Problem, TileConfig

try:
    import triton_lowrank.kernels.launch  # noqa: F401  (the formats take their launchers from it)

    TRITON_AVAILABLE = True
except ImportError:  # no Triton on this platform (it is a Linux x86-64 dependency): the references only
    TRITON_AVAILABLE = False

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_STORAGE_DTYPE = {8: torch.int8, 4: torch.uint8}

ConfigSelector = Callable[[Problem, torch.dtype], TileConfig]


def heuristic_config(problem: Problem, dtype: torch.dtype) -> TileConfig:
    return format_for_problem(problem).default_config(problem)  # the format's heuristic, no benchmarking


_config_selector: ConfigSelector = heuristic_config


def use_config_selector(selector: ConfigSelector) -> None:
    """Install the function CUDA launches ask for a tile config (the autotuner installs its own)."""
    global _config_selector
    _config_selector = selector


def check_inputs(x: torch.Tensor, f: LowRankFactors) -> None:
    """Raise TypeError (dtypes) or ValueError (shapes, devices) with the offending values named."""
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"lowrank_matmul: x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if f.bits not in SUPPORTED_BITS:
        raise ValueError(f"lowrank_matmul: bits must be None, 8 or 4, got {f.bits!r}")
    if f.down.dim() != 2 or f.up_t.dim() != 2:
        raise ValueError(f"lowrank_matmul: factors must be 2-D, got down {tuple(f.down.shape)}, "
                         f"up_t {tuple(f.up_t.shape)}")
    if f.down.shape[0] != f.up_t.shape[0]:
        raise ValueError(f"lowrank_matmul: rank mismatch: down has {f.down.shape[0]} rows, up_t {f.up_t.shape[0]}")
    if x.dim() == 0 or x.shape[-1] != f.in_features:
        raise ValueError(f"lowrank_matmul: x has {x.shape[-1] if x.dim() else 0} features, "
                         f"factors expect {f.in_features}")
    for name, t in (("down", f.down), ("up_t", f.up_t)):
        want = x.dtype if f.bits is None else _STORAGE_DTYPE[f.bits]
        if t.dtype != want:
            raise TypeError(f"lowrank_matmul: {name} dtype must be {want} for bits={f.bits} and x {x.dtype}, "
                            f"got {t.dtype}")
    for name, scale, storage in (("down_scale", f.down_scale, f.down), ("up_t_scale", f.up_t_scale, f.up_t)):
        if f.bits is None:
            continue
        features = storage.shape[1] * (2 if f.bits == 4 else 1)
        if f.bits == 4 and (f.group_size <= 0 or features % f.group_size):
            raise ValueError(f"lowrank_matmul: group_size {f.group_size} does not divide {features}")
        want = (storage.shape[0],) if f.bits == 8 else (storage.shape[0], features // f.group_size)
        if scale is None or tuple(scale.shape) != want or scale.dtype != torch.float32:
            got = None if scale is None else (tuple(scale.shape), scale.dtype)
            raise ValueError(f"lowrank_matmul: {name} must be float32 of shape {want}, got {got}")
    if f.bias is not None and tuple(f.bias.shape) != (f.out_features,):
        raise ValueError(f"lowrank_matmul: bias must have shape ({f.out_features},), got {tuple(f.bias.shape)}")
    tensors = {"down": f.down, "up_t": f.up_t, "down_scale": f.down_scale, "up_t_scale": f.up_t_scale, "bias": f.bias}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"lowrank_matmul: x is on {x.device} but {name} is on {t.device}")
        # The kernels index the factors as row-major arrays; a transposed view would be read wrongly.
        if t is not None and not t.is_contiguous():
            raise ValueError(f"lowrank_matmul: {name} must be contiguous (row-major), got strides {t.stride()}")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_kernels(x: torch.Tensor) -> bool:
    """The one kernel-or-reference switch (see the module docstring)."""
    return TRITON_AVAILABLE and (x.is_cuda or (x.device.type == "cpu" and interpreter_enabled()))


def problem_for(f: LowRankFactors, m: int, x_bytes: int) -> Problem:
    """The kernel problem of `m` activation rows of `x_bytes` each element through these factors."""
    return Problem(m, f.out_features, f.in_features, f.rank, f.bits, storage_group_size(f.bits, f.group_size), x_bytes)


def eager_cpu(x: torch.Tensor) -> bool:
    """A plain CPU tensor outside torch.compile/export and autograd, where no kernel runs: a format's op calls its
    body directly (the custom-op dispatcher costs ~20 us a call, more than a small layer's CPU kernels); traced,
    fake, meta and CUDA calls keep going through torch.ops."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and not x.requires_grad
            and not torch.compiler.is_compiling() and not uses_kernels(x))


def run_format(op: str, x: torch.Tensor, stored, fmt: WeightFormat, config: TileConfig | None,
               out: torch.Tensor | None) -> torch.Tensor:
    """The path every weight format shares once its inputs are checked: validate `out`; the format's CPU
    implementation (else its reference) where kernels do not run; else x as row-major 2-D, allocate, pick a config
    (the selector, or small tiles under the interpreter: numpy stays fast), launch. `stored` is the format's storage
    NamedTuple (LowRankFactors, HybridWeights)."""
    lead, n = x.shape[:-1], stored.out_features
    if out is not None and (out.shape != (*lead, n) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"{op}: out must be contiguous {x.dtype} of shape {(*lead, n)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if not uses_kernels(x) or fmt.launch is None:
        y = (fmt.cpu or fmt.reference)(x, stored)
        return y if out is None else out.copy_(y)
    x2d = x.reshape(-1, stored.in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if out is None:
        out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    if x2d.shape[0] == 0:  # nothing to compute, and nothing for the autotuner to learn from
        return out
    if config is None:
        problem = fmt.problem(stored, x2d.shape[0], x2d.element_size())
        config = _config_selector(problem, x.dtype) if x2d.is_cuda else fmt.default_config(problem, interpret=True)
    fmt.launch(x2d, stored, config, out.view(-1, n))
    return out
