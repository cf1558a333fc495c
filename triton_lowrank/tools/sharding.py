"""Tensor-parallel shards of the stored tensors, for serving engines that split a layer across ranks (vLLM).

A low-rank layer y = (x·Dᵀ)·Uᵀ + b needs no communication beyond dense tensor parallelism's:

- column-parallel (each rank owns some output rows: q/k/v, gate/up, c_attn, c_fc): D is replicated; U (stored
  as up_t [r, out]) and the bias keep the rank's output columns. A merged layer (vLLM's qkv_proj, gate_up_proj,
  or GPT-2's fused c_attn) owns one span per logical sub-matrix, so its shard is several spans gathered.
- row-parallel (each rank owns some input columns: o_proj, down_proj, c_proj): D keeps the rank's input columns,
  U is replicated, and the partial outputs join the all-reduce dense TP already does (the bias is added once).

A hybrid layer's base Q [out, in] shards like a dense weight: rows for column-parallel, input columns for
row-parallel, with every span on group boundaries. Its correction shards like a low-rank layer.

Every function works on one stored tensor (as a loader meets them, one name at a time) and raises ValueError
naming `where` when a span cuts a quantization group or a packed byte, so a checkpoint that cannot be split
this way is refused rather than served wrong. The spans are in logical features (columns of the [r, features]
factors, rows or columns of the [out, in] base).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.formats.hybrid.storage import HybridWeights

Span = tuple[int, int]  # (start, size) in logical features
FACTOR_TENSORS = ("down", "down_scale", "up_t", "up_t_scale")
BASE_TENSORS = ("base", "base_scale", "base_zero")
_PER_BYTE = {4: 2, 2: 4}  # codes per byte of a packed base row (int3 has two planes: see base_columns)


def tp_spans(sizes: Sequence[int], tp_size: int, tp_rank: int, local_sizes: Sequence[int] | None = None,
             shard_ranks: Sequence[int] | None = None) -> list[Span]:
    """The spans rank `tp_rank` owns of an output made of sub-matrices of global `sizes`: part shard_ranks[j]
    (default tp_rank) of width local_sizes[j] (default sizes[j] / tp_size) of each. vLLM's replicated k/v
    heads (tp_size > kv heads) give shard rank tp_rank // replicas."""
    spans, offset = [], 0
    for j, size in enumerate(sizes):
        if local_sizes is None and size % tp_size:
            raise ValueError(f"an output of {size} features does not split into {tp_size} equal shards")
        local = size // tp_size if local_sizes is None else local_sizes[j]
        rank = tp_rank if shard_ranks is None else shard_ranks[j]
        if (rank + 1) * local > size:
            raise ValueError(f"shard {rank} of width {local} lies outside an output of {size} features")
        spans.append((offset + rank * local, local))
        offset += size
    return spans


def _check_span(start: int, size: int, unit: int, where: str, what: str) -> None:
    if start % unit or size % unit:
        raise ValueError(
            f"{where}: the tensor-parallel shard [{start}, {start + size}) cuts {what} of {unit} features; "
            "choose a tensor-parallel size whose shards are multiples of it"
        )


