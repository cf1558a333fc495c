"""transformers drop-in: registration, from_pretrained, save_pretrained, generate, tied heads, Llama."""

import pytest
import torch
from conftest import make_tiny_gpt2
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from triton_lowrank import (
    LowRankConfig,
    LowRankLinear,
    TritonLowRankConfig,
    compress_model,
    load_compressed,
    mark_compressed,
    save_compressed,
)
from triton_lowrank.checkpoint.hf_quantizer import TritonLowRankHfQuantizer

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35]])


def greedy(model, new_tokens=12, **kwargs):
    return model.generate(
        PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=new_tokens, do_sample=False, **kwargs
    )


def make_tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def loaded_both_ways(folder):
    return [load_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)]


def test_import_registers_config_and_quantizer():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["triton_lowrank"] is TritonLowRankConfig
    assert AUTO_QUANTIZER_MAPPING["triton_lowrank"] is TritonLowRankHfQuantizer
    layer = {"kind": "Linear", "in_features": 64, "out_features": 64, "rank": 8, "bits": 8, "group_size": 128}
    quantizer = TritonLowRankHfQuantizer(TritonLowRankConfig({"proj": {**layer, "bias": True}}))
    assert quantizer.is_serializable() and quantizer.is_compileable and not quantizer.is_trainable


def compressed(model, **config):
    """compress_model at rank 16 unless the test picks rank_ratio."""
    knobs = config if "rank_ratio" in config else {"rank": 16, **config}
    compress_model(model, LowRankConfig(**knobs), progress=False)
    return model


def test_full_rank_unquantized_generate_matches_dense(tmp_path):
    dense = make_tiny_gpt2()
    expected = greedy(dense)
    model = compressed(make_tiny_gpt2(), rank_ratio=1.0, bits=None)  # full rank in every layer
    assert torch.equal(greedy(model), expected)
    for loaded in loaded_both_ways(save_compressed(model, tmp_path / "out")):
        assert torch.equal(greedy(loaded), expected)


@pytest.mark.parametrize("compress_head", [False, True])
def test_gpt2_head_tied_unless_compressed(tmp_path, compress_head):
    model = compressed(make_tiny_gpt2(), bits=8, **({"exclude": ()} if compress_head else {}))
    expected = greedy(model)
    folder = save_compressed(model, tmp_path / "out")
    for loaded in loaded_both_ways(folder):
        wte = loaded.transformer.wte.weight
        if compress_head:
            assert isinstance(loaded.lm_head, LowRankLinear) and not loaded.config.tie_word_embeddings
        else:
            assert loaded.lm_head.weight is wte  # one tensor: resizing or editing the embedding moves both
        assert torch.equal(greedy(loaded), expected)


@pytest.mark.parametrize("mark_again", [False, True])
def test_save_pretrained_straight_after_compress(tmp_path, mark_again):
    model = compressed(make_tiny_gpt2(), bits=4, group_size=32)  # compress_model attaches the quantizer
    if mark_again:
        mark_compressed(model)
    model.save_pretrained(tmp_path / "a")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    reloaded.save_pretrained(tmp_path / "b")  # a loaded model saves again, with its quantizer attached
    with torch.no_grad():
        expected = model(PROMPT).logits
        for loaded in (reloaded, *loaded_both_ways(tmp_path / "b")):
            assert torch.equal(loaded(PROMPT).logits, expected)


def test_llama_round_trip_and_generate(tmp_path):
    model = compressed(make_tiny_llama(), bits=8)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    expected = greedy(model)
    with torch.no_grad():
        logits = model(PROMPT).logits
    folder = save_compressed(model, tmp_path / "llama")
    kinds = {spec["kind"] for spec in model.config.quantization_config.layers.values()}
    assert kinds == {"Linear"}
    for loaded in loaded_both_ways(folder):
        with torch.no_grad():
            assert torch.equal(loaded(PROMPT).logits, logits)
        assert torch.equal(greedy(loaded), expected)


def test_llama_full_rank_generate_matches_dense():
    expected = greedy(make_tiny_llama())
    assert torch.equal(greedy(compressed(make_tiny_llama(), rank_ratio=1.0, bits=None)), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_cache_compiled_generate_on_cuda(tmp_path):
    folder = save_compressed(compressed(make_tiny_gpt2(), bits=8), tmp_path / "out")
    for model in (load_compressed(folder, "cuda"), AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")):
        prompt = PROMPT.cuda()
        kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
        eager = model.generate(prompt, **kwargs)
        static = model.generate(prompt, cache_implementation="static", **kwargs)
        assert torch.equal(static, eager)
