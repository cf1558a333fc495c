"""The CPU path (core/cpu_kernels.py, formats/hybrid/cpu.py): PyTorch's weight-only int8/int4 kernels on storage
packed once per layer.

Held to the one reference (lowrank_reference / hybrid_reference) for every format, bits and group size:
bf16 activations take the kernels and must agree within ATOL_OF_SCALE x the output's largest value and
RTOL_BF16 (bf16 roundings: the kernels' bf16 scales and intermediate, against the reference's fp32 math rounded
once); fp32 and fp16 activations, and bases the kernels cannot take, run the reference itself: exactly equal.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_gpt2

from triton_lowrank.core import cpu_kernels as cpu_ops
from triton_lowrank.core.factors import random_factors
from triton_lowrank.core.ops import eager_cpu, uses_kernels
from triton_lowrank.core.quant import pack_codes
from triton_lowrank.core.reference import lowrank_reference
from triton_lowrank.formats.hybrid import cpu as hybrid_cpu_module
from triton_lowrank.formats.hybrid.layer import HybridLinear
from triton_lowrank.formats.hybrid.op import hybrid_matmul
from triton_lowrank.formats.hybrid.storage import hybrid_reference, random_hybrid_weights
from triton_lowrank.formats.lowrank.layer import LowRankLinear
from triton_lowrank.formats.lowrank.op import lowrank_matmul
from triton_lowrank.tools.generation_bench import decode_threads, measure_generation, speed_dtype

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
# bf16 keeps 8 significant bits (2^-8 = 0.4%) and the kernels round three times (scales or a bf16 factor copy,
# the rank-r intermediate, the output): within 1.5% of the output's scale, or 2% of the value
ATOL_OF_SCALE, RTOL_BF16 = 1.5e-2, 2e-2

# (in, out, rank): square-ish, M=1-friendly odd widths (int8/float only), rank 1, ranks off the kernels' 16
SHAPES = [(64, 96, 8), (96, 64, 17), (128, 160, 1), (1600, 640, 40)]
ODD_SHAPES = [(33, 47, 5), (7, 5, 1), (65, 130, 16)]  # widths no int4 group divides: float and int8 only
LEADS = [(1,), (3,), (2, 5)]  # M = 1 (decode), a few rows, a batch of sequences


@pytest.fixture(autouse=True)
def cpu_switch(monkeypatch):
    """The layer and op tests go through ops' one switch: a CPU tensor without the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def no_reference(monkeypatch):
    """Where the kernels must run, the reference must not (it would pass every comparison)."""
    def refuse(*args):
        raise AssertionError("the reference ran where the CPU kernels should have")
    monkeypatch.setattr(cpu_ops, "lowrank_reference", refuse)
    monkeypatch.setattr(hybrid_cpu_module, "hybrid_reference", refuse)


def check_close(y: torch.Tensor, expected: torch.Tensor) -> None:
    assert y.dtype == expected.dtype and y.shape == expected.shape
    assert expected.float().abs().max() > 0.1  # the data are not all zero
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(y.float(), expected.float(), atol=ATOL_OF_SCALE * scale, rtol=RTOL_BF16)


def factor_cases():
    for bits, groups in ((None, [128]), (8, [128]), (4, [32, 64, 128, 16, 2])):
        for shape in SHAPES + (ODD_SHAPES if bits != 4 else []):
            for group in groups:
                if bits == 4 and (shape[0] % group or shape[1] % group):
                    continue
                yield pytest.param(bits, group, shape, id=f"bits{bits}-g{group}-{shape[0]}x{shape[1]}r{shape[2]}")


@pytest.mark.parametrize("bits, group_size, shape", list(factor_cases()))
@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_lowrank_matches_the_reference_in_bf16(bits, group_size, shape, lead, no_reference):
    n_in, n_out, rank = shape
    f = random_factors(n_in, n_out, rank, bits, group_size, dtype=BF16, seed=rank + n_in)
    x = torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(1)).to(BF16)
    expected = lowrank_reference(x, f)
    assert not uses_kernels(x)
    check_close(lowrank_matmul(x, f), expected)  # through the custom op and ops' switch
    check_close(cpu_ops.lowrank_cpu(x, f), expected)


def hybrid_cases():
    for base_bits, base_groups in ((4, [32, 64, 128]), (3, [32, 64, 128]), (2, [32, 64, 128])):
        for bits, group in ((None, 128), (8, 128), (4, 32), (4, 16)):
            for base_group in base_groups:
                for shape in ((128, 96, 8), (256, 80, 1), (384, 64, 17)):
                    if base_bits == 4 and shape[0] % base_group or bits == 4 and (shape[0] % group or shape[1] % group):
                        continue
                    yield pytest.param(base_bits, base_group, bits, group, shape,
                                       id=f"base{base_bits}g{base_group}-bits{bits}g{group}-{shape}")


