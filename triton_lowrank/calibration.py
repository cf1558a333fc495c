"""Collect per-layer input Gram matrices XᵀX over calibration batches, with forward hooks."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm


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


def run_batch(model: nn.Module, batch, device: torch.device):
    """A batch is a tensor of input ids or a dict of the model's keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch.to(device))
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    raise TypeError(f"calibration batch must be a tensor of input ids or a dict of kwargs, got {type(batch).__name__}")


@torch.no_grad()
def collect_grams(
    model: nn.Module, layers: dict[str, nn.Module], calibration: Iterable, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Return {layer name: XᵀX [in, in] float32} accumulated over every token of every batch."""
    grams: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
            gram = x.t() @ x  # [in, in]
            grams[name] = grams[name] + gram if name in grams else gram
            tokens[name] = tokens.get(name, 0) + x.shape[0]

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers.items()]
    device = model_device(model)
    try:
        with eval_mode(model):
            for batch in tqdm(calibration, desc="calibrating", unit="batch", disable=not progress):
                run_batch(model, batch, device)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in grams]
    if missing:
        raise ValueError(f"calibration never reached layer(s) {missing}: check the calibration batches")
    # Fewer tokens than input features leave XᵀX singular: the whitening then fits those few tokens
    # and generalises worse than plain SVD.
    short = {name: tokens[name] for name in layers if tokens[name] < grams[name].shape[0]}
    if short:
        name, count = next(iter(short.items()))
        warnings.warn(
            f"calibration saw fewer tokens than input features in {len(short)} layer(s), e.g. {name}: "
            f"{count} tokens for {grams[name].shape[0]} features; whitening needs more calibration data",
            stacklevel=3,
        )
    return grams
