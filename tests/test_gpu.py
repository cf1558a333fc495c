"""The GPU checks (bench/gpu_check.sh runs them with `-m gpu`), parametrized by device so they cannot rot: on a
CUDA device at real sizes, torch.compile, CUDA graphs and opcheck; without one, the same tests run the same kernels
through Triton's interpreter (tests/conftest.py, the `kernels` marker) at tiny sizes, in CI. Only CUDA-graph
capture has no CPU counterpart and skips there."""

import time

import pytest
import torch
from triton_lowrank.kernels.configs import Problem, one_launch_config, two_launch_default_config
from triton_lowrank.kernels.launch import launch

from triton_lowrank.core.autotune import Autotuner, default_config
from triton_lowrank.core.factors import round_factors
from triton_lowrank.core.reference import lowrank_reference
from triton_lowrank.formats.hybrid.layer import HybridLinear
from triton_lowrank.formats.hybrid.storage import hybrid_reference, random_hybrid_weights
from triton_lowrank.formats.lowrank.layer import LowRankLinear
from triton_lowrank.formats.lowrank.op import factors_args, lowrank_matmul

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.kernels]
needs_cuda_graphs = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA device")


def sizes(real, tiny):
    """Real sizes on a GPU; tiny ones (same awkwardness: odd widths, small ranks) under the interpreter."""
    return real if ON_GPU else tiny


# (k, n, rank): GPT-2 XL's MLP both ways, a Llama MLP, GPT-2 small's c_attn / tiny shapes with int4 groups of 16
SHAPES = sizes([(1600, 6400, 400), (4096, 11008, 1024), (768, 2304, 96), (6400, 1600, 200)],
               [(48, 80, 12), (80, 48, 5)])
GROUP = sizes(128, 16)
MS = sizes([1, 5, 64, 1000], [1, 5, 33])