@pytest.mark.parametrize("base_bits, base_group, bits, group_size, shape", list(hybrid_cases()))
@pytest.mark.parametrize("lead", [(1,), (2, 3)], ids=str)
def test_hybrid_matches_the_reference_in_bf16(base_bits, base_group, bits, group_size, shape, lead, no_reference):
    n_in, n_out, rank = shape
    if n_in % base_group:
        pytest.skip("the base group does not divide in")
    w = random_hybrid_weights(n_in, n_out, rank, base_bits, base_group, bits, group_size, dtype=BF16, seed=n_out)
    x = torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(2)).to(BF16)
    expected = hybrid_reference(x, w)
    check_close(hybrid_matmul(x, w), expected)
    check_close(hybrid_cpu_module.hybrid_cpu(x, w), expected)


@pytest.mark.parametrize("base_bits, base_group", [(4, 16), (3, 8), (2, 16), (2, 512)])
def test_hybrid_base_groups_the_int4_kernel_refuses_run_the_reference(base_bits, base_group):
    w = random_hybrid_weights(512, 48, 4, base_bits, base_group, 8, dtype=BF16)
    x = torch.randn(3, 512).to(BF16)
    assert hybrid_cpu_module.hybrid_kernel_takes(w) == (base_group in cpu_ops.INT4_KERNEL_GROUPS)
    expected = hybrid_reference(x, w)
    if hybrid_cpu_module.hybrid_kernel_takes(w):
        check_close(hybrid_matmul(x, w), expected)
    else:
        assert torch.equal(hybrid_matmul(x, w), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_other_dtypes_keep_the_reference_exactly(dtype, bits):
    f = random_factors(64, 96, 8, bits, 32, dtype=dtype)
    x = torch.randn(2, 64).to(dtype)
    assert torch.equal(lowrank_matmul(x, f), lowrank_reference(x, f))
    w = random_hybrid_weights(64, 96, 8, 2, 32, bits, 32, dtype=dtype)
    assert torch.equal(hybrid_matmul(x, w), hybrid_reference(x, w))


def test_empty_input_gives_an_empty_output():
    f = random_factors(64, 96, 8, 8, dtype=BF16)
    assert lowrank_matmul(torch.empty(0, 64, dtype=BF16), f).shape == (0, 96)


def test_int3_and_int2_codes_map_onto_the_int4_kernel_exactly():
    """c - z + 8 stays in the kernel's [0, 15] for every code and zero: the extreme codes and zeros, exact at
    fp32 scales of a power of two (no rounding anywhere but the kernel's own bf16 output)."""
    for base_bits in (3, 2):
        top = 2**base_bits - 1
        w = random_hybrid_weights(64, 32, 1, base_bits, 32, 8, dtype=BF16)
        codes = torch.arange(64).remainder(top + 1).repeat(32, 1).to(torch.uint8)  # every code in every row
        zero = torch.tensor([[0, top]]).repeat(32, 1).to(torch.uint8)  # both extreme zeros
        stored = w._replace(base=pack_codes(codes, base_bits), base_zero=zero, base_scale=torch.full((32, 2), 0.25),
                            correction=w.correction._replace(up_t_scale=torch.zeros_like(w.correction.up_t_scale)),
                            bias=None)
        x = torch.eye(64, dtype=BF16)  # reads the weight back column by column
        y = hybrid_cpu_module.hybrid_cpu(x, stored)  # [64, 32] = weightᵀ
        assert torch.equal(y.float(), stored.base_weight().t())


def test_packing_happens_once_per_layer_and_never_touches_the_state_dict():
    f = random_factors(96, 64, 8, 8, dtype=BF16)
    layer = LowRankLinear.from_factors(f, BF16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 96).to(BF16)
    packs = cpu_ops.PACK_STATS["packs"]
    with torch.no_grad():
        outputs = [layer(x) for _ in range(5)]
    assert cpu_ops.PACK_STATS["packs"] == packs + 1
    assert all(torch.equal(y, outputs[0]) for y in outputs)
    after = layer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(v, cpu_ops.FactorsPack) for v in vars(layer).values())
    assert cpu_ops.factors_pack(layer.factors()).down_kernel is None  # int8 down read in place: no copy


