"""Quality of a compressed model against its dense original: both models' next-token distributions on
the same token windows (perplexities, KL(dense || compressed), top-1 agreement, logits cosine, MSE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from triton_lowrank.core.calibration import eval_mode, model_device
from triton_lowrank.tools.eval_data import EVAL_SEED, batches, eval_tokens

METRICS = ("ppl_dense", "ppl_compressed", "ppl_ratio", "kl", "top1_agreement", "cosine", "mse")


@torch.no_grad()
def model_logits(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, progress: bool = False):
    """Float32 logits [B, T, V] per batch of `tokens`, on the CPU."""
    device = model_device(model)
    with eval_mode(model):
        return [
            model(input_ids=batch.to(device)).logits.float().cpu()
            for batch in tqdm(batches(tokens, batch_size), desc="logits", unit="batch", disable=not progress)
        ]


def compare_logits(dense: list[torch.Tensor], compressed: list[torch.Tensor], tokens: torch.Tensor) -> dict:
    """Perplexities, KL(dense || compressed) per token, top-1 agreement, logits cosine and MSE."""
    sums = dict.fromkeys(("nll_dense", "nll_compressed", "kl", "agree", "cosine", "sq_err"), 0.0)
    positions = predicted = 0
    for ld, lc, ids in zip(dense, compressed, batches(tokens, dense[0].shape[0]), strict=True):  # ld, lc: [B, T, V]
        logp_d, logp_c = ld.log_softmax(-1), lc.log_softmax(-1)  # [B, T, V]
        # KL per position; identical logits give exactly 0 because the log-probabilities cancel.
        sums["kl"] += (logp_d.exp() * (logp_d - logp_c)).sum(-1).sum().item()
        sums["agree"] += (ld.argmax(-1) == lc.argmax(-1)).sum().item()
        sums["cosine"] += F.cosine_similarity(ld, lc, dim=-1).clamp(max=1.0).sum().item()
        sums["sq_err"] += (ld - lc).square().mean(-1).sum().item()
        targets = ids[:, 1:, None]  # [B, T-1, 1]: position t predicts token t+1
        sums["nll_dense"] -= logp_d[:, :-1].gather(-1, targets).sum().item()
        sums["nll_compressed"] -= logp_c[:, :-1].gather(-1, targets).sum().item()
        positions += ids.numel()
        predicted += targets.numel()
    ppl_dense = math.exp(sums["nll_dense"] / predicted)
    ppl_compressed = math.exp(sums["nll_compressed"] / predicted)
    return {
        "tokens": positions,
        "ppl_dense": ppl_dense,
        "ppl_compressed": ppl_compressed,
        "ppl_ratio": ppl_compressed / ppl_dense,
        "kl": sums["kl"] / positions,
        "top1_agreement": sums["agree"] / positions,
        "cosine": sums["cosine"] / positions,
        "mse": sums["sq_err"] / positions,
    }


def evaluate(
    dense_model: nn.Module,
    compressed_model: nn.Module,
    tokenizer=None,
    text: str | None = None,
    num_samples: int = 16,
    seq_len: int | None = None,
    batch_size: int = 8,
    seed: int = EVAL_SEED,
    tokens: torch.Tensor | None = None,
    progress: bool = True,
) -> dict:
    """Compare `compressed_model` to `dense_model` on the same windows; returns a dict of metrics.

    The windows are `tokens` [N, T] if given, else `num_samples` windows of `text` (tokenized with
    `tokenizer`), else `num_samples` sequences sampled from the dense model with `seed`.
    `source` in the result says which.
    """
    if tokens is not None:
        source = "given tokens"
    else:
        source = "text" if text is not None else f"sampled from the dense model (seed {seed})"
        tokens = eval_tokens(dense_model, tokenizer, text, num_samples, seq_len, seed, progress)
    dense = model_logits(dense_model, tokens, batch_size, progress)
    compressed = model_logits(compressed_model, tokens, batch_size, progress)
    return {"source": source, **compare_logits(dense, compressed, tokens)}
