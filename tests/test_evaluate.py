"""metrics, baselines, sweeps: exact on identical models, sensitive to damage; RTN baselines; sweeps."""

import copy
import json

import pytest
import torch
from conftest import TEXT, make_tiny_gpt2, tiny_tokenizer

from triton_lowrank import LowRankConfig
from triton_lowrank.compression.compress import select_layers
from triton_lowrank.core.format import dense_weight
from triton_lowrank.tools.baselines import compress_copy, gptq_baseline, layer_grams, quantized_weight, rtn_baseline
from triton_lowrank.tools.eval_data import sample_sequences, text_windows
from triton_lowrank.tools.metrics import evaluate
from triton_lowrank.tools.sweeps import sweep, write_sweep

SMALL = {"num_samples": 4, "seq_len": 32, "progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_gpt2(vocab_size=len(tokenizer))


def test_identical_models_are_exact_on_sampled_and_text_windows(model, tokenizer):
    for metrics in (
        evaluate(model, copy.deepcopy(model), **SMALL),
        evaluate(model, copy.deepcopy(model), tokenizer, TEXT, **SMALL),
    ):
        assert metrics["kl"] == 0.0
        assert metrics["top1_agreement"] == 1.0
        assert metrics["mse"] == 0.0
        assert metrics["ppl_ratio"] == 1.0
        assert metrics["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert 1.0 < metrics["ppl_dense"] < float("inf")
    assert metrics["source"] == "text" and metrics["tokens"] == 4 * 32


def test_truncated_model_is_measurably_worse(model):
    truncated, _ = compress_copy(model, LowRankConfig(rank=2, bits=None))
    metrics = evaluate(model, truncated, **SMALL)
    assert metrics["kl"] > 1e-4
    assert metrics["top1_agreement"] < 1.0
    assert metrics["cosine"] < 1.0 and metrics["mse"] > 0.0
    assert metrics["ppl_ratio"] != 1.0


def test_sampling_is_seeded_and_leaves_global_rng_alone(model):
    state = torch.get_rng_state()
    a = sample_sequences(model, 3, 16, seed=5, progress=False)
    b = sample_sequences(model, 3, 16, seed=5, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (3, 16) and torch.equal(a, b)
    assert not torch.equal(a, sample_sequences(model, 3, 16, seed=6, progress=False))


def test_text_windows_split_without_overlap(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    windows = text_windows(tokenizer, TEXT, 16)
    assert windows.shape == (len(ids) // 16, 16)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    assert torch.equal(text_windows(tokenizer, TEXT, 16, max_windows=2), windows[[0, -1]])  # spread out
    with pytest.raises(ValueError, match="tokenizer"):
        text_windows(None, TEXT, 16)


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 32)])
def test_rtn_baseline_bytes_and_grid(model, bits, group_size):
    quantized, stored = rtn_baseline(model, bits, group_size)
    # GPT-2 blocks: c_attn [192, 64], attn c_proj [64, 64], c_fc [256, 64], mlp c_proj [64, 256] ([out, in])
    shapes = [(192, 64), (64, 64), (256, 64), (64, 256)] * 2
    if bits == 8:  # 1 byte per weight + one float32 scale per output row
        expected = sum(o * i + 4 * o for o, i in shapes)
    else:  # half a byte per weight + one float32 scale per group of 32 input features
        expected = sum(o * i // 2 + 4 * o * (i // group_size) for o, i in shapes)
    assert stored == expected
    w = dense_weight(quantized.transformer.h[0].mlp.c_fc)  # [256, 64]
    original = dense_weight(model.transformer.h[0].mlp.c_fc)
    assert not torch.equal(w, original) and torch.allclose(w, original, atol=0.02)
    if bits == 8:  # every row is an integer multiple of its scale
        scale = original.abs().amax(dim=1, keepdim=True) / 127
        assert torch.allclose(w / scale, (w / scale).round(), atol=1e-3)
    assert torch.equal(quantized.lm_head.weight, model.lm_head.weight)  # lm_head excluded, like compression


def test_sweep_rows_and_files(model, tmp_path):
    tokens = sample_sequences(model, 4, 32, seed=1, progress=False)
    calibration = [sample_sequences(model, 4, 32, seed=0, progress=False)]
    rows = sweep(model, tokens, calibration, budgets=(0.5,), bits=(8,), group_size=32, progress=False,
                 rtn_bits=(8, 4))
    assert [(r["method"], r["bits"]) for r in rows] == [("svd", 8), ("whitened", 8), ("rtn", 8), ("rtn", 4)]
    for row in rows[:2]:
        assert 0.4 < row["bytes_fraction"] <= 0.5  # the budget is an upper bound, met within rank steps
    paths = write_sweep(rows, tmp_path)
    assert json.loads(paths["json"].read_text()) == rows
    assert paths["csv"].read_text().count("\n") == len(rows) + 1
    assert paths["png"].stat().st_size > 10_000


def test_sweep_rtn_baselines_follow_the_bits_asked_for(model):
    """The RTN baselines used to be int8 and int4 whatever `bits` said."""
    tokens = sample_sequences(model, 2, 16, seed=1, progress=False)
    rows = sweep(model, tokens, [], budgets=(0.5,), methods=("svd",), bits=(4,), group_size=32, progress=False)
    assert [(r["method"], r["bits"]) for r in rows] == [("svd", 4), ("rtn", 4)]


# ----------------------------------------------------------------------------- int3/int2, GPTQ, hybrid families


@pytest.fixture(scope="module")
def wide_model():
    """n_embd 128: every layer's in_features (128 or 512) divides by 128, so int4 g128 and int3 g64 both fit."""
    return make_tiny_gpt2(seed=1, n_embd=128, vocab_size=len(tiny_tokenizer()))


# GPT-2 blocks at n_embd 128, [out, in]: c_attn, attn c_proj, c_fc, mlp c_proj; two blocks
WIDE_SHAPES = [(384, 128), (128, 128), (512, 128), (128, 512)] * 2


@pytest.mark.parametrize("bits, group_size", [(3, 64), (2, 64), (3, 16)])
def test_zero_point_rtn_bytes_and_grid(model, bits, group_size):
    quantized, stored = rtn_baseline(model, bits, group_size)
    shapes = [(192, 64), (64, 64), (256, 64), (64, 256)] * 2
    # bits/8 bytes per weight + a float32 scale and a uint8 zero per group of input features
    assert stored == sum(o * i * bits // 8 + 5 * o * (i // group_size) for o, i in shapes)
    w = dense_weight(quantized.transformer.h[0].mlp.c_fc).view(256, 64 // group_size, group_size)
    original = dense_weight(model.transformer.h[0].mlp.c_fc)
    assert not torch.equal(w.flatten(1), original)
    for group in (w[0, 0], w[17, -1]):  # at most 2^bits distinct values per group
        assert 1 < group.unique().numel() <= 2**bits
    error = (w.flatten(1) - original).abs().mean()
    assert error < (original.abs().mean() if bits == 2 else 0.5 * original.abs().mean())


def test_baseline_bytes_order_at_equal_layers(wide_model):
    stored = {(b, g): rtn_baseline(wide_model, b, g)[1] for b, g in [(8, 128), (4, 128), (4, 64), (3, 64), (2, 64)]}
    assert stored[8, 128] > stored[4, 64] > stored[4, 128] > stored[3, 64] > stored[2, 64]
    weights = sum(o * i for o, i in WIDE_SHAPES)
    assert stored[3, 64] == weights * 3 // 8 + sum(5 * o * i // 64 for o, i in WIDE_SHAPES)
    assert stored[4, 128] == weights // 2 + sum(4 * o * i // 128 for o, i in WIDE_SHAPES)
    # GPTQ stores the same codes, scales and zeros as RTN: equal bytes
    calibration = [sample_sequences(wide_model, 4, 32, seed=0, progress=False)]
    assert gptq_baseline(wide_model, 3, 64, calibration)[1] == stored[3, 64]


def test_gptq_beats_rtn_on_the_calibration_activations(wide_model):
    """GPTQ minimises the output error on the calibration inputs, layer by layer: ‖(W - Ŵ)·Xᵀ‖² = tr(E·G·Eᵀ)."""
    calibration = [sample_sequences(wide_model, 8, 32, seed=0, progress=False)]
    grams = layer_grams(wide_model, calibration)
    layers = select_layers(wide_model, LowRankConfig(budget=1.0))
    assert set(grams) == set(layers) and len(layers) == 8
    for bits, group_size in [(4, 128), (3, 64)]:
        errors = {"rtn": 0.0, "gptq": 0.0}
        for name, module in layers.items():
            w, gram = dense_weight(module).float(), grams[name]  # [out, in], [in, in]
            for method, fitted in (("rtn", quantized_weight(w, bits, group_size)[0]),
                                   ("gptq", quantized_weight(w, bits, group_size, gram)[0])):
                error = w - fitted  # [out, in]
                errors[method] += (error @ gram * error).sum().item()
        assert errors["gptq"] < 0.9 * errors["rtn"], (bits, errors)


def test_baseline_bad_bits_are_one_clear_error(model):
    w = dense_weight(model.transformer.h[0].mlp.c_fc)
    with pytest.raises(ValueError, match="baseline bits must be one of 8, 4, 3 or 2, got 5"):
        quantized_weight(w, 5)
    with pytest.raises(ValueError, match="int8 is round-to-nearest only"):
        quantized_weight(w, 8, 128, torch.eye(64))
    with pytest.raises(ValueError, match="GPTQ baseline bits must be one of 4, 3 or 2"):
        gptq_baseline(model, 8, 128, [])
    with pytest.raises(ValueError, match="needs calibration"):
        gptq_baseline(model, 4, 32)


def test_sweep_every_family(wide_model, tmp_path):
    tokens = sample_sequences(wide_model, 4, 32, seed=1, progress=False)
    calibration = [sample_sequences(wide_model, 8, 32, seed=0, progress=False)]
    rows = sweep(wide_model, tokens, calibration, budgets=(0.3,), methods=("whitened",), bits=(8,), progress=False,
                 rtn_bits=(8, 4, (3, 64), (2, 64)), gptq=(4, (3, 64)), hybrid=((4, 128, 8), (2, 64, 8)))
    assert [r["label"] for r in rows] == [
        "whitened int8 budget 0.3", "RTN int8", "RTN int4 g128", "RTN int3 g64", "RTN int2 g64",
        "GPTQ int4 g128", "GPTQ int3 g64", "hybrid int4 g128 + r8 int8", "hybrid int2 g64 + r8 int8",
    ]
    assert len({tuple(r) for r in rows}) == 1  # every row has every key: one CSV table
    by_label = {r["label"]: r for r in rows}
    for bits, g in [(4, 128), (3, 64)]:  # same storage, same bytes; GPTQ's rounding is better on these tokens
        rtn, gptq = by_label[f"RTN int{bits} g{g}"], by_label[f"GPTQ int{bits} g{g}"]
        assert gptq["weight_bytes"] == rtn["weight_bytes"] and gptq["group_size"] == g
        assert gptq["kl"] < rtn["kl"]
    # a hybrid's bytes are its base's plus its int8 rank-8 factors (codes + one float32 scale per row)
    for base_bits, g in [(4, 128), (2, 64)]:
        hybrid, base = by_label[f"hybrid int{base_bits} g{g} + r8 int8"], by_label[f"RTN int{base_bits} g{g}"]
        factors = sum(8 * (o + i) + 2 * 8 * 4 for o, i in WIDE_SHAPES)
        assert hybrid["weight_bytes"] == base["weight_bytes"] + factors
        assert (hybrid["rank"], hybrid["base_bits"], hybrid["base_group_size"]) == (8, base_bits, g)
        assert hybrid["kl"] < base["kl"]  # the correction pays for its bytes
    assert all(r["kl"] > 0 for r in rows)
    paths = write_sweep(rows, tmp_path)
    assert paths["csv"].read_text().count("\n") == len(rows) + 1
    assert json.loads(paths["json"].read_text()) == rows
