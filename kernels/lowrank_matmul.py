"""Triton kernels for y = x · (upᵀ·down)ᵀ + b straight from the stored (quantized) factors.

Storage (triton_lowrank/quant.py): both factors are [r, features] row-major.
  bits=None: float values.  bits=8: int8, fp32 scale per row [r].
  bits=4: (q+8) nibbles, column 2j low / 2j+1 high, [r, features//2] uint8, fp32 scale per
  `group_size` columns [r, features//group_size].
Scales factor out of the dot products, so they are applied to fp32 partial sums (per row, or
per row-and-tile for int4) instead of dequantizing every weight element.

Kernels:
- shrink_kernel / expand_kernel: the two-launch path. hidden[M, r] is fp32 in global memory.
- fused_kernel: the one-launch path for decode M. Why this design: at M=1 the cost is bytes,
  and each factor byte must be read once. Splitting the grid over N and recomputing hidden in
  every program re-reads all of `down` per program (r*K bytes times N/BLOCK_N); instead each
  program owns a block of RANK components: it computes its hidden slice [M, BLOCK_R] from its
  own rows of down (read once, kept on chip in fp32) and multiplies it by its own rows of up_t
  (read once). The partial outputs of the r/BLOCK_R programs are summed with fp32 atomics in a
  zero-initialised workspace; the last program to finish an output slice (atomic ticket) adds
  the bias, writes y in the activation dtype and re-zeroes the workspace and the ticket for the
  next call, so there is no memset launch and no host sync (CUDA-graph safe). When r/BLOCK_R
  programs are too few to fill the GPU, SPLIT_N programs share a rank block along `out` and
  each re-reads that block's down rows (L2 hits), or SPLIT_K along `in` for down-heavy shapes.
"""

import triton
import triton.language as tl


