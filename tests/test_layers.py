"""LowRankLinear and the factorization core, layer by layer."""

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from triton_lowrank import LowRankConfig, LowRankLinear, compress_model
from triton_lowrank.core.factorize import refit_up, spectrum, truncated_factors
from triton_lowrank.core.factors import round_factors
from triton_lowrank.core.format import dense_weight
from triton_lowrank.core.quant import dequantize, quantize

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def make_layer(kind: str, in_features: int, out_features: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features) if kind == "Linear" else Conv1D(out_features, in_features)
    with torch.no_grad():
        layer.weight.normal_(0, 0.1)
        layer.bias.normal_(0, 0.1)
    return layer


def compress_single(layer: nn.Module, config: LowRankConfig, calibration=None):
    holder = nn.Sequential(OrderedDict(layer=layer))  # forward(input=...) takes calibration dicts
    report = compress_model(holder, config, calibration, progress=False)
    return holder.layer, report.layers[0]


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("in_features, out_features", [(48, 48), (40, 72), (72, 40)])
def test_full_rank_unquantized_round_trip_reproduces_dense(kind, in_features, out_features):
    dense = make_layer(kind, in_features, out_features)
    x = torch.randn(3, 5, in_features)
    expected = dense(x)
    compressed, row = compress_single(dense, LowRankConfig(rank=min(in_features, out_features), bits=None))
    got = compressed(x)
    assert isinstance(compressed, LowRankLinear)
    assert row.kind == kind and (row.in_features, row.out_features) == (in_features, out_features)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_orientation_is_by_type_not_shape():
    # A square Conv1D is the case a shape-based guess cannot get right.
    conv = make_layer("Conv1D", 32, 32)
    linear = nn.Linear(32, 32)
    with torch.no_grad():
        linear.weight.copy_(conv.weight)
    assert torch.equal(dense_weight(conv), conv.weight.t())
    assert torch.equal(dense_weight(linear), linear.weight)


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("rank", [1, 5, 17])
def test_truncation_error_is_eckart_young_optimum(kind, rank):
    dense = make_layer(kind, 40, 56)
    weight = dense_weight(dense).detach().clone()
    s = torch.linalg.svdvals(weight.double())
    optimum = s[rank:].pow(2).sum().sqrt()
    compressed, row = compress_single(dense, LowRankConfig(rank=rank, bits=None))
    error = (dense_weight(compressed).double() - weight.double()).norm()
    assert error.item() == pytest.approx(optimum.item(), rel=1e-4)
    assert row.rel_error == pytest.approx((optimum / weight.double().norm()).item(), rel=1e-4)


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with a strongly non-isotropic covariance, as real activations have."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) * torch.logspace(0, -2, features)[:, None]
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed + 1)) @ mixing


def test_whitened_truncation_beats_plain_svd_on_correlated_inputs():
    in_features, out_features, rank = 48, 40, 8
    calib = correlated_inputs(512, in_features, seed=1)
    held_out = correlated_inputs(512, in_features, seed=1)[:256] + 0.01 * torch.randn(256, in_features)

    def activation_error(config, x):
        dense = make_layer("Linear", in_features, out_features)
        weight = dense.weight.detach().clone()
        compressed, _ = compress_single(dense, config, calibration=[{"input": calib}])
        return ((dense_weight(compressed) - weight) @ x.t()).norm().item(), weight

    plain, _ = activation_error(LowRankConfig(rank=rank, bits=None), calib)
    whitened, weight = activation_error(LowRankConfig(rank=rank, bits=None, method="whitened"), calib)
    assert whitened < 0.7 * plain
    # It is the optimum for the calibration set: the discarded singular values of W·L.
    chol = torch.linalg.cholesky(calib.double().t() @ calib.double())
    optimum = spectrum(weight, chol)[rank:].pow(2).sum().sqrt().item()
    assert whitened == pytest.approx(optimum, rel=1e-3)
    plain_held, _ = activation_error(LowRankConfig(rank=rank, bits=None), held_out)
    whitened_held, _ = activation_error(LowRankConfig(rank=rank, bits=None, method="whitened"), held_out)
    assert whitened_held < plain_held


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(signal.pow(2).sum().item() / (signal - approx).pow(2).sum().item())


# Floors from uniform-quantizer theory, SQNR = 10·log10(12·qmax² / (amax/σ)²): for Gaussian rows the
# absolute maximum of a row (int8) or group (int4) sits at 3–4 σ, so int8 (qmax 127) gives about
# 40 dB and int4 (qmax 7, groups of 32) about 17 dB. The floors leave ~4 dB for heavier tails.
SQNR_FLOOR_DB = {8: 36.0, 4: 13.0}


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 32), (4, 16)])
def test_quantized_factor_sqnr_above_floor(bits, group_size):
    torch.manual_seed(0)
    factor = torch.randn(24, 96) * torch.logspace(0, -1, 24)[:, None]  # rank components of unequal scale
    storage, scale = quantize(factor, bits, group_size)
    assert sqnr_db(factor, dequantize(storage, scale, bits, group_size)) >= SQNR_FLOOR_DB[bits]
    dense = make_layer("Conv1D", 64, 96)
    weight = dense_weight(dense).detach().clone()
    compressed, _ = compress_single(dense, LowRankConfig(rank=64, bits=bits, group_size=group_size))
    # Full rank: what is lost is the quantization alone, on both factors (about 3 dB).
    assert sqnr_db(weight, dense_weight(compressed)) >= SQNR_FLOOR_DB[bits] - 4


