"""The launcher: validate, choose kernels or the reference, pick a tile config, allocate, launch.

`lowrank_matmul(x, factors)` is registered as the custom op `triton_lowrank::lowrank_matmul`, so
torch.compile(fullgraph=True) and CUDA-graph capture treat it as one opaque node. `uses_kernels`
is the one switch between the Triton kernels and the PyTorch reference:
  CUDA tensors                      -> Triton kernels
  CPU tensors, TRITON_INTERPRET=1   -> the same kernels through the Triton interpreter (how CI tests them)
  CPU tensors otherwise             -> cpu_ops: PyTorch's weight-only int8/int4 CPU kernels on storage packed once
                                       per layer (bf16 activations), else lowrank_reference / hybrid_reference
Activations may be float16, bfloat16 or float32 (fp32 runs the kernels with IEEE fp32 dots).
Inference only: the op has no autograd formula.

Tile configs come from a selector: the no-benchmark heuristic until the autotuner (a layer above,
which imports this module) installs its own with `use_config_selector`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from .cpu_ops import hybrid_cpu, lowrank_cpu
from .factors import LowRankFactors
from .hybrid_storage import HybridWeights
from .kernels.configs import Problem, TileConfig, default_config
from .quant import BASE_BITS, SUPPORTED_BITS, ZERO_POINT_BITS, storage_group_size

try:
    from .kernels.launch import launch, launch_hybrid
except ImportError:  # no Triton on this platform (it is a Linux x86-64 dependency): the reference only
    launch = launch_hybrid = None

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_STORAGE_DTYPE = {8: torch.int8, 4: torch.uint8}

ConfigSelector = Callable[[Problem, torch.dtype], TileConfig]


def heuristic_config(problem: Problem, dtype: torch.dtype) -> TileConfig:
    return default_config(problem)


_config_selector: ConfigSelector = heuristic_config


def use_config_selector(selector: ConfigSelector) -> None:
    """Install the function CUDA launches ask for a tile config (the autotuner installs its own). Problems with
    base_bits are the hybrid format's."""
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


