"""Triton kernels for the hybrid format: y = x · Q̂ᵀ + (x · Dᵀ) · Uᵀ + b straight from the stored codes.

Storage (triton_lowrank/quant.py, hybrid_storage.py): the base Q [out, in] is quantized in groups along `in`.
  int4: (q + 8) nibbles, column 2j low / 2j+1 high, [out, in/2] uint8, fp32 scale per group: the layout of an int4
        factor, so it is read by the same routines (int4_lane, dequant_tile, shrink_tile_cc).
  int2: codes 0..3, column 4j + l at bits 2l, [out, in/4] uint8.
  int3: per row an int2 plane of the low two bits ([in/4] bytes), then a plane of the high bit (column 8j + l at
        bit l, [in/8] bytes): [out, 3 in/8] uint8.
  int3 and int2 have a uint8 zero point per group: w = (code - zero) · scale.
The correction's factors (down [r, in], up_t [r, out]) are low-rank factor storage, read by dequant_tile.

The rank-r intermediate hidden = x · Dᵀ (fp32) comes from the low-rank phase-1 kernels: decode_shrink_kernel for
decode M, shrink_kernel for prefill M. One kernel then does the rest for a block of output features: the base matmul
over all of `in`, the correction as an epilogue (hidden · up_t[:, block]), bias, one store. Under programmatic
dependent launch (sm_90) it starts while phase 1 runs and waits for hidden only before the epilogue, so phase 1 (r·in
factor bytes against out·in·bits/8 base bytes) hides behind the base's stream.
How hidden gets from phase 1 to the epilogue:
- CUDA cores (hybrid_gemv_kernel): decode_shrink_kernel with PARTIALS stores each K split's partial sums into its own
  slice of partials [S, M, R] (plain stores into a buffer of its own, any content on entry: launch.partials_buffer);
  the epilogue adds the S slices as it reads hidden (_hidden_rows). No zeroed workspace, no ticket, no atomics in
  either kernel, so nothing has to be left zero for the next call.
- tensor cores at decode M (hybrid_tile_kernel, RELEASE_HIDDEN): decode_shrink_kernel adds into the zeroed decode
  workspace with atomics; the last program of each M block re-zeroes it (utils.release_hidden: an atomic ticket).

- hybrid_gemv_kernel: M = 1, CUDA cores. Each program owns BLOCK_N base rows; each thread multiply-adds 16-byte
  chunks of its rows (the low-rank phase-1 tile, utils.shrink_tile_cc), one cross-thread reduction per row. The
  correction's up_t slice (int8 words: all of it when R <= UP_ROWS, e.g. 32 rows x 32 bytes per CTA: one 128-bit load
  per thread), its row scales and the bias are loaded before the dependent-launch wait: after it, the partials' round
  trip is the only one.
- hybrid_tile_kernel: tensor cores for everything else (M > 1, int3 and int2 bases, rows that are not whole 16-byte
  chunks): [BLOCK_M, BLOCK_N] output tiles, the base codes of each [BLOCK_N, BLOCK_K] tile exact in the activation
  dtype, the group scale applied to the partial product when BLOCK_K divides the group (per element otherwise). An
  int4 base meets fp16 x in quarters (utils.int4_quarters_fp16): its tile read as 32-bit words, each word shifted,
  masked and OR-ed with the fp16 magic number (two values per 32-bit operation, already paired as the MMA operand
  wants them), x split into the matching column quarters; the base's copies are 128 bits wide.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .utils import (
    INT8_RAW_OFFSET,
    dequant_tile,
    dot,
    int4_halves_fp16,
    int4_quarters_fp16,
    int8_lane,
    load_row_chunks,
    release_hidden,
    shrink_tile_cc,
    store_output,
    x_pair,
    x_quarters,
)


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
               WORDS: tl.constexpr = False, OUT_DTYPE: tl.constexpr = tl.float32):
    """[BN, BLOCK_K] of base rows `rows` [BN, 1], columns k0 .. k0 + BLOCK_K (masked at K), not scaled: int4 the
    signed value q, exact in OUT_DTYPE (the dot operand's); int3/int2 the unsigned code minus `offset` (the zero
    point, [BN, 1] or [BN, BK]) in fp32. Each plane is read once, contiguously (WORDS: as 32-bit words). A code
    becomes fp32 without I2F: OR-ed into the mantissa of 2^23 (`magic`), then one FADD removes 2^23 and the zero
    point together."""
    if BASE_BITS == 4:
        codes = dequant_tile(base_ptr, rows, k0, K, K, magic, 4, BLOCK_K, True, OUT_DTYPE)
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
def _low_lane(s0, s1, s2, s3, L: tl.constexpr, magic):
    """fp32 2^(23 - Q) + f of the 2-bit field L (bits 2L, 2L+1) of each word, from the word shifted so that fields
    5G .. 5G+4 sit at bits Q = 12, 14, .., 20 (s0..s3: shifted left 12, left 2, right 8, right 18): a LOP3 that
    masks the field into the mantissa of a float whose unit there is 1. RAW: the offset stays (see int4_lane)."""
    G: tl.constexpr = L // 5
    Q: tl.constexpr = 12 + 2 * (L - 5 * G)
    if G == 0:
        w = s0
    elif G == 1:
        w = s1
    elif G == 2:
        w = s2
    else:
        w = s3
    return ((w & (3 << Q)) | (magic - (Q << 23))).to(tl.float32, bitcast=True)


@triton.jit
def _high_lane(h0, h1, L: tl.constexpr, magic):
    """fp32 2^(25 - Q) + 4 b of bit L of each word's low half (int3's high bit, worth 4), from the half shifted so
    that bits 0..10 / 11..15 sit at Q = 12..22 / 12..16 (h0: left 12, h1: left 1)."""
    G: tl.constexpr = L // 11
    Q: tl.constexpr = 12 + L - 11 * G
    w = h0 if G == 0 else h1
    return ((w & (1 << Q)) | (magic - ((Q - 2) << 23))).to(tl.float32, bitcast=True)


@triton.jit
def _zero_point_lane(t, tile_off, x_sum, x, s0, s1, s2, s3, h0, h1, L: tl.constexpr, magic, BASE_BITS: tl.constexpr,
                     PRECISE: tl.constexpr):
    """Column 16 w + L of every word w: t [BN, T, 4] += code value x x [T, 4], keeping the value's RAW offset (its
    Σ offset x x goes into tile_off, shared by all rows) unless PRECISE; x_sum += x (for the zero points)."""
    Q: tl.constexpr = 12 + 2 * (L - 5 * (L // 5))
    QH: tl.constexpr = 12 + L - 11 * (L // 11)
    OFFSET: tl.constexpr = (1 << (23 - Q)) + ((1 << (25 - QH)) if BASE_BITS == 3 else 0)
    value = _low_lane(s0, s1, s2, s3, L, magic)
    if BASE_BITS == 3:
        value = value + _high_lane(h0, h1, L, magic)  # (2^a + low) + (2^b + 4 high): exact
    if PRECISE:
        value = value - OFFSET
    else:
        tile_off += OFFSET * x
    t += value * x[None, :, :]
    x_sum += x
    return t, tile_off, x_sum


@triton.jit
def _u8_to_f32(byte, magic):
    """fp32 of uint8 values without I2F: in the mantissa of 2^23, which one FADD removes."""
    return (byte.to(tl.int32) | magic).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _zero_point_tile_cc(acc, x_row_ptr, low_rows_ptr, scale_rows_ptr, zero_rows_ptr, k0, k_hi, K, magic,
                        BASE_BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                        X_PAIRS: tl.constexpr, PRECISE: tl.constexpr, MASKED: tl.constexpr):
    """One K tile of an int3/int2 base row block on CUDA cores: acc [BN, T] += Σ x · (code - zero) · scale per
    64-column chunk (a chunk lies in one group). Each thread owns 4 words of the 2-bit plane (64 columns: one
    128-bit load per row) and, for int3, the 2 words of the high-bit plane beside them (one 64-bit load).
    Codes keep RAW offsets (subtracted per chunk through Σ offset · x, shared by all rows) unless PRECISE."""
    T: tl.constexpr = BLOCK_K // 64
    words = tl.multiple_of(k0 // 16, 4) + tl.arange(0, T)[:, None] * 4 + tl.arange(0, 4)[None, :]  # [T, 4]
    low = load_row_chunks(low_rows_ptr + words[None, :, :], (words < k_hi // 16)[None, :, :], MASKED)  # [BN, T, 4]
    s0 = low << 12
    s1 = low << 2
    s2 = low >> 8
    s3 = low >> 18
    if BASE_BITS == 3:  # the high-bit plane follows the 2-bit plane (K // 16 words) in each row
        high_words = tl.multiple_of(k0 // 32, 2) + tl.arange(0, T)[:, None] * 2 + tl.arange(0, 2)[None, :]  # [T, 2]
        high_ptr = low_rows_ptr + tl.multiple_of(K // 16, 8) + high_words[None, :, :]  # K % 128 == 0
        # [BN, T, 2]
        high = load_row_chunks(high_ptr, (high_words < k_hi // 32)[None, :, :], MASKED)
        halves = tl.join(high, high >> 16).reshape(high.shape[0], T, 4)  # word j's 16 high bits, low half
        h0 = halves << 12
        h1 = halves << 1
    else:  # placeholders, never read for int2
        h0 = s0
        h1 = s0
    t = tl.zeros(low.shape, dtype=tl.float32)
    tile_off = tl.zeros(words.shape, dtype=tl.float32)
    x_sum = tl.zeros(words.shape, dtype=tl.float32)
    for pair in tl.static_range(8):  # columns 16 w + 2 pair, 16 w + 2 pair + 1 of each word w
        lo, hi = x_pair(x_row_ptr, words * 8 + pair, k_hi, X_PAIRS, MASKED)
        t, tile_off, x_sum = _zero_point_lane(t, tile_off, x_sum, lo, s0, s1, s2, s3, h0, h1, 2 * pair, magic,
                                              BASE_BITS, PRECISE)
        t, tile_off, x_sum = _zero_point_lane(t, tile_off, x_sum, hi, s0, s1, s2, s3, h0, h1, 2 * pair + 1, magic,
                                              BASE_BITS, PRECISE)
    group = tl.minimum((k0 + tl.arange(0, T) * 64) // GROUP_SIZE, K // GROUP_SIZE - 1)  # [T]; tail in range
    chunk = tl.sum(t, axis=2) - tl.sum(tile_off, axis=1)[None, :]  # [BN, T]: Σ x · code per chunk
    zero = _u8_to_f32(tl.load(zero_rows_ptr + group[None, :]), magic)  # [BN, T]
    acc += (chunk - zero * tl.sum(x_sum, axis=1)[None, :]) * tl.load(scale_rows_ptr + group[None, :])
    return acc


@triton.jit
def _int8_words_step(acc0, acc1, acc2, acc3, h_total, chunk, h, magic):
    """acc_lane [BR, W] += RAW value of byte `lane` of each word x h [BR] (h already scaled); h_total += h."""
    hs = h[:, None]
    acc0 += int8_lane(chunk, 0, magic, True) * hs
    acc1 += int8_lane(chunk, 1, magic, True) * hs
    acc2 += int8_lane(chunk, 2, magic, True) * hs
    acc3 += int8_lane(chunk, 3, magic, True) * hs
    return acc0, acc1, acc2, acc3, h_total + h


@triton.jit
def _int8_up_words(up_ptr, r0, n0, N, R, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """int32 words [BLOCK_R, BLOCK_N / 4] of int8 up_t rows r0 .. r0 + BLOCK_R, columns n0 .. n0 + BLOCK_N: rows past
    R and words past the row masked (no traffic, zeros)."""
    W: tl.constexpr = BLOCK_N // 4
    row_words = N // 4
    words = n0 // 4 + tl.arange(0, W)  # [W] word columns of this block
    r = r0 + tl.arange(0, BLOCK_R)
    mask = (r < R)[:, None] & (words < row_words)[None, :]
    return tl.load(up_ptr.to(tl.pointer_type(tl.int32)) + r[:, None] * row_words + words[None, :], mask=mask, other=0)


@triton.jit
def _hidden_rows(partials_ptr, m, M, R, S, r_offs, S_BLOCK: tl.constexpr):
    """fp32 hidden[m, r_offs] (0 past R) from phase 1's partials [S, M, R] (decode_shrink_kernel, PARTIALS): the sum of
    the S splits' slices, all S_BLOCK x rows loaded at once (one round trip), reduced in registers."""
    s = tl.arange(0, S_BLOCK)
    p = tl.load(partials_ptr + (s[:, None] * M + m) * R + r_offs[None, :],
                mask=(s < S)[:, None] & (r_offs < R)[None, :], other=0.0)
    return tl.sum(p, axis=0)


