"""The one pure-PyTorch reference for the quantized low-rank matmul.

LowRankLinear's CPU forward, every kernel test and every benchmark's "unfused" baseline
import this function, so there is a single definition of the right answer.
"""

from __future__ import annotations

import torch

from .quant import dequantize


def lowrank_reference(
    x: torch.Tensor,  # [..., in]
    down: torch.Tensor,  # [r, in] storage (float, int8, or packed uint8 [r, in // 2])
    down_scale: torch.Tensor | None,
    up_t: torch.Tensor,  # [r, out] storage
    up_scale: torch.Tensor | None,
    bias: torch.Tensor | None,  # [out]
    bits: int | None,
    group_size: int = 128,
) -> torch.Tensor:
    """y = x · (upᵀ·down)ᵀ + b with dequantized factors, fp32 accumulation, output in x.dtype."""
    down_f = dequantize(down, down_scale, bits, group_size)  # [r, in] fp32
    up_t_f = dequantize(up_t, up_scale, bits, group_size)  # [r, out] fp32
    hidden = x.float() @ down_f.t()  # [..., r] fp32: the rank-r intermediate stays fp32
    y = hidden @ up_t_f  # [..., out] fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
