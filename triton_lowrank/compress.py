"""compress_model: replace a model's linear layers by LowRankLinear (or, with base_bits, HybridLinear) in place,
and report it.

This is also the one place where quantization is decided (`store_factors`): modules only store.
Nothing here knows about saving: layers above subscribe with `after_compression` (the transformers
integration attaches its quantizer there, so `model.save_pretrained` works straight after compressing).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import TOKENS_PER_FEATURE, GramStats, collect_grams
from .config import OUTPUT_HEAD, LowRankConfig
from .factorize import (
    allocate_budget,
    rank_for_energy,
    shrunk_gram,
    spectrum,
    truncated_factors,
    whitening_cholesky,
)
from .factors import LowRankFactors, lowrank_bytes, round_factors
from .formats import DENSE_KINDS, FLOAT_DTYPES, compressed_layers, dense_weight, untie_head
from .gptq import quantize_factors
from .hybrid_fit import (
    allocate_correction_ranks,
    base_bytes,
    base_error_spectrum,
    correction_rank_bytes,
    fit_hybrid,
)
from .hybrid_layers import HybridLinear
from .layers import LowRankLinear
from .quant import check_base_bits, check_bits, storage_group_size, tensor_bytes
from .reference import dequantized_factors
from .sequential import calibrate_blockwise, find_blocks

SUPPORTED_MODULES = tuple(DENSE_KINDS.values())
CompressedHook = Callable[[nn.Module], None]
_after_compression: list[CompressedHook] = []


def after_compression(hook: CompressedHook) -> CompressedHook:
    """Register `hook(model)`, called at the end of every compress_model (once per hook)."""
    if hook not in _after_compression:
        _after_compression.append(hook)
    return hook


@dataclass
class LayerReport:
    name: str
    kind: str  # "Linear" or "Conv1D"
    in_features: int
    out_features: int
    rank: int
    bits: int | None
    bytes_before: int  # bytes the layer owned alone (a weight tied to an embedding stays: 0)
    bytes_after: int  # factors + scales + bias
    rel_error: float  # ‖W - Ŵ‖_F / ‖W‖_F of the stored (quantized) factors
    calib_tokens: int | None = None  # real (unpadded) calibration tokens this layer saw; None without calibration


@dataclass
class CompressionReport:
    layers: list[LayerReport]
    config: LowRankConfig

    @property
    def bytes_before(self) -> int:
        return sum(row.bytes_before for row in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(row.bytes_after for row in self.layers)

    def ranks(self) -> dict[str, int]:
        return {row.name: row.rank for row in self.layers}

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "layers": [asdict(row) for row in self.layers]}

    def __str__(self) -> str:
        header = f"{'layer':<32} {'kind':<7} {'in':>6} {'out':>6} {'rank':>5} {'bits':>4} "
        header += f"{'bytes before':>13} {'bytes after':>12} {'rel err':>8}"
        calibrated = any(row.calib_tokens is not None for row in self.layers)
        header += f" {'calib tokens':>12}" if calibrated else ""
        lines = [header, "-" * len(header)]
        for row in self.layers:
            bits = "fp" if row.bits is None else str(row.bits)
            lines.append(
                f"{row.name:<32} {row.kind:<7} {row.in_features:>6} {row.out_features:>6} {row.rank:>5} "
                f"{bits:>4} {row.bytes_before:>13,} {row.bytes_after:>12,} {row.rel_error:>8.4f}"
                + (f" {row.calib_tokens or 0:>12,}" if calibrated else "")
            )
        ratio = self.bytes_after / max(self.bytes_before, 1)
        lines.append("-" * len(header))
        lines.append(
            f"{len(self.layers)} layers: {self.bytes_before:,} -> {self.bytes_after:,} bytes ({ratio:.1%} of before)"
        )
        return "\n".join(lines)


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head, found by what it is (transformers' get_output_embeddings), never by its name."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):  # a model class without an output head
        return None


def select_layers(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """Leaf modules chosen by include/exclude (OUTPUT_HEAD in exclude: the output head, by identity); an
    unsupported leaf matched by `include` is an error."""
    chosen = {}
    head = output_head(model) if OUTPUT_HEAD in config.exclude else None
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or any(fnmatchcase(name, p) for p in config.exclude):
            continue
        if head is not None and module is head:
            continue
        if config.include is None:
            if isinstance(module, SUPPORTED_MODULES):
                chosen[name] = module
        elif any(fnmatchcase(name, p) for p in config.include):
            if not isinstance(module, SUPPORTED_MODULES):
                raise TypeError(
                    f"{name}: include matched a {type(module).__name__}, but only nn.Linear and "
                    "transformers Conv1D can be compressed; narrow the include patterns"
                )
            chosen[name] = module
    if not chosen:
        if compressed_layers(model):
            raise ValueError("compress_model: the model is already compressed (it holds compressed layers)")
        raise ValueError("compress_model: no layer matched the include/exclude patterns")
    return chosen


def validate_layers(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """The layers `config` selects, each checked; raises before any work so nothing is half-compressed."""
    layers = select_layers(model, config)
    for name, module in layers.items():
        _validate(name, module, config)
    if config.base_bits is not None and config.budget is not None:
        check_hybrid_budget(layers, config)
    return layers


def check_hybrid_budget(layers: dict[str, nn.Module], config: LowRankConfig) -> None:
    """One clear error, before any work, when the budget cannot hold every base plus a rank-1 correction."""
    per_rank, bases = _rank_bytes(layers, config)
    dense_fp16 = _dense_fp16_bytes(layers)
    needed = (bases + sum(per_rank)) / dense_fp16
    if config.budget < needed:
        at_least = math.ceil(needed * 1e4) / 1e4  # rounded up, so that asking for it works
        groups = {layer_config(n, m, config).base_group_size for n, m in layers.items()}
        raise ValueError(
            f"budget {config.budget:g} is below what the int{config.base_bits} bases "
            f"(group {'/'.join(map(str, sorted(groups)))}) "
            f"and a rank-1 correction per layer take: {needed:.4g} of the fp16 dense bytes; use budget >= {at_least:g}"
        )


def _dense_fp16_bytes(layers: dict[str, nn.Module]) -> int:
    """The budget's reference: the layers' dense weights stored as fp16."""
    return sum(2 * dense_weight(m).numel() for m in layers.values())


def _rank_bytes(layers: dict[str, nn.Module], config: LowRankConfig) -> tuple[list[int], int]:
    """(bytes one rank step adds in each layer, bytes every layer takes before any rank: the hybrid bases, else 0).
    Unquantized factors are stored in the layer's dtype."""
    per_rank, bases = [], 0
    for name, module in layers.items():
        out_features, in_features = dense_weight(module).shape
        layer = layer_config(name, module, config)
        float_bytes = module.weight.element_size()
        if layer.base_bits is None:
            per_rank.append(lowrank_bytes(in_features, out_features, 1, layer.bits, layer.group_size, float_bytes))
        else:
            per_rank.append(correction_rank_bytes(out_features, in_features, layer.bits, layer.group_size,
                                                  float_bytes))
            bases += base_bytes(out_features, in_features, layer.base_bits, layer.base_group_size)
    return per_rank, bases


