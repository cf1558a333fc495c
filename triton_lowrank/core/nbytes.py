"""Byte counting, in one place. Two kinds of figure, never mixed:

- predicted bytes (before anything is stored: budgets, rank allocation, baselines' byte points), from shapes:
  `matrix_bytes`, `lowrank_bytes`, `base_bytes`, `correction_rank_bytes`, `hybrid_bytes`, `dense_fp16_bytes`;
  biases are never counted (every format keeps the dense bias as it is);
- stored bytes (what IS held): `tensor_bytes`, each storage once (tied weights, views).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from triton_lowrank.core.quant import ZERO_POINT_BITS


def matrix_bytes(rows: int, cols: int, bits: int | None, group_size: int, float_bytes: int = 2) -> int:
    """Bytes a [rows, cols] matrix WILL take when stored, with its scales (`float_bytes` per element
    when unquantized): the prediction used before anything is stored (budgets, RTN baselines)."""
    if bits is None:
        return rows * cols * float_bytes
    if bits == 8:
        return rows * cols + rows * 4
    if bits in ZERO_POINT_BITS:  # codes, float32 scales and uint8 zeros
        return rows * cols * bits // 8 + rows * (cols // group_size) * (4 + 1)
    return rows * cols // 2 + rows * (cols // group_size) * 4


def tensor_bytes(tensors) -> int:
    """Bytes the given tensors hold, each storage counted once (tied weights, views): the one counter
    of what IS stored (module sizes, model sizes, reports)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = id(t) if t.is_meta else (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def lowrank_bytes(
    in_features: int, out_features: int, rank: int, bits: int | None, group_size: int, float_bytes: int = 2
) -> int:
    """Factor and scale bytes a rank-`rank` layer will store (bias excluded): for rank allocation."""
    return matrix_bytes(rank, in_features, bits, group_size, float_bytes) + matrix_bytes(
        rank, out_features, bits, group_size, float_bytes
    )


def base_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bytes of a stored base: codes, float32 scales and (int3/int2) uint8 zeros."""
    return matrix_bytes(out_features, in_features, bits, group_size)


def hybrid_bytes(
    out_features: int,
    in_features: int,
    base_bits: int,
    base_group_size: int,
    rank: int,
    bits: int | None,
    group_size: int,
    float_bytes: int = 2,
) -> int:
    """Predicted bytes of a hybrid weight from its shapes: base + both factors, every scale and zero.

    `float_bytes` is the element size of unquantized factors (bits=None). Bias is not counted.
    """
    correction = rank * correction_rank_bytes(out_features, in_features, bits, group_size, float_bytes)
    return base_bytes(out_features, in_features, base_bits, base_group_size) + correction


def correction_rank_bytes(out_features: int, in_features: int, bits: int | None, group_size: int,
                          float_bytes: int = 2) -> int:
    """Bytes one rank step of the correction adds: a row of each factor with its scales."""
    return matrix_bytes(1, in_features, bits, group_size, float_bytes) + matrix_bytes(
        1, out_features, bits, group_size, float_bytes
    )


def dense_fp16_bytes(weights: Iterable[torch.Tensor]) -> int:
    """The budget's reference: these dense weights stored as fp16 (whatever dtype they have now)."""
    return sum(2 * w.numel() for w in weights)
