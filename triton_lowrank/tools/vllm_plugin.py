"""vLLM quantization plugin: serve triton_lowrank checkpoints (both formats) with `vllm.LLM(model=DIR)`.

Installed with the package; vLLM finds it through the `vllm.general_plugins` entry point (pyproject.toml),
whose `register` imports this module. The checkpoint's config.json says quant_method "triton_lowrank", so vLLM
picks `TritonLowRankVllmConfig` with no extra argument. Each compressed linear layer gets
`TritonLowRankLinearMethod`; layers the checkpoint keeps dense get vLLM's own unquantized method.

Weights: the layer's stored tensors keep their checkpoint names (down, down_scale, up_t, up_t_scale; and base,
base_scale, base_zero for the hybrid format); the bias stays vLLM's own parameter. Every tensor is one flat
parameter holding the rank's share of each "block", a block being one stored factor pair (or hybrid weight):

- a layer the checkpoint stores whole (GPT-2's fused c_attn, c_fc, c_proj) is one block;
- a layer vLLM merges from several checkpoint layers (q/k/v -> qkv_proj, gate/up -> gate_up_proj) has one
  block per sub-matrix, loaded by the shard id vLLM passes, each with its own rank and storage; the forward
  runs one op per block and concatenates (no block-diagonal padding: no bytes or flops spent on zeros).

Tensor parallelism follows sharding.py: column-parallel layers keep their output spans of up_t, the base rows
and the bias; row-parallel layers keep their input span of down and the base columns, and vLLM's all-reduce
sums the partial outputs. A layer vLLM cannot serve this way (a compressed output head, a shard that cuts a
quantization group, sub-layers of one merged layer stored in different formats, a partly compressed merged
layer) raises CheckpointError naming the layer, before any output is produced.

The forward is the package's custom ops (`lowrank_matmul`, `hybrid_matmul`): the Triton kernels on CUDA
(custom ops: torch.compile and CUDA graphs see one opaque call), the package's CPU path elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from triton_lowrank.checkpoint.format import QUANT_METHOD, CheckpointError, skeleton
from triton_lowrank.checkpoint.hf_quantizer import TritonLowRankConfig
from triton_lowrank.core.factors import LowRankFactors
from triton_lowrank.core.quant import storage_group_size
from triton_lowrank.formats.hybrid.op import hybrid_matmul
from triton_lowrank.formats.hybrid.storage import HybridWeights
from triton_lowrank.formats.lowrank.op import lowrank_matmul
from triton_lowrank.tools.sharding import column_shard_tensor, row_shard_tensor, tp_spans

QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


def register() -> None:
    """The vllm.general_plugins entry point: importing this module registered the config; nothing else to do."""


@dataclass
class Block:
    """One stored factor pair (or hybrid weight) of a vLLM layer, as this rank holds it."""

    name: str  # the checkpoint layer it comes from
    spec: dict
    plan: tuple  # ("column", spans) | ("row", span, keep_bias) | ("full",)
    out_offset: int  # where its output starts in the layer's local output
    out_size: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # local shape of each stored tensor
    offsets: dict[str, int] = field(default_factory=dict)  # where it starts in the flat parameter
    loaded: set[str] = field(default_factory=set)


@register_quantization_config(QUANT_METHOD)
class TritonLowRankVllmConfig(QuantizationConfig):
    """The checkpoint's quantization_config (validated by the transformers integration's own class)."""

    def __init__(self, config: TritonLowRankConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = config.layers

    def __repr__(self) -> str:
        formats = sorted({spec["format"] for spec in self.layers.values()})
        return f"TritonLowRankVllmConfig({len(self.layers)} layers, formats={formats})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # what Triton supports

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TritonLowRankVllmConfig:
        fields = {k: v for k, v in config.items() if k not in ("bits", "group_size")}
        return cls(TritonLowRankConfig(**fields))

    def specs_for(self, prefix: str) -> list[tuple[str, dict]] | None:
        """[(checkpoint layer, spec)] that make up the vLLM layer `prefix`: itself, or the sub-layers vLLM merged
        into it; None if it is stored dense. A merged layer compressed in part is refused."""
        prefix = prefix.lstrip(".")
        if prefix in self.layers:
            return [(prefix, self.layers[prefix])]
        parent, _, child = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(child)
        if not subs:
            return None
        names = [f"{parent}.{sub}" if parent else sub for sub in subs]
        found = [name for name in names if name in self.layers]
        if not found:
            return None
        if len(found) != len(names):
            raise CheckpointError(
                f"{prefix}: vLLM merges {names} into one layer, but the checkpoint compresses only {found}; "
                "compress all of them or none"
            )
        return [(name, self.layers[name]) for name in names]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            specs = self.specs_for(prefix)
            return UnquantizedLinearMethod() if specs is None else TritonLowRankLinearMethod(prefix.lstrip("."), specs)
        if prefix.lstrip(".") in self.layers:
            raise CheckpointError(
                f"{prefix.lstrip('.')}: vLLM builds this layer as {type(layer).__name__}, which the triton_lowrank "
                "plugin does not serve (a compressed output head or embedding); compress with lm_head excluded "
                "(the default)"
            )
        return None


class TritonLowRankLinearMethod(LinearMethodBase):
    """Creates, loads (sharded) and runs the stored tensors of one compressed vLLM linear layer."""

    def __init__(self, prefix: str, specs: list[tuple[str, dict]]) -> None:
        self.prefix = prefix
        self.specs = specs
        formats = {spec["format"] for _, spec in specs}
        if len(formats) > 1:
            raise CheckpointError(f"{prefix}: vLLM merges {[n for n, _ in specs]} into one layer, but they are "
                                  f"stored in different formats {sorted(formats)}")

    # ---- layout ---------------------------------------------------------------------------------
    def _blocks(self, layer, input_size_per_partition: int, output_partition_sizes: list[int], input_size: int,
                output_size: int) -> list[Block]:
        where = self.prefix
        for name, spec in self.specs:
            if spec["in_features"] != input_size:
                raise CheckpointError(f"{name}: the checkpoint stores in_features={spec['in_features']}, vLLM's "
                                      f"{type(layer).__name__} {where} has {input_size}")
        if len(self.specs) > 1 and len(self.specs) != len(output_partition_sizes):
            raise CheckpointError(f"{where}: {len(self.specs)} checkpoint layers for {len(output_partition_sizes)} "
                                  "output partitions")
        totals = [spec["out_features"] for _, spec in self.specs]
        if sum(totals) != output_size and not isinstance(layer, QKVParallelLinear):
            raise CheckpointError(f"{where}: the checkpoint stores out_features={totals}, vLLM's layer has "
                                  f"{output_size}")
        tp_size, tp_rank = getattr(layer, "tp_size", 1), getattr(layer, "tp_rank", 0)
        if isinstance(layer, RowParallelLinear):
            span = (tp_rank * input_size_per_partition, input_size_per_partition)
            plans = [("row", span, tp_rank == 0)]
        elif isinstance(layer, ColumnParallelLinear):
            sizes = self._global_sizes(layer, output_partition_sizes)
            ranks = self._shard_ranks(layer, len(sizes))
            spans = tp_spans(sizes, tp_size, tp_rank, output_partition_sizes, ranks)
            if len(self.specs) == 1:
                if sum(sizes) != self.specs[0][1]["out_features"]:
                    raise CheckpointError(f"{where}: the checkpoint stores out_features="
                                          f"{self.specs[0][1]['out_features']}, vLLM's layer has {sizes}")
                plans = [("column", spans)]
            else:
                offsets = [sum(sizes[:j]) for j in range(len(sizes))]
                plans = [("column", [(start - offsets[j], size)]) for j, (start, size) in enumerate(spans)]
                for (name, spec), size in zip(self.specs, sizes, strict=True):
                    if spec["out_features"] != size:
                        raise CheckpointError(f"{name}: the checkpoint stores out_features={spec['out_features']}, "
                                              f"vLLM's merged layer {where} expects {size}")
        elif isinstance(layer, ReplicatedLinear) and len(self.specs) == 1:
            plans = [("full",)]
        else:
            raise CheckpointError(f"{where}: vLLM builds this layer as {type(layer).__name__}, which the "
                                  "triton_lowrank plugin does not serve")
        blocks, offset = [], 0
        for (name, spec), plan in zip(self.specs, plans, strict=True):
            if spec["bias"] != bool(getattr(layer, "has_bias", spec["bias"])):
                raise CheckpointError(f"{name}: the checkpoint says bias={spec['bias']}, vLLM's layer {where} "
                                      f"has bias={layer.has_bias}")
            size = sum(s for _, s in plan[1]) if plan[0] == "column" else spec["out_features"]
            blocks.append(Block(name, spec, plan, offset, size))
            offset += size
        if offset != sum(output_partition_sizes):
            raise CheckpointError(f"{where}: the stored layers give {offset} local outputs, vLLM expects "
                                  f"{sum(output_partition_sizes)}")
        return blocks

    @staticmethod
    def _global_sizes(layer, local_sizes: list[int]) -> list[int]:
        if isinstance(layer, QKVParallelLinear):
            head, v_head = layer.head_size, getattr(layer, "v_head_size", layer.head_size)
            return [layer.total_num_heads * head, layer.total_num_kv_heads * head, layer.total_num_kv_heads * v_head]
        if isinstance(layer, MergedColumnParallelLinear):
            return list(layer.output_sizes)
        return [layer.output_size]

    @staticmethod
    def _shard_ranks(layer, parts: int) -> list[int]:
        rank = getattr(layer, "tp_rank", 0)
        if isinstance(layer, QKVParallelLinear):
            return [rank, rank // layer.num_kv_head_replicas, rank // layer.num_kv_head_replicas]
        return [rank] * parts

    def _local(self, name: str, tensor: torch.Tensor, block: Block) -> torch.Tensor:
        where = f"{block.name} (vLLM layer {self.prefix})"
        try:
            if block.plan[0] == "column":
                return column_shard_tensor(name, tensor, block.spec, block.plan[1], where)
            if block.plan[0] == "row":
                return row_shard_tensor(name, tensor, block.spec, block.plan[1], where)
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        return tensor

    # ---- vLLM's interface ---------------------------------------------------------------------
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        blocks = self._blocks(layer, input_size_per_partition, output_partition_sizes, input_size, output_size)
        dtypes: dict[str, torch.dtype] = {}
        for block in blocks:
            stored = {k: v for k, v in skeleton(block.spec, params_dtype).state_dict().items() if k != "bias"}
            if dtypes and set(stored) != set(dtypes):
                raise CheckpointError(f"{self.prefix}: its sub-layers store different tensors "
                                      f"({sorted(stored)} vs {sorted(dtypes)})")
            for name, tensor in stored.items():
                if dtypes.setdefault(name, tensor.dtype) != tensor.dtype:
                    raise CheckpointError(f"{self.prefix}: its sub-layers store {name} as {tensor.dtype} and "
                                          f"{dtypes[name]}; merge layers stored alike")
                block.shapes[name] = tuple(self._local(name, tensor, block).shape)  # meta: shapes only
        for name, dtype in dtypes.items():
            total = 0
            for block in blocks:
                block.offsets[name] = total
                total += math.prod(block.shapes[name])
            param = torch.nn.Parameter(torch.empty(total, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._loader(layer, name)})
            layer.register_parameter(name, param)
        layer.triton_lowrank_blocks = blocks

    def _loader(self, layer, name: str):
        def weight_loader(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            blocks = layer.triton_lowrank_blocks
            if len(blocks) == 1 and shard_id is None:
                block = blocks[0]
            else:
                index = QKV_SHARDS.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
                if not isinstance(index, int) or not 0 <= index < len(blocks):
                    raise CheckpointError(f"{self.prefix}.{name}: vLLM passed shard {shard_id!r}, the layer has "
                                          f"{len(blocks)} stored sub-layers")
                block = blocks[index]
            local = self._local(name, loaded, block)
            if tuple(local.shape) != block.shapes[name]:
                raise CheckpointError(f"{block.name}.{name}: shape {list(loaded.shape)} in the checkpoint, its "
                                      f"spec expects a shard of {list(block.shapes[name])}")
            start = block.offsets[name]
            param.data[start : start + local.numel()].view(local.shape).copy_(local)
            block.loaded.add(name)

        return weight_loader

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        stored = []
        for block in layer.triton_lowrank_blocks:
            missing = sorted(set(block.shapes) - block.loaded)
            if missing:
                raise CheckpointError(f"{block.name}: tensor(s) {missing} were not in the checkpoint")
            views = {name: getattr(layer, name).data[start : start + math.prod(block.shapes[name])]
                     .view(block.shapes[name]) for name, start in block.offsets.items()}
            spec = block.spec
            factors = LowRankFactors(views["down"], views.get("down_scale"), views["up_t"], views.get("up_t_scale"),
                                     None, spec["bits"], storage_group_size(spec["bits"], spec["group_size"]))
            if spec["format"] == "hybrid":
                stored.append(HybridWeights(views["base"], views["base_scale"], views.get("base_zero"),
                                            spec["base_bits"], spec["base_group_size"], factors, None))
            else:
                stored.append(factors)
        layer.triton_lowrank_stored = stored

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        outputs = []
        for block, stored in zip(layer.triton_lowrank_blocks, layer.triton_lowrank_stored, strict=True):
            b = None if bias is None else bias[block.out_offset : block.out_offset + block.out_size]
            if isinstance(stored, HybridWeights):
                outputs.append(hybrid_matmul(x, stored._replace(bias=b)))
            else:
                outputs.append(lowrank_matmul(x, stored._replace(bias=b)))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
