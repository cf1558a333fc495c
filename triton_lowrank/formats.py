"""The weight-format registry: where a compressed layer type joins the package.

A weight format is an nn.Module subclass of `CompressedLinear` registered with `register_format`.
Everything above the modules (checkpoint format, HF quantizer, save/load, CLI, evaluation, the
autotuner's model walk) works through this interface and the registry, with no branch per format:

- `spec()` / `from_spec(spec, dtype, device)`: the JSON description of one layer in a checkpoint's
  quantization_config, and an empty skeleton rebuilt from it (on meta while loading). Every spec
  carries "format", "kind" (the dense class replaced: "Linear" or "Conv1D"), "in_features",
  "out_features" and "bias"; `check_spec` validates the format's own fields.
- the module's persistent buffers and parameters ARE its storage: the expected tensors of a
  checkpoint are read off a meta skeleton, and `FP32_BUFFERS` (scales) keep float32 through casts.
- `dequantized_weight()`: the [out, in] float32 weight the storage represents.
- `kernel_problems(m)`: the kernel problems a forward at M rows launches (for pre-tuning).

To add a format: its storage and reference (bottom layer), its kernel and op, its module here
(subclass, `register_format`), and its fitting code in compression.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

DENSE_KINDS = {"Linear": nn.Linear, "Conv1D": Conv1D}  # the dense layer types a format can replace
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMMON_SPEC_FIELDS = {"format": str, "kind": str, "in_features": int, "out_features": int, "bias": bool}


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a layer. Orientation is decided by type, never by shape: nn.Linear
    stores [out, in], GPT-2's Conv1D [in, out]; a compressed layer gives its dequantized weight."""
    if isinstance(module, CompressedLinear):
        return module.dequantized_weight()
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"unsupported module type {type(module).__name__}")


class CompressedLinear(nn.Module):
    """Base of every registered weight format (see the module docstring for the contract)."""

    FORMAT: ClassVar[str]
    FP32_BUFFERS: ClassVar[tuple[str, ...]] = ()

    in_features: int
    out_features: int
    replaces: str  # "Linear" or "Conv1D"

    def spec(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype, device: torch.device | str = "meta") -> CompressedLinear:
        raise NotImplementedError

    @classmethod
    def check_spec(cls, spec: dict, where: str) -> None:
        """Raise ValueError naming `where` and the field if this format's own fields are wrong."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def kernel_problems(self, m: int, x_bytes: int) -> list:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """The forward's own checks, one line naming the layer type and the problem."""
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: input dtype must be float32, float16 or bfloat16, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, layer expects "
                             f"{self.in_features}")

    def common_spec(self) -> dict:
        return {"format": self.FORMAT, "kind": self.replaces, "in_features": self.in_features,
                "out_features": self.out_features, "bias": getattr(self, "bias", None) is not None}

    def _apply(self, fn, recurse=True):
        # model.half() / .to(bf16) would round the float32 scales too, and fp16 scales underflow for
        # small rank components: scales follow device moves only, with their original float32 values.
        scales = {name: getattr(self, name) for name in self.FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, scale in scales.items():
            moved = getattr(self, name)
            if scale is not None and moved.dtype != torch.float32:
                device = moved.device
                self._buffers[name] = torch.empty_like(scale, device=device) if scale.is_meta else scale.to(device)
        return self


def untie_head(model: nn.Module) -> None:
    """A compressed output head cannot share the embedding matrix: stop transformers re-tying it."""
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False


FORMATS: dict[str, type[CompressedLinear]] = {}


def register_format(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    """Class decorator: make a CompressedLinear subclass loadable, savable and usable everywhere."""
    if not issubclass(cls, CompressedLinear):
        raise TypeError(f"register_format: {cls.__name__} is not a CompressedLinear")
    FORMATS[cls.FORMAT] = cls
    return cls


def format_class(name: str) -> type[CompressedLinear]:
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name]


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    """{module name: layer} for every compressed layer of `model`, any format."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
