"""Launch plan of the low-rank kernels: grid, workspace and constexprs for one TileConfig.

`launch(x2d, factors, config, out)` runs the kernels of `config` on already-checked inputs
(triton_lowrank.ops validates and allocates; the autotuner times this function directly).
`factors` is a triton_lowrank.factors.LowRankFactors (read by attribute only).
"""

from __future__ import annotations

import torch
import triton

from . import lowrank_matmul as kern

FLOAT_FACTORS = 0  # the BITS constexpr of unquantized factors (the kernels' spelling of bits=None)

# Fused-path workspaces for eager calls: zero-filled fp32 buffers the kernel leaves zeroed, one per
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
    dot_upcast = not x2d.is_cuda and x2d.dtype == torch.bfloat16  # interpreter bf16 tl.dot is broken
    c = config
    if c.path == "fused":
        k_per_split = triton.cdiv(triton.cdiv(K, c.split_k), c.block_k) * c.block_k
        n_per_split = triton.cdiv(triton.cdiv(N, c.split_n), c.block_n) * c.block_n
        split_k, split_n = triton.cdiv(K, k_per_split), triton.cdiv(N, n_per_split)
        r_blocks, m_blocks = triton.cdiv(R, c.block_r), triton.cdiv(M, c.block_m)
        contributions = r_blocks * split_k
        use_ws = contributions > 1
        if use_ws:
            buf = workspace(x2d.device, M * N + m_blocks * split_n)
            ws, tickets = buf[: M * N], buf[M * N : M * N + m_blocks * split_n].view(torch.int32)
        else:
            ws = tickets = out
        kern.fused_kernel[(split_n, r_blocks * split_k, m_blocks)](
            x2d, f.down, down_scale, f.up_t, up_scale, bias, out, ws, tickets,
            M, N, K, R, x2d.stride(0), out.stride(0), k_per_split, n_per_split, contributions,
            BITS=bits, GROUP_SIZE=group, HAS_BIAS=f.bias is not None, USE_WORKSPACE=use_ws,
            USE_DOT=c.uses_dot, DOT_PRECISION=precision, DOT_UPCAST=dot_upcast, SPLIT_K=split_k, SPLIT_N=split_n,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_R=c.block_r,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )
        return out
    hidden = torch.empty(M, R, dtype=torch.float32, device=x2d.device)  # the fp32 rank-r intermediate
    kern.shrink_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(R, c.block_r))](
        x2d, f.down, down_scale, hidden, M, K, R, x2d.stride(0),
        BITS=bits, GROUP_SIZE=group, DOT_PRECISION=precision, DOT_UPCAST=dot_upcast,
        BLOCK_M=c.block_m, BLOCK_R=c.block_r, BLOCK_K=c.block_k,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    kern.expand_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n))](
        hidden, f.up_t, up_scale, bias, out, M, N, R, out.stride(0),
        BITS=bits, GROUP_SIZE=group, HAS_BIAS=f.bias is not None, LOWP=c.expand_lowp,
        DOT_PRECISION=precision, DOT_UPCAST=dot_upcast, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_R=c.block_r,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return out
