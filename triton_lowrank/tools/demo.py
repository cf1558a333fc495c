"""The demo: compress a small GPT-2 and show what it costs and what it saves, in one run.

Default model: the trained GPT-2 embedded in the package. Steps: sample calibration and
held-out evaluation sequences from the dense model, compress (whitened, int8, factor bytes =
half the fp16 bytes of the block weights), save the compressed folder, then print weight
bytes, tokens/sec, quality metrics and a greedy sample of both models, and write a small
quality-vs-bytes comparison plus a JSON of every number into the output folder. The comparison
puts the hybrid format (an int4 GPTQ base plus a rank-16 int8 correction) beside the pure low-rank
format at the same bytes, RTN int8 / int4 / int3 and GPTQ int4, all on the same held-out tokens.
"""

from __future__ import annotations

import copy
import json
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from triton_lowrank.checkpoint.save_load import save_compressed
from triton_lowrank.compression.compress import recommended_calib_tokens, validate_layers
from triton_lowrank.core.calibration import model_device
from triton_lowrank.core.config import LowRankConfig
from triton_lowrank.core.format import compressed_layers
from triton_lowrank.core.nbytes import tensor_bytes
from triton_lowrank.embedded import embedded_model_path
from triton_lowrank.tools.baselines import compress_copy, compressed_bytes, dense_bytes
from triton_lowrank.tools.eval_data import batches, sample_sequences
from triton_lowrank.tools.generation_bench import decode_threads, measure_generation
from triton_lowrank.tools.loading import checkpoint_dtype, load_model, load_tokenizer, runtime
from triton_lowrank.tools.metrics import compare_logits, model_logits
from triton_lowrank.tools.sweeps import result_row, write_sweep
from triton_lowrank.tools.sweeps import sweep as sweep_rows

SEED = 0
CALIB_BATCH_TOKENS = 4096  # calibration tokens per batch
HYBRID_RANK = 16  # the demo's hybrid: int4 base in groups of `group_size` + a rank-16 correction
DEFAULT_PROMPT = "KING HENRY.\nNow, lords,"  # the corpus writes speakers as "NAME." on their own line


@dataclass(frozen=True)
class DemoSizes:
    """How much work each step does: the full run aims at a minute on an idle 2-core CPU, quick is for CI.
    Calibration takes the tokens the package recommends (compress.recommended_calib_tokens), in windows of seq_len."""

    eval_samples: int
    seq_len: int
    speed_tokens: int  # timed by measure_generation (after an untimed warm-up run)
    sample_tokens: int  # greedy continuation shown side by side


FULL = DemoSizes(eval_samples=32, seq_len=128, speed_tokens=64, sample_tokens=48)
QUICK = DemoSizes(eval_samples=4, seq_len=16, speed_tokens=4, sample_tokens=4)


