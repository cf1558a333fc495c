"""Token windows for evaluation and calibration: from a text file, or sampled from the dense model.

Sampled evaluation and calibration sequences use different seeds, so sampled evaluation data is
always held out from whitening calibration.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from triton_lowrank.core.calibration import model_device

EVAL_SEED = 1  # sampled evaluation sequences
CALIB_SEED = 0  # sampled calibration sequences: a different seed keeps evaluation held out
MAX_DEFAULT_WINDOW = 2048  # long-context models (128k positions) would otherwise sample 128k-token windows


def context_length(model: nn.Module) -> int:
    """Default window length: the model's context (GPT-2's n_positions), at most MAX_DEFAULT_WINDOW."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    return min(context, MAX_DEFAULT_WINDOW)


def text_windows(tokenizer, text: str, length: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize `text` into non-overlapping [N, length] windows (the tail is dropped); at most
    `max_windows` of them, evenly spaced so that a long file is sampled from end to end."""
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to evaluate or calibrate on a text file")
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # [tokens]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); at least 2 are needed")
    if len(ids) < length:
        return ids[None]  # one short window beats no data for a small file
    windows = ids[: len(ids) // length * length].view(-1, length)  # [N, length]
    if max_windows is None or max_windows >= len(windows):
        return windows
    return windows[torch.linspace(0, len(windows) - 1, max_windows).round().long()]  # [max_windows, length]


@torch.no_grad()
def sample_sequences(
    model: nn.Module, num: int, length: int, seed: int, batch_size: int = 16, progress: bool = True
) -> torch.Tensor:
    """[num, length] token ids sampled (temperature 1, no top-k) from `model`, starting at BOS."""
    config = model.config
    start_id = config.bos_token_id if config.bos_token_id is not None else 0
    if not 0 <= start_id < config.vocab_size:
        start_id = 0
    device = model_device(model)
    chunks = []
    # fork_rng leaves the caller's global RNG state untouched; the seed makes the data reproducible.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for first in tqdm(range(0, num, batch_size), desc="sampling", unit="batch", disable=not progress):
            rows = min(batch_size, num - first)
            start = torch.full((rows, 1), start_id, dtype=torch.long, device=device)  # [rows, 1]
            out = model.generate(
                start,
                attention_mask=torch.ones_like(start),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=length - 1,
                min_new_tokens=length - 1,  # never stop early at EOS: every row has `length` tokens
                pad_token_id=start_id,
            )
            chunks.append(out.cpu())  # [rows, length]
    return torch.cat(chunks)


def eval_tokens(
    model: nn.Module,
    tokenizer=None,
    text: str | None = None,
    num_samples: int = 16,
    seq_len: int | None = None,
    seed: int = EVAL_SEED,
    progress: bool = True,
) -> torch.Tensor:
    """[N, T] evaluation (or calibration) windows: from `text` when given, else sampled from `model`."""
    length = seq_len or context_length(model)
    if text is not None:
        return text_windows(tokenizer, text, length, num_samples)
    return sample_sequences(model, num_samples, length, seed, progress=progress)


def batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split [N, T] windows into calibration/evaluation batches of at most `batch_size` rows."""
    return list(tokens.split(batch_size))


def calibration_batches(
    model: nn.Module,
    tokenizer=None,
    text: str | None = None,
    num_samples: int = 16,
    seq_len: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Whitening calibration: windows of `text`, else sequences sampled with CALIB_SEED (never EVAL_SEED)."""
    return batches(eval_tokens(model, tokenizer, text, num_samples, seq_len, CALIB_SEED, progress), batch_size)