def recommended_calib_tokens(layers: dict[str, nn.Module]) -> int:
    """Calibration tokens for whitening to be well estimated: TOKENS_PER_FEATURE x the widest layer's inputs."""
    return TOKENS_PER_FEATURE * max(dense_weight(m).shape[1] for m in layers.values())


def layer_config(name: str, module: nn.Module, config: LowRankConfig) -> LowRankConfig:
    """`config` with the group sizes this layer stores (unset ones fitted to its widths: LowRankConfig.for_layer)."""
    out_features, in_features = dense_weight(module).shape
    return config.for_layer(in_features, out_features, name)


def _validate(name: str, module: nn.Module, config: LowRankConfig) -> None:
    out_features, in_features = dense_weight(module).shape
    if config.rank is not None and config.rank > min(in_features, out_features):
        raise ValueError(
            f"{name}: rank {config.rank} is out of range [1, min(in, out)] = [1, {min(in_features, out_features)}]"
        )
    if module.weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: weight dtype {module.weight.dtype} is not float32, float16 or bfloat16")
    if module.weight.is_meta:
        raise ValueError(f"{name}: weight is on the meta device; load the weights before compressing")
    for tensor_name, tensor in (("weight", module.weight), ("bias", module.bias)):
        if tensor is not None and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{name}: {tensor_name} has {bad} NaN or infinite value(s); only finite weights compress")
    config = layer_config(name, module, config)
    group_size = storage_group_size(config.bits, config.group_size)
    check_bits(config.bits, group_size, in_features, f"{name} (in_features)")
    check_bits(config.bits, group_size, out_features, f"{name} (out_features)")
    if config.base_bits is not None:
        check_base_bits(config.base_bits, config.base_group_size, in_features, f"{name} (base, in_features)")


