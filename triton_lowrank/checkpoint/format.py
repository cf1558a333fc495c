"""The on-disk format of a compressed model: layer specs, expected tensors, checksums, verification.

A compressed checkpoint is a standard HF folder. config.json carries a `quantization_config` with
quant_method "triton_lowrank", a format version and, per compressed layer, the spec of its weight
format (formats.py: "format", "kind", "in_features", "out_features", "bias", plus the format's own
fields). model.safetensors holds each layer's buffers and bias in their storage dtypes; no dense
`<layer>.weight` of a compressed layer is ever written or built.

Integrity: the safetensors metadata key CHECKSUM_KEY holds a JSON map {tensor: sha256 of its raw
bytes}, and RECORD_KEY a JSON {"config": sha256, "tensors": sha256} over what config.json and the
file list do not checksum themselves: the layer specs, the format version and tie_word_embeddings
(`covered_config`), and the sorted names of the stored tensors. `verify_checkpoint` checks the
header, every expected tensor's presence, shape and dtype, the checksums, the record and that every
scale is finite, before a single tensor is loaded, in both load paths; `check_complete` then holds
the stored names against the model (every parameter and persistent buffer, tied ones once, nothing else).
Files saved before the record existed load with a warning; a file without checksums is refused.

Format versions: 2 added layers of other formats than "lowrank" (the hybrid format); every file is written
as version 2. Version 1 files hold "lowrank" layers only and still load; a triton_lowrank that reads only
version 1 refuses a version 2 file by its version, before meeting a layer format it does not know. A layer
spec without "format" (as written before formats were registered) is a "lowrank" layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import find_tied_parameters
from torch import nn

from triton_lowrank.core.format import COMMON_SPEC_FIELDS, DENSE_KINDS, dense_weight, format_class, untie_head
from triton_lowrank.core.safe_io import (
    MAX_HEADER_BYTES,
    MAX_JSON_BYTES,
    UnsafeInput,
    open_regular,
    parse_json,
    read_json,
)

QUANT_METHOD = "triton_lowrank"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
VERSION_1_FORMATS = ("lowrank",)  # the only layer format a version 1 file may hold
CHECKSUM_KEY = "triton_lowrank.sha256"
RECORD_KEY = "triton_lowrank.record"  # covers the quantization_config and the set of tensor names
DEFAULT_FORMAT = "lowrank"  # layer specs written before "format" existed
FLOAT_CODES = ("F32", "F16", "BF16")  # float storage and biases follow the model's float dtype
_DTYPE_CODES = {torch.int8: ("I8",), torch.uint8: ("U8",), torch.int32: ("I32",)}
_ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
# config.json fields the record leaves out: they never change what the model computes. Every other field is
# covered (heads, activation, norm epsilon, attention scaling, architectures, dtype, quantization_config, ...).
COSMETIC_CONFIG_FIELDS = ("transformers_version", "_name_or_path")
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A compressed checkpoint that does not match its quantization_config; the message names the field or tensor."""


def read_checkpoint_json(path: str | os.PathLike, what: str, limit: int = MAX_JSON_BYTES):
    """A JSON file of a checkpoint (config.json, the index, ...), read bounded (safe_io); a problem: CheckpointError."""
    try:
        return read_json(path, what, limit)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except (UnsafeInput, OSError) as error:
        raise CheckpointError(" ".join(str(error).split())) from None


def normalized_spec(name: str, spec) -> dict:
    """The spec of layer `name` with its format filled in, validated; CheckpointError names the field."""
    where = f"quantization_config.layers[{name!r}]"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where} must be a mapping, got {type(spec).__name__}")
    spec = {"format": DEFAULT_FORMAT, **spec}
    for field, kind in COMMON_SPEC_FIELDS.items():
        if field not in spec:
            raise CheckpointError(f"{where}.{field} is missing")
        if not isinstance(spec[field], kind) or (kind is int and isinstance(spec[field], bool)):
            raise CheckpointError(f"{where}.{field} has the wrong type: {spec[field]!r}")
    if spec["kind"] not in DENSE_KINDS:
        raise CheckpointError(f"{where}.kind must be one of {sorted(DENSE_KINDS)}, got {spec['kind']!r}")
    try:
        format_class(spec["format"]).check_spec(spec, where)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}" if where not in str(error) else str(error)) from None
    return spec


