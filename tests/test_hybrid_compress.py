"""compress_model with the hybrid format W ≈ Q + U·D: a byte budget over bases + corrections, block-by-block
(sequential) calibration vs one pass."""

import re

import pytest
import torch
from conftest import make_tiny_gpt2
from torch import nn

from triton_lowrank import HybridLinear, LowRankConfig, compress_model
from triton_lowrank.core.nbytes import base_bytes, correction_rank_bytes, tensor_bytes
from triton_lowrank.tools.baselines import compressed_bytes, dense_bytes

# A tiny model's calibration: fewer tokens than features is expected here, and warned about elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:calibration saw fewer tokens")
CALIBRATION = [torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(1))]
HELD_OUT = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(2))
HYBRID = dict(bits=8, method="whitened", base_bits=4, base_group_size=16)  # bases alone: 0.375 of fp16 bytes


def hybrid_layers(model) -> dict[str, HybridLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, HybridLinear)}


def compressed(budget: float, **knobs):
    model = make_tiny_gpt2()
    config = LowRankConfig(budget=budget, **(HYBRID | knobs))
    uncalibrated = config.base_method == "rtn" and config.method == "svd"
    report = compress_model(model, config, None if uncalibrated else CALIBRATION, progress=False)
    return model, report


def logits(model, ids=HELD_OUT) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("budget, knobs", [
    (0.42, {}),
    (0.6, {}),
    (0.3, dict(base_bits=2, bits=4, group_size=16)),  # int2 base (zero points), int4 factors
    (0.6, dict(base_method="rtn", method="svd")),  # no calibration at all
])
def test_budget_holds_bases_and_corrections_within_one_rank_step(budget, knobs):
    config = LowRankConfig(budget=budget, **(HYBRID | knobs))
    target = budget * dense_bytes(make_tiny_gpt2(), config)
    model, report = compressed(budget, **knobs)
    layers = hybrid_layers(model)
    assert len(layers) == 8 and report.ranks() == {n: m.rank for n, m in layers.items()}
    stored = compressed_bytes(model)
    assert stored == tensor_bytes(b for m in layers.values() for b in m.buffers())
    largest_step = max(correction_rank_bytes(m.out_features, m.in_features, config.bits, config.group_size)
                       for m in layers.values())
    assert target - largest_step < stored <= target, (stored, target)
    # The ranks are allocated ACROSS layers (not one rank for all), and every layer keeps a correction.
    assert len(set(report.ranks().values())) > 1 and min(report.ranks().values()) >= 1


def test_a_budget_below_the_bases_is_one_clear_error_naming_the_minimum():
    model = make_tiny_gpt2()
    with pytest.raises(ValueError, match=r"below what the int4 bases .* use budget >= 0\.\d+") as caught:
        compress_model(model, LowRankConfig(budget=0.3, **HYBRID), CALIBRATION, progress=False)
    assert not hybrid_layers(model)  # refused before any work
    minimum = float(re.search(r"budget >= ([\d.]+)", str(caught.value)).group(1))
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    shapes = [m.weight.shape[::-1] for m in layers.values()]  # Conv1D weight is [in, out]: shape [out, in]
    bases = sum(base_bytes(o, i, 4, 16) for o, i in shapes)
    rank_one = sum(correction_rank_bytes(o, i, 8, 128) for o, i in shapes)
    dense_fp16 = sum(2 * o * i for o, i in shapes)
    assert minimum == pytest.approx((bases + rank_one) / dense_fp16, abs=1e-4)
    _, report = compressed(minimum)  # the minimum it names is enough: rank 1 everywhere
    assert set(report.ranks().values()) == {1}


def test_more_budget_gives_a_closer_model():
    dense = logits(make_tiny_gpt2())
    errors, ranks = [], []
    for budget in (0.42, 0.6, 0.9):
        model, report = compressed(budget)
        errors.append((logits(model) - dense).square().mean().item())
        ranks.append(sum(report.ranks().values()))
    assert ranks[0] < ranks[1] < ranks[2]
    assert errors[2] < errors[1] < errors[0], errors


@pytest.mark.parametrize("sequential", [True, False])
def test_a_budget_above_full_rank_is_clamped_with_a_warning_at_the_caller(sequential):
    model = make_tiny_gpt2()
    with pytest.warns(UserWarning, match="more than full rank needs") as caught:
        report = compress_model(model, LowRankConfig(budget=5.0, sequential=sequential, **HYBRID), CALIBRATION,
                                progress=False)
    assert all(row.rank == min(row.in_features, row.out_features) for row in report.layers)
    clamped = [w for w in caught if "more than full rank" in str(w.message)]
    assert [w.filename for w in clamped] == [__file__]


def test_energy_stays_refused_for_the_hybrid_format():
    with pytest.raises(ValueError, match="energy is not supported for the hybrid format"):
        LowRankConfig(energy=0.9, **HYBRID)


def dense_round_trip(model) -> nn.Module:
    """The model with every HybridLinear replaced by an nn.Linear holding its dequantized weight Q̂ + U·D."""
    for name, layer in hybrid_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


@pytest.mark.parametrize("knobs", [dict(rank=4), dict(budget=0.5)])
def test_sequential_calibrates_later_blocks_on_the_compressed_ones(knobs):
    models, reports = {}, {}
    for sequential in (True, False):
        models[sequential] = make_tiny_gpt2()
        config = LowRankConfig(sequential=sequential, **(HYBRID | knobs))
        reports[sequential] = compress_model(models[sequential], config, CALIBRATION, progress=False)
    # Ranks come from the dense model's statistics either way (the measuring pass): the same allocation.
    assert reports[True].ranks() == reports[False].ranks()
    weights = {s: {n: m.dequantized_weight() for n, m in hybrid_layers(models[s]).items()} for s in models}
    for name, one_pass in weights[False].items():
        change = ((weights[True][name] - one_pass).norm() / one_pass.norm()).item()
        if name.startswith("transformer.h.0."):  # block 0 sees the dense inputs in both
            assert change < 1e-3, (name, change)
        else:  # block 1 sees block 0's compressed outputs only when sequential
            assert change > 1e-2, (name, change)
    for model in models.values():  # both are working models whose outputs are their stored weights'
        out = logits(model)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, logits(dense_round_trip(model)), rtol=1e-4, atol=1e-4)
