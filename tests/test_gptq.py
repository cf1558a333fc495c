"""Error-feedback quantization of the factors (triton_lowrank.core.gptq)."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from triton_lowrank import LowRankConfig, compress_model
from triton_lowrank.core.factorize import truncated_factors
from triton_lowrank.core.format import dense_weight
from triton_lowrank.core.gptq import _up_column_quantizer, gptq, quantize_factors
from triton_lowrank.core.quant import dequantize, quantize, quantize_with_scale


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) * torch.logspace(0, -2, features)[:, None]
    return torch.randn(n, features, generator=generator) @ mixing  # [n, features]


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 16)])
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(bits, group_size):
    torch.manual_seed(0)
    up = torch.randn(32, 12)  # [out, r]
    quantize_column, _ = _up_column_quantizer(12, 32, bits, group_size, up.device)
    rounded = gptq(up, torch.diag(torch.rand(12) + 0.5), quantize_column)
    storage, scale = quantize(up.t().contiguous(), bits, group_size)  # column j of up is row j of up_t
    torch.testing.assert_close(rounded, dequantize(storage, scale, bits, group_size).t(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 16)])
def test_gptq_lowers_the_output_error_on_correlated_inputs(bits, group_size):
    torch.manual_seed(1)
    weight = torch.randn(32, 24)  # [rows, cols]
    x = correlated_inputs(256, 24, seed=2)  # [n, cols]
    quantize_column, _ = _up_column_quantizer(24, 32, bits, group_size, weight.device)
    with_feedback = gptq(weight, x.t() @ x, quantize_column, damping=1e-4)
    storage, scale = quantize(weight.t().contiguous(), bits, group_size)
    rounded = dequantize(storage, scale, bits, group_size).t()
    error = lambda w_hat: ((weight - w_hat) @ x.t()).norm()
    assert error(with_feedback) < 0.8 * error(rounded)


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 16)])
@pytest.mark.parametrize("calibrated", [False, True])
def test_stored_factors_lie_exactly_on_their_quantization_grid(bits, group_size, calibrated):
    torch.manual_seed(2)
    weight = torch.randn(48, 32)  # [out, in]
    x = correlated_inputs(128, 32, seed=3).double()
    chol = torch.linalg.cholesky(x.t() @ x) if calibrated else None
    _, down = truncated_factors(weight, 16, chol)
    f = quantize_factors(weight, down, bits, group_size, chol)
    down_q, down_scale, up_q, up_scale = f.down, f.down_scale, f.up_t, f.up_t_scale
    assert up_q.shape == ((16, 48) if bits == 8 else (16, 24)) and up_scale.dtype == torch.float32
    for storage, scale in ((down_q, down_scale), (up_q, up_scale)):
        regridded = quantize_with_scale(dequantize(storage, scale, bits, group_size), scale, bits, group_size)
        assert torch.equal(regridded, storage)


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 16)])
def test_error_feedback_lowers_activation_error_of_a_whitened_layer(bits, group_size):
    calib = correlated_inputs(512, 48, seed=4)  # full rank below: all the error is quantization error

    def activation_error(error_feedback: bool) -> float:
        torch.manual_seed(5)
        layer = nn.Linear(48, 64)
        weight = layer.weight.detach().clone()
        holder = nn.Sequential(OrderedDict(layer=layer))
        config = LowRankConfig(rank=48, bits=bits, group_size=group_size, method="whitened",
                               error_feedback=error_feedback)
        compress_model(holder, config, [{"input": calib}], progress=False)
        return ((dense_weight(holder.layer) - weight) @ calib.t()).norm().item()

    assert activation_error(True) < 0.9 * activation_error(False)
