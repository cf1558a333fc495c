"""Hybrid kernels (kernels/hybrid_matmul.py) against hybrid_reference, on CUDA when present, else the interpreter.

Every path: "cuda-cores" (decode, block_m 1: hybrid_gemv_kernel, M=1), "tensor-cores" (decode, block_m 16)
and "split" (prefill), over base bits, base groups that a K tile divides and that it does not, correction bits,
dtypes, rank 1 and ranks past one rank block, odd output counts, bias or none; outputs NaN-poisoned before launch.
"""

import dataclasses

import pytest
import test_kernels
import torch
from test_kernels import DEVICE
from triton_lowrank.kernels import launch as kernel_launch
from triton_lowrank.kernels import utils as kernel_utils
from triton_lowrank.kernels.configs import TileConfig

from triton_lowrank.core import ops
from triton_lowrank.core.autotune import candidate_configs, default_config, problem_key
from triton_lowrank.core.format import FORMATS
from triton_lowrank.formats.hybrid.op import hybrid_matmul, hybrid_problem_for
from triton_lowrank.formats.hybrid.storage import HybridWeights, hybrid_reference, random_hybrid_weights

pytestmark = pytest.mark.kernels


def make_weights(k, n, rank, base_bits, base_group, bits, group, dtype, bias=True, seed=0) -> HybridWeights:
    return random_hybrid_weights(k, n, rank, base_bits, base_group, bits, group, dtype, bias, seed, DEVICE)


def run_poisoned(x, w, config):
    return test_kernels.run_poisoned(x, w, config, hybrid_matmul)


def assert_close(y, x, w):
    test_kernels.assert_close(y, x, w, hybrid_reference)


CONFIGS = {  # small tiles that still run every loop and tail
    "cuda-cores": TileConfig("decode", 1, 16, 32, 16, split_k=2, num_warps=1, expand_block_r=16, base_block_k=256),
    "tensor-cores": TileConfig("decode", 16, 32, 32, 16, split_k=2),
    "split": TileConfig("split", 16, 32, 32, 16),
}
# (M, K, N, rank): M = 1 (K = 384: a tail after one whole 256-column CUDA-core tile); M past one 16-row block; K
# with a tail after whole tiles; N past the last column block; rank 1; rank past one 16-row rank block; K not a
# multiple of 32 (int3/int2 rows read as bytes); N % 4 != 0 (int8 up_t rows not read as words).
SHAPES = [(1, 96, 40, 5), (1, 384, 64, 2), (1, 96, 37, 3), (3, 64, 48, 1), (19, 128, 72, 33), (2, 40, 24, 3)]


def runnable(path, base_bits, base_group, bits, m, k, n) -> bool:
    """Storable, and on the path's terms: the CUDA-core kernel is M=1 with whole chunks; the decode path's
    int4 correction needs groups of whole 32-column chunks."""
    group = correction_group(n)
    down_row_bytes = k * {8: 1, 4: 0.5, None: 2}[bits]  # the decode path's phase 1 reads 16-byte chunks of `down`
    chunk = 32 if base_bits == 4 else 64  # the CUDA-core kernel's whole chunks; int3 rows of whole 16-byte words
    gemv = m == 1 and k % (128 if base_bits == 3 else chunk) == 0 and base_group % chunk == 0
    return (k % base_group == 0 and (path != "cuda-cores" or gemv)
            and (path == "split" or down_row_bytes % 16 == 0)
            and (bits != 4 or (n % group == 0 and k % group == 0 and (path == "split" or group % 32 == 0))))


def correction_group(n: int) -> int:
    return 16 if n % 32 else 32


