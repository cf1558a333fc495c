"""compress_model: replace a model's linear layers by LowRankLinear in place, and report it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .calibration import TOKENS_PER_FEATURE, GramStats, collect_grams
from .config import LowRankConfig
from .factorize import (
    SUPPORTED_MODULES,
    allocate_budget,
    dense_weight,
    rank_for_energy,
    shrunk_gram,
    spectrum,
    truncated_factors,
    whitening_cholesky,
)
from .gptq import quantize_factors
from .layers import FLOAT_DTYPES, LowRankLinear
from .quant import check_bits
from .sequential import calibrate_blockwise, find_blocks


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


def select_layers(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """Leaf modules chosen by include/exclude; an unsupported leaf matched by `include` is an error."""
    chosen = {}
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or any(fnmatchcase(name, p) for p in config.exclude):
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
        if any(isinstance(m, LowRankLinear) for m in model.modules()):
            raise ValueError("compress_model: the model is already compressed (it holds LowRankLinear layers)")
        raise ValueError("compress_model: no layer matched the include/exclude patterns")
    return chosen


def validate_layers(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """The layers `config` selects, each checked; raises before any work so nothing is half-compressed."""
    layers = select_layers(model, config)
    for name, module in layers.items():
        _validate(name, module, config)
    return layers


def recommended_calib_tokens(layers: dict[str, nn.Module]) -> int:
    """Calibration tokens for whitening to be well estimated: TOKENS_PER_FEATURE x the widest layer's inputs."""
    return TOKENS_PER_FEATURE * max(dense_weight(m).shape[1] for m in layers.values())


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
    check_bits(config.bits, config.group_size, in_features, f"{name} (in_features)")
    check_bits(config.bits, config.group_size, out_features, f"{name} (out_features)")


def _choose_ranks(layers, chols, config: LowRankConfig, progress: bool, spectra=None) -> list[int]:
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
    per_rank = []
    for module in layers.values():
        out_features, in_features = dense_weight(module).shape
        per_rank.append(
            LowRankLinear.predicted_bytes(
                in_features, out_features, 1, config.bits, config.group_size, module.weight.element_size()
            )
        )
    dense_fp16 = sum(2 * dense_weight(m).numel() for m in layers.values())
    return allocate_budget(spectra, per_rank, config.budget * dense_fp16)


def _tied_to_other_module(model: nn.Module, module: nn.Module) -> bool:
    """True when the layer's weight tensor is also held by another module (e.g. GPT-2's tied lm_head)."""
    return any(
        p is module.weight for m in model.modules() if m is not module for p in m.parameters(recurse=False)
    )


def whitening(stats: GramStats, config: LowRankConfig, name: str) -> torch.Tensor:
    """Lower Cholesky factor of the layer's Gram matrix, shrunk as `config.shrinkage` says."""
    gram, _ = shrunk_gram(stats, config.shrinkage)
    return whitening_cholesky(gram, config.damping, name)


def _compress_layer(model, name, module, rank, chol, config: LowRankConfig, calib_tokens) -> LayerReport:
    """Replace one layer by its LowRankLinear in `model`; its report row."""
    weight = dense_weight(module)  # [out, in]
    up, down = truncated_factors(weight, rank, chol)
    if config.bits is not None and config.error_feedback:
        stored = quantize_factors(weight, down, config.bits, config.group_size, chol)
        new = LowRankLinear.from_stored(
            *stored, module.bias, config.bits, config.group_size, module.weight.dtype, name, type(module).__name__
        )
    else:
        new = LowRankLinear.from_factors(
            up, down, module.bias, config.bits, config.group_size, module.weight.dtype, name, type(module).__name__
        )
    error = (new.dense_weight() - weight.float()).norm() / weight.float().norm().clamp_min(1e-30)
    tied = _tied_to_other_module(model, module)
    owned = [] if tied else [module.weight]
    owned += [] if module.bias is None else [module.bias]
    row = LayerReport(
        name=name,
        kind=type(module).__name__,
        in_features=weight.shape[1],
        out_features=weight.shape[0],
        rank=rank,
        bits=config.bits,
        bytes_before=sum(t.numel() * t.element_size() for t in owned),
        bytes_after=new.storage_bytes(),
        rel_error=error.item(),
        calib_tokens=calib_tokens,
    )
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return row


def _compress_sequential(model, layers, config: LowRankConfig, calibration, progress: bool) -> list[LayerReport]:
    """Whitened compression block by block (sequential.py). A budget or energy target needs every layer's
    spectrum first: a measuring pass over the dense blocks computes them, one block's Grams at a time."""
    calibration = list(calibration)  # run twice: a generator would be empty the second time
    spectra: dict[str, torch.Tensor] = {}
    if config.budget is not None or config.energy is not None:

        def measure(group: dict[str, nn.Module], stats: dict[str, GramStats]) -> None:
            for name, module in group.items():
                spectra[name] = spectrum(dense_weight(module), whitening(stats.pop(name), config, name))

        calibrate_blockwise(model, layers, calibration, measure, progress, "spectra", warn=False)
    chosen = _choose_ranks(layers, {}, config, progress, [spectra.get(n) for n in layers])
    ranks = dict(zip(layers, chosen, strict=True))
    rows: dict[str, LayerReport] = {}

    def compress(group: dict[str, nn.Module], stats: dict[str, GramStats]) -> None:
        for name, module in group.items():
            layer_stats = stats.pop(name)
            chol = whitening(layer_stats, config, name)
            rows[name] = _compress_layer(model, name, module, ranks[name], chol, config, layer_stats.tokens)

    calibrate_blockwise(model, layers, calibration, compress, progress, "compressing blocks")
    return [rows[name] for name in layers]


@torch.no_grad()
def compress_model(
    model: nn.Module, config: LowRankConfig, calibration: Iterable | None = None, progress: bool = True
) -> CompressionReport:
    """Replace every selected nn.Linear / Conv1D of `model` by a LowRankLinear, in place.

    The dense weights are dropped: afterwards no compressed layer's dense weight is reachable
    from the model (a weight tied to an input embedding stays, because the embedding uses it).
    """
    layers = validate_layers(model, config)
    if config.method == "whitened" and calibration is None:
        raise ValueError("method='whitened' needs calibration batches (input ids or kwargs dicts)")
    if config.method == "whitened" and config.sequential and find_blocks(model, layers) is not None:
        rows = _compress_sequential(model, layers, config, calibration, progress)
    else:
        chols: dict[str, torch.Tensor] = {}
        tokens: dict[str, int] = {}
        if config.method == "whitened":
            stats = collect_grams(model, layers, calibration, progress)
            for name in layers:
                tokens[name] = stats[name].tokens
                chols[name] = whitening(stats.pop(name), config, name)
        ranks = _choose_ranks(layers, chols, config, progress)
        rows = [
            _compress_layer(model, name, module, rank, chols.pop(name, None), config, tokens.get(name))
            for (name, module), rank in tqdm(
                list(zip(layers.items(), ranks, strict=True)), desc="compressing", unit="layer", disable=not progress
            )
        ]
    if any(row.name == "lm_head" for row in rows) and hasattr(model, "config"):
        # The compressed head no longer shares the embedding matrix; stop transformers re-tying it.
        model.config.tie_word_embeddings = False
    if isinstance(model, PreTrainedModel):
        from .hf_quantizer import mark_compressed  # lazy: the quantizer module builds on this one's layers

        mark_compressed(model, config.to_dict())  # so model.save_pretrained writes a loadable checkpoint
    return CompressionReport(rows, config)
