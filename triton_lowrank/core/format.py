"""The weight-format contract and its one registry: where a weight format joins the package.

A weight format is one vertical slice (`triton_lowrank/formats/<name>/`) that registers one `WeightFormat`
object carrying everything about it: its layer type (a `CompressedLinear`), how a config asks for it, how it is
fitted from a dense weight and its calibration statistics, what a rank costs in bytes, its custom op with the
reference, the kernel problems it launches, their default and candidate tile configs, the launcher, and random
weights for tests and benches. Everything else dispatches through the registry, with no branch per format:

- compression (`compress_model`) asks `format_for_config(config)` and calls its fitting hooks;
- the launcher (`core.ops.run_format`) and the autotuner ask `format_for_problem(problem)` (Problem.format);
- the checkpoint format, both loaders, the quantizer, evaluation and pretuning use the layer type:
  `spec()` / `from_spec(spec, dtype, device)` (the JSON description of one layer in a checkpoint's
  quantization_config, and an empty skeleton rebuilt from it; every spec carries "format", "kind", "in_features",
  "out_features" and "bias"; `check_spec` validates the format's own fields); the module's persistent buffers
  and parameters ARE its storage, `FP32_BUFFERS` (scales) keep float32 through casts; `dequantized_weight()`;
  `kernel_problems(m, x_bytes)`.

A layer type registered alone (`register_format` as a class decorator) saves and loads but cannot be fitted by
compress_model: that needs the whole `WeightFormat` (`register_weight_format`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from triton_lowrank.core.quant import SUPPORTED_BITS, check_bits, storage_group_size, storage_shapes

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


@dataclass(frozen=True)
class WeightFormat:
    """Everything about one weight format. Only `name` and `layer` are required: a format with just those saves
    and loads; the fitting hooks make compress_model able to produce it; the op and kernel hooks serve the
    launcher, the autotuner and the benches. Shapes: weights are [out, in]; `config` is a LowRankConfig."""

    name: str  # the "format" field of every layer spec
    layer: type[CompressedLinear]
    # --- config: how a LowRankConfig asks for this format, and what it then needs
    claims_config: Callable | None = None  # (config) -> bool; None: the default format (pure low rank)
    check_config: Callable | None = None  # (config) -> None, raises ValueError naming the knob
    default_rank: dict | None = None  # the rank knob the CLI uses when none is given (None: one must be given)
    rank_needed: str = "this format needs a rank"  # the CLI's words when a rank knob must be given
    needs_grams: Callable | None = None  # (config) -> why the fit needs calibration Gram matrices, "" if it does not
    # --- fitting (how it is fitted; `layer` says how it is stored)
    for_layer: Callable | None = None  # (config, in, out, where) -> config with this format's unset knobs fitted
    check_layer: Callable | None = None  # (name, out_features, in_features, config) -> None, raises
    rank_bytes: Callable | None = None  # (out, in, config, float_bytes) -> (bytes per rank, bytes before any rank)
    fixed_bytes_label: Callable | None = None  # (config) -> what a budget must hold at least, in words
    prepare: Callable | None = None  # (GramStats | None, config, name) -> calibration state of one layer
    # (weight [out, in], config, name) -> factorize.FitError: how shrinkage="heldout" scores an α on this layer
    heldout_error: Callable | None = None
    measure: Callable | None = None  # (weight, state, config, name) -> (spectrum, normalizer or None)
    allocate: Callable | None = None  # (spectra, normalizers, bytes per rank, bytes for ranks) -> ranks
    fit: Callable | None = None  # (weight, bias, rank, state, config, dtype, name, kind) -> (layer, rel. error)
    # --- the op
    storage: type | None = None  # the NamedTuple of stored tensors the op takes (layer.stored())
    matmul: Callable | None = None  # (x, storage, *, out=None, config=None) -> y
    reference: Callable | None = None  # (x, storage) -> y, the one PyTorch reference
    cpu: Callable | None = None  # (x, storage) -> y on the CPU without Triton (packed kernels; None: the reference)
    problem: Callable | None = None  # (storage, m, x_bytes) -> the kernel Problem of m activation rows
    # --- kernels: problems, tile configs, launch
    problem_key: Callable | None = None  # (Problem) -> the autotune key's format part ("" for the default)
    default_config: Callable | None = None  # (Problem, num_sms, interpret, fused_max_m) -> TileConfig
    candidates: Callable | None = None  # (Problem, mode, num_sms, smem_limit, fused_max_m) -> [TileConfig]
    launch: Callable | None = None  # (x2d, storage, config, out2d) -> None; None where Triton is missing
    random_storage: Callable | None = None  # (Problem, dtype, device) -> storage, for tests, benches, the tuner

    @property
    def fittable(self) -> bool:
        return self.fit is not None


FORMATS: dict[str, WeightFormat] = {}


def register_weight_format(fmt: WeightFormat) -> WeightFormat:
    """Make a format loadable, savable, fittable and runnable everywhere (its package's __init__ calls this)."""
    if not issubclass(fmt.layer, CompressedLinear):
        raise TypeError(f"register_weight_format: {fmt.layer.__name__} is not a CompressedLinear")
    if fmt.name != fmt.layer.FORMAT:
        raise ValueError(f"register_weight_format: {fmt.layer.__name__}.FORMAT is {fmt.layer.FORMAT!r}, "
                         f"the format is {fmt.name!r}")
    FORMATS[fmt.name] = fmt
    return fmt


def register_format(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    """Class decorator for a layer type alone: it then saves and loads (a storage-only format)."""
    if not isinstance(cls, type) or not issubclass(cls, CompressedLinear):
        raise TypeError(f"register_format: {getattr(cls, '__name__', cls)!r} is not a CompressedLinear")
    register_weight_format(WeightFormat(cls.FORMAT, cls))
    return cls


def weight_format(name: str) -> WeightFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name]


def format_class(name: str) -> type[CompressedLinear]:
    return weight_format(name).layer


def format_for_config(config) -> WeightFormat:
    """The format a LowRankConfig asks for: `config.format` if set, else the one whose claims_config holds, else
    the default format (the one without claims_config)."""
    if config.format is not None:
        fmt = weight_format(config.format)
    else:
        claimed = [f for f in FORMATS.values() if f.claims_config is not None and f.claims_config(config)]
        defaults = [f for f in FORMATS.values() if f.claims_config is None and f.fittable]
        if len(claimed) > 1:
            raise ValueError(f"LowRankConfig: the knobs ask for several formats at once: {[f.name for f in claimed]}")
        fmt = claimed[0] if claimed else defaults[0]
    if not fmt.fittable:
        raise ValueError(f"weight format {fmt.name!r} is storage-only: compress_model cannot fit it")
    return fmt


def format_for_problem(problem) -> WeightFormat:
    """The format whose kernels a Problem describes (Problem.format names it)."""
    return weight_format(problem.format)


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    """{module name: layer} for every compressed layer of `model`, any format."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}


# ----------------------------------------------------------------------------- factor storage shared by formats

STORAGE_DTYPES = {8: torch.int8, 4: torch.uint8}


def check_spec_ints(spec: dict, fields, where: str) -> None:
    """Raise ValueError naming `where` and the field if one of `fields` is missing or not an integer."""
    for field in fields:
        if not isinstance(spec.get(field), int) or isinstance(spec.get(field), bool):
            raise ValueError(f"{where}.{field} is missing or not an integer: {spec.get(field)!r}")


def check_factor_spec(spec: dict, where: str) -> None:
    """The checks of a spec's factor fields (rank, bits, group_size): a LowRankLinear's, a HybridLinear's correction."""
    check_spec_ints(spec, ("rank", "group_size"), where)
    if spec.get("bits", "missing") not in SUPPORTED_BITS:
        raise ValueError(f"{where}.bits must be one of None, 8 or 4, got {spec.get('bits', 'nothing')!r}")
    if not 1 <= spec["rank"] <= min(spec["in_features"], spec["out_features"]):
        raise ValueError(f"{where}.rank {spec['rank']} is outside [1, min(in, out)]")
    group_size = storage_group_size(spec["bits"], spec["group_size"])
    check_bits(spec["bits"], group_size, spec["in_features"], f"{where} (in_features)")
    check_bits(spec["bits"], group_size, spec["out_features"], f"{where} (out_features)")


def register_factor_buffers(
    module: torch.nn.Module,
    in_features: int,
    out_features: int,
    rank: int,
    bits: int | None,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    name: str,
) -> int:
    """Check a rank-r factor pair's shape, dtype and bits, and register its empty storage on `module`:
    down [r, in] and up_t [r, out] with their float32 scales (factors.py layout). Returns the group size
    the storage really uses. Shared by every format that stores low-rank factors."""
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"{name}: rank must be in [1, min(in, out)] = [1, {min(in_features, out_features)}], got {rank}"
        )
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {dtype}")
    group_size = storage_group_size(bits, group_size)
    check_bits(bits, group_size, in_features, f"{name} (in_features)")
    check_bits(bits, group_size, out_features, f"{name} (out_features)")
    storage_dtype = STORAGE_DTYPES.get(bits, dtype)
    for factor, features in (("down", in_features), ("up_t", out_features)):
        data_shape, scale_shape = storage_shapes(rank, features, bits, group_size)
        module.register_buffer(factor, torch.empty(data_shape, dtype=storage_dtype, device=device))
        scale = None if scale_shape is None else torch.empty(scale_shape, dtype=torch.float32, device=device)
        module.register_buffer(f"{factor}_scale", scale)
    return group_size
