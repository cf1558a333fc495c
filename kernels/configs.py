"""Tile configurations for the low-rank kernels: the dataclass, the default heuristic, and the
candidate sets the autotuner searches (pruned by problem size and shared memory).

Pure Python (no Triton import) so the autotuner and tests can reason about configs anywhere.

Two execution paths (see kernels/lowrank_matmul.py):
- "decode": two launches for decode M. Phase 1 (grid: rank blocks x K splits) streams `down` once and
  adds the rank-r intermediate into an fp32 workspace with atomics; phase 2 (grid: output column
  blocks) streams `up_t` once against it and writes y. block_m == 1 runs on CUDA cores (one program
  per activation row), block_m == 16 on tensor cores. Fields: block_r, block_k and split_k shape
  phase 1; block_n and expand_block_r (rows per iteration) shape phase 2.
  With one_launch (small layers, M = 1): one kernel, every program computing all of hidden from `down` itself.
- "split": two launches for prefill M. shrink writes hidden[M, r] fp32, expand reads it back. Plain
  tiled GEMMs on tensor cores, no atomics.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

# Launcher rule without a tuned entry: the decode path for M <= FUSED_MAX_M, the split path above.
# PROVISIONAL: not yet backed by a GPU measurement (no GPU was lent while issue 9 was done). The
# decode path's instruction work grows with M on CUDA cores and its phase 1 atomics grow with M,
# while the split path tiles M by 16..128 rows; bench/kernel_bench.py times both at M = 1, 16, 64.
FUSED_MAX_M = 16
# Decode path on CUDA cores (block_m = 1) for M up to this; tensor cores above. PROVISIONAL as well.
CUDA_CORE_MAX_M = 1

# Hardware numbers used when no GPU can be queried (H100 SXM: 132 SMs, 227 KiB opt-in smem).
# Committed autotune winners per GPU, beside the code (as vLLM and gemlite ship theirs): kernels/tuned/<gpu-slug>.json
# = {"gpu": name, "triton": version, "entries": {autotune key: {"config": TileConfig fields, "ms": ...}}}.
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
DEFAULT_NUM_SMS = 132
DEFAULT_SMEM_BYTES = 232448
WAVE_CTAS = 2  # decode grids aim at this many CTAs per SM: one hides the other's load latency
# Decode on CUDA cores, whole-K plans (the M = 1 default where K allows): a phase 1 whose CTAs each cover all of K in
# one tile of at most this many warps (8 rows per thread, every thread along K) stores hidden with plain stores into a
# buffer of its own: no atomics, and phase 2 has no workspace to re-zero (no ticket). 8 warps (4096 int8 or 8192 int4
# columns): 128 registers x 256 threads, half an SM's registers, so phase 2's CTAs fit beside it and its pre-wait loads
# overlap (bench/sass/model.py fits_beside).
WHOLE_K_MAX_WARPS = 8


@dataclass(frozen=True)
class Problem:
    """One low-rank matmul shape: x [m, k] -> y [m, n] through rank `rank`; with base_bits, the hybrid format's
    (a base of base_bits in groups of base_group_size columns, and the rank-`rank` correction)."""

    m: int
    n: int
    k: int
    rank: int
    bits: int | None
    group_size: int
    x_bytes: int = 2  # bytes per activation element (fp16/bf16: 2, fp32: 4)
    base_bits: int | None = None  # None: the pure low-rank format
    base_group_size: int = 0
    format: str = "lowrank"  # the registered weight format whose kernels run it (core/format.py)

    @property
    def factor_elem_bytes(self) -> float:
        return {None: float(self.x_bytes), 8: 1.0, 4: 0.5}[self.bits]


@dataclass(frozen=True)
class TileConfig:
    """Block sizes for one launch plan. Fields unused by a path are ignored by it."""

    path: str  # "decode" | "split"
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    split_k: int = 1  # decode: phase-1 programs sharing one rank block along `in`
    split_n: int = 1  # unused (kept so cached entries keep one layout)
    # split path only: round hidden to the activation dtype right before the expand MMA
    # (fp16/bf16 tensor cores, same numerics as the unfused PyTorch baseline). Otherwise the
    # fp32 hidden meets the up factor in a tf32 MMA: for fp16 activations that is the same
    # 11-bit significand, but with fp32 range, at half the tensor-core rate.
    expand_lowp: bool = False
    num_warps: int = 4
    num_stages: int = 2
    expand_block_r: int = 0  # decode: phase-2 rank rows per loop iteration (0: block_r)
    shrink_warps: int = 0  # decode: phase-1 warps per CTA (0: num_warps)
    base_block_k: int = 0  # hybrid on CUDA cores: the base's K tile (0: block_k, which phase 1 uses)
    # decode on CUDA cores, low rank: one launch (decode_one_launch_kernel) where every program computes all of hidden
    # itself; block_r is then the rank padded to a power of two, block_k phase 1's K tile
    one_launch: bool = False
    # decode on CUDA cores, two launches: up_t row blocks phase 2 loads before its dependent-launch wait (1 or 2; 0:
    # default_blocks_before_wait)
    expand_blocks_before_wait: int = 0

    def __post_init__(self) -> None:
        if self.path not in ("decode", "split"):
            raise ValueError(f"TileConfig.path must be 'decode' or 'split', got {self.path!r}")
        for name in ("block_m", "block_n", "block_k", "block_r"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two, got {value}")
        for name in ("expand_block_r", "base_block_k"):
            value = getattr(self, name)
            if value < 0 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be 0 or a power of two, got {value}")
        if self.expand_blocks_before_wait not in (0, 1, 2):
            raise ValueError(f"TileConfig.expand_blocks_before_wait must be 0, 1 or 2, got "
                             f"{self.expand_blocks_before_wait}")

    @property
    def uses_dot(self) -> bool:
        """tl.dot needs every tile dim >= 16; the decode path at block_m < 16 runs on CUDA cores."""
        return self.path == "split" or self.block_m >= 16

    @property
    def rows_per_expand_step(self) -> int:
        return self.expand_block_r or self.block_r

    @property
    def phase1_warps(self) -> int:
        return self.shrink_warps or self.num_warps

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


def lanes(bits: int | None) -> int:
    """Columns per 32-bit word on the CUDA-core decode path (float factors: one element per slot)."""
    return {8: 4, 4: 8, None: 1}[bits]


def decode_chunk(bits: int | None) -> int:
    """Columns of one thread's chunk of a factor row on the CUDA-core decode path: 4 words, one 128-bit load."""
    return 4 * lanes(bits)


