"""Triton kernels for y = x · (upᵀ·down)ᵀ + b straight from the stored (quantized) factors.

Storage (triton_lowrank/quant.py): both factors are [r, features] row-major.
  bits=None: float values.  bits=8: int8, fp32 scale per row [r].
  bits=4: (q+8) nibbles, column 2j low / 2j+1 high, [r, features//2] uint8, fp32 scale per
  `group_size` columns [r, features//group_size].
Scales factor out of the dot products, so they are applied to fp32 partial sums (per row, or
per row and 32-column chunk for int4) instead of to every weight element.

Dequantization (`int8_lane`, `int4_lane`: the building blocks every kernel here shares). Weights are
read as int32 words: little-endian, so byte l of word i is int8 column 4i+l and nibble l is int4
column 8i+l. A lane becomes an fp32 value without I2F: masked into the mantissa of a float whose
exponent makes the lane's unit 1 (a "magic number": one LOP3, after a shift shared by two lanes).
That value is q plus a known offset; exact mode subtracts it (one FADD), RAW mode keeps it and the
caller subtracts offset x Σ(multipliers) once per sum (the CUDA-core decode kernels: int4 costs
1.5 instructions per value before its FMA, int8 2). The magic 0x4B000000 (2^23) comes in as the run-time
argument `magic`: written as a literal, ptxas re-materializes one of the two constants of each LOP3
with a MOV (bench/sass_report.py counted one extra instruction per weight element).

Kernels:
- decode_shrink_kernel + decode_expand_kernel: the decode path (M <= FUSED_MAX_M). Phase 1 reduces
  the rank-r intermediate across the whole GPU: a grid of (rank block, K split) programs, each
  streaming its [BLOCK_R, k range] slice of `down` once and adding its partial sums into hidden
  [M, r] fp32 with atomics. Phase 2 expands: one program per BLOCK_N output columns streams its
  slice of `up_t` once against all of hidden and writes y (bias added, no atomics). Every factor
  byte is read once, by many CTAs per SM. The last phase-2 program re-zeroes hidden (atomic ticket),
  so the workspace is zero between calls without a memset (CUDA-graph safe). On sm_90 phase 2 is a
  programmatic dependent launch: it starts while phase 1 runs and waits (griddepcontrol) before
  reading hidden.
  BLOCK_M == 1 runs on CUDA cores, one program per row of x: tiles are [rows, threads, 4 words], so
  each thread loads 16 contiguous bytes per row (LDG.128) and keeps fp32 partial sums per (row, word):
  no shuffles or barriers in the hot loops, one cross-thread reduction at the end. In phase 1 the x
  values a thread loads serve all its rows (8 where the grid allows); in phase 2 each thread owns one
  row per sub-tile and per-lane accumulators, and loads several sub-tiles per iteration.
  BLOCK_M >= 16 pads M to 16 rows and uses tl.dot (tensor cores).
- shrink_kernel / expand_kernel: the two-launch prefill path. hidden[M, r] is fp32 in global memory;
  plain tiled GEMMs on tensor cores.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

FLOAT_BITS = tl.constexpr(0)  # the BITS of unquantized factors
# What int8_lane / int4_lane(..., RAW=True) leave in the values (the caller subtracts it once per sum):
INT8_RAW_OFFSET = tl.constexpr(384.0)  # 2^8 + 128
INT4_EVEN_OFFSET = tl.constexpr(2056.0)  # 2^11 + 8: lanes 0, 2, 4, 6
INT4_ODD_OFFSET = tl.constexpr(136.0)  # 2^7 + 8: lanes 1, 3, 5, 7


@triton.jit
def int8_lane(words, LANE: tl.constexpr, magic, RAW: tl.constexpr = False):
    """fp32 value of signed byte LANE (0 = lowest) of each int32 word.

    Exact (RAW False): lanes 0, 1 in place and 2, 3 from the word shifted right by 16 (one shift per word);
    byte XOR 0x80 (offset binary, b + 128) goes into the mantissa of 2^(23 - s) for a lane at bit s, whose
    unit there is 1; an exact FADD removes 2^(23 - s) + 128. LOP3 + FADD per value.
    RAW: the byte is shifted to bits 15..22, under 2^8: value = b + INT8_RAW_OFFSET; SHF + LOP3 per value, no
    FADD. The offset is about 3x the value, so a multiply-add chain of these loses ~2 of fp32's 24 bits.
    """
    if RAW:
        SH: tl.constexpr = 15 - 8 * LANE
        words = words << SH if SH > 0 else words >> -SH
        bits = (words & (0xFF << 15)) ^ (magic - (15 << 23) + (0x80 << 15))
        value = bits.to(tl.float32, bitcast=True)
    else:
        if LANE >= 2:
            words = words >> 16
        SHIFT: tl.constexpr = 8 * (LANE % 2)
        OFFSET: tl.constexpr = 8388736.0 if SHIFT == 0 else 32896.0  # 2^(23 - SHIFT) + 128
        bits = (words & (0xFF << SHIFT)) ^ (magic - (SHIFT << 23) + (0x80 << SHIFT))
        value = bits.to(tl.float32, bitcast=True) - OFFSET
    return value


@triton.jit
def int4_lane(words, LANE: tl.constexpr, magic, RAW: tl.constexpr = False):
    """fp32 value q = nibble - 8 of nibble LANE (0 = lowest) of each int32 word (stored as q + 8).

    Lanes 2j and 2j+1 come from the word shifted by 12 - 8j bits (left 12 and 4, right 4 and 12: one shift per
    two lanes), which puts even lanes at bits 12..15 under 2^11 and odd lanes at bits 16..19 under 2^7, where
    the nibble's unit is 1: value = q + INT4_EVEN_OFFSET / INT4_ODD_OFFSET. RAW keeps that offset (SHF/2 +
    LOP3 per value); otherwise an exact FADD removes it. In a multiply-add chain the offsets cost ~8 (even)
    and ~4 (odd) of fp32's 24 bits: fine below fp16/bf16 rounding, not for fp32 activations.
    """
    SH: tl.constexpr = 12 - 8 * (LANE // 2)
    if SH > 0:
        words = words << SH
    elif SH < 0:
        words = words >> -SH
    SHIFT: tl.constexpr = 12 + 4 * (LANE % 2)
    value = ((words & (0xF << SHIFT)) | (magic - (SHIFT << 23))).to(tl.float32, bitcast=True)
    if not RAW:
        value = value - (INT4_EVEN_OFFSET if SHIFT == 12 else INT4_ODD_OFFSET)
    return value


@triton.jit
def int4_halves_fp16(packed):
    """Exact fp16 q of the low and high nibbles of uint8 `packed` [.., C] (stored q + 8): two [.., C] tensors, the
    even and the odd columns. The nibble goes into the mantissa of 1024, whose unit there is 1, then one exact fp16
    subtraction of 1024 + 8: no fp32 detour, no F2F packing for the dot operand. (bf16 would work the same way with
    0x4300 and 136 on a GPU, but the interpreter cannot check it: its bf16 bitcasts give NaN.)"""
    half = packed.to(tl.uint16)  # zero-extended
    lo = ((half & 0xF) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    hi = ((half >> 4) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    return lo, hi


@triton.jit
def dequant_tile(ptr, rows, col0, col_hi, FEATURES, magic, BITS: tl.constexpr, BLOCK_C: tl.constexpr,
                 MASKED: tl.constexpr, OUT_DTYPE: tl.constexpr = tl.float32):
    """Stored values of factor rows `rows` [BR, 1], columns col0 .. col0 + BLOCK_C (masked at col_hi when
    MASKED), as exact fp32 [BR, BLOCK_C] (int8 and int4 for fp16 OUT_DTYPE: exact fp16), not scaled: the tl.dot
    tiles.
    int4 reads its packed bytes once, contiguously, and interleaves the low and high nibbles."""
    if BITS == 4:
        byte_cols = col0 // 2 + tl.arange(0, BLOCK_C // 2)
        mask = (byte_cols < col_hi // 2)[None, :] if MASKED else None  # col_hi is even
        packed = tl.load(ptr + rows * (FEATURES // 2) + byte_cols[None, :], mask=mask, other=0x88)
        if OUT_DTYPE == tl.float16:  # noqa: SIM300
            lo, hi = int4_halves_fp16(packed)
            values = tl.join(lo, hi).reshape(rows.shape[0], BLOCK_C)
        else:
            byte = packed.to(tl.int32)  # [BR, BC/2], zero-extended
            values = tl.join(int4_lane(byte, 0, magic), int4_lane(byte, 1, magic)).reshape(rows.shape[0], BLOCK_C)
    else:
        cols = col0 + tl.arange(0, BLOCK_C)
        mask = (cols < col_hi)[None, :] if MASKED else None
        raw = tl.load(ptr + rows * FEATURES + cols[None, :], mask=mask, other=0)
        if BITS == 8 and OUT_DTYPE == tl.float16:  # noqa: SIM300 (fp16: (b ^ 0x80) | 0x6400 is 1152 + b)
            offset_binary = (raw.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400
            values = offset_binary.to(tl.float16, bitcast=True) - 1152.0
        elif BITS == 8:
            values = int8_lane(raw.to(tl.int32), 0, magic)
        else:
            values = raw.to(tl.float32)
    return values


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_UPCAST (set by the launcher only under the Triton
    interpreter, whose bf16 tl.dot returns garbage in Triton 3.9) multiplies in fp32 instead."""
    if DOT_UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, n_hi, HAS_BIAS: tl.constexpr):
    """y[m, n] = acc + bias in y's dtype."""
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + n_offs, mask=n_offs < n_hi, other=0.0).to(tl.float32)[None, :]
    mask = (m_offs[:, None] < M) & (n_offs[None, :] < n_hi)
    tl.store(y_ptr + m_offs[:, None] * stride_ym + n_offs[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---- decode path, CUDA cores (BLOCK_M == 1) ----------------------------------------------------------
@triton.jit
def _x_pair(x_row_ptr, pair, k_hi, X_PAIRS: tl.constexpr, MASKED: tl.constexpr):
    """fp32 x[2 pair] and x[2 pair + 1] for pair indices `pair` [T, 4]: one 32-bit load for both when X_PAIRS
    (16-bit activations, 4-byte aligned rows), else two loads."""
    mask = pair < k_hi // 2 if MASKED else None  # k_hi is even
    if X_PAIRS:
        pair_ptr = x_row_ptr.to(tl.pointer_type(tl.int32)) + pair
        both = tl.load(pair_ptr, mask=mask, other=0) if MASKED else tl.load(pair_ptr)
        lo = both.to(tl.int16).to(x_row_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        hi = (both >> 16).to(tl.int16).to(x_row_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    elif MASKED:
        lo = tl.load(x_row_ptr + 2 * pair, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(x_row_ptr + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        lo = tl.load(x_row_ptr + 2 * pair).to(tl.float32)
        hi = tl.load(x_row_ptr + 2 * pair + 1).to(tl.float32)
    return lo, hi


@triton.jit
def _shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k0, k_hi, K, magic, BITS: tl.constexpr,
                    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, X_PAIRS: tl.constexpr, PRECISE: tl.constexpr,
                    MASKED: tl.constexpr):
    """One K tile of phase 1. Each thread owns 4 words (16 bytes: one 128-bit load) of each of its rows and
    multiply-adds their lanes into per-(row, word) partial sums: no data crosses threads in the loop.

    acc [BR, T, 4] (int4: [BR, T], chunk sums scaled per chunk, a chunk lying in one group). Values keep
    their RAW offsets; xoff [T, 4] collects Σ offset * x to subtract (int4: per chunk, here; int8: at the end).
    """
    LANES: tl.constexpr = 4 if BITS == 8 else 8 if BITS == 4 else 1
    T: tl.constexpr = BLOCK_K // (4 * LANES)
    cols = tl.multiple_of(k0 // LANES, 4) + tl.arange(0, T)[:, None] * 4 + tl.arange(0, 4)[None, :]  # [T, 4]
    if MASKED:
        chunk = tl.load(w_rows_ptr + cols[None, :, :], mask=(cols < k_hi // LANES)[None, :, :], other=0)
    else:
        chunk = tl.load(w_rows_ptr + cols[None, :, :])  # [BR, T, 4]
    if BITS == FLOAT_BITS:
        if MASKED:
            x = tl.load(x_row_ptr + cols, mask=cols < k_hi, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_row_ptr + cols).to(tl.float32)
        acc += chunk.to(tl.float32) * x[None, :, :]
    elif BITS == 8:
        for pair in tl.static_range(2):
            lo, hi = _x_pair(x_row_ptr, cols * 2 + pair, k_hi, X_PAIRS, MASKED)
            acc += int8_lane(chunk, 2 * pair, magic, True) * lo[None, :, :]
            acc += int8_lane(chunk, 2 * pair + 1, magic, True) * hi[None, :, :]
            xoff += lo + hi
    else:
        t = tl.zeros(chunk.shape, dtype=tl.float32)
        tile_off = tl.zeros(cols.shape, dtype=tl.float32)
        for pair in tl.static_range(4):
            lo, hi = _x_pair(x_row_ptr, cols * 4 + pair, k_hi, X_PAIRS, MASKED)
            t += int4_lane(chunk, 2 * pair, magic, not PRECISE) * lo[None, :, :]
            t += int4_lane(chunk, 2 * pair + 1, magic, True) * hi[None, :, :]
            if PRECISE:
                tile_off += INT4_ODD_OFFSET * hi
            else:
                tile_off += INT4_EVEN_OFFSET * lo + INT4_ODD_OFFSET * hi
        group = tl.minimum((k0 + tl.arange(0, T) * 32) // GROUP_SIZE, K // GROUP_SIZE - 1)  # [T]; tail in range
        chunk_sum = tl.sum(t, axis=2) - tl.sum(tile_off[None, :, :], axis=2)  # [BR, T]
        acc += chunk_sum * tl.load(scale_rows_ptr + group[None, :])
    return acc, xoff


@triton.jit
def _expand_step(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, chunk, h, scale, magic, BITS: tl.constexpr,
                 PRECISE: tl.constexpr):
    """Phase 2, one row per thread: acc_lane [SUB_R, T, 4] += value(chunk, lane) * h' with h' = h * scale.
    Values keep their RAW offsets; hsum [SUB_R, T] collects Σ h' to subtract them at the end."""
    if BITS == 4:  # one scale per (row, chunk)
        hs = h[:, None] * scale  # [SUB_R, T]
        hsum += hs
        hs = hs[:, :, None]
        acc0 += int4_lane(chunk, 0, magic, not PRECISE) * hs
        acc1 += int4_lane(chunk, 1, magic, True) * hs
        acc2 += int4_lane(chunk, 2, magic, not PRECISE) * hs
        acc3 += int4_lane(chunk, 3, magic, True) * hs
        acc4 += int4_lane(chunk, 4, magic, not PRECISE) * hs
        acc5 += int4_lane(chunk, 5, magic, True) * hs
        acc6 += int4_lane(chunk, 6, magic, not PRECISE) * hs
        acc7 += int4_lane(chunk, 7, magic, True) * hs
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
def _store_lane(y_ptr, stride_ym, acc, offset, bias_ptr, cols, LANE: tl.constexpr, LANES: tl.constexpr, m, N,
                HAS_BIAS: tl.constexpr):
    """y[m, cols * LANES + LANE] = Σ_rows acc - offset + bias (acc [SUB_R, T, W]: rows reduced across threads once)."""
    n_offs = cols * LANES + LANE  # [T, W]
    out = tl.sum(acc, axis=0) - offset
    n_ok = n_offs < N
    if HAS_BIAS:
        out += tl.load(bias_ptr + n_offs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n_offs, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _expand_scale(up_scale_ptr, rows, starts, N, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """Phase-2 scales of `rows` [SUB_R]: int4 [SUB_R, T] per (row, chunk), int8 [SUB_R] per row, else a dummy."""
    LANES: tl.constexpr = 4 if BITS == 8 else 8 if BITS == 4 else 1
    if BITS == 4:
        scale = tl.load(up_scale_ptr + rows[:, None] * (N // GROUP_SIZE) + ((starts * LANES) // GROUP_SIZE)[None, :])
    elif BITS == 8:
        scale = tl.load(up_scale_ptr + rows)
    else:
        scale = tl.zeros(rows.shape, tl.float32)
    return scale


@triton.jit
def decode_shrink_kernel(
    x_ptr, down_ptr, down_scale_ptr, hidden_ptr, M, K, R, stride_xm, k_per_split, magic,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    X_PAIRS: tl.constexpr = False, PRECISE: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    """Phase 1: hidden[M, R] (fp32, zero on entry) += x[:, k range] · down[:, k range]ᵀ, scales applied.

    grid = (cdiv(R, BLOCK_R), split_k, cdiv(M, BLOCK_M)); k_per_split is a multiple of BLOCK_K.
    USE_PDL: phase 2 is a programmatic dependent launch; it may start (and wait) as soon as every program here has.
    """
    if USE_PDL:
        gdc_launch_dependents()
    pid_r = tl.program_id(0)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    k_full = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K  # end of the unmasked tiles
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
            partial = _dot(x, tl.trans(w.to(x.dtype)), DOT_PRECISION, DOT_UPCAST)  # [BM, BR]
            if TILE_SCALE:  # BLOCK_K divides the group size (configs arrange it)
                partial = partial * tl.load(down_scale_ptr + rows * (K // GROUP_SIZE) + k0 // GROUP_SIZE)[None, :]
            hidden += partial
        if BITS == 8:
            hidden = hidden * tl.load(down_scale_ptr + rows)[None, :]
        mask = (m_offs[:, None] < M) & (r_offs[None, :] < R)
        tl.atomic_add(hidden_ptr + m_offs[:, None] * R + r_offs[None, :], hidden, mask=mask, sem="relaxed")
    else:
        LANES: tl.constexpr = 4 if BITS == 8 else 8 if BITS == 4 else 1
        T: tl.constexpr = BLOCK_K // (4 * LANES)
        row_words = tl.multiple_of(K // LANES, 4)  # rows are 16-byte multiples (configs.decode_supported)
        if BITS == 8 or BITS == 4:
            w_rows_ptr = down_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None, None] * row_words
        else:
            w_rows_ptr = down_ptr + rows[:, None, None] * row_words
        scale_rows_ptr = down_scale_ptr + rows[:, None] * (K // GROUP_SIZE)  # int4 only
        x_row_ptr = x_ptr + m0 * stride_xm
        if BITS == 4:  # (a sum of 3-D zeros: the layout the loop's chunk sums come in)
            acc = tl.sum(tl.zeros((BLOCK_R, T, 4), dtype=tl.float32), axis=2)
        else:
            acc = tl.zeros((BLOCK_R, T, 4), dtype=tl.float32)
        xoff = tl.zeros((T, 4), dtype=tl.float32)
        for k0 in range(k_lo, k_full, BLOCK_K):
            acc, xoff = _shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k0, k_hi, K, magic, BITS,
                                        GROUP_SIZE, BLOCK_K, X_PAIRS, PRECISE, False)
        if k_full < k_hi:
            acc, xoff = _shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k_full, k_hi, K, magic, BITS,
                                        GROUP_SIZE, BLOCK_K, X_PAIRS, PRECISE, True)
        if BITS != 4:
            acc = tl.sum(acc, axis=2)
        hidden = tl.sum(acc, axis=1)  # [BR]: the one cross-thread reduction
        if BITS == 8:  # every row's values kept INT8_RAW_OFFSET: subtract offset * Σx once
            hidden -= INT8_RAW_OFFSET * tl.sum(tl.sum(xoff, axis=1), axis=0)
        if BITS == 8:
            hidden = hidden * tl.load(down_scale_ptr + rows)
        tl.atomic_add(hidden_ptr + m0 * R + r_offs, hidden, mask=r_offs < R, sem="relaxed")


@triton.jit
def decode_expand_kernel(
    hidden_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr, ticket_ptr, M, N, R, stride_ym, magic,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SUB_R: tl.constexpr,
    PRECISE: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    """Phase 2: y[M, n block] = hidden[M, R] · up_t[R, n block] + bias; then the last program of each M block
    re-zeroes its hidden rows and ticket. grid = (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)); ticket [cdiv(M, BM)].
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
            acc += _dot(h, u, DOT_PRECISION, DOT_UPCAST)
        _store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, N, HAS_BIAS)
    else:
        LANES: tl.constexpr = 4 if BITS == 8 else 8 if BITS == 4 else 1
        T: tl.constexpr = BLOCK_N // (4 * LANES)
        row_words = tl.multiple_of(N // LANES, 4)  # rows are 16-byte multiples (configs.decode_supported)
        w_ptr = up_ptr.to(tl.pointer_type(tl.int32)) if BITS == 8 or BITS == 4 else up_ptr
        # each thread owns 4 words of a row; past the last column a chunk is clamped onto the last one
        # (in bounds and aligned without a mask; its outputs are never stored)
        starts = tl.multiple_of(tl.minimum(n0 // LANES + tl.arange(0, T) * 4, row_words - 4), 4)  # [T]
        cols = starts[:, None] + tl.arange(0, 4)[None, :]  # [T, 4] word index
        rows = tl.arange(0, SUB_R)
        w_ptrs = w_ptr + rows[:, None, None] * row_words + cols[None, :, :]  # [SUB_R, T, 4]
        h_ptrs = hidden_ptr + m0 * R + rows
        if BITS == 4:  # one scale per (row, chunk): a chunk lies in one group (configs.decode_supported)
            s_ptrs = up_scale_ptr + rows[:, None] * (N // GROUP_SIZE) + ((starts * LANES) // GROUP_SIZE)[None, :]
            s_stride = N // GROUP_SIZE
        else:
            s_ptrs = up_scale_ptr + rows
            s_stride = 1
        acc0 = tl.zeros((SUB_R, T, 4), dtype=tl.float32)
        acc1 = tl.zeros_like(acc0)
        acc2 = tl.zeros_like(acc0)
        acc3 = tl.zeros_like(acc0)
        acc4 = tl.zeros_like(acc0)
        acc5 = tl.zeros_like(acc0)
        acc6 = tl.zeros_like(acc0)
        acc7 = tl.zeros_like(acc0)
        hsum = tl.sum(tl.zeros_like(acc0), axis=2)  # [SUB_R, T]
        # Main loop over whole BLOCK_R row blocks, no masks: BLOCK_R // SUB_R independent 128-bit loads per thread
        # per iteration (each thread one row of each sub-tile); then one block of clamped rows.
        r_full = R // BLOCK_R * BLOCK_R
        if USE_PDL:  # phase 1 must be complete before hidden is read
            gdc_wait()
        for r0 in range(0, r_full, BLOCK_R):
            for sub in tl.static_range(BLOCK_R // SUB_R):
                r = r0 + sub * SUB_R
                chunk = tl.load(w_ptrs + r * row_words)
                h = tl.load(h_ptrs + r)
                scale = tl.load(s_ptrs + r * s_stride) if BITS != FLOAT_BITS else h
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_step(
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, chunk, h, scale, magic, BITS, PRECISE)
        if r_full < R:  # the last rows: clamped addresses, h = 0 past R
            for sub in tl.static_range(BLOCK_R // SUB_R):
                tail = r_full + sub * SUB_R + rows
                last = tl.minimum(tail, R - 1)
                chunk = tl.load(w_ptr + last[:, None, None] * row_words + cols[None, :, :])
                h = tl.load(hidden_ptr + m0 * R + tail, mask=tail < R, other=0.0)
                scale = _expand_scale(up_scale_ptr, last, starts, N, BITS, GROUP_SIZE)
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum = _expand_step(
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, hsum, chunk, h, scale, magic, BITS, PRECISE)
        cols = n0 // LANES + tl.arange(0, T)[:, None] * 4 + tl.arange(0, 4)[None, :]  # unclamped: stores
        # the lanes' RAW offsets times Σ h' (per chunk): [T, 1]
        h_total = tl.sum(hsum, axis=0)[:, None]
        if BITS == 8:
            even = INT8_RAW_OFFSET * h_total
            odd = even
        elif BITS == 4:
            even = 0.0 if PRECISE else INT4_EVEN_OFFSET * h_total
            odd = INT4_ODD_OFFSET * h_total
        else:
            even = 0.0
            odd = 0.0
        _store_lane(y_ptr, stride_ym, acc0, even, bias_ptr, cols, 0, LANES, m0, N, HAS_BIAS)
        if LANES > 1:
            _store_lane(y_ptr, stride_ym, acc1, odd, bias_ptr, cols, 1, LANES, m0, N, HAS_BIAS)
            _store_lane(y_ptr, stride_ym, acc2, even, bias_ptr, cols, 2, LANES, m0, N, HAS_BIAS)
            _store_lane(y_ptr, stride_ym, acc3, odd, bias_ptr, cols, 3, LANES, m0, N, HAS_BIAS)
        if LANES > 4:
            _store_lane(y_ptr, stride_ym, acc4, even, bias_ptr, cols, 4, LANES, m0, N, HAS_BIAS)
            _store_lane(y_ptr, stride_ym, acc5, odd, bias_ptr, cols, 5, LANES, m0, N, HAS_BIAS)
            _store_lane(y_ptr, stride_ym, acc6, even, bias_ptr, cols, 6, LANES, m0, N, HAS_BIAS)
            _store_lane(y_ptr, stride_ym, acc7, odd, bias_ptr, cols, 7, LANES, m0, N, HAS_BIAS)

    release_hidden(hidden_ptr, ticket_ptr, pid_m, tl.num_programs(0), m0, M, R, BLOCK_M, BLOCK_R)


@triton.jit
def release_hidden(hidden_ptr, ticket_ptr, pid_m, programs, m0, M, R, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Every one of `programs` reading hidden rows m0 .. m0 + BLOCK_M calls this after its last read of them; the
    last to arrive zeroes those rows and its ticket, so the decode workspace is zero for the next call."""
    tl.debug_barrier()  # this program's loads of hidden precede its ticket (acq_rel orders them)
    ticket = tl.atomic_add(ticket_ptr + pid_m, 1, sem="acq_rel")
    if ticket == programs - 1:
        for r0 in range(0, R, BLOCK_R):
            r_offs = r0 + tl.arange(0, BLOCK_R)
            for m in tl.static_range(BLOCK_M):
                row_ok = (r_offs * 0 + m0 + m) < M
                tl.store(hidden_ptr + (m0 + m) * R + r_offs, tl.zeros((BLOCK_R,), tl.float32),
                         mask=(r_offs < R) & row_ok)
        tl.atomic_xchg(ticket_ptr + pid_m, 0, sem="relaxed")


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
        partial = _dot(x, tl.trans(w.to(x.dtype)), DOT_PRECISION, DOT_UPCAST)  # [BM, BR]
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
            partial = _dot(hidden.to(y_ptr.dtype.element_ty), u.to(y_ptr.dtype.element_ty), DOT_PRECISION, DOT_UPCAST)
        else:
            partial = _dot(hidden, u, DOT_PRECISION, DOT_UPCAST)
        acc += partial
    _store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, N, HAS_BIAS)