@triton.jit
def _int8_correction_words(first, first_scale, partials_ptr, m, M, S, up_ptr, up_scale_ptr, n0, N, R, magic,
                           BLOCK_N: tl.constexpr, UP_ROWS: tl.constexpr, ONE_STEP: tl.constexpr,
                           S_BLOCK: tl.constexpr):
    """fp32 [BLOCK_N]: Σ_r hidden[r] · s_r · up_t[r, n0 .. n0 + BLOCK_N] for int8 up_t rows read as 32-bit words,
    UP_ROWS rows per step, hidden summed from phase 1's partials (_hidden_rows). `first` is the first step's rows
    (_int8_up_words at row 0) and `first_scale` their row scales, both loaded before the dependent-launch wait (up_t
    does not depend on phase 1), so the partials' round trip is the only one after it. ONE_STEP
    (R <= UP_ROWS): that is the whole slice, and there is no loop; otherwise each iteration loads the next step's rows
    before it consumes the current ones. The bytes keep int8_lane's RAW offset (SHF + LOP3 + FFMA per value);
    offset · Σ h·s comes off once at the end. Rows past R are masked (h = 0)."""
    W: tl.constexpr = BLOCK_N // 4
    r = tl.arange(0, UP_ROWS)
    acc0 = tl.zeros((UP_ROWS, W), dtype=tl.float32)
    acc1 = tl.zeros_like(acc0)
    acc2 = tl.zeros_like(acc0)
    acc3 = tl.zeros_like(acc0)
    h_total = tl.zeros((UP_ROWS,), dtype=tl.float32)
    if ONE_STEP:
        h = _hidden_rows(partials_ptr, m, M, R, S, r, S_BLOCK) * first_scale
        acc0, acc1, acc2, acc3, h_total = _int8_words_step(acc0, acc1, acc2, acc3, h_total, first, h, magic)
    else:
        chunk = first
        for r0 in range(0, R, UP_ROWS):
            nxt = _int8_up_words(up_ptr, r0 + UP_ROWS, n0, N, R, BLOCK_N, UP_ROWS)
            h = _hidden_rows(partials_ptr, m, M, R, S, r0 + r, S_BLOCK) * tl.load(up_scale_ptr + r0 + r,
                                                                                   mask=r0 + r < R, other=0.0)
            acc0, acc1, acc2, acc3, h_total = _int8_words_step(acc0, acc1, acc2, acc3, h_total, chunk, h, magic)
            chunk = nxt
    offset = INT8_RAW_OFFSET * tl.sum(h_total, axis=0)
    c0 = tl.sum(acc0, axis=0) - offset  # [W]: columns 4w
    c1 = tl.sum(acc1, axis=0) - offset
    c2 = tl.sum(acc2, axis=0) - offset
    c3 = tl.sum(acc3, axis=0) - offset
    return tl.join(tl.join(c0, c2), tl.join(c1, c3)).reshape(BLOCK_N)


