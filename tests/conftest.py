import glob
import os

# Without a GPU, Triton kernels run through the interpreter. This must be set before anything
# imports triton (transformers does, through torch._dynamo), or Triton's own library functions
# are compiled for a GPU and the interpreter cannot call them.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Triton (and our kernels) are now set up for the interpreter. Interpreting every layer of every model test
# would take minutes, so only tests marked `kernels` run the kernels on the CPU; the others run the PyTorch
# reference, through the launcher's one switch (ops.uses_kernels reads TRITON_INTERPRET on every call,
# Triton itself read it at import, above).
import triton_lowrank.kernels.hybrid_matmul  # noqa: E402, F401  (decorated while the interpreter is on)
import triton_lowrank.kernels.lowrank_matmul  # noqa: E402, F401
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "0"


@pytest.fixture(autouse=True)
def kernels_only_where_tested(request, monkeypatch):
    if INTERPRETER and request.node.get_closest_marker("kernels") is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 64, vocab_size: int = 128) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 small enough for CPU tests; tied embeddings, Conv1D layers."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=vocab_size, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.\n"
) * 12
EOT = "<|endoftext|>"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on TEXT in milliseconds; <|endoftext|> is id 0, as make_tiny_gpt2 expects."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT)
