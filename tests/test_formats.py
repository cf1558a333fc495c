"""The weight-format registry, the public API, and checkpoints written by earlier versions."""

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_gpt2
from torch import nn
from transformers import AutoModelForCausalLM

import triton_lowrank
from triton_lowrank import (
    CompressedLinear,
    LowRankConfig,
    LowRankLinear,
    compress_model,
    dense_weight,
    load_compressed,
    register_format,
    save_compressed,
)
from triton_lowrank.formats import FORMATS
from triton_lowrank.quant import dequantize, quantize

DATA = Path(__file__).parent / "data"


class RowInt8Linear(CompressedLinear):
    """A second weight format, as small as one can be: the dense weight in int8 with one scale per row.
    Nothing but this class and `register_format` is needed for it to save and load."""

    FORMAT = "test-row-int8"
    FP32_BUFFERS = ("scale",)

    def __init__(self, in_features, out_features, bias, dtype, device=None, replaces="Linear"):
        super().__init__()
        self.in_features, self.out_features, self.replaces = in_features, out_features, replaces
        self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @classmethod
    def from_dense(cls, module):
        weight = dense_weight(module).detach()  # [out, in]
        layer = cls(weight.shape[1], weight.shape[0], module.bias is not None, weight.dtype,
                    replaces=type(module).__name__)
        codes, scale = quantize(weight, 8)
        layer.codes.copy_(codes)
        layer.scale.copy_(scale)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    def spec(self):
        return self.common_spec()

    @classmethod
    def from_spec(cls, spec, dtype, device="meta"):
        return cls(spec["in_features"], spec["out_features"], spec["bias"], dtype, device, spec["kind"])

    @classmethod
    def check_spec(cls, spec, where):
        pass

    def dequantized_weight(self):
        return dequantize(self.codes, self.scale, 8)

    def kernel_problems(self, m, x_bytes):
        return []

    def forward(self, x):
        y = x.float() @ self.dequantized_weight().t()
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)


@pytest.fixture
def row_int8_format():
    register_format(RowInt8Linear)
    yield RowInt8Linear
    FORMATS.pop(RowInt8Linear.FORMAT)


def test_a_registered_format_saves_and_loads_through_both_loaders(row_int8_format, tmp_path):
    model = make_tiny_gpt2()
    mlp = model.transformer.h[0].mlp
    mlp.c_fc = row_int8_format.from_dense(mlp.c_fc)
    compress_model(model, LowRankConfig(rank=16, bits=8), progress=False)  # the other Conv1D layers
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(ids).logits
    folder = save_compressed(model, tmp_path / "mixed")
    for loaded in (load_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)):
        assert isinstance(loaded.transformer.h[0].mlp.c_fc, row_int8_format)
        assert isinstance(loaded.transformer.h[0].attn.c_attn, LowRankLinear)
        assert loaded.transformer.h[0].mlp.c_fc.scale.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)


def test_an_unknown_format_in_a_checkpoint_is_named(row_int8_format, tmp_path):
    model = make_tiny_gpt2()
    model.transformer.h[0].mlp.c_fc = row_int8_format.from_dense(model.transformer.h[0].mlp.c_fc)
    folder = save_compressed(model, tmp_path / "toy")
    FORMATS.pop(row_int8_format.FORMAT)
    try:
        with pytest.raises(ValueError, match="unknown weight format 'test-row-int8'"):
            load_compressed(folder)
    finally:
        register_format(row_int8_format)


def test_checkpoint_written_by_format_version_1_still_loads():
    """tests/data/v1_checkpoint was saved by the code before the registry (see make_v1_checkpoint.py):
    int8 whitened attention, int4 g32 c_fc, float c_proj; group_size 128 recorded for int8 and float."""
    recorded = torch.load(DATA / "v1_checkpoint_logits.pt")
    folder = DATA / "v1_checkpoint"
    for model in (load_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)):
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
        assert len(layers) == 8
        assert {(m.bits, m.rank) for m in layers.values()} == {(8, 8), (4, 12), (None, 6)}
        with torch.no_grad():
            torch.testing.assert_close(model(recorded["input_ids"]).logits, recorded["logits"], rtol=0, atol=0)


def test_public_names():
    assert triton_lowrank.embedded_model_path().joinpath("config.json").is_file()
    layer = LowRankLinear(32, 16, rank=4, bits=None, dtype=torch.float32)
    for buffer in (layer.down, layer.up_t, layer.bias):
        buffer.data.normal_()
    x = torch.randn(3, 32)
    torch.testing.assert_close(triton_lowrank.lowrank_matmul(x, layer.factors()), layer(x))


def test_config_carries_a_version():
    assert LowRankConfig(rank=4).to_dict()["version"] == LowRankConfig.VERSION == 1


def test_one_layer_is_quiet_and_a_model_shows_progress(capsys):
    layer = nn.Sequential(nn.Linear(32, 32))
    compress_model(layer, LowRankConfig(rank=4))
    assert capsys.readouterr().err == ""
    compress_model(make_tiny_gpt2(), LowRankConfig(rank=4))
    assert "compressing" in capsys.readouterr().err