def test_a_changed_or_moved_layer_is_packed_again():
    layer = LowRankLinear.from_factors(random_factors(96, 64, 8, 8, dtype=BF16), BF16)
    other = random_factors(96, 64, 8, 8, dtype=BF16, seed=5)
    x = torch.randn(2, 96).to(BF16)
    with torch.no_grad():
        layer(x)
        packs = cpu_ops.PACK_STATS["packs"]
        layer.load_state_dict(LowRankLinear.from_factors(other, BF16).state_dict())  # copies in place
        check_close(layer(x), lowrank_reference(x, other))
        assert cpu_ops.PACK_STATS["packs"] == packs + 1
        layer.float().to(BF16)  # a round trip through _apply: new bias, same codes
        check_close(layer(x), lowrank_reference(x, other))
        layer.down_scale.mul_(2)  # an in-place change of one scale
        check_close(layer(x), lowrank_reference(x, layer.factors()))


def test_hybrid_layer_packs_once():
    w = random_hybrid_weights(128, 96, 8, 4, 64, 8, dtype=BF16)
    layer = HybridLinear.from_weights(w, BF16)
    x = torch.randn(1, 128).to(BF16)
    packs = cpu_ops.PACK_STATS["packs"]
    with torch.no_grad():
        for _ in range(3):
            check_close(layer(x), hybrid_reference(x, w))
    assert cpu_ops.PACK_STATS["packs"] == packs + 1


def test_inference_mode_tensors_pack_and_run():
    with torch.inference_mode():
        layer = LowRankLinear.from_factors(random_factors(64, 96, 8, 4, 32, dtype=BF16), BF16)
        x = torch.randn(1, 64).to(BF16)
        check_close(layer(x), lowrank_reference(x, layer.factors()))


def test_torch_compile_keeps_the_custom_op_and_its_pack():
    layer = LowRankLinear.from_factors(random_factors(96, 64, 8, 8, dtype=BF16), BF16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 96).to(BF16)
    with torch.no_grad():
        expected = layer(x)
        packs = cpu_ops.PACK_STATS["packs"]
        for _ in range(3):
            assert torch.equal(compiled(x), expected)
    assert cpu_ops.PACK_STATS["packs"] == packs  # the eager call's pack serves the compiled graph


def test_timings_run_dense_and_compressed_in_the_cpu_speed_dtype():
    model = make_tiny_gpt2()  # fp32, as loading.runtime loads on the CPU
    result = measure_generation(model, torch.zeros(1, 3, dtype=torch.long), new_tokens=2, warmup=False)
    assert result["dtype"] == str(speed_dtype("cpu")).removeprefix("torch.")
    assert next(model.parameters()).dtype == torch.float32  # timed on a copy: the caller's model is not cast
    assert speed_dtype("cpu") in (torch.bfloat16, torch.float32) and speed_dtype("cuda") is None


def test_timings_run_at_the_thread_count_asked_and_restore_the_callers(monkeypatch):
    model, prompt = make_tiny_gpt2(), torch.zeros(1, 3, dtype=torch.long)
    before = torch.get_num_threads()
    seen = []
    real_generate = model.generate

    def generate(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    result = measure_generation(model, prompt, new_tokens=2, threads=1, cast=False)
    assert seen == [1, 1] and result["threads"] == 1  # warm-up and timed run both at 1 thread
    assert torch.get_num_threads() == before
    chosen = decode_threads(model, prompt, new_tokens=2)
    assert chosen in (1, before) and torch.get_num_threads() == before
    assert measure_generation(model, prompt, new_tokens=2, warmup=False, cast=False)["threads"] == before


@pytest.mark.slow
def test_the_cpu_benchmark_dry_run_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "bench/cpu_bench.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert written["dry_run"] and written["layer"]["rows"] and len(written["decode"]) == 2
    for case in written["decode"]:
        assert all("kl" in row for row in case["rows"] if row["model"] not in ("dense", "floor (layers stubbed)"))
        assert case["packs_during_timing"] == 0  # packed at the warm-up and quality passes, never while timed


def test_eager_cpu_calls_skip_the_dispatcher_but_meta_and_traced_calls_keep_the_op():
    x = torch.randn(1, 64).to(BF16)
    assert eager_cpu(x) and not eager_cpu(x.to("meta")) and not eager_cpu(x.requires_grad_())
    layer = LowRankLinear(64, 96, 8, bits=8, dtype=BF16, device="meta")
    assert layer(torch.empty(2, 64, dtype=BF16, device="meta")).shape == (2, 96)  # the op's fake
