"""Calibration: masked Grams, Ledoit–Wolf shrinkage toward plain SVD, bounded damping, sequential blocks, CLI sizes."""

import math
from collections import OrderedDict

import pytest
import torch
from conftest import make_tiny_gpt2
from test_cli import model_dir, run  # noqa: F401 (model_dir is a fixture)
from test_layers import correlated_inputs
from torch import nn
from transformers import BertConfig, BertModel

from triton_lowrank import LowRankConfig, compress_model
from triton_lowrank.compression.compress import select_layers
from triton_lowrank.compression.sequential import calibrate_blockwise, find_blocks
from triton_lowrank.core.calibration import GramStats, collect_grams
from triton_lowrank.core.factorize import shrinkage_strength, shrunk_gram, whitening_cholesky
from triton_lowrank.core.format import dense_weight


def tiny_bert(layers: int = 2) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=32)
    return BertModel(config).eval()


def stats_of(x: torch.Tensor) -> GramStats:
    stats = GramStats.empty(x.shape[1], x.device)
    stats.add(x)
    return stats


# ----------------------------------------------------------------------------- masking


def test_padding_never_enters_the_gram():
    model = tiny_bert()
    layers = select_layers(model, LowRankConfig(rank=4))
    short, long = torch.randint(1, 100, (1, 5)), torch.randint(1, 100, (1, 9))
    padded = torch.zeros(2, 9, dtype=torch.long)
    padded[0, :5], padded[1] = short[0], long[0]
    mask = (torch.arange(9) < torch.tensor([[5], [9]])).long()  # [2, 9]
    masked = collect_grams(model, layers, [{"input_ids": padded, "attention_mask": mask}], progress=False)
    separate = collect_grams(model, layers, [short, long], progress=False)
    for name in layers:
        if name == "pooler.dense":  # one (CLS) row per sequence, padded or not
            assert masked[name].tokens == separate[name].tokens == 2
            continue
        assert masked[name].tokens == separate[name].tokens == 14
        torch.testing.assert_close(masked[name].gram, separate[name].gram, rtol=1e-4, atol=1e-4)
        assert masked[name].sum_norm4 == pytest.approx(separate[name].sum_norm4, rel=1e-4)


def test_report_shows_the_real_tokens_each_layer_saw():
    model = tiny_bert(layers=1)
    ids = torch.randint(1, 100, (4, 12))
    mask = torch.ones_like(ids)
    mask[:, 7:] = 0  # 28 real tokens of 48 positions
    with pytest.warns(UserWarning, match="fewer tokens than input features"):
        report = compress_model(model, LowRankConfig(rank=4, method="whitened"),
                                [{"input_ids": ids, "attention_mask": mask}], progress=False)
    tokens = {row.name: row.calib_tokens for row in report.layers}
    assert tokens["pooler.dense"] == 4
    assert {t for n, t in tokens.items() if n != "pooler.dense"} == {28}
    assert "calib tokens" in str(report)
    plain = compress_model(tiny_bert(layers=1), LowRankConfig(rank=4), progress=False)
    assert all(row.calib_tokens is None for row in plain.layers)


# ----------------------------------------------------------------------------- shrinkage


def test_ledoit_wolf_strength_follows_the_tokens_per_feature():
    generator = torch.Generator().manual_seed(0)
    isotropic = torch.randn(16, 128, generator=generator)  # 16 tokens for 128 features: S is mostly noise
    assert shrinkage_strength(stats_of(isotropic)) > 0.8
    alphas = [shrinkage_strength(stats_of(correlated_inputs(n, 64, seed=3))) for n in (32, 256, 4096)]
    assert alphas[0] > alphas[1] > alphas[2]
    assert alphas[2] < 0.02  # 64 tokens per feature: the Gram is kept nearly as measured


