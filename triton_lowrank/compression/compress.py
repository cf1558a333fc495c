"""compress_model: replace a model's linear layers by compressed layers of the format the config asks for, in
place, and report it.

Format-agnostic: selection, validation, calibration (one pass or block by block), rank choice (fixed, ratio,
energy, or a byte budget allocated across layers) and layer replacement live here; how a layer is fitted and
what a rank costs come from the format object (`config.weight_format`, core/format.py).
Nothing here knows about saving: layers above subscribe with `after_compression` (the transformers
integration attaches its quantizer there, so `model.save_pretrained` works straight after compressing).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase

import torch
from torch import nn
from tqdm.auto import tqdm

from triton_lowrank.compression.sequential import calibrate_blockwise, find_blocks
from triton_lowrank.core.calibration import TOKENS_PER_FEATURE, GramStats, collect_grams
from triton_lowrank.core.config import OUTPUT_HEAD, LowRankConfig
from triton_lowrank.core.factorize import heldout_shrinkage, rank_for_energy, shrinkage_strength
from triton_lowrank.core.format import DENSE_KINDS, FLOAT_DTYPES, compressed_layers, dense_weight, untie_head
from triton_lowrank.core.nbytes import dense_fp16_bytes, tensor_bytes

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
    if config.budget is not None:
        check_budget(layers, config)
    return layers


def check_budget(layers: dict[str, nn.Module], config: LowRankConfig) -> None:
    """One clear error, before any work, when the budget cannot hold what every layer needs at its smallest
    (the format's fixed bytes, e.g. the hybrid bases, plus rank 1)."""
    per_rank, fixed = _rank_bytes(layers, config)
    needed = (fixed + sum(per_rank)) / dense_fp16_bytes(dense_weight(m) for m in layers.values())
    if config.budget < needed:
        at_least = math.ceil(needed * 1e4) / 1e4  # rounded up, so that asking for it works
        raise ValueError(
            f"budget {config.budget:g} is below what {config.weight_format.fixed_bytes_label(config)} take: "
            f"{needed:.4g} of the fp16 dense bytes; use budget >= {at_least:g}"
        )


def _rank_bytes(layers: dict[str, nn.Module], config: LowRankConfig) -> tuple[list[int], int]:
    """(bytes one rank step adds in each layer, bytes all layers take before any rank: the format's fixed part)."""
    per_rank, fixed = [], 0
    for name, module in layers.items():
        step, before = config.weight_format.rank_bytes(*dense_weight(module).shape, layer_config(name, module, config),
                                                       module.weight.element_size())
        per_rank.append(step)
        fixed += before
    return per_rank, fixed


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
    config.weight_format.check_layer(name, out_features, in_features, layer_config(name, module, config))


def _choose_ranks(layers, config: LowRankConfig, measured: dict[str, tuple], depth: int = 0) -> list[int]:
    """Each layer's rank (hybrid: the correction's). Budget and energy need every layer's `measured`
    (spectrum, normalizer) from the format's `measure`. `depth`: the calls between compress_model and here, so
    that a warning points at compress_model's caller."""
    if config.rank is not None:
        return [config.rank] * len(layers)
    if config.rank_ratio is not None:
        return [max(1, round(config.rank_ratio * min(dense_weight(m).shape))) for m in layers.values()]
    spectra = [measured[name][0] for name in layers]
    if config.energy is not None:
        return [rank_for_energy(s, config.energy) for s in spectra]
    per_rank, fixed = _rank_bytes(layers, config)
    dense_fp16 = dense_fp16_bytes(dense_weight(m) for m in layers.values())
    full_rank = fixed + sum(b * min(dense_weight(m).shape) for b, m in zip(per_rank, layers.values(), strict=True))
    if config.budget * dense_fp16 > full_rank:
        warnings.warn(
            f"budget {config.budget:g} is more than full rank needs ({full_rank / dense_fp16:.3g} of the fp16 dense "
            "bytes for these layers): clamped, every layer keeps full rank",
            UserWarning,
            stacklevel=4 + depth,  # compress_model's caller (through torch.no_grad's wrapper)
        )
    budget_bytes = min(config.budget * dense_fp16, full_rank)
    normalizers = [measured[name][1] for name in layers]
    return config.weight_format.allocate(spectra, normalizers, per_rank, budget_bytes - fixed)


def _tied_to_other_module(model: nn.Module, module: nn.Module) -> bool:
    """True when the layer's weight tensor is also held by another module (e.g. GPT-2's tied lm_head)."""
    return any(
        p is module.weight for m in model.modules() if m is not module for p in m.parameters(recurse=False)
    )


def _compress_layer(model, name, module, rank, state, config: LowRankConfig, calib_tokens, head) -> LayerReport:
    """Replace one layer by the format's fit of it in `model`; its report row."""
    new, rel_error = config.weight_format.fit(dense_weight(module), module.bias, rank, state,
                                              layer_config(name, module, config), module.weight.dtype, name,
                                              type(module).__name__)
    return _replace_layer(model, name, module, new, rel_error, calib_tokens, head)


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


def _needs_measuring(config: LowRankConfig) -> bool:
    return config.budget is not None or config.energy is not None


def _split(config: LowRankConfig) -> bool:
    """Calibration keeps the held-out halves of each Gram (shrinkage chosen on held-out tokens)."""
    return config.shrinkage == "heldout"


def _prepare(name: str, module: nn.Module, stats: GramStats, config: LowRankConfig, alphas: dict[str, float]):
    """The format's calibration state of one layer (its `prepare`). With shrinkage "heldout" the layer's α is chosen
    first (factorize.heldout_shrinkage on the format's `heldout_error` of this weight) and kept in `alphas`: a layer
    already there (the sequential measuring pass chose it) keeps its α."""
    fmt, layer = config.weight_format, layer_config(name, module, config)
    if _split(config):
        if name not in alphas:
            fit_error = None if fmt.heldout_error is None else fmt.heldout_error(dense_weight(module).detach(), layer,
                                                                                  name)
            alphas[name] = shrinkage_strength(stats) if fit_error is None else heldout_shrinkage(stats, fit_error)
        layer = replace(layer, shrinkage=alphas[name])
    return fmt.prepare(stats, layer, name)


def _compress_one_pass(model, layers, config: LowRankConfig, calibration, progress: bool, head) -> list[LayerReport]:
    """Every layer in one pass: with calibration Grams (config.needs_grams), all of them come from one pass over
    the dense model (collect_grams); the block-by-block alternative is _compress_sequential."""
    fmt = config.weight_format
    states: dict[str, object] = {name: fmt.prepare(None, config, name) for name in layers}
    tokens: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if config.needs_grams:
        stats = collect_grams(model, layers, calibration, progress, split=_split(config))
        for name, module in layers.items():
            tokens[name] = stats[name].tokens
            states[name] = _prepare(name, module, stats.pop(name), config, alphas)
    measured = {}
    if _needs_measuring(config):
        measured = {
            name: fmt.measure(dense_weight(module), states[name], layer_config(name, module, config), name)
            for name, module in tqdm(layers.items(), desc="spectra", unit="layer", disable=not progress)
        }
    ranks = _choose_ranks(layers, config, measured, depth=1)
    return [
        _compress_layer(model, name, module, rank, states.pop(name), config, tokens.get(name), head)
        for (name, module), rank in tqdm(
            list(zip(layers.items(), ranks, strict=True)), desc="compressing", unit="layer", disable=not progress
        )
    ]


def _compress_sequential(model, layers, config: LowRankConfig, calibration, progress: bool, head) -> list[LayerReport]:
    """Calibrated compression block by block (sequential.py). A budget or energy target needs every layer's
    spectrum before block 1 is compressed, so, as GPTQ-style tools do, the ranks are allocated across all layers
    from a measuring pass over the DENSE blocks (one block's Grams at a time); the compressing pass then
    calibrates each block on the compressed blocks' outputs with those ranks fixed."""
    fmt = config.weight_format
    calibration = list(calibration)  # run twice: a generator would be empty the second time
    measured: dict[str, tuple[torch.Tensor, float | None]] = {}
    # shrinkage="heldout": each layer's α, chosen once, on the dense blocks' inputs when a measuring pass runs
    alphas: dict[str, float] = {}
    if _needs_measuring(config):

        def measure(group: dict[str, nn.Module], stats: dict[str, GramStats]) -> None:
            for name, module in group.items():
                state = _prepare(name, module, stats.pop(name), config, alphas)
                measured[name] = fmt.measure(dense_weight(module), state, layer_config(name, module, config), name)

        calibrate_blockwise(model, layers, calibration, measure, progress, "spectra", warn=False,
                            split=_split(config))
    ranks = dict(zip(layers, _choose_ranks(layers, config, measured, depth=1), strict=True))
    rows: dict[str, LayerReport] = {}

    def compress(group: dict[str, nn.Module], stats: dict[str, GramStats]) -> None:
        for name, module in group.items():
            layer_stats = stats.pop(name)
            state = _prepare(name, module, layer_stats, config, alphas)
            rows[name] = _compress_layer(model, name, module, ranks[name], state, config, layer_stats.tokens, head)

    calibrate_blockwise(model, layers, calibration, compress, progress, "compressing blocks",
                        split=_split(config) and not alphas)
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
    if config.needs_calibration and calibration is None:
        raise ValueError(f"{config.weight_format.needs_grams(config)} needs calibration batches (input ids or kwargs "
                         "dicts)")
    if calibration is not None and isinstance(calibration, (torch.Tensor, dict)):
        raise TypeError(
            f"calibration is one {type(calibration).__name__}; pass a list of batches "
            "([batch, seq] input-id tensors or kwargs dicts), e.g. [input_ids]"
        )
    if config.needs_grams and config.sequential and find_blocks(model, layers) is not None:
        rows = _compress_sequential(model, layers, config, calibration, progress, head)
    else:
        rows = _compress_one_pass(model, layers, config, calibration if config.needs_grams else None, progress, head)
    model.compression_config = config  # what made these layers, for checkpoints to record
    for hook in _after_compression:
        hook(model)
    return CompressionReport(rows, config)

