"""save_compressed / load_compressed: a compressed model as a standard, verifiable HF folder.

The format itself (layer specs, expected tensors, checksums, verification) is checkpoint_format.py;
the quantization_config class and transformers' `from_pretrained` path are hf_quantizer.py.

Saving never loses a folder: OUT is replaced only when it is empty or a checkpoint this package
wrote and can prove so (its manifest `.triton_lowrank-files` lists every entry; an entry it does not
list, say a model card or an `evals/` folder the user added, makes the overwrite refuse, naming it).
The new checkpoint is written to a sibling `.OUT.tmp-*`, verified, then swapped in by renames (the
old one parked in `.OUT.old-*` until the new one is in place). Each of those folders carries a marker
file naming it; a run killed anywhere in between leaves them, and the next save to OUT restores or
removes them and says so, touching only folders whose marker names them (a user's `.OUT.old-20241231`
backup is left alone). A lock file `.OUT.lock` makes a second run writing the same OUT fail at once; it is
removed on exit, on SIGINT and on SIGTERM.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from triton_lowrank.checkpoint.format import (
    INDEX_NAME,
    QUANT_METHOD,
    CheckpointError,
    check_complete,
    checkpoint_files,
    covered_config,
    read_checkpoint_json,
    replace_with_skeletons,
    verify_checkpoint,
)
from triton_lowrank.checkpoint.hf_quantizer import TritonLowRankConfig, attach_quantizer, mark_compressed
from triton_lowrank.core.safe_io import read_json

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
MANIFEST = ".triton_lowrank-files"  # in a folder we wrote: JSON {"files": [every entry we wrote]}
LEFTOVER_MARKER = ".triton_lowrank-leftover"  # in .OUT.tmp-* / .OUT.old-*: JSON {"leftover": that folder's name}
_MARKER_BYTES = 1 << 20
# What a checkpoint written before the manifest existed may hold: anything else in it is not ours.
_LEGACY_FILES = {"config.json", "generation_config.json", "model.safetensors", INDEX_NAME, *TOKENIZER_FILES}
_LEGACY_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


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
            _mark_leftover(tmp, tmp.name)
            try:
                model.save_pretrained(tmp)
            except SafetensorError as error:  # a full disk, say: an OSError like any other failed write
                raise OSError(f"cannot write {out_dir}: {' '.join(str(error).split())}") from None
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            elif source is not None:
                _copy_tokenizer_files(source, tmp, model)
            covered = covered_config(config.layers, model.config.tie_word_embeddings, config.format_version)
            config_json = read_checkpoint_json(tmp / "config.json", "config.json")
            stored = verify_checkpoint(checkpoint_files(tmp), config.layers, covered, config_json=config_json)
            check_complete(model, stored)  # must load
            write_manifest(tmp)
            _use_default_permissions(tmp)
            _swap_into_place(tmp, out_dir)
        except BaseException:
            if tmp.exists():
                _remove_leftover(tmp, ignore_errors=True)
            raise
    return out_dir


# ----------------------------------------------------------------------------- the output folder


def is_compressed_folder(path: str | os.PathLike) -> bool:
    """True for a folder written by save_compressed (its config.json names our quant_method)."""
    try:
        config = read_json(Path(path) / "config.json", "config.json")
    except (OSError, ValueError):  # UnsafeInput is a ValueError: a FIFO or /dev/zero is never read
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def check_output_folder(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    source: Path | None = None,
    option: str = "overwrite=True",
    checkpoint: bool = True,
) -> None:
    """Raise unless out_dir may be written (the OUT rules); nothing is written here.

    out_dir must not overlap `source` (the model's own folder), must be new, empty, or (with overwrite)
    a folder this package wrote that holds nothing else (with checkpoint=True: a checkpoint; False: any
    folder `output_folder` wrote, such as the demo's), and its parent must be writable. `option` is how the
    caller's user asks to overwrite ("--overwrite" on the command line).
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.name in ("", ".", ".."):
        raise ValueError(f"{out_dir}: name the output folder itself")
    if len(os.fsencode(f".{out_dir.name}.tmp-xxxxxxxx")) > 255:
        raise ValueError(f"the output folder name {out_dir.name[:40]!r}... is too long: at most 241 bytes")
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
        if contents and checkpoint and not is_compressed_folder(out_dir):
            raise FileExistsError(
                f"refusing to replace {out_dir}: it is not a triton_lowrank checkpoint "
                f"(it holds {_listing(contents)}); {option} only replaces an earlier checkpoint or an empty folder"
            )
        foreign = not_written_by_us(out_dir, checkpoint) if contents else []
        if foreign:
            what = "checkpoint" if checkpoint else "output folder"
            raise FileExistsError(
                f"refusing to replace {out_dir}: it holds what triton_lowrank did not write ({_listing(foreign)}); "
                f"{option} only replaces an earlier {what} with nothing added: move them out first"
            )
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write {out_dir}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out_dir}: {ancestor} is not writable")


def _listing(paths: list[Path]) -> str:
    names = ", ".join(p.name + "/" * (p.is_dir() and not p.is_symlink()) for p in paths[:6])
    return names + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")


def not_written_by_us(folder: str | os.PathLike, checkpoint: bool = True) -> list[Path]:
    """The entries of `folder` this package cannot prove it wrote: those its manifest does not list (a checkpoint
    saved before the manifest existed: names other than a checkpoint's files), besides our lock files and our
    marked leftovers of an interrupted write inside it. A folder without a manifest that is not a checkpoint: all."""
    folder = Path(folder)
    listed = _manifest(folder)
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name in (MANIFEST, LEFTOVER_MARKER) and _is_file(entry):
            continue
        if listed is not None:
            ours = name in listed and (entry.is_dir() and not entry.is_symlink() if listed[name] == "dir"
                                       else _is_file(entry))
        else:
            ours = checkpoint and _is_file(entry) and (name in _LEGACY_FILES or _LEGACY_SHARD.fullmatch(name))
        lock_of = re.fullmatch(r"\.(.+)\.lock", name)
        if lock_of and listed is not None and lock_of.group(1) in listed and _is_file(entry):
            ours = True  # the lock of a folder we wrote inside (the demo's model/), left by a killed run
        if not ours and is_our_leftover(entry):
            ours = True
        if not ours:
            foreign.append(entry)
    return foreign


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _manifest(folder: Path) -> dict[str, str] | None:
    """{name: "file" | "dir"} from the folder's manifest; None when it has none that reads."""
    marker = folder / MANIFEST
    if not _is_file(marker):
        return None
    try:
        data = read_json(marker, "manifest", _MARKER_BYTES)
        files = data["files"]
        if isinstance(files, dict) and all(isinstance(k, str) and v in ("file", "dir") for k, v in files.items()):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def write_manifest(folder: str | os.PathLike, keep: dict | None = None, only_new_since: set | None = None) -> None:
    """Record the entries of `folder` as written by this package (the proof an overwrite asks for): all of them,
    or those not in `only_new_since` plus those `keep` listed before (and still there)."""
    folder = Path(folder)
    files = {
        p.name: "dir" if p.is_dir() and not p.is_symlink() else "file"
        for p in sorted(folder.iterdir())
        if p.name not in (MANIFEST, LEFTOVER_MARKER)
        and (only_new_since is None or p.name not in only_new_since or p.name in (keep or {}))
    }
    (folder / MANIFEST).write_text(json.dumps({"written_by": "triton_lowrank", "files": files}, indent=1) + "\n")


def _mark_leftover(folder: Path, name: str) -> None:
    """Mark `folder` as a save's working folder that will be (or is) called `name` beside OUT."""
    (folder / LEFTOVER_MARKER).write_text(json.dumps({"leftover": name}) + "\n")


def _unmark(folder: Path) -> None:
    (folder / LEFTOVER_MARKER).unlink(missing_ok=True)


def is_our_leftover(path: Path) -> bool:
    """A `.OUT.tmp-*` / `.OUT.old-*` folder our save made: a real folder whose marker names it."""
    marker = path / LEFTOVER_MARKER
    if path.is_symlink() or not path.is_dir() or not _is_file(marker):
        return False
    try:
        data = read_json(marker, "leftover marker", _MARKER_BYTES)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("leftover") == path.name


@contextmanager
def output_folder(
    out_dir: str | os.PathLike, overwrite: bool = False, source: Path | None = None, option: str = "overwrite=True"
) -> Iterator[Path]:
    """The OUT rules for a folder of outputs that is not itself a checkpoint (the demo's `--out`): checked as
    check_output_folder(..., checkpoint=False) says, before and (holding `.OUT.lock`) again after recovering
    an interrupted save; created; and on success its manifest records every entry in it as ours, so a later
    overwrite can prove what it replaces. Yields the folder.

        with output_folder(args.out, args.overwrite, option="--overwrite") as out:
            run_demo(..., out, ...)
    """
    out_dir = Path(out_dir).absolute()
    check_output_folder(out_dir, overwrite, source, option, checkpoint=False)
    with output_lock(out_dir):
        recover_interrupted_save(out_dir)
        check_output_folder(out_dir, overwrite, source, option, checkpoint=False)
        out_dir.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in out_dir.iterdir()}
        listed = _manifest(out_dir) or {}
        try:
            yield out_dir
        finally:  # also after a failure: what this run created is ours, what the manifest listed stays listed
            write_manifest(out_dir, keep=listed, only_new_since=before)


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
    with _cleanup_on_sigterm():
        fd = _acquire(lock, out_dir)
        _HELD_LOCKS[lock] = 1
        try:
            yield
        finally:
            del _HELD_LOCKS[lock]
            lock.unlink(missing_ok=True)  # before closing: a run that opened the old file then sees it is stale
            os.close(fd)


@contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) in the main thread for the block, so every `finally` runs (the lock file
    and the save's working folder are removed) instead of the process dying on the spot. SIGINT already
    raises KeyboardInterrupt. A handler the program installed itself is left in place."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
    """The `.OUT.<kind>-XXXXXXXX` folders our saves made for out_dir (their marker names them), oldest rename
    first. A folder that merely looks like one (a user's `.OUT.old-20241231` backup) is not among them."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.{kind}-[a-z0-9_]{{8}}")
    if not out_dir.parent.is_dir():
        return []
    found = [p for p in out_dir.parent.iterdir() if pattern.fullmatch(p.name) and is_our_leftover(p)]
    return sorted(found, key=lambda p: p.lstat().st_ctime)  # a rename updates ctime: the last one parked is last


def recover_interrupted_save(out_dir: str | os.PathLike) -> list[str]:
    """Finish what a killed save left beside out_dir, and warn saying what was done (returns the same lines).

    A kill between the swap's two renames leaves OUT missing with the old folder parked in `.OUT.old-*`:
    it is put back. Every other `.OUT.old-*` (a kill while deleting it) and `.OUT.tmp-*` (a kill while
    writing or before the swap) is removed. Only folders whose marker file names them are touched.
    Call it holding `output_lock(out_dir)`.
    """
    out_dir = Path(out_dir).absolute()
    olds, tmps = _leftovers(out_dir, "old"), _leftovers(out_dir, "tmp")
    done = []
    if olds and not out_dir.exists() and not out_dir.is_symlink():
        parked = olds.pop()
        os.rename(parked, out_dir)
        _unmark(out_dir)
        done.append(f"restored {out_dir.name} from {parked.name}, where an interrupted save had parked it")
    if out_dir.is_dir() and not out_dir.is_symlink():
        _unmark(out_dir)  # a kill just before parking OUT, or just after moving the new one in, left it
    for leftover in olds + tmps:
        _remove_leftover(leftover)
    if olds or tmps:
        done.append(f"removed {len(olds) + len(tmps)} leftover folder(s) of an interrupted save: "
                    + ", ".join(p.name for p in olds + tmps))
    if done:
        warnings.warn(f"{out_dir.parent}: " + "; ".join(done), RuntimeWarning, stacklevel=2)
    return done


def _remove_leftover(folder: Path, ignore_errors: bool = False) -> None:
    """Remove a save's working folder, its marker last: interrupted halfway, what is left is still known as ours."""
    try:
        for entry in folder.iterdir():
            if entry.name == LEFTOVER_MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (folder / LEFTOVER_MARKER).unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        if not ignore_errors:
            raise


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
        _unmark(out_dir)  # killed before this: a stale marker inside OUT names `.OUT.tmp-*`, never OUT itself
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)  # only its unique name was needed
    _mark_leftover(out_dir, old.name)  # names the parked folder, so the next save knows it for ours
    try:
        os.rename(out_dir, old)  # killed from here: OUT is missing, the next save puts `old` back
    except BaseException:
        _unmark(out_dir)
        raise
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous folder back before reporting the failure
        _unmark(out_dir)
        raise
    _unmark(out_dir)
    _remove_leftover(old, ignore_errors=True)  # killed (or failing) here: the next save removes what is left


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
    dtype = _check_dtype(dtype)
    device_map = _device_map(device_map)
    config_json = read_checkpoint_json(path / "config.json", "config.json")  # bounded: never a FIFO or /dev/zero
    if not isinstance(config_json, dict):
        raise CheckpointError(f"{path}/config.json is not a JSON object")
    quantization = config_json.get("quantization_config")
    if quantization is None:
        raise CheckpointError(f"{path}/config.json has no quantization_config: not a triton_lowrank checkpoint")
    if not isinstance(quantization, dict):
        raise CheckpointError(f"{path}/config.json: quantization_config is not a JSON object")
    try:
        quantization = TritonLowRankConfig.from_dict(dict(quantization))
        config = AutoConfig.from_pretrained(path)
    except CheckpointError:
        raise
    except Exception as error:  # transformers' own validation of a config.json it cannot use, of many types
        raise CheckpointError(f"{path}/config.json: {_one_line(error)}") from None
    files = checkpoint_files(path)  # the verified files are the files loaded: never a pytorch_model.bin
    covered = covered_config(quantization.layers, config.tie_word_embeddings, quantization.format_version)
    stored = verify_checkpoint(files, quantization.layers, covered, verify, config_json)
    if not verify:
        warnings.warn(f"{path}: loaded without checking its checksums (verify=False)", UserWarning, stacklevel=2)

    del config.quantization_config  # build a plain skeleton; transformers' quantizer path is the other loader
    try:
        dtype = dtype or _config_dtype(config)
        with init_empty_weights():  # parameters on meta; non-persistent buffers (rotary, masks) are computed
            model = _model_class(config)._from_config(config, dtype=dtype)
    except CheckpointError:
        raise
    except Exception as error:  # a config.json whose values build no model (verify=False, or an older record)
        raise CheckpointError(f"{path}/config.json does not describe a usable model: {_one_line(error)}") from None
    replace_with_skeletons(model, quantization.layers, dtype)
    model.tie_weights()  # GPT-2 / OPT: lm_head shares wte unless the head itself was compressed
    check_complete(model, stored)  # accelerate would leave a missing tensor empty without a word

    # dtype stays None here: accelerate then casts every tensor to its skeleton's dtype (scales stay fp32).
    # It is given the verified file (or index) itself: given the folder, it would prefer a pytorch_model.bin.
    source = files[0] if len(files) == 1 and files[0].name == "model.safetensors" else path / INDEX_NAME
    try:
        model = load_checkpoint_and_dispatch(
            model,
            str(source),
            device_map=device_map,
            max_memory=max_memory,
            no_split_module_classes=sorted(model._no_split_modules or []),
        )
    except SafetensorError as error:  # the file changed since it was verified
        raise CheckpointError(f"{source}: {_one_line(error)}") from None
    if len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) <= 1:
        # One device, nothing offloaded: save_pretrained would otherwise warn about offloaded modules.
        model.__dict__.pop("hf_device_map", None)
    attach_quantizer(model, quantization)
    if (path / "generation_config.json").exists():
        generation = read_checkpoint_json(path / "generation_config.json", "generation_config.json")
        try:
            model.generation_config = GenerationConfig.from_dict(generation)
        except Exception as error:  # transformers validates it, with errors of several types
            raise CheckpointError(f"{path}/generation_config.json: {_one_line(error)}") from None
    return model.eval()


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:400]


