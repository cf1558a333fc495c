"""The hybrid weight format W ≈ Q + U·D: storage reference, the op, the module, compression, save/load, CLI."""

import pytest
import torch
from conftest import make_tiny_gpt2, tiny_tokenizer
from transformers import AutoModelForCausalLM

from triton_lowrank import (
    HybridLinear,
    HybridWeights,
    LowRankConfig,
    compress_model,
    dense_weight,
    hybrid_matmul,
    hybrid_reference,
    load_compressed,
    save_compressed,
)
from triton_lowrank.checkpoint.format import CheckpointError
from triton_lowrank.checkpoint.hf_quantizer import TritonLowRankConfig
from triton_lowrank.core.factors import round_factors
from triton_lowrank.core.format import FORMATS
from triton_lowrank.core.quant import ZERO_POINT_BITS, quantize, quantize_zero_point
from triton_lowrank.core.reference import dequantized_factors
from triton_lowrank.formats.hybrid.storage import dequantize_base
from triton_lowrank.tools.cli import main


def random_weights(in_features=64, out_features=48, base_bits=4, base_group_size=16, rank=8, bits=8,
                   group_size=16, seed=0, dtype=torch.float32) -> HybridWeights:
    """Seeded stored hybrid weights: an RTN base of a random matrix, rounded random factors, a bias."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)  # [out, in]
    if base_bits in ZERO_POINT_BITS:
        base, scale, zero = quantize_zero_point(w, base_bits, base_group_size)
    else:
        (base, scale), zero = quantize(w, base_bits, base_group_size), None
    up = torch.randn(out_features, rank, generator=gen) * 0.3  # [out, r]
    down = torch.randn(rank, in_features, generator=gen) * 0.3  # [r, in]
    correction = round_factors(up, down, None, bits, group_size, dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype)
    return HybridWeights(base, scale, zero, base_bits, base_group_size, correction, bias)


def dense_of(w: HybridWeights) -> torch.Tensor:
    """[out, in] float32 Q̂ + U·D, written out independently of hybrid_reference."""
    down, up_t = dequantized_factors(w.correction)  # [r, in], [r, out]
    return dequantize_base(w.base, w.base_scale, w.base_zero, w.base_bits, w.base_group_size) + up_t.t() @ down


@pytest.mark.parametrize("base_bits", [4, 3, 2])
@pytest.mark.parametrize("bits", [8, 4, None])
def test_reference_matches_the_dense_reconstruction(base_bits, bits):
    w = random_weights(base_bits=base_bits, bits=bits)
    x = torch.randn(3, 5, w.in_features)
    y = hybrid_reference(x, w)
    assert y.shape == (3, 5, w.out_features) and y.dtype == x.dtype
    torch.testing.assert_close(y, x @ dense_of(w).t() + w.bias, rtol=1e-5, atol=1e-4)
    assert w.correction.up_t.abs().sum() > 0 and w.base_weight().abs().sum() > 0  # neither part is all zero
    assert hybrid_reference(x.half(), w).dtype == torch.float16


def test_the_reference_adds_the_bias_once():
    w = random_weights()
    x = torch.randn(4, w.in_features)
    torch.testing.assert_close(hybrid_reference(x, w) - hybrid_reference(x, w._replace(bias=None)),
                               w.bias.expand(4, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base_bits", [4, 2])
def test_the_op_computes_the_reference(base_bits):
    w = random_weights(base_bits=base_bits, bits=4)
    x = torch.randn(2, 7, w.in_features)
    torch.testing.assert_close(hybrid_matmul(x, w), hybrid_reference(x, w), rtol=0, atol=0)
    # The fake (meta) implementation gives the shape without computing.
    fake = torch.ops.triton_lowrank.hybrid_matmul(
        x.to("meta"), *(t.to("meta") if isinstance(t, torch.Tensor) else t for t in
                        (w.base, w.base_scale, w.base_zero, w.base_bits, w.base_group_size, *w.correction[:4],
                         w.correction.bits, w.correction.group_size, w.bias)))
    assert fake.shape == (2, 7, w.out_features)


def test_the_op_rejects_mismatched_storage():
    w = random_weights(base_bits=3)
    x = torch.randn(2, w.in_features)
    with pytest.raises(ValueError, match="base_zero must be given exactly"):
        hybrid_matmul(x, w._replace(base_zero=None))
    with pytest.raises(ValueError, match="base must be uint8 of shape"):
        hybrid_matmul(x, w._replace(base=w.base[:, :-1]))
    with pytest.raises(TypeError, match="expected HybridWeights"):
        hybrid_matmul(x, w.correction)


@pytest.mark.parametrize("base_bits,bits", [(4, 8), (3, 4), (2, None)])
def test_module_forward_is_the_reference(base_bits, bits):
    w = random_weights(base_bits=base_bits, bits=bits, dtype=torch.float16)
    layer = HybridLinear.from_weights(w, torch.float16)
    assert FORMATS["hybrid"].layer is HybridLinear
    x = torch.randn(3, w.in_features, dtype=torch.float16)
    torch.testing.assert_close(layer(x), hybrid_reference(x, w), rtol=0, atol=0)
    torch.testing.assert_close(layer.dequantized_weight(), dense_of(w), rtol=0, atol=0)
    # spec -> from_spec rebuilds the same storage layout; scales stay float32 through a cast.
    skeleton = HybridLinear.from_spec(layer.spec(), torch.float16)
    HybridLinear.check_spec(layer.spec(), "layer")
    assert {n: (b.shape, b.dtype) for n, b in skeleton.named_buffers()} == {
        n: (b.shape, b.dtype) for n, b in layer.named_buffers()}
    assert layer.to(torch.bfloat16).base_scale.dtype == torch.float32
    (problem,) = layer.kernel_problems(4, 2)  # what pretune_model tunes: the base is part of the key
    assert (problem.m, problem.k, problem.n, problem.rank, problem.base_bits) == (4, 64, 48, 8, base_bits)
    assert problem.format == "hybrid"


def test_module_rejects_a_bad_base():
    with pytest.raises(ValueError, match="base bits must be one of 4, 3 or 2"):
        HybridLinear(64, 48, 5, 16, 8)
    with pytest.raises(ValueError, match="group_size"):
        HybridLinear(64, 48, 2, 24, 8)
    with pytest.raises(ValueError, match="base_bits must be one of"):
        HybridLinear.check_spec({"base_bits": 8, "base_group_size": 16, "rank": 8, "group_size": 16, "bits": 8,
                                 "in_features": 64, "out_features": 48}, "layer")


# ----------------------------------------------------------------------------- compression, save/load, CLI

# A tiny model's calibration: fewer tokens than features is expected here, and warned about elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:calibration saw fewer tokens")
CALIBRATION = [torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(1))]
IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("base_method,method", [("gptq", "whitened"), ("rtn", "svd")])
def test_compress_model_with_base_bits_makes_hybrid_layers(base_method, method):
    model = make_tiny_gpt2()
    dense = {n: dense_weight(m).detach().clone() for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    config = LowRankConfig(rank=8, bits=8, method=method, base_bits=4, base_group_size=16, base_method=base_method)
    report = compress_model(model, config, CALIBRATION if base_method == "gptq" else None, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, HybridLinear)}
    assert set(layers) == set(dense) and len(layers) == 8
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())  # the dense weights are gone
    for name, layer in layers.items():
        assert layer.rank == 8 and layer.base_bits == 4 and layer.base.dtype == torch.uint8
        error = (layer.dequantized_weight() - dense[name]).norm() / dense[name].norm()
        assert error < 0.2, (name, error)  # int4 g16 + a rank-8 correction: close to the dense weight
    assert all(0 < row.rel_error < 0.2 and row.bytes_after < row.bytes_before for row in report.layers)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_the_correction_removes_error_the_base_leaves():
    """Same int2 base, rank 1 vs rank 32: the larger correction must fit the dense weight better."""
    errors = []
    for rank in (1, 32):
        model = make_tiny_gpt2()
        weight = dense_weight(model.transformer.h[0].mlp.c_fc).detach().clone()
        config = LowRankConfig(rank=rank, bits=None, base_bits=2, base_group_size=16, base_method="rtn")
        compress_model(model, config, progress=False)
        errors.append((model.transformer.h[0].mlp.c_fc.dequantized_weight() - weight).norm().item())
    assert errors[1] < 0.8 * errors[0]


def test_save_and_load_through_both_loaders_give_identical_logits(tmp_path):
    model = make_tiny_gpt2()
    config = LowRankConfig(rank=4, bits=4, group_size=16, method="whitened", base_bits=3, base_group_size=16)
    compress_model(model, config, CALIBRATION, progress=False)
    with torch.no_grad():
        expected = model(IDS).logits
    folder = save_compressed(model, tmp_path / "hybrid")
    for loaded in (load_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)):
        layer = loaded.transformer.h[1].attn.c_proj
        assert isinstance(layer, HybridLinear) and layer.base_zero is not None
        assert layer.base_scale.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, expected)


@pytest.mark.parametrize("knobs,message", [
    (dict(rank=4, base_bits=5), "base_bits must be None, 4, 3 or 2"),
    (dict(rank=4, base_bits=4, base_method="awq"), "base_method must be 'gptq' or 'rtn'"),
    (dict(energy=0.9, base_bits=4), "energy is not supported for the hybrid format"),
    (dict(rank=4, base_bits=4, base_group_size=0), "base_group_size must be >= 1"),
])
def test_bad_hybrid_configs_are_refused(knobs, message):
    with pytest.raises(ValueError, match=message):
        LowRankConfig(**knobs)
    with pytest.raises(TypeError, match="base_bits must be an integer"):
        LowRankConfig(rank=4, base_bits="4")


def test_bad_hybrid_combinations_fail_before_any_work():
    model = make_tiny_gpt2()
    with pytest.raises(ValueError, match="base_method='gptq' needs calibration"):
        compress_model(model, LowRankConfig(rank=4, base_bits=4, base_group_size=16), progress=False)
    with pytest.raises(ValueError, match=r"\(base, in_features\).*does not divide the factor width 64"):
        compress_model(model, LowRankConfig(rank=4, base_bits=4, base_group_size=48, base_method="rtn"),
                       progress=False)
    assert not any(isinstance(m, HybridLinear) for m in model.modules())


def test_cli_compress_with_base_bits(tmp_path, capsys):
    source = tmp_path / "tiny"
    tokenizer = tiny_tokenizer()
    make_tiny_gpt2(vocab_size=len(tokenizer)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    argv = ["compress", source, tmp_path / "out", "--base-bits", "4", "--base-group-size", "16", "--rank", "4",
            "--bits", "8", "--calib-samples", "2", "--seq-len", "16"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    loaded = load_compressed(tmp_path / "out")
    layers = [m for m in loaded.modules() if isinstance(m, HybridLinear)]
    assert len(layers) == 8 and all(m.rank == 4 and m.base_group_size == 16 for m in layers)
    # the other commands take a hybrid folder like any compressed one
    capsys.readouterr()
    assert main([str(a) for a in ["eval", source, tmp_path / "out", "--samples", "2", "--seq-len", "16"]]) == 0
    assert "kl" in capsys.readouterr().out.lower()
    assert main([str(a) for a in ["generate", tmp_path / "out", "--prompt", "ab", "--max-new-tokens", "3"]]) == 0
    assert main([str(a) for a in ["bench", tmp_path / "out", "--model", source, "--prompt", "ab",
                                  "--new-tokens", "3"]]) == 0
    assert "tok" in capsys.readouterr().out.lower()
    code = main([str(a) for a in ["compress", source, tmp_path / "out2", "--base-bits", "4"]])
    assert code == 1 and "--base-bits needs the correction's rank" in capsys.readouterr().err


def test_a_version_1_config_cannot_hold_a_hybrid_layer():
    """The hybrid format came with format version 2: a version 1 file claiming one is refused, naming the layer."""
    spec = HybridLinear.from_weights(random_weights(), torch.float32).spec()
    assert TritonLowRankConfig({"h.0.mlp": spec}).format_version == 2
    with pytest.raises(CheckpointError, match=r"layers\['h.0.mlp'\] is format 'hybrid', which format_version 1"):
        TritonLowRankConfig({"h.0.mlp": spec}, format_version=1)
