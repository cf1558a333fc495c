"""Tensor-parallel shards of stored layers (sharding.py, what the vLLM plugin loads): each rank's share computes
exactly its part of the full layer, the parts reassemble to the full output, and a shard that cuts a group is
refused. The last test runs the sharded math in two processes joined by gloo, as vLLM's CPU TP would."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from triton_lowrank.core.factors import random_factors
from triton_lowrank.core.reference import lowrank_reference
from triton_lowrank.formats.hybrid.storage import hybrid_reference, random_hybrid_weights
from triton_lowrank.tools.sharding import (
    column_shard_factors,
    column_shard_hybrid,
    row_shard_factors,
    row_shard_hybrid,
    tp_spans,
)

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))


def columns(spans):
    return torch.cat([torch.arange(start, start + size) for start, size in spans])


def test_tp_spans_of_a_fused_qkv_and_of_replicated_kv_heads():
    assert tp_spans([64, 64, 64], 2, 1) == [(32, 32), (96, 32), (160, 32)]
    # 4 ranks, 2 kv heads of 16: k/v parts are shared by rank pairs (vLLM: shard rank = tp_rank // replicas)
    assert tp_spans([64, 32, 32], 4, 3, [16, 16, 16], [3, 1, 1]) == [(48, 16), (80, 16), (112, 16)]
    with pytest.raises(ValueError, match="does not split into 3 equal shards"):
        tp_spans([64], 3, 0)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_column_shards_of_a_fused_layer_are_its_output_columns(bits, tp):
    f = random_factors(64, 3 * 64, 8, bits, group_size=16, dtype=torch.float32)
    full = lowrank_reference(X, f)
    seen = []
    for rank in range(tp):
        spans = tp_spans([64, 64, 64], tp, rank)
        local = column_shard_factors(f, spans)
        assert torch.equal(local.down, f.down)  # replicated
        torch.testing.assert_close(lowrank_reference(X, local), full[:, columns(spans)], rtol=1e-5, atol=1e-5)
        seen.append(columns(spans))
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(3 * 64))


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_row_shards_sum_to_the_full_output_with_the_bias_once(bits):
    f = random_factors(64, 48, 8, bits, group_size=16, dtype=torch.float32)
    parts = [lowrank_reference(X[:, r * 32 : (r + 1) * 32], row_shard_factors(f, (r * 32, 32), r == 0))
             for r in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], lowrank_reference(X, f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base_bits", [4, 3, 2])
def test_hybrid_shards_reassemble(base_bits):
    w = random_hybrid_weights(64, 96, 8, base_bits, base_group_size=16, bits=4, group_size=16, dtype=torch.float32)
    full = hybrid_reference(X, w)
    for rank in range(2):
        spans = tp_spans([96], 2, rank)
        torch.testing.assert_close(hybrid_reference(X, column_shard_hybrid(w, spans)), full[:, columns(spans)],
                                   rtol=1e-5, atol=1e-5)
    parts = [hybrid_reference(X[:, r * 16 : (r + 1) * 16], row_shard_hybrid(w, (r * 16, 16), r == 0))
             for r in range(4)]
    torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-5)


def test_a_shard_that_cuts_a_group_is_refused_naming_the_layer():
    f = random_factors(64, 48, 8, 4, group_size=16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc: .*\[24, 48\) cuts an int4 group of 16"):
        column_shard_factors(f, tp_spans([48], 2, 1), "h.0.mlp.c_fc")
    w = random_hybrid_weights(64, 48, 8, 3, base_group_size=32, bits=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"c_proj: .*cuts a base group of 32"):
        row_shard_hybrid(w, (16, 16), False, "c_proj")


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from triton_lowrank.core.factors import random_factors
    from triton_lowrank.formats.hybrid.storage import hybrid_reference, random_hybrid_weights
    from triton_lowrank.core.reference import lowrank_reference
    from triton_lowrank.tools.sharding import column_shard_factors, row_shard_hybrid, tp_spans

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    fc = random_factors(64, 256, 16, 4, group_size=32, dtype=torch.float32, seed=1)  # column-parallel c_fc
    proj = random_hybrid_weights(256, 64, 8, 3, base_group_size=64, bits=8, dtype=torch.float32, seed=2)  # row
    h = lowrank_reference(x, column_shard_factors(fc, tp_spans([256], world, rank)))  # this rank's 256/world
    y = hybrid_reference(torch.nn.functional.gelu(h), row_shard_hybrid(proj, tp_spans([256], world, rank)[0],
                                                                        rank == 0))
    dist.all_reduce(y)  # the one collective dense TP does for an MLP
    if rank == 0:
        torch.save({"tp": y, "single": hybrid_reference(torch.nn.functional.gelu(lowrank_reference(x, fc)), proj)},
                   sys.argv[1])
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_gloo_processes_reassemble_a_sharded_mlp(tmp_path):
    """c_fc (low rank, int4) column-parallel, c_proj (hybrid, int3 base) row-parallel, one all-reduce: the two
    processes' result is the single process's."""
    script, result = tmp_path / "worker.py", tmp_path / "result.pt"
    script.write_text(WORKER)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(result)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(result)
    torch.testing.assert_close(out["tp"], out["single"], rtol=1e-5, atol=1e-5)