def make_layer(k, n, rank, bits, dtype=torch.float16, group_size=GROUP, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    up = torch.randn(n, rank, device=DEVICE, generator=gen) / rank**0.5
    down = torch.randn(rank, k, device=DEVICE, generator=gen) / k**0.5
    bias = torch.randn(n, device=DEVICE, generator=gen)
    return LowRankLinear.from_factors(round_factors(up, down, bias, bits, group_size, dtype), dtype)


def reference(x, layer):
    return lowrank_reference(x, layer.factors())


def assert_close_scaled(y, ref, rel=2e-2):
    """Compare against the output scale (fp16/bf16 output rounding dominates)."""
    assert not torch.isnan(y).any()
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item() + 1e-3, f"max error {err}"


def num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if ON_GPU else 4


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("k,n,rank", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_real_sizes_both_paths(bits, k, n, rank, m):
    layer = make_layer(k, n, rank, bits)
    f = layer.factors()
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    ref = reference(x, layer)
    problem = Problem(m, n, k, rank, bits, GROUP if bits == 4 else 0)
    for fused_max_m in (1 << 30, 0) if m <= 64 else (0,):  # the decode path and the split path
        out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.float16)
        launch(x, f, default_config(problem, num_sms(), interpret=not ON_GPU, fused_max_m=fused_max_m), out)
        assert_close_scaled(out, ref)
    assert_close_scaled(lowrank_matmul(x, f), ref)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k,n,rank", sizes([(1600, 6400, 400), (4096, 11008, 1024)], [(224, 96, 24)]))
def test_decode_repeats_bit_for_bit(k, n, rank, bits):
    """The M = 1 default plan runs phase 1 without a K split (no float atomics, whose order varies between calls):
    a repeated call gives the same bits, and matches the reference."""
    group = sizes(GROUP, 32)  # the decode path's int4 groups are whole 32-column chunks
    layer = make_layer(k, n, rank, bits, group_size=group)
    f = layer.factors()
    problem = Problem(1, n, k, rank, bits, group if bits == 4 else 0)
    config = two_launch_default_config(problem, num_sms())
    assert config.split_k == 1, config
    if ON_GPU:
        assert default_config(problem, num_sms()) == config
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
    outs = []
    for _ in range(3):
        out = torch.full((1, n), float("nan"), device=DEVICE, dtype=torch.float16)
        launch(x, f, config, out)
        outs.append(out)
    assert_close_scaled(outs[0], reference(x, layer))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize("bits,k,n,rank,one", sizes(
    [(8, 576, 1536, 32, True), (4, 256, 1024, 64, True), (4, 768, 3072, 64, False), (None, 256, 1024, 16, True)],
    [(8, 64, 96, 7, True), (4, 64, 96, 16, True), (4, 64, 96, 16, True), (None, 32, 48, 5, True)]))
def test_small_layers_take_one_launch(bits, k, n, rank, one):
    """A small layer's default decode plan (on the GPU) is one launch: 18 KB of int8 `down`, 8 KB of int4, 8 KB of
    float; past the rule (24 KB of int4) the whole-K two-launch plan. One launch matches the reference, as does the
    custom op's own choice."""
    group = sizes(128, 32)  # the decode path's int4 groups are whole 32-column chunks
    layer = make_layer(k, n, rank, bits, group_size=group)
    f = layer.factors()
    problem = Problem(1, n, k, rank, bits, group if bits == 4 else 0)
    config = default_config(problem, num_sms(), interpret=not ON_GPU)
    if ON_GPU:
        assert config.one_launch == one, config
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
    out = torch.full((1, n), float("nan"), device=DEVICE, dtype=torch.float16)
    launch(x, f, one_launch_config(problem), out)
    assert_close_scaled(out, reference(x, layer))
    assert_close_scaled(lowrank_matmul(x, f), reference(x, layer))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_activation_dtypes(dtype):
    k, n, rank = sizes((1024, 4096, 256), (64, 96, 16))
    layer = make_layer(k, n, rank, 8, dtype=dtype)
    for m in sizes((1, 300), (1, 20)):
        x = torch.randn(m, k, device=DEVICE, dtype=dtype)
        assert_close_scaled(lowrank_matmul(x, layer.factors()), reference(x, layer), rel=3e-2)


def test_layer_forward_uses_the_op():
    k, n, rank = sizes((768, 3072, 192), (48, 96, 12))
    layer = make_layer(k, n, rank, 4, group_size=sizes(64, 16))
    x = torch.randn(2, 7, k, device=DEVICE, dtype=torch.float16)
    assert_close_scaled(layer(x), reference(x, layer))


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, sizes(256, 20)])
def test_torch_compile_fullgraph(m):
    k, n, rank = sizes((1600, 6400, 400), (48, 80, 12))
    layer = make_layer(k, n, rank, 8)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    assert_close_scaled(compiled(x), reference(x, layer))


@pytest.mark.slow
def test_torch_compile_dynamic_m():
    k, n, rank = sizes((1024, 4096, 256), (48, 80, 12))
    layer = make_layer(k, n, rank, 8)
    compiled = torch.compile(lambda x: lowrank_matmul(x, layer.factors()) * 2, fullgraph=True, dynamic=True)
    for m in sizes((3, 17, 129), (3, 17)):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
        assert_close_scaled(compiled(x), reference(x, layer) * 2)


