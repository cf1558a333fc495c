import glob
import os

# Without a GPU, Triton kernels run through the interpreter. This must be set before anything
# imports triton (transformers does, through torch._dynamo), or Triton's own library functions
# are compiled for a GPU and the interpreter cannot call them.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def make_tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 64, vocab_size: int = 128) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 small enough for CPU tests; tied embeddings, Conv1D layers."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=vocab_size, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()
