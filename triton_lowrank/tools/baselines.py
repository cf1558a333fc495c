"""What a compression is compared with, and the bytes it is compared at.

Weight bytes everywhere count the stored weight matrices of the compressed layers (factors or
quantized dense weight, with their float32 scales and uint8 zeros); biases are excluded because every
method keeps the same bias. The quantization baselines are SIMULATED: the dense weights are quantized
and dequantized in place in a copy of the model (so compute stays in float), and their bytes are what
the stored codes plus scales would take (quant.matrix_bytes), not what the copy holds.

Baselines (weight-only, on the same layers as the compression they are compared with):
- RTN int8: one scale per output row.
- RTN int4: symmetric, one scale per `group_size` input features (quant.quantize).
- RTN int3 / int2: asymmetric, one scale and one zero per group (quant.py's zero-point storage, the
  hybrid format's low-bit base).
- GPTQ int4 / int3 / int2: the same storage, fitted by GPTQ on each layer's calibration Gram matrix
  XᵀX of the dense model (hybrid_fit.fit_base, the hybrid format's base fit).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from triton_lowrank.compression.compress import compress_model, select_layers
from triton_lowrank.core.calibration import collect_grams
from triton_lowrank.core.config import LowRankConfig
from triton_lowrank.core.format import compressed_layers, dense_weight
from triton_lowrank.core.nbytes import matrix_bytes, tensor_bytes
from triton_lowrank.core.quant import NO_GROUPS, dequantize, fitted_group_size, quantize
from triton_lowrank.formats.hybrid.fit import fit_base
from triton_lowrank.formats.hybrid.storage import dequantize_base

BASELINE_BITS = (8, 4, 3, 2)
GPTQ_BITS = (4, 3, 2)


def default_selection(config: LowRankConfig | None) -> LowRankConfig:
    """The layers every method compresses by default (include/exclude only; the rank knob is unused)."""
    return config or LowRankConfig(budget=1.0)


def dense_bytes(model: nn.Module, config: LowRankConfig, float_bytes: int = 2) -> int:
    """Bytes of the selected layers' dense weight matrices stored as fp16 (the budget's reference)."""
    layers = select_layers(model, config).values()
    return sum(matrix_bytes(*dense_weight(m).shape, None, NO_GROUPS, float_bytes) for m in layers)


def compressed_bytes(model: nn.Module) -> int:
    """Stored bytes of every compressed layer in `model`, scales included, biases excluded."""
    return tensor_bytes(b for m in compressed_layers(model).values() for b in m.buffers())


def baseline_label(method: str, bits: int, group_size: int | None) -> str:
    """How tables and plots name a baseline: "RTN int8", "RTN int4 g128", "GPTQ int3 g64", "RTN int4 g<=128"."""
    return f"{method.upper()} int{bits}" + ("" if bits == 8 else f" g{'<=128' if group_size is None else group_size}")


# ----------------------------------------------------------------------------- one weight


@torch.no_grad()
def quantized_weight(
    weight: torch.Tensor,  # [out, in]
    bits: int,
    group_size: int | None = 128,
    gram: torch.Tensor | None = None,  # [in, in] calibration XᵀX: GPTQ; None: round to nearest
) -> tuple[torch.Tensor, int]:
    """(dequantized float32 weight [out, in], bytes its storage takes) of one baseline weight. group_size None:
    the largest group <= 128 that this layer's input width allows (quant.fitted_group_size), as compress_model
    fits an unset base_group_size."""
    if bits not in BASELINE_BITS:
        raise ValueError(f"baseline bits must be one of 8, 4, 3 or 2, got {bits!r}")
    if bits == 8:
        if gram is not None:
            raise ValueError("GPTQ baselines are int4, int3 or int2; int8 is round-to-nearest only")
        storage, scale = quantize(weight, 8)
        return dequantize(storage, scale, 8), matrix_bytes(*weight.shape, 8, NO_GROUPS)
    if group_size is None:
        group_size = fitted_group_size(bits, (weight.shape[1],), "baseline", base=True)
    stored = fit_base(weight.float(), bits, group_size, gram)  # (codes, scales, zeros or None)
    return dequantize_base(*stored, bits, group_size), matrix_bytes(*weight.shape, bits, group_size)


# ----------------------------------------------------------------------------- a whole model


def layer_grams(
    dense_model: nn.Module, calibration: Iterable, config: LowRankConfig | None = None, progress: bool = False
) -> dict[str, torch.Tensor]:
    """{layer name: [in, in] Gram XᵀX} of the selected layers' inputs in the dense model (for GPTQ)."""
    layers = select_layers(dense_model, default_selection(config))
    return {name: stats.gram for name, stats in collect_grams(dense_model, layers, calibration, progress).items()}


@torch.no_grad()
def quantized_copy(
    dense_model: nn.Module,
    bits: int,
    group_size: int | None = 128,
    config: LowRankConfig | None = None,
    grams: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, int]:
    """(copy of the model with quantize-dequantized weights, bytes the quantized storage takes).

    The layers are those `config` (include/exclude only) selects, so a baseline covers the same
    matrices as the low-rank compression it is compared with. GPTQ where `grams` (layer_grams) is given.
    """
    model = copy.deepcopy(dense_model)
    stored = 0
    for name, module in select_layers(model, default_selection(config)).items():
        weight = dense_weight(module)  # [out, in]; a view, so copy_ writes through for Conv1D too
        fitted, nbytes = quantized_weight(weight, bits, group_size, None if grams is None else grams[name])
        weight.copy_(fitted)
        stored += nbytes
    return model, stored


def rtn_baseline(dense_model: nn.Module, bits: int, group_size: int | None = 128, config: LowRankConfig | None = None):
    """(copy of the model with RTN weights, stored bytes): int8 per row, int4/int3/int2 per `group_size`."""
    return quantized_copy(dense_model, bits, group_size, config)


def gptq_baseline(
    dense_model: nn.Module,
    bits: int,
    group_size: int | None,
    calibration: Iterable | None = None,
    config: LowRankConfig | None = None,
    grams: dict[str, torch.Tensor] | None = None,
):
    """(copy of the model with GPTQ weights, stored bytes), on `grams` or on Grams collected from `calibration`."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ baseline bits must be one of 4, 3 or 2, got {bits!r}")
    if grams is None:
        if calibration is None:
            raise ValueError("a GPTQ baseline needs calibration batches (or their Gram matrices)")
        grams = layer_grams(dense_model, calibration, config)
    return quantized_copy(dense_model, bits, group_size, config, grams)


def compress_copy(
    dense_model: nn.Module, config: LowRankConfig, calibration: Iterable | None = None, progress: bool = False
):
    """(compressed deep copy of `dense_model`, CompressionReport); the dense model is left as is."""
    model = copy.deepcopy(dense_model)
    calibrated = config.needs_calibration
    report = compress_model(model, config, calibration if calibrated else None, progress)
    return model, report