def _choose_ranks(layers, chols, config: LowRankConfig, progress: bool, spectra=None, normalizers=None,
                  depth: int = 0) -> list[int]:
    """Each layer's rank (hybrid: the correction's). Budget and energy need `spectra` (hybrid: the base errors'
    spectra and `normalizers`, from base_error_spectrum); the low-rank format computes missing ones from chols.
    `depth`: the calls between compress_model and here, so that a warning points at compress_model's caller."""
    if config.rank is not None:
        return [config.rank] * len(layers)
    if config.rank_ratio is not None:
        return [max(1, round(config.rank_ratio * min(dense_weight(m).shape))) for m in layers.values()]
    if spectra is None:
        spectra = [
            spectrum(dense_weight(m), chols.get(n))
            for n, m in tqdm(layers.items(), desc="spectra", unit="layer", disable=not progress)
        ]
    if config.energy is not None:
        return [rank_for_energy(s, config.energy) for s in spectra]
    per_rank, bases = _rank_bytes(layers, config)
    dense_fp16 = _dense_fp16_bytes(layers)
    full_rank = bases + sum(b * min(dense_weight(m).shape) for b, m in zip(per_rank, layers.values(), strict=True))
    if config.budget * dense_fp16 > full_rank:
        warnings.warn(
            f"budget {config.budget:g} is more than full rank needs ({full_rank / dense_fp16:.3g} of the fp16 dense "
            "bytes for these layers): clamped, every layer keeps full rank",
            UserWarning,
            stacklevel=4 + depth,  # compress_model's caller (through torch.no_grad's wrapper)
        )
    budget_bytes = min(config.budget * dense_fp16, full_rank)
    if config.base_bits is not None:  # the bases are fixed: what they leave goes to correction ranks
        return allocate_correction_ranks(spectra, normalizers, per_rank, budget_bytes - bases)
    return allocate_budget(spectra, per_rank, budget_bytes)


def relative_error(weight: torch.Tensor, stored: LowRankFactors) -> float:
    """‖W - Ŵ‖_F / ‖W‖_F in float64 on the dequantized factors: a float32 norm overflows for an outlier
    weight (1e30 then reports 0 or nan); inf or nan when the stored result is."""
    down, up_t = dequantized_factors(stored)  # [r, in], [r, out]
    return relative_error_of(weight, up_t.double().t() @ down.double())


