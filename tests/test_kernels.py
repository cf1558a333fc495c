"""Kernel correctness against lowrank_reference, on CUDA when present, else the Triton interpreter.

TRITON_INTERPRET must be set before Triton is first imported: triton.jit decides at decoration
time, including for triton.language's own helpers, and importing torch._dynamo (transformers,
torch.compile) imports Triton. So without CUDA the variable has to be set before anything
imports torch: by tests/conftest.py or the shell. It is set here too for a bare run of this
file; if Triton was already imported without it, the module errors with instructions.
"""

import dataclasses
import os
import sys

if "triton" not in sys.modules and not any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(tl.zeros, JITFunction):  # Triton was imported without the interpreter
        raise RuntimeError(
            "tests/test_kernels.py needs the Triton interpreter without CUDA: set TRITON_INTERPRET=1 before "
            "Triton is imported (top of tests/conftest.py, or in the shell)"
        )

import pytest  # noqa: E402
from triton_lowrank.kernels import launch as kernel_launch  # noqa: E402
from triton_lowrank.kernels import utils as kernel_utils  # noqa: E402
from triton_lowrank.kernels.configs import (
    DEFAULT_NUM_SMS,
    TileConfig,
    decode_chunk,
    next_pow2,
    two_launch_default_config,
)

from triton_lowrank.core import ops
from triton_lowrank.core.autotune import candidate_configs, default_config
from triton_lowrank.core.factors import LowRankFactors, random_factors, round_factors  # noqa: E402
from triton_lowrank.core.format import FORMATS  # noqa: E402
from triton_lowrank.core.reference import lowrank_reference  # noqa: E402
from triton_lowrank.formats.lowrank import op as lowrank_op  # noqa: E402
from triton_lowrank.formats.lowrank.layer import LowRankLinear  # noqa: E402
from triton_lowrank.formats.lowrank.op import lowrank_matmul

pytestmark = pytest.mark.kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {  # (atol, rtol) for outputs of magnitude ~1
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 2e-2),
    torch.float32: (1e-4, 1e-4),
}


def make_factors(k, n, rank, bits, group_size, dtype, bias=True, seed=0) -> LowRankFactors:
    """Seeded random factors scaled so y is O(1); quantization gives non-trivial scales."""
    return random_factors(k, n, rank, bits, group_size, dtype, bias, seed, DEVICE)


def reference(x, f):
    return lowrank_reference(x, f)


def run_poisoned(x, f, config, matmul=lowrank_matmul):
    """Launch `matmul` (the op of f's format) into a NaN-filled output: any element the kernel fails to write stays
    NaN."""
    out = torch.full((*x.shape[:-1], f.out_features), float("nan"), dtype=x.dtype, device=x.device)
    y = matmul(x, f, out=out, config=config)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(y).any(), "kernel left output elements unwritten"
    return y


def assert_close(y, x, f, reference_of=lowrank_reference):
    atol, rtol = TOLERANCES[x.dtype]
    torch.testing.assert_close(y.float(), reference_of(x, f).float(), atol=atol, rtol=rtol)


def test_config(path, m, bits=8, split_k=2, lowp=False) -> TileConfig:
    """Small tiles (fast in the interpreter) that still run every loop and tail of the kernels:
    "cuda-cores" is the decode path at block_m = 1 (one program per row of x), "tensor-cores" the decode path
    at block_m = 16 (tl.dot), "split" the prefill path."""
    if path == "cuda-cores":  # phase 1: 2-tile K splits; phase 2: 2 sub-tiles of 16 rows per iteration
        chunk = decode_chunk(bits)
        return TileConfig("decode", 1, 2 * chunk, 2 * chunk, 8, split_k=split_k, num_warps=1, expand_block_r=32)
    if path == "tensor-cores":
        return TileConfig("decode", 16, 32, 32, 16, split_k=split_k, expand_block_r=16)
    return TileConfig("split", 16, 32, 32, 16, expand_lowp=lowp)


