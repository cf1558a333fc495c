"""triton_lowrank: transformer weights as quantized low-rank factors (or a quantized base plus a low-rank
correction), served by Triton kernels.

Importing the package registers the weight formats (formats/lowrank, formats/hybrid), the transformers quantizer
(from_pretrained loads our checkpoints) and the autotuner's config selector (the ops ask it for tile configs).
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "kernels" / "launch.py").is_file():
    # A source checkout (plain with PYTHONPATH, or editable): the top-level kernels/ folder is this package's
    # `kernels` subpackage, as the installed package maps it (pyproject's package-dir), with no install step.
    # kernels/ has no __init__.py on purpose: for a Python started in the checkout it is then at most a
    # namespace portion, which never shadows an installed regular package named `kernels` (Hugging Face's,
    # which transformers imports).
    _spec = importlib.machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    _spec.submodule_search_locations = [str(_CHECKOUT / "kernels")]
    kernels = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # as `import` binds a subpackage

from triton_lowrank.checkpoint.format import CheckpointError
from triton_lowrank.checkpoint.hf_quantizer import TritonLowRankConfig, mark_compressed  # registers with transformers
from triton_lowrank.checkpoint.save_load import load_compressed, save_compressed
from triton_lowrank.compression.compress import CompressionReport, LayerReport, compress_model
from triton_lowrank.core import autotune  # noqa: F401  (installs the tuned-config selector into the launcher)
from triton_lowrank.core.config import OUTPUT_HEAD, LowRankConfig, QuantScheme
from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.format import (
    CompressedLinear,
    WeightFormat,
    dense_weight,
    register_format,
    register_weight_format,
)
from triton_lowrank.core.reference import lowrank_reference
from triton_lowrank.embedded import embedded_model_path
from triton_lowrank.formats.hybrid.layer import HybridLinear
from triton_lowrank.formats.hybrid.op import hybrid_matmul
from triton_lowrank.formats.hybrid.storage import HybridWeights, hybrid_reference
from triton_lowrank.formats.lowrank.layer import LowRankLinear
from triton_lowrank.formats.lowrank.op import lowrank_matmul

__all__ = [
    "CheckpointError",
    "CompressedLinear",
    "CompressionReport",
    "HybridLinear",
    "HybridWeights",
    "LayerReport",
    "LowRankConfig",
    "LowRankFactors",
    "LowRankLinear",
    "QuantScheme",
    "OUTPUT_HEAD",
    "QuantScheme",
    "TritonLowRankConfig",
    "WeightFormat",
    "compress_model",
    "dense_weight",
    "embedded_model_path",
    "load_compressed",
    "hybrid_matmul",
    "hybrid_reference",
    "lowrank_matmul",
    "lowrank_reference",
    "mark_compressed",
    "register_format",
    "register_weight_format",
    "save_compressed",
]
__version__ = "0.1.0"
