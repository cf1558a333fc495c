"""shrinkage="heldout" (opt-in; "auto" is the default): Gram halves, α chosen from the grid by held-out error,
never worse than plain SVD on the held-out half; both formats, one pass and block by block."""

import math
from collections import OrderedDict

import pytest
import torch
from conftest import make_tiny_gpt2
from test_calibration import stats_of, tiny_bert
from torch import nn

import triton_lowrank.core.factorize as factorize
from triton_lowrank import LowRankConfig, compress_model
from triton_lowrank.compression.compress import select_layers
from triton_lowrank.core.calibration import GramStats, collect_grams
from triton_lowrank.core.format import dense_weight
from triton_lowrank.formats.lowrank.fit import heldout_error


@pytest.fixture(autouse=True)
def one_thread():
    """Ten small fits per layer are many tiny ops: on a busy 2-core machine a second torch thread made them ~30x
    slower (50 s instead of 1.4 s for the tiny GPT-2 below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def split_stats(*chunks: torch.Tensor) -> GramStats:
    stats = GramStats.empty(chunks[0].shape[1], chunks[0].device, split=True)
    for chunk in chunks:
        stats.add(chunk)
    return stats


def test_halves_alternate_tokens_across_batches_and_add_up():
    x = torch.randn(11, 6, generator=torch.Generator().manual_seed(0))
    stats = split_stats(x[:5], x[5:])  # an odd first batch: the parity runs on over the batches
    even, odd = stats.halves()
    assert (even.tokens, odd.tokens) == (6, 5)
    torch.testing.assert_close(even.gram, x[0::2].t() @ x[0::2])
    torch.testing.assert_close(odd.gram, x[1::2].t() @ x[1::2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(even.gram + odd.gram, stats.gram)
    assert even.sum_norm4 + odd.sum_norm4 == pytest.approx(stats.sum_norm4)
    torch.testing.assert_close(stats.gram, stats_of(x).gram)
    with pytest.raises(ValueError, match="halves were not collected"):
        stats_of(x).halves()


def test_collected_halves_hold_the_real_tokens_and_sum_to_the_full_gram():
    model = tiny_bert(layers=1)
    layers = select_layers(model, LowRankConfig(rank=4))
    ids = torch.randint(1, 100, (2, 9))
    mask = (torch.arange(9) < torch.tensor([[5], [9]])).long()  # 14 real tokens
    batch = [{"input_ids": ids, "attention_mask": mask}]
    with pytest.warns(UserWarning, match="fewer tokens"):
        split = collect_grams(model, layers, batch, progress=False, split=True)
        plain = collect_grams(model, layers, batch, progress=False)
    for name in layers:
        assert plain[name].half is None
        torch.testing.assert_close(split[name].gram, plain[name].gram)
        if name != "pooler.dense":
            even, odd = split[name].halves()
            assert (even.tokens, odd.tokens) == (7, 7)
            torch.testing.assert_close(even.gram + odd.gram, split[name].gram)


def shifted_problem(decay: float, tokens: int = 16, features: int = 64):
    """Few calibration tokens (16 for 64 features): the sample is unlike the inputs of use, where whitening with the
    raw Gram falls well below plain SVD; held-out inputs are drawn from the same distribution, many of them."""
    scales = torch.logspace(0, math.log10(decay), features)
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=torch.Generator().manual_seed(7)))

    def inputs(n: int, seed: int) -> torch.Tensor:
        return (torch.randn(n, features, generator=torch.Generator().manual_seed(seed)) * scales) @ basis.t()

    return inputs(tokens, 1), inputs(4096, 2)


def test_alpha_comes_from_the_grid_and_has_the_least_heldout_error():
    calib, _ = shifted_problem(1.0, tokens=40)
    stats = split_stats(calib)
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    fit_error = heldout_error(weight, LowRankConfig(rank=8, bits=None, method="whitened"), "layer")
    errors = factorize.heldout_errors(stats, fit_error)
    assert set(factorize.HELDOUT_ALPHAS) <= set(errors)
    assert factorize.shrinkage_strength(stats) in errors  # Ledoit–Wolf's α is a candidate too
    alpha = factorize.heldout_shrinkage(stats, fit_error)
    assert errors[alpha] == min(errors.values())
    assert errors[alpha] <= errors[1.0]  # plain SVD (up to scale): never beaten on the held-out half


@pytest.mark.parametrize("decay", [1.0, 0.3])
def test_heldout_picks_a_large_alpha_and_is_no_worse_than_plain_svd(decay, monkeypatch):
    calib, held_out = shifted_problem(decay)
    chosen = []
    original = factorize.heldout_shrinkage
    monkeypatch.setattr(factorize, "heldout_shrinkage", lambda *a: chosen.append(original(*a)) or chosen[-1])
    import triton_lowrank.compression.compress as compress
    monkeypatch.setattr(compress, "heldout_shrinkage", factorize.heldout_shrinkage)

    def held_out_error(method: str, shrinkage) -> float:
        torch.manual_seed(3)
        layer = nn.Linear(64, 48)
        weight = layer.weight.detach().clone()
        holder = nn.Sequential(OrderedDict(layer=layer))
        config = LowRankConfig(rank=8, bits=None, method=method, shrinkage=shrinkage)
        compress_model(holder, config, [{"input": calib}] if method == "whitened" else None, progress=False)
        return ((dense_weight(holder.layer) - weight) @ held_out.t()).norm().item()

    plain = held_out_error("svd", 0.0)
    with pytest.warns(UserWarning, match="16 tokens for 64 features"):
        raw, heldout = held_out_error("whitened", 0.0), held_out_error("whitened", "heldout")
    assert raw > 1.03 * plain
    assert chosen and chosen[0] >= 0.5
    assert heldout <= (1.005 if decay == 1.0 else 1.0) * plain  # isotropic inputs: nothing to gain, within 0.5%


@pytest.mark.parametrize("value", ["Heldout", "held-out", -0.1, 1.5, math.nan, True, "0.5", None])
def test_bad_shrinkage_is_one_clear_error(value):
    with pytest.raises(ValueError, match=r"^LowRankConfig: shrinkage must be 'heldout', 'auto' or a number in "
                                         r"\[0, 1\], got .+$"):
        LowRankConfig(rank=4, shrinkage=value)


def test_auto_stays_the_default_and_heldout_is_chosen_by_name():
    assert LowRankConfig(rank=4).shrinkage == "auto"  # heldout fits each layer ten times more: opt-in
    assert LowRankConfig(rank=4, shrinkage="heldout").shrinkage == "heldout"
    assert LowRankConfig(rank=4, shrinkage=0).shrinkage == 0


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("hybrid", [False, True])
def test_both_formats_choose_alpha_per_layer_once(hybrid, sequential, monkeypatch):
    """One pass and block by block, budget (which measures every layer first): every layer gets its α once, the
    compressed model runs, and shrinkage 1 (plain SVD's metric) gives other weights than the chosen α."""
    import triton_lowrank.compression.compress as compress

    calls = []
    original = compress.heldout_shrinkage
    monkeypatch.setattr(compress, "heldout_shrinkage", lambda *a: calls.append(original(*a)) or calls[-1])
    knobs = dict(base_bits=4, bits=8, budget=0.4) if hybrid else dict(bits=8, budget=0.5)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (4, 32))
    model = make_tiny_gpt2()
    config = LowRankConfig(method="whitened", sequential=sequential, shrinkage="heldout", **knobs)
    report = compress_model(model, config, [ids], progress=False)
    assert len(calls) == len(report.layers)
    assert all(0 <= a <= 1 for a in calls)
    assert all(math.isfinite(row.rel_error) for row in report.layers)
    assert torch.isfinite(model(ids).logits).all()
