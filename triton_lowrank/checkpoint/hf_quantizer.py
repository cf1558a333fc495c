"""The transformers integration: the quantization_config class and the HfQuantizer.

Importing this module registers both with transformers, so `AutoModelForCausalLM.from_pretrained(folder)`
rebuilds the compressed layers itself (through checkpoint_format.py, like load_compressed), and
`model.save_pretrained(folder)` on a model passed through `mark_compressed` writes a checksummed checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

try:  # transformers' own rule for which name of a tied weight is stored (not in every 5.x release)
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
except ImportError:
    remove_tied_weights_from_state_dict = None
try:  # how save_pretrained reads an offloaded tensor back to write it; we hash it the same way
    from transformers.integrations.accelerate import load_offloaded_parameter
except ImportError:
    load_offloaded_parameter = None
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from triton_lowrank.checkpoint.format import (
    FORMAT_VERSION,
    QUANT_METHOD,
    READABLE_VERSIONS,
    VERSION_1_FORMATS,
    CheckpointError,
    check_complete,
    checksum_metadata,
    covered_config,
    normalized_spec,
    read_checkpoint_json,
    replace_with_skeletons,
    verify_checkpoint,
)
from triton_lowrank.compression.compress import after_compression
from triton_lowrank.core.format import compressed_layers, untie_head


class TritonLowRankConfig(QuantizationConfigMixin):
    """quantization_config of a compressed model: everything needed to rebuild its layer skeletons.

    layers: {module name: spec of its weight format (formats.py)}.
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
        if format_version not in READABLE_VERSIONS:
            raise CheckpointError(
                f"quantization_config.format_version is {format_version!r}; this triton_lowrank reads "
                f"version(s) {', '.join(map(str, READABLE_VERSIONS))}"
            )
        if not isinstance(layers, dict) or not layers:
            raise CheckpointError("quantization_config.layers must be a non-empty {name: spec} mapping")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = {name: normalized_spec(name, spec) for name, spec in layers.items()}
        for name, spec in self.layers.items():
            if format_version == 1 and spec["format"] not in VERSION_1_FORMATS:
                raise CheckpointError(f"quantization_config.layers[{name!r}] is format {spec['format']!r}, which "
                                      f"format_version 1 does not have (it came with version 2)")
        self.bits, self.group_size = bits, group_size
        self.compression = compression

    @classmethod
    def from_model(cls, model: nn.Module, compression: dict | None = None) -> TritonLowRankConfig:
        """Describe every compressed layer of `model`."""
        layers = {name: m.spec() for name, m in compressed_layers(model).items()}
        if not layers:
            raise ValueError("the model has no compressed layer: run compress_model first")
        shared = {key: {spec.get(key) for spec in layers.values()} for key in ("bits", "group_size")}
        bits, group_size = (next(iter(v)) if len(v) == 1 else None for v in shared.values())
        return cls(layers, bits, group_size, compression=compression)


