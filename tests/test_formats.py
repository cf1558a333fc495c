"""The weight-format registry (a toy format defined here alone goes everywhere a format goes), the public API,
and checkpoints written by earlier versions."""

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import make_tiny_gpt2
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM
from triton_lowrank.kernels.configs import Problem, TileConfig

import triton_lowrank
from triton_lowrank import (
    CompressedLinear,
    LowRankConfig,
    LowRankLinear,
    compress_model,
    dense_weight,
    load_compressed,
    save_compressed,
)
from triton_lowrank.core.autotune import Autotuner, problem_key
from triton_lowrank.core.factorize import relative_error_of
from triton_lowrank.core.format import FORMATS, WeightFormat, register_weight_format, weight_format
from triton_lowrank.core.ops import run_format
from triton_lowrank.core.quant import dequantize, quantize

DATA = Path(__file__).parent / "data"
TOY = "test-row-int8"


class RowInt8Weights(NamedTuple):
    """The toy format's storage: the dense weight in int8 [out, in], one float32 scale per row, the bias."""

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def row_int8_reference(x, w: RowInt8Weights):
    y = x.float() @ dequantize(w.codes, w.scale, 8).t()  # [..., out]
    return (y if w.bias is None else y + w.bias.float()).to(x.dtype)


def row_int8_matmul(x, w: RowInt8Weights, *, out=None, config=None):
    return run_format("row_int8_matmul", x, w, weight_format(TOY), config, out)


class RowInt8Linear(CompressedLinear):
    """A second weight format, as small as one can be: the dense weight in int8 with one scale per row.
    Everything about it is in this file: the layer, its fit, its op and its kernel problem."""

    FORMAT = TOY
    FP32_BUFFERS = ("scale",)

    def __init__(self, in_features, out_features, bias, dtype, device=None, replaces="Linear"):
        super().__init__()
        self.in_features, self.out_features, self.replaces = in_features, out_features, replaces
        self.rank, self.bits = min(in_features, out_features), 8  # what a compression report shows
        self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @classmethod
    def from_dense(cls, module):
        layer, _ = fit_row_int8(dense_weight(module).detach(), module.bias, 1, None, None, module.weight.dtype,
                                "toy", type(module).__name__)
        return layer

    def stored(self):
        return RowInt8Weights(self.codes, self.scale, self.bias)

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
        return [row_int8_problem(self.stored(), m, x_bytes)]

    def forward(self, x):
        return row_int8_matmul(x, self.stored())


def fit_row_int8(weight, bias, rank, state, config, dtype, name, kind):
    """(the layer, its relative error): round-to-nearest per row; rank and calibration do not apply."""
    layer = RowInt8Linear(weight.shape[1], weight.shape[0], bias is not None, dtype, weight.device, kind)
    codes, scale = quantize(weight.float(), 8)
    layer.codes.copy_(codes)
    layer.scale.copy_(scale)
    if bias is not None:
        layer.bias.data.copy_(bias.detach())
    return layer, relative_error_of(weight, layer.dequantized_weight())


def row_int8_problem(w: RowInt8Weights, m, x_bytes):
    return Problem(m, w.out_features, w.in_features, 1, 8, 0, x_bytes, format=TOY)


TOY_FORMAT = WeightFormat(
    name=TOY,
    layer=RowInt8Linear,
    needs_grams=lambda config: "",
    check_layer=lambda name, out_features, in_features, config: None,
    rank_bytes=lambda out_features, in_features, config, float_bytes: (1, out_features * (in_features + 4)),
    fixed_bytes_label=lambda config: "int8 rows",
    prepare=lambda stats, config, name: None,
    measure=lambda weight, state, config, name: (torch.ones(1), None),
    allocate=lambda spectra, normalizers, per_rank, budget: [1] * len(spectra),
    fit=fit_row_int8,
    storage=RowInt8Weights,
    matmul=row_int8_matmul,
    reference=row_int8_reference,
    problem=row_int8_problem,
    problem_key=lambda p: "rowint8-",
    default_config=lambda p, *sizes: TileConfig("split", 16, 32, 32, 16),
    candidates=lambda p, mode, *sizes: [TileConfig("split", 16, 32, 32, 16), TileConfig("split", 64, 64, 64, 16)],
    random_storage=lambda p, dtype, device: RowInt8Weights(
        torch.randint(-127, 128, (p.n, p.k), dtype=torch.int8, device=device),
        torch.rand(p.n, device=device) + 0.5, None),
)