def default_blocks_before_wait(bits: int | None) -> int:
    """Row blocks of up_t that phase 2 (CUDA cores) loads before its dependent-launch wait, unless the config says
    (TileConfig.expand_blocks_before_wait). Two for int8 and float factors, whose phase 2 is HBM-bound: the second
    block keeps HBM busy across the hand-off. One for int4, whose phase 2 is issue-bound: the second block's registers
    cost it instructions. PROVISIONAL: static sm_90 ESTIMATES (bench/results/sass/README.md); the tuner tries both."""
    return 1 if bits == 4 else 2


def other_blocks_before_wait(bits: int | None) -> int:
    """The depth default_blocks_before_wait does not pick: the tuner and bench/kernel_bench.py time it beside it."""
    return 3 - default_blocks_before_wait(bits)


def decode_supported(p: Problem) -> bool:
    """The decode kernels read 16-byte row chunks: every factor row must be a multiple of 16 bytes,
    and int4 groups whole 32-column chunks. Other shapes take the split path."""
    for features in (p.k, p.n):
        if (features * p.factor_elem_bytes) % 16:
            return False
    return p.bits != 4 or p.group_size % 32 == 0


def _realized_split(k: int, block_k: int, split_k: int) -> int:
    """K splits the launcher really makes of `split_k` (each split a whole number of tiles)."""
    k_per_split = _cdiv(_cdiv(k, split_k), block_k) * block_k
    return _cdiv(k, k_per_split)


def _whole_k_phase1(p: Problem) -> tuple[int, int, int] | None:
    """(warps, block_k, block_r) of a CUDA-core phase 1 without a K split: 8 rows per thread (8 128-bit loads in
    flight), every thread of the CTA along K, the fewest warps whose tile covers all of K; its CTAs (one per 8 ranks)
    each read their whole share in one round trip and store hidden (no atomics). None past WHOLE_K_MAX_WARPS."""
    chunk, warps = decode_chunk(p.bits), 1
    while warps <= WHOLE_K_MAX_WARPS:
        if 32 * warps * chunk >= p.k:
            return warps, 32 * warps * chunk, 8
        warps *= 2
    return None