test_config.__test__ = False  # a helper, not a test


# (M, K, N, rank): non-powers of two, r=1, M=1, M above one 16-row block, r > K, N; a last column block that is
# partly past N; rank blocks with a tail. The decode path needs 16-byte factor rows (int4: K, N multiples of 32).
SHAPES = [(1, 64, 96, 7), (3, 96, 160, 1), (37, 96, 64, 40), (2, 32, 64, 300)]
ODD_SHAPES = [(1, 44, 80, 7), (5, 36, 20, 3)]  # rows that are not 16-byte multiples: the split path only


@pytest.mark.parametrize("path", ["cuda-cores", "tensor-cores", "split"])
@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,rank", SHAPES)
def test_matches_reference(path, bits, dtype, m, k, n, rank):
    m = min(m, 3) if path == "cuda-cores" else m  # one program per row of x: M > 1 is covered, 37 rows are slow
    group = 32 if path != "split" or k % 64 else 16  # split: 16 < BLOCK exercises the per-element scale gather
    f = make_factors(k, n, rank, bits, group, dtype, bias=rank % 2 == 1, seed=m + rank)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    assert_close(run_poisoned(x, f, test_config(path, m, bits)), x, f)


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("m,k,n,rank", ODD_SHAPES)
def test_odd_feature_counts_take_the_split_path(bits, m, k, n, rank):
    group = 4 if bits == 4 else 0
    f = make_factors(k, n, rank, bits, group, torch.float16, seed=rank)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).half().to(DEVICE)
    config = default_config(ops.problem_for(f, m, 2), interpret=DEVICE == "cpu")
    assert config.path == "split"
    assert_close(run_poisoned(x, f, config), x, f)
    with pytest.raises(ValueError, match="16-byte factor rows"):
        run_poisoned(x, f, test_config("cuda-cores", m, bits))


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("config", [
    test_config("cuda-cores", 1, split_k=1),  # no K split: one program covers K (main loop and K tail)
    test_config("tensor-cores", 20, split_k=1),
    TileConfig("decode", 1, 128, 256, 32, split_k=1, expand_block_r=512, shrink_warps=2),  # tiles past the problem
    test_config("split", 20, lowp=True),  # expand MMA in the activation dtype
    TileConfig("decode", 1, 64, 64, 8, split_k=2, num_warps=1, expand_block_r=8),  # phase 2: one sub-tile per block
], ids=["cuda-cores-no-split", "tensor-cores-no-split", "cuda-cores-big-tiles", "split-lowp",
        "cuda-cores-one-sub-tile"])
def test_config_variants(bits, config):
    m = 20 if config.block_m >= 16 else 2
    f = make_factors(64, 96, 24, bits, 32, torch.float16, seed=3)
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(2)).half().to(DEVICE)
    assert_close(run_poisoned(x, f, config), x, f)


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("blocks", [1, 2])
def test_phase2_blocks_before_wait_either_way(bits, blocks):
    """Phase 2 loads one or two row blocks of up_t before its dependent-launch wait (TileConfig.
    expand_blocks_before_wait; the default goes by bits): the same result either way, over a rank of two iterations
    whose second is partly past R (its block B wholly), so both rotations of the block pipeline and their masks run."""
    config = dataclasses.replace(test_config("cuda-cores", 1, bits, split_k=1), expand_blocks_before_wait=blocks)
    f = make_factors(64, 96, 75, bits, 32, torch.float16, seed=5)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    assert_close(run_poisoned(x, f, config), x, f)
    with pytest.raises(ValueError, match="expand_blocks_before_wait must be 0, 1 or 2"):
        dataclasses.replace(config, expand_blocks_before_wait=3)


def one_launch_test_config(bits, rank, chunks=2, k_chunks=2) -> TileConfig:
    """decode_one_launch_kernel with small tiles: phase 1 in K tiles of `k_chunks` thread chunks (a loop and a tail)."""
    chunk = decode_chunk(bits)
    return TileConfig("decode", 1, chunks * chunk, k_chunks * chunk, next_pow2(rank), num_warps=1, one_launch=True)


