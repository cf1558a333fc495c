"""save_compressed / load_compressed: a compressed model as a standard, verifiable HF folder.

The format itself (layer specs, expected tensors, checksums, verification) is checkpoint_format.py;
the quantization_config class and transformers' `from_pretrained` path are hf_quantizer.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import find_tied_parameters
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from .checkpoint_format import CheckpointError, checkpoint_files, replace_with_skeletons, verify_checkpoint
from .hf_quantizer import TritonLowRankConfig, attach_quantizer, mark_compressed

# Copied from the model's source folder when no tokenizer object is given.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a compressed model (config, safetensors with checksums, generation config, tokenizer) to out_dir.

    Everything is written to a temporary sibling folder, read back and verified, then renamed into
    place, so a failed save never leaves a half-written out_dir nor loses an existing one.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass overwrite=True to replace it")
    source = _source_folder(model)
    if source is not None and _overlaps(source.resolve(), out_dir.resolve()):
        raise ValueError(f"{out_dir} overlaps {source}, the folder the model was loaded from; save elsewhere")
    config = mark_compressed(model)  # describes the model as it is now
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
        verify_checkpoint(checkpoint_files(tmp), config.layers)  # what we wrote must load
        _use_default_permissions(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _use_default_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and safetensors may write 0600 files); give the result the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()  # only its unique name was needed
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)  # put the previous folder back before reporting the failure
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _source_folder(model: nn.Module) -> Path | None:
    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def load_compressed(
    path: str | os.PathLike,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild a saved compressed model without materialising any dense weight of a compressed layer.

    device_map: None loads on the CPU; a device ("cuda:0") or accelerate's "auto" / "balanced" /
    "sequential" / an explicit {module: device} map, with `max_memory` and the model's
    `_no_split_modules`. dtype: the float dtype of the model (embeddings, norms, biases, bits=None
    factors); None keeps the checkpoint's. int8/uint8 storage keeps its dtype and scales stay
    float32 whatever `dtype` is, since an fp16 scale underflows for small rank components.
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        raise CheckpointError(f"{path}/config.json has no quantization_config: not a triton_lowrank checkpoint")
    if not isinstance(quantization, TritonLowRankConfig):
        quantization = TritonLowRankConfig.from_dict(dict(quantization))
    stored = verify_checkpoint(checkpoint_files(path), quantization.layers)

    del config.quantization_config  # build a plain skeleton; transformers' quantizer path is the other loader
    dtype = dtype or _config_dtype(config)
    with init_empty_weights():  # parameters on meta; non-persistent buffers (rotary, masks) are computed
        model = _model_class(config)._from_config(config, dtype=dtype)
    replace_with_skeletons(model, quantization.layers, dtype)
    model.tie_weights()  # GPT-2 / OPT: lm_head shares wte unless the head itself was compressed
    _check_complete(model, stored)  # accelerate would leave a missing tensor empty without a word

    # dtype stays None here: accelerate then casts every tensor to its skeleton's dtype (scales stay fp32).
    model = load_checkpoint_and_dispatch(
        model,
        str(path),
        device_map=_device_map(device_map),
        max_memory=max_memory,
        no_split_module_classes=sorted(model._no_split_modules or []),
    )
    attach_quantizer(model, quantization)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _check_complete(model: nn.Module, stored: set[str]) -> None:
    expected = set(model.state_dict())  # parameters and persistent buffers
    for group in find_tied_parameters(model):
        if stored & set(group):
            expected -= set(group)  # tied tensors are written once, under any one of their names
    missing = sorted(expected - stored)
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing)")


def _device_map(device_map):
    """accelerate's strategies and explicit maps pass through; one device (or None: CPU) becomes {"": device}."""
    if isinstance(device_map, dict) or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return device_map
    return {"": "cpu" if device_map is None else device_map}


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _model_class(config) -> type:
    """The class the model was saved as (config.architectures), else AutoModelForCausalLM's choice."""
    for name in getattr(config, "architectures", None) or ():
        if isinstance(getattr(transformers, name, None), type):
            return getattr(transformers, name)
    return AutoModelForCausalLM._model_mapping[type(config)]
