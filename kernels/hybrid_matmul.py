"""Triton kernels for the hybrid format: y = x · Q̂ᵀ + (x · Dᵀ) · Uᵀ + b straight from the stored codes.

Storage (triton_lowrank/quant.py, hybrid_storage.py): the base Q [out, in] is quantized in groups along `in`.
  int4: (q + 8) nibbles, column 2j low / 2j+1 high, [out, in/2] uint8, fp32 scale per group: the layout of an int4
        factor, so it is read by the same routines (int4_lane, dequant_tile, _shrink_tile_cc).
  int2: codes 0..3, column 4j + l at bits 2l, [out, in/4] uint8.
  int3: per row an int2 plane of the low two bits ([in/4] bytes), then a plane of the high bit (column 8j + l at
        bit l, [in/8] bytes): [out, 3 in/8] uint8.
  int3 and int2 have a uint8 zero point per group: w = (code - zero) · scale.
The correction's factors (down [r, in], up_t [r, out]) are low-rank factor storage, read by dequant_tile.

The rank-r intermediate hidden = x · Dᵀ (fp32) comes from the low-rank phase-1 kernels: decode_shrink_kernel into
the zeroed decode workspace for decode M, shrink_kernel for prefill M. One kernel then does the rest for a block of
output features: the base matmul over all of `in`, the correction as an epilogue (hidden · up_t[:, block]), bias, one
store. Under programmatic dependent launch (sm_90) it starts while phase 1 runs and waits for hidden only before the
epilogue, so phase 1 (r·in factor bytes against out·in·bits/8 base bytes) hides behind the base's stream.

- hybrid_gemv_kernel: M = 1, int4 base, CUDA cores. Each program owns BLOCK_N base rows; each thread multiply-adds
  16-byte chunks of its rows (the low-rank phase-1 tile, _shrink_tile_cc), one cross-thread reduction per row.
- hybrid_tile_kernel: tensor cores for everything else (M > 1, int3 and int2 bases, rows that are not whole 16-byte
  chunks): [BLOCK_M, BLOCK_N] output tiles, the base codes of each [BLOCK_N, BLOCK_K] tile exact in the activation
  dtype, the group scale applied to the partial product when BLOCK_K divides the group (per element otherwise).
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .lowrank_matmul import _dot, _shrink_tile_cc, _store_output, dequant_tile, release_hidden


@triton.jit
def _word_bytes(words):
    """[BN, W] int32 words -> [BN, 4 W] int32 bytes (little-endian: byte b of word w at column 4w + b)."""
    b0 = words & 0xFF
    b1 = (words >> 8) & 0xFF
    b2 = (words >> 16) & 0xFF
    b3 = (words >> 24) & 0xFF
    return tl.join(tl.join(b0, b2), tl.join(b1, b3)).reshape(words.shape[0], 4 * words.shape[1])


@triton.jit
def _spread_2bit(packed):
    """[BN, C] int32 bytes -> [BN, 4 C] int32 2-bit fields, field l of byte j at column 4j + l."""
    f0 = packed & 3
    f1 = (packed >> 2) & 3
    f2 = (packed >> 4) & 3
    f3 = (packed >> 6) & 3
    return tl.join(tl.join(f0, f2), tl.join(f1, f3)).reshape(packed.shape[0], 4 * packed.shape[1])


@triton.jit
def _spread_1bit(packed):
    """[BN, C] int32 bytes -> [BN, 8 C] int32 bits, bit l of byte j at column 8j + l."""
    b0 = packed & 1
    b1 = (packed >> 1) & 1
    b2 = (packed >> 2) & 1
    b3 = (packed >> 3) & 1
    b4 = (packed >> 4) & 1
    b5 = (packed >> 5) & 1
    b6 = (packed >> 6) & 1
    b7 = (packed >> 7) & 1
    even = tl.join(tl.join(b0, b4), tl.join(b2, b6))  # [BN, C, 2, 2]: [i, j] is bit 4i + 2j
    odd = tl.join(tl.join(b1, b5), tl.join(b3, b7))
    return tl.join(even, odd).reshape(packed.shape[0], 8 * packed.shape[1])


@triton.jit
def base_codes(base_ptr, rows, k0, K, magic, offset, BASE_BITS: tl.constexpr, BLOCK_K: tl.constexpr,
               WORDS: tl.constexpr = False):
    """fp32 [BN, BLOCK_K] of base rows `rows` [BN, 1], columns k0 .. k0 + BLOCK_K (masked at K), not scaled: int4 the
    signed value q; int3/int2 the unsigned code minus `offset` (the zero point, [BN, 1] or [BN, BK]). Each plane is
    read once, contiguously (WORDS: as 32-bit words). A code becomes fp32 without I2F: OR-ed into the mantissa of
    2^23 (`magic`), then one FADD removes 2^23 and the zero point together."""
    if BASE_BITS == 4:
        codes = dequant_tile(base_ptr, rows, k0, K, K, magic, 4, BLOCK_K, True)
    else:
        row_bytes = K * BASE_BITS // 8
        if WORDS:  # whole 32-bit words of both planes (K and BLOCK_K multiples of 32: rows stay 4-byte aligned)
            words_ptr = base_ptr.to(tl.pointer_type(tl.int32)) + rows * (row_bytes // 4)
            quarter = k0 // 16 + tl.arange(0, BLOCK_K // 16)  # words of the 2-bit plane
            low = _word_bytes(tl.load(words_ptr + quarter[None, :], mask=(quarter < K // 16)[None, :], other=0))
        else:
            quarter = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # bytes of the 2-bit plane
            low = tl.load(base_ptr + rows * row_bytes + quarter[None, :], mask=(quarter < K // 4)[None, :],
                          other=0).to(tl.int32)
        fields = _spread_2bit(low)  # [BN, BK]
        if BASE_BITS == 3:  # the high-bit plane follows the 2-bit plane in each row
            if WORDS:
                eighth = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                high = _word_bytes(tl.load(words_ptr + K // 16 + eighth[None, :], mask=(eighth < K // 32)[None, :],
                                           other=0))
            else:
                eighth = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                high = tl.load(base_ptr + rows * row_bytes + K // 4 + eighth[None, :],
                               mask=(eighth < K // 8)[None, :], other=0).to(tl.int32)
            fields = fields | (_spread_1bit(high) << 2)
        codes = (fields | magic).to(tl.float32, bitcast=True) - (8388608.0 + offset)  # 2^23 + code - (2^23 + zero)
    return codes


@triton.jit
def scaled_up_tile(up_ptr, up_scale_ptr, rows, n0, N, magic, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """fp32 [BR, BLOCK_N] of up_t rows `rows` [BR] (clamped in range), columns n0 .. n0 + BLOCK_N (zero past N),
    scales applied: the correction's slice for one block of output features."""
    u = dequant_tile(up_ptr, rows[:, None], n0, N, N, magic, BITS, BLOCK_N, True)
    if BITS == 8:
        u = u * tl.load(up_scale_ptr + rows)[:, None]
    elif BITS == 4:
        cols = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)
        u = u * tl.load(up_scale_ptr + rows[:, None] * (N // GROUP_SIZE) + (cols // GROUP_SIZE)[None, :])
    return u


@triton.jit
def hybrid_gemv_kernel(
    x_ptr, base_ptr, base_scale_ptr, hidden_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr, ticket_ptr,
    N, K, R, stride_xm, stride_ym, magic,
    BASE_GROUP: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    X_PAIRS: tl.constexpr = False, PRECISE: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    """y[m, n block] = x[m] · Q̂[n block]ᵀ + hidden[m] · up_t[:, n block] + bias, int4 base, on CUDA cores.

    grid = (cdiv(N, BLOCK_N), M); K and BASE_GROUP are multiples of 32, BLOCK_K of 32 (whole 16-byte chunks).
    hidden is the decode workspace (fp32 [M, R]), re-zeroed by the last program of each row (ticket [M]).
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    rows = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)  # clamped, so the hot loop needs no row mask
    T: tl.constexpr = BLOCK_K // 32  # threads along K, 4 words (32 values) each
    row_words = tl.multiple_of(K // 8, 4)
    w_rows_ptr = base_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None, None] * row_words  # [BN, 1, 1]
    scale_rows_ptr = base_scale_ptr + rows[:, None] * (K // BASE_GROUP)  # [BN, 1]
    x_row_ptr = x_ptr + m * stride_xm
    acc = tl.sum(tl.zeros((BLOCK_N, T, 4), dtype=tl.float32), axis=2)  # [BN, T] chunk sums, scaled
    xoff = tl.zeros((T, 4), dtype=tl.float32)  # unused for int4 (its offsets are removed per chunk)
    k_full = K // BLOCK_K * BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        acc, xoff = _shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k0, K, K, magic, 4, BASE_GROUP,
                                    BLOCK_K, X_PAIRS, PRECISE, False)
    if k_full < K:
        acc, xoff = _shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k_full, K, K, magic, 4,
                                    BASE_GROUP, BLOCK_K, X_PAIRS, PRECISE, True)
    y = tl.sum(acc, axis=1)  # [BN]: the one cross-thread reduction of the base
    if USE_PDL:  # phase 1 must be complete before hidden is read
        gdc_wait()
    # The correction: per-thread partial sums over r, reduced across threads once after the loop (no shuffles in it);
    # int8 row scales go on h, not on every element.
    corr = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        rows_r = tl.minimum(r_offs, R - 1)
        h = tl.load(hidden_ptr + m * R + r_offs, mask=r_offs < R, other=0.0)  # [BR] fp32
        if BITS == 8:
            h = h * tl.load(up_scale_ptr + rows_r)
            u = dequant_tile(up_ptr, rows_r[:, None], n0, N, N, magic, BITS, BLOCK_N, True)  # [BR, BN]
        else:
            u = scaled_up_tile(up_ptr, up_scale_ptr, rows_r, n0, N, magic, BITS, GROUP_SIZE, BLOCK_N)
        corr += h[:, None] * u
    y += tl.sum(corr, axis=0)
    n_offs = n0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n_offs, mask=n_offs < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n_offs, y.to(y_ptr.dtype.element_ty), mask=n_offs < N)
    release_hidden(hidden_ptr, ticket_ptr, m, tl.num_programs(0), m, m + 1, R, 1, BLOCK_R)


@triton.jit
def hybrid_tile_kernel(
    x_ptr, base_ptr, base_scale_ptr, base_zero_ptr, hidden_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr, ticket_ptr,
    M, N, K, R, stride_xm, stride_ym, magic,
    BASE_BITS: tl.constexpr, BASE_GROUP: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    RELEASE_HIDDEN: tl.constexpr = False, USE_PDL: tl.constexpr = False, WORDS: tl.constexpr = False,
):
    """y[m block, n block] = x · Q̂ᵀ + hidden · up_t + bias on tensor cores. grid = (cdiv(M, BM), cdiv(N, BN)).

    RELEASE_HIDDEN: hidden is the decode workspace (rows of one M block per ticket), re-zeroed after the last read.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = pid_n * BLOCK_N
    n_offs = n0 + tl.arange(0, BLOCK_N)
    rows = tl.minimum(n_offs, N - 1)  # clamped base rows: loads in bounds, outputs past N never stored
    groups = K // BASE_GROUP
    TILE_SCALE: tl.constexpr = BASE_GROUP % BLOCK_K == 0  # one scale (and zero) per row per K tile
    ZERO_POINT: tl.constexpr = BASE_BITS != 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m_offs[:, None] * stride_xm + k_offs[None, :],
                    mask=(m_offs[:, None] < M) & (k_offs < K)[None, :], other=0.0)  # [BM, BK]
        if TILE_SCALE:  # small integers, exact in any activation dtype: the scale goes on the partial product
            group = rows * groups + k0 // BASE_GROUP  # [BN]
            zero = tl.load(base_zero_ptr + group).to(tl.float32)[:, None] if ZERO_POINT else 0.0
            codes = base_codes(base_ptr, rows[:, None], k0, K, magic, zero, BASE_BITS, BLOCK_K, WORDS)  # [BN, BK]
            partial = _dot(x, tl.trans(codes.to(x.dtype)), DOT_PRECISION, DOT_UPCAST)  # [BM, BN]
            acc += partial * tl.load(base_scale_ptr + group)[None, :]
        else:
            group = rows[:, None] * groups + (tl.minimum(k_offs, K - 1) // BASE_GROUP)[None, :]  # [BN, BK]
            zero = tl.load(base_zero_ptr + group).to(tl.float32) if ZERO_POINT else 0.0
            codes = base_codes(base_ptr, rows[:, None], k0, K, magic, zero, BASE_BITS, BLOCK_K, WORDS)
            w = codes * tl.load(base_scale_ptr + group)
            acc += _dot(x, tl.trans(w.to(x.dtype)), DOT_PRECISION, DOT_UPCAST)
    if USE_PDL:  # phase 1 must be complete before hidden is read
        gdc_wait()
    for r0 in range(0, R, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(hidden_ptr + m_offs[:, None] * R + r_offs[None, :],
                    mask=(m_offs[:, None] < M) & (r_offs < R)[None, :], other=0.0)  # [BM, BR] fp32
        u = scaled_up_tile(up_ptr, up_scale_ptr, tl.minimum(r_offs, R - 1), n0, N, magic, BITS, GROUP_SIZE, BLOCK_N)
        acc += _dot(h, u, DOT_PRECISION, DOT_UPCAST)  # [BM, BN]
    _store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, N, HAS_BIAS)
    if RELEASE_HIDDEN:
        release_hidden(hidden_ptr, ticket_ptr, pid_m, tl.num_programs(1), pid_m * BLOCK_M, M, R, BLOCK_M, BLOCK_R)