def relative_error_of(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W - Ŵ‖_F / ‖W‖_F in float64 of a dense approximation Ŵ [out, in]."""
    w = weight.detach().double()  # [out, in]
    error = torch.linalg.matrix_norm(w - approx.double())
    norm = torch.linalg.matrix_norm(w)
    if norm == 0:  # an all-zero weight: any error is infinitely large next to it
        return 0.0 if error == 0 else (error * math.inf).item()
    return (error / norm).item()


def _tied_to_other_module(model: nn.Module, module: nn.Module) -> bool:
    """True when the layer's weight tensor is also held by another module (e.g. GPT-2's tied lm_head)."""
    return any(
        p is module.weight for m in model.modules() if m is not module for p in m.parameters(recurse=False)
    )


def store_factors(
    weight: torch.Tensor,  # [out, in]
    up: torch.Tensor,  # [out, r]
    down: torch.Tensor,  # [r, in]
    bias: torch.Tensor | None,
    config: LowRankConfig,
    chol: torch.Tensor | None,
    dtype: torch.dtype,
) -> LowRankFactors:
    """How the factors are stored: error feedback (gptq.py) for quantized factors when the config asks for
    it, round-to-nearest otherwise, or floats in `dtype` for bits=None."""
    if config.bits is not None and config.error_feedback:
        f = quantize_factors(weight, down, config.bits, config.group_size, chol, bias)
        return f._replace(bias=None if bias is None else bias.detach().to(dtype))
    return round_factors(up, down, bias, config.bits, config.group_size, dtype)


def whitening(stats: GramStats, config: LowRankConfig, name: str) -> torch.Tensor | None:
    """Lower Cholesky factor of the layer's Gram matrix, shrunk as `config.shrinkage` says; None (plain SVD)
    for a layer whose calibration inputs were all zero (say, after an all-zero layer): any factors give
    zero activation error on such data, so whitening has nothing to weigh."""
    if not stats.gram.diagonal().sum() > 0:
        warnings.warn(f"{name}: calibration gave this layer only zero inputs; it is factorized by plain SVD",
                      UserWarning, stacklevel=4)
        return None
    gram, _ = shrunk_gram(stats, config.shrinkage)
    return whitening_cholesky(gram, config.damping, name)


def _compress_layer(model, name, module, rank, chol, config: LowRankConfig, calib_tokens, head) -> LayerReport:
    """Replace one layer by its LowRankLinear in `model`; its report row."""
    config = layer_config(name, module, config)
    weight = dense_weight(module)  # [out, in]
    up, down = truncated_factors(weight, rank, chol)
    stored = store_factors(weight, up, down, module.bias, config, chol, module.weight.dtype)
    new = LowRankLinear.from_factors(stored, module.weight.dtype, name, type(module).__name__)
    return _replace_layer(model, name, module, new, relative_error(weight, new.factors()), calib_tokens, head)


def _compress_hybrid_layer(model, name, module, rank, gram, config: LowRankConfig, calib_tokens, head) -> LayerReport:
    """Replace one layer by its HybridLinear (base fitted by hybrid_fit.fit_hybrid) in `model`; its report row."""
    config = layer_config(name, module, config)
    weight = dense_weight(module)  # [out, in]
    fit = fit_hybrid(weight, config.base_bits, config.base_group_size, rank, config.bits, config.group_size, gram,
                     config.base_method, config.method, error_feedback=config.error_feedback,
                     max_whitening_damping=config.damping, name=name)
    stored = fit._replace(bias=None if module.bias is None else module.bias.detach())
    new = HybridLinear.from_weights(stored, module.weight.dtype, name, type(module).__name__)
    return _replace_layer(model, name, module, new, relative_error_of(weight, new.dequantized_weight()), calib_tokens,
                          head)


def _spectra_and_normalizers(measured: dict[str, tuple], layers) -> tuple[list, list]:
    """([spectrum or None], [normalizer or None]) in layer order, from {name: (spectrum, normalizer)}."""
    pairs = [measured.get(name, (None, None)) for name in layers]
    return [s for s, _ in pairs], [n for _, n in pairs]


def _hybrid_gram(stats: GramStats, config: LowRankConfig) -> torch.Tensor:
    """The Gram matrix a hybrid fit uses: shrunk as config.shrinkage says."""
    return shrunk_gram(stats, config.shrinkage)[0]


def _measure_hybrid(name, module, gram, config: LowRankConfig) -> tuple[torch.Tensor, float]:
    """(base error spectrum, normalizer) of one layer, for the correction-rank budget (see base_error_spectrum)."""
    config = layer_config(name, module, config)
    return base_error_spectrum(dense_weight(module), config.base_bits, config.base_group_size, gram,
                               config.base_method, config.method, max_whitening_damping=config.damping, name=name)


def _replace_layer(model, name, module, new, rel_error: float, calib_tokens, head) -> LayerReport:
    """Put `new` where `module` was; the report row (bytes the dense layer owned alone vs the new storage)."""
    owned = [] if _tied_to_other_module(model, module) else [module.weight]
    owned += [] if module.bias is None else [module.bias]
    out_features, in_features = dense_weight(module).shape
    row = LayerReport(
        name=name,
        kind=type(module).__name__,
        in_features=in_features,
        out_features=out_features,
        rank=new.rank,
        bits=new.bits,
        bytes_before=tensor_bytes(owned),
        bytes_after=tensor_bytes([*new.buffers(), *new.parameters()]),
        rel_error=rel_error,
        calib_tokens=calib_tokens,
    )
    if module is head:
        untie_head(model)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return row


def _compress_hybrid(model, layers, config: LowRankConfig, calibration, progress: bool, head) -> list[LayerReport]:
    """Every layer as a HybridLinear in one pass: calibrated (GPTQ base or whitened correction), all Gram
    matrices come from one pass over the dense model (collect_grams); the block-by-block alternative is
    _compress_sequential. A budget first measures every layer's base error (_measure_hybrid)."""
    grams: dict[str, torch.Tensor | None] = {name: None for name in layers}
    tokens: dict[str, int] = {}
    if calibration is not None:
        stats = collect_grams(model, layers, calibration, progress)
        for name in layers:
            tokens[name] = stats[name].tokens
            grams[name] = _hybrid_gram(stats.pop(name), config)
    measured = {}
    if config.budget is not None:
        measured = {
            name: _measure_hybrid(name, module, grams[name], config)
            for name, module in tqdm(layers.items(), desc="base errors", unit="layer", disable=not progress)
        }
    ranks = _choose_ranks(layers, {}, config, progress, *_spectra_and_normalizers(measured, layers), depth=1)
    return [
        _compress_hybrid_layer(model, name, module, rank, grams.pop(name), config, tokens.get(name), head)
        for (name, module), rank in tqdm(
            list(zip(layers.items(), ranks, strict=True)), desc="compressing", unit="layer", disable=not progress
        )
    ]


