"""The on-disk format of a compressed model, and its transformers integration.

A compressed checkpoint is a standard HF folder: config.json carries a `quantization_config`
with quant_method "triton_lowrank" (format version, and per compressed layer: the dense kind
it replaced, in/out features, rank, bits, group size, bias), and model.safetensors holds the
LowRankLinear buffers `<layer>.down`, `.up_t`, `.down_scale`, `.up_t_scale`, `.bias` in their
storage dtypes. No dense `<layer>.weight` of a compressed layer is ever written or built.

Integrity: the safetensors metadata key CHECKSUM_KEY holds a JSON map {tensor: sha256 of its
raw bytes}. `verify_checkpoint` checks the header, every expected tensor's presence, shape and
dtype, and those checksums before a single tensor is loaded, in both load paths. A file
without the key (written by another tool) is still checked for everything but the bytes.

Importing this module registers the config and the quantizer with transformers, so
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds the LowRankLinear layers itself.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .factorize import SUPPORTED_MODULES, dense_weight
from .layers import LowRankLinear
from .quant import check_bits, storage_shapes

QUANT_METHOD = "triton_lowrank"
FORMAT_VERSION = 1
CHECKSUM_KEY = "triton_lowrank.sha256"
LAYER_FIELDS = {
    "kind": str,  # the dense class replaced: "Linear" or "Conv1D"
    "in_features": int,
    "out_features": int,
    "rank": int,
    "bits": (int, type(None)),
    "group_size": int,
    "bias": bool,
}
FLOAT_CODES = ("F32", "F16", "BF16")  # bits=None factors and biases follow the model's float dtype


class CheckpointError(ValueError):
    """A compressed checkpoint that does not match its quantization_config; the message names the field or tensor."""


class TritonLowRankConfig(QuantizationConfigMixin):
    """quantization_config of a compressed model: everything needed to rebuild its layer skeletons.

    layers: {module name: {"kind", "in_features", "out_features", "rank", "bits", "group_size", "bias"}}.
    bits / group_size: the value shared by all layers (None when layers differ), for humans and tools.
    compression: the LowRankConfig used, informational only.
    """

    def __init__(
        self,
        layers: dict[str, dict],
        bits: int | None = None,
        group_size: int | None = None,
        format_version: int = FORMAT_VERSION,
        compression: dict | None = None,
        quant_method: str = QUANT_METHOD,
        **later_fields,  # additions that keep the format version; a breaking change bumps FORMAT_VERSION
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise CheckpointError(f"quantization_config.quant_method is {quant_method!r}, expected {QUANT_METHOD!r}")
        if format_version != FORMAT_VERSION:
            raise CheckpointError(
                f"quantization_config.format_version is {format_version!r}; this triton_lowrank reads "
                f"version {FORMAT_VERSION} only"
            )
        if not isinstance(layers, dict) or not layers:
            raise CheckpointError("quantization_config.layers must be a non-empty {name: spec} mapping")
        for name, spec in layers.items():
            _check_layer_spec(name, spec)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = layers
        self.bits, self.group_size = bits, group_size
        self.compression = compression

    @classmethod
    def from_model(cls, model: nn.Module, compression: dict | None = None) -> TritonLowRankConfig:
        """Describe every LowRankLinear of `model`."""
        compressed = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
        if not compressed:
            raise ValueError("the model has no LowRankLinear layer: run compress_model first")
        layers = {
            name: {
                "kind": m.replaces,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "rank": m.rank,
                "bits": m.bits,
                "group_size": m.group_size,
                "bias": m.bias is not None,
            }
            for name, m in compressed.items()
        }
        shared = {key: {spec[key] for spec in layers.values()} for key in ("bits", "group_size")}
        bits, group_size = (next(iter(v)) if len(v) == 1 else None for v in shared.values())
        return cls(layers, bits, group_size, compression=compression)


def _check_layer_spec(name: str, spec: dict) -> None:
    where = f"quantization_config.layers[{name!r}]"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where} must be a mapping, got {type(spec).__name__}")
    for field, kind in LAYER_FIELDS.items():
        if field not in spec:
            raise CheckpointError(f"{where}.{field} is missing")
        if not isinstance(spec[field], kind) or (kind is int and isinstance(spec[field], bool)):
            raise CheckpointError(f"{where}.{field} has the wrong type: {spec[field]!r}")
    if spec["kind"] not in ("Linear", "Conv1D"):
        raise CheckpointError(f"{where}.kind must be 'Linear' or 'Conv1D', got {spec['kind']!r}")
    try:
        check_bits(spec["bits"], spec["group_size"], spec["in_features"], f"{where} (in_features)")
        check_bits(spec["bits"], spec["group_size"], spec["out_features"], f"{where} (out_features)")
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def expected_tensors(config: TritonLowRankConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """{tensor name: (shape, allowed safetensors dtype codes)} for every compressed layer."""
    storage_code = {None: FLOAT_CODES, 8: ("I8",), 4: ("U8",)}
    expected = {}
    for name, spec in config.layers.items():
        for factor, features in (("down", spec["in_features"]), ("up_t", spec["out_features"])):
            data_shape, scale_shape = storage_shapes(spec["rank"], features, spec["bits"], spec["group_size"])
            expected[f"{name}.{factor}"] = (data_shape, storage_code[spec["bits"]])
            if scale_shape is not None:
                expected[f"{name}.{factor}_scale"] = (scale_shape, ("F32",))
        if spec["bias"]:
            expected[f"{name}.bias"] = ((spec["out_features"],), FLOAT_CODES)
    return expected


def replace_with_skeletons(model: nn.Module, config: TritonLowRankConfig, dtype: torch.dtype) -> None:
    """Swap each compressed layer of an empty model for a LowRankLinear on the meta device.

    Factors of bits=None layers and biases get `dtype`; int storage keeps its dtype and scales stay
    float32, so a loader that casts to the skeleton's dtypes (accelerate, transformers) keeps them.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, spec in config.layers.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"quantization_config.layers names {name!r}, which {type(model).__name__} does not have"
            ) from None
        if type(dense).__name__ != spec["kind"] or not isinstance(dense, SUPPORTED_MODULES):
            kind = type(dense).__name__
            raise CheckpointError(f"{name}: quantization_config says {spec['kind']}, the model has {kind}")
        if tuple(dense_weight(dense).shape) != (spec["out_features"], spec["in_features"]):
            raise CheckpointError(
                f"{name}: quantization_config says in={spec['in_features']}, out={spec['out_features']}, "
                f"the model's layer is [out, in] = {list(dense_weight(dense).shape)}"
            )
        skeleton = LowRankLinear(
            spec["in_features"], spec["out_features"], spec["rank"], spec["bits"], spec["group_size"],
            spec["bias"], dtype, device="meta", name=name, replaces=spec["kind"],
        )  # fmt: skip
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, skeleton)
        if dense is head:
            model.config.tie_word_embeddings = False  # a compressed head cannot share the embedding matrix


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


