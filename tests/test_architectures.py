"""Every common decoder architecture, as a user brings it: tiny random configs of gpt2, llama, qwen2, mistral,
phi3, gemma2, opt, gpt_neox and bloom, with widths that are NOT multiples of 128 (48, 80, 96; GQA, fused qkv and
gate_up, untied and tied heads), so the default group sizes must fit each layer.

Each is compressed in both formats with whitened calibration, block by block (sequential), with the default group
sizes and the default exclusion (the output head, found by what it is), then saved and loaded through both loaders
(load_compressed and AutoModelForCausalLM.from_pretrained) with identical logits.
"""

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from triton_lowrank import (
    OUTPUT_HEAD,
    CompressedLinear,
    HybridLinear,
    LowRankConfig,
    LowRankLinear,
    compress_model,
    load_compressed,
    save_compressed,
)
from triton_lowrank.compression.compress import output_head, select_layers
from triton_lowrank.compression.sequential import find_blocks
from triton_lowrank.core.format import compressed_layers

VOCAB = 96
IDS = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
ARCHITECTURES = {
    "gpt2": dict(n_embd=48, n_head=4, n_layer=2, n_positions=64),
    "llama": dict(hidden_size=80, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "mistral": dict(hidden_size=80, intermediate_size=208, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, sliding_window=16),
    "phi3": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=64, original_max_position_embeddings=64),
    "gemma2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=12, max_position_embeddings=64, sliding_window=16),
    "opt": dict(hidden_size=80, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=80,
                max_position_embeddings=64),
    "gpt_neox": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64),
    "bloom": dict(hidden_size=48, n_head=4, n_layer=2),
}
# The base's bit width cycles over the architectures, so each storage (int4 even groups, int3/int2 groups of a
# multiple of 8) meets widths that 128 does not divide.
BASE_BITS = dict(zip(ARCHITECTURES, [4, 3, 2] * 3, strict=True))
FORMATS = {
    "lowrank": lambda arch: LowRankConfig(rank=6, bits=4, method="whitened"),
    "hybrid": lambda arch: LowRankConfig(rank=4, bits=8, method="whitened", base_bits=BASE_BITS[arch]),
}


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **ARCHITECTURES[arch], **IDS)
    return AutoModelForCausalLM.from_config(config).eval()


def calibration(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (4, 24), generator=generator)]


PROMPT = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def compress(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few calibration tokens per feature, on purpose: fast
        return compress_model(model, config, calibration(), progress=False)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compress_save_load_both_loaders(tmp_path, arch, fmt):
    model = tiny(arch)
    config = FORMATS[fmt](arch)
    head = output_head(model)
    layers = select_layers(model, config)
    assert head is not None and head not in layers.values()  # the default exclusion: the head, by identity
    assert find_blocks(model, layers) is not None  # so the whitened fit really runs block by block
    report = compress(model, config)
    kind = LowRankLinear if fmt == "lowrank" else HybridLinear
    stored = compressed_layers(model)
    assert len(report.layers) == len(layers) == len(stored) and all(isinstance(m, kind) for m in stored.values())
    assert output_head(model) is head  # untouched
    for name, layer in stored.items():  # each layer's group sizes divide its widths and are recorded
        spec = layer.spec()
        if spec["bits"] == 4:
            assert spec["in_features"] % spec["group_size"] == 0 and spec["out_features"] % spec["group_size"] == 0
        if fmt == "hybrid":
            assert spec["in_features"] % spec["base_group_size"] == 0
            assert BASE_BITS[arch] == 4 or spec["base_group_size"] % 8 == 0, name
    group = "group_size" if fmt == "lowrank" else "base_group_size"
    assert any(layer.spec()[group] not in (0, 128) for layer in stored.values())  # adapted
    expected = logits(model)
    assert torch.isfinite(expected).all()
    folder = save_compressed(model, tmp_path / arch)
    for loaded in (load_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)):
        assert set(compressed_layers(loaded)) == set(stored)
        assert torch.equal(logits(loaded.eval()), expected)


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])  # untied head not named lm_head (embed_out); tied head
def test_head_compressed_with_empty_exclude(tmp_path, arch):
    model = tiny(arch)
    report = compress(model, LowRankConfig(rank=6, bits=8, method="whitened", exclude=()))
    head = output_head(model)
    assert isinstance(head, CompressedLinear) and any(row.name.endswith("lm_head") for row in report.layers)
    expected = logits(model)
    folder = save_compressed(model, tmp_path / arch)
    for loaded in (load_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)):
        assert isinstance(output_head(loaded), CompressedLinear)
        assert torch.equal(logits(loaded.eval()), expected)


def test_output_head_pattern_combines_with_names():
    model = tiny("llama")
    names = set(select_layers(model, LowRankConfig(rank=4, exclude=(OUTPUT_HEAD, "*.mlp.*"))))
    assert names and not any(".mlp." in n or n == "lm_head" for n in names)
    assert "lm_head" in select_layers(model, LowRankConfig(rank=4, exclude=("*.mlp.*",)))


@pytest.mark.parametrize("config, match", [
    (dict(rank=4, bits=4, group_size=128), r"q_proj \(in_features\): int4 group_size 128 does not divide .* 80"),
    (dict(rank=4, bits=8, base_bits=3, base_group_size=64, base_method="rtn"),
     r"q_proj \(base, in_features\): int3 group_size must be a positive multiple of 8 dividing 80, got 64"),
])
def test_explicit_group_size_that_cannot_work_is_one_clear_error(config, match):
    model = tiny("llama")  # hidden 80
    with pytest.raises(ValueError, match=match) as error:
        compress_model(model, LowRankConfig(**config), progress=False)
    assert "\n" not in str(error.value)
    assert not compressed_layers(model)  # refused before any work
