"""Launch plan of the low-rank kernels: grid, workspace and constexprs for one TileConfig.

`launch(x2d, factors, config, out)` runs the low-rank kernels of `config` on already-checked inputs, and
`launch_hybrid(x2d, weights, config, out)` the hybrid format's (triton_lowrank.ops validates and allocates; the
autotuner times these functions directly). `factors` is a triton_lowrank.factors.LowRankFactors, `weights` a
triton_lowrank.hybrid_storage.HybridWeights (both read by attribute only).
"""

from __future__ import annotations

import torch
import triton

from . import hybrid_matmul as hybrid
from . import lowrank_matmul as kern
from .configs import (
    Problem,
    decode_chunk,
    decode_supported,
    default_blocks_before_wait,
    gemv_chunk,
    hybrid_decode_supported,
    hybrid_gemv_supported,
)

FLOAT_FACTORS = 0  # the BITS constexpr of unquantized factors (the kernels' spelling of bits=None)
# 2^23 as fp32 bits: the dequantization magic number, passed at run time (see kernels/lowrank_matmul.py)
MAGIC = 0x4B000000
# 1024 as fp16 bits: the fp16 magic number of int4_quarters_fp16 (kernels/utils.py), passed at run time as well
MAGIC16 = 0x6400

# Decode-path workspaces for eager calls: zero-filled fp32 buffers the kernels leave zeroed, one per
# (device, stream, size bucket), reused so that no call pays for a memset. Graph capture allocates its own.
_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _stream_buffer(cache: dict, device: torch.device, numel: int, make) -> torch.Tensor:
    """`make(bucket)` fp32 elements, one per (device, stream, size bucket) in `cache`, reused so that no call allocates;
    under CUDA-graph capture a fresh one from the graph's private pool (graphs captured on one stream may replay in any
    order, or concurrently on several streams)."""
    bucket = 1 << max(12, (numel - 1).bit_length())
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return make(bucket)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, bucket)
    if key not in cache:
        cache[key] = make(bucket)
    return cache[key]


def workspace(device: torch.device, numel: int) -> torch.Tensor:
    return _stream_buffer(_WORKSPACES, device, numel,
                          lambda n: torch.zeros(n, dtype=torch.float32, device=device))  # (in a graph: a zeroing node)


# Phase-1 partial sums (decode_shrink_kernel with PARTIALS: the CUDA-core hybrid, and low rank without a K split):
# fp32 buffers that need no particular content (every element a call reads, its phase 1 writes first); never the
# zero-invariant workspace above.
_PARTIALS: dict[tuple, torch.Tensor] = {}


def partials_buffer(device: torch.device, numel: int) -> torch.Tensor:
    return _stream_buffer(_PARTIALS, device, numel, lambda n: torch.empty(n, dtype=torch.float32, device=device))


def pdl_supported(x2d: torch.Tensor) -> bool:
    """Programmatic dependent launch (sm_90+): the decode path's phase 2 launches while phase 1 runs."""
    return x2d.is_cuda and torch.cuda.get_device_capability(x2d.device)[0] >= 9


def _pointers(f):
    """(BITS constexpr, GROUP_SIZE constexpr, down_scale, up_t_scale): absent scales as a never-read stand-in."""
    bits = f.bits or FLOAT_FACTORS
    dummy = f.down  # stands in for absent pointers; never dereferenced (constexpr-guarded)
    return (bits, f.group_size if bits == 4 else 1, f.down_scale if f.down_scale is not None else dummy,
            f.up_t_scale if f.up_t_scale is not None else dummy)


def _dot_flags(x2d: torch.Tensor) -> tuple[str, bool]:
    """(DOT_PRECISION, DOT_UPCAST): IEEE fp32 dots for fp32 activations; the interpreter's bf16 tl.dot is broken."""
    return "ieee" if x2d.dtype == torch.float32 else "tf32", x2d.device.type == "cpu" and x2d.dtype == torch.bfloat16


