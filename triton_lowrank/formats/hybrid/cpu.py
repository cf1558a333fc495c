"""The hybrid format's CPU implementation: the base through PyTorch's int4 CPU kernel, the correction through the
factor kernels of core/cpu_kernels.py, on storage packed once per layer (that module's docstring has the rules).

The int4 kernel's value is (code - 8)·scale + zero: int4 nibbles n = q + 8 are its codes as stored (scale s, zero 0);
int3/int2 codes c with value (c - z)·s become codes c - z + 8, in [1, 15] since 0 <= c, z < 2^bits (scale s,
zero 0): exact, no rounded zero term. A base group size the kernel does not take runs the whole layer through the
reference: a bf16 copy of a base would be the dense weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triton_lowrank.core.cpu_kernels import (
    INT4_KERNEL_GROUPS,
    FactorsPack,
    cached_pack,
    factors_matmul,
    finish_output,
    int4_kernel_pack,
    nibbles,
    pack_factors,
    uses_cpu_kernels,
)
from triton_lowrank.core.quant import ZERO_POINT_BITS, unpack_codes
from triton_lowrank.formats.hybrid.storage import HybridWeights, hybrid_reference


@dataclass
class HybridPack:
    base: torch.Tensor  # the int4 kernel's layout of the base codes
    base_scale_zero: torch.Tensor  # bf16 [in / g, out_pad, 2]
    correction: FactorsPack


def hybrid_kernel_takes(w: HybridWeights) -> bool:
    return w.base_group_size in INT4_KERNEL_GROUPS


def pack_hybrid(w: HybridWeights) -> HybridPack:
    if w.base_bits in ZERO_POINT_BITS:  # (c - z)·s = ((c - z + 8) - 8)·s, c - z + 8 in [1, 15] for int3/int2
        codes = unpack_codes(w.base, w.base_bits).view(w.out_features, -1, w.base_group_size).short()
        codes = (codes - w.base_zero[:, :, None].short() + 8).view(w.out_features, w.in_features)
    else:
        codes = nibbles(w.base)
    base, scale_zero = int4_kernel_pack(codes, w.base_scale, w.base_group_size)
    return HybridPack(base, scale_zero, pack_factors(w.correction))


def hybrid_pack(w: HybridWeights) -> HybridPack:
    c = w.correction
    tensors = (w.base, w.base_scale, w.base_zero, c.down, c.down_scale, c.up_t, c.up_t_scale)
    return cached_pack(w.base, tensors, ("hybrid", w.base_bits, w.base_group_size, c.bits, c.group_size),
                   lambda: pack_hybrid(w))


def hybrid_cpu(x: torch.Tensor, w: HybridWeights) -> torch.Tensor:
    """hybrid_reference's answer, through the packed CPU kernels where they apply (module docstring)."""
    if not (uses_cpu_kernels(x) and hybrid_kernel_takes(w)):
        return hybrid_reference(x, w)
    p = hybrid_pack(w)
    x2d = x.reshape(-1, w.in_features).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, p.base, w.base_group_size, p.base_scale_zero)
    y = y[:, : w.out_features] + factors_matmul(x2d, w.correction, p.correction)
    return finish_output(y, w.bias, x.shape[:-1])
