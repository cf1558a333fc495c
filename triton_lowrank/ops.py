"""Launcher for the low-rank kernels: validate, pick a config, allocate, compute the grid.

`lowrank_matmul(x, factors)` is registered as the custom op `triton_lowrank::lowrank_matmul`, so
torch.compile(fullgraph=True) and CUDA-graph capture treat it as one opaque node. Inside it:
  CUDA tensors                      -> Triton kernels (config from the autotune cache or heuristic)
  CPU tensors, TRITON_INTERPRET=1   -> the same kernels through the Triton interpreter
  CPU tensors otherwise             -> lowrank_reference
Activations may be float16, bfloat16 or float32 (fp32 runs the kernels with IEEE fp32 dots).
Inference only: the op has no autograd formula.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from .reference import lowrank_reference

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_STORAGE_DTYPE = {8: torch.int8, 4: torch.uint8}


class LowRankFactors(NamedTuple):
    """The stored factors of one layer (same fields and layout as LowRankLinear's buffers)."""

    down: torch.Tensor  # [r, in] (int4: [r, in // 2] uint8)
    down_scale: torch.Tensor | None  # None / [r] / [r, in // group_size] fp32
    up_t: torch.Tensor  # [r, out] (int4: [r, out // 2] uint8)
    up_scale: torch.Tensor | None
    bias: torch.Tensor | None  # [out]
    bits: int | None
    group_size: int = 128

    @property
    def in_features(self) -> int:
        return self.down.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def out_features(self) -> int:
        return self.up_t.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def as_factors(obj: Any) -> LowRankFactors:
    """LowRankFactors from a LowRankLinear, a LowRankFactors, or a 6/7-tuple of its fields."""
    if isinstance(obj, LowRankFactors):
        return obj
    if isinstance(obj, tuple):
        return LowRankFactors(*obj)
    if hasattr(obj, "up_t_scale"):  # LowRankLinear (duck-typed: no import cycle with layers.py)
        return LowRankFactors(obj.down, obj.down_scale, obj.up_t, obj.up_t_scale, obj.bias, obj.bits, obj.group_size)
    raise TypeError(f"lowrank_matmul: expected LowRankLinear, LowRankFactors or a tuple, got {type(obj).__name__}")


def check_inputs(x: torch.Tensor, f: LowRankFactors) -> None:
    """Raise TypeError (dtypes) or ValueError (shapes, devices) with the offending values named."""
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"lowrank_matmul: x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if f.bits not in (None, 8, 4):
        raise ValueError(f"lowrank_matmul: bits must be None, 8 or 4, got {f.bits!r}")
    if f.down.dim() != 2 or f.up_t.dim() != 2:
        raise ValueError(f"lowrank_matmul: factors must be 2-D, got down {tuple(f.down.shape)}, "
                         f"up_t {tuple(f.up_t.shape)}")
    if f.down.shape[0] != f.up_t.shape[0]:
        raise ValueError(f"lowrank_matmul: rank mismatch: down has {f.down.shape[0]} rows, up_t {f.up_t.shape[0]}")
    if x.dim() == 0 or x.shape[-1] != f.in_features:
        raise ValueError(f"lowrank_matmul: x has {x.shape[-1] if x.dim() else 0} features, "
                         f"factors expect {f.in_features}")
    for name, t in (("down", f.down), ("up_t", f.up_t)):
        want = x.dtype if f.bits is None else _STORAGE_DTYPE[f.bits]
        if t.dtype != want:
            raise TypeError(f"lowrank_matmul: {name} dtype must be {want} for bits={f.bits} and x {x.dtype}, "
                            f"got {t.dtype}")
    for name, scale, storage in (("down_scale", f.down_scale, f.down), ("up_scale", f.up_scale, f.up_t)):
        if f.bits is None:
            continue
        features = storage.shape[1] * (2 if f.bits == 4 else 1)
        want = (storage.shape[0],) if f.bits == 8 else (storage.shape[0], features // f.group_size)
        if f.bits == 4 and features % f.group_size:
            raise ValueError(f"lowrank_matmul: group_size {f.group_size} does not divide {features}")
        if scale is None or tuple(scale.shape) != want or scale.dtype != torch.float32:
            got = None if scale is None else (tuple(scale.shape), scale.dtype)
            raise ValueError(f"lowrank_matmul: {name} must be float32 of shape {want}, got {got}")
    if f.bias is not None and tuple(f.bias.shape) != (f.out_features,):
        raise ValueError(f"lowrank_matmul: bias must have shape ({f.out_features},), got {tuple(f.bias.shape)}")
    tensors = {"down": f.down, "up_t": f.up_t, "down_scale": f.down_scale, "up_scale": f.up_scale, "bias": f.bias}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"lowrank_matmul: x is on {x.device} but {name} is on {t.device}")
        # The kernels index the factors as row-major arrays; a transposed view would be read wrongly.
        if t is not None and not t.is_contiguous():
            raise ValueError(f"lowrank_matmul: {name} must be contiguous (row-major), got strides {t.stride()}")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda or interpreter_enabled()


def problem_for(x2d: torch.Tensor, f: LowRankFactors):
    from triton_lowrank.kernels.configs import Problem

    return Problem(x2d.shape[0], f.out_features, f.in_features, f.rank, f.bits,
                   f.group_size if f.bits == 4 else 0, x2d.element_size())


def _select_config(x2d: torch.Tensor, f: LowRankFactors):
    from triton_lowrank.kernels.configs import default_config

    problem = problem_for(x2d, f)
    if not x2d.is_cuda:
        return default_config(problem, interpret=True)
    from .autotune import get_tuner

    return get_tuner().config_for(problem, x2d.dtype)


# Fused-path workspaces for eager calls: zero-filled fp32 buffers the kernel leaves zeroed, one per
# (device, stream, size bucket), reused so that no call pays for a memset. Graph capture allocates its own.
_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
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


def launch(x2d: torch.Tensor, f: LowRankFactors, config, out: torch.Tensor) -> torch.Tensor:
    """Run the kernels of `config` on x2d [M, K] (unit stride on K) into out [M, N]."""
    import triton

    from triton_lowrank.kernels import lowrank_matmul as kern

    M, K = x2d.shape
    N, R = f.out_features, f.rank
    if M == 0:
        return out
    bits = f.bits or 0  # constexpr: 0 = float factors
    group = f.group_size if bits == 4 else 1
    dummy = f.down  # stands in for absent pointers; never dereferenced (constexpr-guarded)
    down_scale = f.down_scale if f.down_scale is not None else dummy
    up_scale = f.up_scale if f.up_scale is not None else dummy
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
            buf = _workspace(x2d.device, M * N + m_blocks * split_n)
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


def _forward(x: torch.Tensor, f: LowRankFactors, config=None, out: torch.Tensor | None = None) -> torch.Tensor:
    check_inputs(x, f)
    lead = x.shape[:-1]
    if not uses_kernels(x):
        y = lowrank_reference(x, f.down, f.down_scale, f.up_t, f.up_scale, f.bias, f.bits, f.group_size)
        if out is None:
            return y
        out.view(-1, f.out_features).copy_(y.reshape(-1, f.out_features))
        return out
    x2d = x.reshape(-1, f.in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if out is None:
        out = torch.empty(*lead, f.out_features, dtype=x.dtype, device=x.device)
    elif out.shape != (*lead, f.out_features) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"lowrank_matmul: out must be contiguous {x.dtype} of shape "
                         f"{(*lead, f.out_features)}, got {out.dtype} {tuple(out.shape)}")
    if x2d.shape[0] == 0:  # nothing to compute, and nothing for the autotuner to learn from
        return out
    launch(x2d, f, config or _select_config(x2d, f), out.view(-1, f.out_features))
    return out


@torch.library.custom_op(
    "triton_lowrank::lowrank_matmul",
    mutates_args=(),
    schema="(Tensor x, Tensor down, Tensor? down_scale, Tensor up_t, Tensor? up_scale, Tensor? bias, "
    "int? bits, int group_size) -> Tensor",
)
def _lowrank_matmul_op(x, down, down_scale, up_t, up_scale, bias, bits, group_size):
    return _forward(x, LowRankFactors(down, down_scale, up_t, up_scale, bias, bits, group_size))


@_lowrank_matmul_op.register_fake
def _(x, down, down_scale, up_t, up_scale, bias, bits, group_size):
    f = LowRankFactors(down, down_scale, up_t, up_scale, bias, bits, group_size)
    check_inputs(x, f)
    return x.new_empty(*x.shape[:-1], f.out_features)


def lowrank_matmul(x: torch.Tensor, factors: Any, *, out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """y [..., out] = x [..., in] · W_rᵀ + b from a LowRankLinear / LowRankFactors / tuple.

    With `out` (e.g. NaN-poisoned in tests) or an explicit kernels.configs.TileConfig this runs
    eagerly outside the custom op; otherwise it dispatches to torch.ops.triton_lowrank.lowrank_matmul.
    """
    f = as_factors(factors)
    if out is not None or config is not None:
        return _forward(x, f, config, out)
    return torch.ops.triton_lowrank.lowrank_matmul(x, f.down, f.down_scale, f.up_t, f.up_scale, f.bias, f.bits,
                                                   f.group_size)