def factor_columns(tensor: torch.Tensor, is_scale: bool, bits: int | None, group_size: int,
                   spans: Sequence[Span], where: str) -> torch.Tensor:
    """The columns `spans` of one stored [r, features] factor (storage or its scale), gathered.

    float and int8 storage slice plainly (an int8 scale is one per rank component: kept whole);
    int4 packs two columns per byte with a scale per group: spans must sit on group boundaries."""
    if bits == 4:
        for start, size in spans:
            _check_span(start, size, group_size, where, "an int4 group")
        unit = group_size if is_scale else 2
    elif is_scale:
        return tensor  # int8: [r], whole rows share a scale
    else:
        unit = 1
    parts = [tensor[:, start // unit : (start + size) // unit] for start, size in spans]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=1)


def base_rows(tensor: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
    """The output rows `spans` of a base tensor (codes, scales or zeros: all [out, ...])."""
    parts = [tensor[start : start + size] for start, size in spans]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)


def base_columns(tensor: torch.Tensor, name: str, bits: int, group_size: int, in_features: int,
                 span: Span, where: str) -> torch.Tensor:
    """The input columns `span` of a base tensor: codes (int4/int2 packed along the input, int3 as two bit
    planes, see quant.py) or the per-group scales and zeros. The span must sit on group boundaries."""
    start, size = span
    _check_span(start, size, group_size, where, "a base group")
    if name != "base":  # base_scale, base_zero: [out, in / group_size]
        return tensor[:, start // group_size : (start + size) // group_size].contiguous()
    if bits in _PER_BYTE:
        per = _PER_BYTE[bits]
        return tensor[:, start // per : (start + size) // per].contiguous()
    if bits != 3:
        raise ValueError(f"{where}: base bits must be 4, 3 or 2, got {bits!r}")
    low, high = tensor[:, : in_features // 4], tensor[:, in_features // 4 :]  # int2 plane, then the high bits
    return torch.cat([low[:, start // 4 : (start + size) // 4], high[:, start // 8 : (start + size) // 8]], dim=1)


def column_shard_tensor(name: str, tensor: torch.Tensor, spec: dict, spans: Sequence[Span], where: str) -> torch.Tensor:
    """One stored tensor of a layer (spec: its checkpoint spec) cut to the output `spans` (column-parallel)."""
    if name in ("down", "down_scale"):
        return tensor
    if name in ("up_t", "up_t_scale"):
        return factor_columns(tensor, name.endswith("_scale"), spec["bits"], spec["group_size"], spans, where)
    if name in BASE_TENSORS or name == "bias":
        return base_rows(tensor, spans)
    raise ValueError(f"{where}: no tensor-parallel rule for tensor {name!r}")


def row_shard_tensor(name: str, tensor: torch.Tensor, spec: dict, span: Span, where: str) -> torch.Tensor:
    """One stored tensor of a layer cut to the input `span` (row-parallel). The bias is kept whole: the
    caller adds it on one rank only."""
    if name in ("down", "down_scale"):
        return factor_columns(tensor, name.endswith("_scale"), spec["bits"], spec["group_size"], [span], where)
    if name in ("up_t", "up_t_scale", "bias"):
        return tensor
    if name in BASE_TENSORS:
        return base_columns(tensor, name, spec["base_bits"], spec["base_group_size"], spec["in_features"], span,
                            where)
    raise ValueError(f"{where}: no tensor-parallel rule for tensor {name!r}")


def column_shard_factors(f: LowRankFactors, spans: Sequence[Span], where: str = "layer") -> LowRankFactors:
    spec = {"bits": f.bits, "group_size": f.group_size}
    up_t = column_shard_tensor("up_t", f.up_t, spec, spans, where)
    scale = None if f.up_t_scale is None else column_shard_tensor("up_t_scale", f.up_t_scale, spec, spans, where)
    bias = None if f.bias is None else base_rows(f.bias, spans)
    return f._replace(up_t=up_t, up_t_scale=scale, bias=bias)


def row_shard_factors(f: LowRankFactors, span: Span, keep_bias: bool, where: str = "layer") -> LowRankFactors:
    spec = {"bits": f.bits, "group_size": f.group_size}
    down = row_shard_tensor("down", f.down, spec, span, where)
    scale = None if f.down_scale is None else row_shard_tensor("down_scale", f.down_scale, spec, span, where)
    return f._replace(down=down, down_scale=scale, bias=f.bias if keep_bias else None)


def _hybrid_spec(w: HybridWeights) -> dict:
    return {"bits": w.correction.bits, "group_size": w.correction.group_size, "base_bits": w.base_bits,
            "base_group_size": w.base_group_size, "in_features": w.in_features}


def column_shard_hybrid(w: HybridWeights, spans: Sequence[Span], where: str = "layer") -> HybridWeights:
    base, scale, zero = (None if t is None else base_rows(t, spans) for t in (w.base, w.base_scale, w.base_zero))
    return w._replace(base=base, base_scale=scale, base_zero=zero,
                      correction=column_shard_factors(w.correction, spans, where),
                      bias=None if w.bias is None else base_rows(w.bias, spans))


def row_shard_hybrid(w: HybridWeights, span: Span, keep_bias: bool, where: str = "layer") -> HybridWeights:
    spec = _hybrid_spec(w)
    base, scale, zero = (None if t is None else row_shard_tensor(n, t, spec, span, where)
                         for n, t in zip(BASE_TENSORS, (w.base, w.base_scale, w.base_zero), strict=True))
    return w._replace(base=base, base_scale=scale, base_zero=zero,
                      correction=row_shard_factors(w.correction, span, False, where),
                      bias=w.bias if keep_bias else None)
