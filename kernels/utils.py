"""Building blocks of the Triton kernels (kernels/lowrank_matmul.py, kernels/hybrid_matmul.py): dequantization
lanes, factor tiles, the weight-tile load, the CUDA-core K tile, the dot wrapper, the output store and the decode
workspace release.

Storage (triton_lowrank/quant.py): both factors are [r, features] row-major.
  bits=None: float values.  bits=8: int8, fp32 scale per row [r].
  bits=4: (q+8) nibbles, column 2j low / 2j+1 high, [r, features//2] uint8, fp32 scale per
  `group_size` columns [r, features//group_size].
Scales factor out of the dot products, so they are applied to fp32 partial sums (per row, or
per row and 32-column chunk for int4) instead of to every weight element.

Dequantization (`int8_lane`, `int4_lane`). Weights are
read as int32 words: little-endian, so byte l of word i is int8 column 4i+l and nibble l is int4
column 8i+l. A lane becomes an fp32 value without I2F: masked into the mantissa of a float whose
exponent makes the lane's unit 1 (a "magic number": one LOP3, after a shift shared by two lanes, none for two
of int4's eight).
That value is q plus a known offset; exact mode subtracts it (one FADD), RAW mode keeps it and the
caller subtracts offset x Σ(multipliers) once per sum (the CUDA-core decode kernels: int4 costs
1.375 instructions per value before its FMA, int8 2). The magic 0x4B000000 (2^23) comes in as the run-time
argument `magic`: written as a literal, ptxas re-materializes one of the two constants of each LOP3
with a MOV (bench/sass_report.py counted one extra instruction per weight element).
"""

import triton
import triton.language as tl

FLOAT_BITS = tl.constexpr(0)  # the BITS of unquantized factors

# What int8_lane / int4_lane(..., RAW=True) leave in the values (the caller subtracts it once per sum):
INT8_RAW_OFFSET = tl.constexpr(384.0)  # 2^8 + 128
INT4_EVEN_OFFSET = tl.constexpr(136.0)  # 2^7 + 8: lanes 0, 2, 4, 6
INT4_ODD_OFFSET = tl.constexpr(2056.0)  # 2^11 + 8: lanes 1, 3, 5, 7


def _coalesce_ties_to_lower_dimension() -> bool:
    """Triton's coalescing pass orders a load's dimensions by contiguity, and the CUDA-core tiles tie: a weight tile
    [rows, chunks, 4 words] in rows and chunks, an x tile [chunks, 4 words] of pair loads in both (only a chunk's 4
    words of weights are contiguous). Triton 3.6 puts the threads along the lower tied dimension, 3.7.1, 3.8.0 and
    3.9.0 along the higher; the kernels want them along the chunks in both tiles (bench/results/sass/README.md, "The
    GPU image's Triton")."""
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 7)


