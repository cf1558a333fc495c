"""GPU-only checks (bench/gpu_check.sh runs them): real sizes, torch.compile, CUDA graphs, opcheck."""

import pytest
import torch
from triton_lowrank.kernels.configs import Problem, default_config
from triton_lowrank.kernels.launch import launch

from triton_lowrank.autotune import Autotuner
from triton_lowrank.factors import round_factors
from triton_lowrank.hybrid_layers import HybridLinear
from triton_lowrank.hybrid_storage import hybrid_reference, random_hybrid_weights
from triton_lowrank.layers import LowRankLinear
from triton_lowrank.ops import factors_args, lowrank_matmul
from triton_lowrank.reference import lowrank_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def make_layer(k, n, rank, bits, dtype=torch.float16, group_size=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    up = torch.randn(n, rank, device="cuda", generator=gen) / rank**0.5
    down = torch.randn(rank, k, device="cuda", generator=gen) / k**0.5
    bias = torch.randn(n, device="cuda", generator=gen)
    return LowRankLinear.from_factors(round_factors(up, down, bias, bits, group_size, dtype), dtype)


def reference(x, layer):
    return lowrank_reference(x, layer.factors())


def assert_close_scaled(y, ref, rel=2e-2):
    """Real sizes: compare against the output scale (fp16/bf16 output rounding dominates)."""
    assert not torch.isnan(y).any()
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item() + 1e-3, f"max error {err}"


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("k,n,rank", [(1600, 6400, 400), (4096, 11008, 1024), (768, 2304, 96), (6400, 1600, 200)])
@pytest.mark.parametrize("m", [1, 5, 64, 1000])
def test_real_sizes_both_paths(bits, k, n, rank, m):
    layer = make_layer(k, n, rank, bits)
    f = layer.factors()
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = reference(x, layer)
    problem = Problem(m, n, k, rank, bits, 128 if bits == 4 else 0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for fused_max_m in (1 << 30, 0) if m <= 64 else (0,):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
        launch(x, f, default_config(problem, sms, fused_max_m=fused_max_m), out)
        assert_close_scaled(out, ref)
    assert_close_scaled(lowrank_matmul(x, layer), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_activation_dtypes(dtype):
    layer = make_layer(1024, 4096, 256, 8, dtype=dtype)
    for m in (1, 300):
        x = torch.randn(m, 1024, device="cuda", dtype=dtype)
        assert_close_scaled(lowrank_matmul(x, layer), reference(x, layer), rel=3e-2)


def test_layer_forward_uses_the_op():
    layer = make_layer(768, 3072, 192, 4, group_size=64)
    x = torch.randn(2, 7, 768, device="cuda", dtype=torch.float16)
    assert_close_scaled(layer(x), reference(x, layer))


@pytest.mark.parametrize("m", [1, 256])
def test_torch_compile_fullgraph(m):
    layer = make_layer(1600, 6400, 400, 8)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(m, 1600, device="cuda", dtype=torch.float16)
    assert_close_scaled(compiled(x), reference(x, layer))


def test_torch_compile_dynamic_m():
    layer = make_layer(1024, 4096, 256, 8)
    compiled = torch.compile(lambda x: lowrank_matmul(x, layer) * 2, fullgraph=True, dynamic=True)
    for m in (3, 17, 129):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        assert_close_scaled(compiled(x), reference(x, layer) * 2)


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


def test_compile_reduce_overhead_cudagraphs():
    layer = make_layer(1024, 4096, 256, 4, group_size=128)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
        y = compiled(x).clone()
        assert_close_scaled(y, reference(x, layer))


def test_opcheck():
    layer = make_layer(256, 384, 32, 8)
    f = layer.factors()
    for m in (1, 40):
        x = torch.randn(m, 256, device="cuda", dtype=torch.float16)
        args = factors_args(x, f)
        torch.library.opcheck(torch.ops.triton_lowrank.lowrank_matmul.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_autotune_fast_on_gpu(tmp_path):
    tuner = Autotuner(mode="fast", cache_dir=tmp_path, progress=False)
    problem = Problem(1, 6400, 1600, 400, 8, 0)
    config = tuner.tune(problem, "float16")
    layer = make_layer(1600, 6400, 400, 8)
    x = torch.randn(1, 1600, device="cuda", dtype=torch.float16)
    out = torch.empty(1, 6400, device="cuda", dtype=torch.float16)
    assert_close_scaled(launch(x, layer.factors(), config, out), reference(x, layer))
    assert Autotuner(mode="default", cache_dir=tmp_path).lookup(problem, "float16") == config


def test_factors_and_device_errors():
    layer = make_layer(256, 384, 32, 8)
    f = layer.factors()
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    assert_close_scaled(lowrank_matmul(x, f), reference(x, layer))
    with pytest.raises(ValueError, match="cpu"):
        lowrank_matmul(x.cpu(), f)


# ---- the hybrid format (issue 10): real sizes, every path, torch.compile and CUDA graphs ----
def hybrid_layer(k, n, base_bits, rank=32, bits=8, dtype=torch.float16, seed=0) -> HybridLinear:
    group = 128 if k % 128 == 0 else 64  # GPT-2 XL's 1600 takes groups of 64
    return HybridLinear.from_weights(random_hybrid_weights(k, n, rank, base_bits, group, bits, 128, dtype,
                                                           seed=seed, device="cuda"), dtype)


@pytest.mark.parametrize("base_bits", [4, 3, 2])
@pytest.mark.parametrize("k,n", [(4096, 11008), (1600, 6400), (6400, 1600)])
@pytest.mark.parametrize("m", [1, 5, 300])
def test_hybrid_real_sizes(base_bits, k, n, m):
    layer = hybrid_layer(k, n, base_bits)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    assert_close_scaled(layer(x), hybrid_reference(x, layer.weights()))


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