# (M, K, N, rank): rank 1 and a rank that is not a power of two (masked rows), one past a power of two, the largest
# the rule takes (128); K with a tail after whole tiles; N past the last column block; M = 2 (one program per row)
ONE_LAUNCH_SHAPES = [(1, 96, 160, 1), (1, 160, 96, 7), (2, 64, 96, 33), (1, 32, 64, 128)]


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n,rank", ONE_LAUNCH_SHAPES)
def test_one_launch_matches_reference(bits, dtype, m, k, n, rank):
    """The small-layer path: one kernel, every program computing all of hidden itself."""
    f = make_factors(k, n, rank, bits, 32, dtype, bias=rank % 2 == 1, seed=rank)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    assert_close(run_poisoned(x, f, one_launch_test_config(bits, rank)), x, f)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_one_launch_is_the_default_for_small_layers_only(bits):
    """The size rule: a small `down` takes one launch at M = 1 (and its default plan matches the reference); a `down`
    past the rule's bytes for its bits (int8 20 KB, float 12 KB, int4 8 KB), or M > 1, keeps the two-launch decode
    path; the tuner still tries one launch wherever it can run."""
    small = ops.problem_for(make_factors(64, 96, 16, bits, 32, torch.float16), 1, 2)
    config = default_config(small)
    assert config.one_launch
    f = make_factors(64, 96, 16, bits, 32, torch.float16, seed=4)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    assert_close(run_poisoned(x, f, config), x, f)
    assert not default_config(dataclasses.replace(small, m=2)).one_launch
    assert not default_config(dataclasses.replace(small, k=4096, rank=64)).one_launch  # 256 KB of int8 `down`
    assert not default_config(dataclasses.replace(small, k=384, rank=64, bits=8)).one_launch  # 24 KB: past 20
    assert not default_config(dataclasses.replace(small, k=576, rank=32, bits=4)).one_launch  # 9 KB of int4: past 8
    assert not default_config(dataclasses.replace(small, k=512, rank=16, bits=None)).one_launch  # 16 KB float
    assert default_config(dataclasses.replace(small, k=512, rank=32, bits=4)).one_launch  # 8 KB of int4
    assert not default_config(dataclasses.replace(small, rank=300)).one_launch  # past ONE_LAUNCH_MAX_RANK
    assert any(c.one_launch and c.block_r >= small.rank for c in candidate_configs(small, "max"))


@pytest.mark.parametrize("whole_tile", [False, True])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_two_launch_default_plan(bits, whole_tile):
    """The default two-launch M = 1 plan, sized as on an H100, runs phase 1 without a K split (plain stores into a
    buffer of its own: no atomics, no ticket; configs.two_launch_default_config). It matches the reference into
    NaN-poisoned outputs, with the partials buffers NaN-poisoned too, and repeats bit for bit. K = 224 ends inside
    the whole-K tile (its masked tail); K = the tile's width is whole tiles (EVEN_K: no tail compiled)."""
    k = 224
    if whole_tile:  # the whole-K tile K = 224 takes: 256 (float), 512 (int8), 1024 (int4) columns
        k = two_launch_default_config(ops.problem_for(make_factors(k, 96, 24, bits, 32, torch.float16), 1, 2),
                                      DEFAULT_NUM_SMS).block_k
    f = make_factors(k, 96, 24, bits, 32, torch.float16, seed=8)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(8)).half().to(DEVICE)
    config = two_launch_default_config(ops.problem_for(f, 1, 2), DEFAULT_NUM_SMS)
    assert not config.one_launch and config.block_m == 1
    assert kernel_launch._phase1_splits(k, config)[1] == 1, config
    assert (k % config.block_k == 0) == whole_tile, config
    for buf in kernel_launch._PARTIALS.values():
        buf.fill_(float("nan"))
    first = run_poisoned(x, f, config)
    assert_close(first, x, f)
    torch.testing.assert_close(run_poisoned(x, f, config), first, atol=0, rtol=0)


