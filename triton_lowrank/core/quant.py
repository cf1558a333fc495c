"""Symmetric round-to-nearest quantization of factor matrices, in pure PyTorch.

Both low-rank factors are stored as [rank, features] matrices (see layers.py), so one pair
of functions serves both. Layouts, which the Triton kernels read directly:

- bits=8: int8 values in [-127, 127], one float32 scale per row           -> scale [rows]
- bits=4: values in [-8, 7] stored as (q + 8) nibbles, two per uint8 byte, column 2j in
  the low nibble and 2j+1 in the high nibble; one float32 scale per group of
  `group_size` consecutive columns                                         -> scale [rows, cols // group_size]

The base of a hybrid weight (hybrid_fit.py) may also be stored at 3 or 2 bits, asymmetrically:
value = (q - zero) * scale with codes q in [0, 2^bits - 1], one float32 scale and one uint8 zero
per group of `group_size` consecutive columns                             -> scale, zero [rows, cols // group_size]
- bits=2: four codes per uint8 byte, column 4j+k in bits 2k..2k+1          -> storage [rows, cols // 4]
- bits=3: two bit planes per row, each readable in >= 64-bit loads for tiles of >= 64 columns: the
  low two bits packed as int2 (cols // 4 bytes), then the high bit, column 8j+k in bit k
  (cols // 8 bytes)                                                        -> storage [rows, 3 * cols // 8]

Scales are float32: an fp16 scale underflows for the small rank components that a
singular-value split produces, and the scale bytes are counted in every size report.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (None, 8, 4)  # None is the one spelling of "not quantized" (floats in the layer's dtype)
DEFAULT_GROUP_SIZE = 128  # the group width asked for when the user names none (fitted per layer: fitted_group_size)
NO_GROUPS = 0  # the one spelling of "this storage has no groups" (floats and int8: whole rows share a scale)
QMAX = {8: 127, 4: 7}
QMIN = {8: -127, 4: -8}
_TINY = torch.finfo(torch.float32).tiny


def bits_label(bits: int | None) -> str:
    """How reports and tables name a storage: "float" or "int8" / "int4"."""
    return "float" if bits is None else f"int{bits}"


def storage_group_size(bits: int | None, group_size: int) -> int:
    """The group size a storage really uses: `group_size` for int4, NO_GROUPS otherwise."""
    return group_size if bits == 4 else NO_GROUPS


def check_bits(bits: int | None, group_size: int, features: int, where: str) -> None:
    """Raise a ValueError naming `where` if (bits, group_size) cannot store `features` columns."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: bits must be one of None, 8 or 4, got {bits!r}")
    if bits == 4:
        if group_size <= 0 or group_size % 2:
            raise ValueError(f"{where}: int4 group_size must be a positive even number, got {group_size}")
        if features % group_size:
            raise ValueError(
                f"{where}: int4 group_size {group_size} does not divide the factor width {features}"
            )


