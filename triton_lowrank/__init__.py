"""triton_lowrank: transformer weights as quantized low-rank factors, served by Triton kernels.

Importing the package registers the transformers quantizer (from_pretrained loads our checkpoints)
and the autotuner's config selector (the custom op asks it for tile configs).
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

from . import autotune  # noqa: F401  (installs the tuned-config selector into the launcher)
from .checkpoint import load_compressed, save_compressed
from .checkpoint_format import CheckpointError
from .compress import CompressionReport, LayerReport, compress_model
from .config import OUTPUT_HEAD, LowRankConfig
from .embedded import embedded_model_path
from .factors import LowRankFactors
from .formats import CompressedLinear, dense_weight, register_format
from .hf_quantizer import TritonLowRankConfig, mark_compressed  # registers with transformers
from .hybrid_layers import HybridLinear
from .hybrid_storage import HybridWeights, hybrid_reference
from .layers import LowRankLinear
from .ops import hybrid_matmul, lowrank_matmul
from .reference import lowrank_reference

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
    "OUTPUT_HEAD",
    "TritonLowRankConfig",
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
    "save_compressed",
]
__version__ = "0.1.0"
