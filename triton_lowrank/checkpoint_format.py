"""The on-disk format of a compressed model: layer specs, expected tensors, checksums, verification.

A compressed checkpoint is a standard HF folder. config.json carries a `quantization_config` with
quant_method "triton_lowrank", a format version and, per compressed layer, the spec of its weight
format (formats.py: "format", "kind", "in_features", "out_features", "bias", plus the format's own
fields). model.safetensors holds each layer's buffers and bias in their storage dtypes; no dense
`<layer>.weight` of a compressed layer is ever written or built.

Integrity: the safetensors metadata key CHECKSUM_KEY holds a JSON map {tensor: sha256 of its raw
bytes}. `verify_checkpoint` checks the header, every expected tensor's presence, shape and dtype,
and those checksums before a single tensor is loaded, in both load paths.

Format versions: 1 is the only one so far. A layer spec without "format" (as written before
formats were registered) is a "lowrank" layer.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import torch
from torch import nn

from .formats import COMMON_SPEC_FIELDS, DENSE_KINDS, dense_weight, format_class, untie_head

QUANT_METHOD = "triton_lowrank"
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
CHECKSUM_KEY = "triton_lowrank.sha256"
DEFAULT_FORMAT = "lowrank"  # layer specs written before "format" existed
FLOAT_CODES = ("F32", "F16", "BF16")  # float storage and biases follow the model's float dtype
_DTYPE_CODES = {torch.int8: ("I8",), torch.uint8: ("U8",), torch.int32: ("I32",)}


class CheckpointError(ValueError):
    """A compressed checkpoint that does not match its quantization_config; the message names the field or tensor."""


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
        layer = skeleton(spec, torch.float32)
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


def tensor_checksums(state_dict: dict[str, torch.Tensor]) -> dict[str, str | None]:
    """sha256 of each tensor's raw bytes, exactly as safetensors writes them."""
    sums = {}
    for name, tensor in state_dict.items():
        if tensor.device.type == "meta":
            sums[name] = None  # offloaded: no bytes to hash here; recorded as unchecked, not as missing
            continue
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        sums[name] = hashlib.sha256(raw).hexdigest()
    return sums


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a local checkpoint folder (single file or sharded index)."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _read_header(path: Path) -> tuple[dict, int, int]:
    """(header, byte offset of the data section, file size), with the header's own bounds checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated, {size} bytes is shorter than the safetensors header length")
        length = int.from_bytes(prefix, "little")
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated, header needs {length} bytes but the file has {size - 8}")
        try:
            header = json.loads(f.read(length))
        except ValueError as error:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({error})") from None
    return header, 8 + length, size


def verify_checkpoint(files: list[Path], layers: dict[str, dict]) -> set[str]:
    """Raise CheckpointError naming the tensor or field if `files` do not hold what `layers` describe.

    Returns the names of all tensors stored."""
    found: dict[str, dict] = {}
    for path in map(Path, files):
        header, data_start, size = _read_header(path)
        metadata = header.pop("__metadata__", None) or {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise CheckpointError(
                    f"tensor {name!r} in {path}: data ends at byte {data_start + end}, the file has {size} (truncated)"
                )
            found[name] = info
        _verify_checksums(path, header, data_start, metadata)
    for name, (shape, codes) in expected_tensors(layers).items():
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


def _verify_checksums(path: Path, header: dict, data_start: int, metadata: dict) -> None:
    if CHECKSUM_KEY not in metadata:
        return  # written without triton_lowrank's quantizer attached: shapes and dtypes are still checked
    try:
        sums = json.loads(metadata[CHECKSUM_KEY])
    except ValueError:
        raise CheckpointError(f"{path}: metadata field {CHECKSUM_KEY!r} is not valid JSON") from None
    if not header:
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            for name, info in header.items():
                if name not in sums:
                    raise CheckpointError(f"tensor {name!r} in {path} has no checksum in {CHECKSUM_KEY!r}")
                if sums[name] is None:
                    continue  # saved from an offloaded model, where its bytes could not be hashed
                begin, end = info["data_offsets"]
                if hashlib.sha256(view[data_start + begin : data_start + end]).hexdigest() != sums[name]:
                    raise CheckpointError(f"tensor {name!r} in {path}: checksum mismatch, the bytes were changed")
        finally:
            view.release()
