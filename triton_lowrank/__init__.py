"""triton_lowrank: transformer weights as quantized low-rank factors, served by Triton kernels."""

from .checkpoint import load_compressed, save_compressed
from .compress import CompressionReport, LayerReport, compress_model
from .config import LowRankConfig
from .hf_quantizer import CheckpointError, TritonLowRankConfig, mark_compressed  # registers with transformers
from .layers import LowRankLinear
from .reference import lowrank_reference

__all__ = [
    "CheckpointError",
    "TritonLowRankConfig",
    "load_compressed",
    "mark_compressed",
    "save_compressed",
    "CompressionReport",
    "LayerReport",
    "LowRankConfig",
    "LowRankLinear",
    "compress_model",
    "lowrank_reference",
]
__version__ = "0.1.0"
