"""triton_lowrank: transformer weights as quantized low-rank factors, served by Triton kernels."""

from .compress import CompressionReport, LayerReport, compress_model
from .config import LowRankConfig
from .layers import LowRankLinear
from .reference import lowrank_reference

__all__ = [
    "CompressionReport",
    "LayerReport",
    "LowRankConfig",
    "LowRankLinear",
    "compress_model",
    "lowrank_reference",
]
__version__ = "0.1.0"
