"""LowRankFactors: the stored tensors of one low-rank layer, and the two builders of them.

W_r = up · down with up [out, r] and down [r, in]. The up factor is STORED transposed, as
up_t [r, out], so both factors are [r, features] matrices: int8 scales are then one per rank
component (absorbing that component's singular value), int4 groups run along the contiguous
feature axis, and one quantizer (quant.py) serves both.

`round_factors` is round-to-nearest storage of float factors (compression decides when to use it;
error-feedback storage lives in gptq.py). `random_factors` is the one builder of random factors,
shared by tests, benchmarks and the autotuner's timer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from triton_lowrank.core.quant import NO_GROUPS, check_bits, quantize, storage_group_size


class LowRankFactors(NamedTuple):
    """Storage of one layer: quant.py layouts, float32 scales, bias in the activation dtype."""

    down: torch.Tensor  # [r, in] (int4: [r, in // 2] uint8)
    down_scale: torch.Tensor | None  # None (float) / [r] (int8) / [r, in // group_size] (int4), float32
    up_t: torch.Tensor  # [r, out] (int4: [r, out // 2] uint8)
    up_t_scale: torch.Tensor | None  # None / [r] / [r, out // group_size], float32
    bias: torch.Tensor | None  # [out]
    bits: int | None  # None (float factors), 8 or 4
    group_size: int = NO_GROUPS  # int4 group width; NO_GROUPS for float and int8

    @property
    def in_features(self) -> int:
        return self.down.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def out_features(self) -> int:
        return self.up_t.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def to(self, device: torch.device | str) -> LowRankFactors:
        return LowRankFactors(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in self))


def round_factors(
    up: torch.Tensor,  # [out, r] float
    down: torch.Tensor,  # [r, in] float
    bias: torch.Tensor | None,  # [out]
    bits: int | None,
    group_size: int,
    dtype: torch.dtype,
) -> LowRankFactors:
    """Round each factor to nearest (bits 8/4), or keep it as `dtype` floats (bits None)."""
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"round_factors: up is [out, {up.shape[1]}] but down is [{down.shape[0]}, in]")
    group_size = storage_group_size(bits, group_size)
    check_bits(bits, group_size, down.shape[1], "round_factors (in_features)")
    check_bits(bits, group_size, up.shape[0], "round_factors (out_features)")
    bias = None if bias is None else bias.detach().to(dtype)
    if bits is None:
        return LowRankFactors(down.to(dtype).contiguous(), None, up.t().to(dtype).contiguous(), None, bias, None)
    down_q, down_scale = quantize(down.contiguous(), bits, group_size)
    up_t_q, up_t_scale = quantize(up.t().contiguous(), bits, group_size)
    return LowRankFactors(down_q, down_scale, up_t_q, up_t_scale, bias, bits, group_size)


def random_factors(
    in_features: int,
    out_features: int,
    rank: int,
    bits: int | None,
    group_size: int = 128,
    dtype: torch.dtype = torch.float16,
    bias: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LowRankFactors:
    """Seeded random factors scaled so that y = x·W_rᵀ is O(1) for x ~ N(0, 1); uneven rank
    components give the quantizer non-trivial scales. Generated on the CPU, then moved."""
    gen = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, in_features, generator=gen) / in_features**0.5  # [r, in]
    up_t = torch.randn(rank, out_features, generator=gen) / rank**0.5  # [r, out]
    up = (up_t * (1 + torch.rand(rank, 1, generator=gen))).t()  # [out, r]: uneven component norms
    b = torch.randn(out_features, generator=gen) if bias else None  # [out]
    return round_factors(up, down, b, bits, group_size, dtype).to(device)


