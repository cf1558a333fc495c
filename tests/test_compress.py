"""compress_model on whole models: selection, rank modes, memory, errors."""

import gc
import weakref

import pytest
import torch
from conftest import make_tiny_gpt2
from transformers import BertConfig, BertModel

from triton_lowrank import LowRankConfig, LowRankLinear, compress_model
from triton_lowrank.core.format import dense_weight
from triton_lowrank.core.nbytes import lowrank_bytes, tensor_bytes

BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("compress_head", [False, True])
def test_full_rank_gpt2_matches_dense_logits(compress_head):
    model = make_tiny_gpt2()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    wte = model.transformer.wte.weight.detach().clone()
    exclude = () if compress_head else ("lm_head",)
    report = compress_model(model, LowRankConfig(rank=64, bits=None, exclude=exclude), progress=False)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(report.layers) == 8 + compress_head
    assert isinstance(model.lm_head, LowRankLinear) == compress_head
    assert torch.equal(model.transformer.wte.weight, wte)  # the tied embedding itself is untouched
    assert model.config.tie_word_embeddings == (not compress_head)


def test_dense_weights_are_gone_and_bytes_match_report():
    model = make_tiny_gpt2()
    targets = {n: m for n, m in model.named_modules() if n.endswith(BLOCK_LAYERS)}
    refs = {n: weakref.ref(m.weight) for n, m in targets.items()}
    before = model_bytes(model)
    report = compress_model(model, LowRankConfig(rank_ratio=0.25, bits=8), progress=False)
    del targets
    gc.collect()
    assert all(ref() is None for ref in refs.values()), "a dense weight is still alive"
    state = model.state_dict()
    for name in refs:
        assert f"{name}.weight" not in state
        assert state[f"{name}.down"].dtype == torch.int8
    assert model_bytes(model) == before - report.bytes_before + report.bytes_after
    assert report.bytes_after < 0.5 * report.bytes_before


def test_report_prints_a_table_row_per_layer():
    model = make_tiny_gpt2()
    report = compress_model(model, LowRankConfig(rank=8, bits=4, group_size=32), progress=False)
    text = str(report)
    assert all(row.name in text for row in report.layers)
    assert "rel err" in text and "bytes before" in text
    assert all(0 < row.rel_error < 1 for row in report.layers)


def test_rank_ratio_and_energy_pick_the_documented_rank():
    model = make_tiny_gpt2()
    report = compress_model(model, LowRankConfig(rank_ratio=0.3, bits=None), progress=False)
    assert all(row.rank == round(0.3 * min(row.in_features, row.out_features)) for row in report.layers)

    model = make_tiny_gpt2()
    c_fc = model.transformer.h[0].mlp.c_fc
    power = torch.linalg.svdvals(dense_weight(c_fc).detach().double()).pow(2)
    kept = power.cumsum(0) / power.sum()
    expected = int((kept < 0.8).sum()) + 1  # smallest rank keeping 80% of the energy
    compress_model(model, LowRankConfig(energy=0.8, bits=None, include=("*.h.0.mlp.c_fc",)), progress=False)
    assert model.transformer.h[0].mlp.c_fc.rank == expected


def make_uneven_spectrum_model():
    """Layers whose spectra differ a lot, so a budget must be split unevenly to be spent well."""
    model = make_tiny_gpt2(n_embd=64)
    with torch.no_grad():
        for block in model.transformer.h:
            weight = block.mlp.c_fc.weight  # [in, out]; make it nearly rank 4
            weight.copy_(torch.randn(64, 4) @ torch.randn(4, 256) * 0.05 + 1e-4 * torch.randn(64, 256))
    return model


