"""Truncated factorizations of one weight, plain or activation-whitened, and rank selection.

Plain SVD: W = U S Vᵀ, keep r components; the weight-space error is the Eckart–Young optimum.
Whitened (SVD-LLM): with H = XᵀX = L Lᵀ from calibration activations X, ‖(W - Ŵ) Xᵀ‖_F =
‖(W - Ŵ) L‖_F, so truncating the SVD of W·L and mapping back with L⁻¹ gives the optimal
rank-r error on those activations.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import torch

from triton_lowrank.core.calibration import GramStats


def shrinkage_strength(stats: GramStats) -> float:
    """Ledoit–Wolf's data-driven shrinkage α in [0, 1] of the second-moment matrix S = XᵀX / n toward μI.

    The estimate (1 - α)·S + α·μI (μ = tr S / d) has the least expected Frobenius error at α = β² / δ²,
    with δ² = ‖S - μI‖² (how far the data are from isotropic) and β² = Σ_k ‖x_k x_kᵀ - S‖² / n² (the sampling
    noise of S; ‖x_k x_kᵀ‖² = ‖x_k‖⁴, hence GramStats.sum_norm4). Few tokens per feature make β² large and α
    go to 1. Ledoit & Wolf, "A well-conditioned estimator for large-dimensional covariance matrices", 2004.
    """
    return _ledoit_wolf(stats.gram.double() / stats.tokens, stats)


def _ledoit_wolf(s: torch.Tensor, stats: GramStats) -> float:
    n = stats.tokens
    frob2 = torch.dot(s.view(-1), s.view(-1)).item()  # ‖S‖², without an [in, in] temporary
    delta2 = frob2 - s.diagonal().sum().item() ** 2 / s.shape[0]  # ‖S - μI‖²
    beta2 = (stats.sum_norm4 / n - frob2) / n
    if not delta2 > 0:
        return 0.0  # S is already isotropic
    return min(1.0, max(0.0, beta2 / delta2))


def shrunk_gram(stats: GramStats, shrinkage: float | str) -> tuple[torch.Tensor, float]:
    """((1 - α)·S + α·μI [in, in] float64, α), S = XᵀX / n; `shrinkage` is α or "auto" (Ledoit–Wolf).
    "heldout" is Ledoit–Wolf here: choosing α on held-out tokens needs the layer's fit (heldout_shrinkage, which
    compress_model runs first and passes the α it chose).

    Whitening with a multiple of I leaves the truncation plain SVD's, so α = 1 is plain SVD and α between
    0 and 1 moves from the calibration-optimal truncation (SVD-LLM) toward it.
    """
    s = stats.gram.double() / max(stats.tokens, 1)  # [in, in]; in place from here: GPT-2 XL's is 330 MB
    alpha = _ledoit_wolf(s, stats) if shrinkage in ("auto", "heldout") else float(shrinkage)
    mu = s.diagonal().mean().item()
    s.mul_(1 - alpha).diagonal().add_(alpha * mu)
    return s, alpha


# α tried by shrinkage="heldout", besides the Ledoit–Wolf α of the layer: 0 is the raw Gram (SVD-LLM), 1 plain SVD.
HELDOUT_ALPHAS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 1.0)

# fit_error(gram the layer is fitted with [in, in], held-out half's S [in, in]) -> the fit's error on the held-out half
FitError = Callable[[torch.Tensor, torch.Tensor], float]


def metric_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(E·S·Eᵀ), E = W - Ŵ [out, in]: the mean squared output error on inputs whose second moment is S [in, in]."""
    error = weight.double() - approx.double()  # [out, in]
    return ((error @ gram.double()) * error).sum().item()


