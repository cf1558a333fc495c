"""Recording kernels/launch.py's launches (meta tensors, kernels swapped for recorders) and compiling each for sm_90
exactly as the JIT would: Triton's own binder (`create_function_from_signature` + `JITFunction._pack_args`: the
constexpr and divisibility specialization of a real launch, from fake pointers aligned like CUDA allocations) into
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .problems import Spec


class FakePointer:
    """What Triton's binder reads from a tensor argument: dtype and an address (CUDA allocations are
    512-byte aligned; a view keeps its byte offset, so the divisibility-by-16 attribute is the real one)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._address = 512 * 1024 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


@dataclass
class Launch:
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    roles: dict = field(default_factory=dict)  # positional index -> "weight" | "scale" | "x" | "out" | "bias"


def record_launches(s: Spec, config) -> list[Launch]:
    """Run kernels/launch.py on meta tensors with every kernel replaced by a recorder."""
    import torch
    from triton.runtime.jit import JITFunction
    from triton_lowrank.kernels import hybrid_matmul as hybrid
    from triton_lowrank.kernels import launch as launch_mod
    from triton_lowrank.kernels import lowrank_matmul as kern

    from triton_lowrank.core.factors import LowRankFactors
    from triton_lowrank.core.quant import ZERO_POINT_BITS, storage_shapes
    from triton_lowrank.formats.hybrid.storage import HybridWeights

    meta = torch.device("meta")
    storage_dtype = {None: torch.float16, 8: torch.int8, 4: torch.uint8}[s.bits]
    (dr, ds), (ur, us) = storage_shapes(s.rank, s.k, s.bits, s.group_size), storage_shapes(s.rank, s.n, s.bits,
                                                                                              s.group_size)
    f = LowRankFactors(
        torch.empty(dr, dtype=storage_dtype, device=meta),
        None if ds is None else torch.empty(ds, dtype=torch.float32, device=meta),
        torch.empty(ur, dtype=storage_dtype, device=meta),
        None if us is None else torch.empty(us, dtype=torch.float32, device=meta),
        torch.empty(s.n, dtype=torch.float16, device=meta), s.bits, s.group_size)
    x = torch.empty(s.m, s.k, dtype=torch.float16, device=meta)
    out = torch.empty(s.m, s.n, dtype=torch.float16, device=meta)
    roles = {id(f.down): "weight", id(f.up_t): "weight", id(f.down_scale): "scale", id(f.up_t_scale): "scale",
             id(f.bias): "bias", id(x): "x", id(out): "out"}
    weights = None
    if s.hybrid:  # the hybrid layer: f is its correction (the bias is the layer's)
        groups = s.k // s.base_group_size
        zero = torch.empty(s.n, groups, dtype=torch.uint8, device=meta) if s.base_bits in ZERO_POINT_BITS else None
        weights = HybridWeights(torch.empty(s.n, s.k * s.base_bits // 8, dtype=torch.uint8, device=meta),
                                torch.empty(s.n, groups, dtype=torch.float32, device=meta), zero, s.base_bits,
                                s.base_group_size, f._replace(bias=None), f.bias)
        roles.update({id(weights.base): "weight", id(weights.base_scale): "scale", id(zero): "scale"})

    launches: list[Launch] = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                tensor_roles = {i: roles.get(id(a), "workspace") for i, a in enumerate(args)
                                if isinstance(a, torch.Tensor)}
                launches.append(Launch(self.fn, tuple(grid), args, kwargs, tensor_roles))
            return run

    originals = {(module, name): obj for module in (kern, hybrid) for name, obj in vars(module).items()
                 if isinstance(obj, JITFunction)}
    pdl = getattr(launch_mod, "pdl_supported", None)
    try:
        for (module, name), obj in originals.items():
            setattr(module, name, Recorder(obj))
        if pdl is not None:  # what the launcher decides on an sm_90 device
            launch_mod.pdl_supported = lambda x2d: True
        if weights is None:
            launch_mod.launch(x, f, config, out)
        else:
            launch_mod.launch_hybrid(x, weights, config, out)
    finally:
        for (module, name), obj in originals.items():
            setattr(module, name, obj)
        if pdl is not None:
            launch_mod.pdl_supported = pdl
    return launches


# ---- compiling like the JIT ---------------------------------------------------------------------------
def compile_launch(launch: Launch):
    """(compiled kernel, {parameter ordinal: argument index}) for sm_90, specialized by Triton's own binder."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    args = [FakePointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    # kernel parameters are the non-constexpr arguments, in order (Triton appends scratch pointers after them)
    names = list(signature)
    runtime = [i for i, name in enumerate(names) if signature[name] != "constexpr"]
    return compiled, dict(enumerate(runtime))