@triton.jit
def _load_factor(ptr, r_idx, f_idx, mask, FEATURES, BITS: tl.constexpr):
    """Stored values of factor elements (r_idx, f_idx) (any broadcast shape), not scaled.

    int4 loads the byte of column f twice-over (index f//2) and shifts by (f%2)*4: simplest
    unpack, interpreter-safe, and the duplicate byte addresses coalesce into one transaction.
    """
    if BITS == 4:
        packed = tl.load(ptr + r_idx * (FEATURES // 2) + f_idx // 2, mask=mask, other=0x88)
        values = ((packed.to(tl.int32) >> ((f_idx % 2) * 4)) & 0xF) - 8  # masked -> 8 - 8 = 0
    else:
        values = tl.load(ptr + r_idx * FEATURES + f_idx, mask=mask, other=0)
    return values


@triton.jit
def _load_scale(scale_ptr, r_idx, f_idx, mask, FEATURES, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """fp32 scale of elements (r_idx, f_idx): per row for int8, per (row, group) for int4."""
    if BITS == 8:
        scale = tl.load(scale_ptr + r_idx, mask=mask, other=0.0)
    else:
        scale = tl.load(scale_ptr + r_idx * (FEATURES // GROUP_SIZE) + f_idx // GROUP_SIZE, mask=mask, other=0.0)
    return scale


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
def _shrink_block(
    x_ptr, stride_xm, down_ptr, down_scale_ptr, m_offs, r_offs, k_lo, k_hi, M, K, R,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """hidden[BLOCK_M, BLOCK_R] fp32 = x[m, k_lo:k_hi] · down[r, k_lo:k_hi]ᵀ, scales applied."""
    # One int4 scale per row per K tile when the tile sits inside one group (configs arrange
    # this); otherwise the scale is gathered per element.
    TILE_SCALE: tl.constexpr = BITS == 4 and GROUP_SIZE % BLOCK_K == 0
    hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    r_ok = r_offs < R
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_ok = k_offs < k_hi
        x = tl.load(x_ptr + m_offs[:, None] * stride_xm + k_offs[None, :],
                    mask=(m_offs[:, None] < M) & k_ok[None, :], other=0.0)  # [BM, BK]
        if USE_DOT:  # weights as [BK, BR] for the MMA
            w_mask = k_ok[:, None] & r_ok[None, :]
            # ints go through fp32: exact, and the interpreter's int -> bf16 cast is broken
            w = _load_factor(down_ptr, r_offs[None, :], k_offs[:, None], w_mask, K, BITS).to(tl.float32)  # [BK, BR]
            if BITS == 4 and not TILE_SCALE:
                w = w * _load_scale(down_scale_ptr, r_offs[None, :], k_offs[:, None], w_mask, K, BITS, GROUP_SIZE)
            partial = _dot(x, w.to(x.dtype), DOT_PRECISION, DOT_UPCAST)  # [BM, BR]
        else:  # decode M < 16: broadcast-multiply and reduce on CUDA cores, weights as [BR, BK]
            w_mask = r_ok[:, None] & k_ok[None, :]
            w = _load_factor(down_ptr, r_offs[:, None], k_offs[None, :], w_mask, K, BITS).to(tl.float32)
            if BITS == 4 and not TILE_SCALE:
                w = w * _load_scale(down_scale_ptr, r_offs[:, None], k_offs[None, :], w_mask, K, BITS, GROUP_SIZE)
            partial = tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)  # [BM, BR]
        if TILE_SCALE:
            partial = partial * _load_scale(down_scale_ptr, r_offs, k0, r_ok, K, BITS, GROUP_SIZE)[None, :]
        hidden += partial
    if BITS == 8:  # per-row scale factors out of the whole K sum
        hidden = hidden * _load_scale(down_scale_ptr, r_offs, 0, r_ok, K, BITS, GROUP_SIZE)[None, :]
    return hidden


@triton.jit
def _expand_tile(
    hidden, up_ptr, up_scale_ptr, r_offs, n_offs, n_start, n_hi, N, R,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, USE_DOT: tl.constexpr, LOWP: tl.constexpr,
    LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """partial y[BM, BLOCK_N] fp32 = hidden[BM, BR] · up_t[r, n], scales folded into hidden."""
    TILE_SCALE: tl.constexpr = BITS == 4 and GROUP_SIZE % BLOCK_N == 0
    r_ok = r_offs < R
    u_mask = r_ok[:, None] & (n_offs[None, :] < n_hi)
    u = _load_factor(up_ptr, r_offs[:, None], n_offs[None, :], u_mask, N, BITS).to(tl.float32)  # [BR, BN]
    if BITS == 8 or TILE_SCALE:  # y = Σ_j (hidden_j · s_j) · q_jn: scale the small operand
        hidden = hidden * _load_scale(up_scale_ptr, r_offs, n_start, r_ok, N, BITS, GROUP_SIZE)[None, :]
    elif BITS == 4:
        u = u * _load_scale(up_scale_ptr, r_offs[:, None], n_offs[None, :], u_mask, N, BITS, GROUP_SIZE)
    if USE_DOT and LOWP:
        partial = _dot(hidden.to(LOWP_DTYPE), u.to(LOWP_DTYPE), DOT_PRECISION, DOT_UPCAST)
    elif USE_DOT:
        partial = _dot(hidden, u, DOT_PRECISION, DOT_UPCAST)
    else:
        partial = tl.sum(hidden[:, :, None] * u[None, :, :], axis=1)
    return partial  # [BM, BN] fp32


@triton.jit
def _store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, n_hi, HAS_BIAS: tl.constexpr):
    """y[m, n] = acc + bias in y's dtype."""
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + n_offs, mask=n_offs < n_hi, other=0.0).to(tl.float32)[None, :]
    mask = (m_offs[:, None] < M) & (n_offs[None, :] < n_hi)
    tl.store(y_ptr + m_offs[:, None] * stride_ym + n_offs[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def shrink_kernel(
    x_ptr, down_ptr, down_scale_ptr, hidden_ptr, M, K, R, stride_xm,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """hidden[M, R] fp32 = x[M, K] · dequant(down)[R, K]ᵀ.  grid = (cdiv(M, BM), cdiv(R, BR))."""
    m_offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_offs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    hidden = _shrink_block(x_ptr, stride_xm, down_ptr, down_scale_ptr, m_offs, r_offs, 0, K, M, K, R,
                           BITS, GROUP_SIZE, True, DOT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_R, BLOCK_K)
    mask = (m_offs[:, None] < M) & (r_offs[None, :] < R)
    tl.store(hidden_ptr + m_offs[:, None] * R + r_offs[None, :], hidden, mask=mask)


@triton.jit
def expand_kernel(
    hidden_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr, M, N, R, stride_ym,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, LOWP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[M, N] = hidden[M, R] · dequant(up_t)[R, N] + bias.  grid = (cdiv(M, BM), cdiv(N, BN))."""
    m_offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = tl.program_id(1) * BLOCK_N
    n_offs = n_start + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        h_mask = (m_offs[:, None] < M) & (r_offs[None, :] < R)
        hidden = tl.load(hidden_ptr + m_offs[:, None] * R + r_offs[None, :], mask=h_mask, other=0.0)  # [BM, BR]
        acc += _expand_tile(hidden, up_ptr, up_scale_ptr, r_offs, n_offs, n_start, N, N, R, BITS, GROUP_SIZE,
                            True, LOWP, y_ptr.dtype.element_ty, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
    _store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, N, HAS_BIAS)


@triton.jit
def fused_kernel(
    x_ptr, down_ptr, down_scale_ptr, up_ptr, up_scale_ptr, bias_ptr, y_ptr, ws_ptr, ticket_ptr,
    M, N, K, R, stride_xm, stride_ym, k_per_split, n_per_split, contributions,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WORKSPACE: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    SPLIT_K: tl.constexpr, SPLIT_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One launch. grid = (SPLIT_N, cdiv(R, BR) * SPLIT_K, cdiv(M, BM)).

    ws [M, N] fp32 and ticket [cdiv(M, BM) * SPLIT_N] int32 must be zero on entry; they are
    zero again on exit. `contributions` = rank blocks * K splits adding into each output slice.
    The N split is the fastest grid axis so programs re-reading the same down rows run together.
    """
    pid_ns = tl.program_id(0)
    pid_r = tl.program_id(1) // SPLIT_K
    pid_ks = tl.program_id(1) % SPLIT_K
    pid_m = tl.program_id(2)
    m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_offs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_lo = pid_ks * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    n_lo = pid_ns * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)

    # The rank-r intermediate for this rank block never leaves the chip: [BM, BR] fp32.
    hidden = _shrink_block(x_ptr, stride_xm, down_ptr, down_scale_ptr, m_offs, r_offs, k_lo, k_hi, M, K, R,
                           BITS, GROUP_SIZE, USE_DOT, DOT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_R, BLOCK_K)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        partial = _expand_tile(hidden, up_ptr, up_scale_ptr, r_offs, n_offs, n0, n_hi, N, R, BITS, GROUP_SIZE,
                               USE_DOT, False, tl.float32, DOT_PRECISION, DOT_UPCAST, BLOCK_N)  # [BM, BN] fp32
        if USE_WORKSPACE:
            mask = (m_offs[:, None] < M) & (n_offs[None, :] < n_hi)
            tl.atomic_add(ws_ptr + m_offs[:, None] * N + n_offs[None, :], partial, mask=mask, sem="relaxed")
        else:  # a single rank block covers R: nothing to sum across programs
            _store_output(y_ptr, stride_ym, partial, bias_ptr, m_offs, n_offs, M, n_hi, HAS_BIAS)

    if USE_WORKSPACE:
        # Barrier so every thread's adds precede the ticket; acq_rel publishes them to (and
        # acquires the others' from) whichever program draws the last ticket.
        tl.debug_barrier()
        ticket_idx = pid_m * SPLIT_N + pid_ns
        ticket = tl.atomic_add(ticket_ptr + ticket_idx, 1, sem="acq_rel")
        if ticket == contributions - 1:
            tl.debug_barrier()
            for n0 in range(n_lo, n_hi, BLOCK_N):
                n_offs = n0 + tl.arange(0, BLOCK_N)
                mask = (m_offs[:, None] < M) & (n_offs[None, :] < n_hi)
                ws_tile = ws_ptr + m_offs[:, None] * N + n_offs[None, :]
                acc = tl.load(ws_tile, mask=mask, other=0.0, cache_modifier=".cg")  # L2, never a stale L1 line
                tl.store(ws_tile, tl.zeros_like(acc), mask=mask)  # leave the workspace zeroed
                _store_output(y_ptr, stride_ym, acc, bias_ptr, m_offs, n_offs, M, n_hi, HAS_BIAS)
            tl.atomic_xchg(ticket_ptr + ticket_idx, 0, sem="relaxed")