@torch.no_grad()
def greedy(model: nn.Module, tokenizer, prompt: str, new_tokens: int) -> str:
    """The prompt's greedy continuation (the new text only)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model_device(model))  # [1, P]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def side_by_side(left: str, right: str, titles=("dense", "compressed"), width: int = 48) -> str:
    """Two texts in columns; newlines shown as ⏎ so the columns stay aligned."""
    cols = [textwrap.wrap(t.replace("\n", " ⏎ "), width) or [""] for t in (left, right)]
    rows = max(map(len, cols))
    cols = [c + [""] * (rows - len(c)) for c in cols]
    lines = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    lines += [f"{a:<{width}} | {b}" for a, b in zip(*cols, strict=True)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the demo


def run_demo(
    model_path: str | Path | None = None,
    out_dir: str | Path = "demo_out",
    budget: float = 0.5,
    bits: int | None = 8,
    method: str = "whitened",
    group_size: int = 128,
    quick: bool = False,
    prompt: str = DEFAULT_PROMPT,
    progress: bool = True,
    sweep: bool = True,
) -> dict:
    """Run the demo, print its report, write demo.json (+ the sweep's files) into `out_dir`; returns the numbers.
    sweep=False leaves out the comparison with the other formats and baselines (most of the run's time)."""
    started = time.perf_counter()
    seconds = {}  # each step's wall time, in demo.json
    sizes = QUICK if quick else FULL
    # Built first: a bad knob fails before any slow step.
    config = LowRankConfig(budget=budget, bits=bits, group_size=group_size, method=method)
    if model_path is None:
        model_path = embedded_model_path()
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"model folder not found: {model_path}")
    with timed(seconds, "load"):
        device, dtype = runtime(model_path)
        compute = ("Triton kernels (CUDA)" if device.type == "cuda" else
                   "CPU path: weight-only int8/int4 kernels in bf16, the reference path in fp32")
        dense = load_model(model_path, device, dtype)
        tokenizer = load_tokenizer(model_path)
        layers = validate_layers(dense, config)  # bad ranks or group sizes fail before sampling
    stored = checkpoint_dtype(model_path)
    saved_dtype = stored if stored in (torch.float16, torch.bfloat16) else dtype
    print(f"model: {model_path}  ({sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M parameters, "
          f"stored as {dtype_name(stored or dtype)})")
    print(f"device: {device}, {dtype_name(dtype)}; low-rank layers run on: {compute}")

    # As many calibration tokens as the package recommends (no warning about the demo's own data). One sampling
    # run (rows decode together), split into disjoint parts: evaluation sequences are never calibration ones.
    calib_samples = -(-recommended_calib_tokens(layers) // sizes.seq_len)
    with timed(seconds, "sampling"):
        sampled = sample_sequences(dense, sizes.eval_samples + calib_samples, sizes.seq_len, SEED, progress=progress)
    rows = max(1, CALIB_BATCH_TOKENS // sizes.seq_len)  # a few wide batches: block-by-block calibration pays per batch
    tokens, calibration = sampled[: sizes.eval_samples], batches(sampled[sizes.eval_samples :], rows)
    with timed(seconds, "compress"):
        compressed, report = compress_for_saving(dense, config, calibration, saved_dtype, progress)
    with timed(seconds, "save"):
        compressed.to(saved_dtype)  # saved in the model's own dtype (embeddings, norms, biases); scales stay fp32
        saved = save_compressed(compressed, Path(out_dir) / "model", tokenizer=tokenizer, overwrite=True)
        compressed.to(dtype)  # run as the dense model runs: what is measured is what was saved

    with timed(seconds, "quality"):
        dense_logits = model_logits(dense, tokens, progress=progress)  # [N, T, vocab], the sweep's reference too
        quality = compare_logits(dense_logits, model_logits(compressed, tokens, progress=progress), tokens)
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # [1, P]
    pair = (("dense", dense), ("compressed", compressed))
    with timed(seconds, "speed"):
        threads = decode_threads(dense, prompt_ids)  # on the CPU: 1 or all threads, as the dense model is fastest
        speed = {name: measure_generation(model, prompt_ids, sizes.speed_tokens, mode="eager", threads=threads)
                 for name, model in tqdm(pair, desc="tokens/s", unit="model", disable=not progress)}
    with timed(seconds, "samples"):
        samples = {name: greedy(model, tokenizer, prompt, sizes.sample_tokens)
                   for name, model in tqdm(pair, desc="greedy samples", unit="model", disable=not progress)}
    layer_bytes = {"dense_fp16": dense_bytes(dense, config), "compressed": compressed_bytes(compressed)}
    rows = [result_row(method, bits, budget, layer_bytes["compressed"], layer_bytes["dense_fp16"], quality)]
    paths = {}
    if sweep:
        with timed(seconds, "sweep"):
            rows += comparison_rows(dense, tokens, dense_logits, calibration, budget, method, bits, group_size,
                                    progress)
            paths = write_sweep(rows, out_dir, f"{Path(model_path).name}: quality vs weight bytes")

    result = {
        "model": str(model_path),
        "device": str(device),
        "dtype": dtype_name(dtype),
        "saved_dtype": dtype_name(saved_dtype),
        "compute": compute,
        "config": config.to_dict(),
        "calibration": f"{calib_samples} sequences x {sizes.seq_len} tokens sampled from the dense model "
                       f"({calib_samples * sizes.seq_len:,} tokens, {recommended_calib_tokens(layers):,} recommended)",
        "evaluation": f"{sizes.eval_samples} other sequences from the same sampling run (seed {SEED})",
        "layer_weight_bytes": layer_bytes,
        "layer_storage": {"format": config.weight_format.name, **dtype_bytes(compressed, layers_only=True)},
        "model_weight_bytes": {"dense": dtype_bytes(dense), "compressed": dtype_bytes(compressed)},
        "checkpoint_bytes": {"dense": checkpoint_bytes(model_path), "compressed": checkpoint_bytes(saved)},
        "speed": speed,
        "quality": quality,
        "samples": {"prompt": prompt, **samples},
        "sweep": rows,
        "saved_model": str(saved),
        "step_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "demo.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_report(result, report)
    written = [saved, Path(out_dir) / "demo.json", *(paths[k] for k in ("png", "csv", "json") if k in paths)]
    print(f"wrote {', '.join(map(str, written))}")
    return result


@contextmanager
def timed(seconds: dict, step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start


def compress_for_saving(dense: nn.Module, config: LowRankConfig, calibration, saved_dtype: torch.dtype,
                        progress: bool = True):
    """(compressed copy of `dense`, report), as `triton-lowrank compress` makes it: float factors (bits=None)
    are computed in the dtype they are saved in, so that the budget counts the bytes they are saved as."""
    source = dense
    if config.bits is None and saved_dtype != next(dense.parameters()).dtype:
        source = copy.deepcopy(dense).to(saved_dtype)
    return compress_copy(source, config, calibration, progress)


def comparison_rows(dense, tokens, dense_logits, calibration, budget, method, bits, group_size, progress):
    """The plot: this compression beside the other method, the baselines and the hybrid format, then the pure
    low-rank format again at the hybrid's bytes, so the two formats meet at equal bytes."""
    other = [m for m in ("svd", "whitened") if m != method]
    rows = sweep_rows(dense, tokens, calibration, (budget,), other, (bits,), group_size, progress=progress,
                      rtn_bits=((8, group_size), (4, group_size), (3, group_size // 2)), gptq=((4, group_size),),
                      hybrid=((4, group_size, HYBRID_RANK),), dense_logits=dense_logits)
    hybrid_fraction = next(r["bytes_fraction"] for r in rows if r["method"] == "hybrid")
    return rows + sweep_rows(dense, tokens, calibration, (hybrid_fraction,), (method,), (bits,), group_size,
                             progress=progress, rtn_bits=(), dense_logits=dense_logits)


# ----------------------------------------------------------------------------- bytes, each with its dtype


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_bytes(model: nn.Module, layers_only: bool = False) -> dict[str, int]:
    """{dtype: bytes} of the model's stored tensors (parameters and persistent buffers, tied ones once), largest
    first; layers_only: the stored tensors of its compressed layers (codes, factors, scales; no biases), the bytes
    compressed_bytes counts."""
    if layers_only:
        tensors = [b for m in compressed_layers(model).values() for b in m.buffers()]
    else:
        tensors = list(model.state_dict().values())
    groups: dict[str, list] = {}
    for tensor in tensors:
        groups.setdefault(dtype_name(tensor.dtype), []).append(tensor)
    return {name: tensor_bytes(group) for name, group in sorted(groups.items(), key=lambda g: -tensor_bytes(g[1]))}


def describe_bytes(by_dtype: dict[str, int]) -> str:
    """"8.83 MiB (int8 4.47 + float32 4.36)": the total and what each dtype holds."""
    parts = " + ".join(f"{name} {n / 2**20:.2f}" for name, n in by_dtype.items())
    return f"{sum(by_dtype.values()) / 2**20:.2f} MiB ({parts})"


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of a checkpoint's weight files (*.safetensors, *.bin) on disk."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))


def comparison_table(rows: list[dict]) -> str:
    """The sweep rows as aligned text, fewest bytes first."""
    lines = [f"{'format':<34} {'of fp16':>7} {'KL':>8} {'top-1':>6} {'ppl ratio':>9}"]
    for r in sorted(rows, key=lambda r: r["bytes_fraction"]):
        lines.append(f"{r['label']:<34} {r['bytes_fraction']:>7.1%} {r['kl']:>8.4f} {r['top1_agreement']:>6.1%} "
                     f"{r['ppl_ratio']:>9.3f}")
    return "\n".join(lines)


def print_report(result: dict, report) -> None:
    mib = lambda n: f"{n / 2**20:.2f} MiB"
    layers, whole, disk = result["layer_weight_bytes"], result["model_weight_bytes"], result["checkpoint_bytes"]
    ranks = report.ranks().values()
    print(f"\n{len(report.layers)} compressed layers, ranks {min(ranks)}..{max(ranks)}")
    storage = dict(result["layer_storage"])
    print(
        f"their weight bytes: {mib(layers['dense_fp16'])} as float16 dense -> {storage.pop('format')} format "
        f"{describe_bytes(storage)} ({layers['compressed'] / layers['dense_fp16']:.1%})"
    )
    print(f"checkpoint on disk ({result['saved_dtype']} embeddings, norms and biases): "
          f"{mib(disk['dense'])} -> {mib(disk['compressed'])}")
    print(f"whole model in memory as run ({result['device']}): {describe_bytes(whole['dense'])} -> "
          f"{describe_bytes(whole['compressed'])}")
    dense, comp = result["speed"]["dense"], result["speed"]["compressed"]
    print(
        f"greedy generation ({dense['mode']}, {dense['dtype']}, {dense['new_tokens']} new tokens, {result['compute']}"
        f"{'' if dense['threads'] is None else ', ' + str(dense['threads']) + ' thread(s)'}): "
        f"dense {dense['tokens_per_s']:.1f} tokens/s, compressed {comp['tokens_per_s']:.1f} tokens/s "
        f"({comp['tokens_per_s'] / dense['tokens_per_s']:.2f}x)"
    )
    q = result["quality"]
    print(
        f"quality on {q['tokens']} held-out sampled tokens: "
        f"perplexity {q['ppl_dense']:.2f} -> {q['ppl_compressed']:.2f} "
        f"(ratio {q['ppl_ratio']:.3f}), KL {q['kl']:.4f} nats/token, top-1 agreement {q['top1_agreement']:.1%}, "
        f"logits cosine {q['cosine']:.4f}, MSE {q['mse']:.4f}"
    )
    if len(result["sweep"]) > 1:
        print(f"\nquality against weight bytes (the {q['tokens']} held-out tokens; sweep.png plots it):")
        print(comparison_table(result["sweep"]))
    samples = result["samples"]
    print(f"\ngreedy continuation of {samples['prompt']!r}:")
    print(side_by_side(samples["dense"], samples["compressed"]))
    steps = ", ".join(f"{k} {v:.1f}" for k, v in result["step_seconds"].items())
    print(f"\ndone in {result['seconds']} s ({steps})")