def decode_cuda_core_config(p: Problem, num_sms: int, num_warps: int = 4, rows_per_thread: int = 8,
                            row_chunks: int = 2, whole_k: bool = False) -> TileConfig:
    """The CUDA-core decode plan (block_m = 1), sized from what bench/sass_report.py shows.

    Phase 1 with `whole_k` where K allows (_whole_k_phase1; the default: two_launch_default_config): no K split,
    hidden stored with plain stores, no atomics and no ticket, so the output is the same bits on every call.
    Otherwise (the atomic plan): a thread holds 16-byte chunks of `rows_per_thread` rows; 8 threads along K make a
    128-byte (one cache line) row tile (4 in 1-warp CTAs). The x values a thread loads are shared by its rows, so
    their cost per weight is 1 / rows_per_thread: keep 8 rows per thread and shrink the CTA (4, 2, 1 warps), then
    the rows (not below 4), until the grid has WAVE_CTAS CTAs per SM (two resident CTAs hide each other's load
    latency); a phase too small for that gets fewer CTAs.
    Phase 2: one thread per row and per 16-byte chunk of columns, `row_chunks` chunks per CTA row (2: 32 bytes,
    whole sectors; 1 doubles the grid but leaves each warp half of every sector, for a neighbouring CTA to read);
    each block of rows is up to 4 sub-tiles (one 128-bit load per thread each), loaded a block ahead of its use
    (bench/sass_report.py: 4 or 8 weight loads in flight at a first use, from 4 warps).
    """
    chunk = decode_chunk(p.bits)
    target = WAVE_CTAS * num_sms
    # never below 4 rows per thread: below that the x loads cost more than the grid gains (the report shows it)
    choices = [(w, rows_per_thread) for w in (4, 2, 1)] + [(1, 4)] * (rows_per_thread > 4)
    for shrink_warps, rt in choices:
        # threads along K: 8 (a 128-byte row tile); 4 in a 1-warp CTA, where 8 x 4 x values would be exactly one
        # per thread and Triton would load them in that layout and move them through shared memory (BAR)
        t_k = 8 if shrink_warps > 1 else 4
        block_k = chunk * t_k
        k_tiles = _cdiv(p.k, block_k)
        block_r = 32 * shrink_warps // t_k * rt
        if _cdiv(p.rank, block_r) * k_tiles >= target:
            break
    r_blocks = _cdiv(p.rank, block_r)
    split_k = max(1, min(k_tiles, _cdiv(target, r_blocks)))
    while split_k < k_tiles and r_blocks * _realized_split(p.k, block_k, split_k) < target:
        split_k += 1
    if whole_k and (phase1 := _whole_k_phase1(p)):
        (shrink_warps, block_k, block_r), split_k = phase1, 1
    # two threads per row chunk pair: a warp reads 16 rows x 32 bytes, whole sectors (one thread per 16-byte chunk
    # would read half of each 32-byte sector)
    block_n = row_chunks * chunk
    sub_r = 32 * num_warps // row_chunks
    units = 4 if p.rank >= 4 * sub_r else 2 if p.rank >= 2 * sub_r else 1
    return TileConfig("decode", 1, block_n, block_k, block_r, split_k, num_warps=num_warps,
                      expand_block_r=sub_r * units, shrink_warps=shrink_warps)


def two_launch_default_config(p: Problem, num_sms: int) -> TileConfig:
    """The default two-launch CUDA-core decode plan: phase 1 without a K split where K allows (no atomics, so the
    output is the same bits on every call: bench/results/sass/README.md, "Phase 1 without a K split"); past
    WHOLE_K_MAX_WARPS, the atomic K split. The tuner tries the atomic plan too."""
    return decode_cuda_core_config(p, num_sms, whole_k=True)


