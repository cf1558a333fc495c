"""Fit a hybrid weight W ≈ Q + U·D: a group-wise quantized base Q and a rank-r correction U·D.

The base is int4 (quant.py's symmetric storage), int3 or int2 (zero-point storage), fitted by GPTQ
on the calibration Hessian H = XᵀX, or by round-to-nearest. The correction is stored like the
low-rank format's factors (down [r, in], up_t [r, out]; int8, int4 or unquantized).

Fit order (ORDERS), all in the activation-whitened metric ‖(W - Ŵ)·L‖_F, H = L·Lᵀ, when calibrated:
- "refit": U·D from W first (SVDQuant order), quantized; Q from the residual W - Û·D̂; then U·D
  refitted to the base's error W - Q̂ (LQER order). GPTQ then fits a base with the correction's
  structure already removed, and the final correction is the optimal one for the base as stored.
- "lqer" (LQER / QERA / EoRA): Q from W, then U·D = the truncated SVD of the base's error E·L mapped
  back with L⁻¹, the optimal rank-r correction of that error on the calibration activations.
- "svdquant": U·D from W first, quantized; then Q from the residual W - Û·D̂, and nothing after.
- "alternating" (CALDERA-style): Q from W, then `rounds` times U·D ← lowrank(W - Q), Q ← base(W - U·D),
  then the correction of the last base's error.
- "auto" (default): "refit" for int8 or unquantized factors, "lqer" for int4 factors.
In every order the stored factors are quantized with error feedback (gptq.quantize_factors).

Why the defaults (bench/hybrid_quality.py --ablation, GPTQ base, whitened rank-16 correction; GPT-2 KL
vs dense, lower is better; BERT sentence-embedding cosine vs dense, higher is better):
- int8 factors: "refit" beat "lqer" on GPT-2 int4 g128 (KL 0.00018 vs 0.00023) and int2 g64 (0.0022 vs
  0.0046) and on BERT int2 g64 (cosine 0.759 vs 0.735); "lqer" was a hair ahead on BERT int4 g128
  (0.9867 vs 0.9861). "svdquant" and "alternating" (2 rounds, 3x the fit time) were never clearly best.
- int4 factors: "refit" makes the final correction carry W's large components, which int4 cannot hold:
  GPT-2 int4 g128 + r16 KL 0.0059 ("refit") vs 0.00024 ("lqer"); BERT cosine 0.977 vs 0.986.
- A GPTQ base beat an RTN base under every correction (BERT int4 g128: 0.986 vs 0.973; GPT-2 int4
  g128 + r8, "lqer": KL 0.00027 vs 0.00067), and the whitened correction beat the plain SVD one
  (BERT int2 g64: 0.759 vs 0.586).
"""

from __future__ import annotations

import dataclasses

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
from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.gptq import gptq, quantize_factors
from triton_lowrank.core.nbytes import base_bytes, correction_rank_bytes
from triton_lowrank.core.quant import (
    BASE_BITS,
    ZERO_POINT_BITS,
    check_base_bits,
    check_bits,
    dequantize,
    fitted_group_size,
    quantization_scale,
    quantize,
    quantize_with_scale,
    quantize_zero_point,
    quantize_zero_point_with_params,
    round_to_codes,
    round_to_levels,
    storage_group_size,
    zero_point_params,
)
from triton_lowrank.formats.hybrid.layer import HybridLinear
from triton_lowrank.formats.hybrid.storage import HybridWeights, dequantize_base

BASE_METHODS = ("gptq", "rtn")
ORDERS = ("auto", "refit", "lqer", "svdquant", "alternating")
CORRECTION_METHODS = ("whitened", "svd")


# ----------------------------------------------------------------------------- the base


def _group_params(columns: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [rows], zero [rows] or None) of one group of columns [rows, g]."""
    if bits in ZERO_POINT_BITS:
        return zero_point_params(columns, bits)
    return quantization_scale(columns, bits, columns.shape[1])[:, 0], None


def _round_column(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Dequantized nearest grid values of a column [rows] on per-row scale (and zero)."""
    if zero is None:
        return round_to_levels(column.float(), scale, bits) * scale
    return (round_to_codes(column.float(), scale, zero, bits) - zero) * scale