CASES = [
    pytest.param(path, base_bits, base_group, bits, m, k, n, rank,
                 id=f"{path}-base{base_bits}g{base_group}-{'fp' if bits is None else f'int{bits}'}-{m}x{k}x{n}r{rank}")
    for path in ("cuda-cores", "tensor-cores", "split")
    for base_bits, base_group in ((4, 32), (3, 32), (2, 64), (3, 8), (2, 16), (3, 128))
    for bits in (8, 4, None)
    for m, k, n, rank in SHAPES
    if runnable(path, base_bits, base_group, bits, m, k, n)
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path,base_bits,base_group,bits,m,k,n,rank", CASES)
def test_matches_reference(path, base_bits, base_group, bits, m, k, n, rank, dtype):
    w = make_weights(k, n, rank, base_bits, base_group, bits, correction_group(n), dtype, bias=rank % 2 == 1,
                     seed=m + rank)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    assert_close(run_poisoned(x, w, CONFIGS[path]), x, w)


@pytest.mark.parametrize("path", ["cuda-cores", "tensor-cores", "split"])
@pytest.mark.parametrize("base_bits", [4, 3, 2])
def test_leading_dims_fp32_and_no_bias(path, base_bits):
    """fp32 activations take the exact (PRECISE) dequantization on CUDA cores; [M, 1, in] inputs."""
    w = make_weights(128, 48, 6, base_bits, 64, 8, 32, torch.float32, bias=False, seed=3)
    m = 1 if path == "cuda-cores" else 5
    x = torch.randn(m, 1, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y = run_poisoned(x, w, CONFIGS[path])
    assert y.shape == (m, 1, 48)
    assert_close(y, x, w)


@pytest.mark.skipif(DEVICE == "cuda", reason="a compiled kernel keeps the flag it was compiled with")
@pytest.mark.parametrize("chunks_first", [True, False])
@pytest.mark.parametrize("base_bits", [4, 3, 2])
def test_base_tiles_loaded_either_way(monkeypatch, chunks_first, base_bits):
    """The gemv's base tiles (int4 through utils.shrink_tile_cc, int3/int2 planes through _zero_point_tile_cc) and x
    tiles loaded directly or through their transpose (utils.TIES_TO_LOWER_DIMENSION flipped): both give the
    reference, K = 384 with a tail after one whole 256-column tile."""
    monkeypatch.setattr(kernel_utils, "TIES_TO_LOWER_DIMENSION", kernel_utils.tl.constexpr(chunks_first))
    w = make_weights(384, 64, 2, base_bits, 64, 8, correction_group(64), torch.float16, seed=base_bits)
    x = torch.randn(1, 384, generator=torch.Generator().manual_seed(2)).half().to(DEVICE)
    assert_close(run_poisoned(x, w, CONFIGS["cuda-cores"]), x, w)


def test_the_correction_and_the_base_both_reach_the_output():
    """A kernel that dropped either term would match a reference without it: make sure it matches neither."""
    w = make_weights(64, 48, 8, 4, 32, 8, 32, torch.float32, seed=4)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y = run_poisoned(x, w, CONFIGS["cuda-cores"])
    no_correction = w._replace(correction=w.correction._replace(up_t=torch.zeros_like(w.correction.up_t)))
    no_base = w._replace(base=torch.full_like(w.base, 0x88))  # every nibble is q = 0
    for wrong in (no_correction, no_base):
        assert (y - hybrid_reference(x, wrong)).abs().max() > 1e-2


@pytest.mark.parametrize("path", ["cuda-cores", "tensor-cores"])
def test_decode_workspace_left_zeroed(path):
    """The last program must re-zero the rank-r workspace and its ticket: a second call would double-count."""
    w = make_weights(64, 48, 20, 4, 32, 8, 32, torch.float16, seed=6)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    first = run_poisoned(x, w, CONFIGS[path])
    second = run_poisoned(x, w, CONFIGS[path])
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert all(not ws.any() for ws in kernel_launch._WORKSPACES.values())


def test_cuda_core_path_needs_no_zeroed_workspace():
    """hybrid_gemv_kernel reads phase 1's per-split partial sums (plain stores into a buffer of their own), not the
    zero-invariant workspace: a call leaves the workspace zero; then, with the partials buffers and the workspace
    NaN-poisoned (an element read but not written first would reach the output), a call with a different input
    still matches the reference and leaves the poisoned workspace untouched."""
    w = make_weights(64, 48, 20, 4, 32, 8, 32, torch.float16, seed=7)
    run_poisoned(torch.randn(1, 64).half().to(DEVICE), w, CONFIGS["tensor-cores"])  # a workspace exists (and is 0)
    workspaces = list(kernel_launch._WORKSPACES.values())
    assert workspaces and all(not ws.any() for ws in workspaces)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(7)).half().to(DEVICE)
    assert_close(run_poisoned(x, w, CONFIGS["cuda-cores"]), x, w)
    assert kernel_launch._PARTIALS, "the CUDA-core path keeps its partial sums in a buffer of its own"
    assert all(not ws.any() for ws in kernel_launch._WORKSPACES.values())
    try:
        for buf in [*kernel_launch._PARTIALS.values(), *workspaces]:
            buf.fill_(float("nan"))
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(8)).half().to(DEVICE)
        assert_close(run_poisoned(x, w, CONFIGS["cuda-cores"]), x, w)
        assert all(ws.isnan().all() for ws in workspaces)
    finally:
        for ws in kernel_launch._WORKSPACES.values():
            ws.zero_()


