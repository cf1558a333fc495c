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

import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from triton_lowrank.checkpoint.save_load import save_compressed
from triton_lowrank.core.calibration import model_device
from triton_lowrank.core.config import LowRankConfig
from triton_lowrank.embedded import embedded_model_path
from triton_lowrank.tools.baselines import compress_copy, compressed_bytes, dense_bytes
from triton_lowrank.tools.eval_data import batches, sample_sequences
from triton_lowrank.tools.generation_bench import measure_generation, weight_bytes
from triton_lowrank.tools.loading import load_model, load_tokenizer, runtime
from triton_lowrank.tools.metrics import compare_logits, model_logits
from triton_lowrank.tools.sweeps import result_row, sweep, write_sweep

SEED = 0
HYBRID_RANK = 16  # the demo's hybrid: int4 base in groups of `group_size` + a rank-16 correction
DEFAULT_PROMPT = "KING HENRY.\nNow, lords,"  # the corpus writes speakers as "NAME." on their own line


@dataclass(frozen=True)
class DemoSizes:
    """How much work each step does: the full run fits 2 minutes on a busy 2-core CPU, quick is for CI."""

    calib_samples: int
    eval_samples: int
    seq_len: int
    speed_tokens: int  # timed by measure_generation (after an untimed warm-up run)
    sample_tokens: int  # greedy continuation shown side by side


FULL = DemoSizes(calib_samples=32, eval_samples=32, seq_len=128, speed_tokens=64, sample_tokens=48)
QUICK = DemoSizes(calib_samples=4, eval_samples=4, seq_len=16, speed_tokens=4, sample_tokens=4)


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
) -> dict:
    """Run the demo, print its report, write demo.json + sweep files into `out_dir`; returns the numbers."""
    started = time.perf_counter()
    sizes = QUICK if quick else FULL
    # Built first: a bad knob fails before any slow step.
    config = LowRankConfig(budget=budget, bits=bits, group_size=group_size, method=method)
    if model_path is None:
        model_path = embedded_model_path()
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"model folder not found: {model_path}")
    device, dtype = runtime(model_path)
    compute = "Triton kernels (CUDA)" if device.type == "cuda" else "PyTorch reference path (CPU, no Triton)"
    dense = load_model(model_path, device, dtype)
    tokenizer = load_tokenizer(model_path)
    print(f"model: {model_path}  ({sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M parameters)")
    print(f"device: {device}, {str(dtype).removeprefix('torch.')}; low-rank layers run on: {compute}")

    # One sampling run (its cost is per decode step, hardly per row), split into disjoint halves:
    # evaluation sequences are never among the calibration ones.
    sampled = sample_sequences(dense, sizes.eval_samples + sizes.calib_samples, sizes.seq_len, SEED, 32, progress)
    tokens, calibration = sampled[: sizes.eval_samples], batches(sampled[sizes.eval_samples :], 8)
    compressed, report = compress_copy(dense, config, calibration, progress)
    saved = save_compressed(compressed, Path(out_dir) / "model", tokenizer=tokenizer, overwrite=True)

    quality = compare_logits(model_logits(dense, tokens), model_logits(compressed, tokens), tokens)
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # [1, P]
    speed = {
        name: measure_generation(model, prompt_ids, sizes.speed_tokens, mode="eager")
        for name, model in (("dense", dense), ("compressed", compressed))
    }
    samples = {
        name: greedy(model, tokenizer, prompt, sizes.sample_tokens)
        for name, model in (("dense", dense), ("compressed", compressed))
    }
    # The plot: this compression beside the other method, the baselines and the hybrid format, then the
    # pure low-rank format again at the hybrid's bytes, so the two formats meet at equal bytes.
    layer_bytes = {"dense_fp16": dense_bytes(dense, config), "compressed": compressed_bytes(compressed)}
    rows = [result_row(method, bits, budget, layer_bytes["compressed"], layer_bytes["dense_fp16"], quality)]
    other = [m for m in ("svd", "whitened") if m != method]
    rows += sweep(dense, tokens, calibration, (budget,), other, (bits,), group_size, progress=progress,
                  rtn_bits=((8, group_size), (4, group_size), (3, group_size // 2)), gptq=((4, group_size),),
                  hybrid=((4, group_size, HYBRID_RANK),))
    hybrid_fraction = next(r["bytes_fraction"] for r in rows if r["method"] == "hybrid")
    rows += sweep(dense, tokens, calibration, (hybrid_fraction,), (method,), (bits,), group_size,
                  progress=progress, rtn_bits=())
    paths = write_sweep(rows, out_dir, f"{Path(model_path).name}: quality vs weight bytes")

    model_bytes = {"dense": weight_bytes(dense), "compressed": weight_bytes(compressed)}
    result = {
        "model": str(model_path),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "compute": compute,
        "config": config.to_dict(),
        "calibration": f"{sizes.calib_samples} sequences x {sizes.seq_len} tokens sampled from the dense model",
        "evaluation": f"{sizes.eval_samples} other sequences from the same sampling run (seed {SEED})",
        "layer_weight_bytes": layer_bytes,
        "model_weight_bytes": model_bytes,
        "speed": speed,
        "quality": quality,
        "samples": {"prompt": prompt, **samples},
        "sweep": rows,
        "saved_model": str(saved),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (Path(out_dir) / "demo.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_report(result, report)
    print(f"wrote {saved}, {Path(out_dir) / 'demo.json'}, {paths['png']}, {paths['csv']}, {paths['json']}")
    return result


def comparison_table(rows: list[dict]) -> str:
    """The sweep rows as aligned text, fewest bytes first."""
    lines = [f"{'format':<34} {'of fp16':>7} {'KL':>8} {'top-1':>6} {'ppl ratio':>9}"]
    for r in sorted(rows, key=lambda r: r["bytes_fraction"]):
        lines.append(f"{r['label']:<34} {r['bytes_fraction']:>7.1%} {r['kl']:>8.4f} {r['top1_agreement']:>6.1%} "
                     f"{r['ppl_ratio']:>9.3f}")
    return "\n".join(lines)


def print_report(result: dict, report) -> None:
    mib = lambda n: f"{n / 2**20:.2f} MiB"
    layers, whole = result["layer_weight_bytes"], result["model_weight_bytes"]
    ranks = report.ranks().values()
    print(f"\n{len(report.layers)} compressed layers, ranks {min(ranks)}..{max(ranks)}")
    print(
        f"block weight bytes: fp16 dense {mib(layers['dense_fp16'])} -> low-rank {mib(layers['compressed'])} "
        f"({layers['compressed'] / layers['dense_fp16']:.1%})"
    )
    print(
        f"whole model as loaded ({result['device']}, {result['dtype']} embeddings/biases): "
        f"{mib(whole['dense'])} -> {mib(whole['compressed'])}"
    )
    dense, comp = result["speed"]["dense"], result["speed"]["compressed"]
    print(
        f"greedy generation ({dense['mode']}, {dense['new_tokens']} new tokens, {result['compute']}): "
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
    print(f"\nquality against weight bytes (the {q['tokens']} held-out tokens; sweep.png plots it):")
    print(comparison_table(result["sweep"]))
    samples = result["samples"]
    print(f"\ngreedy continuation of {samples['prompt']!r}:")
    print(side_by_side(samples["dense"], samples["compressed"]))
    print(f"\ndone in {result['seconds']} s")