def heldout_errors(stats: GramStats, fit_error: FitError) -> dict[float, float]:
    """{α: error on the held-out half of the tokens of the layer fitted on the other half with shrinkage α}, for α
    in HELDOUT_ALPHAS and the Ledoit–Wolf α of all the tokens ("auto"'s choice). A fit that fails (a Gram that is
    not positive definite even with damping) scores inf. Needs stats.half (GramStats.halves)."""
    fit, held = stats.halves()
    held_gram = held.gram.double() / max(held.tokens, 1)  # [in, in]
    errors = {}
    for alpha in sorted({*HELDOUT_ALPHAS, shrinkage_strength(stats)}):
        gram, _ = shrunk_gram(fit, alpha)
        try:
            errors[alpha] = fit_error(gram, held_gram)
        except (ValueError, RuntimeError):  # torch.linalg errors of a degenerate half are RuntimeErrors
            errors[alpha] = math.inf
    return errors


def heldout_shrinkage(stats: GramStats, fit_error: FitError) -> float:
    """The α of heldout_errors with the least held-out error (ties: the larger α, nearer plain SVD). α = 1 is plain
    SVD up to scale and is always a candidate, so on the held-out half the choice is never worse than plain SVD.
    Falls back to Ledoit–Wolf when a half has no token or no candidate could be fitted."""
    if stats.half is None or min(stats.half.tokens, stats.tokens - stats.half.tokens) == 0:
        return shrinkage_strength(stats)
    errors = heldout_errors(stats, fit_error)
    best = min(errors, key=lambda alpha: (errors[alpha], -alpha))
    return best if math.isfinite(errors[best]) else shrinkage_strength(stats)