@pytest.mark.parametrize("rank,split_k,expand_block_r", [
    (5, 3, 16),  # 3 splits of a 4-split block (S < S_BLOCK), one up_t step of 16 rows
    (40, 2, 16),  # one step of 64 rows (next power of two), 24 of them masked
    (70, 5, 16),  # more than 4 row blocks: the loop, 64 rows per step, the last step masked past the rank
    (33, 1, 8),  # one split, a loop of 32-row steps
])
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_core_correction_steps_and_splits(rank, split_k, expand_block_r, bits):
    """The gemv's correction over every up_t step shape (one step, loop) and split count (S_BLOCK > S, S = 1), int8 up_t
    read as words and int4 (the row-block loop); partials NaN-poisoned."""
    for buf in kernel_launch._PARTIALS.values():
        buf.fill_(float("nan"))
    k, n = 384, 64
    w = make_weights(k, n, rank, 4, 32, bits, 32, torch.float16, bias=rank % 2 == 1, seed=rank)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(rank)).half().to(DEVICE)
    config = dataclasses.replace(CONFIGS["cuda-cores"], split_k=split_k, expand_block_r=expand_block_r)
    assert_close(run_poisoned(x, w, config), x, w)


def test_default_configs_are_launchable():
    """Heuristic configs (interpreter and real GPU sizes) give correct results on small problems too."""
    for m, base_bits in ((1, 4), (1, 3), (4, 2), (40, 4)):
        w = make_weights(64, 96, 12, base_bits, 32, 8, 32, torch.float16, seed=m)
        x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
        problem = hybrid_problem_for(w, m, x.element_size())
        for config in {default_config(problem, interpret=DEVICE == "cpu"), default_config(problem)}:
            assert_close(run_poisoned(x, w, config), x, w)


def test_gemv_config_refused_where_it_cannot_run():
    w = make_weights(64, 48, 4, 3, 32, 8, 32, torch.float16)
    x = torch.randn(1, 64).half().to(DEVICE)
    with pytest.raises(ValueError, match="block_m 1 needs M=1, in and base_group_size multiples of 64 for base_bits=3"):
        hybrid_matmul(x, w, config=CONFIGS["cuda-cores"])


def test_custom_op_passes_opcheck_and_compiles_fullgraph():
    """The op's schema and fake, so torch.compile(fullgraph=True) sees one opaque node (CPU, interpreter)."""
    w = make_weights(64, 48, 4, 4, 32, 8, 32, torch.float16, seed=7)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7)).half().to(DEVICE)
    c = w.correction
    args = (x, w.base, w.base_scale, w.base_zero, w.base_bits, w.base_group_size, c.down, c.down_scale, c.up_t,
            c.up_t_scale, c.bits, c.group_size, w.bias)
    torch.library.opcheck(torch.ops.triton_lowrank.hybrid_matmul.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    compiled = torch.compile(lambda t: hybrid_matmul(t, w) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), hybrid_matmul(x, w) * 2)
    assert_close(hybrid_matmul(x, w), x, w)


def test_autotune_keys_carry_the_base():
    """Two layers that differ only in their base must not share a tuned config."""
    keys = {problem_key(hybrid_problem_for(make_weights(64, 48, 4, b, g, 8, 32, torch.float16), 1, 2), "float16")
            for b, g in ((4, 32), (3, 32), (4, 64))}
    plain = problem_key(ops.problem_for(make_weights(64, 48, 4, 4, 32, 8, 32, torch.float16).correction, 1, 2),
                        "float16")
    assert len(keys) == 3 and plain not in keys


def test_hybrid_model_forward_runs_the_kernels_and_matches_the_reference(monkeypatch):
    """Module -> custom op -> kernels: a hybrid-compressed GPT-2's logits through the kernels (interpreted on the CPU)
    equal the reference path's, and the kernels really ran, at decode M (one token) and prefill M."""
    from conftest import make_tiny_gpt2

    from triton_lowrank import LowRankConfig, compress_model

    model = make_tiny_gpt2(n_layer=1, n_embd=32)
    compress_model(model, LowRankConfig(base_bits=4, base_group_size=32, rank=4, bits=8, base_method="rtn"),
                   progress=False)
    model = model.to(DEVICE)
    launches = []
    monkeypatch.setitem(FORMATS, "hybrid", dataclasses.replace(
        FORMATS["hybrid"], launch=lambda *a: launches.append(a) or kernel_launch.launch_hybrid(*a)))
    for length in (1, 20):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length)).to(DEVICE)
        with torch.no_grad(), monkeypatch.context() as patch:
            through_kernels = model(ids).logits
            patch.setattr(ops, "uses_kernels", lambda x: False)
            through_reference = model(ids).logits
        torch.testing.assert_close(through_kernels, through_reference, atol=1e-4, rtol=1e-4)
    assert len(launches) == 8  # c_attn, attn c_proj, c_fc, mlp c_proj; at both lengths


@pytest.mark.parametrize("m,base_bits,base_group", [(1, 4, 64), (1, 3, 64), (1, 2, 64), (24, 3, 64), (5, 3, 128),
                                                    (5, 2, 128)])