def skeleton(spec: dict, dtype: torch.dtype, device: torch.device | str = "meta") -> nn.Module:
    """An empty layer of the spec's format (on meta unless told otherwise)."""
    return format_class(spec["format"]).from_spec(spec, dtype, device)


def expected_tensors(layers: dict[str, dict]) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """{tensor name: (shape, allowed safetensors dtype codes)}, read off each layer's meta skeleton."""
    expected = {}
    for name, spec in layers.items():
        try:
            layer = skeleton(spec, torch.float32)
        except CheckpointError:
            raise
        except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as error:  # sizes torch refuses
            reason = " ".join(str(error).split())[:200]
            raise CheckpointError(f"quantization_config.layers[{name!r}] builds no layer ({type(error).__name__}: "
                                  f"{reason})") from None
        for key, tensor in layer.state_dict().items():
            if tensor.is_floating_point():
                codes = ("F32",) if key in layer.FP32_BUFFERS else FLOAT_CODES
            else:
                codes = _DTYPE_CODES[tensor.dtype]
            expected[f"{name}.{key}"] = (tuple(tensor.shape), codes)
    return expected


def replace_with_skeletons(model: nn.Module, layers: dict[str, dict], dtype: torch.dtype) -> None:
    """Swap each compressed layer of an empty model for its format's skeleton on the meta device.

    Float storage and biases get `dtype`; int storage keeps its dtype and scales stay float32, so a
    loader that casts to the skeleton's dtypes (accelerate, transformers) keeps them.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, spec in layers.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"quantization_config.layers names {name!r}, which {type(model).__name__} does not have"
            ) from None
        if type(dense).__name__ != spec["kind"] or not isinstance(dense, tuple(DENSE_KINDS.values())):
            kind = type(dense).__name__
            raise CheckpointError(f"{name}: quantization_config says {spec['kind']}, the model has {kind}")
        if tuple(dense_weight(dense).shape) != (spec["out_features"], spec["in_features"]):
            raise CheckpointError(
                f"{name}: quantization_config says in={spec['in_features']}, out={spec['out_features']}, "
                f"the model's layer is [out, in] = {list(dense_weight(dense).shape)}"
            )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, skeleton(spec, dtype))
        if dense is head:
            untie_head(model)


def tensor_checksums(state_dict: dict[str, torch.Tensor], offloaded=None) -> dict[str, str]:
    """sha256 of each tensor's raw bytes, exactly as safetensors writes them.

    A tensor on the meta device (offloaded by accelerate) is hashed where it is loaded from: `offloaded(name)`
    returns it (transformers' load_offloaded_parameter, which save_pretrained also uses to write it). Without
    one, or when it cannot be found, the save fails: a checksum is never left empty."""
    sums = {}
    for name, tensor in state_dict.items():
        if tensor.device.type == "meta":
            try:
                tensor = offloaded(name) if offloaded is not None else None
            except (ValueError, KeyError, AttributeError):
                tensor = None
            if tensor is None or tensor.device.type == "meta":
                raise ValueError(f"tensor {name!r} is on the meta device and not offloaded anywhere: "
                                 "the model holds no bytes to save for it")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        sums[name] = hashlib.sha256(raw).hexdigest()
    return sums


def header_entries(state_dict: dict[str, torch.Tensor]) -> list:
    """[name, safetensors dtype code, shape] of every tensor, sorted: what the record holds against each header."""
    return sorted([name, _CODES.get(t.dtype, str(t.dtype)), list(t.shape)] for name, t in state_dict.items())


def config_digest_input(config_json: dict) -> dict:
    """config.json as the record covers it: all of it but COSMETIC_CONFIG_FIELDS."""
    return {k: v for k, v in config_json.items() if k not in COSMETIC_CONFIG_FIELDS}


def covered_config(layers: dict[str, dict], tie_word_embeddings, format_version: int = FORMAT_VERSION) -> dict:
    """The part of config.json that decides how the tensors are read: covered by the checksum record."""
    return {"format_version": format_version, "layers": layers, "tie_word_embeddings": bool(tie_word_embeddings)}


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def integrity_record(covered: dict, names: Iterable[str], entries: list | None = None,
                     config_json: dict | None = None) -> dict[str, str]:
    """The record: "config" and "tensors" since issue 12; "header" (every tensor's name, dtype code and shape)
    and "config_json" (config.json but its cosmetic fields) since issue 22. A record without the last two
    (saved before) still loads, with a warning."""
    record = {"config": _sha256_json(covered), "tensors": _sha256_json(sorted(names))}
    if entries is not None:
        record["header"] = _sha256_json(sorted(entries))
    if config_json is not None:
        record["config_json"] = _sha256_json(config_digest_input(config_json))
    return record


def checksum_metadata(state_dict: dict[str, torch.Tensor], covered: dict, config_json: dict | None = None,
                      offloaded=None) -> dict[str, str]:
    """The safetensors metadata of a checkpoint holding exactly `state_dict`, described by `covered` and by
    `config_json` (the config.json that will be written beside it)."""
    return {
        CHECKSUM_KEY: json.dumps(tensor_checksums(state_dict, offloaded)),
        RECORD_KEY: json.dumps(integrity_record(covered, state_dict, header_entries(state_dict), config_json)),
    }


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a local checkpoint folder (single file or sharded index), each a regular file
    inside the folder. Only safetensors are ever read: a pytorch_model.bin beside them is ignored."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / INDEX_NAME
    if single.exists() or single.is_symlink():
        _check_regular(single)
        return [single]
    if index.exists() or index.is_symlink():
        weight_map = _weight_map(index)
        files = sorted({folder / name for name in weight_map.values()})
        for path in files:
            _check_regular(path)
        return files
    raise CheckpointError(f"{folder}: no model.safetensors or {INDEX_NAME}")


def _check_regular(path: Path) -> None:
    try:
        open_regular(path, "checkpoint file").close()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (UnsafeInput, OSError) as error:
        raise CheckpointError(" ".join(str(error).split())) from None


def _weight_map(index: Path) -> dict[str, str]:
    """The index's {tensor: shard file}, checked: a non-empty map of names to .safetensors files inside the folder."""
    data = read_checkpoint_json(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map is missing or empty")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not shard_name_ok(file):
            raise CheckpointError(
                f"{index}: weight_map[{name!r}] = {file!r} is not a .safetensors file inside the folder"[:300]
            )
    return weight_map


def shard_name_ok(name: str) -> bool:
    """A shard path from an index stays inside the checkpoint folder: relative, no '..', a .safetensors file."""
    parts = name.split("/")
    return (
        name.endswith(".safetensors")
        and not name.startswith("/")
        and "\\" not in name
        and "\x00" not in name
        and all(part not in ("", ".", "..") for part in parts)
    )


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors `__metadata__` of one file (CheckpointError if its header is damaged)."""
    return _read_header(Path(path))[1]


def _read_header(path: Path) -> tuple[dict, dict, int, int]:
    """(tensor entries, metadata, byte offset of the data section, file size), every entry's fields checked and
    the entries tiling the data section exactly (no gap, overlap, alias or trailing byte), as safetensors does."""
    try:
        f = open_regular(path, "checkpoint file")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (UnsafeInput, OSError) as error:
        raise CheckpointError(" ".join(str(error).split())) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated, {size} bytes is shorter than the safetensors header length")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {length:,} bytes is above the "
                                  f"{MAX_HEADER_BYTES:,}-byte limit")
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated, header needs {length} bytes but the file has {size - 8}")
        raw = f.read(length)
    if not raw.startswith(b"{"):  # safetensors' own rule (no BOM, no leading space)
        raise CheckpointError(f"{path}: the safetensors header does not start with '{{'")
    try:
        header = parse_json(raw, f"{path}: safetensors header")
    except UnsafeInput as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ is not a map of strings")
    for name, info in header.items():
        _check_entry(path, name, info, size - 8 - length)
    _check_tiling(path, header, size - 8 - length)
    return header, metadata, 8 + length, size


def _check_tiling(path: Path, header: dict, data_size: int) -> None:
    """safetensors' own rule: sorted by offset, the entries cover the data section exactly once."""
    seen: dict[tuple, str] = {}
    for name, info in header.items():
        offsets = tuple(info["data_offsets"])
        if offsets[1] > offsets[0] and offsets in seen:
            raise CheckpointError(f"tensor {name!r} in {path}: data_offsets {list(offsets)} alias those of "
                                  f"{seen[offsets]!r}")
        seen[offsets] = name
    end = 0
    for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = info["data_offsets"]
        if begin != end:
            what = "overlaps (or aliases) another tensor's bytes" if begin < end else "leaves a gap before it"
            raise CheckpointError(f"tensor {name!r} in {path}: data_offsets {[begin, stop]} {what}")
        end = stop
    if end != data_size:
        raise CheckpointError(f"{path}: {data_size - end} trailing byte(s) after the last tensor's data")


def _check_entry(path: Path, name: str, info, data_size: int) -> None:
    """A garbled header entry gets a CheckpointError naming it, not a KeyError deep in a loader."""
    where = f"tensor {name!r} in {path}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{where}: header entry is not {{dtype, shape, data_offsets}}: {info!r}"[:300])
    offsets, shape = info["data_offsets"], info["shape"]
    if not isinstance(info["dtype"], str) or info["dtype"] not in _ITEMSIZES:
        raise CheckpointError(f"{where}: unknown header dtype {info['dtype']!r}"[:300])
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: header shape is not a list of sizes: {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: header data_offsets is not [begin, end]: {offsets!r}")
    itemsize = _ITEMSIZES[info["dtype"]]
    if offsets[1] - offsets[0] != itemsize * math.prod(shape):
        raise CheckpointError(
            f"{where}: {offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']} "
            f"({itemsize * math.prod(shape)} expected)"
        )
    if offsets[1] > data_size:
        raise CheckpointError(
            f"{where}: data ends at byte {offsets[1]} of the data section, which has {data_size} (truncated)"
        )


def verify_checkpoint(
    files: list[Path], layers: dict[str, dict], covered: dict, verify: bool = True, config_json: dict | None = None
) -> set[str]:
    """Raise CheckpointError naming the file, tensor or field if `files` do not hold what `layers` describe.

    covered: `covered_config(...)` as config.json states it now, held against the checksum record, and
    config_json: config.json itself as read from the folder (the record covers it but its cosmetic fields).
    verify=False skips the checksums and the record (for a file written without them); the structure,
    shapes, dtypes and finite scales are checked either way. Returns the names of all tensors stored.
    """
    files = [Path(f) for f in files]
    if not files:
        raise CheckpointError("the checkpoint has no safetensors file")
    for path in files:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: triton_lowrank checkpoints load from .safetensors files only")
    expected = expected_tensors(layers)
    scales = {name for name, (_, codes) in expected.items() if codes == ("F32",)}
    found: dict[str, dict] = {}
    where: dict[str, str] = {}
    records = []
    for path in files:
        header, metadata, data_start, _ = _read_header(path)
        for name in header:
            if name in found:
                raise CheckpointError(f"tensor {name!r} is stored twice ({path} and another file of the checkpoint)")
            where[name] = path.name
        found.update(header)
        sums = _checksums(path, metadata) if verify else None
        if verify and RECORD_KEY in metadata:
            records.append((path, metadata[RECORD_KEY], sums))
        _check_data(path, header, data_start, sums, scales & header.keys())
    _check_index(files, where)
    if verify:
        _check_record(files, records, covered, found, config_json)
    for name, (shape, codes) in expected.items():
        if name not in found:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint ({', '.join(map(str, files))})")
        if tuple(found[name]["shape"]) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {found[name]['shape']}, expected {list(shape)}")
        if found[name]["dtype"] not in codes:
            raise CheckpointError(f"tensor {name!r} has dtype {found[name]['dtype']}, expected one of {codes}")
    for layer in layers:
        if f"{layer}.weight" in found:
            raise CheckpointError(f"tensor '{layer}.weight': a dense weight for compressed layer {layer!r}")
    return set(found)


def _check_index(files: list[Path], where: dict[str, str]) -> None:
    """A sharded checkpoint: every shard in one folder with its index, and the index naming, for each tensor,
    the shard that holds it (a loader reads each tensor from the shard the index names)."""
    if len(files) == 1 and files[0].name == "model.safetensors":
        return
    folders = {Path(os.path.normpath(f.parent)) for f in files}
    if len(folders) != 1:
        raise CheckpointError(f"the shards of the checkpoint lie in different folders: {sorted(map(str, folders))}")
    folder = folders.pop()
    index = folder / INDEX_NAME
    if not index.exists():
        raise CheckpointError(f"{folder}: {len(files)} safetensors file(s) without {INDEX_NAME}")
    weight_map = _weight_map(index)
    listed = {folder / name for name in weight_map.values()}
    if listed != {Path(os.path.normpath(f)) for f in files}:
        raise CheckpointError(f"{index}: its shards are not the files being loaded")
    for name, file in sorted(where.items()):
        if weight_map.get(name) != file:
            raise CheckpointError(f"{index}: tensor {name!r} is in {file}, the index says {weight_map.get(name)!r}")
    unknown = sorted(set(weight_map) - set(where))
    if unknown:
        raise CheckpointError(f"{index}: names tensor {unknown[0]!r}, which no shard holds")


def _checksums(path: Path, metadata: dict) -> dict:
    if CHECKSUM_KEY not in metadata:
        raise CheckpointError(
            f"{path} has no checksums ({CHECKSUM_KEY!r} metadata): it was not saved by triton_lowrank or its "
            "metadata was stripped; load_compressed(..., verify=False) loads it unverified"
        )
    try:
        sums = parse_json(metadata[CHECKSUM_KEY], CHECKSUM_KEY)
    except UnsafeInput:
        sums = None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{path}: metadata field {CHECKSUM_KEY!r} is not a JSON map of checksums")
    for name, digest in sums.items():
        if digest is None:
            raise CheckpointError(
                f"tensor {name!r} in {path} has a null checksum: every tensor is checked; a file saved with "
                "offloaded tensors before they were hashed must be saved again (or loaded with verify=False)"
            )
        if not isinstance(digest, str) or len(digest) != 64:
            raise CheckpointError(f"tensor {name!r} in {path}: its checksum is not a sha256 hex digest")
    return sums


def _check_record(files: list[Path], records: list, covered: dict, found: dict[str, dict],
                  config_json: dict | None) -> None:
    """The record covers the quantization_config, the set of names, each tensor's dtype and shape and config.json.
    Version 1 files may predate the record (a warning); every version 2 writer wrote one."""
    stored = set(found)
    if len(records) < len(files):
        if records:
            raise CheckpointError(f"{records[0][0]} has a {RECORD_KEY!r} record, other files of the checkpoint lack it")
        if covered.get("format_version", 1) >= 2:
            raise CheckpointError(
                f"{files[0]} has no {RECORD_KEY!r} record, which every format version 2 file carries: "
                "it was stripped"
            )
        _older(files, "its checksums do not cover config.json's quantization_config")
        return
    path, record, sums = records[0]
    if any(r != record for _, r, _ in records):
        raise CheckpointError(f"the files of {path.parent} carry different {RECORD_KEY!r} records")
    try:
        record = parse_json(record, RECORD_KEY)
        config_sum, names_sum = record["config"], record["tensors"]
    except (UnsafeInput, KeyError, TypeError):
        raise CheckpointError(f"{path}: metadata field {RECORD_KEY!r} is not a JSON record") from None
    expected = integrity_record(covered, stored)
    if config_sum != expected["config"]:
        raise CheckpointError(
            f"{path.parent}/config.json does not match the checksum record in {path.name}: its quantization_config "
            "or tie_word_embeddings was changed after saving"
        )
    listed = set().union(*(s for _, _, s in records))  # the names the checksums were computed for
    gone, extra = sorted(listed - stored), sorted(stored - listed)
    if gone:
        raise CheckpointError(f"tensor {gone[0]!r} is missing from the checkpoint (its checksum record lists it)")
    if extra:
        raise CheckpointError(f"tensor {extra[0]!r} was added to the checkpoint after saving (no checksum lists it)")
    if names_sum != expected["tensors"]:
        raise CheckpointError(f"the set of tensors in {path.parent} was changed after saving (checksum record)")
    if "header" not in record or "config_json" not in record:
        _older(files, "its record does not cover the tensors' dtypes and shapes nor all of config.json")
        return
    entries = [[name, info["dtype"], info["shape"]] for name, info in found.items()]
    if record["header"] != _sha256_json(sorted(entries)):
        raise CheckpointError(
            f"a tensor's dtype or shape in the safetensors header of {path.parent} was changed after saving "
            "(checksum record)"
        )
    if config_json is None or record["config_json"] != _sha256_json(config_digest_input(config_json)):
        raise CheckpointError(
            f"{path.parent}/config.json was changed after saving (checksum record; only "
            f"{', '.join(COSMETIC_CONFIG_FIELDS)} may change)"
        )


def _older(files: list[Path], what: str) -> None:
    warnings.warn(
        f"{files[0].parent} was saved by an older triton_lowrank: {what}; save it again to cover it",
        UserWarning,
        stacklevel=5,
    )


def _check_data(path: Path, header: dict, data_start: int, sums: dict | None, scales: set[str]) -> None:
    """Each tensor's bytes against its checksum (when verifying), and every scale finite."""
    todo = header if sums is not None else {name: header[name] for name in scales}
    if not todo:
        return
    try:
        f = open_regular(path, "checkpoint file")
    except (UnsafeInput, OSError) as error:
        raise CheckpointError(" ".join(str(error).split())) from None
    with f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if len(data) < data_start + max(info["data_offsets"][1] for info in todo.values()):
            raise CheckpointError(f"{path}: the file changed while it was read")
        for name, info in todo.items():
            if sums is not None and name not in sums:
                raise CheckpointError(f"tensor {name!r} in {path} has no checksum in {CHECKSUM_KEY!r}")
            begin, end = info["data_offsets"]
            digest, bad = None, 0
            with memoryview(data)[data_start + begin : data_start + end] as raw:  # released before any raise
                if sums is not None:
                    digest = hashlib.sha256(raw).hexdigest()
                if name in scales and info["dtype"] == "F32":
                    bad = int((~np.isfinite(np.frombuffer(raw, "<f4"))).sum())
            if digest is not None and digest != sums[name]:
                raise CheckpointError(f"tensor {name!r} in {path}: checksum mismatch, the bytes were changed")
            if bad:
                raise CheckpointError(f"tensor {name!r} in {path}: {bad} scale(s) are NaN or infinite")


def check_complete(model: nn.Module, stored: set[str]) -> None:
    """Every parameter and persistent buffer of `model` is stored, tied ones once, and nothing else is:
    a loader would otherwise leave a missing tensor empty (or random) and let an extra one overwrite a tied weight."""
    expected = set(model.state_dict())
    groups = _tied_groups(model, expected)
    for group in groups:
        present = sorted(stored & group)
        if len(present) > 1:
            raise CheckpointError(
                f"tensors {present} are one tied weight in the model, but the checkpoint stores each: "
                f"{present[1]!r} would overwrite {present[0]!r}"
            )
        if not present:
            first, *others = sorted(group)
            raise CheckpointError(f"tensor {first!r} is missing from the checkpoint (tied with {others})")
    tied = set().union(*groups)
    missing = sorted(expected - tied - stored)
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing)")
    extra = sorted(stored - expected)
    if extra:
        raise CheckpointError(
            f"tensor {extra[0]!r} in the checkpoint is no parameter or buffer of the model ({len(extra)} unexpected)"
        )


def _tied_groups(model: nn.Module, names: set[str]) -> list[set[str]]:
    """Names among `names` that are one tensor: tied already (the same Parameter), or by the model's tie
    mapping (`all_tied_weights_keys`: from_pretrained ties after loading)."""
    links = [set(group) for group in find_tied_parameters(model)]
    links += [{target, source} for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()]
    groups: list[set[str]] = []
    for link in links:
        members = link & names  # a compressed head has no `weight` left to tie
        if len(members) < 2:
            continue
        for group in [g for g in groups if g & members]:
            groups.remove(group)
            members |= group
        groups.append(members)
    return groups