def quantization_scale(w: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """float32 scales that map a [rows, cols] matrix's absolute maxima onto the top level."""
    rows, cols = w.shape
    if bits == 8:
        return (w.float().abs().amax(dim=1) / QMAX[8]).clamp_min(_TINY)  # [rows]
    if bits == 4:
        check_bits(4, group_size, cols, "quantize")
        groups = w.float().view(rows, cols // group_size, group_size)  # [rows, G, g]
        return (groups.abs().amax(dim=2) / QMAX[4]).clamp_min(_TINY)  # [rows, G]
    raise ValueError(f"quantize: bits must be 8 or 4, got {bits!r}")


def round_to_levels(values: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels (as floats) nearest to values / scale, clamped to the bit width's range."""
    return torch.round(values / scale).clamp_(QMIN[bits], QMAX[bits])


def quantize_with_scale(
    w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int = 128
) -> torch.Tensor:
    """Storage of a [rows, cols] matrix on the given scales (from quantization_scale or GPTQ)."""
    rows, cols = w.shape
    w = w.float()
    if bits == 8:
        return round_to_levels(w, scale[:, None], 8).to(torch.int8)  # [rows, cols]
    groups = w.view(rows, cols // group_size, group_size)  # [rows, G, g]
    q = round_to_levels(groups, scale[:, :, None], 4).view(rows, cols)
    nibbles = (q + 8).to(torch.uint8)  # [rows, cols] in [0, 15]
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()  # [rows, cols // 2]


def quantize(w: torch.Tensor, bits: int, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Round a [rows, cols] float matrix to nearest; returns (storage, float32 scales)."""
    scale = quantization_scale(w, bits, group_size)
    return quantize_with_scale(w, scale, bits, group_size), scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols // 2] uint8 -> [rows, cols] int8 values in [-8, 7]."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize(
    storage: torch.Tensor, scale: torch.Tensor | None, bits: int | None, group_size: int = 128
) -> torch.Tensor:
    """Inverse of `quantize` (or a plain upcast for bits=None); returns float32 [rows, cols]."""
    if bits is None:
        return storage.float()
    if bits == 8:
        return storage.float() * scale.float()[:, None]
    if bits == 4:
        q = unpack_int4(storage).float()  # [rows, cols]
        rows, cols = q.shape
        groups = q.view(rows, cols // group_size, group_size) * scale.float()[:, :, None]
        return groups.view(rows, cols)
    raise ValueError(f"dequantize: bits must be None, 8 or 4, got {bits!r}")


def storage_shapes(
    rows: int, cols: int, bits: int | None, group_size: int
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Shapes of (storage, scale) for a [rows, cols] factor: used to build empty skeletons."""
    if bits is None:
        return (rows, cols), None
    if bits == 8:
        return (rows, cols), (rows,)
    return (rows, cols // 2), (rows, cols // group_size)


# ----------------------------------------------------------------------------- int3 / int2 (hybrid base)

# Asymmetric with an integer zero point, chosen by measurement on the embedded GPT-2 (RTN, g64, KL vs
# dense without / with a rank-16 whitened int8 correction): int2 zero point 0.0287 / 0.0070 at 2.625
# bits per weight, against the symmetric grid {-1.5, -0.5, 0.5, 1.5}*s 0.0486 / 0.0101 at 2.5 and
# 0.0381 / 0.0077 at 3.0 (g32), and {-2, -1, 0, 1}*s 0.226 / 0.036. int3 zero point 0.0052 / 0.0013
# at 3.125 bits beat the half grid at 3.5 (0.0059 / 0.0018).
ZERO_POINT_BITS = (3, 2)
BASE_BITS = (4, 3, 2)  # bit widths of a hybrid base: int4 is the symmetric storage above


def check_base_bits(bits: int, group_size: int, features: int, where: str) -> None:
    """Raise a ValueError naming `where` if a base of `bits` cannot store `features` columns in groups."""
    if bits not in BASE_BITS:
        raise ValueError(f"{where}: base bits must be one of 4, 3 or 2, got {bits!r}")
    if bits == 4:
        check_bits(4, group_size, features, where)
    elif group_size <= 0 or group_size % 8 or features % group_size:
        raise ValueError(
            f"{where}: int{bits} group_size must be a positive multiple of 8 dividing {features}, got {group_size}"
        )


def fitted_group_size(bits: int, widths: tuple[int, ...], where: str, base: bool = False,
                      wanted: int = DEFAULT_GROUP_SIZE) -> int:
    """The largest group width <= `wanted` that the storage allows on every one of `widths`: it divides each,
    and is even for int4 (two codes per byte), a multiple of 8 for an int3/int2 base (whole bytes of both
    bit planes). Used where the user named no group size (576 wide: 96; 80: 80; 48 and 80 together: 16)."""
    step = 8 if base and bits in ZERO_POINT_BITS else 2
    for group in range(min(wanted, *widths) // step * step, 0, -step):
        if all(w % group == 0 for w in widths):
            return group
    raise ValueError(f"{where}: no int{bits} group width <= {wanted} (a multiple of {step}) divides "
                     f"{' and '.join(map(str, widths))}; exclude this layer")


def zero_point_params(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scale, integer-valued float32 zero), each [...], of groups [..., g]: min..max onto 0..2^bits-1.

    The range always contains 0 (as in the GPTQ reference), so the zero fits its uint8 in [0, 2^bits - 1].
    """
    top = 2**bits - 1
    low = groups.float().amin(dim=-1).clamp(max=0)
    high = groups.float().amax(dim=-1).clamp(min=0)
    scale = ((high - low) / top).clamp_min(_TINY)
    return scale, torch.round(-low / scale).clamp_(0, top)


def round_to_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (as floats) in [0, 2^bits - 1] nearest to values / scale + zero."""
    return torch.round(values / scale + zero).clamp_(0, 2**bits - 1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] codes in [0, 2^bits - 1] -> uint8 storage (layouts in the module docstring)."""
    q = codes.to(torch.uint8)
    if bits == 2:
        return (q[:, 0::4] | (q[:, 1::4] << 2) | (q[:, 2::4] << 4) | (q[:, 3::4] << 6)).contiguous()
    high = q >> 2
    planes = [pack_codes(q & 3, 2)] + [sum(high[:, k::8] << k for k in range(8)).to(torch.uint8)]
    return torch.cat(planes, dim=1)  # [rows, cols // 4 + cols // 8]


def unpack_codes(storage: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 storage -> [rows, cols] uint8 codes."""
    if bits == 2:
        return torch.stack([(storage >> (2 * k)) & 3 for k in range(4)], dim=-1).flatten(-2)
    cols = storage.shape[1] * 8 // 3
    low = unpack_codes(storage[:, : cols // 4], 2)
    high = torch.stack([(storage[:, cols // 4 :] >> k) & 1 for k in range(8)], dim=-1).flatten(-2)
    return low | (high << 2)


def quantize_zero_point_with_params(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Storage of a [rows, cols] matrix on the given [rows, G] scales and zeros (from RTN or GPTQ)."""
    rows, cols = w.shape
    groups = w.float().view(rows, cols // group_size, group_size)  # [rows, G, g]
    return pack_codes(round_to_codes(groups, scale[:, :, None], zero[:, :, None], bits).view(rows, cols), bits)


def quantize_zero_point(
    w: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round a [rows, cols] matrix to nearest on an int3/int2 zero-point grid: (storage, scale, uint8 zero)."""
    rows, cols = w.shape
    check_base_bits(bits, group_size, cols, "quantize_zero_point")
    if bits not in ZERO_POINT_BITS:
        raise ValueError(f"quantize_zero_point: bits must be 3 or 2, got {bits!r}")
    scale, zero = zero_point_params(w.view(rows, cols // group_size, group_size), bits)  # [rows, G] each
    return quantize_zero_point_with_params(w, scale, zero, bits, group_size), scale, zero.to(torch.uint8)


def dequantize_zero_point(
    storage: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Inverse of quantize_zero_point; returns float32 [rows, cols]."""
    q = unpack_codes(storage, bits).float()  # [rows, cols]
    rows, cols = q.shape
    groups = q.view(rows, cols // group_size, group_size) - zero.float()[:, :, None]
    return (groups * scale.float()[:, :, None]).view(rows, cols)