@pytest.mark.skipif(DEVICE == "cuda", reason="a compiled kernel keeps the flag it was compiled with")
@pytest.mark.parametrize("chunks_first", [True, False])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_weight_tiles_loaded_either_way(monkeypatch, chunks_first, bits):
    """utils.load_row_chunks and load_chunk_words load weight and x tiles directly or through their transpose, as
    TIES_TO_LOWER_DIMENSION says (CI's Triton one way, the lent GPU image's Triton 3.6 the other). Both ways give the
    reference: the CUDA-core decode path (K tail masked, rows past R masked) and one launch."""
    monkeypatch.setattr(kernel_utils, "TIES_TO_LOWER_DIMENSION", kernel_utils.tl.constexpr(chunks_first))
    f = make_factors(96, 160, 7, bits, 32, torch.float16, seed=9)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(9)).half().to(DEVICE)
    assert_close(run_poisoned(x, f, test_config("cuda-cores", 1, bits)), x, f)
    assert_close(run_poisoned(x, f, one_launch_test_config(bits, 7)), x, f)


def test_one_launch_refuses_a_rank_past_its_rows():
    f = make_factors(64, 96, 9, 8, 32, torch.float16)
    x = torch.randn(1, 64).half().to(DEVICE)
    with pytest.raises(ValueError, match="block_r >= rank"):
        run_poisoned(x, f, one_launch_test_config(8, 8))


@pytest.mark.parametrize("path", ["cuda-cores", "tensor-cores", "split"])
@pytest.mark.parametrize("bits", [8, 4])
def test_leading_dims_and_fp32(path, bits):
    """fp32 activations: IEEE dots, and exact int4 values on CUDA cores (the fp32 tolerance is 1e-4)."""
    f = make_factors(64, 96, 40, bits, 32, torch.float32, seed=4)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)  # [2, 3, K] fp32
    y = run_poisoned(x, f, test_config(path, 6, bits))
    assert y.shape == (2, 3, 96)
    assert_close(y, x, f)


def test_decode_tiles_smaller_than_a_thread_chunk_are_refused():
    f = make_factors(64, 96, 8, 8, 32, torch.float16)
    x = torch.ones(1, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="multiples of 16 columns"):
        lowrank_matmul(x, f, config=TileConfig("decode", 1, 8, 8, 16))


def test_misaligned_activation_rows_are_read_one_column_at_a_time():
    """x rows starting 2 bytes past a 4-byte boundary (a column slice): no paired 32-bit loads of x."""
    f = make_factors(64, 96, 24, 8, 32, torch.float16, seed=7)
    wide = torch.randn(3, 65, generator=torch.Generator().manual_seed(7)).half().to(DEVICE)
    x = wide[:, 1:]  # [3, 64], stride 65
    assert x.data_ptr() % 4 == 2
    assert_close(run_poisoned(x, f, test_config("cuda-cores", 3)), x, f)


@pytest.mark.parametrize("m", [1, 24])
def test_custom_op_with_layer(m):
    """The registered op (default config: decode for m=1, split for m=24) on a LowRankLinear."""
    gen = torch.Generator().manual_seed(5)
    stored = round_factors(torch.randn(48, 6, generator=gen), torch.randn(6, 32, generator=gen) / 6,
                           torch.randn(48, generator=gen), 4, 16, torch.float16)
    layer = LowRankLinear.from_factors(stored, torch.float16).to(DEVICE)
    x = torch.randn(m, 2, 32, generator=gen).half().to(DEVICE)  # [m, 2, K]
    y = layer(x)
    assert y.shape == (m, 2, 48) and y.dtype == torch.float16
    assert_close(y, x, layer.factors())