def test_shrinkage_one_is_plain_svd_and_zero_is_the_raw_gram():
    x = correlated_inputs(40, 24, seed=2)
    stats = stats_of(x)
    raw, alpha = shrunk_gram(stats, 0.0)
    assert alpha == 0.0
    torch.testing.assert_close(raw, (x.t() @ x).double() / 40)  # accumulated in float32
    identity, _ = shrunk_gram(stats, 1.0)
    torch.testing.assert_close(identity, torch.eye(24, dtype=torch.float64) * raw.diagonal().mean())

    def compressed(method, shrinkage):
        torch.manual_seed(1)
        holder = nn.Sequential(OrderedDict(layer=nn.Linear(24, 32)))
        config = LowRankConfig(rank=6, bits=None, method=method, shrinkage=shrinkage)
        compress_model(holder, config, [{"input": x}] if method == "whitened" else None, progress=False)
        return dense_weight(holder.layer)

    torch.testing.assert_close(compressed("whitened", 1.0), compressed("svd", 0.0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("decay", [1.0, 0.3])
def test_few_tokens_whitening_degrades_to_plain_svd(decay):
    """16 calibration tokens for 64 features: the raw Gram is singular, and whitening with it fits those 16
    tokens, worse than plain SVD on held-out inputs. With Ledoit–Wolf shrinkage whitening is within 0.5% of
    plain SVD on isotropic inputs (nothing to gain) and better than it when input scales differ (0.3x)."""
    features, rank = 64, 8
    scales = torch.logspace(0, math.log10(decay), features)  # input standard deviations along a random basis
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=torch.Generator().manual_seed(7)))

    def inputs(n: int, seed: int) -> torch.Tensor:
        return (torch.randn(n, features, generator=torch.Generator().manual_seed(seed)) * scales) @ basis.t()

    calib, held_out = inputs(16, 1), inputs(4096, 2)

    def held_out_error(method: str, shrinkage="auto") -> float:
        torch.manual_seed(3)
        layer = nn.Linear(features, 48)
        weight = layer.weight.detach().clone()
        holder = nn.Sequential(OrderedDict(layer=layer))
        config = LowRankConfig(rank=rank, bits=None, method=method, shrinkage=shrinkage)
        compress_model(holder, config, [{"input": calib}] if method == "whitened" else None, progress=False)
        return ((dense_weight(holder.layer) - weight) @ held_out.t()).norm().item()

    plain = held_out_error("svd")
    with pytest.warns(UserWarning, match="16 tokens for 64 features"):
        raw, shrunk = held_out_error("whitened", 0.0), held_out_error("whitened")
    assert raw > 1.03 * plain
    assert shrunk < (1.005 if decay == 1.0 else 1.0) * plain


# ----------------------------------------------------------------------------- damping


def test_cholesky_damping_is_bounded_and_refuses_nan():
    gram = torch.diag(torch.tensor([1.0] * 7 + [-5.0]))  # indefinite: no damping up to 1e-2 (x mean 0.25) helps
    with pytest.raises(ValueError, match="not positive definite even with damping 0.01"):
        whitening_cholesky(gram, 1e-2, "layer")
    with pytest.raises(ValueError, match="damping must be > 0 and finite"):
        whitening_cholesky(torch.eye(8), math.nan, "layer")
    singular = torch.ones(8, 8)  # rank 1: needs damping, gets it
    chol = whitening_cholesky(singular, 1e-2, "layer")
    assert torch.isfinite(chol).all()
    with pytest.raises(ValueError, match="damping must be > 0 and finite"):
        LowRankConfig(rank=4, damping=math.nan)
    with pytest.raises(ValueError, match="shrinkage must be 'heldout', 'auto' or a number in"):
        LowRankConfig(rank=4, shrinkage=1.5)


# ----------------------------------------------------------------------------- sequential


def test_blocks_are_found_in_gpt2_and_bert():
    gpt2 = make_tiny_gpt2()
    assert find_blocks(gpt2, select_layers(gpt2, LowRankConfig(rank=4)))[0] == "transformer.h"
    bert = tiny_bert()
    assert find_blocks(bert, select_layers(bert, LowRankConfig(rank=4)))[0] == "encoder.layer"
    holder = nn.Sequential(OrderedDict(layer=nn.Linear(8, 8)))
    assert find_blocks(holder, select_layers(holder, LowRankConfig(rank=4))) is None