def _without_tied_aliases(state_dict: dict, model: nn.Module) -> dict:
    """Tied tensors once, keeping the name that is not declared tied (GPT-2: wte.weight, not lm_head.weight)."""
    declared = getattr(model, "_tied_weights_keys", None) or ()
    declared = set(declared.keys() if isinstance(declared, dict) else declared)
    kept, seen = {}, {}
    for name in sorted(state_dict, key=lambda n: n in declared):  # undeclared names first
        tensor = state_dict[name]
        key = None if tensor.is_meta else (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key is not None and key in seen:
            continue
        seen[key] = name
        kept[name] = tensor
    return {name: kept[name] for name in state_dict if name in kept}


def refuse_tensor_parallel(model: nn.Module) -> None:
    """transformers' tensor (and expert) parallelism shards parameters by its plan; our factors are buffers it
    ignores, and a plan would wrap our layers and take each full output for one rank's shard: wrong output, or a
    crash. Refused with one line, before anything is loaded. (vLLM shards our layers properly: vllm_plugin.py.)"""
    distributed = getattr(getattr(model, "config", None), "distributed_config", None)
    sizes = {key: getattr(distributed, key, None) or 1 for key in ("tp_size", "ep_size")}
    if distributed is not None and (max(sizes.values()) > 1 or getattr(distributed, "tp_plan", None)):
        raise CheckpointError(
            f"triton_lowrank checkpoints do not support transformers' tensor parallelism (tp_size={sizes['tp_size']}"
            f", ep_size={sizes['ep_size']}, tp_plan={getattr(distributed, 'tp_plan', None)!r}): load without "
            "distributed_config / tp_plan, or serve with vLLM, whose triton_lowrank plugin shards these layers"
        )


class TritonLowRankHfQuantizer(HfQuantizer):
    """Loads (and saves) pre-compressed checkpoints; compressing on load is compress_model's job."""

    requires_calibration = True  # pre-compressed only: from_pretrained refuses a dense folder with this config

    def preprocess_model(self, model, *args, **kwargs):
        refuse_tensor_parallel(model)
        # transformers passes the resolved files here; older 5.x do not forward them to the hook below
        self.checkpoint_files = kwargs.get("checkpoint_files")
        return super().preprocess_model(model, *args, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        # Everything is checked before a tensor is read: transformers would random-initialise a missing
        # tensor, skip an unexpected one and let a stored alias overwrite a tied weight, behind a load report.
        files = kwargs.get("checkpoint_files") or getattr(self, "checkpoint_files", None)
        if not files:
            raise CheckpointError("triton_lowrank checkpoints load from safetensors files only; none were given")
        config = self.quantization_config
        covered = covered_config(config.layers, model.config.tie_word_embeddings, config.format_version)
        files = [Path(f) for f in files]
        config_json = read_checkpoint_json(files[0].parent / "config.json", "config.json")  # the record covers it
        stored = verify_checkpoint(files, config.layers, covered, config_json=config_json)
        replace_with_skeletons(model, config.layers, model.dtype)
        check_complete(model, stored)
        for name in config.layers:
            # A parent's _init_weights may reach for `child.weight` (GPT-2 rescales c_proj.weight); the
            # parents' tensors come from the checkpoint, so their random init is skipped, as for loaded weights.
            model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        store_under_model_names(model)  # transformers just recorded the renamings it loaded through
        return model

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        # Called by save_pretrained before it writes anything. The state dict is what it will write (tied
        # weights once, by transformers' own rule), so the checksum record lists exactly the stored names.
        state_dict = dict(model.state_dict())
        if remove_tied_weights_from_state_dict is not None:
            state_dict = remove_tied_weights_from_state_dict(state_dict, model)
        else:
            state_dict = _without_tied_aliases(state_dict, model)
        for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
            state_dict.pop(key, None)
        config = self.quantization_config
        covered = covered_config(config.layers, model.config.tie_word_embeddings, config.format_version)
        offloaded = None if load_offloaded_parameter is None else lambda name: load_offloaded_parameter(model, name)
        return state_dict, checksum_metadata(state_dict, covered, config_json_to_write(model), offloaded)

    def is_serializable(self, *args, **kwargs) -> bool:  # a method in 5.x (older ones pass safe_serialization)
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:  # lets generate() auto-compile with a static cache
        return True


def config_json_to_write(model: nn.Module) -> dict:
    """The config.json save_pretrained is about to write, for the checksum record: it sets these two fields
    right after asking for the state dict, then writes the config's diff against the defaults."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    return json.loads(model.config.to_json_string(use_diff=True))


def mark_compressed(model: nn.Module) -> TritonLowRankConfig:
    """Attach a quantization_config and the quantizer to a compressed model, as from_pretrained would.

    Afterwards `model.save_pretrained(folder)` writes a loadable, checksummed checkpoint. The
    LowRankConfig that compress_model recorded (or the one a loaded checkpoint carried) is kept,
    for information only.
    """
    made_by = getattr(model, "compression_config", None)
    previous = getattr(getattr(model, "config", None), "quantization_config", None)
    compression = made_by.to_dict() if made_by is not None else getattr(previous, "compression", None)
    config = TritonLowRankConfig.from_model(model, compression)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head in compressed_layers(model).values():
        untie_head(model)
    attach_quantizer(model, config)
    return config


def store_under_model_names(model: nn.Module) -> None:
    """Our checkpoints store every tensor under the model's own name. transformers would otherwise rename some
    on save to an older checkpoint layout (GPT-NeoX: lm_head -> embed_out), after the checksums were taken, and
    accelerate (load_compressed) reads names as they are stored: no renaming to reverse, then."""
    model._weight_conversions = []


def attach_quantizer(model: nn.Module, config: TritonLowRankConfig) -> None:
    store_under_model_names(model)
    model.config.quantization_config = config
    model.hf_quantizer = TritonLowRankHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


@after_compression
def _attach_after_compression(model: nn.Module) -> None:
    """A compressed transformers model gets the quantizer at once, so `model.save_pretrained` writes a
    loadable checkpoint straight after compress_model."""
    if isinstance(model, PreTrainedModel):
        mark_compressed(model)


# Registered once per process, even if this module is imported again (e.g. reloaded in a notebook).
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(TritonLowRankConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(TritonLowRankHfQuantizer)
