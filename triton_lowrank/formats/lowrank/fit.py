"""How the low-rank format is fitted: a truncated (optionally activation-whitened) SVD of the weight, its factors
stored by error feedback (GPTQ-style) or round-to-nearest. compress_model calls these through the format object;
`store_factors` is the one place where the factors' quantization is decided."""

from __future__ import annotations

import warnings

import torch

from triton_lowrank.core.calibration import GramStats
from triton_lowrank.core.factorize import (
    FitError,
    allocate_budget,
    metric_error,
    relative_error_of,
    scoring_rank,
    shrunk_gram,
    spectrum,
    truncated_factors,
    whitening_cholesky,
)
from triton_lowrank.core.factors import LowRankFactors, round_factors
from triton_lowrank.core.gptq import quantize_factors
from triton_lowrank.core.nbytes import lowrank_bytes
from triton_lowrank.core.quant import check_bits, storage_group_size
from triton_lowrank.core.reference import dequantized_factors
from triton_lowrank.formats.lowrank.layer import LowRankLinear


def needs_grams(config) -> str:
    """Why the fit needs calibration Gram matrices ("" when it does not): whitening."""
    return "method='whitened'" if config.method == "whitened" else ""


def check_layer(name: str, out_features: int, in_features: int, config) -> None:
    """The factors' group size must divide both widths (raises ValueError naming the layer)."""
    group_size = storage_group_size(config.bits, config.group_size)
    check_bits(config.bits, group_size, in_features, f"{name} (in_features)")
    check_bits(config.bits, group_size, out_features, f"{name} (out_features)")


def rank_bytes(out_features: int, in_features: int, config, float_bytes: int) -> tuple[int, int]:
    """(bytes one rank step adds, bytes before any rank: none). Unquantized factors take the layer's dtype."""
    return lowrank_bytes(in_features, out_features, 1, config.bits, config.group_size, float_bytes), 0


def fixed_bytes_label(config) -> str:
    return "rank 1 in every layer"


def whitening(stats: GramStats | None, config, name: str) -> torch.Tensor | None:
    """Lower Cholesky factor of the layer's Gram matrix, shrunk as `config.shrinkage` says (compress_model has
    replaced "heldout" by the α it chose with heldout_error); None (plain SVD) without calibration, or for a layer
    whose calibration inputs were all zero (say, after an all-zero layer): any factors give zero activation error
    on such data, so whitening has nothing to weigh."""
    if stats is None:
        return None
    if not stats.gram.diagonal().sum() > 0:
        warnings.warn(f"{name}: calibration gave this layer only zero inputs; it is factorized by plain SVD",
                      UserWarning, stacklevel=6)
        return None
    gram, _ = shrunk_gram(stats, config.shrinkage)
    return whitening_cholesky(gram, config.damping, name)


def heldout_error(weight: torch.Tensor, config, name: str) -> FitError:
    """What shrinkage="heldout" scores each α by: this format's fit of `weight` (the whitened truncated SVD at the rank
    the config implies for it, factorize.scoring_rank, stored as `fit` stores it: quantized with error feedback in
    the same metric) with one half's shrunk Gram, its error tr(E·S_heldout·Eᵀ) in the other half's metric. The
    storage counts: near full rank the truncation alone is exact for every α."""
    rank = scoring_rank(weight, config, rank_bytes)

    def fit_error(gram: torch.Tensor, held_gram: torch.Tensor) -> float:
        chol = whitening_cholesky(gram, config.damping, name)
        up, down = truncated_factors(weight, rank, chol)  # [out, r], [r, in]
        down_q, up_t = dequantized_factors(store_factors(weight, up, down, None, config, chol, torch.float32))
        return metric_error(weight, up_t.double().t() @ down_q.double(), held_gram)

    return fit_error


def measure(weight: torch.Tensor, chol: torch.Tensor | None, config, name: str) -> tuple[torch.Tensor, None]:
    """The (whitened) spectrum the budget and energy rules rank layers by; no normalizer (its own Σs²)."""
    return spectrum(weight, chol), None


def allocate(spectra, normalizers, bytes_per_rank, budget_bytes) -> list[int]:
    return allocate_budget(spectra, bytes_per_rank, budget_bytes)


def store_factors(
    weight: torch.Tensor,  # [out, in]
    up: torch.Tensor,  # [out, r]
    down: torch.Tensor,  # [r, in]
    bias: torch.Tensor | None,
    config,
    chol: torch.Tensor | None,
    dtype: torch.dtype,
) -> LowRankFactors:
    """How the factors are stored: error feedback (gptq.py) for quantized factors when the config asks for
    it, round-to-nearest otherwise, or floats in `dtype` for bits=None."""
    if config.bits is not None and config.error_feedback:
        f = quantize_factors(weight, down, config.bits, config.group_size, chol, bias)
        return f._replace(bias=None if bias is None else bias.detach().to(dtype))
    return round_factors(up, down, bias, config.bits, config.group_size, dtype)


def fit(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, chol: torch.Tensor | None, config,
        dtype: torch.dtype, name: str, kind: str) -> tuple[LowRankLinear, float]:
    """The layer holding rank-`rank` factors of `weight` [out, in], and its relative weight error."""
    up, down = truncated_factors(weight, rank, chol)  # [out, r], [r, in]
    stored = store_factors(weight, up, down, bias, config, chol, dtype)
    layer = LowRankLinear.from_factors(stored, dtype, name, kind)
    return layer, relative_error(weight, layer.factors())


def relative_error(weight: torch.Tensor, stored: LowRankFactors) -> float:
    """‖W - Ŵ‖_F / ‖W‖_F in float64 on the dequantized factors: a float32 norm overflows for an outlier
    weight (1e30 then reports 0 or nan); inf or nan when the stored result is."""
    down, up_t = dequantized_factors(stored)  # [r, in], [r, out]
    return relative_error_of(weight, up_t.double().t() @ down.double())
