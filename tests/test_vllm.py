"""Serving through vLLM (triton_lowrank/vllm_plugin.py): greedy tokens identical to our own HF generate.

Runs in .venv-vllm (scripts/setup_vllm.sh) as `.venv-vllm/bin/pytest -m vllm`; skipped where vllm is not
importable. One driver process (tests/vllm_driver.py) starts one vLLM engine per checkpoint:

- the embedded GPT-2 compressed in both formats (its fused c_attn is one stored layer vLLM splits into q/k/v),
  each prompt alone (batch 1) and all prompts at once;
- a random Llama (vLLM merges q/k/v into qkv_proj and gate/up into gate_up_proj: one stored layer per
  sub-matrix, grouped-query k/v), low rank on one rank and hybrid with tensor parallelism 2 on the CPU.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: scripts/setup_vllm.sh makes .venv-vllm")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from triton_lowrank import (  # noqa: E402
    CheckpointError,
    LowRankConfig,
    compress_model,
    embedded_model_path,
    load_compressed,
    save_compressed,
)
from triton_lowrank.tools.vllm_plugin import TritonLowRankVllmConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
NEW_TOKENS = 32
GPT2_PROMPTS = ["ROMEO:", "JULIET: O Romeo", "First Citizen:\nBefore we proceed", "KING HENRY:"]
LOWRANK = LowRankConfig(rank=32, bits=4, group_size=64)
HYBRID = LowRankConfig(rank=16, bits=8, base_bits=3, base_group_size=64, base_method="rtn")
RUNS = [  # name, model, compression, tensor-parallel size
    ("gpt2-lowrank", "gpt2", LOWRANK, 1),
    ("gpt2-hybrid", "gpt2", HYBRID, 1),
    ("llama-lowrank", "llama", LowRankConfig(rank=16, bits=8), 1),
    ("llama-hybrid-tp2", "llama", LowRankConfig(rank=8, bits=4, group_size=32, base_bits=4, base_group_size=64,
                                                base_method="rtn"), 2),
]


def random_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, bos_token_id=0,
                         eos_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def hf_greedy(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = load_compressed(folder, dtype=torch.float32)
    out = []
    for ids in prompts:
        ids = torch.tensor([ids])
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out.append(tokens[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{run name: (HF tokens per prompt, vLLM results)} from one driver process."""
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    prompts = {"gpt2": [tokenizer(p).input_ids for p in GPT2_PROMPTS],
               "llama": [[0, 17, 301, 45], [0, 9], [0, 480, 3, 3, 77, 129, 12], [0, 250, 251]]}
    job, expected = {"max_tokens": NEW_TOKENS, "runs": []}, {}
    for name, kind, config, tp in RUNS:
        model = (AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32) if kind == "gpt2"
                 else random_llama())
        compress_model(model, config, progress=False)
        folder = save_compressed(model, root / name, tokenizer if kind == "gpt2" else None)
        expected[name] = hf_greedy(folder, prompts[kind])
        job["runs"].append({"name": name, "model": str(folder), "dtype": "float32",
                            "max_model_len": 256, "tp": tp, "prompts": prompts[kind]})
    (root / "job.json").write_text(json.dumps(job))
    run = subprocess.run([sys.executable, str(HERE / "vllm_driver.py"), str(root / "job.json"), str(root / "out.json")],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    results = json.loads((root / "out.json").read_text())
    return {name: (expected[name], results[name]) for name in expected}


@pytest.mark.parametrize("mode", ["single", "batch"])
@pytest.mark.parametrize("name", [run[0] for run in RUNS])
def test_vllm_greedy_tokens_match_ours(served, name, mode):
    expected, got = served[name]
    assert all(len(tokens) == NEW_TOKENS for tokens in got[mode])
    assert got[mode] == expected, f"{name} ({mode}): vLLM generated other tokens than our HF generate"


SPEC = {"format": "lowrank", "kind": "Linear", "in_features": 64, "out_features": 64, "bias": False, "rank": 8,
        "bits": 8, "group_size": 128}


def test_the_plugin_is_registered_under_our_quant_method():
    from vllm.model_executor.layers.quantization import get_quantization_config

    assert get_quantization_config("triton_lowrank") is TritonLowRankVllmConfig
    config = TritonLowRankVllmConfig.from_config({"quant_method": "triton_lowrank", "format_version": 2,
                                                   "bits": 8, "group_size": 0, "layers": {"proj": SPEC}})
    assert config.get_name() == "triton_lowrank" and config.specs_for("proj") == [("proj", {**SPEC})]
    assert config.specs_for("other") is None


def test_what_vllm_cannot_serve_is_refused_naming_the_layer():
    layers = {"lm_head": SPEC, "model.layers.0.self_attn.q_proj": SPEC}
    config = TritonLowRankVllmConfig.from_config({"quant_method": "triton_lowrank", "layers": layers})
    with pytest.raises(CheckpointError, match="lm_head: vLLM builds this layer as Module"):
        config.get_quant_method(torch.nn.Module(), ".lm_head")
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.qkv_proj: .*compresses only"):
        config.specs_for("model.layers.0.self_attn.qkv_proj")
