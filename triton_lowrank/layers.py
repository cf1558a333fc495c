"""LowRankLinear: a linear layer stored as two (optionally quantized) rank-r factors.

W_r = up · down with up [out, r] and down [r, in]. The up factor is STORED transposed, as
up_t [r, out], so both factors are [r, features] matrices: int8 scales are then one per
rank component (which absorbs the singular-value scale of that component), int4 groups run
along the contiguous feature axis, and a single quantizer serves both factors.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import check_bits, dequantize, factor_bytes, quantize, storage_shapes
from .reference import lowrank_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LowRankLinear(nn.Module):
    """y = x · (up · down)ᵀ + b, computed from quantized factors without a dense weight."""

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
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"{name}: rank must be in [1, min(in, out)] = [1, {min(in_features, out_features)}], "
                f"got {rank}"
            )
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {dtype}")
        check_bits(bits, group_size, in_features, f"{name} (in_features)")
        check_bits(bits, group_size, out_features, f"{name} (out_features)")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group_size = bits, group_size
        self.replaces = replaces  # the dense layer type this stands in for ("Linear" or "Conv1D"), for checkpoints
        storage_dtype = {None: dtype, 8: torch.int8, 4: torch.uint8}[bits]
        for factor, features in (("down", in_features), ("up_t", out_features)):
            data_shape, scale_shape = storage_shapes(rank, features, bits, group_size)
            self.register_buffer(factor, torch.empty(data_shape, dtype=storage_dtype, device=device))
            scale = None if scale_shape is None else torch.empty(scale_shape, dtype=torch.float32, device=device)
            self.register_buffer(f"{factor}_scale", scale)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @classmethod
    def from_factors(
        cls,
        up: torch.Tensor,  # [out, r]
        down: torch.Tensor,  # [r, in]
        bias: torch.Tensor | None,  # [out]
        bits: int | None,
        group_size: int = 128,
        dtype: torch.dtype = torch.float16,
        name: str = "LowRankLinear",
        replaces: str = "Linear",
    ) -> LowRankLinear:
        """Round each factor to nearest (or keep it as floats for bits=None) and store it."""
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"{name}: up is [out, {up.shape[1]}] but down is [{down.shape[0]}, in]")
        if bits is None:
            stored = (down, None, up.t(), None)
        else:
            stored = (*quantize(down.contiguous(), bits, group_size), *quantize(up.t().contiguous(), bits, group_size))
        return cls.from_stored(*stored, bias, bits, group_size, dtype, name, replaces)

    @classmethod
    def from_stored(
        cls,
        down: torch.Tensor,  # storage [r, in] (int4: [r, in // 2])
        down_scale: torch.Tensor | None,
        up_t: torch.Tensor,  # storage [r, out] (int4: [r, out // 2])
        up_t_scale: torch.Tensor | None,
        bias: torch.Tensor | None,  # [out]
        bits: int | None,
        group_size: int = 128,
        dtype: torch.dtype = torch.float16,
        name: str = "LowRankLinear",
        replaces: str = "Linear",
    ) -> LowRankLinear:
        """A layer holding already quantized factors (quant.py layouts), e.g. from GPTQ."""
        per_byte = 2 if bits == 4 else 1
        in_features, out_features = down.shape[1] * per_byte, up_t.shape[1] * per_byte
        layer = cls(
            in_features, out_features, down.shape[0], bits, group_size, bias is not None, dtype, down.device, name,
            replaces,
        )  # fmt: skip
        with torch.no_grad():
            stored = {"down": down, "down_scale": down_scale, "up_t": up_t, "up_t_scale": up_t_scale}
            for buffer, value in stored.items():
                if value is not None:
                    getattr(layer, buffer).copy_(value)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def _apply(self, fn, recurse=True):
        # model.half() / .to(bf16) would round the float32 scales too, and fp16 scales underflow for
        # small rank components: scales follow device moves only, with their original float32 values.
        scales = {name: getattr(self, name) for name in ("down_scale", "up_t_scale")}
        super()._apply(fn, recurse)
        for name, scale in scales.items():
            moved = getattr(self, name)
            if scale is not None and moved.dtype != torch.float32:
                device = moved.device
                self._buffers[name] = torch.empty_like(scale, device=device) if scale.is_meta else scale.to(device)
        return self

    def dequantized_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, r], down [r, in]) in float32."""
        down = dequantize(self.down, self.down_scale, self.bits, self.group_size)
        up_t = dequantize(self.up_t, self.up_t_scale, self.bits, self.group_size)
        return up_t.t(), down

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] float32 weight these factors represent (for error reports and tests)."""
        up, down = self.dequantized_factors()
        return up @ down

    def storage_bytes(self) -> int:
        """Bytes of the factors, scales and bias as stored."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    @staticmethod
    def predicted_bytes(
        in_features: int, out_features: int, rank: int, bits: int | None, group_size: int, float_bytes: int
    ) -> int:
        """Factor and scale bytes before a layer exists (bias excluded): for rank allocation."""
        return factor_bytes(rank, in_features, bits, group_size, float_bytes) + factor_bytes(
            rank, out_features, bits, group_size, float_bytes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"LowRankLinear: input dtype must be float32, float16 or bfloat16, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LowRankLinear: input has {x.shape[-1]} features, layer expects {self.in_features}")
        if x.is_cuda:
            from .ops import lowrank_matmul  # imported lazily: CPU-only use never touches Triton

            return lowrank_matmul(x, self)
        return lowrank_reference(
            x, self.down, self.down_scale, self.up_t, self.up_t_scale, self.bias, self.bits, self.group_size
        )

    def extra_repr(self) -> str:
        bits = "fp" if self.bits is None else f"int{self.bits}"
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bits={bits}{group}, bias={self.bias is not None}"
        )