def fit_base(
    weight: torch.Tensor,  # [out, in]
    bits: int,
    group_size: int,
    hessian: torch.Tensor | None = None,  # [in, in] = XᵀX; None rounds to nearest
    damping: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(storage, float32 scales, uint8 zeros or None) of the base: GPTQ when `hessian` is given, else RTN.

    GPTQ chooses each group's scales (and zeros) when the group starts, from its columns with every
    earlier column's rounding error already pushed in, as the GPTQ reference does with `groupsize`.
    """
    out_features, in_features = weight.shape
    check_base_bits(bits, group_size, in_features, "fit_base")
    if hessian is None:
        if bits in ZERO_POINT_BITS:
            return quantize_zero_point(weight, bits, group_size)
        return (*quantize(weight, bits, group_size), None)
    groups = in_features // group_size
    scale = torch.empty(out_features, groups, dtype=torch.float32, device=weight.device)
    zero = torch.empty_like(scale) if bits in ZERO_POINT_BITS else None

    def start_group(j: int, columns: torch.Tensor) -> None:
        group_scale, group_zero = _group_params(columns, bits)
        scale[:, j // group_size] = group_scale
        if zero is not None:
            zero[:, j // group_size] = group_zero

    def quantize_column(j: int, column: torch.Tensor) -> torch.Tensor:
        g = j // group_size
        return _round_column(column, scale[:, g], None if zero is None else zero[:, g], bits)

    fitted = gptq(weight, hessian, quantize_column, damping, group_size, start_group)  # [out, in]
    if zero is None:
        return quantize_with_scale(fitted, scale, bits, group_size), scale, None
    return quantize_zero_point_with_params(fitted, scale, zero, bits, group_size), scale, zero.to(torch.uint8)


# ----------------------------------------------------------------------------- the correction


def fit_correction(
    target: torch.Tensor,  # [out, in]: what the correction should add (the base's error)
    rank: int,
    bits: int | None,
    group_size: int,
    chol: torch.Tensor | None = None,  # lower Cholesky factor of the Gram: the whitened metric
    error_feedback: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(down, down_scale, up_t, up_t_scale) of the rank-r correction of `target`.

    Unquantized (bits=None) it is the optimum of ‖(target - U·D)·L‖_F: the truncated SVD of
    target·L mapped back with L⁻¹ (L = I without calibration), in float32.
    """
    up, down = truncated_factors(target, rank, chol)  # [out, r], [r, in]
    if bits is None:
        return down, None, up.t().contiguous(), None
    if error_feedback:
        f = quantize_factors(target, down, bits, group_size, chol)
        return f.down, f.down_scale, f.up_t, f.up_t_scale
    return (*quantize(down, bits, group_size), *quantize(up.t().contiguous(), bits, group_size))


def _correction_weight(factors, bits: int | None, group_size: int) -> torch.Tensor:
    down, down_scale, up_t, up_t_scale = factors
    return dequantize(up_t, up_t_scale, bits, group_size).t() @ dequantize(down, down_scale, bits, group_size)


# ----------------------------------------------------------------------------- the whole fit


def fit_hybrid(
    weight: torch.Tensor,  # [out, in]
    base_bits: int,
    base_group_size: int,
    rank: int,
    bits: int | None = 8,
    group_size: int = 128,
    gram: torch.Tensor | None = None,  # [in, in] calibration XᵀX; None: RTN base, plain SVD correction
    base_method: str = "gptq",
    method: str = "whitened",
    order: str = "auto",
    rounds: int = 2,
    error_feedback: bool = True,
    damping: float = 0.01,
    max_whitening_damping: float = 1e-2,
    name: str = "fit_hybrid",
) -> HybridWeights:
    """Fit the base and the rank-`rank` correction of one weight (see the module docstring); bias None.

    base_method "gptq" and method "whitened" need `gram`; without it use "rtn" and "svd".
    `rounds` counts the alternating refits of order "alternating" (ignored otherwise).
    """
    out_features, in_features = weight.shape
    check_hybrid(out_features, in_features, base_bits, base_group_size, rank, bits, group_size, name)
    for knob, value, choices in (
        ("base_method", base_method, BASE_METHODS),
        ("method", method, CORRECTION_METHODS),
        ("order", order, ORDERS),
    ):
        if value not in choices:
            raise ValueError(f"{name}: {knob} must be one of {', '.join(choices)}; got {value!r}")
    if gram is None and (base_method == "gptq" or method == "whitened"):
        raise ValueError(f"{name}: base_method 'gptq' and method 'whitened' need a calibration Gram matrix")
    weight = weight.float()
    hessian = gram if base_method == "gptq" else None
    chol = whitening_cholesky(gram, max_whitening_damping, name) if method == "whitened" else None

    def base(target):
        return fit_base(target, base_bits, base_group_size, hessian, damping)

    def deq(stored):
        return dequantize_base(*stored, base_bits, base_group_size)

    def correction(target):
        return fit_correction(target, rank, bits, group_size, chol, error_feedback)

    def stored_weights(stored, factors) -> HybridWeights:
        correction = LowRankFactors(*factors, None, bits, storage_group_size(bits, group_size))
        return HybridWeights(*stored, base_bits, base_group_size, correction, None)

    if order == "auto":
        order = "lqer" if bits == 4 else "refit"

    if order in ("refit", "svdquant"):
        factors = correction(weight)
        stored = base(weight - _correction_weight(factors, bits, group_size))
        if order == "refit":
            factors = correction(weight - deq(stored))
        return stored_weights(stored, factors)
    stored = base(weight)
    if order == "alternating":
        for _ in range(rounds):
            up, down = truncated_factors(weight - deq(stored), rank, chol)  # float correction
            stored = base(weight - up @ down)
    factors = correction(weight - deq(stored))
    return stored_weights(stored, factors)


def check_hybrid(
    out_features: int,
    in_features: int,
    base_bits: int,
    base_group_size: int,
    rank: int,
    bits: int | None,
    group_size: int,
    name: str = "hybrid",
) -> None:
    """One clear ValueError naming `name` for a shape/knob combination the hybrid format cannot store."""
    check_base_bits(base_bits, base_group_size, in_features, f"{name} (base, in_features)")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"{name}: rank must be an int in [1, min(in, out)] = [1, {min(out_features, in_features)}]")
    check_bits(bits, group_size, in_features, f"{name} (correction, in_features)")
    check_bits(bits, group_size, out_features, f"{name} (correction, out_features)")


