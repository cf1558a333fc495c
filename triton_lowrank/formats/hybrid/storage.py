"""HybridWeights: the stored tensors of one hybrid layer W ≈ Q + U·D, and its reference matmul.

Q is a group-wise quantized base (quant.py: int4 symmetric, int3/int2 with uint8 zero points), U·D a
rank-r correction stored exactly as a low-rank layer stores its factors (factors.LowRankFactors, with
bias=None: the layer's bias is kept once, here). `hybrid_reference` is the one definition of the right
answer for the hybrid matmul (the op's path until a fused kernel exists, and every test's baseline).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from triton_lowrank.core.factors import LowRankFactors, random_factors
from triton_lowrank.core.nbytes import tensor_bytes
from triton_lowrank.core.quant import ZERO_POINT_BITS, dequantize, dequantize_zero_point, quantize, quantize_zero_point
from triton_lowrank.core.reference import dequantized_factors, lowrank_reference


def dequantize_base(
    storage: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """float32 [out, in] of a stored base."""
    if bits in ZERO_POINT_BITS:
        return dequantize_zero_point(storage, scale, zero, bits, group_size)
    return dequantize(storage, scale, bits, group_size)


class HybridWeights(NamedTuple):
    """Storage of one hybrid layer: base codes, float32 base scales, the correction's factors, bias."""

    base: torch.Tensor  # [out, in * base_bits / 8] uint8 codes
    base_scale: torch.Tensor  # [out, in / base_group_size] float32
    base_zero: torch.Tensor | None  # [out, in / base_group_size] uint8 for int3/int2; None for int4
    base_bits: int
    base_group_size: int
    correction: LowRankFactors  # bias None
    bias: torch.Tensor | None  # [out]

    @property
    def in_features(self) -> int:
        return self.correction.in_features

    @property
    def out_features(self) -> int:
        return self.correction.out_features

    @property
    def rank(self) -> int:
        return self.correction.rank

    def base_weight(self) -> torch.Tensor:
        """float32 [out, in] of the base Q̂."""
        return dequantize_base(self.base, self.base_scale, self.base_zero, self.base_bits, self.base_group_size)

    def correction_weight(self) -> torch.Tensor:
        """float32 [out, in] of the correction U·D."""
        down, up_t = dequantized_factors(self.correction)  # [r, in], [r, out]
        return up_t.t() @ down

    def dense_weight(self) -> torch.Tensor:
        """float32 [out, in] of Q̂ + U·D (no bias)."""
        return self.base_weight() + self.correction_weight()

    def storage_bytes(self) -> int:
        """Bytes of the base (codes, scales, zeros) and the correction's factors and scales; bias excluded."""
        c = self.correction
        return tensor_bytes([self.base, self.base_scale, self.base_zero, c.down, c.down_scale, c.up_t, c.up_t_scale])


def random_hybrid_weights(
    in_features: int,
    out_features: int,
    rank: int,
    base_bits: int,
    base_group_size: int = 128,
    bits: int | None = 8,
    group_size: int = 128,
    dtype: torch.dtype = torch.float16,
    bias: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> HybridWeights:
    """Seeded random hybrid storage with y = O(1) for x ~ N(0, 1): a round-to-nearest base of a random [out, in]
    matrix and random_factors as the correction (same scale). Generated on the CPU, then moved."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) / in_features**0.5  # [out, in]
    if base_bits in ZERO_POINT_BITS:
        base, scale, zero = quantize_zero_point(w, base_bits, base_group_size)
    else:
        (base, scale), zero = quantize(w, base_bits, base_group_size), None
    correction = random_factors(in_features, out_features, rank, bits, group_size, dtype, False, seed + 1, device)
    b = torch.randn(out_features, generator=gen).to(dtype).to(device) if bias else None  # [out]
    return HybridWeights(base.to(device), scale.to(device), None if zero is None else zero.to(device), base_bits,
                         base_group_size, correction, b)


def hybrid_reference(x: torch.Tensor, w: HybridWeights) -> torch.Tensor:
    """y [..., out] = x [..., in] · Q̂ᵀ + x · (U·D)ᵀ + b in fp32 (the correction through lowrank_reference,
    its rank-r intermediate fp32), output in x.dtype."""
    y = x.float() @ w.base_weight().t()  # [..., out] fp32
    y = y + lowrank_reference(x.float(), w.correction)  # correction has no bias: added once below
    if w.bias is not None:
        y = y + w.bias.float()
    return y.to(x.dtype)