# Where a tile's chunks are not the dimension the release prefers, it is loaded through its transpose and transposed
# back (a permute of a distributed tensor moves no data): load_row_chunks, load_chunk_words.
TIES_TO_LOWER_DIMENSION = tl.constexpr(_coalesce_ties_to_lower_dimension())


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

    Odd lanes are read at bits 12..15, under 2^11, and even lanes at bits 16..19, under 2^7, where the nibble's unit
    is 1: value = q + INT4_ODD_OFFSET / INT4_EVEN_OFFSET. Lanes 3 and 4 sit there already, 1 and 2 come from the word
    shifted left by 8, 5 and 6 from it shifted right by 8, 0 and 7 from it rotated by 16 (one funnel shift): three
    shifts per word of 8 values. RAW keeps the offset (3/8 SHF + LOP3 per value); otherwise an exact FADD removes
    it. In a multiply-add chain the offsets cost ~8 (odd) and ~4 (even) of fp32's 24 bits: fine below fp16/bf16
    rounding, not for fp32 activations.
    """
    u = words.to(tl.uint32, bitcast=True)  # logical shifts: the rotate's right half must not bring in sign bits
    if LANE == 1 or LANE == 2:
        u = u << 8
    elif LANE == 5 or LANE == 6:
        u = u >> 8
    elif LANE == 0 or LANE == 7:
        u = (u << 16) | (u >> 16)
    SHIFT: tl.constexpr = 12 if LANE % 2 == 1 else 16
    bits = (u & (0xF << SHIFT)) | (magic - (SHIFT << 23)).to(tl.uint32, bitcast=True)
    value = bits.to(tl.float32, bitcast=True)
    if not RAW:
        value = value - (INT4_ODD_OFFSET if SHIFT == 12 else INT4_EVEN_OFFSET)
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
def _int4_quarter(words, J: tl.constexpr, magic):
    """Quarter J of int4_quarters_fp16: [BN, W] words -> fp16 [BN, 2W]."""
    v = ((words >> (4 * J)) & 0x000F000F) | magic  # two lanes: 1024 + 8 + q of columns 8i + J and 8i + 4 + J
    pair = tl.join(v.to(tl.uint16), (v >> 16).to(tl.uint16))  # [BN, W, 2]
    return pair.reshape(words.shape[0], 2 * words.shape[1]).to(tl.float16, bitcast=True) - 1032.0


@triton.jit
def int4_quarters_fp16(words, magic16):
    """Exact fp16 q of int32 `words` [BN, W] of int4 nibbles (stored q + 8; nibble l of word i is column 8i + l), in
    four quarters [BN, 2W]: quarter j holds columns 8i + j (at 2i) and 8i + 4 + j (at 2i + 1). One 32-bit word
    shifted by 4j and masked (0x000F000F) holds both values of a quarter, each in one 16-bit lane: OR-ed with 1024's
    fp16 bits 0x6400 (`magic16`: at that exponent the unit is 1) a lane is the fp16 1024 + 8 + q, and one exact fp16
    subtraction of 1032 (HADD2, two lanes) gives q. No I2F, no byte extraction or repacking: the two lanes are the
    pair of K-neighbours one 32-bit MMA operand register holds. `magic16` (0x6400) comes in at run time like
    `magic` (a literal constant is re-materialized by ptxas); x meets each quarter through x_quarters (the same K
    permutation on both dot operands)."""
    magic = magic16 | (magic16 << 16)
    return (_int4_quarter(words, 0, magic), _int4_quarter(words, 1, magic), _int4_quarter(words, 2, magic),
            _int4_quarter(words, 3, magic))


@triton.jit
def x_quarters(x):
    """x [BM, BK] -> its four [BM, BK/4] column quarters in int4_quarters_fp16's order: quarter j at 2i + h holds
    column 8i + 4h + j (a K permutation both dot operands share)."""
    x5 = x.reshape(x.shape[0], x.shape[1] // 8, 2, 2, 2)  # column 8i + 4h + 2a + b
    b0, b1 = tl.split(x5)  # [BM, W, 2 (h), 2 (a)]
    j0, j2 = tl.split(b0)  # [BM, W, 2 (h)]
    j1, j3 = tl.split(b1)
    n: tl.constexpr = x.shape[1] // 4
    return (j0.reshape(x.shape[0], n), j1.reshape(x.shape[0], n), j2.reshape(x.shape[0], n),
            j3.reshape(x.shape[0], n))


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
            # [BR, BC/2] zero-extended, shifted so its nibbles sit where int4_lane reads lanes 3 and 4 unshifted: one
            # shift per byte (lanes 0 and 1 of a lone byte would take two)
            byte = packed.to(tl.int32) << 12
            values = tl.join(int4_lane(byte, 3, magic), int4_lane(byte, 4, magic)).reshape(rows.shape[0], BLOCK_C)
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
def dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_UPCAST (set by the launcher only under the Triton
    interpreter, whose bf16 tl.dot returns garbage in Triton 3.9) multiplies in fp32 instead."""
    if DOT_UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


