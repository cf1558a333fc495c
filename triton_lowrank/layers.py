"""LowRankLinear: a linear layer stored as two (optionally quantized) rank-r factors.

The module only stores: the tensors arrive already quantized (compression decides how: round to
nearest, or error feedback) as a LowRankFactors (factors.py has the layout), and the forward is
the custom op, which picks the Triton kernels or the PyTorch reference.
"""

from __future__ import annotations

import torch

from .factors import LowRankFactors
from .formats import FLOAT_DTYPES, CompressedLinear, register_format
from .kernels.configs import Problem
from .ops import lowrank_matmul, problem_for
from .quant import SUPPORTED_BITS, bits_label, check_bits, storage_group_size, storage_shapes
from .reference import dequantized_factors

STORAGE_DTYPES = {8: torch.int8, 4: torch.uint8}


def check_spec_ints(spec: dict, fields, where: str) -> None:
    """Raise ValueError naming `where` and the field if one of `fields` is missing or not an integer."""
    for field in fields:
        if not isinstance(spec.get(field), int) or isinstance(spec.get(field), bool):
            raise ValueError(f"{where}.{field} is missing or not an integer: {spec.get(field)!r}")


def check_factor_spec(spec: dict, where: str) -> None:
    """The checks of a spec's factor fields (rank, bits, group_size): a LowRankLinear's, a HybridLinear's correction."""
    check_spec_ints(spec, ("rank", "group_size"), where)
    if spec.get("bits", "missing") not in SUPPORTED_BITS:
        raise ValueError(f"{where}.bits must be one of None, 8 or 4, got {spec.get('bits', 'nothing')!r}")
    if not 1 <= spec["rank"] <= min(spec["in_features"], spec["out_features"]):
        raise ValueError(f"{where}.rank {spec['rank']} is outside [1, min(in, out)]")
    group_size = storage_group_size(spec["bits"], spec["group_size"])
    check_bits(spec["bits"], group_size, spec["in_features"], f"{where} (in_features)")
    check_bits(spec["bits"], group_size, spec["out_features"], f"{where} (out_features)")


def register_factor_buffers(
    module: torch.nn.Module,
    in_features: int,
    out_features: int,
    rank: int,
    bits: int | None,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    name: str,
) -> int:
    """Check a rank-r factor pair's shape, dtype and bits, and register its empty storage on `module`:
    down [r, in] and up_t [r, out] with their float32 scales (factors.py layout). Returns the group size
    the storage really uses. Shared by every format that stores low-rank factors."""
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"{name}: rank must be in [1, min(in, out)] = [1, {min(in_features, out_features)}], got {rank}"
        )
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {dtype}")
    group_size = storage_group_size(bits, group_size)
    check_bits(bits, group_size, in_features, f"{name} (in_features)")
    check_bits(bits, group_size, out_features, f"{name} (out_features)")
    storage_dtype = STORAGE_DTYPES.get(bits, dtype)
    for factor, features in (("down", in_features), ("up_t", out_features)):
        data_shape, scale_shape = storage_shapes(rank, features, bits, group_size)
        module.register_buffer(factor, torch.empty(data_shape, dtype=storage_dtype, device=device))
        scale = None if scale_shape is None else torch.empty(scale_shape, dtype=torch.float32, device=device)
        module.register_buffer(f"{factor}_scale", scale)
    return group_size


@register_format
class LowRankLinear(CompressedLinear):
    """y = x · (up · down)ᵀ + b, computed from quantized factors without a dense weight."""

    FORMAT = "lowrank"
    FP32_BUFFERS = ("down_scale", "up_t_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bits: int | None = 8,
        group_size: int = 128,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        name: str = "LowRankLinear",
        replaces: str = "Linear",
    ) -> None:
        super().__init__()
        group_size = register_factor_buffers(self, in_features, out_features, rank, bits, group_size, dtype, device,
                                             name)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group_size = bits, group_size
        self.replaces = replaces  # the dense layer type this stands in for ("Linear" or "Conv1D")
        self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @classmethod
    def from_factors(
        cls, f: LowRankFactors, dtype: torch.dtype, name: str = "LowRankLinear", replaces: str = "Linear"
    ) -> LowRankLinear:
        """A layer holding `f` (already stored: quant.py layouts); float factors and bias take `dtype`."""
        layer = cls(f.in_features, f.out_features, f.rank, f.bits, f.group_size, f.bias is not None, dtype,
                    f.down.device, name, replaces)
        with torch.no_grad():
            for buffer in ("down", "down_scale", "up_t", "up_t_scale"):
                if getattr(f, buffer) is not None:
                    getattr(layer, buffer).copy_(getattr(f, buffer))
            if f.bias is not None:
                layer.bias.copy_(f.bias)
        return layer

    def factors(self) -> LowRankFactors:
        return LowRankFactors(self.down, self.down_scale, self.up_t, self.up_t_scale, self.bias, self.bits,
                              self.group_size)

    # ---- the format contract (formats.py) ------------------------------------------------
    def spec(self) -> dict:
        return {**self.common_spec(), "rank": self.rank, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device: torch.device | str = "meta") -> LowRankLinear:
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bits"], spec["group_size"],
                   spec["bias"], dtype, device, replaces=spec["kind"])

    @classmethod
    def check_spec(cls, spec: dict, where: str) -> None:
        check_factor_spec(spec, where)

    def dequantized_weight(self) -> torch.Tensor:
        """The [out, in] float32 weight these factors represent."""
        down, up_t = dequantized_factors(self.factors())  # [r, in], [r, out]
        return up_t.t() @ down

    def kernel_problems(self, m: int, x_bytes: int) -> list[Problem]:
        return [problem_for(self.factors(), m, x_bytes)]

    # ---- nn.Module -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        self.check_input(x)
        return lowrank_matmul(x, self.factors())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bits={bits_label(self.bits)}{group}, bias={self.bias is not None}"
        )