@pytest.mark.parametrize("bits, group_size", [(8, 128), (4, 32), (None, 128)])
@pytest.mark.parametrize("budget", [0.15, 0.4])
def test_budget_hits_byte_target_within_one_rank_step(bits, group_size, budget):
    model = make_uneven_spectrum_model()
    config = LowRankConfig(budget=budget, bits=bits, group_size=group_size)
    report = compress_model(model, config, progress=False)
    layers = dict(model.named_modules())
    factor_bytes = sum(tensor_bytes(layers[row.name].buffers()) for row in report.layers)
    target = budget * sum(2 * row.in_features * row.out_features for row in report.layers)
    steps = [lowrank_bytes(row.in_features, row.out_features, 1, bits, group_size, 4)
             for row in report.layers if row.rank < min(row.in_features, row.out_features)]
    assert factor_bytes <= target
    assert target - factor_bytes < max(steps)
    ranks = report.ranks()
    # The nearly rank-4 layers take their 4 strong components first, and more only once every
    # full-spectrum layer has reached full rank.
    others_full = all(row.rank == min(row.in_features, row.out_features)
                      for row in report.layers if not row.name.endswith("mlp.c_fc"))
    for name in ("transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"):
        assert ranks[name] >= 4 if others_full else ranks[name] == 4


def test_whitened_calibration_accepts_kwargs_batches_with_attention_mask():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=32)
    model = BertModel(config).eval()
    ids = torch.randint(0, 100, (6, 12))  # with the second batch, more tokens than the 64 features
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}, ids[:2]]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with pytest.warns(UserWarning, match="pooler.dense: 8 tokens"):  # the pooler sees one token per sequence
        report = compress_model(model, LowRankConfig(rank=32, bits=None, method="whitened"), batches, progress=False)
    assert len(report.layers) == 7  # q, k, v, attention output, intermediate, output, pooler
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "config_kwargs, error, pattern",
    [
        ({"rank": 65}, ValueError, r"transformer\.h\.0\.attn\.c_attn: rank 65 is out of range"),
        ({"rank": 8, "bits": 4, "group_size": 48}, ValueError, r"transformer\.h\.0\.attn\.c_attn.*group_size 48"),
        ({"rank": 8, "include": ("transformer.h.0.ln_1",)}, TypeError, r"transformer\.h\.0\.ln_1.*LayerNorm"),
        ({"rank": 8, "include": ("nothing.*",)}, ValueError, "no layer matched"),
        ({"rank": 8, "method": "whitened"}, ValueError, "needs calibration"),
    ],
)
def test_bad_input_names_the_layer_and_problem(config_kwargs, error, pattern):
    model = make_tiny_gpt2()
    with pytest.raises(error, match=pattern):
        compress_model(model, LowRankConfig(**config_kwargs), progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules()), "model was half-compressed"


def test_compressing_twice_says_the_model_is_already_compressed():
    model = make_tiny_gpt2()
    compress_model(model, LowRankConfig(rank=8), progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        compress_model(model, LowRankConfig(rank=8), progress=False)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"rank": 0}, "rank must be >= 1"),
        ({"rank": -3}, "rank must be >= 1"),
        ({"rank": 8, "bits": 3}, "bits must be one of"),
        ({"rank": 8, "rank_ratio": 0.5}, "exactly one"),
        ({}, "exactly one"),
        ({"rank_ratio": 1.5}, r"rank_ratio is the fraction kept"),
        ({"energy": 0.0}, "energy is the fraction kept"),
        ({"rank": 8, "method": "pca"}, "method"),
    ],
)
def test_config_rejects_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LowRankConfig(**kwargs)


def test_layer_rejects_rank_out_of_range():
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in, out\)\] = \[1, 16\]"):
        LowRankLinear(16, 32, rank=17, device="meta")


@pytest.mark.parametrize("knob", [{"rank": 8}, {"energy": 0.9}, {"budget": 0.3}])
@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_an_all_zero_layer_compresses_to_zeros_and_takes_no_budget(knob, method):
    model = make_tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight.zero_()
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))  # 512 tokens >= 256 features
    report = compress_model(model, LowRankConfig(**knob, bits=8, method=method), [ids], progress=False)
    row = next(r for r in report.layers if r.name == "transformer.h.0.mlp.c_proj")
    assert row.rel_error == 0.0
    assert torch.count_nonzero(dense_weight(model.transformer.h[0].mlp.c_proj)) == 0
    if "rank" not in knob:
        assert row.rank == 1


def test_whitening_on_too_few_tokens_warns():
    model = make_tiny_gpt2()
    ids = torch.randint(0, 128, (1, 8))  # 8 tokens for 64..256 input features
    with pytest.warns(UserWarning, match="fewer tokens than input features"):
        compress_model(model, LowRankConfig(rank=8, bits=8, method="whitened"), [ids], progress=False)
