"""Triton kernels for y = x · (upᵀ·down)ᵀ + b straight from the stored (quantized) factors.

Storage and dequantization: kernels/utils.py (the building blocks every kernel here shares).
Kernels:
- decode_shrink_kernel + decode_expand_kernel: the decode path (M <= FUSED_MAX_M). Phase 1 reduces
  the rank-r intermediate across the whole GPU: a grid of (rank block, K split) programs, each
  streaming its [BLOCK_R, k range] slice of `down` once and adding its partial sums into hidden
  [M, r] fp32 with atomics. Phase 2 expands: one program per BLOCK_N output columns streams its
  slice of `up_t` once against all of hidden and writes y (bias added, no atomics). Every factor
  byte is read once, by many CTAs per SM. The last phase-2 program re-zeroes hidden (atomic ticket),
  so the workspace is zero between calls without a memset (CUDA-graph safe). On sm_90 phase 2 is a
  programmatic dependent launch: it starts while phase 1 runs and waits (griddepcontrol) before
  reading hidden. (Phase 1 with PARTIALS stores per-split partial sums with plain stores into a buffer of its own,
  summed by the reader: the hybrid's CUDA-core path, and the whole-K plan here (one split: configs, the M = 1
  default where K allows), whose phase 2 then runs without RELEASE_HIDDEN: no atomics, no ticket, the same output
  bits on every call.)
  BLOCK_M == 1 runs on CUDA cores, one program per row of x: tiles are [rows, threads, 4 words], so
  each thread loads 16 contiguous bytes per row (LDG.128) and keeps fp32 partial sums per (row, word):
  no weight data crosses threads in the hot loops, one cross-thread reduction at the end (weight and x tiles load in
  that layout on every Triton release: utils.load_row_chunks, load_chunk_words). In phase 1 the x
  values a thread loads serve all its rows (8 where the grid allows); in phase 2 each thread owns one
  row per sub-tile and per-lane accumulators; a block of up to 4 sub-tiles (one 128-bit load per thread each) is
  loaded one block ahead of its use (two blocks, A and B, per iteration: no register copies), the first one or two
  blocks before the dependent-launch wait (configs.default_blocks_before_wait), so at least 4 weight loads per thread
  are in flight at a first use; the end reduces int4's 32 column sums per thread by recursive halving.
  BLOCK_M >= 16 pads M to 16 rows and uses tl.dot (tensor cores).
- decode_one_launch_kernel: small layers (configs.one_launch_supported) in one launch: every program computes all of
  hidden itself from `down` (re-read from L2), then its BLOCK_N columns of y.
- shrink_kernel / expand_kernel: the two-launch prefill path. hidden[M, r] is fp32 in global memory;
  plain tiled GEMMs on tensor cores.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .utils import (
    INT4_EVEN_OFFSET,
    INT4_ODD_OFFSET,
    INT8_RAW_OFFSET,
    dequant_tile,
    dot,
    int4_lane,
    int8_lane,
    load_row_chunks,
    release_hidden,
    shrink_tile_cc,
    store_output,
)


# ---- decode path, CUDA cores (BLOCK_M == 1) ----------------------------------------------------------
@triton.jit
def _expand_step(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, chunk, h, scale, magic, BITS: tl.constexpr,
                 PRECISE: tl.constexpr):
    """Phase 2, one row per thread: acc_lane [SUB_R, T, 4] += value(chunk, lane) * h' with h' = h * scale.
    Values keep their RAW offsets; hsum [SUB_R, T] collects Σ h' to subtract them at the end."""
    if BITS == 4:  # one scale per (row, chunk)
        hs = h[:, None] * scale  # [SUB_R, T]
        hsum += hs
        hs = hs[:, :, None]
        acc0 += int4_lane(chunk, 0, magic, True) * hs
        acc1 += int4_lane(chunk, 1, magic, not PRECISE) * hs
        acc2 += int4_lane(chunk, 2, magic, True) * hs
        acc3 += int4_lane(chunk, 3, magic, not PRECISE) * hs
        acc4 += int4_lane(chunk, 4, magic, True) * hs
        acc5 += int4_lane(chunk, 5, magic, not PRECISE) * hs
        acc6 += int4_lane(chunk, 6, magic, True) * hs
        acc7 += int4_lane(chunk, 7, magic, not PRECISE) * hs
    elif BITS == 8:
        hs = h * scale  # [SUB_R]
        hsum += hs[:, None]
        hs = hs[:, None, None]
        acc0 += int8_lane(chunk, 0, magic, True) * hs
        acc1 += int8_lane(chunk, 1, magic, True) * hs
        acc2 += int8_lane(chunk, 2, magic, True) * hs
        acc3 += int8_lane(chunk, 3, magic, True) * hs
    else:
        acc0 += chunk.to(tl.float32) * h[:, None, None]
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum


@triton.jit
def _expand_block(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, w0, w1, w2, w3, h0, h1, h2, h3, s0, s1, s2, s3,
                  magic, BITS: tl.constexpr, PRECISE: tl.constexpr, U: tl.constexpr):
    """_expand_step over the U sub-tiles of one row block."""
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_step(
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, w0, h0, s0, magic, BITS, PRECISE)
    if U > 1:
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_step(
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, w1, h1, s1, magic, BITS, PRECISE)
    if U > 2:
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_step(
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, w2, h2, s2, magic, BITS, PRECISE)
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_step(
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, w3, h3, s3, magic, BITS, PRECISE)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum


@triton.jit
def _expand_zeros(ROWS: tl.constexpr, T: tl.constexpr):
    """Phase 2's accumulators: one [ROWS, T, 4] per lane (8: int4's lanes; int8 uses 4, float factors 1) and hsum."""
    acc0 = tl.zeros((ROWS, T, 4), dtype=tl.float32)
    hsum = tl.sum(tl.zeros_like(acc0), axis=2)  # [ROWS, T]
    return acc0, tl.zeros_like(acc0), tl.zeros_like(acc0), tl.zeros_like(acc0), tl.zeros_like(acc0), \
        tl.zeros_like(acc0), tl.zeros_like(acc0), tl.zeros_like(acc0), hsum