def _compress_sequential(model, layers, config: LowRankConfig, calibration, progress: bool, head) -> list[LayerReport]:
    """Calibrated compression block by block (sequential.py): whitened low-rank layers, or hybrid layers (GPTQ
    base or whitened correction). A budget or energy target needs every layer's spectrum (hybrid: its base
    error's) before block 1 is compressed, so, as GPTQ-style tools do, the ranks are allocated across all layers
    from a measuring pass over the DENSE blocks (one block's Grams at a time); the compressing pass then
    calibrates each block on the compressed blocks' outputs with those ranks fixed."""
    calibration = list(calibration)  # run twice: a generator would be empty the second time
    measured: dict[str, tuple[torch.Tensor, float | None]] = {}
    if config.budget is not None or config.energy is not None:

        def measure(group: dict[str, nn.Module], stats: dict[str, GramStats]) -> None:
            for name, module in group.items():
                if config.base_bits is None:
                    measured[name] = spectrum(dense_weight(module), whitening(stats.pop(name), config, name)), None
                else:
                    measured[name] = _measure_hybrid(name, module, _hybrid_gram(stats.pop(name), config), config)

        calibrate_blockwise(model, layers, calibration, measure, progress, "spectra", warn=False)
    chosen = _choose_ranks(layers, {}, config, progress, *_spectra_and_normalizers(measured, layers), depth=1)
    ranks = dict(zip(layers, chosen, strict=True))
    rows: dict[str, LayerReport] = {}

    def compress(group: dict[str, nn.Module], stats: dict[str, GramStats]) -> None:
        for name, module in group.items():
            layer_stats = stats.pop(name)
            if config.base_bits is None:
                chol = whitening(layer_stats, config, name)
                rows[name] = _compress_layer(model, name, module, ranks[name], chol, config, layer_stats.tokens, head)
            else:
                rows[name] = _compress_hybrid_layer(model, name, module, ranks[name], _hybrid_gram(layer_stats, config),
                                                    config, layer_stats.tokens, head)

    calibrate_blockwise(model, layers, calibration, compress, progress, "compressing blocks")
    return [rows[name] for name in layers]


@torch.no_grad()
def compress_model(
    model: nn.Module, config: LowRankConfig, calibration: Iterable | None = None, progress: bool | None = None
) -> CompressionReport:
    """Replace every selected nn.Linear / Conv1D of `model` by a LowRankLinear (with config.base_bits: a
    HybridLinear, quantized base plus low-rank correction), in place.

    progress: tqdm bars for calibration and the layers; None (default) shows them for model-level
    work (more than one layer) and keeps a single-layer call quiet.

    The dense weights are dropped: afterwards no compressed layer's dense weight is reachable
    from the model (a weight tied to an input embedding stays, because the embedding uses it).
    """
    layers = validate_layers(model, config)
    progress = len(layers) > 1 if progress is None else progress
    head = output_head(model)
    if config.base_bits is not None and config.base_method == "gptq" and calibration is None:
        raise ValueError("base_method='gptq' needs calibration batches (input ids or kwargs dicts); "
                         "or use base_method='rtn'")
    if config.method == "whitened" and calibration is None:
        raise ValueError("method='whitened' needs calibration batches (input ids or kwargs dicts)")
    uses_calibration = config.method == "whitened" or config.base_bits is not None
    if uses_calibration and isinstance(calibration, (torch.Tensor, dict)):
        raise TypeError(
            f"calibration is one {type(calibration).__name__}; pass a list of batches "
            "([batch, seq] input-id tensors or kwargs dicts), e.g. [input_ids]"
        )
    needs_grams = config.method == "whitened" or (config.base_bits is not None and config.base_method == "gptq")
    if needs_grams and config.sequential and find_blocks(model, layers) is not None:
        rows = _compress_sequential(model, layers, config, calibration, progress, head)
    elif config.base_bits is not None:
        rows = _compress_hybrid(model, layers, config, calibration if needs_grams else None, progress, head)
    else:
        chols: dict[str, torch.Tensor | None] = {}
        tokens: dict[str, int] = {}
        if config.method == "whitened":
            stats = collect_grams(model, layers, calibration, progress)
            for name in layers:
                tokens[name] = stats[name].tokens
                chols[name] = whitening(stats.pop(name), config, name)
        ranks = _choose_ranks(layers, chols, config, progress)
        rows = [
            _compress_layer(model, name, module, rank, chols.pop(name, None), config, tokens.get(name), head)
            for (name, module), rank in tqdm(
                list(zip(layers.items(), ranks, strict=True)), desc="compressing", unit="layer", disable=not progress
            )
        ]
    model.compression_config = config  # what made these layers, for checkpoints to record
    for hook in _after_compression:
        hook(model)
    return CompressionReport(rows, config)
