"""save_compressed / load_compressed: a compressed model as a standard, verifiable HF folder.

The format itself (layer specs, expected tensors, checksums, verification) is checkpoint_format.py;
the quantization_config class and transformers' `from_pretrained` path are hf_quantizer.py.

Saving never loses a folder: OUT is replaced only when it is empty or a checkpoint this package
wrote; the new checkpoint is written to a sibling `.OUT.tmp-*`, verified, then swapped in by
renames (the old one parked in `.OUT.old-*` until the new one is in place). A run killed anywhere
in between leaves those folders, and the next save to OUT restores or removes them and says so.
A lock file `.OUT.lock` makes a second run writing the same OUT fail at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from triton_lowrank.checkpoint.format import (
    QUANT_METHOD,
    CheckpointError,
    check_complete,
    checkpoint_files,
    covered_config,
    replace_with_skeletons,
    verify_checkpoint,
)
from triton_lowrank.checkpoint.hf_quantizer import TritonLowRankConfig, attach_quantizer, mark_compressed

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
_HELD_LOCKS: dict[Path, int] = {}  # lock files this process holds -> nesting depth


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a compressed model (config, safetensors with checksums, generation config, tokenizer) to out_dir.

    Everything is written to a temporary sibling folder, read back and verified, then renamed into
    place, so a failed save never leaves a half-written out_dir nor loses an existing one.
    overwrite=True replaces out_dir only if it is a triton_lowrank checkpoint (or empty).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"save_compressed needs a transformers model (a PreTrainedModel, with a config and save_pretrained), "
            f"got {type(model).__name__}"
        )
    out_dir = Path(out_dir).absolute()
    source = _source_folder(model)
    check_output_folder(out_dir, overwrite, source)
    with output_lock(out_dir):
        recover_interrupted_save(out_dir)
        check_output_folder(out_dir, overwrite, source)  # again: the recovery may have restored it
        config = mark_compressed(model)  # describes the model as it is now
        if tokenizer is not None and (problem := tokenizer_problem(tokenizer, model)):
            raise ValueError(f"save_compressed: {problem}; it does not belong to this model")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            elif source is not None:
                _copy_tokenizer_files(source, tmp, model)
            covered = covered_config(config.layers, model.config.tie_word_embeddings, config.format_version)
            check_complete(model, verify_checkpoint(checkpoint_files(tmp), config.layers, covered))  # must load
            _use_default_permissions(tmp)
            _swap_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


# ----------------------------------------------------------------------------- the output folder


def is_compressed_folder(path: str | os.PathLike) -> bool:
    """True for a folder written by save_compressed (its config.json names our quant_method)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def check_output_folder(
    out_dir: str | os.PathLike, overwrite: bool = False, source: Path | None = None, option: str = "overwrite=True"
) -> None:
    """Raise unless a checkpoint may be written to out_dir; nothing is written here.

    out_dir must not overlap `source` (the model's own folder), must be new, empty, or (with overwrite)
    a checkpoint this package wrote, and its parent must be writable. `option` is how the caller's
    user asks to overwrite ("--overwrite" on the command line).
    """
    out_dir = Path(out_dir).absolute()
    if source is not None and _overlaps(Path(source).resolve(), out_dir.resolve()):
        raise ValueError(f"{out_dir} overlaps {source}, the folder the model was loaded from; save elsewhere")
    if out_dir.is_symlink():
        raise ValueError(f"{out_dir} is a symbolic link; name the folder itself")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} is a file, not a folder; choose another output folder")
        contents = sorted(out_dir.iterdir())
        if contents and not overwrite:
            raise FileExistsError(f"{out_dir} already exists and is not empty; pass {option} to replace it")
        if contents and not is_compressed_folder(out_dir):
            listing = ", ".join(p.name + "/" * p.is_dir() for p in contents[:4])
            more = f" and {len(contents) - 4} more" if len(contents) > 4 else ""
            raise FileExistsError(
                f"refusing to replace {out_dir}: it is not a triton_lowrank checkpoint (it holds {listing}{more}); "
                f"{option} only replaces an earlier checkpoint or an empty folder"
            )
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write {out_dir}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out_dir}: {ancestor} is not writable")


@contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `.OUT.lock` beside out_dir for the block; another process writing the same OUT fails at once.

    Re-entrant within a process (the CLI holds it around a whole run, save_compressed again inside).
    The lock is an flock, released by the kernel if the process dies; the file is removed on exit.
    """
    out_dir = Path(out_dir).absolute()
    lock = out_dir.parent / f".{out_dir.name}.lock"
    if lock in _HELD_LOCKS:
        _HELD_LOCKS[lock] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[lock] -= 1
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, out_dir)
    _HELD_LOCKS[lock] = 1
    try:
        yield
    finally:
        del _HELD_LOCKS[lock]
        lock.unlink(missing_ok=True)  # before closing: a run that opened the old file then sees it is stale
        os.close(fd)


def _acquire(lock: Path, out_dir: Path) -> int:
    for _ in range(3):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(
                f"{out_dir} is being written by another run (process {holder}, lock {lock.name}); wait for it to end"
            ) from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)  # the previous holder removed this file while we opened it: take the new one
    raise FileExistsError(f"{out_dir} is being written by other runs (lock {lock.name} keeps changing)")


def _leftovers(out_dir: Path, kind: str) -> list[Path]:
    """The `.OUT.<kind>-XXXXXXXX` folders mkdtemp made for out_dir, oldest rename first."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.{kind}-[a-z0-9_]{{8}}")
    if not out_dir.parent.is_dir():
        return []
    found = [p for p in out_dir.parent.iterdir() if pattern.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.lstat().st_ctime)  # a rename updates ctime: the last one parked is last


