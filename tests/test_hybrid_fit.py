"""Hybrid weights W ≈ Q + U·D: int3/int2 base storage, GPTQ base fit, correction fit, byte accounting."""

import pytest
import torch

from triton_lowrank.core import gptq as gptq_module
from triton_lowrank.core.factorize import truncated_factors
from triton_lowrank.core.gptq import gptq
from triton_lowrank.core.nbytes import hybrid_bytes
from triton_lowrank.core.quant import (
    check_base_bits,
    dequantize_zero_point,
    pack_codes,
    quantize_zero_point,
    unpack_codes,
)
from triton_lowrank.formats.hybrid.fit import (
    allocate_correction_ranks,
    base_error_spectrum,
    fit_base,
    fit_correction,
    fit_hybrid,
)
from triton_lowrank.formats.hybrid.storage import HybridWeights, dequantize_base


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) * torch.logspace(0, -2, features)[:, None]
    return torch.randn(n, features, generator=generator) @ mixing  # [n, features]


# ----------------------------------------------------------------------------- storage layouts


def test_int2_packs_four_codes_per_byte_lowest_column_in_the_lowest_bits():
    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0], [1, 1, 1, 1, 2, 0, 0, 0]])  # [2, 8]
    storage = pack_codes(codes, 2)
    expected = [[0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2 | 1 << 4], [1 | 1 << 2 | 1 << 4 | 1 << 6, 2]]
    assert storage.dtype == torch.uint8 and storage.tolist() == expected
    assert torch.equal(unpack_codes(storage, 2).long(), codes)


def test_int3_stores_a_two_bit_plane_then_a_high_bit_plane():
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7] * 2, [7, 0, 0, 0, 0, 0, 0, 5] + [1] * 8])  # [2, 16]
    storage = pack_codes(codes, 3)
    low = [0 | 1 << 2 | 2 << 4 | 3 << 6] * 4  # codes & 3, four per byte
    assert storage.shape == (2, 6)  # 16 // 4 bytes of low bits, then 16 // 8 bytes of high bits
    assert storage[0].tolist() == low + [0b11110000, 0b11110000]
    assert storage[1].tolist() == [3, 1 << 6, 1 | 1 << 2 | 1 << 4 | 1 << 6, 85, 0b10000001, 0]
    assert torch.equal(unpack_codes(storage, 3).long(), codes)


