"""Tile configurations for the low-rank kernels: the dataclass, the default heuristic, and the
candidate sets the autotuner searches (pruned by problem size and shared memory).

Pure Python (no Triton import) so the autotuner and tests can reason about configs anywhere.

Two execution paths (see kernels/lowrank_matmul.py):
- "fused": one launch. Each program owns a block of rank components, computes its slice of the
  rank-r intermediate on chip and scatters its contribution to y with fp32 atomics; the last
  program to finish an output slice adds the bias and writes y. Wins at decode M, where the
  job is to stream the factor bytes exactly once.
- "split": two launches. shrink writes hidden[M, r] fp32, expand reads it back. Plain tiled
  GEMMs on tensor cores, no atomics: wins at prefill M, where the work is compute-bound.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

# Launcher rule without a tuned entry: fused for M <= FUSED_MAX_M, two-launch above.
# The fused path's atomic traffic grows with M (r_blocks * M * N fp32 adds) while the factor bytes
# do not, so it only pays at decode sizes. Set from bench/kernel_bench.py measurements.
FUSED_MAX_M = 16

# Hardware numbers used when no GPU can be queried (H100 SXM: 132 SMs, 227 KiB opt-in smem).
DEFAULT_NUM_SMS = 132
DEFAULT_SMEM_BYTES = 232448


@dataclass(frozen=True)
class Problem:
    """One low-rank matmul shape: x [m, k] -> y [m, n] through rank `rank`."""

    m: int
    n: int
    k: int
    rank: int
    bits: int | None
    group_size: int
    x_bytes: int = 2  # bytes per activation element (fp16/bf16: 2, fp32: 4)

    @property
    def factor_elem_bytes(self) -> float:
        return {None: float(self.x_bytes), 8: 1.0, 4: 0.5}[self.bits]


@dataclass(frozen=True)
class TileConfig:
    """Block sizes for one launch plan. Fields unused by a path are ignored by it."""

    path: str  # "fused" | "split"
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    split_k: int = 1  # fused: programs sharing one rank block along `in` (re-read up_t)
    split_n: int = 1  # fused: programs sharing one rank block along `out` (re-read down)
    # split path only: round hidden to the activation dtype right before the expand MMA
    # (fp16/bf16 tensor cores, same numerics as the unfused PyTorch baseline). Otherwise the
    # fp32 hidden meets the up factor in a tf32 MMA: for fp16 activations that is the same
    # 11-bit significand, but with fp32 range, at half the tensor-core rate.
    expand_lowp: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.path not in ("fused", "split"):
            raise ValueError(f"TileConfig.path must be 'fused' or 'split', got {self.path!r}")
        for name in ("block_m", "block_n", "block_k", "block_r"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two, got {value}")

    @property
    def uses_dot(self) -> bool:
        """Fused path: tl.dot needs every tile dim >= 16; smaller M uses broadcast-and-sum."""
        return self.path == "split" or self.block_m >= 16

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TileConfig:
        return cls(**data)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def m_bucket(m: int) -> int:
    """Autotune M bucket: next power of two, capped (prefill beyond 8192 behaves like 8192)."""
    return min(next_pow2(max(1, m)), 8192)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _int4_block(features: int, group_size: int, wanted: int) -> int:
    """Largest power of two <= wanted dividing group_size (one scale per row per tile).

    Falls back to `wanted` (per-element scale gather in the kernel) for odd group sizes.
    """
    block = wanted
    while block > 16 and group_size % block:
        block //= 2
    return block if group_size % block == 0 else wanted


def _fused_splits(p: Problem, block_r: int, num_sms: int) -> tuple[int, int]:
    """Splits that give about one wave of programs, on the larger factor's feature axis.

    Splitting `out` makes each of the split programs re-read its down rows (and vice versa),
    so the redundant reads fall on the smaller factor and mostly hit L2.
    """
    r_blocks = _cdiv(p.rank, block_r)
    split = max(1, min(num_sms // r_blocks, 32))
    if p.n >= p.k:
        return 1, max(1, min(split, _cdiv(p.n, 64)))
    return max(1, min(split, _cdiv(p.k, 64))), 1


def default_config(
    p: Problem, num_sms: int = DEFAULT_NUM_SMS, interpret: bool = False, fused_max_m: int = FUSED_MAX_M
) -> TileConfig:
    """The no-benchmark heuristic (CI, the interpreter, and any untuned shape)."""
    if interpret:  # small tiles keep the numpy interpreter fast; >= 16 where tl.dot needs it
        if p.m <= fused_max_m:
            block_m = 16 if p.m > 4 else next_pow2(p.m)
            return TileConfig("fused", block_m, 32, 32, 16, split_n=2 if p.n > 32 else 1)
        return TileConfig("split", 16, 32, 32, 16)
    if p.m <= fused_max_m:
        # Byte budget: atomics add r_blocks * M * N * 4 bytes; keep them <= ~1/8 of the factor
        # bytes r * (K + N) * b  =>  block_r >= 32 * M * N / ((K + N) * b).
        need = 32 * p.m * p.n / ((p.k + p.n) * p.factor_elem_bytes)
        block_r = min(max(16, next_pow2(int(need))), 128, max(16, next_pow2(p.rank)))
        split_k, split_n = _fused_splits(p, block_r, num_sms)
        block_m = next_pow2(p.m) if p.m <= 4 else 16
        # broadcast path holds a [block_m, block_r, block] fp32 product: keep it ~8K elements
        block = max(32, min(256, 8192 // (block_m * block_r))) if block_m < 16 else 64
        block_k = _int4_block(p.k, p.group_size, block) if p.bits == 4 else block
        block_n = _int4_block(p.n, p.group_size, block) if p.bits == 4 else block
        return TileConfig("fused", block_m, block_n, block_k, block_r, split_k, split_n, num_warps=4)
    large = p.m >= 256
    block_m = 128 if large else 64
    block_n = 128 if large else 64
    block_k = _int4_block(p.k, p.group_size, 64) if p.bits == 4 else 64
    block_n = _int4_block(p.n, p.group_size, block_n) if p.bits == 4 else block_n
    block_r = 64 if p.rank >= 64 else max(16, next_pow2(p.rank))
    return TileConfig(
        "split", block_m, block_n, block_k, block_r, expand_lowp=large,
        num_warps=8 if large else 4, num_stages=3,
    )


def smem_bytes(c: TileConfig, p: Problem) -> int:
    """Upper estimate of the pipelined shared-memory footprint of the biggest kernel in `c`."""
    wb = max(1.0, p.factor_elem_bytes)  # loaded factor tiles are widened before the dot
    if c.path == "fused":
        shrink = c.block_m * c.block_k * p.x_bytes + c.block_r * c.block_k * wb
        expand = c.block_r * c.block_n * wb
        return int(c.num_stages * max(shrink, expand))
    shrink = c.block_m * c.block_k * p.x_bytes + c.block_r * c.block_k * wb
    expand = c.block_m * c.block_r * 4 + c.block_r * c.block_n * wb
    return int(c.num_stages * max(shrink, expand))


def _fits(c: TileConfig, p: Problem, smem_limit: int) -> bool:
    """Prune tiles that are mostly padding for this problem, or overflow shared memory."""
    floor = 16 if c.uses_dot else 1
    if c.block_m > max(floor, next_pow2(p.m)):
        return False
    if c.block_r > max(16, next_pow2(p.rank)) or c.block_n > max(16, next_pow2(p.n)):
        return False
    if c.block_k > max(16, next_pow2(p.k)):
        return False
    if c.uses_dot and min(c.block_m, c.block_n, c.block_k, c.block_r) < 16:
        return False
    if c.path == "fused":
        if not c.uses_dot and c.block_m * c.block_r * max(c.block_k, c.block_n) > 16384:
            return False  # broadcast product would spill registers
        if c.split_n > _cdiv(p.n, c.block_n) or c.split_k > _cdiv(p.k, c.block_k):
            return False
    return smem_bytes(c, p) <= smem_limit


def candidate_configs(
    p: Problem,
    mode: str,
    num_sms: int = DEFAULT_NUM_SMS,
    smem_limit: int = DEFAULT_SMEM_BYTES,
    fused_max_m: int = FUSED_MAX_M,
) -> list[TileConfig]:
    """Deterministically ordered, deduplicated candidates for `mode` ("default", "fast", "max").

    The default config is always first, so ties resolve to the heuristic.
    """
    first = default_config(p, num_sms, fused_max_m=fused_max_m)
    if mode == "default":
        return [first]
    wide = mode == "max"
    out: list[TileConfig] = [first]
    # fused only competes at decode-ish M (its atomics scale with M); 4x the threshold lets
    # tuning move the crossover from data.
    if p.m <= 4 * fused_max_m:
        block_ms = [next_pow2(p.m)] if p.m <= 4 else [16]
        if wide and p.m <= 4:
            block_ms.append(16)
        for block_m, block_r in itertools.product(block_ms, (16, 32, 64) if wide else (16, 32)):
            for block in (64, 128, 256) if wide else (64, 128):
                bk = _int4_block(p.k, p.group_size, block) if p.bits == 4 else block
                bn = _int4_block(p.n, p.group_size, block) if p.bits == 4 else block
                split_k, split_n = _fused_splits(p, block_r, num_sms)
                splits = {(split_k, split_n), (max(1, split_k // 2), max(1, split_n // 2))}
                if wide:
                    splits.add((split_k * 2, split_n * 2))
                for (sk, sn), warps in itertools.product(sorted(splits), (4, 8) if wide else (4,)):
                    out.append(TileConfig("fused", block_m, bn, bk, block_r, sk, sn, num_warps=warps))
    tiles = [(64, 64, 64), (128, 128, 64)] + ([(64, 128, 32), (128, 64, 128), (128, 256, 64)] if wide else [])
    if p.m <= 32:  # decode-sized M: 16-row MMA tiles instead of mostly-masked 64-row ones
        tiles = [(16, 64, 64), (16, 128, 32)] + tiles
    for (bm, bn, br), stages in itertools.product(tiles, (3, 4) if wide else (3,)):
        bk = _int4_block(p.k, p.group_size, 64) if p.bits == 4 else 64
        bn = _int4_block(p.n, p.group_size, bn) if p.bits == 4 else bn
        for lowp in (True, False) if wide else (p.m >= 256,):
            warps = 8 if bm * bn >= 128 * 128 else 4
            out.append(TileConfig("split", bm, bn, bk, br, expand_lowp=lowp, num_warps=warps, num_stages=stages))
    kept: list[TileConfig] = []
    for c in out:
        if c not in kept and (c is first or _fits(c, p, smem_limit)):
            kept.append(c)
    return kept