@needs_cuda_graphs
@pytest.mark.parametrize("m", [1, 8, 512])
def test_cuda_graph_capture_and_replay(m):
    layer = make_layer(1600, 6400, 400, 8)
    static_x = torch.randn(m, 1600, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside capture, as CUDA graphs require
        layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    for seed in range(3):  # replay repeatedly: the fused workspace must come back zeroed each time
        static_x.copy_(torch.randn(m, 1600, device="cuda", dtype=torch.float16, generator=None) * (seed + 1))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_scaled(static_y, reference(static_x, layer))
    # eager calls on the default stream still agree after the replays
    assert_close_scaled(layer(static_x), reference(static_x, layer))


@needs_cuda_graphs
def test_two_graphs_captured_on_one_stream_replay_in_any_order():
    # The fused path's workspace must belong to each graph: a shared one would be zeroed only by
    # the first graph's captured memset, and graph B replayed first would add onto stale memory.
    layer = make_layer(1600, 6400, 400, 8)
    xs = [torch.randn(1, 1600, device="cuda", dtype=torch.float16) for _ in range(2)]
    graphs, ys = [torch.cuda.CUDAGraph() for _ in range(2)], []
    for graph, x in zip(graphs, xs, strict=True):
        with torch.cuda.graph(graph):  # no warm-up: the workspace is first met inside capture
            ys.append(layer(x))
    for graph in reversed(graphs):
        graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(xs, ys, strict=True):
        assert_close_scaled(y, reference(x, layer))


@needs_cuda_graphs
def test_compile_reduce_overhead_cudagraphs():
    layer = make_layer(1024, 4096, 256, 4, group_size=128)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
        y = compiled(x).clone()
        assert_close_scaled(y, reference(x, layer))


def test_opcheck():
    k, n, rank = sizes((256, 384, 32), (48, 80, 12))
    f = make_layer(k, n, rank, 8).factors()
    for m in (1, sizes(40, 17)):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
        torch.library.opcheck(torch.ops.triton_lowrank.lowrank_matmul.default, factors_args(x, f),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def interpreter_timer(dtype: str):
    """Without a GPU the tuner's candidates are launched through the interpreter, checked, and timed by the clock:
    every candidate the tuner offers must run and be right."""
    torch_dtype = getattr(torch, dtype)

    def timer(p: Problem, config) -> float:
        layer = make_layer(p.k, p.n, p.rank, p.bits, dtype=torch_dtype)
        x = torch.randn(p.m, p.k, dtype=torch_dtype)
        out = torch.full((p.m, p.n), float("nan"), dtype=torch_dtype)
        start = time.perf_counter()
        launch(x, layer.factors(), config, out)
        elapsed = time.perf_counter() - start
        assert_close_scaled(out, reference(x, layer))
        return elapsed * 1e3

    return timer


def test_autotune_fast(tmp_path):
    k, n, rank = sizes((1600, 6400, 400), (48, 80, 12))
    problem = Problem(1, n, k, rank, 8, 0)
    tuner = Autotuner(mode="fast", cache_dir=tmp_path, progress=False,
                      timer=None if ON_GPU else interpreter_timer("float16"))
    config = tuner.tune(problem, "float16")
    layer = make_layer(k, n, rank, 8)
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
    out = torch.empty(1, n, device=DEVICE, dtype=torch.float16)
    assert_close_scaled(launch(x, layer.factors(), config, out), reference(x, layer))
    assert Autotuner(mode="default", cache_dir=tmp_path).lookup(problem, "float16") == config


@pytest.mark.skipif(not ON_GPU, reason="needs a second device to mismatch against")
def test_factors_and_device_errors():
    layer = make_layer(256, 384, 32, 8)
    f = layer.factors()
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    assert_close_scaled(lowrank_matmul(x, f), reference(x, layer))
    with pytest.raises(ValueError, match="cpu"):
        lowrank_matmul(x.cpu(), f)


# ---- the hybrid format: real sizes, every path, torch.compile and CUDA graphs ----
HYBRID_RANK = sizes(32, 4)


def hybrid_layer(k, n, base_bits, rank=HYBRID_RANK, bits=8, dtype=torch.float16, seed=0) -> HybridLinear:
    group = sizes(128 if k % 128 == 0 else 64, 32)  # GPT-2 XL's 1600 takes groups of 64
    return HybridLinear.from_weights(random_hybrid_weights(k, n, rank, base_bits, group, bits, GROUP, dtype,
                                                           seed=seed, device=DEVICE), dtype)


@pytest.mark.parametrize("base_bits", [4, 3, 2])
@pytest.mark.parametrize("k,n", sizes([(4096, 11008), (1600, 6400), (6400, 1600)], [(128, 48), (64, 80)]))
@pytest.mark.parametrize("m", sizes([1, 5, 300], [1, 5, 20]))
def test_hybrid_real_sizes(base_bits, k, n, m):
    layer = hybrid_layer(k, n, base_bits)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    assert_close_scaled(layer(x), hybrid_reference(x, layer.weights()))


@needs_cuda_graphs
@pytest.mark.parametrize("m", [1, 8])
def test_hybrid_cuda_graph_replays_and_compiles(m):
    layer = hybrid_layer(4096, 11008, 4)
    static_x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    for seed in range(3):  # the decode workspace must come back zeroed after every replay
        static_x.copy_(torch.randn(m, 4096, device="cuda", dtype=torch.float16) * (seed + 1))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_scaled(static_y, hybrid_reference(static_x, layer.weights()))
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        assert_close_scaled(compiled(x).clone(), hybrid_reference(x, layer.weights()))