@pytest.mark.parametrize("path", ["cuda-cores", "cuda-cores-whole-k", "tensor-cores"])
def test_decode_workspace_left_zeroed(path):
    """The atomic plans' last phase-2 program must re-zero the rank-r workspace and its ticket for the next call; the
    CUDA-core plan without a K split stores hidden into a buffer of its own and never touches the workspace."""
    f = make_factors(64, 96, 40, 8, 32, torch.float16, seed=6)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    config = test_config("cuda-cores", 2, split_k=1) if path == "cuda-cores-whole-k" else test_config(path, 2)
    assert (kernel_launch._phase1_splits(64, config)[1] == 1) == (path == "cuda-cores-whole-k")
    for ws in kernel_launch._PARTIALS.values():
        ws.fill_(float("nan"))  # phase 1 writes every element phase 2 reads
    first = run_poisoned(x, f, config)
    second = run_poisoned(x, f, config)  # would double-count if the workspace kept the first sums
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert all(not ws.any() for ws in kernel_launch._WORKSPACES.values())


def test_default_configs_are_launchable():
    """Heuristic configs (interpreter and real GPU sizes) give correct results on small problems too."""
    for m in (1, 4, 9, 300):
        f = make_factors(64, 96, 12, 8, 32, torch.float16, seed=m)
        x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
        problem = ops.problem_for(f, m, x.element_size())
        for config in {default_config(problem, interpret=DEVICE == "cpu"), default_config(problem)}:
            assert_close(run_poisoned(x, f, config), x, f)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    f = make_factors(32, 16, 4, 8, 16, torch.float16).to("cpu")
    x = torch.randn(3, 32).half()
    torch.testing.assert_close(lowrank_matmul(x, f), reference(x, f), atol=0, rtol=0)


# ---- input validation ------------------------------------------------------------------------
def test_rejects_integer_activations():
    f = make_factors(32, 16, 4, 8, 16, torch.float16)
    with pytest.raises(TypeError, match="torch.int32"):
        lowrank_matmul(torch.ones(2, 32, dtype=torch.int32, device=DEVICE), f)


def test_rejects_float_factor_dtype_mismatch():
    f = make_factors(32, 16, 4, None, 16, torch.float16)
    with pytest.raises(TypeError, match="bfloat16"):
        lowrank_matmul(torch.ones(2, 32, dtype=torch.bfloat16, device=DEVICE), f)


@pytest.mark.parametrize("what", ["features", "rank", "scale", "bias"])
def test_rejects_mismatched_shapes(what):
    f = make_factors(32, 16, 4, 8, 16, torch.float16)
    x = torch.ones(2, 32, dtype=torch.float16, device=DEVICE)
    if what == "features":
        x = torch.ones(2, 31, dtype=torch.float16, device=DEVICE)
    elif what == "rank":
        f = f._replace(up_t=f.up_t[:3], up_t_scale=f.up_t_scale[:3])
    elif what == "scale":
        f = f._replace(down_scale=f.down_scale[:2])
    else:
        f = f._replace(bias=f.bias[:5])
    with pytest.raises(ValueError, match="lowrank_matmul"):
        lowrank_matmul(x, f)


def test_rejects_device_mix():
    f = make_factors(32, 16, 4, 8, 16, torch.float16)
    with pytest.raises(ValueError, match="meta"):
        lowrank_matmul(torch.ones(2, 32, dtype=torch.float16, device="meta"), f)


def test_rejects_unknown_factor_container():
    with pytest.raises(TypeError, match="dict"):
        lowrank_matmul(torch.ones(2, 32), {"down": None})