@triton.jit
def store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, n_hi, HAS_BIAS: tl.constexpr):
    """y[m, n] = acc + bias in y's dtype."""
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + n_offs, mask=n_offs < n_hi, other=0.0).to(tl.float32)[None, :]
    mask = (m_offs[:, None] < M) & (n_offs[None, :] < n_hi)
    tl.store(y_ptr + m_offs[:, None] * stride_ym + n_offs[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def x_pair(x_row_ptr, pair, k_hi, X_PAIRS: tl.constexpr, MASKED: tl.constexpr):
    """fp32 x[2 pair] and x[2 pair + 1] for pair indices `pair` [T, 4]: one 32-bit load for both when X_PAIRS
    (16-bit activations, 4-byte aligned rows), else two loads."""
    mask = pair < k_hi // 2 if MASKED else None  # k_hi is even
    if X_PAIRS:
        both = load_chunk_words(x_row_ptr.to(tl.pointer_type(tl.int32)) + pair, mask, MASKED)
        lo = both.to(tl.int16).to(x_row_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        hi = (both >> 16).to(tl.int16).to(x_row_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    else:
        lo = load_chunk_words(x_row_ptr + 2 * pair, mask, MASKED).to(tl.float32)
        hi = load_chunk_words(x_row_ptr + 2 * pair + 1, mask, MASKED).to(tl.float32)
    return lo, hi


@triton.jit
def load_row_chunks(ptrs, ok, MASKED: tl.constexpr):
    """tl.load of a weight tile ptrs [rows, chunks, words], or of its per-chunk scales [rows, chunks] (where `ok`,
    broadcast to it, when MASKED, else 0), with the threads along the chunks on every Triton release: through its
    transpose (rows and chunks swapped) where ties go to the lower dimension (TIES_TO_LOWER_DIMENSION). Without it
    Triton 3.6 put the threads along the rows: each thread loaded every x value of its tile, and phase 2 moved every
    product with a scale through shared memory (16 barriers per iteration)."""
    if TIES_TO_LOWER_DIMENSION:
        if MASKED:
            ok = _swap_rows_chunks(tl.broadcast_to(ok, ptrs.shape))
        ptrs = _swap_rows_chunks(ptrs)
    tile = tl.load(ptrs, mask=ok, other=0) if MASKED else tl.load(ptrs)
    return _swap_rows_chunks(tile) if TIES_TO_LOWER_DIMENSION else tile


@triton.jit
def _swap_rows_chunks(x):
    """x [rows, chunks, words] or [rows, chunks] with its first two dimensions swapped (no data moves)."""
    if len(x.shape) == 3:
        return tl.permute(x, (1, 0, 2))
    else:
        return tl.trans(x)


@triton.jit
def load_chunk_words(ptrs, ok, MASKED: tl.constexpr):
    """tl.load of an x tile ptrs [chunks, words] (where `ok` when MASKED, else 0), with the threads along the chunks
    on every Triton release, matching the weight tile's: through its transpose where ties go to the higher dimension
    (without it Triton 3.9 loaded a whole-K tile's x values across threads and moved them through shared memory)."""
    if not TIES_TO_LOWER_DIMENSION:
        ok = tl.trans(ok) if MASKED else ok
        ptrs = tl.trans(ptrs)
    tile = tl.load(ptrs, mask=ok, other=0) if MASKED else tl.load(ptrs)
    return tile if TIES_TO_LOWER_DIMENSION else tl.trans(tile)


@triton.jit
def shrink_tile_cc(acc, xoff, x_row_ptr, w_rows_ptr, scale_rows_ptr, k0, k_hi, K, magic, BITS: tl.constexpr,
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
    chunk = load_row_chunks(w_rows_ptr + cols[None, :, :], (cols < k_hi // LANES)[None, :, :], MASKED)  # [BR, T, 4]
    if BITS == FLOAT_BITS:
        if MASKED:
            x = tl.load(x_row_ptr + cols, mask=cols < k_hi, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_row_ptr + cols).to(tl.float32)
        acc += chunk.to(tl.float32) * x[None, :, :]
    elif BITS == 8:
        for pair in tl.static_range(2):
            lo, hi = x_pair(x_row_ptr, cols * 2 + pair, k_hi, X_PAIRS, MASKED)
            acc += int8_lane(chunk, 2 * pair, magic, True) * lo[None, :, :]
            acc += int8_lane(chunk, 2 * pair + 1, magic, True) * hi[None, :, :]
            xoff += lo + hi
    else:
        t = tl.zeros(chunk.shape, dtype=tl.float32)
        tile_off = tl.zeros(cols.shape, dtype=tl.float32)
        for pair in tl.static_range(4):
            lo, hi = x_pair(x_row_ptr, cols * 4 + pair, k_hi, X_PAIRS, MASKED)
            t += int4_lane(chunk, 2 * pair, magic, True) * lo[None, :, :]
            t += int4_lane(chunk, 2 * pair + 1, magic, not PRECISE) * hi[None, :, :]
            if PRECISE:  # the odd lanes' larger offset is removed exactly
                tile_off += INT4_EVEN_OFFSET * lo
            else:
                tile_off += INT4_EVEN_OFFSET * lo + INT4_ODD_OFFSET * hi
        group = tl.minimum((k0 + tl.arange(0, T) * 32) // GROUP_SIZE, K // GROUP_SIZE - 1)  # [T]; tail in range
        chunk_sum = tl.sum(t, axis=2) - tl.sum(tile_off, axis=1)[None, :]  # [BR, T]
        acc += chunk_sum * tl.load(scale_rows_ptr + group[None, :])
    return acc, xoff



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