@triton.jit
def _halve_rows(x):
    """One step of a recursive-halving reduction: x [R, D, T, C] -> [R / 2, 2 D, T, C / 2], summing pairs of rows
    (the lowest row bit, a lane bit). Of each pair the thread of the even row keeps the even register values, its
    partner the odd ones: each adds what the other sends, so the reduced row bit becomes the lowest bit of the
    column (moved into D) and every thread holds half as many values. One shuffle per value sent, where the
    butterfly of tl.sum shuffles every value at every step."""
    R: tl.constexpr = x.shape[0]
    D: tl.constexpr = x.shape[1]
    T: tl.constexpr = x.shape[2]
    C: tl.constexpr = x.shape[3]
    even, odd = tl.split(tl.reshape(x, (R // 2, 2, D, T, C // 2, 2)))  # [R/2, 2, D, T, C/2] each
    bit = tl.arange(0, 2)[None, :, None, None, None]
    keep = tl.where(bit == 0, even, odd)
    send = tl.where(bit == 0, odd, even)
    x = keep + tl.gather(send, tl.broadcast_to(1 - bit, send.shape), 1)  # from the partner across the bit
    return tl.reshape(x, (R // 2, 2 * D, T, C // 2))


@triton.jit
def _store_lanes(y_ptr, stride_ym, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, bias_ptr, n0, m, N,
                 BITS: tl.constexpr, PRECISE: tl.constexpr, HAS_BIAS: tl.constexpr, LANES: tl.constexpr,
                 T: tl.constexpr):
    """Phase 2's end: y[m, n] = Σ_rows acc_lane - the lane's RAW offset x Σ h' + bias, n = n0 + word x LANES + lane.
    The lanes are joined into one [ROWS, T, C] tile in column order (C = 4 x LANES values per thread), then reduced
    over the rows by recursive halving (_halve_rows) across the row bits a warp's lanes hold, each step halving the
    values a thread holds, and by tl.sum over the rest (across warps): one bias load and one store per column left."""
    ROWS: tl.constexpr = acc0.shape[0]
    C: tl.constexpr = 4 * LANES
    # tl.join appends a dimension of 2 (its second operand at 1): [ROWS, T, 4, 2, 2, 2] holds lane 4i + 2j + k at
    # [..., i, j, k], so the flat index of (word, lane) is word x LANES + lane
    if LANES == 8:
        acc = tl.join(tl.join(tl.join(acc0, acc4), tl.join(acc2, acc6)),
                      tl.join(tl.join(acc1, acc5), tl.join(acc3, acc7)))
    elif LANES == 4:
        acc = tl.join(tl.join(acc0, acc2), tl.join(acc1, acc3))  # [ROWS, T, 4, 2, 2]: lane 2i + j
    else:
        acc = acc0
    if LANES == 8:  # int4: recursive halving over the lanes' row bits (rows' low bits: 32 / T lanes along them)
        KEPT: tl.constexpr = min(C, ROWS, 32 // T)  # 2^steps: the column values each step moves onto the lanes
        x = tl.reshape(acc, (ROWS, 1, T, C))
        if KEPT >= 2:
            x = _halve_rows(x)
        if KEPT >= 4:
            x = _halve_rows(x)
        if KEPT >= 8:
            x = _halve_rows(x)
        if KEPT >= 16:
            x = _halve_rows(x)
        if KEPT >= 32:  # (C is 32: at most 5 steps)
            x = _halve_rows(x)
        out = tl.sum(x, axis=0)  # [KEPT, T, C / KEPT]: the rest of the rows, across warps
        n_offs = n0 + tl.arange(0, T)[None, :, None] * C + tl.arange(0, C // KEPT)[None, None, :] * KEPT \
            + tl.arange(0, KEPT)[:, None, None]  # the column of each value
        h_total = tl.sum(hsum, axis=0)[None, :, None]  # Σ h' per 16-byte chunk: [1, T, 1]
    else:  # int8 and float factors: one tl.sum (halved, ptxas issued int8's loop loads later: 4 -> 2 at first use)
        out = tl.sum(tl.reshape(acc, (ROWS, T * C)), axis=0)  # [BLOCK_N]
        n_offs = n0 + tl.arange(0, T * C)
        # Σ h' per 16-byte chunk, on each of its columns: [BLOCK_N]
        h_total = tl.reshape(tl.broadcast_to(tl.sum(hsum, axis=0)[:, None], (T, C)), (T * C,))
    if BITS == 8:
        out -= INT8_RAW_OFFSET * h_total
    elif BITS == 4:  # even lanes keep INT4_EVEN_OFFSET; odd ones INT4_ODD_OFFSET, or none when read exactly (PRECISE)
        odd = 0.0 if PRECISE else INT4_ODD_OFFSET * h_total
        out -= tl.where(n_offs % 2 == 1, odd, INT4_EVEN_OFFSET * h_total)
    n_ok = n_offs < N
    if HAS_BIAS:
        out += tl.load(bias_ptr + n_offs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n_offs, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _expand_weights(w_ptrs, rows, r0, R, row_words, SUB_R: tl.constexpr, U: tl.constexpr):
    """Phase 2: the U sub-tiles [SUB_R, T, 4] of the row block at r0, one 128-bit load per thread each, all issued
    before any is used; rows past R masked (no memory traffic, zeros)."""
    w0 = load_row_chunks(w_ptrs + r0 * row_words, (r0 + rows < R)[:, None, None], True)
    w1 = w0
    w2 = w0
    w3 = w0
    if U > 1:
        w1 = load_row_chunks(w_ptrs + (r0 + SUB_R) * row_words, (r0 + SUB_R + rows < R)[:, None, None], True)
    if U > 2:
        w2 = load_row_chunks(w_ptrs + (r0 + 2 * SUB_R) * row_words, (r0 + 2 * SUB_R + rows < R)[:, None, None], True)
        w3 = load_row_chunks(w_ptrs + (r0 + 3 * SUB_R) * row_words, (r0 + 3 * SUB_R + rows < R)[:, None, None], True)
    return w0, w1, w2, w3


@triton.jit
def _expand_pointers(up_ptr, up_scale_ptr, n0, N, rows, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     LANES: tl.constexpr, T: tl.constexpr):
    """Phase 2's addresses for rows `rows` and the BLOCK_N columns at n0: (w_ptrs [rows, T, 4] int32 words, row_words,
    s_ptrs, s_stride). Each thread owns 4 words of a row; past the last column a chunk is clamped onto the last one
    (in bounds and aligned without a mask; its outputs are never stored). Scales: int4 one per (row, chunk) (a chunk
    lies in one group: configs.decode_supported), int8 one per row."""
    row_words = tl.multiple_of(N // LANES, 4)  # rows are 16-byte multiples (configs.decode_supported)
    w_ptr = up_ptr.to(tl.pointer_type(tl.int32)) if BITS == 8 or BITS == 4 else up_ptr
    starts = tl.multiple_of(tl.minimum(n0 // LANES + tl.arange(0, T) * 4, row_words - 4), 4)  # [T]
    cols = starts[:, None] + tl.arange(0, 4)[None, :]  # [T, 4] word index
    w_ptrs = w_ptr + rows[:, None, None] * row_words + cols[None, :, :]  # [rows, T, 4]
    if BITS == 4:
        s_ptrs = up_scale_ptr + rows[:, None] * (N // GROUP_SIZE) + ((starts * LANES) // GROUP_SIZE)[None, :]
        s_stride = N // GROUP_SIZE
    else:
        s_ptrs = up_scale_ptr + rows
        s_stride = 1
    return w_ptrs, row_words, s_ptrs, s_stride


@triton.jit
def _expand_scale(s_ptrs, ok, r, s_stride, stand_in, BITS: tl.constexpr):
    """The scales of rows r + rows where `ok`: int4 [rows, T] per (row, chunk), int8 [rows] per row; float factors
    have none (`stand_in`, never read)."""
    if BITS == 4:
        scale = load_row_chunks(s_ptrs + r * s_stride, ok[:, None], True)
    elif BITS == 8:
        scale = tl.load(s_ptrs + r * s_stride, mask=ok, other=0.0)
    else:
        scale = stand_in
    return scale


@triton.jit
def _expand_multiplier(h_ptrs, s_ptrs, rows, r, R, s_stride, BITS: tl.constexpr):
    """h [SUB_R] of rows r + rows (0 past R) and their scales (_expand_scale)."""
    ok = r + rows < R
    h = tl.load(h_ptrs + r, mask=ok, other=0.0)
    return h, _expand_scale(s_ptrs, ok, r, s_stride, h, BITS)


@triton.jit
def _expand_multipliers(h_ptrs, s_ptrs, rows, r0, R, s_stride, SUB_R: tl.constexpr, U: tl.constexpr,
                        BITS: tl.constexpr):
    """_expand_multiplier of the U sub-tiles of the row block at r0."""
    h0, s0 = _expand_multiplier(h_ptrs, s_ptrs, rows, r0, R, s_stride, BITS)
    h1, s1, h2, s2, h3, s3 = h0, s0, h0, s0, h0, s0
    if U > 1:
        h1, s1 = _expand_multiplier(h_ptrs, s_ptrs, rows, r0 + SUB_R, R, s_stride, BITS)
    if U > 2:
        h2, s2 = _expand_multiplier(h_ptrs, s_ptrs, rows, r0 + 2 * SUB_R, R, s_stride, BITS)
        h3, s3 = _expand_multiplier(h_ptrs, s_ptrs, rows, r0 + 3 * SUB_R, R, s_stride, BITS)
    return h0, h1, h2, h3, s0, s1, s2, s3


@triton.jit
def _expand_next(w_ptrs, h_ptrs, s_ptrs, rows, r0, R, row_words, s_stride, SUB_R: tl.constexpr, U: tl.constexpr,
                 BITS: tl.constexpr, MULTIPLIERS_FIRST: tl.constexpr):
    """Phase 2's loads of the next row block: its weights (_expand_weights) and multipliers (_expand_multipliers), in
    the order ptxas keeps the most weight loads in flight at the current block's first use: weights first in the
    atomic plan (8, with the ticket's code after the loop), multipliers first without it (4; weights first, ptxas
    spread them through the current block's arithmetic: 2)."""
    if MULTIPLIERS_FIRST:
        h0, h1, h2, h3, s0, s1, s2, s3 = _expand_multipliers(h_ptrs, s_ptrs, rows, r0, R, s_stride, SUB_R, U, BITS)
        w0, w1, w2, w3 = _expand_weights(w_ptrs, rows, r0, R, row_words, SUB_R, U)
    else:
        w0, w1, w2, w3 = _expand_weights(w_ptrs, rows, r0, R, row_words, SUB_R, U)
        h0, h1, h2, h3, s0, s1, s2, s3 = _expand_multipliers(h_ptrs, s_ptrs, rows, r0, R, s_stride, SUB_R, U, BITS)
    return w0, w1, w2, w3, h0, h1, h2, h3, s0, s1, s2, s3


@triton.jit
def _shrink_rows_cc(x_row_ptr, down_ptr, down_scale_ptr, rows, k_lo, k_hi, K, magic, BITS: tl.constexpr,
                    GROUP_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, X_PAIRS: tl.constexpr,
                    PRECISE: tl.constexpr, EVEN_K: tl.constexpr):
    """Phase 1 on CUDA cores: hidden [BLOCK_R] = x[k range] · down[rows, k range]ᵀ, scales applied (fp32).
    rows [BLOCK_R] are in range (clamped by the caller, so the hot loop needs no row mask). EVEN_K: the k range is
    whole BLOCK_K tiles, so the masked tail tile is not compiled (it never runs; a second copy of the tile's code)."""
    k_full = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K  # end of the unmasked tiles
    LANES: tl.constexpr = 4 if BITS == 8 else 8 if BITS == 4 else 1
    T: tl.constexpr = BLOCK_K // (4 * LANES)
    row_words = tl.multiple_of(K // LANES, 4)  # rows are 16-byte multiples (configs.decode_supported)
    if BITS == 8 or BITS == 4:
        w_rows_ptr = down_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None, None] * row_words
    else:
        w_rows_ptr = down_ptr + rows[:, None, None] * row_words
    scale_rows_ptr = down_scale_ptr + rows[:, None] * (K // GROUP_SIZE)  # int4 only
    if BITS == 4:  # (a sum of 3-D zeros: the layout the loop's chunk sums come in)
        acc = tl.sum(tl.zeros((BLOCK_R, T, 4), dtype=tl.float32), axis=2)
    else:
        acc = tl.zeros((BLOCK_R, T, 4), dtype=tl.float32)
    xoff = tl.zeros((T, 4), dtype=tl.float32)
    for k0 in range(k_lo, k_full, BLOCK_K):
        acc, xoff = shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k0, k_hi, K, magic, BITS,
                                    GROUP_SIZE, BLOCK_K, X_PAIRS, PRECISE, False)
    if not EVEN_K and k_full < k_hi:
        acc, xoff = shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k_full, k_hi, K, magic, BITS,
                                    GROUP_SIZE, BLOCK_K, X_PAIRS, PRECISE, True)
    if BITS != 4:
        acc = tl.sum(acc, axis=2)
    hidden = tl.sum(acc, axis=1)  # [BR]: the one cross-thread reduction
    if BITS == 8:  # every row's values kept INT8_RAW_OFFSET: subtract offset * Σx once, then the row scale
        hidden = (hidden - INT8_RAW_OFFSET * tl.sum(tl.sum(xoff, axis=1), axis=0)) * tl.load(down_scale_ptr + rows)
    return hidden


@triton.jit
def decode_shrink_kernel(
    x_ptr, down_ptr, down_scale_ptr, hidden_ptr, M, K, R, stride_xm, k_per_split, magic,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    X_PAIRS: tl.constexpr = False, PRECISE: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    PARTIALS: tl.constexpr = False, EVEN_K: tl.constexpr = False,
):
    """Phase 1: hidden[M, R] (fp32, zero on entry) += x[:, k range] · down[:, k range]ᵀ, scales applied.

    grid = (cdiv(R, BLOCK_R), split_k, cdiv(M, BLOCK_M)); k_per_split is a multiple of BLOCK_K; EVEN_K: so is K.
    USE_PDL: phase 2 is a programmatic dependent launch; it may start (and wait) as soon as every program here has.
    PARTIALS (CUDA cores only: the hybrid gemv, and low rank without a K split): hidden_ptr is partials [split_k, M, R]
    fp32 instead, any content on entry: each program stores its partial sums into its split's slice with plain stores
    (no atomics, nothing to re-zero); the reader adds the split_k slices (one slice: it is hidden).
    """
    tl.static_assert(not (PARTIALS and USE_DOT), "PARTIALS is the CUDA-core (BLOCK_M 1) path's")
    if USE_PDL:
        gdc_launch_dependents()
    pid_r = tl.program_id(0)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    r_offs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.minimum(r_offs, R - 1)  # clamped, so the hot loop needs no row mask
    m0 = tl.program_id(2) * BLOCK_M
    if USE_DOT:
        m_offs = m0 + tl.arange(0, BLOCK_M)
        TILE_SCALE: tl.constexpr = BITS == 4
        hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_offs = k0 + tl.arange(0, BLOCK_K)
            k_ok = k_offs < k_hi
            x = tl.load(x_ptr + m_offs[:, None] * stride_xm + k_offs[None, :],
                        mask=(m_offs[:, None] < M) & k_ok[None, :], other=0.0)  # [BM, BK]
            w = dequant_tile(down_ptr, rows[:, None], k0, k_hi, K, magic, BITS, BLOCK_K, True, x.dtype)  # [BR, BK]
            partial = dot(x, tl.trans(w.to(x.dtype)), DOT_PRECISION, DOT_UPCAST)  # [BM, BR]
            if TILE_SCALE:  # BLOCK_K divides the group size (configs arrange it)
                partial = partial * tl.load(down_scale_ptr + rows * (K // GROUP_SIZE) + k0 // GROUP_SIZE)[None, :]
            hidden += partial
        if BITS == 8:
            hidden = hidden * tl.load(down_scale_ptr + rows)[None, :]
        mask = (m_offs[:, None] < M) & (r_offs[None, :] < R)
        tl.atomic_add(hidden_ptr + m_offs[:, None] * R + r_offs[None, :], hidden, mask=mask, sem="relaxed")
    else:
        hidden = _shrink_rows_cc(x_ptr + m0 * stride_xm, down_ptr, down_scale_ptr, rows, k_lo, k_hi, K, magic, BITS,
                                 GROUP_SIZE, BLOCK_R, BLOCK_K, X_PAIRS, PRECISE, EVEN_K)  # [BR]
        if PARTIALS:  # this split's own slice: every (split, m, r) is written by exactly one program
            tl.store(hidden_ptr + tl.program_id(1) * M * R + m0 * R + r_offs, hidden, mask=r_offs < R)
        else:
            tl.atomic_add(hidden_ptr + m0 * R + r_offs, hidden, mask=r_offs < R, sem="relaxed")


@triton.jit
def decode_expand_kernel(
    hidden_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr, ticket_ptr, M, N, R, stride_ym, magic,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SUB_R: tl.constexpr,
    PRECISE: tl.constexpr = False, USE_PDL: tl.constexpr = False, RELEASE_HIDDEN: tl.constexpr = True,
    BLOCKS_BEFORE_WAIT: tl.constexpr = 1,
):
    """Phase 2: y[M, n block] = hidden[M, R] · up_t[R, n block] + bias; then (RELEASE_HIDDEN: hidden is the zeroed
    workspace) the last program of each M block re-zeroes its hidden rows and ticket. grid = (cdiv(N, BLOCK_N),
    cdiv(M, BLOCK_M)); ticket [cdiv(M, BM)]. Without RELEASE_HIDDEN hidden is a buffer of phase 1's own, written with
    plain stores (one K split: decode_shrink_kernel with PARTIALS): no ticket, no atomics.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    if USE_DOT:
        m_offs = m0 + tl.arange(0, BLOCK_M)
        n_offs = n0 + tl.arange(0, BLOCK_N)
        TILE_SCALE: tl.constexpr = BITS == 4
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_PDL:  # phase 1 must be complete before hidden is read
            gdc_wait()
        for r0 in range(0, R, BLOCK_R):
            r_offs = r0 + tl.arange(0, BLOCK_R)
            rows = tl.minimum(r_offs, R - 1)
            h = tl.load(hidden_ptr + m_offs[:, None] * R + r_offs[None, :],
                        mask=(m_offs[:, None] < M) & (r_offs[None, :] < R), other=0.0)  # [BM, BR] fp32
            u = dequant_tile(up_ptr, rows[:, None], n0, N, N, magic, BITS, BLOCK_N, True)  # [BR, BN]
            if BITS == 8:
                h = h * tl.load(up_scale_ptr + rows)[None, :]
            elif TILE_SCALE:  # BLOCK_N divides the group size (configs arrange it)
                h = h * tl.load(up_scale_ptr + rows * (N // GROUP_SIZE) + n0 // GROUP_SIZE)[None, :]
            acc += dot(h, u, DOT_PRECISION, DOT_UPCAST)
        store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, N, HAS_BIAS)
    else:
        LANES: tl.constexpr = 4 if BITS == 8 else 8 if BITS == 4 else 1
        T: tl.constexpr = BLOCK_N // (4 * LANES)
        U: tl.constexpr = BLOCK_R // SUB_R  # sub-tiles per iteration (1, 2 or 4: the launcher caps it)
        rows = tl.arange(0, SUB_R)
        w_ptrs, row_words, s_ptrs, s_stride = _expand_pointers(up_ptr, up_scale_ptr, n0, N, rows, BITS, GROUP_SIZE,
                                                                LANES, T)  # w_ptrs [SUB_R, T, 4]
        h_ptrs = hidden_ptr + m0 * R + rows
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_zeros(SUB_R, T)
        # Software-pipelined over blocks of BLOCK_R rows, two blocks (A, B) per iteration: each block's U 128-bit
        # loads per thread (and its h and scales) are issued a block ahead of their use, and the ping-pong needs no
        # register copies (a copy would wait for its load); _expand_next orders each block's loads for ptxas. Rows
        # past R are masked (no traffic; h = 0). The first BLOCKS_BEFORE_WAIT blocks' weights are loaded before the
        # dependent-launch wait (up_t does not depend on phase 1): in flight while phase 1 and the hand-off run,
        # they keep HBM busy until the loads after the wait arrive. With two, block B is loaded at the end of each
        # iteration for the next instead of at its start (the same loads, one rotation apart).
        tl.static_assert(BLOCKS_BEFORE_WAIT == 1 or BLOCKS_BEFORE_WAIT == 2, "BLOCKS_BEFORE_WAIT is 1 or 2")
        wa0, wa1, wa2, wa3 = _expand_weights(w_ptrs, rows, 0, R, row_words, SUB_R, U)
        if BLOCKS_BEFORE_WAIT == 2:
            wb0, wb1, wb2, wb3 = _expand_weights(w_ptrs, rows, BLOCK_R, R, row_words, SUB_R, U)
        if USE_PDL:  # phase 1 must be complete before hidden is read
            gdc_wait()
        ha0, ha1, ha2, ha3, sa0, sa1, sa2, sa3 = _expand_multipliers(h_ptrs, s_ptrs, rows, 0, R, s_stride, SUB_R, U,
                                                                     BITS)
        if BLOCKS_BEFORE_WAIT == 2:
            hb0, hb1, hb2, hb3, sb0, sb1, sb2, sb3 = _expand_multipliers(h_ptrs, s_ptrs, rows, BLOCK_R, R, s_stride,
                                                                         SUB_R, U, BITS)
        for r0 in range(0, R, 2 * BLOCK_R):
            if BLOCKS_BEFORE_WAIT == 1:
                wb0, wb1, wb2, wb3, hb0, hb1, hb2, hb3, sb0, sb1, sb2, sb3 = _expand_next(
                    w_ptrs, h_ptrs, s_ptrs, rows, r0 + BLOCK_R, R, row_words, s_stride, SUB_R, U, BITS,
                    not RELEASE_HIDDEN)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_block(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, wa0, wa1, wa2, wa3, ha0, ha1, ha2, ha3,
                sa0, sa1, sa2, sa3, magic, BITS, PRECISE, U)
            wa0, wa1, wa2, wa3, ha0, ha1, ha2, ha3, sa0, sa1, sa2, sa3 = _expand_next(
                w_ptrs, h_ptrs, s_ptrs, rows, r0 + 2 * BLOCK_R, R, row_words, s_stride, SUB_R, U, BITS,
                not RELEASE_HIDDEN)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_block(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, wb0, wb1, wb2, wb3, hb0, hb1, hb2, hb3,
                sb0, sb1, sb2, sb3, magic, BITS, PRECISE, U)
            if BLOCKS_BEFORE_WAIT == 2:
                wb0, wb1, wb2, wb3, hb0, hb1, hb2, hb3, sb0, sb1, sb2, sb3 = _expand_next(
                    w_ptrs, h_ptrs, s_ptrs, rows, r0 + 3 * BLOCK_R, R, row_words, s_stride, SUB_R, U, BITS,
                    not RELEASE_HIDDEN)
        _store_lanes(y_ptr, stride_ym, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, bias_ptr, n0, m0, N, BITS,
                     PRECISE, HAS_BIAS, LANES, T)

    if RELEASE_HIDDEN:  # the zeroed workspace: the last reader re-zeroes it
        release_hidden(hidden_ptr, ticket_ptr, pid_m, tl.num_programs(0), m0, M, R, BLOCK_M, BLOCK_R)


@triton.jit
def decode_one_launch_kernel(
    x_ptr, down_ptr, down_scale_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr, N, K, R, stride_xm, stride_ym, magic,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, X_PAIRS: tl.constexpr = False, PRECISE: tl.constexpr = False,
    EVEN_K: tl.constexpr = False,
):
    """Small layers in one launch: y[m, n block] = (x[m] · downᵀ) · up_t[:, n block] + bias on CUDA cores.

    grid = (cdiv(N, BLOCK_N), M); R <= R_PAD. Every program computes all of hidden [R] itself: `down` is small
    (configs.one_launch_supported) and, re-read by every program, comes from L2 after the first. So there is no
    workspace, no atomic, no ticket and no second launch or dependent-launch wait. The program's up_t slice
    [R_PAD, BLOCK_N] is loaded first (it does not depend on x), so its round trip overlaps phase 1; then one
    _expand_step over all its rows, and the cross-thread reduction and store of decode_expand_kernel.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    LANES: tl.constexpr = 4 if BITS == 8 else 8 if BITS == 4 else 1
    T: tl.constexpr = BLOCK_N // (4 * LANES)
    rows = tl.arange(0, R_PAD)
    r_ok = rows < R
    rows_in = tl.minimum(rows, R - 1)  # clamped: in-range addresses for phase 1's unmasked hot loop
    # up_t first: [R_PAD, T, 4] words, one 128-bit load per thread and row; rows past R masked (zeros, no traffic)
    w_ptrs, row_words, s_ptrs, s_stride = _expand_pointers(up_ptr, up_scale_ptr, n0, N, rows, BITS, GROUP_SIZE, LANES,
                                                            T)
    words = _expand_weights(w_ptrs, rows, 0, R, row_words, R_PAD, 1)[0]
    scale = _expand_scale(s_ptrs, r_ok, 0, s_stride, r_ok, BITS)
    # phase 1: all of hidden, masked rows zero
    h = _shrink_rows_cc(x_ptr + m * stride_xm, down_ptr, down_scale_ptr, rows_in, 0, K, K, magic, BITS, GROUP_SIZE,
                        R_PAD, BLOCK_K, X_PAIRS, PRECISE, EVEN_K)
    h = tl.where(r_ok, h, 0.0)  # [R_PAD]
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_zeros(R_PAD, T)
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_step(
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, words, h, scale, magic, BITS, PRECISE)
    _store_lanes(y_ptr, stride_ym, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, bias_ptr, n0, m, N, BITS,
                 PRECISE, HAS_BIAS, LANES, T)


# ---- prefill path: two launches, tensor cores -----------------------------------------------------
@triton.jit
def shrink_kernel(
    x_ptr, down_ptr, down_scale_ptr, hidden_ptr, M, K, R, stride_xm, magic,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """hidden[M, R] fp32 = x[M, K] · dequant(down)[R, K]ᵀ.  grid = (cdiv(M, BM), cdiv(R, BR))."""
    m_offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_offs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.minimum(r_offs, R - 1)
    # One int4 scale per row per K tile when the tile sits inside one group (configs arrange this);
    # otherwise the tile is scaled per element.
    TILE_SCALE: tl.constexpr = BITS == 4 and GROUP_SIZE % BLOCK_K == 0
    hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_ok = k_offs < K
        x = tl.load(x_ptr + m_offs[:, None] * stride_xm + k_offs[None, :],
                    mask=(m_offs[:, None] < M) & k_ok[None, :], other=0.0)  # [BM, BK]
        w = dequant_tile(down_ptr, rows[:, None], k0, K, K, magic, BITS, BLOCK_K, True, x.dtype)  # [BR, BK]
        if BITS == 4 and not TILE_SCALE:
            w = w * tl.load(down_scale_ptr + rows[:, None] * (K // GROUP_SIZE) + k_offs[None, :] // GROUP_SIZE,
                            mask=k_ok[None, :], other=0.0)
        partial = dot(x, tl.trans(w.to(x.dtype)), DOT_PRECISION, DOT_UPCAST)  # [BM, BR]
        if TILE_SCALE:
            partial = partial * tl.load(down_scale_ptr + rows * (K // GROUP_SIZE) + k0 // GROUP_SIZE)[None, :]
        hidden += partial
    if BITS == 8:  # per-row scale factors out of the whole K sum
        hidden = hidden * tl.load(down_scale_ptr + rows)[None, :]
    mask = (m_offs[:, None] < M) & (r_offs[None, :] < R)
    tl.store(hidden_ptr + m_offs[:, None] * R + r_offs[None, :], hidden, mask=mask)


@triton.jit
def expand_kernel(
    hidden_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr, M, N, R, stride_ym, magic,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, LOWP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[M, N] = hidden[M, R] · dequant(up_t)[R, N] + bias.  grid = (cdiv(M, BM), cdiv(N, BN))."""
    m_offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = tl.program_id(1) * BLOCK_N
    n_offs = n_start + tl.arange(0, BLOCK_N)
    n_ok = n_offs < N
    TILE_SCALE: tl.constexpr = BITS == 4 and GROUP_SIZE % BLOCK_N == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        r_ok = r_offs < R
        rows = tl.minimum(r_offs, R - 1)
        hidden = tl.load(hidden_ptr + m_offs[:, None] * R + r_offs[None, :],
                         mask=(m_offs[:, None] < M) & r_ok[None, :], other=0.0)  # [BM, BR]
        u = dequant_tile(up_ptr, rows[:, None], n_start, N, N, magic, BITS, BLOCK_N, True)  # [BR, BN]
        if BITS == 8:  # y = Σ_j (hidden_j · s_j) · q_jn: scale the small operand
            hidden = hidden * tl.load(up_scale_ptr + rows)[None, :]
        elif TILE_SCALE:
            hidden = hidden * tl.load(up_scale_ptr + rows * (N // GROUP_SIZE) + n_start // GROUP_SIZE)[None, :]
        elif BITS == 4:
            u = u * tl.load(up_scale_ptr + rows[:, None] * (N // GROUP_SIZE) + n_offs[None, :] // GROUP_SIZE,
                            mask=n_ok[None, :], other=0.0)
        if LOWP:
            partial = dot(hidden.to(y_ptr.dtype.element_ty), u.to(y_ptr.dtype.element_ty), DOT_PRECISION, DOT_UPCAST)
        else:
            partial = dot(hidden, u, DOT_PRECISION, DOT_UPCAST)
        acc += partial
    store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, N, HAS_BIAS)