def decode_phase1(x2d: torch.Tensor, f, c) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Launch decode_shrink_kernel: hidden[M, R] (fp32, in the zeroed workspace) += x2d · downᵀ.

    Returns (hidden, tickets, M blocks); the phase-2 kernel must re-zero both (release_hidden)."""
    M, K = x2d.shape
    k_per_split, split_k = _phase1_splits(K, c)
    m_blocks = triton.cdiv(M, c.block_m)
    buf = workspace(x2d.device, M * f.rank + m_blocks)
    hidden, tickets = buf[: M * f.rank], buf[M * f.rank : M * f.rank + m_blocks].view(torch.int32)
    _decode_shrink(x2d, f, c, hidden, k_per_split, split_k, m_blocks, partials=False)
    return hidden, tickets, m_blocks


def decode_phase1_partials(x2d: torch.Tensor, f, c) -> tuple[torch.Tensor, int]:
    """Launch decode_shrink_kernel with PARTIALS (CUDA cores, block_m 1): each split stores its partial sums of
    x2d · downᵀ into its own slice of partials [S, M, R] (fp32, plain stores, any content on entry: a buffer of its
    own, not the zero-invariant workspace). Returns (partials, S); the reader sums the S slices. Nothing to re-zero."""
    M, K = x2d.shape
    if c.uses_dot:
        raise ValueError("decode_phase1_partials: the CUDA-core decode path (block_m < 16) only")
    k_per_split, split_k = _phase1_splits(K, c)
    partials = partials_buffer(x2d.device, split_k * M * f.rank)[: split_k * M * f.rank]
    _decode_shrink(x2d, f, c, partials, k_per_split, split_k, triton.cdiv(M, c.block_m), partials=True)
    return partials, split_k


def _phase1_splits(K: int, c) -> tuple[int, int]:
    """(columns per K split, realized split count): a whole number of block_k tiles per split."""
    k_per_split = triton.cdiv(triton.cdiv(K, c.split_k), c.block_k) * c.block_k
    return k_per_split, triton.cdiv(K, k_per_split)


def _decode_shrink(x2d: torch.Tensor, f, c, out: torch.Tensor, k_per_split: int, split_k: int, m_blocks: int,
                   partials: bool) -> None:
    M, K = x2d.shape
    R = f.rank
    bits, group, down_scale, _ = _pointers(f)
    precision, dot_upcast = _dot_flags(x2d)
    # CUDA cores: fp32 activations get exact int4 values (see int4_lane); 16-bit x rows that start 4-byte
    # aligned are read two columns per load
    kern.decode_shrink_kernel[(triton.cdiv(R, c.block_r), split_k, m_blocks)](
        x2d, f.down, down_scale, out, M, K, R, x2d.stride(0), k_per_split, MAGIC,
        BITS=bits, GROUP_SIZE=group, USE_DOT=c.uses_dot, DOT_PRECISION=precision, DOT_UPCAST=dot_upcast,
        BLOCK_M=c.block_m, BLOCK_R=c.block_r, BLOCK_K=c.block_k, X_PAIRS=x_pairs(x2d),
        PRECISE=x2d.dtype == torch.float32, USE_PDL=pdl_supported(x2d), num_warps=c.phase1_warps,
        num_stages=c.num_stages, PARTIALS=partials, EVEN_K=K % c.block_k == 0,
    )


def split_phase1(x2d: torch.Tensor, f, c) -> torch.Tensor:
    """Launch shrink_kernel: the fp32 rank-r intermediate hidden[M, R] = x2d · downᵀ (prefill M)."""
    M, K = x2d.shape
    R = f.rank
    bits, group, down_scale, _ = _pointers(f)
    precision, dot_upcast = _dot_flags(x2d)
    hidden = torch.empty(M, R, dtype=torch.float32, device=x2d.device)
    kern.shrink_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(R, c.block_r))](
        x2d, f.down, down_scale, hidden, M, K, R, x2d.stride(0), MAGIC,
        BITS=bits, GROUP_SIZE=group, DOT_PRECISION=precision, DOT_UPCAST=dot_upcast,
        BLOCK_M=c.block_m, BLOCK_R=c.block_r, BLOCK_K=c.block_k,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return hidden


def x_pairs(x2d: torch.Tensor) -> bool:
    """16-bit activation rows that start 4-byte aligned: the CUDA-core kernels read two columns per load."""
    return x2d.element_size() == 2 and x2d.data_ptr() % 4 == 0 and x2d.stride(0) % 2 == 0


def launch(x2d: torch.Tensor, f, config, out: torch.Tensor) -> torch.Tensor:
    """Run the kernels of `config` on x2d [M, K] (unit stride on K) into out [M, N]."""
    M, K = x2d.shape
    N, R = f.out_features, f.rank
    if M == 0:
        return out
    bits, group, down_scale, up_scale = _pointers(f)
    bias = f.bias if f.bias is not None else f.down
    precision, dot_upcast = _dot_flags(x2d)
    c = config
    if c.path == "decode":
        if not decode_supported(Problem(M, N, K, R, f.bits, group, x2d.element_size())):
            raise ValueError(f"launch: the decode path needs 16-byte factor rows and int4 groups of 32k columns; "
                             f"in={K} out={N} bits={f.bits} group_size={f.group_size}: use the split path")
        chunk = decode_chunk(f.bits)
        if not c.uses_dot and (c.block_k % chunk or c.block_n % chunk):
            raise ValueError(f"launch: decode block_k and block_n must be multiples of {chunk} columns for "
                             f"bits={f.bits}, got {c.block_k} and {c.block_n}")
        if c.one_launch:
            return launch_one(x2d, f, c, out)
        # CUDA cores, one K split: phase 1 stores hidden into a buffer of its own (no atomics), phase 2 reads it and
        # releases nothing; more splits add into the zeroed workspace, re-zeroed by phase 2's last program (a ticket)
        release = c.uses_dot or _phase1_splits(K, c)[1] > 1
        if release:
            hidden, tickets, m_blocks = decode_phase1(x2d, f, c)
        else:
            hidden, _ = decode_phase1_partials(x2d, f, c)
            tickets, m_blocks = hidden, M  # (no ticket is read)
        precise, pdl = x2d.dtype == torch.float32, pdl_supported(x2d)  # see decode_phase1
        block_r = c.rows_per_expand_step
        # CUDA cores: a sub-tile gives each thread one row of its chunk across block_n; up to 4 sub-tiles per
        # iteration (each one 128-bit load per thread, all issued before the first is used)
        sub_r = min(block_r, max(1, 32 * c.num_warps * decode_chunk(f.bits) // c.block_n))
        if not c.uses_dot:
            block_r = min(block_r, 4 * sub_r)
        kern.decode_expand_kernel[(triton.cdiv(N, c.block_n), m_blocks)](
            hidden, f.up_t, up_scale, bias, out, tickets, M, N, R, out.stride(0), MAGIC,
            BITS=bits, GROUP_SIZE=group, HAS_BIAS=f.bias is not None, USE_DOT=c.uses_dot,
            DOT_PRECISION=precision, DOT_UPCAST=dot_upcast,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_R=block_r, SUB_R=sub_r, PRECISE=precise,
            USE_PDL=pdl, RELEASE_HIDDEN=release,
            BLOCKS_BEFORE_WAIT=c.expand_blocks_before_wait or default_blocks_before_wait(f.bits),
            num_warps=c.num_warps, num_stages=c.num_stages, launch_pdl=pdl,
        )
        return out
    hidden = split_phase1(x2d, f, c)
    kern.expand_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n))](
        hidden, f.up_t, up_scale, bias, out, M, N, R, out.stride(0), MAGIC,
        BITS=bits, GROUP_SIZE=group, HAS_BIAS=f.bias is not None, LOWP=c.expand_lowp,
        DOT_PRECISION=precision, DOT_UPCAST=dot_upcast, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_R=c.block_r,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return out


def launch_one(x2d: torch.Tensor, f, c, out: torch.Tensor) -> torch.Tensor:
    """Run decode_one_launch_kernel (a small layer in one launch, configs.one_launch_config) into out."""
    M, K = x2d.shape
    N, R = f.out_features, f.rank
    if c.uses_dot or c.block_r < R:
        raise ValueError(f"launch: one_launch runs on CUDA cores (block_m 1) with block_r >= rank; got block_m="
                         f"{c.block_m} block_r={c.block_r} for rank {R}")
    bits, group, down_scale, up_scale = _pointers(f)
    kern.decode_one_launch_kernel[(triton.cdiv(N, c.block_n), M)](
        x2d, f.down, down_scale, f.up_t, up_scale, f.bias if f.bias is not None else f.down, out, N, K, R,
        x2d.stride(0), out.stride(0), MAGIC, BITS=bits, GROUP_SIZE=group, HAS_BIAS=f.bias is not None,
        BLOCK_N=c.block_n, BLOCK_K=c.block_k, R_PAD=c.block_r, X_PAIRS=x_pairs(x2d), PRECISE=x2d.dtype == torch.float32,
        EVEN_K=K % c.block_k == 0, num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return out


def launch_hybrid(x2d: torch.Tensor, w, config, out: torch.Tensor) -> torch.Tensor:
    """Run the hybrid kernels of `config` on x2d [M, K] into out [M, N]; `w` is a HybridWeights (read by attribute).

    Phase 1 (hidden = x · Dᵀ) is the low-rank one; phase 2 is hybrid_gemv_kernel (decode at block_m 1) or
    hybrid_tile_kernel, a programmatic dependent launch on sm_90 for the decode path. At block_m 1 phase 1 leaves
    per-split partial sums in a buffer of its own (decode_phase1_partials), which the gemv adds up: neither kernel
    touches the zeroed workspace or a ticket. At block_m 16 phase 1 adds into the workspace with atomics and
    hybrid_tile_kernel re-zeroes it (RELEASE_HIDDEN).
    """
    M, K = x2d.shape
    f = w.correction
    N, R = f.out_features, f.rank
    if M == 0:
        return out
    c = config
    if c.one_launch:
        raise ValueError("launch_hybrid: one_launch is a low-rank plan; the hybrid has none")
    bits, group, _, up_scale = _pointers(f)
    bias = w.bias if w.bias is not None else w.base_scale  # never read without HAS_BIAS
    precision, dot_upcast = _dot_flags(x2d)
    problem = Problem(M, N, K, R, f.bits, group, x2d.element_size(), w.base_bits, w.base_group_size,
                      "hybrid")
    decode = c.path == "decode"
    if decode and not hybrid_decode_supported(problem):
        raise ValueError(f"launch_hybrid: the decode path needs 16-byte `down` rows and int4 groups of 32k columns; "
                         f"in={K} bits={f.bits} group_size={f.group_size}: use the split path")
    base_block_k = c.base_block_k or c.block_k
    chunk = gemv_chunk(w.base_bits)
    if decode and not c.uses_dot and not (hybrid_gemv_supported(problem) and base_block_k % chunk == 0):
        raise ValueError(f"launch_hybrid: block_m 1 needs M=1, in and base_group_size multiples of {chunk} for "
                         f"base_bits={w.base_bits} (int3: in of 128) and a base block_k multiple of {chunk}; got M={M} "
                         f"in={K} base_group_size={w.base_group_size} base block_k={base_block_k}")
    pdl = decode and pdl_supported(x2d)
    zero = w.base_zero if w.base_zero is not None else w.base_scale  # never read for an int4 base
    if decode and not c.uses_dot:
        # phase 1 leaves per-split partial sums (plain stores into a buffer of their own); the gemv adds them up as
        # it reads hidden: no zeroed workspace, no ticket, no atomics in either kernel
        partials, splits = decode_phase1_partials(x2d, f, c)
        block_r = c.rows_per_expand_step
        # int8 words: up to 4 row blocks per step (4 loads per thread), all of up_t's rows in one step where they fit
        up_rows = min(max(block_r, triton.next_power_of_2(R)), 4 * block_r)
        hybrid.hybrid_gemv_kernel[(triton.cdiv(N, c.block_n), M)](
            x2d, w.base, w.base_scale, zero, partials, f.up_t, up_scale, bias, out, N, K, R, splits, x2d.stride(0),
            out.stride(0), MAGIC, BASE_BITS=w.base_bits, BASE_GROUP=w.base_group_size, BITS=bits, GROUP_SIZE=group,
            HAS_BIAS=w.bias is not None, BLOCK_N=c.block_n, BLOCK_K=base_block_k, BLOCK_R=block_r,
            X_PAIRS=x_pairs(x2d), PRECISE=x2d.dtype == torch.float32, USE_PDL=pdl, UP_WORDS=N % 4 == 0,
            S_BLOCK=triton.next_power_of_2(splits), UP_ROWS=up_rows, UP_ONE_STEP=up_rows >= R,
            EVEN_K=K % base_block_k == 0, num_warps=c.num_warps, num_stages=c.num_stages, launch_pdl=pdl,
        )
        return out
    if decode:
        hidden, tickets, _ = decode_phase1(x2d, f, c)
    else:
        hidden = split_phase1(x2d, f, c)
        tickets = hidden  # unused without RELEASE_HIDDEN
    hybrid.hybrid_tile_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n))](
        x2d, w.base, w.base_scale, zero, hidden, f.up_t, up_scale, bias, out, tickets, M, N, K, R, x2d.stride(0),
        out.stride(0), MAGIC, MAGIC16, BASE_BITS=w.base_bits, BASE_GROUP=w.base_group_size, BITS=bits,
        GROUP_SIZE=group, HAS_BIAS=w.bias is not None, DOT_PRECISION=precision, DOT_UPCAST=dot_upcast,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_R=max(16, c.rows_per_expand_step),
        RELEASE_HIDDEN=decode,
        WORDS=w.base_bits != 4 and K % 32 == 0 and c.block_k % 32 == 0,
        HALVES=x2d.dtype == torch.float16 and c.block_k >= 32,  # each half-tile dot needs K >= 16
        USE_PDL=pdl, num_warps=c.num_warps, num_stages=c.num_stages, launch_pdl=pdl,
    )
    return out
