"""triton_lowrank: transformer weights as quantized low-rank factors, served by Triton kernels.

Importing the package registers the transformers quantizer (from_pretrained loads our checkpoints)
and the autotuner's config selector (the custom op asks it for tile configs).
"""

from . import autotune  # noqa: F401  (installs the tuned-config selector into the launcher)
from .checkpoint import load_compressed, save_compressed
from .checkpoint_format import CheckpointError
from .compress import CompressionReport, LayerReport, compress_model
from .config import LowRankConfig
from .embedded import embedded_model_path
from .factors import LowRankFactors
from .formats import CompressedLinear, dense_weight, register_format
from .hf_quantizer import TritonLowRankConfig, mark_compressed  # registers with transformers
from .layers import LowRankLinear
from .ops import lowrank_matmul
from .reference import lowrank_reference

__all__ = [
    "CheckpointError",
    "CompressedLinear",
    "CompressionReport",
    "LayerReport",
    "LowRankConfig",
    "LowRankFactors",
    "LowRankLinear",
    "TritonLowRankConfig",
    "compress_model",
    "dense_weight",
    "embedded_model_path",
    "load_compressed",
    "lowrank_matmul",
    "lowrank_reference",
    "mark_compressed",
    "register_format",
    "save_compressed",
]
__version__ = "0.1.0"
