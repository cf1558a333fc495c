"""Block-by-block calibration (as GPTQ and SVD-LLM do): each transformer block is calibrated on the
outputs of the blocks before it, as they are after compression, and only one block's Gram matrices
are ever in memory.

1. The inputs (args, kwargs) of block 0 are captured for every calibration batch: a forward pre-hook
   on block 0 records them and raises, so the rest of the model never runs.
2. For each block: run it on its inputs with hooks on its selected layers (GramStats), hand those
   statistics to `visit` (which compresses the block's layers, or only measures them), then run the
   block again to get the next block's inputs.
3. Selected layers outside the blocks (BERT's pooler, an included lm_head) are calibrated last, by
   running the whole model, whose blocks are by then compressed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from triton_lowrank.core.calibration import (
    GramCollector,
    GramStats,
    batch_mask,
    check_coverage,
    check_reached,
    eval_mode,
    model_device,
    run_batch,
    token_counts,
)

# visit(layers of one block or the outside group, their statistics): called once per group, in model order.
Visit = Callable[[dict[str, nn.Module], dict[str, GramStats]], None]


def find_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """(name, ModuleList) of the model's repeated transformer blocks: the ModuleList whose children hold
    the most selected layers (GPT-2 `transformer.h`, BERT `encoder.layer`, Llama `model.layers`), or None."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        prefix = f"{name}."
        count = sum(n.startswith(prefix) for n in layers)
        if count > best_count:
            best, best_count = (name, module), count
    return best


@dataclass
class BlockInput:
    args: tuple
    kwargs: dict[str, Any]
    mask: torch.Tensor | None  # [B, T] bool real tokens of the batch, or None


class _Captured(Exception):
    """Raised by the pre-hook on block 0 once its inputs are recorded: nothing after it needs to run."""


def capture_block_inputs(model: nn.Module, block: nn.Module, calibration: Iterable) -> list[BlockInput]:
    """The (args, kwargs) block 0 receives for each calibration batch, with the batch's mask."""
    device = model_device(model)
    captured: list[BlockInput] = []
    mask = None

    def hook(module, args, kwargs):
        captured.append(BlockInput(args, kwargs, mask))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False  # a KV cache would grow with every replay of a block
    try:
        for index, batch in enumerate(calibration):
            mask = batch_mask(batch, device)
            try:
                run_batch(model, batch, device, f"calibration batch {index}")
            except _Captured:
                continue
            raise ValueError("calibration batch ran through the model without reaching its first block")
    finally:
        handle.remove()
        if use_cache is not None:
            config.use_cache = use_cache
    return captured


def _hidden(inputs: BlockInput) -> torch.Tensor:
    return inputs.args[0] if inputs.args else inputs.kwargs["hidden_states"]


def _with_hidden(inputs: BlockInput, hidden: torch.Tensor) -> BlockInput:
    if inputs.args:
        return BlockInput((hidden, *inputs.args[1:]), inputs.kwargs, inputs.mask)
    return BlockInput(inputs.args, {**inputs.kwargs, "hidden_states": hidden}, inputs.mask)


def _run_block(block: nn.Module, inputs: BlockInput, collector: GramCollector | None = None) -> torch.Tensor:
    if collector is not None:
        collector.mask = inputs.mask
    out = block(*inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, tuple) else out  # [B, T, hidden]; older blocks return tuples


@torch.no_grad()
def calibrate_blockwise(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Iterable,
    visit: Visit,
    progress: bool = True,
    desc: str = "calibrating blocks",
    warn: bool = True,
    split: bool = False,
) -> None:
    """Call `visit` on each block's selected layers with their statistics, block by block (module doc);
    split: the statistics carry their held-out halves too (GramStats.half)."""
    found = find_blocks(model, layers)
    if found is None:
        raise ValueError("sequential calibration found no nn.ModuleList of transformer blocks holding the layers")
    blocks_name, blocks = found
    calibration = list(calibration)
    counts: dict[str, tuple[int, int]] = {}
    with eval_mode(model):
        inputs = capture_block_inputs(model, blocks[0], calibration)
        for index, block in enumerate(tqdm(blocks, desc=desc, unit="block", disable=not progress)):
            prefix = f"{blocks_name}.{index}."
            block_layers = {n: m for n, m in layers.items() if n.startswith(prefix)}
            if block_layers:
                with GramCollector(block_layers, split) as collector:
                    for item in inputs:
                        _run_block(block, item, collector)
                counts.update(token_counts(collector.stats))
                check_reached(block_layers, counts)
                visit(block_layers, collector.stats)
                del collector
            # The block as it is now (compressed, when visit compressed it) feeds the next one.
            inputs = [_with_hidden(item, _run_block(block, item)) for item in inputs]
        del inputs
        outside = {n: m for n, m in layers.items() if not n.startswith(f"{blocks_name}.")}
        if outside:
            device = model_device(model)
            with GramCollector(outside, split) as collector:
                for index, batch in enumerate(calibration):
                    collector.mask = batch_mask(batch, device)
                    run_batch(model, batch, device, f"calibration batch {index}")
            counts.update(token_counts(collector.stats))
            check_reached(outside, counts)
            visit(outside, collector.stats)
    if warn:
        check_coverage(layers, counts, stacklevel=7)
