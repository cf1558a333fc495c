"""metrics, baselines, sweeps: exact on identical models, sensitive to damage; RTN baselines; sweeps."""

import copy
import json

import pytest
import torch
from conftest import TEXT, make_tiny_gpt2, tiny_tokenizer

from triton_lowrank import LowRankConfig
from triton_lowrank.baselines import compress_copy, rtn_baseline
from triton_lowrank.eval_data import sample_sequences, text_windows
from triton_lowrank.formats import dense_weight
from triton_lowrank.metrics import evaluate
from triton_lowrank.sweeps import sweep, write_sweep

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