# The one-launch path (decode_one_launch_kernel) for small layers: every program re-reads all of `down` (from L2 after
# the first) and keeps hidden in registers. PROVISIONAL: from the static sm_90 ESTIMATES (bench/results/sass/README.md,
# "One launch for small layers"); the autotuner times both paths, so a GPU run corrects the rule per shape.
ONE_LAUNCH_MAX_RANK = 256  # hidden and the up_t slice in registers: [rank, block_n] per program
ONE_LAUNCH_MAX_DOWN_BYTES = 32 * 1024  # `down` re-read by every program: its bytes bound each program's phase 1
# The default takes one launch only up to here, by factor bits: past it the whole-K two-launch plan estimates faster
# under CUDA graphs (int4: issue-bound past ~8 KB; float factors: block_n is 8 columns, so many programs re-read
# `down`); eagerly one launch stays faster (one host launch against two)
ONE_LAUNCH_DEFAULT_MAX_DOWN_BYTES = {8: 20 * 1024, 4: 8 * 1024, None: 12 * 1024}


def _down_bytes(p: Problem) -> float:
    """Bytes of `down` (its codes), which every one-launch program re-reads."""
    return p.rank * p.k * p.factor_elem_bytes


def one_launch_supported(p: Problem) -> bool:
    """Small enough for decode_one_launch_kernel: a decode-path problem whose `down` fits the size rule."""
    return (decode_supported(p) and next_pow2(p.rank) <= ONE_LAUNCH_MAX_RANK
            and _down_bytes(p) <= ONE_LAUNCH_MAX_DOWN_BYTES)


def one_launch_is_default(p: Problem) -> bool:
    """The default M = 1 plan is one launch: a `down` of at most ONE_LAUNCH_DEFAULT_MAX_DOWN_BYTES for its bits (and
    one_launch_supported)."""
    return one_launch_supported(p) and _down_bytes(p) <= ONE_LAUNCH_DEFAULT_MAX_DOWN_BYTES[p.bits]