def test_int4_packing_round_trips_exact_levels():
    torch.manual_seed(0)
    q = torch.randint(-7, 8, (3, 32)).float()  # [3, 32] symmetric int4 levels
    q[:, 0], q[:, 1] = 7, -7  # pin each group's absolute maximum so the scale is exactly 0.5
    storage, scale = quantize(q * 0.5, 4, group_size=32)
    assert storage.dtype == torch.uint8 and storage.shape == (3, 16)
    assert torch.equal(scale, torch.full((3, 1), 0.5))
    assert torch.equal(dequantize(storage, scale, 4, 32), q * 0.5)
    # Column 2j sits in the low nibble, 2j+1 in the high nibble, offset by 8.
    assert torch.equal(storage[:, 0].long(), (q[:, 0] + 8).long() | ((q[:, 1] + 8).long() << 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("leading", [(), (1,), (2, 3)])
def test_forward_accepts_any_leading_shape_and_float_dtype(dtype, leading):
    dense = make_layer("Linear", 32, 24)
    compressed, _ = compress_single(dense, LowRankConfig(rank=24, bits=8))
    x = torch.randn(*leading, 32)
    y = compressed.to(dtype)(x.to(dtype))
    assert y.shape == (*leading, 24) and y.dtype == dtype
    atol, rtol = TOL[dtype]
    expected = x @ dense_weight(compressed).t() + compressed.bias.float()
    torch.testing.assert_close(y.float(), expected, atol=atol * 10, rtol=rtol * 10)


def test_repr_shows_shape_rank_and_bits():
    layer = LowRankLinear(64, 32, rank=7, bits=4, group_size=32, device="meta")
    text = repr(layer)
    assert "in_features=64" in text and "out_features=32" in text and "rank=7" in text and "int4" in text


def test_forward_rejects_integer_input():
    layer = LowRankLinear(16, 16, rank=4, bits=None, dtype=torch.float32)
    with pytest.raises(TypeError, match="input dtype"):
        layer(torch.ones(2, 16, dtype=torch.int64))


def test_casting_the_module_keeps_scales_float32():
    dense = make_layer("Linear", 32, 24)
    compressed, _ = compress_single(dense, LowRankConfig(rank=8, bits=8))
    with torch.no_grad():
        compressed.down_scale[0] = 1e-9  # below fp16's range: a cast through fp16 would zero it
    scales = (compressed.down_scale.clone(), compressed.up_t_scale.clone())
    compressed.half()
    assert compressed.down_scale.dtype == compressed.up_t_scale.dtype == torch.float32
    assert torch.equal(compressed.down_scale, scales[0]) and torch.equal(compressed.up_t_scale, scales[1])
    assert compressed.down.dtype == torch.int8 and compressed.bias.dtype == torch.float16
    compressed.to(torch.bfloat16)
    assert torch.equal(compressed.down_scale, scales[0]) and torch.equal(compressed.up_t_scale, scales[1])


@pytest.mark.parametrize("whitened", [False, True])
def test_refit_up_recovers_the_exact_up_factor_when_down_is_exact(whitened):
    dense = make_layer("Linear", 40, 56)
    weight = dense_weight(dense).detach().clone()
    x = correlated_inputs(256, 40, seed=3).double()
    chol = torch.linalg.cholesky(x.t() @ x) if whitened else None
    up, down = truncated_factors(weight, 9, chol)
    torch.testing.assert_close(refit_up(weight, down, chol), up, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 128)])
def test_refitting_up_to_the_stored_down_beats_quantizing_both_independently(bits, group_size):
    dense = make_layer("Conv1D", 64, 96)
    weight = dense_weight(dense).detach().clone()
    up, down = truncated_factors(weight, 64)  # full rank: all the error is quantization error
    stored = round_factors(up, down, None, bits, group_size, torch.float32)
    independent = LowRankLinear.from_factors(stored, torch.float32)
    compressed, _ = compress_single(dense, LowRankConfig(rank=64, bits=bits, group_size=group_size))
    refit_error = (dense_weight(compressed) - weight).norm()
    independent_error = (dense_weight(independent) - weight).norm()
    # Independent errors add in quadrature; with the refit mostly up's remains: about 1/√2 of it.
    assert refit_error < 0.85 * independent_error
