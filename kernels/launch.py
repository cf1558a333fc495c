"""Launch plan of the low-rank kernels: grid, workspace and constexprs for one TileConfig.

`launch(x2d, factors, config, out)` runs the kernels of `config` on already-checked inputs
(triton_lowrank.ops validates and allocates; the autotuner times this function directly).
`factors` is a triton_lowrank.factors.LowRankFactors (read by attribute only).
"""

from __future__ import annotations

import torch
import triton

from . import lowrank_matmul as kern
from .configs import Problem, decode_chunk, decode_supported

FLOAT_FACTORS = 0  # the BITS constexpr of unquantized factors (the kernels' spelling of bits=None)
# 2^23 as fp32 bits: the dequantization magic number, passed at run time (see kernels/lowrank_matmul.py)
MAGIC = 0x4B000000

# Decode-path workspaces for eager calls: zero-filled fp32 buffers the kernels leave zeroed, one per
# (device, stream, size bucket), reused so that no call pays for a memset. Graph capture allocates its own.
_WORKSPACES: dict[tuple, torch.Tensor] = {}


def workspace(device: torch.device, numel: int) -> torch.Tensor:
    bucket = 1 << max(12, (numel - 1).bit_length())
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Each CUDA graph gets its own workspace from its private pool, zeroed by a node of that graph:
        # graphs captured on one stream may replay in any order, or concurrently on several streams.
        return torch.zeros(bucket, dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, bucket)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.zeros(bucket, dtype=torch.float32, device=device)
    return _WORKSPACES[key]


def pdl_supported(x2d: torch.Tensor) -> bool:
    """Programmatic dependent launch (sm_90+): the decode path's phase 2 launches while phase 1 runs."""
    return x2d.is_cuda and torch.cuda.get_device_capability(x2d.device)[0] >= 9


def launch(x2d: torch.Tensor, f, config, out: torch.Tensor) -> torch.Tensor:
    """Run the kernels of `config` on x2d [M, K] (unit stride on K) into out [M, N]."""
    M, K = x2d.shape
    N, R = f.out_features, f.rank
    if M == 0:
        return out
    bits = f.bits or FLOAT_FACTORS
    group = f.group_size if bits == 4 else 1
    dummy = f.down  # stands in for absent pointers; never dereferenced (constexpr-guarded)
    down_scale = f.down_scale if f.down_scale is not None else dummy
    up_scale = f.up_t_scale if f.up_t_scale is not None else dummy
    bias = f.bias if f.bias is not None else dummy
    precision = "ieee" if x2d.dtype == torch.float32 else "tf32"
    dot_upcast = x2d.device.type == "cpu" and x2d.dtype == torch.bfloat16  # interpreter bf16 tl.dot is broken
    c = config
    if c.path == "decode":
        if not decode_supported(Problem(M, N, K, R, f.bits, group, x2d.element_size())):
            raise ValueError(f"launch: the decode path needs 16-byte factor rows and int4 groups of 32k columns; "
                             f"in={K} out={N} bits={f.bits} group_size={f.group_size}: use the split path")
        chunk = decode_chunk(f.bits)
        if not c.uses_dot and (c.block_k % chunk or c.block_n % chunk):
            raise ValueError(f"launch: decode block_k and block_n must be multiples of {chunk} columns for "
                             f"bits={f.bits}, got {c.block_k} and {c.block_n}")
        k_per_split = triton.cdiv(triton.cdiv(K, c.split_k), c.block_k) * c.block_k
        split_k, m_blocks = triton.cdiv(K, k_per_split), triton.cdiv(M, c.block_m)
        buf = workspace(x2d.device, M * R + m_blocks)
        hidden, tickets = buf[: M * R], buf[M * R : M * R + m_blocks].view(torch.int32)
        # CUDA cores: fp32 activations get exact int4 values (see int4_lane); 16-bit x rows that start 4-byte
        # aligned are read two columns per load
        precise = x2d.dtype == torch.float32
        x_pairs = x2d.element_size() == 2 and x2d.data_ptr() % 4 == 0 and x2d.stride(0) % 2 == 0
        pdl = pdl_supported(x2d)
        kern.decode_shrink_kernel[(triton.cdiv(R, c.block_r), split_k, m_blocks)](
            x2d, f.down, down_scale, hidden, M, K, R, x2d.stride(0), k_per_split, MAGIC,
            BITS=bits, GROUP_SIZE=group, USE_DOT=c.uses_dot, DOT_PRECISION=precision, DOT_UPCAST=dot_upcast,
            BLOCK_M=c.block_m, BLOCK_R=c.block_r, BLOCK_K=c.block_k, X_PAIRS=x_pairs, PRECISE=precise,
            USE_PDL=pdl, num_warps=c.phase1_warps, num_stages=c.num_stages,
        )
        block_r = c.rows_per_expand_step
        # CUDA cores: a sub-tile gives each thread one row of its chunk across block_n
        sub_r = min(block_r, max(1, 32 * c.num_warps * decode_chunk(f.bits) // c.block_n))
        kern.decode_expand_kernel[(triton.cdiv(N, c.block_n), m_blocks)](
            hidden, f.up_t, up_scale, bias, out, tickets, M, N, R, out.stride(0), MAGIC,
            BITS=bits, GROUP_SIZE=group, HAS_BIAS=f.bias is not None, USE_DOT=c.uses_dot,
            DOT_PRECISION=precision, DOT_UPCAST=dot_upcast,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_R=block_r, SUB_R=sub_r, PRECISE=precise,
            USE_PDL=pdl, num_warps=c.num_warps, num_stages=c.num_stages, launch_pdl=pdl,
        )
        return out
    hidden = torch.empty(M, R, dtype=torch.float32, device=x2d.device)  # the fp32 rank-r intermediate
    kern.shrink_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(R, c.block_r))](
        x2d, f.down, down_scale, hidden, M, K, R, x2d.stride(0), MAGIC,
        BITS=bits, GROUP_SIZE=group, DOT_PRECISION=precision, DOT_UPCAST=dot_upcast,
        BLOCK_M=c.block_m, BLOCK_R=c.block_r, BLOCK_K=c.block_k,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    kern.expand_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n))](
        hidden, f.up_t, up_scale, bias, out, M, N, R, out.stride(0), MAGIC,
        BITS=bits, GROUP_SIZE=group, HAS_BIAS=f.bias is not None, LOWP=c.expand_lowp,
        DOT_PRECISION=precision, DOT_UPCAST=dot_upcast, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_R=c.block_r,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return out