def test_every_tuning_candidate_is_correct(m, base_bits, base_group):
    """Whatever the autotuner picks must be right: every "max" candidate of a small problem, against the reference
    (groups of 128: the int3 tensor-core tiles of 128 columns that read codes by column phase)."""
    w = make_weights(256, 64, 8, base_bits, base_group, 8, 32, torch.float16, seed=m)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
    candidates = candidate_configs(hybrid_problem_for(w, m, 2), "max")
    assert len(candidates) > 3 and any(c.block_m == 1 for c in candidates) == (m == 1)
    for config in candidates:
        assert_close(run_poisoned(x, w, config), x, w)


def test_non_contiguous_base_is_refused_not_misread():
    w = make_weights(64, 48, 4, 4, 32, 8, 32, torch.float16)
    strided = torch.empty(w.base.shape[1], w.base.shape[0], dtype=torch.uint8, device=DEVICE).t()  # [out, in/2] view
    strided.copy_(w.base)
    x = torch.randn(1, 64).half().to(DEVICE)
    with pytest.raises(ValueError, match="base must be contiguous"):
        hybrid_matmul(x, w._replace(base=strided))


# The int4 base in quarters (hybrid_tile_kernel, fp16 x, K tiles of >= 64 columns dividing the base group, M tiles of
# up to 32 rows): the tile read as 32-bit words, each word's nibbles made fp16 by the magic number 0x6400
# (int4_quarters_fp16), x split into the matching column quarters; "split-m64": 64-row M tiles, which take the halves
# (int4_halves_fp16) at the same K tiles. Outputs NaN-poisoned, random non-zero weights and x, hybrid_reference with
# the dtype's (atol, rtol). (M, K, N): M = 1 and M = 16 (one whole 16-row block), M = 19 (a partial second block);
# K = 3 tiles (not a power of two); N odd, past the last column block.
QUARTER_CASES = [
    pytest.param(path, block_k, base_group, m, k, n, id=f"{path}-bk{block_k}-g{base_group}-{m}x{k}x{n}")
    for path in ("tensor-cores", "split", "split-m64")
    for block_k, base_group, k in ((64, 64, 192), (64, 128, 384), (128, 128, 384))
    for m, n in ((1, 37), (16, 72), (19, 45))
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # bf16: the same tiles, not in quarters
@pytest.mark.parametrize("path,block_k,base_group,m,k,n", QUARTER_CASES)
def test_int4_base_in_quarters(path, block_k, base_group, m, k, n, dtype):
    w = make_weights(k, n, 3, 4, base_group, 8, 32, dtype, bias=n % 2 == 1, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + n)).to(dtype).to(DEVICE)
    if path == "split-m64":  # 64-row tiles: the halves (int4_halves_fp16) at the same K tiles
        config = TileConfig("split", 64, 32, block_k, 16)
    else:
        config = dataclasses.replace(CONFIGS[path], block_k=block_k, block_n=64 if path == "tensor-cores" else 32)
    assert_close(run_poisoned(x, w, config), x, w)


@pytest.mark.parametrize("m", [1, 16])
def test_int4_base_in_quarters_is_exact(m):
    """Every nibble value in every lane of a word and every quarter, at unit scales, against integer x: the products'
    sums are integers below 2048, exact in fp16, so the kernel must match the integer result bit for bit (a wrong
    lane, quarter or K permutation, or an inexact magic-number step, moves it by at least 1)."""
    k, n = 192, 40
    codes = torch.arange(n * k, dtype=torch.int64).reshape(n, k) * 7 % 16  # stored q + 8: every value 0..15
    codes[::3] = codes[::3].flip(1)  # the order within the words differs row to row
    w = make_weights(k, n, 2, 4, 64, 8, 32, torch.float16, bias=False, seed=9)
    base = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8)  # column 2j low nibble, 2j + 1 high
    correction = w.correction._replace(up_t=torch.zeros_like(w.correction.up_t))  # no correction term
    w = w._replace(base=base.to(DEVICE), base_scale=torch.ones_like(w.base_scale), correction=correction)
    x = torch.randint(-1, 2, (m, k), generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
    x[:, :8] = 1  # non-zero
    exact = (x.double().cpu() @ (codes - 8).double().t()).half()  # |sums| <= 192 * 8: exact in fp16
    assert exact.abs().max() > 0
    config = dataclasses.replace(CONFIGS["tensor-cores"], block_k=64, block_n=64)
    y = run_poisoned(x, w, config)
    torch.testing.assert_close(y.cpu(), exact, atol=0, rtol=0)
    torch.testing.assert_close(y.cpu(), hybrid_reference(x, w).cpu(), atol=0, rtol=0)
