"""Truncated factorizations of one weight, plain or activation-whitened, and rank selection.

Plain SVD: W = U S Vᵀ, keep r components; the weight-space error is the Eckart–Young optimum.
Whitened (SVD-LLM): with H = XᵀX = L Lᵀ from calibration activations X, ‖(W - Ŵ) Xᵀ‖_F =
‖(W - Ŵ) L‖_F, so truncating the SVD of W·L and mapping back with L⁻¹ gives the optimal
rank-r error on those activations.
"""

from __future__ import annotations

import heapq
import math

import torch

MAX_DAMPING_TRIES = 64  # 0, 1e-8, 1e-7, ... reach any finite damping up to 1e55


def whitening_cholesky(gram: torch.Tensor, max_damping: float, name: str) -> torch.Tensor:
    """Lower Cholesky factor L of the [in, in] Gram matrix, damped only if it is singular."""
    gram = gram.double()
    mean_diag = gram.diagonal().mean()
    if not mean_diag > 0:
        raise ValueError(f"{name}: calibration produced no activations for this layer")
    if not 0 < max_damping < math.inf:  # NaN would never reach the bound below: refuse instead of looping
        raise ValueError(f"{name}: damping must be > 0 and finite, got {max_damping}")
    damping = 0.0
    for _ in range(MAX_DAMPING_TRIES):
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        chol, info = torch.linalg.cholesky_ex(gram + damping * mean_diag * eye)
        if info.item() == 0:
            return chol
        if damping >= max_damping:
            raise ValueError(f"{name}: calibration Gram matrix is not positive definite even with damping {damping}")
        damping = min(max_damping, 1e-8 if damping == 0 else damping * 10)
    raise ValueError(f"{name}: calibration Gram matrix is not positive definite even with damping {damping}")


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


def allocate_budget(spectra: list[torch.Tensor], bytes_per_rank: list[int], budget_bytes: float) -> list[int]:
    """Ranks across layers: greedily add the rank step with the largest relative error drop per byte.

    Each layer starts at rank 1. Gains s_j² / Σs² fall monotonically within a layer, so a heap of
    each layer's next step yields the steps in the global order of gain per byte. A step that does
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
    power = [s.double() ** 2 / (s.double() ** 2).sum().clamp_min(torch.finfo(torch.float64).tiny) for s in spectra]
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
