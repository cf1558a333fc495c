"""End-to-end generation: dense vs low-rank compressed GPT-2, eager vs static cache + torch.compile.

For each model: greedy generate() of --new-tokens tokens from the same prompt at each batch
size, in four modes (dense/compressed x eager/static_compiled), the warm-up (compile) run timed
apart; weight bytes, peak GPU memory and weight GB/s (weight bytes x decode steps/s, against the
measured copy bandwidth). Every compressed speed sits beside its quality: logits cosine and top-1
agreement against the dense model on a fixed batch, and compress_model's per-layer rel. errors.
Finally the compressed model is saved and reloaded, with the peak GPU memory of each loader.

Models are GPT-2 shapes with random weights (the speed of a low-rank model does not depend on
what the weights are; their quality does, so the quality here only checks the pipeline), or a
local checkpoint via --model PATH (dense, or already compressed by triton_lowrank).

    python3 bench/e2e.py --quick                  # ~2 min on an H100 (gpu_check.sh)
    python3 bench/e2e.py --quick --device cpu     # smoke test: tiny model, no compile
    python3 bench/e2e.py --dry-run                # CPU smoke run in seconds: tiny model, batch 1, 4 tokens, eager
    python3 bench/e2e.py                          # gpt2 .. gpt2-xl, batch 1 and 16
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import copy_bandwidth_gbs, environment, results_dir, write_csv, write_json
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from triton_lowrank import LowRankConfig, compress_model, load_compressed, save_compressed
from triton_lowrank.tools.generation_bench import GENERATION_MODES, measure_generation, weight_bytes
from triton_lowrank.tools.metrics import compare_logits

GPT2_SHAPES = {  # (n_layer, n_embd, n_head)
    "tiny": (2, 128, 4),
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
KEEP = LowRankConfig(budget=1 / 3, bits=8)  # factor bytes ~ 1/3 of the fp16 dense block weights
# Issue 10's hybrid: int4 base + rank-32 int8 correction, groups of 64 (128 does not divide GPT-2 XL's 1600).
# Round-to-nearest base and plain-SVD correction: the weights are random, so calibration would buy nothing here,
# and the speed does not depend on the fit.
HYBRID = LowRankConfig(base_bits=4, base_group_size=64, rank=32, bits=8, base_method="rtn", method="svd")
FORMATS = {"compressed": KEEP, "hybrid": HYBRID}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small model, batch 1 (CPU: tiny model, 16 tokens)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, batch 1, 4 tokens, eager modes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=list(GPT2_SHAPES), help="GPT-2 shapes, random weights")
    parser.add_argument("--model", type=Path, help="a local checkpoint folder instead of GPT-2 shapes")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=GENERATION_MODES, default=list(GENERATION_MODES))
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS),
                        help="compressed: pure low rank (budget 1/3, int8); hybrid: int4 g64 base + r32 int8")
    args = parser.parse_args()
    if args.dry_run:  # the plumbing, in seconds: no compile, the fewest tokens that still time a decode step
        args.quick, args.device = True, "cpu"
        args.batches, args.new_tokens, args.prompt_tokens = args.batches or [1], args.new_tokens or 4, 8
        args.modes = [mode for mode in args.modes if "compiled" not in mode] or args.modes
    on_cpu = torch.device(args.device).type == "cpu"
    quick_models = ["tiny"] if on_cpu else ["gpt2"]
    args.models = args.models or (quick_models if args.quick else list(GPT2_SHAPES)[1:])
    args.batches = args.batches or ([1, 2] if args.quick and on_cpu else [1] if args.quick else [1, 16])
    args.new_tokens = args.new_tokens or (16 if args.quick and on_cpu else 128)
    args.dtype = torch.float32 if on_cpu else torch.float16  # CPU half matmuls are slow or missing
    return args


def build_model(name: str, args) -> tuple[str, torch.nn.Module]:
    """A random-weight GPT-2 of the named shape, or the --model checkpoint, on the device."""
    if args.model is not None:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, device_map=args.device)
        return args.model.name, model.eval()
    n_layer, n_embd, n_head = GPT2_SHAPES[name]
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024)
    torch.manual_seed(0)
    with torch.device(args.device):  # initialise on the GPU: CPU init of gpt2-xl alone takes minutes
        return name, GPT2LMHeadModel._from_config(config, dtype=args.dtype).eval()


def is_compressed(model) -> bool:
    return getattr(getattr(model.config, "quantization_config", None), "quant_method", None) == "triton_lowrank"


def run_modes(model, name: str, variant: str, prompts: torch.Tensor, args) -> list[dict]:
    rows = []
    for batch in args.batches:
        for mode in args.modes:
            result = measure_generation(model, prompts[:batch], args.new_tokens, mode=mode)
            rows.append({"model": name, "variant": variant, **result})
            print(
                f"  {variant:<10} {mode:<15} batch {batch:>2}: {result['tokens_per_s']:9.1f} tok/s  "
                f"{result['weight_gb_per_s']:7.1f} weight GB/s  warm-up {result['warmup_s']:.1f} s"
            )
    return rows


def forget_compiled(model) -> None:
    """After compress_model swaps modules, drop what generate() cached for the dense model."""
    model.__dict__.pop("_compiled_call", None)  # transformers' compiled forward, if any
    model.__dict__.pop("_cache", None)  # its static cache: freed so it does not count in later peaks
    torch._dynamo.reset()


def quality(dense_logits: torch.Tensor | None, model, quality_ids: torch.Tensor, report) -> dict:
    with torch.no_grad():
        logits = model(quality_ids).logits
    # KL, top-1 agreement, logits cosine and MSE against dense (perplexities here are of random ids)
    figures = {} if dense_logits is None else compare_logits([dense_logits.float().cpu()], [logits.float().cpu()],
                                                             quality_ids.cpu())
    if report is not None:
        errors = [row.rel_error for row in report.layers]
        figures.update(
            mean_rel_error=sum(errors) / len(errors),
            max_rel_error=max(errors),
            compressed_layer_bytes_before=report.bytes_before,
            compressed_layer_bytes_after=report.bytes_after,
        )
    return figures


def measure_load(model, args) -> dict:
    """Save the compressed model, free it, then reload with each loader and record its peak memory."""
    on_gpu = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        folder = save_compressed(model, Path(tmp) / "model", overwrite=True)
        file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        del model
        out = {"checkpoint_bytes": file_bytes}
        loaders = {
            "load_compressed": lambda: load_compressed(folder, device_map=args.device, dtype=args.dtype),
            "from_pretrained": lambda: AutoModelForCausalLM.from_pretrained(
                folder, device_map=args.device, dtype=args.dtype
            ),
        }
        for how, load in loaders.items():
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            loaded = load()
            out[f"{how}_s"] = time.perf_counter() - start
            out[f"{how}_weight_bytes"] = weight_bytes(loaded)
            out[f"{how}_peak_gpu_bytes"] = torch.cuda.max_memory_allocated() - before if on_gpu else None
            del loaded
        out["load_compressed_peak_host_bytes"] = host_peak_while_loading(folder, args)
    return out


# Runs in a fresh process after its imports, sampling the resident set every millisecond:
# ru_maxrss would mostly report the import-time peak, not the load.
_HOST_PEAK_SCRIPT = """
import os, sys, threading, time, torch
from triton_lowrank import load_compressed
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before, peak, done = rss(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
watcher = threading.Thread(target=watch)
watcher.start()
model = load_compressed(sys.argv[1], device_map=sys.argv[2], dtype=getattr(torch, sys.argv[3]))
done.set()
watcher.join()
print(max(peak[0], rss()) - before)
"""


def host_peak_while_loading(folder: Path, args) -> int | None:
    """Peak growth of resident host memory (bytes) while load_compressed runs, after imports."""
    dtype = str(args.dtype).removeprefix("torch.")
    done = subprocess.run([sys.executable, "-c", _HOST_PEAK_SCRIPT, str(folder), args.device, dtype],
                          capture_output=True, text=True, timeout=600)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def plot(rows: list[dict], copy_gbs: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
    series = list(dict.fromkeys((r["variant"], r["mode"]) for r in rows))
    fig, (speed, bandwidth) = plt.subplots(1, 2, figsize=(max(8, 2.5 * len(groups)), 4.5))
    width = 0.8 / len(series)
    for i, (variant, mode) in enumerate(series):
        by_group = {(r["model"], r["batch"]): r for r in rows if (r["variant"], r["mode"]) == (variant, mode)}
        xs = [g + i * width for g in range(len(groups))]
        for axis, key in ((speed, "tokens_per_s"), (bandwidth, "weight_gb_per_s")):
            axis.bar(xs, [by_group[g][key] if g in by_group else 0 for g in groups], width, label=f"{variant} {mode}")
    bandwidth.axhline(copy_gbs, color="k", linestyle="--", label=f"copy {copy_gbs:.0f} GB/s")
    labels = [f"{model}\nbatch {batch}" for model, batch in groups]
    for axis, title in ((speed, "generated tokens/s"), (bandwidth, "weight GB/s (weight bytes x steps/s)")):
        axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], labels)
        axis.set_title(title)
    speed.legend(fontsize=7)
    bandwidth.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"{environment()['device']}: copy bandwidth {copy_gbs:.0f} GB/s")
    rows, per_model = [], {}
    out = results_dir() / f"e2e{'-quick' if args.quick else ''}"
    settings = {k: str(v) if isinstance(v, (Path, torch.dtype)) else v for k, v in vars(args).items()}
    settings["keep"] = KEEP.to_dict()
    settings["hybrid"] = HYBRID.to_dict()
    payload = {"environment": environment(), "copy_bandwidth_gbs": copy_gbs, "settings": settings}

    def save(partial: bool = True) -> None:  # after every variant: a run cut short keeps what it measured
        write_json(out.with_suffix(".json"), {**payload, "models": per_model, "runs": rows, "partial": partial})
        write_csv(out.with_suffix(".csv"), rows)

    for name in [None] if args.model is not None else args.models:
        name, model = build_model(name, args)
        print(f"{name}:")
        vocab = model.config.vocab_size
        generator = torch.Generator().manual_seed(1)
        prompts = torch.randint(vocab, (max(args.batches), args.prompt_tokens), generator=generator).to(device)
        quality_ids = torch.randint(vocab, (4, 64), generator=generator).to(device)
        dense_logits, summary = None, {}
        if is_compressed(model):  # a checkpoint compressed already: measure it as it is
            summary["compressed_weight_bytes"] = weight_bytes(model)
            summary["quality"] = quality(None, model, quality_ids, None)
            rows += run_modes(model, name, "compressed", prompts, args)
            summary["load"] = measure_load(model, args)
        else:
            with torch.no_grad():
                dense_logits = model(quality_ids).logits
            summary["dense_weight_bytes"] = weight_bytes(model)
            rows += run_modes(model, name, "dense", prompts, args)
        per_model[name] = summary
        save()
        for variant in args.formats if dense_logits is not None else ():
            if variant != args.formats[0]:  # compress_model replaced the dense weights: build them again
                del model
                gc.collect()
                name, model = build_model(name, args)
            start = time.perf_counter()
            report = compress_model(model, FORMATS[variant], progress=False)
            forget_compiled(model)
            figures = {"compress_s": time.perf_counter() - start, "weight_bytes": weight_bytes(model),
                       "quality": quality(dense_logits, model, quality_ids, report)}
            print(f"  {variant} quality: {json.dumps(figures['quality'])}")
            rows += run_modes(model, name, variant, prompts, args)
            figures["load"] = measure_load(model, args)
            print(f"  {variant} load: {json.dumps(figures['load'])}")
            if variant == "compressed":  # the keys earlier result files used
                summary.update(compressed_weight_bytes=figures["weight_bytes"], quality=figures["quality"],
                               load=figures["load"], compress_s=figures["compress_s"])
            else:
                summary[variant] = figures
            save()
        per_model[name] = summary
        del model
        torch._dynamo.reset()  # the next model must not inherit this one's graphs or recompile limits
        gc.collect()

    save(partial=False)
    plot(rows, copy_gbs, out.with_suffix(".png"))
    print(f"wrote {out}.json, .csv, .png")


if __name__ == "__main__":
    main()