@triton.jit
def hybrid_gemv_kernel(
    x_ptr, base_ptr, base_scale_ptr, base_zero_ptr, partials_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr,
    N, K, R, S, stride_xm, stride_ym, magic,
    BASE_BITS: tl.constexpr, BASE_GROUP: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    X_PAIRS: tl.constexpr = False, PRECISE: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    UP_WORDS: tl.constexpr = False, S_BLOCK: tl.constexpr = 1, UP_ROWS: tl.constexpr = 16,
    UP_ONE_STEP: tl.constexpr = False, EVEN_K: tl.constexpr = False,
):
    """y[m, n block] = x[m] · Q̂[n block]ᵀ + hidden[m] · up_t[:, n block] + bias on CUDA cores.

    grid = (cdiv(N, BLOCK_N), M). int4: K, BASE_GROUP and BLOCK_K multiples of 32 (whole 16-byte chunks); int2 and
    int3: multiples of 64 (int3: K of 128, so rows stay 16-byte aligned). hidden[m] is the sum of phase 1's S partial
    sums, partials [S, M, R] fp32 (decode_shrink_kernel with PARTIALS; S <= S_BLOCK): read only, no workspace to
    re-zero, no ticket, no atomics. UP_WORDS: int8 up_t rows of whole 32-bit words (N % 4 == 0), read as words,
    UP_ROWS rows per step (UP_ONE_STEP: R <= UP_ROWS, the whole slice in one step); otherwise BLOCK_R rows per step.
    EVEN_K: K is whole BLOCK_K tiles, so the base's masked tail tile is not compiled (it would never run).
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    M = tl.num_programs(1)
    n0 = pid_n * BLOCK_N
    rows = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)  # clamped, so the hot loop needs no row mask
    row_words = tl.multiple_of(K * BASE_BITS // 32, 4)
    w_rows_ptr = base_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None, None] * row_words  # [BN, 1, 1]
    scale_rows_ptr = base_scale_ptr + rows[:, None] * (K // BASE_GROUP)  # [BN, 1]
    x_row_ptr = x_ptr + m * stride_xm
    k_full = K // BLOCK_K * BLOCK_K
    if BASE_BITS == 4:
        T: tl.constexpr = BLOCK_K // 32  # threads along K, 4 words (32 values) each
        acc = tl.sum(tl.zeros((BLOCK_N, T, 4), dtype=tl.float32), axis=2)  # [BN, T] chunk sums, scaled
        xoff = tl.zeros((T, 4), dtype=tl.float32)  # unused for int4 (its offsets are removed per chunk)
        for k0 in range(0, k_full, BLOCK_K):
            acc, xoff = shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k0, K, K, magic, 4,
                                        BASE_GROUP, BLOCK_K, X_PAIRS, PRECISE, False)
        if not EVEN_K and k_full < K:
            acc, xoff = shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k_full, K, K, magic, 4,
                                        BASE_GROUP, BLOCK_K, X_PAIRS, PRECISE, True)
    else:
        T2: tl.constexpr = BLOCK_K // 64  # threads along K, 64 columns each
        acc = tl.sum(tl.zeros((BLOCK_N, T2, 4), dtype=tl.float32), axis=2)  # [BN, T]
        zero_rows_ptr = base_zero_ptr + rows[:, None] * (K // BASE_GROUP)  # [BN, 1]
        for k0 in range(0, k_full, BLOCK_K):
            acc = _zero_point_tile_cc(acc, x_row_ptr, w_rows_ptr, scale_rows_ptr, zero_rows_ptr, k0, K, K, magic,
                                      BASE_BITS, BASE_GROUP, BLOCK_K, X_PAIRS, PRECISE, False)
        if not EVEN_K and k_full < K:
            acc = _zero_point_tile_cc(acc, x_row_ptr, w_rows_ptr, scale_rows_ptr, zero_rows_ptr, k_full, K, K, magic,
                                      BASE_BITS, BASE_GROUP, BLOCK_K, X_PAIRS, PRECISE, True)
    if BITS == 8 and UP_WORDS:  # the correction's first up_t rows (all of them: UP_ONE_STEP): no phase-1 dependence
        first = _int8_up_words(up_ptr, 0, n0, N, R, BLOCK_N, UP_ROWS)
        up_rows = tl.arange(0, UP_ROWS)
        first_scale = tl.load(up_scale_ptr + up_rows, mask=up_rows < R, other=0.0)
    n_offs = n0 + tl.arange(0, BLOCK_N)
    y = tl.sum(acc, axis=1)  # [BN]: the one cross-thread reduction of the base
    if HAS_BIAS:  # before the wait too: after it, the partials' round trip is the only one
        y += tl.load(bias_ptr + n_offs, mask=n_offs < N, other=0.0).to(tl.float32)
    if USE_PDL:  # phase 1 must be complete before its partials are read
        gdc_wait()
    # The correction: per-thread partial sums over r, reduced across threads once after the loop (no shuffles in it);
    # int8 row scales go on h, not on every element.
    if BITS == 8 and UP_WORDS:
        y += _int8_correction_words(first, first_scale, partials_ptr, m, M, S, up_ptr, up_scale_ptr, n0, N, R, magic,
                                    BLOCK_N, UP_ROWS, UP_ONE_STEP, S_BLOCK)
    else:
        corr = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r_offs = r0 + tl.arange(0, BLOCK_R)
            rows_r = tl.minimum(r_offs, R - 1)
            h = _hidden_rows(partials_ptr, m, M, R, S, r_offs, S_BLOCK)  # [BR] fp32
            if BITS == 8:
                h = h * tl.load(up_scale_ptr + rows_r)
                u = dequant_tile(up_ptr, rows_r[:, None], n0, N, N, magic, BITS, BLOCK_N, True)  # [BR, BN]
            else:
                u = scaled_up_tile(up_ptr, up_scale_ptr, rows_r, n0, N, magic, BITS, GROUP_SIZE, BLOCK_N)
            corr += h[:, None] * u
        y += tl.sum(corr, axis=0)
    tl.store(y_ptr + m * stride_ym + n_offs, y.to(y_ptr.dtype.element_ty), mask=n_offs < N)


@triton.jit
def _phase_codes(low, high, zero16, P: tl.constexpr, BASE_BITS: tl.constexpr):
    """fp16 code - zero of column phase P: field P % 4 of `low` (the 2-bit plane byte holding the phase; int2: the
    only byte) with, for int3, bit P of `high` worth 4. Put under the mantissa of 1024 (fp16 unit 1 there), minus
    1024 + zero: exact small integers, no conversion instruction."""
    code = (low >> (2 * (P % 4))) & 3
    if BASE_BITS == 3:
        code = code | (((high >> P) & 1) << 2)
    return (code | 0x6400).to(tl.float16, bitcast=True) - zero16


@triton.jit
def _zero_point_phasesdot(x, base_ptr, rows, k0, K, zero, BASE_BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """x [BM, BK] (fp16) · (codes - zero)ᵀ over one K tile of an int2/int3 base, [BM, BN] (unscaled). Column c = 4i + p
    (int2) / 8i + p (int3): x is split into its column phases (a K permutation both operands share), and phase p's
    codes come straight from their bytes, so nothing is interleaved. K is a whole number of tiles (TILE_SCALE)."""
    zero16 = (zero.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)[:, None]  # [BN, 1]: 1024 + zero, no I2F
    # K is a multiple of BLOCK_K (>= 64 for int2, >= 128 for int3), so rows and the high plane start 16-byte aligned
    row_bytes = tl.multiple_of(K * BASE_BITS // 8, 16)
    if BASE_BITS == 2:
        low = tl.load(base_ptr + rows[:, None] * row_bytes + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :])
        low = low.to(tl.uint16)  # [BN, BK/4]: byte i holds columns 4i .. 4i + 3
        x_d0, x_d1 = tl.split(x.reshape(BLOCK_M, BLOCK_K // 4, 2, 2))  # column 4i + 2b + d
        x0, x2 = tl.split(x_d0)
        x1, x3 = tl.split(x_d1)  # [BM, BK/4] each: columns 4i + p
        out = dot(x0, tl.trans(_phase_codes(low, low, zero16, 0, 2)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x1, tl.trans(_phase_codes(low, low, zero16, 1, 2)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x2, tl.trans(_phase_codes(low, low, zero16, 2, 2)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x3, tl.trans(_phase_codes(low, low, zero16, 3, 2)), DOT_PRECISION, DOT_UPCAST)
    else:
        row_ptr = base_ptr + rows[:, None] * row_bytes
        low = tl.load(row_ptr + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]).to(tl.uint16)  # [BN, BK/4]
        # bytes 2i / 2i + 1: columns 8i + 0..3 / 8i + 4..7
        low_a, low_b = tl.split(low.reshape(low.shape[0], BLOCK_K // 8, 2))
        high_ptr = row_ptr + tl.multiple_of(K // 4, 16) + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
        high = tl.load(high_ptr).to(tl.uint16)  # [BN, BK/8]
        x_d0, x_d1 = tl.split(x.reshape(BLOCK_M, BLOCK_K // 8, 2, 2, 2))  # column 8i + 4a + 2b + d
        x_b0d0, x_b1d0 = tl.split(x_d0)
        x_b0d1, x_b1d1 = tl.split(x_d1)
        x0, x4 = tl.split(x_b0d0)
        x2, x6 = tl.split(x_b1d0)
        x1, x5 = tl.split(x_b0d1)
        x3, x7 = tl.split(x_b1d1)  # [BM, BK/8] each: columns 8i + p
        out = dot(x0, tl.trans(_phase_codes(low_a, high, zero16, 0, 3)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x1, tl.trans(_phase_codes(low_a, high, zero16, 1, 3)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x2, tl.trans(_phase_codes(low_a, high, zero16, 2, 3)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x3, tl.trans(_phase_codes(low_a, high, zero16, 3, 3)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x4, tl.trans(_phase_codes(low_b, high, zero16, 4, 3)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x5, tl.trans(_phase_codes(low_b, high, zero16, 5, 3)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x6, tl.trans(_phase_codes(low_b, high, zero16, 6, 3)), DOT_PRECISION, DOT_UPCAST)
        out += dot(x7, tl.trans(_phase_codes(low_b, high, zero16, 7, 3)), DOT_PRECISION, DOT_UPCAST)
    return out


@triton.jit
def hybrid_tile_kernel(
    x_ptr, base_ptr, base_scale_ptr, base_zero_ptr, hidden_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr, ticket_ptr,
    M, N, K, R, stride_xm, stride_ym, magic, magic16,
    BASE_BITS: tl.constexpr, BASE_GROUP: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    RELEASE_HIDDEN: tl.constexpr = False, USE_PDL: tl.constexpr = False, WORDS: tl.constexpr = False,
    HALVES: tl.constexpr = False,
):
    """y[m block, n block] = x · Q̂ᵀ + hidden · up_t + bias on tensor cores. grid = (cdiv(M, BM), cdiv(N, BN)).

    RELEASE_HIDDEN: hidden is the decode workspace (rows of one M block per ticket), re-zeroed after the last read.
    HALVES: fp16 x: int4 nibbles dequantized in four quarters from 32-bit words (int4_quarters_fp16: K tiles of 64
    columns or more and M tiles of up to 32 rows, where x's quarter split costs little) or two halves from bytes
    (int4_halves_fp16: 32-column K tiles and prefill tiles; at 128x128 the quarters spill), int2/int3 codes by column
    phase; no interleave. Both read the int4 base in 128-bit copies.
    magic16: 0x6400, the fp16 magic number (launch.MAGIC16).
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
    PHASE_K: tl.constexpr = 64 if BASE_BITS == 2 else 128  # int2 / int3 by column phase: 16 columns per phase dot
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m_offs[:, None] * stride_xm + k_offs[None, :],
                    mask=(m_offs[:, None] < M) & (k_offs < K)[None, :], other=0.0)  # [BM, BK]
        if TILE_SCALE and BASE_BITS == 4 and HALVES and BLOCK_K >= 64 and BLOCK_M <= 32:
            # int4 and fp16 x in quarters (int4_quarters_fp16): the tile read as 32-bit words (128-bit loads, K % 32
            # == 0 here: BLOCK_K divides the group, which divides K), each word's lanes dequantized in place by
            # the fp16 magic number, x split into the matching column quarters (the small tile) for four dots.
            # 4096->11008 int4 g128 + r32 at M = 16 (sm_90 SASS, 64 x 128 tiles): 6.3 thread-instructions per base
            # byte (11.0 before: 64-bit copies, bytes widened with 128 PRMT per 16 HMMA)
            group = rows * groups + k0 // BASE_GROUP  # [BN]
            words_ptr = base_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * tl.multiple_of(K // 8, 4)
            words = tl.load(words_ptr + (tl.multiple_of(k0 // 8, 8) + tl.arange(0, BLOCK_K // 8))[None, :])
            q0, q1, q2, q3 = int4_quarters_fp16(words, magic16)  # [BN, BK/4] each
            x0, x1, x2, x3 = x_quarters(x)  # [BM, BK/4] each
            partial = dot(x0, tl.trans(q0), DOT_PRECISION, DOT_UPCAST) + dot(x1, tl.trans(q1), DOT_PRECISION,
                                                                              DOT_UPCAST)
            partial += dot(x2, tl.trans(q2), DOT_PRECISION, DOT_UPCAST) + dot(x3, tl.trans(q3), DOT_PRECISION,
                                                                               DOT_UPCAST)
            acc += partial * tl.load(base_scale_ptr + group)[None, :]
        elif TILE_SCALE and BASE_BITS == 4 and HALVES:
            # int4 and fp16 x: no nibble interleave. The even and odd columns of x meet the low and high nibbles in
            # two dots (a K permutation both sides share); splitting the small x tile is cheaper than interleaving
            # the weight tile.
            group = rows * groups + k0 // BASE_GROUP  # [BN]
            byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            # no mask: BLOCK_K divides the group (TILE_SCALE), which divides K
            # K % 32 == 0 (BLOCK_K >= 32 divides it): rows start 16-byte aligned (128-bit copies)
            packed = tl.load(base_ptr + rows[:, None] * tl.multiple_of(K // 2, 16) + byte_cols[None, :])  # [BN, BK/2]
            lo, hi = int4_halves_fp16(packed)
            x_even, x_odd = tl.split(x.reshape(BLOCK_M, BLOCK_K // 2, 2))  # [BM, BK/2] each
            partial = dot(x_even, tl.trans(lo), DOT_PRECISION, DOT_UPCAST) + \
                dot(x_odd, tl.trans(hi), DOT_PRECISION, DOT_UPCAST)  # [BM, BN]
            acc += partial * tl.load(base_scale_ptr + group)[None, :]
        elif TILE_SCALE and HALVES and BASE_BITS != 4 and BLOCK_K >= PHASE_K:
            # int2 (4 phases, BLOCK_K >= 64) / int3 (8 phases, >= 128) and fp16 x: the same K permutation, by column
            # phase mod 4 / 8, so every code comes from its byte without an interleave
            group = rows * groups + k0 // BASE_GROUP  # [BN]
            partial = _zero_point_phasesdot(x, base_ptr, rows, k0, K, tl.load(base_zero_ptr + group), BASE_BITS,
                                             BLOCK_M, BLOCK_K, DOT_PRECISION, DOT_UPCAST)  # [BM, BN]
            acc += partial * tl.load(base_scale_ptr + group)[None, :]
        elif TILE_SCALE:  # small integers, exact in any activation dtype: the scale goes on the partial product
            group = rows * groups + k0 // BASE_GROUP  # [BN]
            zero = tl.load(base_zero_ptr + group).to(tl.float32)[:, None] if ZERO_POINT else 0.0
            codes = base_codes(base_ptr, rows[:, None], k0, K, magic, zero, BASE_BITS, BLOCK_K, WORDS,
                               x.dtype)  # [BN, BK]
            partial = dot(x, tl.trans(codes.to(x.dtype)), DOT_PRECISION, DOT_UPCAST)  # [BM, BN]
            acc += partial * tl.load(base_scale_ptr + group)[None, :]
        else:
            group = rows[:, None] * groups + (tl.minimum(k_offs, K - 1) // BASE_GROUP)[None, :]  # [BN, BK]
            zero = tl.load(base_zero_ptr + group).to(tl.float32) if ZERO_POINT else 0.0
            codes = base_codes(base_ptr, rows[:, None], k0, K, magic, zero, BASE_BITS, BLOCK_K, WORDS)
            w = codes * tl.load(base_scale_ptr + group)
            acc += dot(x, tl.trans(w.to(x.dtype)), DOT_PRECISION, DOT_UPCAST)
    if USE_PDL:  # phase 1 must be complete before hidden is read
        gdc_wait()
    for r0 in range(0, R, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(hidden_ptr + m_offs[:, None] * R + r_offs[None, :],
                    mask=(m_offs[:, None] < M) & (r_offs < R)[None, :], other=0.0)  # [BM, BR] fp32
        u = scaled_up_tile(up_ptr, up_scale_ptr, tl.minimum(r_offs, R - 1), n0, N, magic, BITS, GROUP_SIZE, BLOCK_N)
        acc += dot(h, u, DOT_PRECISION, DOT_UPCAST)  # [BM, BN]
    store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, N, HAS_BIAS)
    if RELEASE_HIDDEN:
        release_hidden(hidden_ptr, ticket_ptr, pid_m, tl.num_programs(1), pid_m * BLOCK_M, M, R, BLOCK_M, BLOCK_R)