def verify_checkpoint(files: list[Path], config: TritonLowRankConfig) -> set[str]:
    """Raise CheckpointError naming the tensor or field if `files` do not hold what `config` describes.

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
    for name, (shape, codes) in expected_tensors(config).items():
        if name not in found:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint ({', '.join(map(str, files))})")
        if tuple(found[name]["shape"]) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {found[name]['shape']}, expected {list(shape)}")
        if found[name]["dtype"] not in codes:
            raise CheckpointError(f"tensor {name!r} has dtype {found[name]['dtype']}, expected one of {codes}")
    for layer in config.layers:
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


class TritonLowRankHfQuantizer(HfQuantizer):
    """Loads (and saves) pre-compressed checkpoints; compressing on load is compress_model's job."""

    requires_calibration = True  # pre-compressed only: from_pretrained refuses a dense folder with this config

    def preprocess_model(self, model, *args, **kwargs):
        # transformers passes the resolved files here; older 5.x do not forward them to the hook below
        self.checkpoint_files = kwargs.get("checkpoint_files")
        return super().preprocess_model(model, *args, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        files = kwargs.get("checkpoint_files") or getattr(self, "checkpoint_files", None)
        if files:  # verify before any tensor is read: transformers would random-init a missing one
            verify_checkpoint([Path(f) for f in files], self.quantization_config)
        replace_with_skeletons(model, self.quantization_config, model.dtype)
        for name in self.quantization_config.layers:
            # A parent's _init_weights may reach for `child.weight` (GPT-2 rescales c_proj.weight); the
            # parents' tensors come from the checkpoint, so their random init is skipped, as for loaded weights.
            model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True
        return model

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        # Called by save_pretrained before it writes anything: stamp the checksums into the metadata.
        return None, {CHECKSUM_KEY: json.dumps(tensor_checksums(model.state_dict()))}

    def is_serializable(self, *args, **kwargs) -> bool:  # a method in 5.x (older ones pass safe_serialization)
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:  # lets generate() auto-compile with a static cache
        return True


def mark_compressed(model: nn.Module, compression: dict | None = None) -> TritonLowRankConfig:
    """Attach a quantization_config and the quantizer to a compressed model, as from_pretrained would.

    Afterwards `model.save_pretrained(folder)` writes a loadable, checksummed checkpoint.
    `compression` (a LowRankConfig.to_dict()) is recorded for information only.
    """
    config = TritonLowRankConfig.from_model(model, compression)
    attach_quantizer(model, config)
    return config


def attach_quantizer(model: nn.Module, config: TritonLowRankConfig) -> None:
    model.config.quantization_config = config
    model.hf_quantizer = TritonLowRankHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


# Registered once per process, even if this module is imported again (e.g. reloaded in a notebook).
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(TritonLowRankConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(TritonLowRankHfQuantizer)
