"""The CPU path of the ops: PyTorch's weight-only int8/int4 CPU kernels on storage packed once per layer.

A format's `cpu` implementation (`lowrank_cpu` here; the hybrid's in formats/hybrid/cpu.py, on the packing and
factor matmuls here) runs where the launcher's one switch (core.ops.uses_kernels) says no Triton kernel runs. They
never dequantize a whole stored matrix per call. What runs, for bfloat16 activations on the CPU:

  int8 factors   two torch._weight_int8pack_mm: h = x · downᵀ with per-rank scales s_down · s_up (up's per-rank
                 scale folded into the intermediate: exact, (x·D_q ᵀ s_d) s_u = x·D_qᵀ (s_d s_u)), then y = h · up,
                 up_t's codes transposed once to the kernel's [out, r] and unit scales.
  int4 factors   down through aten._weight_int4pack_mm_for_cpu where its group size is one the kernel takes
                 (32, 64, 128, 256). up_t's groups run along `out`, the kernel's N axis, which no int kernel scales
                 per group, so up_t (and a down the kernel cannot take) is kept as a bf16 copy made once: factors
                 are small (rank x features), and the copy's one rounding is bf16's.
  float factors  two bf16 matmuls.
  hybrid         the base through the int4 kernel (group size 32..256), whose value is (code - 8)·scale + zero:
                 int4 nibbles n = q + 8 are its codes as stored (scale s, zero 0); int3/int2 codes c with value
                 (c - z)·s become codes c - z + 8, in [1, 15] since 0 <= c, z < 2^bits (scale s, zero 0): exact,
                 no rounded zero term. The correction as the factors above. A base
                 group size the kernel does not take runs the whole layer through the reference: a bf16 copy of a
                 base would be the dense weight.
  anything else  float32 and float16 activations, CUDA tensors without Triton, empty inputs: the fp32 reference
                 unchanged (fp32 callers such as compression keep fp32 math; these kernels are several times
                 slower than dense for fp32/fp16 activations).

Packing: the first call with a layer's storage builds its pack; later calls reuse it. The cache is keyed weakly
by the stored tensor object (`down`, or the hybrid `base`) and checked against a fingerprint of every stored tensor
(object, data pointer, version counter) and the format fields, so a pack never outlives its tensors and is
rebuilt after an in-place change (load_state_dict copies) or when the module is moved or cast (_apply makes new
tensors, the old pack dies with the old ones). Nothing is registered on the module: state_dict and checkpoints are
untouched. The pack is looked up inside the custom op's real implementation, so torch.compile sees the same opaque
op with the same schema and fake. Memory: the kernels cannot read every stored tensor as it is, so a pack holds
copies: int8 factors, up_t transposed (down is read in place when `in` is a multiple of 16); int4 factors and
bases, the codes again in the kernel's layout; bf16 copies of int4 factors four times their bytes.

The kernels need K (the reduction width) a multiple of 16 (int8: it crashes otherwise) and N a multiple of 16
(int4): packs pad ranks and widths with zero rows/columns; per call, x is zero-padded only when `in` is not a
multiple of 16, and the int8 intermediate h when the rank is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.quant import dequantize
from triton_lowrank.core.reference import lowrank_reference

CPU_DTYPE = torch.bfloat16  # the activation dtype the CPU kernels are fast for
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes aten._weight_int4pack_mm_for_cpu accepts
_ALIGN = 16  # the kernels' K (int8, int4) and N (int4) granularity
HAVE_INT8 = hasattr(torch, "_weight_int8pack_mm")
HAVE_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")

PACK_STATS = {"packs": 0}  # packs built since import: tests check that packing happens once per layer
_PACKS = WeakIdKeyDictionary()  # stored tensor -> (fingerprint, pack)


def _ceil(n: int, to: int = _ALIGN) -> int:
    return -(-n // to) * to


def uses_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether `x` takes the packed CPU kernels (else the reference): bf16 on the CPU with the kernels present."""
    return x.device.type == "cpu" and x.dtype == CPU_DTYPE and HAVE_INT8 and HAVE_INT4 and x.numel() > 0


# ----------------------------------------------------------------------------- the cache


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot be changed outside it)
        return -1


def _fingerprint(tensors, fields) -> list:
    """What identifies a storage's contents without reading them: each tensor's object, address and version
    (in-place writes bump it; a new tensor is a new object), and the format fields."""
    return [None if t is None else (id(t), t.data_ptr(), _version(t)) for t in tensors] + list(fields)


def cached_pack(key: torch.Tensor, tensors, fields, build):
    """The pack of the storage `tensors` (the first is `key`), built by `build()` once per storage."""
    fingerprint = _fingerprint(tensors, fields)
    hit = _PACKS.get(key)
    if hit is not None and hit[0] == fingerprint:
        return hit[1]
    with torch.no_grad():
        pack = build()
    _PACKS[key] = (fingerprint, pack)  # the pack must not reference `key`, or the weak entry never dies
    PACK_STATS["packs"] += 1
    return pack


def clear_packs() -> None:
    """Drop every pack (tests, memory): the next call of each layer packs again."""
    _PACKS.clear()


# ----------------------------------------------------------------------------- packing


def _pad2d(t: torch.Tensor, rows: int, cols: int, value=0) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]), value=value).contiguous()


