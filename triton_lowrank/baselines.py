"""What a compression is compared with, and the bytes it is compared at.

Weight bytes everywhere count the stored weight matrices of the compressed layers (factors or
quantized dense weight, with their float32 scales); biases are excluded because every method
keeps the same bias. The RTN baselines are SIMULATED: the dense weights are quantized and
dequantized in place in a copy of the model (so compute stays in float), and their bytes are
what the int8/int4 storage plus scales would take (quant.matrix_bytes), not what the copy holds.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .compress import compress_model, select_layers
from .config import LowRankConfig
from .formats import compressed_layers, dense_weight
from .quant import NO_GROUPS, dequantize, matrix_bytes, quantize, tensor_bytes


def dense_bytes(model: nn.Module, config: LowRankConfig, float_bytes: int = 2) -> int:
    """Bytes of the selected layers' dense weight matrices stored as fp16 (the budget's reference)."""
    layers = select_layers(model, config).values()
    return sum(matrix_bytes(*dense_weight(m).shape, None, NO_GROUPS, float_bytes) for m in layers)


def compressed_bytes(model: nn.Module) -> int:
    """Stored bytes of every compressed layer in `model`, scales included, biases excluded."""
    return tensor_bytes(b for m in compressed_layers(model).values() for b in m.buffers())


@torch.no_grad()
def rtn_baseline(dense_model: nn.Module, bits: int, group_size: int = 128, config: LowRankConfig | None = None):
    """(copy of the model with RTN quantize-dequantized weights, bytes the quantized storage takes).

    The layers are those `config` (include/exclude only) selects, so a baseline covers the same
    matrices as the low-rank compression it is compared with. int8 has one scale per output row;
    int4 one scale per `group_size` input features.
    """
    model = copy.deepcopy(dense_model)
    stored = 0
    for module in select_layers(model, config or LowRankConfig(budget=1.0)).values():
        weight = dense_weight(module)  # [out, in]; a view, so copy_ writes through for Conv1D too
        storage, scale = quantize(weight, bits, group_size)
        weight.copy_(dequantize(storage, scale, bits, group_size))
        stored += matrix_bytes(*weight.shape, bits, group_size)
    return model, stored


def compress_copy(
    dense_model: nn.Module, config: LowRankConfig, calibration: Iterable | None = None, progress: bool = False
):
    """(compressed deep copy of `dense_model`, CompressionReport); the dense model is left as is."""
    model = copy.deepcopy(dense_model)
    report = compress_model(model, config, calibration if config.method == "whitened" else None, progress)
    return model, report
