"""transformers' tensor parallelism is refused with one line, never served wrong: its plans shard parameters and
wrap forwards, and our factors are buffers (vLLM shards them properly: test_vllm.py, test_tp_sharding.py)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_tiny_gpt2
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.distributed import DistributedConfig

from triton_lowrank import CheckpointError, LowRankConfig, compress_model, save_compressed
from triton_lowrank.checkpoint.hf_quantizer import refuse_tensor_parallel

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", [DistributedConfig(tp_size=2), DistributedConfig(tp_plan="auto"),
                                    DistributedConfig(tp_plan={"model.layers.*.mlp.up_proj": "colwise"})])
def test_a_tensor_parallel_config_is_refused_in_one_line(config):
    model = make_tiny_gpt2()
    model.config.distributed_config = config
    with pytest.raises(CheckpointError, match="do not support transformers' tensor parallelism") as error:
        refuse_tensor_parallel(model)
    assert "\n" not in str(error.value)


def test_no_distributed_config_or_a_single_rank_loads():
    model = make_tiny_gpt2()
    refuse_tensor_parallel(model)
    model.config.distributed_config = DistributedConfig(tp_size=1)
    refuse_tensor_parallel(model)


# each rank writes its outcome to a file of its own: the two ranks share one stdout pipe, and their lines once arrived
# run together as one
WORKER = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    import triton_lowrank

    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1], distributed_config=DistributedConfig(tp_size=2))
    except triton_lowrank.CheckpointError as error:
        outcome = f"REFUSED {error}"
    else:
        outcome = "LOADED"
    Path(sys.argv[2], f"rank{os.environ['RANK']}.txt").write_text(outcome)
    if dist.is_initialized():
        dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_gloo_processes_loading_with_tp_size_2_are_refused(tmp_path):
    """The real path: torch.distributed.run, gloo, from_pretrained(distributed_config=DistributedConfig(tp_size=2))
    on a compressed Llama (a model with a tensor-parallel plan) refuses on every rank."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    compress_model(model, LowRankConfig(rank=8, bits=8), progress=False)
    folder = save_compressed(model, tmp_path / "llama")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(folder), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert all(o.startswith("REFUSED") and "tensor parallelism (tp_size=2" in o for o in outcomes), outcomes