# ----------------------------------------------------------------------------- ranks across layers


def allocate_correction_ranks(
    spectra: list[torch.Tensor],  # per layer: singular values of the whitened base error E·L
    normalizers: list[float],  # per layer: what a unit of squared error is relative to
    bytes_per_rank: list[int],
    budget_bytes: float,
) -> list[int]:
    """Ranks (>= 1) across layers for the bytes left after the bases: greedy squared error removed per byte.
    `spectra` and `normalizers` are what base_error_spectrum returns for each layer.

    Each layer's rank step k removes s_k² / normalizer of error: factorize.allocate_budget's greedy
    allocation with these normalizers. Raises if rank 1 everywhere already exceeds the budget.
    """
    return allocate_budget(spectra, bytes_per_rank, budget_bytes, normalizers)


def base_error_spectrum(
    weight: torch.Tensor,  # [out, in]
    base_bits: int,
    base_group_size: int,
    gram: torch.Tensor | None = None,  # [in, in] calibration XᵀX; None: RTN base, plain SVD metric
    base_method: str = "gptq",
    method: str = "whitened",
    damping: float = 0.01,
    max_whitening_damping: float = 1e-2,
    name: str = "base_error_spectrum",
) -> tuple[torch.Tensor, float]:
    """(singular values of the base's error E·L, ‖W·L‖²_F): what a correction rank step removes, and what that
    is relative to, for allocate_correction_ranks. L = I unless `method` is "whitened".

    E = W - Q̂ with Q̂ fitted from W alone, as the "lqer" order fits it; the "refit" order's final base is
    fitted after a first correction and differs a little, so for it this is an estimate. Dividing by ‖W·L‖²
    rather than ‖E·L‖² weighs a step by the error it removes relative to the layer's weight, as the low-rank
    format's budget does: a layer whose base is already close gets few ranks.
    """
    if gram is None and (base_method == "gptq" or method == "whitened"):
        raise ValueError(f"{name}: base_method 'gptq' and method 'whitened' need a calibration Gram matrix")
    weight = weight.float()
    stored = fit_base(weight, base_bits, base_group_size, gram if base_method == "gptq" else None, damping)
    chol = whitening_cholesky(gram, max_whitening_damping, name) if method == "whitened" else None
    error = weight - dequantize_base(*stored, base_bits, base_group_size)  # [out, in]
    whitened = weight.double() if chol is None else weight.double() @ chol  # [out, in]
    return spectrum(error, chol), torch.linalg.matrix_norm(whitened).item() ** 2


# ----------------------------------------------------------------------------- compress_model's hooks (format object)


def claims_config(config) -> bool:
    """A LowRankConfig asks for the hybrid format by giving its base a bit width."""
    return config.base_bits is not None