@pytest.mark.parametrize("bits", [2, 3])
def test_zero_point_storage_recovers_a_matrix_that_lies_on_its_grid(bits):
    top = 2**bits - 1
    torch.manual_seed(0)
    rows, groups, group_size = 6, 3, 16
    codes = torch.randint(0, top + 1, (rows, groups, group_size))
    codes[..., 0], codes[..., 1] = 0, top  # each group spans the whole code range
    zero = torch.randint(0, top + 1, (rows, groups))
    scale = 2.0 ** torch.randint(-6, 2, (rows, groups)).float()  # powers of two: every step exact
    w = ((codes - zero[..., None]) * scale[..., None]).view(rows, groups * group_size)  # [6, 48]
    storage, got_scale, got_zero = quantize_zero_point(w, bits, group_size)
    assert storage.shape == (rows, 48 * bits // 8) and got_zero.dtype == torch.uint8
    assert torch.equal(got_scale, scale) and torch.equal(got_zero.long(), zero)
    assert torch.equal(unpack_codes(storage, bits).long(), codes.view(rows, -1))
    assert torch.equal(dequantize_zero_point(storage, got_scale, got_zero, bits, group_size), w)


@pytest.mark.parametrize("bits", [2, 3])
def test_zero_point_rounding_error_is_at_most_half_a_step(bits):
    torch.manual_seed(1)
    w = torch.randn(5, 64) + torch.linspace(-1, 3, 64)  # groups that do not straddle zero evenly
    storage, scale, zero = quantize_zero_point(w, bits, 32)
    error = (dequantize_zero_point(storage, scale, zero, bits, 32) - w).view(5, 2, 32).abs()
    assert (error <= scale[..., None] / 2 * (1 + 1e-5)).all()
    assert (zero.long() <= 2**bits - 1).all()


@pytest.mark.parametrize(
    "bits, group_size, features, message",
    [(5, 32, 64, "4, 3 or 2"), (2, 12, 48, "multiple of 8"), (3, 32, 48, "dividing 48"), (4, 3, 48, "even")],
)
def test_bad_base_storage_is_one_clear_error(bits, group_size, features, message):
    with pytest.raises(ValueError, match=message):
        check_base_bits(bits, group_size, features, "layer.0")


# ----------------------------------------------------------------------------- the base fit


@pytest.mark.parametrize("bits, group_size", [(4, 16), (3, 16), (2, 8)])
def test_gptq_base_with_a_diagonal_hessian_is_round_to_nearest(bits, group_size):
    torch.manual_seed(2)
    weight = torch.randn(12, 48)
    rtn = fit_base(weight, bits, group_size)
    fitted = fit_base(weight, bits, group_size, torch.diag(torch.rand(48) + 0.5))
    for got, want in zip(fitted, rtn, strict=True):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("bits, group_size", [(4, 16), (3, 16), (2, 8)])
def test_gptq_base_lowers_the_output_error_on_correlated_inputs(bits, group_size):
    torch.manual_seed(3)
    weight = torch.randn(32, 48)
    x = correlated_inputs(512, 48, seed=4)  # [n, in]
    error = lambda stored: ((weight - dequantize_base(*stored, bits, group_size)) @ x.t()).norm()
    assert error(fit_base(weight, bits, group_size, x.t() @ x)) < 0.8 * error(fit_base(weight, bits, group_size))


def test_group_scales_see_every_earlier_error_across_block_boundaries(monkeypatch):
    """Groups of 24 straddle blocks of 16: the lazily applied block updates must not change the fit."""
    torch.manual_seed(5)
    weight = torch.randn(8, 48).double()
    x = correlated_inputs(256, 48, seed=6).double()
    seen = {}

    def fit(block):
        monkeypatch.setattr(gptq_module, "BLOCK", block)
        starts = {}
        scales = {}

        def start_group(j, columns):
            starts[j] = columns.clone()
            scales[j] = columns.abs().amax(1) / 7

        def quantize_column(j, column):
            s = scales[j // 24 * 24]
            return torch.round(column / s).clamp(-8, 7) * s

        out = gptq(weight, x.t() @ x, quantize_column, 0.01, 24, start_group)
        seen[block] = starts
        return out

    torch.testing.assert_close(fit(16), fit(1000), rtol=0, atol=1e-5)
    for j in (0, 24):
        torch.testing.assert_close(seen[16][j], seen[1000][j], rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- the correction fit


def test_whitened_correction_leaves_exactly_the_discarded_singular_values():
    torch.manual_seed(7)
    error = torch.randn(24, 32)  # [out, in]
    x = correlated_inputs(256, 32, seed=8).double()
    chol = torch.linalg.cholesky(x.t() @ x)
    s = torch.linalg.svdvals(error.double() @ chol)
    down, _, up_t, _ = fit_correction(error, 6, None, 16, chol)
    residual = ((error.double() - up_t.double().t() @ down.double()) @ chol).norm() ** 2
    torch.testing.assert_close(residual, (s[6:] ** 2).sum(), rtol=1e-5, atol=0)
    up, down_plain = truncated_factors(error, 6)  # optimal in weight space only
    plain = ((error.double() - up.double() @ down_plain.double()) @ chol).norm() ** 2
    assert residual < 0.9 * plain


@pytest.mark.parametrize("base_bits, base_group_size", [(4, 16), (3, 16), (2, 8)])
@pytest.mark.parametrize("order", ["auto", "refit", "lqer", "svdquant", "alternating"])
def test_a_full_rank_unquantized_correction_reproduces_the_weight(base_bits, base_group_size, order):
    torch.manual_seed(9)
    weight = torch.randn(40, 32)
    x = correlated_inputs(256, 32, seed=10)
    hybrid = fit_hybrid(weight, base_bits, base_group_size, 32, None, 16, x.t() @ x, order=order)
    torch.testing.assert_close(hybrid.dense_weight(), weight, rtol=0, atol=2e-4)
    assert hybrid.base_weight().sub(weight).abs().max() > 1e-2  # the base alone is quantized


@pytest.mark.parametrize("order", ["auto", "refit", "lqer", "svdquant", "alternating"])
def test_quantized_hybrid_beats_its_base_alone_in_the_whitened_metric(order):
    torch.manual_seed(11)
    weight = torch.randn(64, 48)
    x = correlated_inputs(512, 48, seed=12)
    hybrid = fit_hybrid(weight, 2, 16, 8, 8, 16, x.t() @ x, order=order)
    error = lambda w_hat: ((weight - w_hat) @ x.t()).norm()
    assert error(hybrid.dense_weight()) < 0.85 * error(dequantize_base(*fit_base(weight, 2, 16, x.t() @ x), 2, 16))


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize(
    "base_bits, base_group_size, rank, bits, group_size",
    [(4, 128, 16, 8, 128), (4, 64, 8, 4, 64), (3, 64, 5, 8, 32), (2, 32, 3, 4, 32), (2, 64, 4, None, 128)],
)
def test_byte_accounting_matches_the_stored_tensors(base_bits, base_group_size, rank, bits, group_size):
    torch.manual_seed(13)
    weight = torch.randn(192, 128)  # [out, in]
    hybrid = fit_hybrid(weight, base_bits, base_group_size, rank, bits, group_size, base_method="rtn", method="svd")
    assert isinstance(hybrid, HybridWeights) and hybrid.rank == rank
    float_bytes = hybrid.correction.down.element_size()
    predicted = hybrid_bytes(192, 128, base_bits, base_group_size, rank, bits, group_size, float_bytes)
    assert hybrid.storage_bytes() == predicted
    codes = 192 * 128 * base_bits // 8
    assert hybrid.base.numel() == codes and hybrid.base_scale.numel() == 192 * 128 // base_group_size


# ----------------------------------------------------------------------------- knobs and ranks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base_method="gptq", method="svd"), "need a calibration Gram"),
        (dict(base_method="rtn", method="whitened"), "need a calibration Gram"),
        (dict(base_method="rtn", method="svd", order="both"), "order must be one of"),
        (dict(base_method="rtn", method="svd", rank=33), r"rank must be an int in \[1, min"),
        (dict(base_method="rtn", method="svd", base_bits=1), "base bits must be"),
        (dict(base_method="rtn", method="svd", group_size=24), "does not divide"),
    ],
)
def test_bad_hybrid_knobs_are_one_clear_error(kwargs, message):
    args = dict(base_bits=4, base_group_size=16, rank=4, bits=4, group_size=16) | kwargs
    with pytest.raises(ValueError, match=message):
        fit_hybrid(torch.randn(48, 32), name="h.0.fc", **args)


def test_correction_ranks_go_where_they_remove_the_most_error_per_byte():
    flat = torch.ones(8)  # every step of layer 0 removes 1/8 of its error
    steep = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.1, 0.1])
    ranks = allocate_correction_ranks([flat, steep], [8.0, float((steep**2).sum())], [10, 10], 60)
    assert sum(ranks) * 10 <= 60 and ranks[1] > 1
    # Only steep's second step (4/21.3 = 0.19) beats flat's 0.125; then flat's steps come before steep's third.
    assert ranks == [4, 2]
    with pytest.raises(ValueError, match="budget too small"):
        allocate_correction_ranks([flat, steep], [8.0, 1.0], [10, 10], 15)