def eager_cpu(x: torch.Tensor) -> bool:
    """A plain CPU tensor outside torch.compile/export and autograd, where no kernel runs: the op's body is called
    directly (the custom-op dispatcher costs ~20 us a call, more than a small layer's CPU kernels); traced,
    fake, meta and CUDA calls keep going through torch.ops."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and not x.requires_grad
            and not torch.compiler.is_compiling() and not uses_kernels(x))


def run_format(op: str, x: torch.Tensor, stored, config: TileConfig | None, out: torch.Tensor | None,
               reference: Callable, problem_of: Callable, launcher: Callable | None) -> torch.Tensor:
    """The path every weight format shares once its inputs are checked: validate `out`; `reference` where
    kernels do not run (the format's cpu_ops function: packed CPU kernels, else the reference); else x as
    row-major 2-D, allocate, pick a config (the selector, or small tiles under the interpreter: numpy stays
    fast), launch. `stored` is the format's NamedTuple (LowRankFactors, HybridWeights)."""
    lead, n = x.shape[:-1], stored.out_features
    if out is not None and (out.shape != (*lead, n) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"{op}: out must be contiguous {x.dtype} of shape {(*lead, n)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if not uses_kernels(x):
        y = reference(x, stored)
        return y if out is None else out.copy_(y)
    x2d = x.reshape(-1, stored.in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if out is None:
        out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    if x2d.shape[0] == 0:  # nothing to compute, and nothing for the autotuner to learn from
        return out
    if config is None:
        problem = problem_of(stored, x2d.shape[0], x2d.element_size())
        config = _config_selector(problem, x.dtype) if x2d.is_cuda else default_config(problem, interpret=True)
    launcher(x2d, stored, config, out.view(-1, n))
    return out


def _forward(x: torch.Tensor, f: LowRankFactors, config: TileConfig | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    check_inputs(x, f)
    return run_format("lowrank_matmul", x, f, config, out, lowrank_cpu, problem_for, launch)


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
    if out is not None or config is not None or eager_cpu(x):
        return _forward(x, factors, config, out)
    return torch.ops.triton_lowrank.lowrank_matmul(*factors_args(x, factors))


def factors_args(x: torch.Tensor, f: LowRankFactors) -> tuple:
    """The custom op's positional arguments."""
    return (x, f.down, f.down_scale, f.up_t, f.up_t_scale, f.bias, f.bits, f.group_size)


# ----------------------------------------------------------------------------- the hybrid format


def check_hybrid_inputs(x: torch.Tensor, w: HybridWeights) -> None:
    """check_inputs for the correction, then the base's storage: one error naming the offending value."""
    check_inputs(x, w.correction)
    if w.correction.bias is not None:
        raise ValueError("hybrid_matmul: the correction's factors carry no bias (the layer's is HybridWeights.bias)")
    out_features, in_features = w.correction.out_features, w.correction.in_features
    if w.base_bits not in BASE_BITS:
        raise ValueError(f"hybrid_matmul: base_bits must be one of 4, 3 or 2, got {w.base_bits!r}")
    if w.base_group_size <= 0 or in_features % w.base_group_size:
        raise ValueError(f"hybrid_matmul: base_group_size {w.base_group_size} does not divide {in_features}")
    want = (out_features, in_features * w.base_bits // 8)
    if w.base.dtype != torch.uint8 or tuple(w.base.shape) != want:
        raise ValueError(f"hybrid_matmul: base must be uint8 of shape {want}, got {w.base.dtype} {tuple(w.base.shape)}")
    groups = (out_features, in_features // w.base_group_size)
    if w.base_scale.dtype != torch.float32 or tuple(w.base_scale.shape) != groups:
        raise ValueError(f"hybrid_matmul: base_scale must be float32 of shape {groups}, "
                         f"got {w.base_scale.dtype} {tuple(w.base_scale.shape)}")
    if (w.base_zero is None) != (w.base_bits not in ZERO_POINT_BITS):
        raise ValueError(f"hybrid_matmul: base_zero must be given exactly for base_bits 3 and 2 (got "
                         f"{'none' if w.base_zero is None else 'one'} for base_bits {w.base_bits})")
    if w.base_zero is not None and (w.base_zero.dtype != torch.uint8 or tuple(w.base_zero.shape) != groups):
        raise ValueError(f"hybrid_matmul: base_zero must be uint8 of shape {groups}, "
                         f"got {w.base_zero.dtype} {tuple(w.base_zero.shape)}")
    if w.bias is not None and tuple(w.bias.shape) != (out_features,):
        raise ValueError(f"hybrid_matmul: bias must have shape ({out_features},), got {tuple(w.bias.shape)}")
    for name, t in (("base", w.base), ("base_scale", w.base_scale), ("base_zero", w.base_zero), ("bias", w.bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"hybrid_matmul: x is on {x.device} but {name} is on {t.device}")
        # the kernels index the stored tensors as row-major arrays: a view with other strides would be misread
        if t is not None and not t.is_contiguous():
            raise ValueError(f"hybrid_matmul: {name} must be contiguous (row-major), got strides {t.stride()}")


def _hybrid_weights(base, base_scale, base_zero, base_bits, base_group_size, down, down_scale, up_t, up_t_scale,
                    bits, group_size, bias) -> HybridWeights:
    correction = LowRankFactors(down, down_scale, up_t, up_t_scale, None, bits, group_size)
    return HybridWeights(base, base_scale, base_zero, base_bits, base_group_size, correction, bias)


@torch.library.custom_op(
    "triton_lowrank::hybrid_matmul",
    mutates_args=(),
    schema="(Tensor x, Tensor base, Tensor base_scale, Tensor? base_zero, int base_bits, int base_group_size, "
    "Tensor down, Tensor? down_scale, Tensor up_t, Tensor? up_t_scale, int? bits, int group_size, Tensor? bias) "
    "-> Tensor",
)
def _hybrid_matmul_op(x, *stored):
    return _forward_hybrid(x, _hybrid_weights(*stored))


@_hybrid_matmul_op.register_fake
def _(x, *stored):
    w = _hybrid_weights(*stored)
    check_hybrid_inputs(x, w)
    return x.new_empty(*x.shape[:-1], w.out_features)


def hybrid_problem_for(w: HybridWeights, m: int, x_bytes: int) -> Problem:
    """The kernel problem of `m` activation rows of `x_bytes` each element through this hybrid layer: its
    correction's, with the base."""
    return dataclasses.replace(problem_for(w.correction, m, x_bytes), base_bits=w.base_bits,
                               base_group_size=w.base_group_size)


def _forward_hybrid(x: torch.Tensor, w: HybridWeights, config: TileConfig | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    check_hybrid_inputs(x, w)
    return run_format("hybrid_matmul", x, w, config, out, hybrid_cpu, hybrid_problem_for, launch_hybrid)


def hybrid_matmul(x: torch.Tensor, weights: HybridWeights, *, out: torch.Tensor | None = None,
                  config: TileConfig | None = None) -> torch.Tensor:
    """y [..., out] = x [..., in] · (Q̂ + U·D)ᵀ + b from a hybrid layer's storage (`layer.weights()`).

    Fused: the base codes and the correction's factors are read by the kernels directly, no dense weight is made.
    With `out` (e.g. NaN-poisoned in tests) or an explicit TileConfig this runs eagerly outside the custom op;
    otherwise it dispatches to torch.ops.triton_lowrank.hybrid_matmul.
    """
    if not isinstance(weights, HybridWeights):
        raise TypeError(f"hybrid_matmul: expected HybridWeights (layer.weights()), got {type(weights).__name__}")
    if out is not None or config is not None or eager_cpu(x):
        return _forward_hybrid(x, weights, config, out)
    c = weights.correction
    return torch.ops.triton_lowrank.hybrid_matmul(
        x, weights.base, weights.base_scale, weights.base_zero, weights.base_bits, weights.base_group_size,
        c.down, c.down_scale, c.up_t, c.up_t_scale, c.bits, c.group_size, weights.bias)
