"""HybridLinear: a linear layer stored as a quantized base plus a low-rank correction, W ≈ Q + U·D.

Storage is hybrid_storage.HybridWeights as buffers (the base's codes, scales and int3/int2 zero points;
the correction's factors laid out as LowRankLinear lays them out); the forward is the custom op
hybrid_matmul. Fitting lives in compression (hybrid_fit.py).
"""

from __future__ import annotations

import torch

from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.format import CompressedLinear, check_factor_spec, check_spec_ints, register_factor_buffers
from triton_lowrank.core.quant import (
    BASE_BITS,
    ZERO_POINT_BITS,
    bits_label,
    check_base_bits,
)
from triton_lowrank.formats.hybrid.op import hybrid_matmul, hybrid_problem_for
from triton_lowrank.formats.hybrid.storage import HybridWeights


class HybridLinear(CompressedLinear):
    """y = x · (Q̂ + up · down)ᵀ + b from a quantized base and quantized (or float) factors."""

    FORMAT = "hybrid"
    FP32_BUFFERS = ("base_scale", "down_scale", "up_t_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        base_bits: int,
        base_group_size: int,
        rank: int,
        bits: int | None = 8,
        group_size: int = 128,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        name: str = "HybridLinear",
        replaces: str = "Linear",
    ) -> None:
        super().__init__()
        check_base_bits(base_bits, base_group_size, in_features, f"{name} (base, in_features)")
        group_size = register_factor_buffers(self, in_features, out_features, rank, bits, group_size, dtype, device,
                                             f"{name} correction")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.base_bits, self.base_group_size, self.bits, self.group_size = base_bits, base_group_size, bits, group_size
        self.replaces = replaces
        groups = (out_features, in_features // base_group_size)
        self.register_buffer("base", torch.empty(out_features, in_features * base_bits // 8, dtype=torch.uint8,
                                                 device=device))  # [out, in * base_bits / 8] codes
        self.register_buffer("base_scale", torch.empty(groups, dtype=torch.float32, device=device))
        zero = torch.empty(groups, dtype=torch.uint8, device=device) if base_bits in ZERO_POINT_BITS else None
        self.register_buffer("base_zero", zero)
        self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @classmethod
    def from_weights(
        cls, w: HybridWeights, dtype: torch.dtype, name: str = "HybridLinear", replaces: str = "Linear"
    ) -> HybridLinear:
        """A layer holding `w` (already stored); float factors and bias take `dtype`."""
        c = w.correction
        layer = cls(c.in_features, c.out_features, w.base_bits, w.base_group_size, c.rank, c.bits, c.group_size,
                    w.bias is not None, dtype, c.down.device, name, replaces)
        with torch.no_grad():
            for buffer, value in (("base", w.base), ("base_scale", w.base_scale), ("base_zero", w.base_zero),
                                  *((b, getattr(c, b)) for b in ("down", "down_scale", "up_t", "up_t_scale")),
                                  ("bias", w.bias)):
                if value is not None:
                    getattr(layer, buffer).copy_(value)
        return layer

    def weights(self) -> HybridWeights:
        correction = LowRankFactors(self.down, self.down_scale, self.up_t, self.up_t_scale, None, self.bits,
                                    self.group_size)
        return HybridWeights(self.base, self.base_scale, self.base_zero, self.base_bits, self.base_group_size,
                             correction, self.bias)

    stored = weights  # the format's storage NamedTuple, by the name every format uses

    # ---- the format contract (formats.py) ------------------------------------------------
    def spec(self) -> dict:
        return {**self.common_spec(), "base_bits": self.base_bits, "base_group_size": self.base_group_size,
                "rank": self.rank, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device: torch.device | str = "meta") -> HybridLinear:
        return cls(spec["in_features"], spec["out_features"], spec["base_bits"], spec["base_group_size"],
                   spec["rank"], spec["bits"], spec["group_size"], spec["bias"], dtype, device, replaces=spec["kind"])

    @classmethod
    def check_spec(cls, spec: dict, where: str) -> None:
        check_spec_ints(spec, ("base_bits", "base_group_size"), where)
        if spec["base_bits"] not in BASE_BITS:
            raise ValueError(f"{where}.base_bits must be one of 4, 3 or 2, got {spec['base_bits']!r}")
        check_factor_spec(spec, where)
        check_base_bits(spec["base_bits"], spec["base_group_size"], spec["in_features"], f"{where} (base)")

    def dequantized_weight(self) -> torch.Tensor:
        """The [out, in] float32 weight Q̂ + U·D."""
        return self.weights().dense_weight()

    def kernel_problems(self, m: int, x_bytes: int) -> list:
        return [hybrid_problem_for(self.weights(), m, x_bytes)]

    # ---- nn.Module -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        self.check_input(x)
        return hybrid_matmul(x, self.weights())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, base_bits={self.base_bits}, "
            f"base_group_size={self.base_group_size}, rank={self.rank}, bits={bits_label(self.bits)}{group}, "
            f"bias={self.bias is not None}"
        )
