"""The one pure-PyTorch reference for the quantized low-rank matmul.

The op's CPU path, every kernel test and every benchmark's "unfused" baseline call this function,
so there is a single definition of the right answer.
"""

from __future__ import annotations

import torch

from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.quant import dequantize


def dequantized_factors(f: LowRankFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [r, in], up_t [r, out]) in float32."""
    down = dequantize(f.down, f.down_scale, f.bits, f.group_size)  # [r, in]
    up_t = dequantize(f.up_t, f.up_t_scale, f.bits, f.group_size)  # [r, out]
    return down, up_t


def lowrank_reference(x: torch.Tensor, f: LowRankFactors) -> torch.Tensor:
    """y [..., out] = x [..., in] · (upᵀ·down)ᵀ + b: fp32 math, the rank-r intermediate kept fp32,
    output in x.dtype."""
    down, up_t = dequantized_factors(f)  # [r, in], [r, out] fp32
    hidden = x.float() @ down.t()  # [..., r] fp32
    y = hidden @ up_t  # [..., out] fp32
    if f.bias is not None:
        y = y + f.bias.float()
    return y.to(x.dtype)