def scoring_rank(weight: torch.Tensor, config, rank_bytes: Callable) -> int:
    """The rank a held-out score fits one layer [out, in] at, before ranks are chosen: the config's rank or ratio,
    the plain spectrum's rank for `energy`, or for a budget the rank this layer gets with its own share of it
    (budget x its fp16 bytes, less the format's fixed bytes, over the bytes per rank: `rank_bytes` is the format's)."""
    out_features, in_features = weight.shape
    full = min(out_features, in_features)
    if config.rank is not None:
        rank = config.rank
    elif config.rank_ratio is not None:
        rank = round(config.rank_ratio * full)
    elif config.energy is not None:
        rank = rank_for_energy(spectrum(weight), config.energy)
    else:
        per_rank, fixed = rank_bytes(out_features, in_features, config, 2)
        rank = int((config.budget * 2 * out_features * in_features - fixed) // per_rank)
    return min(max(rank, 1), full)


# Relative diagonal damping tried, in order, when the Gram matrix is not positive definite.
DAMPING_STEPS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def whitening_cholesky(gram: torch.Tensor, max_damping: float, name: str) -> torch.Tensor:
    """Lower Cholesky factor L of the [in, in] Gram matrix, damped only if it is singular.

    Damping runs through DAMPING_STEPS up to `max_damping` (a bounded number of tries, never a loop).
    """
    gram = gram.double()
    mean_diag = gram.diagonal().mean()
    if not mean_diag > 0:
        raise ValueError(f"{name}: calibration produced no activations for this layer")
    if not (math.isfinite(max_damping) and max_damping > 0):  # NaN would never end the retries
        raise ValueError(f"{name}: damping must be > 0 and finite, got {max_damping}")
    if not torch.isfinite(gram).all():
        raise ValueError(f"{name}: calibration Gram matrix has non-finite entries (inf or NaN activations)")
    for damping in [d for d in DAMPING_STEPS if d < max_damping] + [max_damping]:
        damped = gram
        if damping > 0:
            damped = gram.clone()
            damped.diagonal().add_(damping * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            return chol
    raise ValueError(f"{name}: calibration Gram matrix is not positive definite even with damping {max_damping}")


def _svd_dtype(chol: torch.Tensor | None) -> torch.dtype:
    # The whitened path multiplies by L and L⁻¹, whose conditioning can be poor: use float64 there.
    return torch.float32 if chol is None else torch.float64


def spectrum(weight: torch.Tensor, chol: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values (descending) of W, or of W·L when whitened."""
    w = weight.to(_svd_dtype(chol))  # [out, in]
    if chol is not None:
        w = w @ chol
    return torch.linalg.svdvals(w)


def truncated_factors(
    weight: torch.Tensor, rank: int, chol: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) in float32, with the singular values split evenly between them."""
    w = weight.to(_svd_dtype(chol))  # [out, in]
    if chol is not None:
        w = w @ chol
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u [out, k], s [k], vh [k, in]
    root = s[:rank].sqrt()
    up = u[:, :rank] * root  # [out, r]
    down = root[:, None] * vh[:rank]  # [r, in]
    if chol is not None:
        down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)  # down · L⁻¹
    return up.float(), down.float()


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest rank whose kept squared singular values reach `energy` of the total."""
    power = s.double() ** 2
    if not power.sum() > 0:
        return 1  # an all-zero weight: one (zero) component represents it exactly
    kept = power.cumsum(0) / power.sum()
    return min(int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1, len(s))


def allocate_budget(
    spectra: list[torch.Tensor],
    bytes_per_rank: list[int],
    budget_bytes: float,
    normalizers: list[float] | None = None,  # per layer: what a unit of squared error is relative to (Σs²)
) -> list[int]:
    """Ranks across layers: greedily add the rank step with the largest relative error drop per byte.

    Each layer starts at rank 1. Gains s_j² / Σs² (or / the layer's normalizer) fall monotonically within
    a layer, so a heap of each layer's next step yields the steps in the global order of gain per byte. A step that does
    not fit removes that layer; the final total is within one rank step of every growable layer.
    """
    ranks = [1] * len(spectra)
    used = float(sum(bytes_per_rank))
    if used > budget_bytes:
        raise ValueError(
            f"budget too small: rank 1 in every layer already needs {used:.0f} bytes, "
            f"the budget allows {budget_bytes:.0f}"
        )
    # An all-zero layer gains nothing from any rank step (its normaliser is clamped to avoid 0/0).
    tiny = torch.finfo(torch.float64).tiny
    totals = [(s.double() ** 2).sum().item() for s in spectra] if normalizers is None else normalizers
    power = [s.double() ** 2 / max(total, tiny) for s, total in zip(spectra, totals, strict=True)]
    heap = [(-power[i][1].item() / bytes_per_rank[i], i) for i in range(len(spectra)) if len(spectra[i]) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if used + bytes_per_rank[i] > budget_bytes:
            continue
        used += bytes_per_rank[i]
        ranks[i] += 1
        if ranks[i] < len(spectra[i]):
            heapq.heappush(heap, (-power[i][ranks[i]].item() / bytes_per_rank[i], i))
    return ranks


def refit_up(weight: torch.Tensor, down: torch.Tensor, chol: torch.Tensor | None = None) -> torch.Tensor:
    """The up factor [out, r] that best fits W given the down factor as it will be stored (quantized).

    Quantizing both factors independently adds both errors. Fixing down at its stored value D̂ and
    solving min_U ‖(W - U·D̂)·L‖_F (L = I for plain SVD) lets up absorb down's quantization error,
    so only up's own quantization error remains: U = (W·L)(D̂·L)⁺.
    """
    w, d = weight.double(), down.double()  # [out, in], [r, in]
    if chol is not None:
        w, d = w @ chol.double(), d @ chol.double()
    # The pseudo-inverse, not a solve: a rank component that rounded to all zeros leaves D̂ rank-deficient.
    return (w @ torch.linalg.pinv(d)).float()  # [out, r]


def relative_error_of(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W - Ŵ‖_F / ‖W‖_F in float64 of a dense approximation Ŵ [out, in]."""
    w = weight.detach().double()  # [out, in]
    error = torch.linalg.matrix_norm(w - approx.double())
    norm = torch.linalg.matrix_norm(w)
    if norm == 0:  # an all-zero weight: any error is infinitely large next to it
        return 0.0 if error == 0 else (error * math.inf).item()
    return (error / norm).item()