def recover_interrupted_save(out_dir: str | os.PathLike) -> list[str]:
    """Finish what a killed save left beside out_dir, and warn saying what was done (returns the same lines).

    A kill between the swap's two renames leaves OUT missing with the old folder parked in `.OUT.old-*`:
    it is put back. Every other `.OUT.old-*` (a kill while deleting it) and `.OUT.tmp-*` (a kill while
    writing or before the swap) is removed. Call it holding `output_lock(out_dir)`.
    """
    out_dir = Path(out_dir).absolute()
    olds, tmps = _leftovers(out_dir, "old"), _leftovers(out_dir, "tmp")
    done = []
    if olds and not out_dir.exists() and not out_dir.is_symlink():
        parked = olds.pop()
        os.rename(parked, out_dir)
        done.append(f"restored {out_dir.name} from {parked.name}, where an interrupted save had parked it")
    for leftover in olds + tmps:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    if olds or tmps:
        done.append(f"removed {len(olds) + len(tmps)} leftover folder(s) of an interrupted save: "
                    + ", ".join(p.name for p in olds + tmps))
    if done:
        warnings.warn(f"{out_dir.parent}: " + "; ".join(done), RuntimeWarning, stacklevel=2)
    return done


def _use_default_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and safetensors may write 0600 files); give the result the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Each step is one rename; recover_interrupted_save repairs a kill between any two of them."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)  # only its unique name was needed
    os.rename(out_dir, old)  # killed from here: OUT is missing, the next save puts `old` back
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous folder back before reporting the failure
        raise
    shutil.rmtree(old, ignore_errors=True)  # killed (or failing) here: the next save removes what is left


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _source_folder(model: nn.Module) -> Path | None:
    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


# ----------------------------------------------------------------------------- tokenizers


def tokenizer_problem(tokenizer, model: nn.Module | None = None) -> str | None:
    """Why `tokenizer` cannot serve `model`, in words (None when it can). transformers builds an empty
    tokenizer for a folder without tokenizer files instead of failing; it has fewer than two entries."""
    size = len(tokenizer)
    if size < 2:
        return f"the tokenizer has {size} entr{'y' if size == 1 else 'ies'} (no tokenizer files?)"
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and size > rows:
        return f"the tokenizer has {size} tokens, more than the {rows} rows of the model's embedding"
    return None


def _copy_tokenizer_files(source: Path, folder: Path, model: nn.Module) -> None:
    """Copy the source folder's tokenizer files, unless they do not make a usable tokenizer for `model`."""
    copied = [folder / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not copied:
        return
    for path in copied:
        shutil.copy2(source / path.name, path)
    try:
        problem = tokenizer_problem(AutoTokenizer.from_pretrained(folder), model)
    except (OSError, ValueError, TypeError) as error:
        problem = f"it does not load ({type(error).__name__})"
    if problem:
        for path in copied:
            path.unlink()
        warnings.warn(f"the tokenizer files of {source} were not copied: {problem}", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------- loading


def load_compressed(
    path: str | os.PathLike,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a saved compressed model without materialising any dense weight of a compressed layer.

    device_map: None loads on the CPU; a device ("cuda:0") or accelerate's "auto" / "balanced" /
    "sequential" / an explicit {module: device} map, with `max_memory` and the model's
    `_no_split_modules`. dtype: the float dtype of the model (embeddings, norms, biases, bits=None
    factors); None keeps the checkpoint's. int8/uint8 storage keeps its dtype and scales stay
    float32 whatever `dtype` is, since an fp16 scale underflows for small rank components.

    verify=False skips the checksums and their record, for a file saved without them (say, by another
    tool): shapes, dtypes, finite scales and completeness are still checked. Use it only for files you trust.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    config = AutoConfig.from_pretrained(path)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        raise CheckpointError(f"{path}/config.json has no quantization_config: not a triton_lowrank checkpoint")
    if not isinstance(quantization, TritonLowRankConfig):
        quantization = TritonLowRankConfig.from_dict(dict(quantization))
    covered = covered_config(quantization.layers, config.tie_word_embeddings, quantization.format_version)
    stored = verify_checkpoint(checkpoint_files(path), quantization.layers, covered, verify)
    if not verify:
        warnings.warn(f"{path}: loaded without checking its checksums (verify=False)", UserWarning, stacklevel=2)

    del config.quantization_config  # build a plain skeleton; transformers' quantizer path is the other loader
    dtype = dtype or _config_dtype(config)
    with init_empty_weights():  # parameters on meta; non-persistent buffers (rotary, masks) are computed
        model = _model_class(config)._from_config(config, dtype=dtype)
    replace_with_skeletons(model, quantization.layers, dtype)
    model.tie_weights()  # GPT-2 / OPT: lm_head shares wte unless the head itself was compressed
    check_complete(model, stored)  # accelerate would leave a missing tensor empty without a word

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