@pytest.mark.parametrize("bits, chosen", [(4, "lqer"), (8, "refit"), (None, "refit")])
def test_auto_order_is_lqer_for_int4_factors_and_refit_otherwise(bits, chosen):
    torch.manual_seed(14)
    weight = torch.randn(32, 32)
    gram = (lambda x: x.t() @ x)(correlated_inputs(256, 32, seed=15))
    auto = fit_hybrid(weight, 4, 16, 4, bits, 16, gram).dense_weight()
    for order in ("lqer", "refit"):
        same = torch.equal(auto, fit_hybrid(weight, 4, 16, 4, bits, 16, gram, order=order).dense_weight())
        assert same == (order == chosen)


@pytest.mark.parametrize("base_method, method", [("rtn", "svd"), ("gptq", "whitened")])
def test_base_error_spectrum_is_what_a_correction_of_the_base_error_leaves(base_method, method):
    """The spectrum the budget allocates by: an unquantized rank-r "lqer" correction leaves exactly its tail."""
    torch.manual_seed(16)
    weight = torch.randn(40, 32)
    gram = (lambda x: x.t() @ x)(correlated_inputs(256, 32, seed=17)).double()
    s, normalizer = base_error_spectrum(weight, 2, 16, gram, base_method, method)
    chol = torch.linalg.cholesky(gram) if method == "whitened" else torch.eye(32, dtype=torch.float64)
    assert normalizer == pytest.approx((weight.double() @ chol).square().sum().item(), rel=1e-9)
    assert s.shape == (32,) and (s[:-1] >= s[1:]).all() and s[0] > 0
    for rank in (1, 6):
        fit = fit_hybrid(weight, 2, 16, rank, None, 16, gram, base_method, method, order="lqer")
        left = ((weight - fit.dense_weight()).double() @ chol).square().sum().item()
        assert left == pytest.approx((s[rank:].double() ** 2).sum().item(), rel=1e-4)
