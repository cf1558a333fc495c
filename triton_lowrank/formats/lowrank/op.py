"""The low-rank format's op: y = x·(U·D)ᵀ + b from stored factors, as the custom op `triton_lowrank::lowrank_matmul`
(with a fake, so torch.compile(fullgraph=True) and CUDA-graph capture treat it as one opaque node)."""

from __future__ import annotations

import torch

from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.format import weight_format
from triton_lowrank.core.ops import check_inputs, eager_cpu, run_format
from triton_lowrank.kernels.configs import TileConfig


def _forward(x: torch.Tensor, f: LowRankFactors, config: TileConfig | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    check_inputs(x, f)
    return run_format("lowrank_matmul", x, f, weight_format("lowrank"), config, out)


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