def int4_kernel_pack(codes: torch.Tensor, scale: torch.Tensor, group_size: int):
    """(packed weight, scales-and-zeros) for aten._weight_int4pack_mm_for_cpu of a [N, K] matrix whose value is
    (codes - 8) * scale per group (scale [N, K / group]; the kernel's zero is 0). N is padded to a multiple of 16
    with code 8 and scale 0 (value 0)."""
    n = _ceil(codes.shape[0])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_pad2d(codes.to(torch.int32), n, codes.shape[1], 8), 1)
    scale = _pad2d(scale.float(), n, scale.shape[1]).t()  # [K / group, N]
    scale_zero = torch.stack([scale, torch.zeros_like(scale)], dim=-1)  # [K / group, N, 2]
    return packed, scale_zero.to(CPU_DTYPE).contiguous()


def nibbles(storage: torch.Tensor) -> torch.Tensor:
    """[rows, cols / 2] int4 storage -> [rows, cols] stored nibbles (q + 8) in [0, 15]."""
    return torch.stack((storage & 0xF, storage >> 4), dim=-1).flatten(-2)


@dataclass
class FactorsPack:
    """What the CPU kernels read for one pair of factors (see the module docstring). `down_kernel` None with
    kind "int8" means the stored `down` is read as it is."""

    kind: str  # "int8", "int4", "float"
    in_pad: int  # x's width as the first kernel reads it (a multiple of 16 for the int kernels)
    down_kernel: torch.Tensor | None  # int8 [r, in_pad] (None: the stored down) / int4 kernel layout / bf16 [r, in]
    down_scale: torch.Tensor | None  # int8: bf16 [r] s_down * s_up; int4 kernel: bf16 [in / g, r_pad, 2]
    up_kernel: torch.Tensor | None  # int8 [out, r_pad] / bf16 [out, h width]
    up_scale: torch.Tensor | None  # int8: bf16 ones [out]
    group_size: int  # int4 kernel group size for down (0 when down is a bf16 copy)


def pack_factors(f: LowRankFactors) -> FactorsPack:
    r, n_in, n_out = f.rank, f.in_features, f.out_features
    if f.bits is None:
        return FactorsPack("float", n_in, None, None, None, None, 0)
    r_pad = _ceil(r)
    if f.bits == 8:
        in_pad = _ceil(n_in)  # the stored down is read as it is unless `in` needs padding (rank rows need none)
        down = None if in_pad == n_in else _pad2d(f.down, r, in_pad)
        scale = (f.down_scale * f.up_t_scale).to(CPU_DTYPE)  # [r]
        up = _pad2d(f.up_t.t(), n_out, r_pad)  # [out, r_pad] codes: h is zero-padded to r_pad per call
        return FactorsPack("int8", in_pad, down, scale, up, torch.ones(n_out, dtype=CPU_DTYPE), 0)
    # int4
    up = dequantize(f.up_t, f.up_t_scale, 4, f.group_size).t()  # [out, r] fp32, once
    if f.group_size in INT4_KERNEL_GROUPS:
        down, scale = int4_kernel_pack(nibbles(f.down), f.down_scale, f.group_size)
        return FactorsPack("int4", n_in, down, scale, _pad2d(up, n_out, r_pad).to(CPU_DTYPE), None, f.group_size)
    down = dequantize(f.down, f.down_scale, 4, f.group_size).to(CPU_DTYPE)  # [r, in]
    return FactorsPack("int4", n_in, down, None, up.to(CPU_DTYPE).contiguous(), None, 0)


def factors_pack(f: LowRankFactors) -> FactorsPack:
    return cached_pack(f.down, (f.down, f.down_scale, f.up_t, f.up_t_scale), ("lowrank", f.bits, f.group_size),
                   lambda: pack_factors(f))


# ----------------------------------------------------------------------------- the matmuls


def factors_matmul(x2d: torch.Tensor, f: LowRankFactors, p: FactorsPack) -> torch.Tensor:
    """[M, in] bf16 -> [M, out] bf16 through the factors (no bias)."""
    if p.kind == "float":
        return F.linear(x2d, f.down) @ f.up_t  # [M, r] -> [M, out]
    if p.in_pad != x2d.shape[1]:
        x2d = F.pad(x2d, (0, p.in_pad - x2d.shape[1]))
    if p.kind == "int8":
        down = f.down if p.down_kernel is None else p.down_kernel
        h = torch._weight_int8pack_mm(x2d, down, p.down_scale)  # [M, r], s_up folded in
        if h.shape[1] != p.up_kernel.shape[1]:
            h = F.pad(h, (0, p.up_kernel.shape[1] - h.shape[1]))  # [M, r_pad]: K of the next kernel
        return torch._weight_int8pack_mm(h, p.up_kernel, p.up_scale)  # [M, out]
    if p.group_size:
        h = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, p.down_kernel, p.group_size, p.down_scale)  # [M, r_pad]
    else:
        h = F.linear(x2d, p.down_kernel)  # [M, r]
    return F.linear(h, p.up_kernel)  # [M, out]


def finish_output(y: torch.Tensor, bias: torch.Tensor | None, lead) -> torch.Tensor:
    if bias is not None:
        y.add_(bias)  # y is the kernels' own fresh output
    return y.view(*lead, y.shape[-1])


def lowrank_cpu(x: torch.Tensor, f: LowRankFactors) -> torch.Tensor:
    """lowrank_reference's answer, through the packed CPU kernels where they apply (module docstring)."""
    if not uses_cpu_kernels(x):
        return lowrank_reference(x, f)
    x2d = x.reshape(-1, f.in_features)
    return finish_output(factors_matmul(x2d.contiguous(), f, factors_pack(f)), f.bias, x.shape[:-1])