COMPILE_SM90 = r"""
import sys
sys.path.insert(0, "bench")
from sass import compile as sc, problems as sp

# every kernel and branch, specialized as the launcher launches them: decode on CUDA cores and tensor cores,
# split; int8, int4 and float factors; the small layers' one launch
SPECS = (sp.spec(1, 1600, 6400, 8, 400), sp.spec(1, 4096, 11008, 4, 1024), sp.spec(1, 768, 3072, None),
         sp.spec(16, 768, 3072, 4), sp.spec(16, 768, 3072, None), sp.spec(4096, 768, 3072, 8),
         sp.spec(300, 768, 3072, 4), sp.hybrid_spec(1, 768, 3072, 4), sp.hybrid_spec(1, 768, 3072, 3),
         sp.hybrid_spec(1, 768, 3072, 2, bits=4), sp.hybrid_spec(16, 768, 3072, 3, bits=4),
         sp.hybrid_spec(300, 768, 3072, 2, bits=None), *sp.SMALL_PROBLEMS, sp.spec(1, 256, 1024, None, 16))
for s in SPECS:
    for launch in sc.record_launches(s, sp.configs_for(s, False)[0]):
        sc.compile_launch(launch)
print("compiled")
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the CUDA run compiles for the real device anyway")
def test_kernels_compile_for_sm90():
    """The interpreter runs Python, not the compiler: compile the kernels for sm_90 ahead of time
    (no GPU needed) in a subprocess without TRITON_INTERPRET, so GPU-only compile errors show here."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", COMPILE_SM90], env=env, capture_output=True, text=True,
                            timeout=400, cwd=root)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("no ptxas for ahead-of-time compilation")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_non_contiguous_factors_are_refused_not_misread():
    torch.manual_seed(0)
    down, up = torch.randn(8, 32), torch.randn(48, 8)  # up [out, r]: up.t() is a transposed view
    factors = LowRankFactors(down.half(), None, up.t().half(), None, None, None)
    with pytest.raises(ValueError, match="up_t must be contiguous"):
        lowrank_matmul(torch.randn(2, 32, dtype=torch.float16), factors)


def test_empty_batch_returns_an_empty_output():
    torch.manual_seed(0)
    factors = LowRankFactors(torch.randn(8, 32).half(), None, torch.randn(8, 48).half(), None, None, None)
    y = lowrank_matmul(torch.randn(2, 0, 32, dtype=torch.float16), factors)
    assert y.shape == (2, 0, 48)


@pytest.mark.parametrize("bits", [8, 4])
def test_custom_op_passes_opcheck_and_compiles_fullgraph(bits):
    """The op's schema and fake implementation, so torch.compile sees through it (CPU, interpreter)."""
    torch.manual_seed(0)
    stored = round_factors(torch.randn(48, 8), torch.randn(8, 32), torch.randn(48), bits, 16, torch.float32)
    f = LowRankLinear.from_factors(stored, torch.float32).half().factors()
    x = torch.randn(3, 32, dtype=torch.float16)
    args = lowrank_op.factors_args(x, f)
    torch.library.opcheck(torch.ops.triton_lowrank.lowrank_matmul.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    compiled = torch.compile(lambda t: lowrank_matmul(t, f) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), lowrank_matmul(x, f) * 2)


def test_compressed_model_forward_runs_the_kernels_and_matches_the_reference(monkeypatch):
    """Module -> custom op -> kernels: a compressed GPT-2's logits through the kernels (interpreted on
    the CPU) equal the reference path's, and the kernels really ran."""
    from conftest import make_tiny_gpt2

    from triton_lowrank import LowRankConfig, compress_model

    model = make_tiny_gpt2(n_layer=1, n_embd=32)
    compress_model(model, LowRankConfig(rank=8, bits=4, group_size=16), progress=False)
    model = model.to(DEVICE)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    launches = []
    monkeypatch.setitem(FORMATS, "lowrank", dataclasses.replace(
        FORMATS["lowrank"], launch=lambda *a: launches.append(a) or kernel_launch.launch(*a)))
    with torch.no_grad():
        through_kernels = model(ids).logits
        assert len(launches) == 4  # c_attn, attn c_proj, c_fc, mlp c_proj
        monkeypatch.setattr(ops, "uses_kernels", lambda x: False)
        through_reference = model(ids).logits
    torch.testing.assert_close(through_kernels, through_reference, atol=1e-4, rtol=1e-4)
