"""How tests/data/v1_checkpoint was written: by triton_lowrank at commit 9124327 (format version 1),
before the package layout changed. Kept as a record; it needs that commit's code to run:

    git worktree add /tmp/orig 9124327 && .venv/bin/python tests/data/make_v1_checkpoint.py /tmp/orig OUT
"""

import sys

import torch

code = sys.argv[1]
sys.path[:0] = [code, f"{code}/tests"]
from conftest import make_tiny_gpt2  # noqa: E402

from triton_lowrank import LowRankConfig, compress_model, save_compressed  # noqa: E402

model = make_tiny_gpt2(seed=3)
torch.manual_seed(0)
calib = [torch.randint(0, 128, (2, 16)) for _ in range(4)]
attention = ("*.attn.c_attn", "*.attn.c_proj")
compress_model(model, LowRankConfig(rank=8, bits=8, method="whitened", include=attention), calib, progress=False)
compress_model(model, LowRankConfig(rank=12, bits=4, group_size=32, include=("*.mlp.c_fc",)), progress=False)
compress_model(model, LowRankConfig(rank=6, bits=None, include=("*.mlp.c_proj",)), progress=False)
out = sys.argv[2]
save_compressed(model, out, overwrite=True)
ids = torch.arange(24).view(2, 12) * 5 % 128
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save({"input_ids": ids, "logits": logits}, f"{out}/../v1_checkpoint_logits.pt")