def check_config(config) -> None:
    """The hybrid knobs of a LowRankConfig, checked once (ValueError naming the knob)."""
    if config.base_bits not in BASE_BITS:
        raise ValueError(f"LowRankConfig: base_bits must be None, 4, 3 or 2, got {config.base_bits!r}")
    if config.base_group_size is not None and config.base_group_size <= 0:
        raise ValueError(f"LowRankConfig: base_group_size must be >= 1, got {config.base_group_size}")
    if config.base_method not in BASE_METHODS:
        raise ValueError(f"LowRankConfig: base_method must be 'gptq' or 'rtn', got {config.base_method!r}")
    if config.energy is not None:
        # A fraction of what energy? The base's error is not the weight; no meaning was chosen for it yet.
        raise ValueError("LowRankConfig: with base_bits, set the correction's rank by rank, rank_ratio or budget "
                         "(energy is not supported for the hybrid format)")


def for_layer(config, in_features: int, out_features: int, where: str):
    """An unset base group size (None) becomes the largest width <= DEFAULT_GROUP_SIZE the base storage allows on
    this layer's input width (a multiple of 8 for int3/int2: whole bytes of both bit planes)."""
    if config.base_group_size is not None:
        return config
    group = fitted_group_size(config.base_bits, (in_features,), f"{where} (base)", base=True)
    return dataclasses.replace(config, base_group_size=group)


def needs_grams(config) -> str:
    """Why the fit needs calibration Gram matrices ("" when it does not): a GPTQ base, a whitened correction."""
    if config.base_method == "gptq":
        return "base_method='gptq'"
    return "method='whitened'" if config.method == "whitened" else ""


def check_layer(name: str, out_features: int, in_features: int, config) -> None:
    group_size = storage_group_size(config.bits, config.group_size)
    check_bits(config.bits, group_size, in_features, f"{name} (in_features)")
    check_bits(config.bits, group_size, out_features, f"{name} (out_features)")
    check_base_bits(config.base_bits, config.base_group_size, in_features, f"{name} (base, in_features)")


def rank_bytes(out_features: int, in_features: int, config, float_bytes: int) -> tuple[int, int]:
    """(bytes one correction rank step adds, the base's bytes)."""
    return (correction_rank_bytes(out_features, in_features, config.bits, config.group_size, float_bytes),
            base_bytes(out_features, in_features, config.base_bits, config.base_group_size))


def fixed_bytes_label(config) -> str:
    group = config.base_group_size or "fitted per layer"
    return f"the int{config.base_bits} bases (group {group}) and a rank-1 correction per layer"


def calibration_gram(stats: GramStats | None, config, name: str) -> torch.Tensor | None:
    """The Gram matrix a hybrid fit uses (GPTQ's Hessian and the correction's whitening), shrunk as
    config.shrinkage says (compress_model has replaced "heldout" by the α it chose with heldout_error); None
    without calibration."""
    return None if stats is None else shrunk_gram(stats, config.shrinkage)[0]


def heldout_error(weight: torch.Tensor, config, name: str) -> FitError:
    """What shrinkage="heldout" scores each α by: this format's fit of `weight` (base and correction, stored as
    they would be) at the correction rank the config implies for it (factorize.scoring_rank), fitted with one
    half's shrunk Gram, its error tr(E·S_heldout·Eᵀ) in the other half's metric."""
    rank = scoring_rank(weight, config, rank_bytes)

    def fit_error(gram: torch.Tensor, held_gram: torch.Tensor) -> float:
        fitted = fit_hybrid(weight, config.base_bits, config.base_group_size, rank, config.bits, config.group_size,
                            gram, config.base_method, config.method, error_feedback=config.error_feedback,
                            max_whitening_damping=config.damping, name=name)
        return metric_error(weight, fitted.dense_weight(), held_gram)

    return fit_error


def measure(weight: torch.Tensor, gram: torch.Tensor | None, config, name: str) -> tuple[torch.Tensor, float]:
    """(base error spectrum, normalizer) of one layer, for the correction-rank budget (see base_error_spectrum)."""
    return base_error_spectrum(weight, config.base_bits, config.base_group_size, gram, config.base_method,
                               config.method, max_whitening_damping=config.damping, name=name)


def fit(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, gram: torch.Tensor | None, config,
        dtype: torch.dtype, name: str, kind: str) -> tuple[HybridLinear, float]:
    """The HybridLinear holding a fitted base and rank-`rank` correction of `weight` [out, in], and its relative
    weight error."""
    fitted = fit_hybrid(weight, config.base_bits, config.base_group_size, rank, config.bits, config.group_size, gram,
                        config.base_method, config.method, error_feedback=config.error_feedback,
                        max_whitening_damping=config.damping, name=name)
    layer = HybridLinear.from_weights(fitted._replace(bias=None if bias is None else bias.detach()), dtype, name, kind)
    return layer, relative_error_of(weight, layer.dequantized_weight())
