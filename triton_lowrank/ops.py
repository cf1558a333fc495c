"""The launcher: validate, choose kernels or the reference, pick a tile config, allocate, launch.

`lowrank_matmul(x, factors)` is registered as the custom op `triton_lowrank::lowrank_matmul`, so
torch.compile(fullgraph=True) and CUDA-graph capture treat it as one opaque node. `uses_kernels`
is the one switch between the Triton kernels and the PyTorch reference:
  CUDA tensors                      -> Triton kernels
  CPU tensors, TRITON_INTERPRET=1   -> the same kernels through the Triton interpreter (how CI tests them)
  CPU tensors otherwise             -> lowrank_reference
Activations may be float16, bfloat16 or float32 (fp32 runs the kernels with IEEE fp32 dots).
Inference only: the op has no autograd formula.

Tile configs come from a selector: the no-benchmark heuristic until the autotuner (a layer above,
which imports this module) installs its own with `use_config_selector`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .factors import LowRankFactors
from .kernels.configs import Problem, TileConfig, default_config
from .quant import SUPPORTED_BITS, storage_group_size
from .reference import lowrank_reference

try:
    from .kernels.launch import launch
except ImportError:  # no Triton on this platform (it is a Linux x86-64 dependency): the reference only
    launch = None

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_STORAGE_DTYPE = {8: torch.int8, 4: torch.uint8}

ConfigSelector = Callable[[Problem, torch.dtype], TileConfig]


def heuristic_config(problem: Problem, dtype: torch.dtype) -> TileConfig:
    return default_config(problem)


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
    return launch is not None and (x.is_cuda or (x.device.type == "cpu" and interpreter_enabled()))


def problem_for(f: LowRankFactors, m: int, x_bytes: int) -> Problem:
    """The kernel problem of `m` activation rows of `x_bytes` each element through these factors."""
    return Problem(m, f.out_features, f.in_features, f.rank, f.bits, storage_group_size(f.bits, f.group_size), x_bytes)


def select_config(x2d: torch.Tensor, f: LowRankFactors) -> TileConfig:
    problem = problem_for(f, x2d.shape[0], x2d.element_size())
    if not x2d.is_cuda:  # the interpreter: small tiles keep numpy fast
        return default_config(problem, interpret=True)
    return _config_selector(problem, x2d.dtype)


def _forward(x: torch.Tensor, f: LowRankFactors, config: TileConfig | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    check_inputs(x, f)
    lead = x.shape[:-1]
    if out is not None and (out.shape != (*lead, f.out_features) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"lowrank_matmul: out must be contiguous {x.dtype} of shape "
                         f"{(*lead, f.out_features)}, got {out.dtype} {tuple(out.shape)}")
    if not uses_kernels(x):
        y = lowrank_reference(x, f)
        if out is None:
            return y
        return out.copy_(y)
    x2d = x.reshape(-1, f.in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if out is None:
        out = torch.empty(*lead, f.out_features, dtype=x.dtype, device=x.device)
    if x2d.shape[0] == 0:  # nothing to compute, and nothing for the autotuner to learn from
        return out
    launch(x2d, f, config or select_config(x2d, f), out.view(-1, f.out_features))
    return out


@torch.library.custom_op(
    "triton_lowrank::lowrank_matmul",
    mutates_args=(),
    schema="(Tensor x, Tensor down, Tensor? down_scale, Tensor up_t, Tensor? up_t_scale, Tensor? bias, "
    "int? bits, int group_size) -> Tensor",
)
def _lowrank_matmul_op(x, down, down_scale, up_t, up_t_scale, bias, bits, group_size):
    return _forward(x, LowRankFactors(down, down_scale, up_t, up_t_scale, bias, bits, group_size))


@_lowrank_matmul_op.register_fake
def _(x, down, down_scale, up_t, up_t_scale, bias, bits, group_size):
    f = LowRankFactors(down, down_scale, up_t, up_t_scale, bias, bits, group_size)
    check_inputs(x, f)
    return x.new_empty(*x.shape[:-1], f.out_features)


def lowrank_matmul(x: torch.Tensor, factors: LowRankFactors, *, out: torch.Tensor | None = None,
                   config: TileConfig | None = None) -> torch.Tensor:
    """y [..., out] = x [..., in] · W_rᵀ + b from stored factors (a LowRankLinear gives `layer.factors()`).

    With `out` (e.g. NaN-poisoned in tests) or an explicit TileConfig this runs eagerly outside the
    custom op; otherwise it dispatches to torch.ops.triton_lowrank.lowrank_matmul.
    """
    if not isinstance(factors, LowRankFactors):
        raise TypeError(f"lowrank_matmul: expected LowRankFactors (layer.factors()), got {type(factors).__name__}")
    if out is not None or config is not None:
        return _forward(x, factors, config, out)
    return torch.ops.triton_lowrank.lowrank_matmul(*factors_args(x, factors))


def factors_args(x: torch.Tensor, f: LowRankFactors) -> tuple:
    """The custom op's positional arguments."""
    return (x, f.down, f.down_scale, f.up_t, f.up_t_scale, f.bias, f.bits, f.group_size)
