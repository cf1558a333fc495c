"""pretune_model: tune the kernels of every compressed layer of a model, for the M values it will run."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from triton_lowrank.core.autotune import Autotuner, get_tuner, problem_key, resolve_mode
from triton_lowrank.core.format import compressed_layers


def model_float_dtype(model: nn.Module) -> torch.dtype:
    """The activations' dtype: the model's float dtype (its embeddings, norms and biases)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)


def pretune_model(
    model: nn.Module,
    mode: str = "fast",
    m_values: Iterable[int] = (1, 16, 256, 1024, 4096),
    dtype: torch.dtype | None = None,
    tuner: Autotuner | None = None,
) -> dict:
    """Tune every compressed layer's kernel problems for each M; identical keys are tuned once.

    Returns {"layers", "unique_keys", "tuned", "cached", "mode", "cache_path", "configs"}.
    """
    tuner = tuner or get_tuner()
    layers = compressed_layers(model)
    act = dtype or model_float_dtype(model)
    x_bytes = torch.tensor([], dtype=act).element_size()
    dtype_name = str(act).removeprefix("torch.")
    problems = [(p, dtype_name) for layer in layers.values() for m in m_values
                for p in layer.kernel_problems(m, x_bytes)]
    keys = {problem_key(p, d) for p, d in problems}
    cached = sum(k in tuner.entries for k in keys)
    configs = tuner.tune_many(problems, mode=resolve_mode(mode))
    return {"layers": len(layers), "unique_keys": len(keys), "tuned": len(keys) - cached, "cached": cached,
            "mode": mode, "cache_path": str(tuner.cache_path), "configs": configs}