@pytest.fixture
def row_int8_format():
    register_weight_format(TOY_FORMAT)
    yield RowInt8Linear
    FORMATS.pop(TOY)


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


def test_a_registered_format_goes_through_compression_the_tuner_and_both_loaders(row_int8_format, tmp_path):
    """The toy format, defined in this file alone: compress_model fits it, both loaders load it, the autotuner
    keys, tunes and picks its configs, and its kernel problem names it."""
    model = make_tiny_gpt2()
    dense = make_tiny_gpt2()
    report = compress_model(model, LowRankConfig(rank=1, format=TOY), progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, row_int8_format)}
    assert len(layers) == len(report.layers) == 4 * len(model.transformer.h)
    assert all(0 < row.rel_error < 0.01 for row in report.layers)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected, reference = model(ids).logits, dense(ids).logits
    assert (expected - reference).abs().max() < 0.05 * reference.abs().max()  # int8 rows: close to dense
    folder = save_compressed(model, tmp_path / "toy")
    for loaded in (load_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)):
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)
    problem, = next(iter(layers.values())).kernel_problems(5, 2)
    assert problem.format == TOY and (problem.m, problem.k) == (5, 64)
    timings = {16: 2.0, 64: 1.0}  # the second candidate is faster
    tuner = Autotuner(mode="fast", cache_dir=tmp_path / "cache", gpu_name="test-gpu", triton_version="t",
                      timer=lambda p, c: timings[c.block_m], progress=False)
    assert problem_key(problem, "float16").startswith("rowint8-r1-")
    assert tuner.tune(problem, "float16").block_m == 64
    assert tuner.config_for(problem, "float16").block_m == 64
    w = TOY_FORMAT.random_storage(problem, torch.float32, "cpu")
    x = torch.randn(3, problem.k)
    torch.testing.assert_close(row_int8_matmul(x, w), row_int8_reference(x, w))


def test_an_unknown_format_in_a_checkpoint_is_named(row_int8_format, tmp_path):
    model = make_tiny_gpt2()
    model.transformer.h[0].mlp.c_fc = row_int8_format.from_dense(model.transformer.h[0].mlp.c_fc)
    folder = save_compressed(model, tmp_path / "toy")
    FORMATS.pop(row_int8_format.FORMAT)
    try:
        with pytest.raises(ValueError, match="unknown weight format 'test-row-int8'"):
            load_compressed(folder)
    finally:
        register_weight_format(TOY_FORMAT)


def test_checkpoint_written_by_format_version_1_still_loads():
    """tests/data/v1_checkpoint was saved by the code before the registry (see make_v1_checkpoint.py):
    int8 whitened attention, int4 g32 c_fc, float c_proj; group_size 128 recorded for int8 and float."""
    recorded = torch.load(DATA / "v1_checkpoint_logits.pt")
    folder = DATA / "v1_checkpoint"
    for model in (load_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)):
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
        assert len(layers) == 8
        assert {(m.bits, m.rank) for m in layers.values()} == {(8, 8), (4, 12), (None, 6)}
        stored = load_file(folder / "model.safetensors")
        state = model.state_dict()
        assert set(stored) <= set(state)
        for name, tensor in stored.items():  # the stored tensors load bit for bit
            assert torch.equal(state[name], tensor), name
        with torch.no_grad():  # the logits within fp32 rounding: transformers' GPT-2 math moves between releases
            torch.testing.assert_close(model(recorded["input_ids"]).logits, recorded["logits"], rtol=0, atol=1e-5)


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