def test_blockwise_visits_one_block_at_a_time_then_the_layers_outside():
    model = tiny_bert(layers=3)
    layers = select_layers(model, LowRankConfig(rank=4))
    seen = []

    def visit(group, stats):
        assert set(stats) == set(group)  # only this group's Gram matrices exist
        seen.append(sorted({".".join(name.split(".")[:3]) if name.startswith("encoder") else name for name in group}))

    ids = torch.randint(1, 100, (4, 30))
    calibrate_blockwise(model, layers, [ids], visit, progress=False, warn=False)
    assert seen == [["encoder.layer.0"], ["encoder.layer.1"], ["encoder.layer.2"], ["pooler.dense"]]


def test_each_block_is_calibrated_on_the_compressed_blocks_before_it():
    model = make_tiny_gpt2(n_layer=2)
    layers = select_layers(model, LowRankConfig(rank=4))
    ids = torch.randint(0, 128, (4, 32))
    dense = collect_grams(model, layers, [ids], progress=False)
    sequential = {}

    def visit(group, stats):
        sequential.update(stats)
        if "transformer.h.0.mlp.c_proj" in group:  # "compress" block 0 by zeroing its MLP output
            group["transformer.h.0.mlp.c_proj"].weight.data.zero_()
            group["transformer.h.0.mlp.c_proj"].bias.data.zero_()

    calibrate_blockwise(model, layers, [ids], visit, progress=False, warn=False)
    block0, block1 = "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"
    torch.testing.assert_close(sequential[block0].gram, dense[block0].gram)
    assert not torch.allclose(sequential[block1].gram, dense[block1].gram, rtol=1e-2)


def test_sequential_equals_one_pass_when_compression_is_exact_and_keeps_the_cache_setting():
    """At full rank without quantization each block is reproduced exactly, so the compressed blocks feed the
    next ones the dense inputs: both schedules see the same Grams and make the same model."""
    ids = torch.randint(0, 128, (4, 32))
    outputs = []
    for sequential in (False, True):
        model = make_tiny_gpt2(n_layer=2)
        assert model.config.use_cache
        config = LowRankConfig(rank=64, bits=None, method="whitened", sequential=sequential)
        with pytest.warns(UserWarning, match="fewer tokens than"):
            report = compress_model(model, config, [ids], progress=False)
        assert model.config.use_cache  # switched off only while block inputs were captured
        assert {row.calib_tokens for row in report.layers} == {128}
        with torch.no_grad():
            outputs.append(model(ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-3, atol=1e-3)


def test_sequential_budget_matches_one_pass_ranks_on_a_dense_measure_pass():
    ids = torch.randint(0, 128, (8, 64))
    ranks = []
    for sequential in (False, True):
        model = make_tiny_gpt2(n_layer=2)
        config = LowRankConfig(budget=0.4, bits=8, method="whitened", sequential=sequential)
        with pytest.warns(UserWarning, match="fewer tokens than"):
            report = compress_model(model, config, (batch for batch in [ids]), progress=False)  # a generator
        ranks.append(report.ranks())
        assert {row.calib_tokens for row in report.layers} == {512}  # both passes saw the batch
    assert ranks[0] == ranks[1]  # the ranks come from the dense model's spectra either way


# ----------------------------------------------------------------------------- CLI sizes


def test_cli_calib_tokens_warns_below_the_recommendation_and_rejects_zero(model_dir, tmp_path, capsys):  # noqa: F811
    code, _, err = run(["compress", model_dir, tmp_path / "bad", "--rank", 4, "--calib-tokens", 0], capsys)
    assert code != 0 and "argument --calib-tokens: must be at least 1, got 0" in err
    code, out, err = run(["compress", model_dir, tmp_path / "out", "--rank", 4, "--calib-tokens", 128], capsys)
    assert code == 0, err
    assert "below the 2,048 recommended" in err  # 8 x the 256 inputs of mlp.c_proj
    assert "calib tokens" in out
