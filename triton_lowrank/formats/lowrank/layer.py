"""LowRankLinear: a linear layer stored as two (optionally quantized) rank-r factors.

The module only stores: the tensors arrive already quantized (compression decides how: round to
nearest, or error feedback) as a LowRankFactors (factors.py has the layout), and the forward is
the custom op, which picks the Triton kernels or the PyTorch reference.
"""

from __future__ import annotations

import torch

from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.format import CompressedLinear, check_factor_spec, register_factor_buffers
from triton_lowrank.core.ops import problem_for
from triton_lowrank.core.quant import bits_label
from triton_lowrank.core.reference import dequantized_factors
from triton_lowrank.formats.lowrank.op import lowrank_matmul
from triton_lowrank.kernels.configs import Problem


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

    stored = factors  # the format's storage NamedTuple, by the name every format uses

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
