"""Collect per-layer input statistics (the Gram matrix XᵀX and what its shrinkage needs) with forward hooks.

Only real tokens count: a batch that carries an `attention_mask` contributes the positions the mask
marks, never its padding.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

# Calibration tokens per input feature for whitening to be well estimated; below it the Gram is shrunk
# toward plain SVD (factorize.shrunk_gram) and the caller is warned.
TOKENS_PER_FEATURE = 8


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: nn.Module):
    """model.eval() for the block (no dropout while measuring), then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def run_batch(model: nn.Module, batch, device: torch.device, where: str = "a calibration batch"):
    """A batch is a tensor of input ids or a dict of the model's keyword arguments."""
    check_input_ids(model, batch.get("input_ids") if isinstance(batch, Mapping) else batch, where)
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch.to(device))
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    raise TypeError(f"calibration batch must be a tensor of input ids or a dict of kwargs, got {type(batch).__name__}")


def check_input_ids(model: nn.Module, ids, where: str) -> None:
    """ValueError naming the batch when its ids are not a [B, T] integer tensor of ids in the model's vocabulary,
    T within its context (torch would fail deep inside the embedding with an IndexError)."""
    if not isinstance(ids, torch.Tensor):
        return  # kwargs without input_ids (inputs_embeds): the model checks them
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 2:
        raise ValueError(f"{where}: input ids must be a [batch, tokens] integer tensor, got {ids.dtype} "
                         f"of shape {list(ids.shape)}")
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    context = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                    if isinstance(getattr(config, k, None), int)), None)
    if ids.numel() and isinstance(vocab, int) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"{where}: token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    if context is not None and ids.shape[1] > context:
        raise ValueError(f"{where}: {ids.shape[1]} tokens, longer than the model's context ({context})")


def batch_mask(batch, device: torch.device) -> torch.Tensor | None:
    """[B, T] bool of the real tokens of a kwargs batch with a 2-D attention_mask, else None (all real)."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.to(device) != 0
    return None


@dataclass
class GramStats:
    """One layer's input statistics over the real calibration tokens x_k [in].

    With `half` (collected when the shrinkage is chosen on held-out tokens, shrinkage="heldout"), the same
    statistics of every other token (the 1st, 3rd, ... real token this layer saw) are kept as well: `halves()`
    gives them and the other tokens' (the difference), two disjoint samples of the same text. That doubles
    the Gram memory of the layer.
    """

    gram: torch.Tensor  # [in, in] float32: Σ_k x_k x_kᵀ
    tokens: int  # n
    sum_norm4: float  # Σ_k ‖x_k‖⁴: Ledoit–Wolf's estimate of how noisy the Gram's entries are
    half: GramStats | None = None  # the same over the tokens k = 0, 2, 4, ... (None: not collected)

    @classmethod
    def empty(cls, features: int, device: torch.device, split: bool = False) -> GramStats:
        zeros = torch.zeros(features, features, dtype=torch.float32, device=device)
        return cls(zeros, 0, 0.0, cls.empty(features, device) if split else None)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the rows of x [n, in] (any float dtype)."""
        x = x.float()
        if self.half is not None:
            self.half.add(x[self.tokens % 2 :: 2])  # tokens k with k even, counted over every batch so far
        self.gram += x.t() @ x  # [in, in]
        self.sum_norm4 += x.double().square().sum(1).square().sum().item()
        self.tokens += x.shape[0]

    def halves(self) -> tuple[GramStats, GramStats]:
        """(statistics of the even tokens, of the odd tokens); they add up to these. Needs `half`."""
        if self.half is None:
            raise ValueError("GramStats.halves: the held-out halves were not collected (split=False)")
        other = GramStats(self.gram - self.half.gram, self.tokens - self.half.tokens,
                          self.sum_norm4 - self.half.sum_norm4)
        return self.half, other


class GramCollector:
    """Forward hooks that accumulate GramStats for `layers` while batches run; set `mask` per batch."""

    def __init__(self, layers: dict[str, nn.Module], split: bool = False):
        self.layers = layers
        self.split = split  # also keep every other token's statistics (GramStats.half)
        self.stats: dict[str, GramStats] = {}
        self.mask: torch.Tensor | None = None  # [B, T] bool real tokens of the batch now running
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            if self.mask is not None and x.shape[:-1] == self.mask.shape:
                x = x[self.mask]  # [real tokens, in]
            else:  # no mask, or a layer fed something else than every position (e.g. BERT's pooler: [B, in])
                x = x.reshape(-1, x.shape[-1])  # [tokens, in]
            if name not in self.stats:
                self.stats[name] = GramStats.empty(x.shape[-1], x.device, self.split)
            self.stats[name].add(x)

        return hook

    def __enter__(self) -> GramCollector:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def collect_grams(
    model: nn.Module, layers: dict[str, nn.Module], calibration: Iterable, progress: bool = True, split: bool = False
) -> dict[str, GramStats]:
    """{layer name: GramStats} accumulated over every real token of every batch, through the whole model
    (split: with the held-out halves, GramStats.half)."""
    device = model_device(model)
    with eval_mode(model), GramCollector(layers, split) as collector:
        for index, batch in enumerate(tqdm(calibration, desc="calibrating", unit="batch", disable=not progress)):
            collector.mask = batch_mask(batch, device)
            run_batch(model, batch, device, f"calibration batch {index}")
    check_coverage(layers, token_counts(collector.stats), stacklevel=6)
    return collector.stats


def token_counts(stats: dict[str, GramStats]) -> dict[str, tuple[int, int]]:
    """{layer: (real tokens seen, input features)}: all check_coverage needs, once the Grams are gone."""
    return {name: (s.tokens, s.gram.shape[0]) for name, s in stats.items()}


def check_reached(layers: Iterable[str], counts: dict[str, tuple[int, int]]) -> None:
    missing = [name for name in layers if counts.get(name, (0, 0))[0] == 0]
    if missing:
        raise ValueError(f"calibration never reached layer(s) {missing}: check the calibration batches")


def check_coverage(layers: Iterable[str], counts: dict[str, tuple[int, int]], stacklevel: int = 4) -> None:
    """Raise if a layer saw no token; warn once, naming the worst-covered layer, below TOKENS_PER_FEATURE."""
    check_reached(layers, counts)
    per_feature = {name: tokens / features for name, (tokens, features) in counts.items()}
    short = [name for name, ratio in per_feature.items() if ratio < TOKENS_PER_FEATURE]
    if not short:
        return
    worst = min(short, key=per_feature.get)
    tokens, features = counts[worst]
    # Fewer tokens than features leave XᵀX singular; the whitening then fits those few tokens. The Gram is
    # shrunk toward a scaled identity (plain SVD) accordingly, so whitening loses its edge rather than failing.
    what = "input features" if tokens < features else f"{TOKENS_PER_FEATURE}x the input features"
    warnings.warn(
        f"calibration saw fewer tokens than {what} in {len(short)} layer(s), e.g. {worst}: {tokens} tokens for "
        f"{features} features; whitening falls back toward plain SVD there (use >= {TOKENS_PER_FEATURE} tokens "
        "per input feature for its full benefit)",
        stacklevel=stacklevel,
    )