def one_launch_config(p: Problem, num_warps: int = 4, row_chunks: int = 2) -> TileConfig:
    """decode_one_launch_kernel's plan: phase 1 reads [rank, block_k] tiles of `down`, 8 128-bit loads per thread
    (block_k = 8 x 32 x num_warps 16-byte chunks / padded rank, at most the padded K); phase 2, `row_chunks` 16-byte
    chunks per row per program (2: whole 32-byte sectors), all rows at once."""
    chunk = decode_chunk(p.bits)
    r_pad = next_pow2(p.rank)
    block_k = min(max(1, 8 * 32 * num_warps // r_pad), max(1, next_pow2(p.k) // chunk)) * chunk
    return TileConfig("decode", 1, row_chunks * chunk, block_k, r_pad, num_warps=num_warps, one_launch=True)


def lowrank_default_config(
    p: Problem, num_sms: int = DEFAULT_NUM_SMS, interpret: bool = False, fused_max_m: int = FUSED_MAX_M
) -> TileConfig:
    """The no-benchmark heuristic for the pure low-rank format."""
    decode = p.m <= fused_max_m and decode_supported(p)
    if interpret:  # small tiles keep the numpy interpreter fast; >= 16 where tl.dot needs it
        if decode:
            chunk = decode_chunk(p.bits)
            if p.m <= CUDA_CORE_MAX_M:
                return TileConfig("decode", 1, 2 * chunk, 2 * chunk, 16, split_k=2, expand_block_r=32)
            return TileConfig("decode", 16, 32, 32, 16, split_k=2)
        return TileConfig("split", 16, 32, 32, 16)
    if decode and p.m <= CUDA_CORE_MAX_M:
        return one_launch_config(p) if one_launch_is_default(p) else two_launch_default_config(p, num_sms)
    if decode:
        block_k = _int4_block(p.k, p.group_size, 64) if p.bits == 4 else 64
        block_n = _int4_block(p.n, p.group_size, 64) if p.bits == 4 else 64
        block_r = 32
        split_k = max(1, min(_cdiv(p.k, block_k), _cdiv(WAVE_CTAS * num_sms, _cdiv(p.rank, block_r))))
        return TileConfig("decode", 16, block_n, block_k, block_r, split_k, expand_block_r=64, num_stages=3)
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


# ---- the hybrid format (kernels/hybrid_matmul.py): phase 1 as above, then one base-plus-correction kernel ----
# Paths as for low rank: "decode" (phase 1 decode_shrink_kernel; block_m 1: per-split partial sums, then
# hybrid_gemv_kernel; block_m 16: into the workspace, then hybrid_tile_kernel) and "split" (shrink_kernel, then
# hybrid_tile_kernel). Fields: block_r, block_k and split_k (and shrink_warps) shape phase 1; block_n, block_k (CUDA
# cores: base_block_k), num_warps the base; expand_block_r the epilogue's rows.


def gemv_chunk(base_bits: int) -> int:
    """Columns of one thread's chunk of a base row in hybrid_gemv_kernel: 4 words of int4 (32 columns), of the int2
    or int3 2-bit plane (64 columns; int3 adds 2 words of its high-bit plane)."""
    return 32 if base_bits == 4 else 64


def hybrid_gemv_supported(p: Problem) -> bool:
    """The CUDA-core hybrid kernel: one activation row, a base of whole chunks and groups (int3: rows of whole
    16-byte words in both planes, K % 128), and a phase 1 that takes the decode path."""
    chunk = gemv_chunk(p.base_bits)
    return p.m <= CUDA_CORE_MAX_M and p.k % (128 if p.base_bits == 3 else chunk) == 0 \
        and p.base_group_size % chunk == 0 and hybrid_decode_supported(p)


def hybrid_decode_supported(p: Problem) -> bool:
    """Phase 1 on the decode path: `down` rows of whole 16-byte chunks, int4 groups of whole 32-column chunks."""
    return (p.k * p.factor_elem_bytes) % 16 == 0 and (p.bits != 4 or p.group_size % 32 == 0)


def _tile_block(p: Problem, wanted: int) -> int:
    """A K tile dividing every group it meets where possible (one scale per row per tile): the int4 correction's
    (required on the decode path) and the base's."""
    block = _int4_block(p.k, p.group_size, wanted) if p.bits == 4 else wanted
    while block > 16 and p.base_group_size % block:
        block //= 2
    return block


def hybrid_gemv_phase1(p: Problem) -> TileConfig:
    """Phase 1 of the CUDA-core hybrid (hybrid_gemv_kernel, M = 1), which leaves per-split partial sums for the gemv
    to add up (decode_shrink_kernel with PARTIALS): each CTA reads one [block_r, block_k] tile of `down`, 4 rows x one
    16-byte chunk per thread (4 loads in flight, all of its bytes in one round trip), 16 threads along K (256 bytes of
    a row per warp), block_r 32 rows from 4 warps (8 or 16 from 1 or 2 for smaller ranks). split_k = the K tiles:
    4096 in and int8 give 16 splits, so the gemv reads 16 x 32 fp32 (2 KB) of partials per CTA after its wait; the
    low-rank decode's 64 (1-warp CTAs of 64 columns) would be 8 KB per CTA, 2.8 MB over the 344 CTAs of
    4096->11008. bench/sass_report.py (sm_90, static ESTIMATES) on 4096->11008 int4 g128 + r32 int8: phase 1 1.07 us
    (16 CTAs, 8 KB in flight per SM: all it reads), well inside the base's 8.8 us before the gemv's wait."""
    block_r = min(32, max(8, next_pow2(p.rank)))
    block_k = 16 * decode_chunk(p.bits)
    return TileConfig("decode", 1, 16, block_k, block_r, _cdiv(p.k, block_k), num_warps=block_r // 8)


def hybrid_default_config(
    p: Problem, num_sms: int = DEFAULT_NUM_SMS, interpret: bool = False, fused_max_m: int = FUSED_MAX_M
) -> TileConfig:
    """The no-benchmark heuristic for a hybrid problem (p.base_bits set)."""
    decode = p.m <= fused_max_m and hybrid_decode_supported(p)
    if interpret:  # small tiles, every loop and tail still run
        if decode and hybrid_gemv_supported(p):
            return TileConfig("decode", 1, 16, 32, 16, split_k=2, num_warps=1, expand_block_r=16, base_block_k=64)
        return TileConfig("decode" if decode else "split", 16, 32, _tile_block(p, 32), 16, split_k=2)
    if decode and hybrid_gemv_supported(p):
        # Base (warps, rows per CTA, K tile) from bench/sass_report.py's sweep of the candidates on 4096->11008
        # + r32 int8 (sm_90, static): the fewest estimated microseconds with no spills. int4: 512-column K tiles
        # (64 bytes per row per thread: twice the bytes in flight of 256, the estimate's bound), 6.2 insts/B;
        # int3: 256 (more spills its 255 registers), 16.8 insts/B; int2: 1 warp, 512, 12 insts/B. Half the rows
        # where that leaves fewer than WAVE_CTAS CTAs per SM (the base has no K split).
        warps, block_n, base_block_k = {4: (2, 32, 512), 3: (2, 32, 256), 2: (1, 16, 512)}[p.base_bits]
        if _cdiv(p.n, block_n) < WAVE_CTAS * num_sms:
            block_n //= 2
        phase1 = hybrid_gemv_phase1(p)
        return TileConfig("decode", 1, block_n, phase1.block_k, phase1.block_r, phase1.split_k, num_warps=warps,
                          expand_block_r=32, shrink_warps=phase1.phase1_warps, base_block_k=base_block_k)
    block_k = _tile_block(p, 64)
    if decode:
        # M <= 16 on tensor cores: 32 output features x 128-column K tiles, 2 warps, 4 stages (the static sweep on
        # 4096->11008 int4 g128 + r32: 32 bytes per thread in flight, 14.1 estimated us against 26.2 for 64 x 64).
        # An int4 base (read as 32-bit words, dequantized in quarters: int4_quarters_fp16) takes 64 output features:
        # 64 bytes per thread per stage, four 128-bit copies (LDGSTS.128), 6.3 insts per weight byte against 8.2 at
        # 32 (the x quarters and the K-loop overhead shared by twice the rows), 11.47 estimated us against 11.52;
        # 128 (86 CTAs for 132 SMs) estimates 11.36 but leaves a third of the SMs idle
        block_n = 64 if p.base_bits == 4 else 32
        tile_k = _tile_block(p, 128)
        split_k = max(1, min(_cdiv(p.k, tile_k), _cdiv(WAVE_CTAS * num_sms, _cdiv(p.rank, 32))))
        return TileConfig("decode", 16, block_n, tile_k, 32, split_k, num_warps=2, expand_block_r=32, num_stages=4)
    large = p.m >= 256
    return TileConfig("split", 128 if large else 64, 128 if large else 64, block_k, 32,
                      num_warps=8 if large else 4, num_stages=3)


def hybrid_candidate_configs(p: Problem, first: TileConfig, wide: bool, num_sms: int, smem_limit: int) -> list:
    """The hybrid's search: base rows per CTA and warps on CUDA cores (M = 1), output tiles on tensor cores."""
    out = [first]
    if p.m <= 4 * FUSED_MAX_M and hybrid_decode_supported(p):
        if hybrid_gemv_supported(p):
            phase1 = hybrid_gemv_phase1(p)
            for warps, block_n, block_k in itertools.product((4, 2, 1), (16, 32, 64, 128) if wide else (16, 32),
                                                             (256, 512, 1024) if p.base_bits == 4 else (256, 512)):
                out.append(TileConfig("decode", 1, block_n, phase1.block_k, phase1.block_r, phase1.split_k,
                                      num_warps=warps, expand_block_r=32, shrink_warps=phase1.phase1_warps,
                                      base_block_k=block_k))
        for block_n, wanted_k in itertools.product((32, 64, 128), (64, 128) if wide else (64,)):
            block_k = _tile_block(p, wanted_k)
            split_k = max(1, min(_cdiv(p.k, block_k), _cdiv(WAVE_CTAS * num_sms, _cdiv(p.rank, 32))))
            out.append(TileConfig("decode", 16, block_n, block_k, 32, split_k, expand_block_r=32, num_stages=3))
    tiles = [(64, 64), (128, 128)] + ([(64, 128), (128, 64)] if wide else [])
    if p.m <= 32:
        tiles = [(16, 64), (16, 128)] + tiles
    for (bm, bn), stages in itertools.product(tiles, (3, 4) if wide else (3,)):
        out.append(TileConfig("split", bm, bn, _tile_block(p, 64), 32, num_warps=8 if bm * bn >= 128 * 128 else 4,
                              num_stages=stages))
    kept: list[TileConfig] = []
    for c in out:
        if c not in kept and (c is first or smem_bytes(c, p) <= smem_limit):
            kept.append(c)
    return kept


def smem_bytes(c: TileConfig, p: Problem) -> int:
    """Upper estimate of the pipelined shared-memory footprint of the biggest kernel in `c`."""
    wb = max(1.0, p.factor_elem_bytes)  # loaded factor tiles are widened before the dot
    if c.path == "decode":
        if not c.uses_dot:
            return 0  # CUDA cores: registers only (the final reductions use a few KB)
        shrink = c.block_m * c.block_k * p.x_bytes + c.block_r * c.block_k * wb
        expand = c.block_m * c.rows_per_expand_step * 4 + c.rows_per_expand_step * c.block_n * wb
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
    if c.uses_dot and min(c.block_m, c.block_n, c.block_k, c.block_r, c.rows_per_expand_step) < 16:
        return False
    if c.path == "decode":
        if not decode_supported(p) or c.split_k > _cdiv(p.k, c.block_k):
            return False
        if c.one_launch and (c.uses_dot or not one_launch_supported(p) or c.block_r < p.rank):
            return False
        if not c.uses_dot and (c.block_k % decode_chunk(p.bits) or c.block_n % decode_chunk(p.bits)):
            return False  # CUDA cores: whole 16-byte chunks per thread
        if p.bits == 4 and c.uses_dot and (p.group_size % c.block_k or p.group_size % c.block_n):
            return False
    return smem_bytes(c, p) <= smem_limit


def lowrank_candidate_configs(p: Problem, first: TileConfig, wide: bool, num_sms: int, smem_limit: int,
                              fused_max_m: int = FUSED_MAX_M) -> list[TileConfig]:
    """The pure low-rank format's search: CUDA-core and tensor-core decode plans, split tiles."""
    out: list[TileConfig] = [first]
    # decode competes up to 4x the threshold so tuning can move the crossover from data
    if p.m <= 4 * fused_max_m and decode_supported(p):
        if p.m <= 4:  # CUDA cores: one program per activation row
            for warps, rows, chunks in itertools.product((4, 2, 8) if wide else (4, 2), (8, 4) if wide else (8,),
                                                         (2, 1, 4) if wide else (2, 1)):
                c = decode_cuda_core_config(p, num_sms, warps, rows, chunks)
                whole_k = decode_cuda_core_config(p, num_sms, warps, rows, chunks, whole_k=True)
                out.append(c)
                out.append(whole_k)
                # the other prefetch depth before phase 2's wait (default_blocks_before_wait is a static estimate)
                out.append(dataclasses.replace(whole_k, expand_blocks_before_wait=other_blocks_before_wait(p.bits)))
                if wide:
                    out.append(dataclasses.replace(c, split_k=max(1, c.split_k // 2)))
            if p.m <= CUDA_CORE_MAX_M and one_launch_supported(p):  # the tuner weighs one launch against two
                for warps, chunks in itertools.product((4, 8) if wide else (4,), (2, 1, 4) if wide else (2,)):
                    out.append(one_launch_config(p, warps, chunks))
        for block_r, block in itertools.product((32, 64) if wide else (32,), (32, 64, 128) if wide else (64,)):
            bk = _int4_block(p.k, p.group_size, block) if p.bits == 4 else block
            bn = _int4_block(p.n, p.group_size, block) if p.bits == 4 else block
            split_k = max(1, min(_cdiv(p.k, bk), _cdiv(WAVE_CTAS * num_sms, _cdiv(p.rank, block_r))))
            for sk in sorted({split_k, max(1, split_k // 2)}):
                out.append(TileConfig("decode", 16, bn, bk, block_r, sk, expand_block_r=64, num_stages=3))
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


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def tuned_winners(gpu_name: str, directory: Path | None = None) -> dict[str, TileConfig]:
    """The committed winners for this GPU by autotune key; {} when there is no file (or it is unreadable).
    An entry that is not a valid config of these kernels is skipped."""
    try:
        path = (directory or TUNED_DIR) / f"{gpu_slug(gpu_name)}.json"
        entries = json.loads(path.read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):
        return {}
    winners = {}
    for key, entry in entries.items() if isinstance(entries, dict) else ():
        try:
            winners[key] = TileConfig.from_dict(entry["config"])
        except (ValueError, TypeError, KeyError):
            continue
    return winners