_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _check_dtype(dtype):
    """None, a float torch.dtype, or one's name ("float16"); anything else is refused saying what is accepted."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise (ValueError if isinstance(dtype, (str, torch.dtype)) else TypeError)(
        f"load_compressed: dtype must be None, a float torch.dtype or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}"
    )


_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(device_map):
    """accelerate's strategies and explicit maps pass through, checked; one device (or None: CPU) becomes
    {"": device}. A device this machine does not have is refused here, in one line, not deep in accelerate."""
    if device_map is None or device_map in _STRATEGIES:
        return {"": "cpu"} if device_map is None else device_map
    if isinstance(device_map, dict):
        if not device_map or not all(isinstance(k, str) for k in device_map):
            raise ValueError(f"load_compressed: device_map must map module names to devices, got {device_map!r}"[:300])
        for device in device_map.values():
            if device != "disk":
                _usable_device(device)
        return device_map
    if isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        return {"": str(_usable_device(device_map))}
    raise TypeError(f"load_compressed: device_map must be None, a device, {', '.join(_STRATEGIES)} or a dict, "
                    f"got {type(device_map).__name__}")


def _usable_device(device) -> torch.device:
    try:
        parsed = torch.device(device) if not isinstance(device, int) or isinstance(device, bool) else None
        parsed = parsed or torch.device("cuda", device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"load_compressed: device_map names {device!r}, which is not a device") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"load_compressed: device_map names {device!r}, but this machine has {count} CUDA "
                             "device(s)")
    elif parsed.type not in ("cpu", "meta") and not hasattr(torch, parsed.type):
        raise ValueError(f"load_compressed: device_map names {device!r}, which this machine does not have")
    if parsed.type == "meta":
        raise ValueError("load_compressed: device_map 'meta' loads no weights; name a real device")
    return parsed


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _model_class(config) -> type:
    """The class the model was saved as (config.architectures), else AutoModelForCausalLM's choice."""
    for name in getattr(config, "architectures", None) or ():
        if isinstance(getattr(transformers, name, None), type):
            return getattr(transformers, name)
    return AutoModelForCausalLM._model_mapping[type(config)]
