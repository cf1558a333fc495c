"""The hybrid format's op: y = x·(Q̂ + U·D)ᵀ + b from a quantized base and the correction's factors, as the custom op
`triton_lowrank::hybrid_matmul` (with a fake; torch.compile and CUDA graphs see one node)."""

from __future__ import annotations

import dataclasses

import torch

from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.format import weight_format
from triton_lowrank.core.ops import check_inputs, eager_cpu, problem_for, run_format
from triton_lowrank.core.quant import BASE_BITS, ZERO_POINT_BITS
from triton_lowrank.formats.hybrid.storage import HybridWeights
from triton_lowrank.kernels.configs import Problem, TileConfig


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
                               base_group_size=w.base_group_size, format="hybrid")


def _forward_hybrid(x: torch.Tensor, w: HybridWeights, config: TileConfig | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    check_hybrid_inputs(x, w)
    return run_format("hybrid_matmul", x, w, weight_format("hybrid"), config, out)


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
