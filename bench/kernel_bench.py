"""Kernel benchmark: the decode and split paths of the low-rank kernels vs cuBLAS dense fp16 and
unfused PyTorch low-rank (two F.linear on fp16 factors), with cold L2 and CUDA-graph timing; then the hybrid
format's kernels vs the same kernels with a rank-1 correction, cuBLAS and unfused PyTorch (hybrid_rows).

    python bench/kernel_bench.py            # quick sweep (~2-3 min on an H100)
    python bench/kernel_bench.py --full     # every shape, M, rank ratio and bit width
    python bench/kernel_bench.py --autotune # also time GPT-2 XL pretuning, cold and warm
    python bench/kernel_bench.py --dry-run  # CPU, tiny shapes, Triton interpreter: checks the plumbing
    python bench/kernel_bench.py --budget 150  # stop starting new cases after 150 s (gpu_check.sh's time box)

Writes kernels.json / kernels.csv / kernels_*.png (and autotune_timing.json, tuned_winners.json) under
bench/results/<gpu-slug>/ ($BENCH_RESULTS_DIR where set), kernels.json rewritten after every case (marked "partial"
until the end), so a run cut short still leaves its numbers. Cases run M = 1 first. Bandwidth counts factor + scale +
bias bytes plus activations. Each path runs its default config (what bench/sass_report.py compiles), so the report
prints its estimates beside these times; decode_other_prefetch is the CUDA-core decode plan with phase 2's other
prefetch depth before its wait (configs.default_blocks_before_wait is a static estimate this time checks).
"""

# Named kernel_bench, not kernels: as a script its folder is on sys.path, and a module named
# `kernels` there would shadow the PyPI package of that name that transformers probes for.

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    copy_bandwidth_gbs,
    device_name,
    environment,
    results_dir,
    rotation_count,
    time_ms,
    write_csv,
    write_json,
)
from sass.problems import SMALL_PROBLEMS  # noqa: E402
from triton_lowrank.kernels.configs import (
    CUDA_CORE_MAX_M,
    Problem,
    decode_cuda_core_config,
    one_launch_config,
    one_launch_supported,
    other_blocks_before_wait,
)
from triton_lowrank.kernels.launch import launch, launch_hybrid  # noqa: E402

from triton_lowrank.compression.pretune import pretune_model  # noqa: E402
from triton_lowrank.core.autotune import (
    Autotuner,  # noqa: E402
    default_config,
)
from triton_lowrank.core.factors import random_factors  # noqa: E402
from triton_lowrank.core.nbytes import lowrank_bytes as factor_bytes
from triton_lowrank.core.reference import dequantized_factors, lowrank_reference  # noqa: E402
from triton_lowrank.formats.hybrid.op import hybrid_matmul, hybrid_problem_for
from triton_lowrank.formats.hybrid.storage import hybrid_reference, random_hybrid_weights  # noqa: E402
from triton_lowrank.formats.lowrank.layer import LowRankLinear  # noqa: E402
from triton_lowrank.formats.lowrank.op import lowrank_matmul

GPT2_SHAPES = [(768, 2304), (768, 3072), (3072, 768), (1024, 4096), (1280, 5120), (1600, 6400), (6400, 1600)]
LLAMA_SHAPE = (4096, 11008)
QUICK_SHAPES = [(768, 2304), (1600, 6400), (6400, 1600), LLAMA_SHAPE]
M_VALUES = (1, 4, 16, 64, 256, 1024, 4096)
QUICK_M = (1, 16, 256, 4096)
RATIOS = (0.125, 0.25, 0.5)
GPT2_XL_LAYERS = [(1600, 4800), (1600, 1600), (1600, 6400), (6400, 1600)]  # c_attn, attn c_proj, c_fc, mlp c_proj


def make_sets(k, n, rank, bits, group, n_sets, device, dtype):
    """n_sets independent (factors, dense fp16 weight, fp16 factors) triples for L2 rotation."""
    sets = []
    for i in range(n_sets):
        f = random_factors(k, n, rank, bits, group, dtype, seed=i, device=device)
        # baselines get the dequantized weights (the same values), stored in the activation dtype
        down, up_t = dequantized_factors(f)  # [r, in], [r, out] fp32
        down_f, up_f = down.to(dtype), up_t.t().contiguous().to(dtype)  # [r, in], [out, r]
        sets.append({"f": f, "dense": (up_f @ down_f).contiguous(), "down": down_f, "up": up_f, "bias": f.bias})
    return sets


def bench_case(k, n, rank, bits, m, device, dtype, group=128, paths=("decode", "split")):
    lowrank_bytes = factor_bytes(k, n, rank, bits, group) + n * 2
    dense_bytes = n * k * 2 + n * 2
    fp16_lowrank_bytes = rank * (k + n) * 2 + n * 2
    n_sets = rotation_count(dense_bytes + lowrank_bytes + fp16_lowrank_bytes) if device.type == "cuda" else 2
    sets = make_sets(k, n, rank, bits, group, n_sets, device, dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    problem = Problem(m, n, k, rank, bits, group if bits == 4 else 0, x.element_size())
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device.type == "cuda" else 132
    interpret = device.type != "cuda"
    configs = {
        "decode": default_config(problem, sms, interpret, fused_max_m=1 << 30),
        "split": default_config(problem, sms, interpret, fused_max_m=0),
    }
    paths = tuple(p for p in paths if configs[p].path == p)  # decode needs 16-byte factor rows
    if "decode" in paths and m <= CUDA_CORE_MAX_M and one_launch_supported(problem):
        # a small layer: its one-launch plan beside the two-launch one (the GPU run checks the size rule)
        configs["one_launch"] = one_launch_config(problem)
        if configs["decode"].one_launch:
            configs["decode"] = decode_cuda_core_config(problem, sms)
        paths += ("one_launch",)
    decode = configs.get("decode")
    if "decode" in paths and not decode.uses_dot and not decode.one_launch:
        # phase 2's other prefetch depth before its dependent-launch wait: the default (by bits) is a static estimate
        # that assumes HBM serves phase 1's loads before phase 2's prefetch (bench/results/sass/README.md)
        configs["decode_other_prefetch"] = dataclasses.replace(decode,
                                                               expand_blocks_before_wait=other_blocks_before_wait(bits))
        paths += ("decode_other_prefetch",)
    contenders = {name: (lambda i, c=configs[name]: launch(x, sets[i]["f"], c, out)) for name in paths}
    contenders["auto"] = lambda i: lowrank_matmul(x, sets[i]["f"])  # what the custom op picks
    contenders["cublas"] = lambda i: F.linear(x, sets[i]["dense"], sets[i]["bias"])
    contenders["unfused"] = lambda i: F.linear(F.linear(x, sets[i]["down"]), sets[i]["up"], sets[i]["bias"])
    act_bytes = m * (k + n) * x.element_size()
    row = {"in": k, "out": n, "rank": rank, "bits": bits or 16, "m": m, "dtype": str(dtype).replace("torch.", ""),
           "factor_bytes": lowrank_bytes, "rotating_sets": n_sets}
    # A time counts only beside the correctness of what was timed: each kernel path against the reference.
    reference = lowrank_reference(x, sets[0]["f"]).float()  # [m, n]
    for name in (*paths, "auto"):
        out.fill_(float("nan"))  # poisoned: an unwritten element shows up as NaN error
        got = contenders[name](0).float()
        row[f"{name}_rel_err"] = ((got - reference).norm() / reference.norm()).item()
    for name, fn in contenders.items():
        us = time_ms(fn, n_sets, device) * 1e3
        moved = {"cublas": dense_bytes, "unfused": fp16_lowrank_bytes}.get(name, lowrank_bytes) + act_bytes
        row[f"{name}_us"] = round(us, 3)
        row[f"{name}_gbs"] = round(moved / (us * 1e-6) / 1e9, 1)
    best = min((row[f"{p}_us"], p) for p in (*paths, "auto"))
    row["best_path"] = best[1]
    row["speedup_vs_cublas"] = round(row["cublas_us"] / best[0], 3)
    row["speedup_vs_unfused"] = round(row["unfused_us"] / best[0], 3)
    return row


# The hybrid format (issue 10): base + rank-r correction. "base_only" is the same kernels with a rank-1 correction
# (the nearest thing to the kernel without one: the target is hybrid <= 1.15x base_only at M=1, <= 0.35x cuBLAS).
HYBRID_CASES = [(4096, 11008, 4, 32, 8), (4096, 11008, 3, 32, 8), (4096, 11008, 2, 32, 8), (1600, 6400, 4, 32, 8)]
HYBRID_M = (1, 16, 256)


def bench_hybrid_case(k, n, base_bits, rank, bits, m, device, dtype, group=128):
    # one set of weights, copied for L2 rotation (distinct memory is what rotation needs; building each set on the
    # CPU would cost seconds per 4096x11008 layer)
    w = random_hybrid_weights(k, n, rank, base_bits, group, bits, group, dtype, device=device)
    stored = w.storage_bytes() + n * 2  # base, factors and scales, plus the fp16 bias (as the low-rank rows count it)
    dense_bytes = n * k * 2 + n * 2
    n_sets = rotation_count(dense_bytes * 2 + stored) if device.type == "cuda" else 2
    single = random_hybrid_weights(k, n, 1, base_bits, group, bits, group, dtype, device=device)
    down, up_t = dequantized_factors(w.correction)
    first = {"w": w, "dense": w.dense_weight().to(dtype), "base": w.base_weight().to(dtype),  # [out, in]
             "down": down.to(dtype), "up": up_t.t().contiguous().to(dtype)}
    sets = [first] + [{key: copy_weights(value) for key, value in first.items()} for _ in range(n_sets - 1)]
    base_sets = [single] + [copy_weights(single) for _ in range(n_sets - 1)]
    x = torch.randn(m, k, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    problem = hybrid_problem_for(sets[0]["w"], m, x.element_size())
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device.type == "cuda" else 132
    config = default_config(problem, sms, device.type != "cuda")
    base_config = default_config(hybrid_problem_for(base_sets[0], m, x.element_size()), sms, device.type != "cuda")
    contenders = {
        "hybrid": lambda i: launch_hybrid(x, sets[i]["w"], config, out),
        "auto": lambda i: hybrid_matmul(x, sets[i]["w"]),
        "base_only": lambda i: launch_hybrid(x, base_sets[i], base_config, out),
        "cublas": lambda i: F.linear(x, sets[i]["dense"], sets[i]["w"].bias),
        # unfused PyTorch on dequantized fp16 weights: base GEMM plus the two correction GEMMs
        "unfused": lambda i: F.linear(x, sets[i]["base"], sets[i]["w"].bias) + F.linear(F.linear(x, sets[i]["down"]),
                                                                                        sets[i]["up"]),
    }
    row = {"in": k, "out": n, "base_bits": base_bits, "rank": rank, "bits": bits or 16, "m": m,
           "dtype": str(dtype).replace("torch.", ""), "path": config.path, "block_m": config.block_m,
           "stored_bytes": stored, "rotating_sets": n_sets}
    reference = hybrid_reference(x, sets[0]["w"]).float()
    for name in ("hybrid", "auto"):
        out.fill_(float("nan"))
        got = contenders[name](0).float()
        row[f"{name}_rel_err"] = ((got - reference).norm() / reference.norm()).item()
    act_bytes = m * (k + n) * x.element_size()
    for name, fn in contenders.items():
        us = time_ms(fn, n_sets, device) * 1e3
        moved = {"cublas": dense_bytes, "unfused": dense_bytes + rank * (k + n) * 2}.get(name, stored) + act_bytes
        row[f"{name}_us"] = round(us, 3)
        row[f"{name}_gbs"] = round(moved / (us * 1e-6) / 1e9, 1)
    row["hybrid_vs_base_only"] = round(row["hybrid_us"] / row["base_only_us"], 3)
    row["hybrid_vs_cublas"] = round(row["hybrid_us"] / row["cublas_us"], 3)
    return row


def copy_weights(value):
    """A copy in new memory of a tensor, or of every tensor in a NamedTuple of them (HybridWeights, LowRankFactors)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return type(value)(*(copy_weights(v) if isinstance(v, (torch.Tensor, tuple)) else v for v in value))


def out_of_time(args) -> bool:
    """--budget: no new case once this many seconds have passed since the start."""
    return args.budget is not None and time.monotonic() - START > args.budget


START = time.monotonic()


def hybrid_sweep(args, device, dtype, save=lambda rows: None) -> list[dict]:
    cases = [(64, 96, 4, 8, 8), (64, 96, 3, 8, 4)] if args.dry_run else HYBRID_CASES
    ms = (1, 20) if args.dry_run else HYBRID_M
    rows = []
    for case_index, (k, n, base_bits, rank, bits) in enumerate(cases):
        for m in ms[case_index % 2:case_index % 2 + 1] if args.dry_run else ms:  # dry run: int4 M=1, int3 M=20
            if out_of_time(args):
                print(f"--budget {args.budget}s spent: hybrid {k}x{n} int{base_bits} M={m} and later cases skipped")
                return rows
            group = 32 if args.dry_run else 128 if k % 128 == 0 else 64  # 128 does not divide GPT-2 XL's 1600
            row = bench_hybrid_case(k, n, base_bits, rank, bits, m, device, dtype, group)
            rows.append(row)
            save(rows)
            print(f"hybrid {k}x{n} int{base_bits} base + r={rank} int{bits} M={m} ({row['path']}, "
                  f"block_m {row['block_m']}): hybrid={row['hybrid_us']:.1f}us base_only={row['base_only_us']:.1f}us "
                  f"cublas={row['cublas_us']:.1f}us unfused={row['unfused_us']:.1f}us  "
                  f"x{row['hybrid_vs_base_only']:.2f} of base_only, x{row['hybrid_vs_cublas']:.2f} of cuBLAS  "
                  f"rel err {row['hybrid_rel_err']:.1e}", flush=True)
    return rows


def sweep(args, device, dtype, save=lambda rows: None):
    if args.dry_run:
        shapes, ms, ratios, bit_list = [(64, 96)], (1, 20), (0.25,), (8, 4)  # int8 M=1 and int4 M=20, below
    elif args.full:
        shapes, ms, ratios, bit_list = [*GPT2_SHAPES, LLAMA_SHAPE], M_VALUES, RATIOS, (8, 4)
    else:
        shapes, ms, ratios, bit_list = QUICK_SHAPES, QUICK_M, (0.25,), (8, 4)
    cases = []
    for (k, n), bits, m in ((s, b, m) for s in shapes for b in bit_list for m in ms):
        # every rank ratio at the largest M (the "no slower than unfused at every rank" target)
        for ratio in (RATIOS if m == max(ms) and not args.dry_run else ratios):
            cases.append((k, n, max(1, int(ratio * min(k, n))), bits, m))
    if args.dry_run:
        cases = [c for c in cases if (c[3], c[4]) in ((8, 1), (4, 20))]
    else:  # the small layers of bench/sass/problems.py, where one launch is the default plan
        cases += [(s.k, s.n, s.rank, s.bits, s.m) for s in SMALL_PROBLEMS]
    cases = sorted(dict.fromkeys(cases), key=lambda c: c[4])  # M = 1 first: what a cut-short run should have
    rows = []
    for i, (k, n, rank, bits, m) in enumerate(cases):
        if out_of_time(args):
            print(f"--budget {args.budget}s spent: {len(cases) - i} of {len(cases)} cases skipped")
            break
        paths = ("decode", "split") if m <= 64 else ("split",)  # decode's phase-1 work scales with M
        group = 32 if args.dry_run else 128
        row = bench_case(k, n, rank, bits, m, device, dtype, group, paths)
        rows.append(row)
        save(rows)
        shown = ("decode", "decode_other_prefetch", "one_launch", "split", "auto", "cublas", "unfused")
        print(f"[{i + 1}/{len(cases)}] {k}x{n} r={rank} int{bits} M={m}: "
              + "  ".join(f"{p}={row[f'{p}_us']:.1f}us" for p in shown if f"{p}_us" in row)
              + f"  best={row['best_path']} x{row['speedup_vs_cublas']:.2f} vs cuBLAS"
              + f"  max rel err {max(row[f'{p}_rel_err'] for p in shown if f'{p}_rel_err' in row):.1e}",
              flush=True)
    return rows


def autotune_timing(device, out_dir: Path) -> dict:
    """GPT-2 XL layer shapes (rank ratio 0.25, int8) tuned cold in fast mode, then a warm start. The cold run's
    winners go to tuned_winners.json (the format of kernels/tuned/<gpu-slug>.json, to be committed there)."""
    model = nn.Sequential(*[LowRankLinear(k, n, min(k, n) // 4, bits=8, device=device) for k, n in GPT2_XL_LAYERS])
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        tuner = Autotuner(mode="fast", cache_dir=cache_dir)
        cold = pretune_model(model, "fast", tuner=tuner)
        cold_s = time.perf_counter() - start
        write_json(out_dir / "tuned_winners.json", {"gpu": tuner.gpu_name, "triton": tuner.triton_version,
                                                     "entries": tuner.entries})
        start = time.perf_counter()
        warm = pretune_model(model, "fast", tuner=Autotuner(mode="fast", cache_dir=cache_dir))
        warm_s = time.perf_counter() - start
    result = {"cold_s": round(cold_s, 2), "warm_s": round(warm_s, 3), "unique_keys": cold["unique_keys"],
              "tuned_cold": cold["tuned"], "tuned_warm": warm["tuned"], "target_cold_s": 60, "target_warm_s": 2}
    print(f"autotune GPT-2 XL fast: cold {cold_s:.1f}s for {cold['unique_keys']} keys, warm {warm_s:.2f}s")
    return result


def plot(rows, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    groups = sorted({(r["in"], r["out"], r["bits"]) for r in rows})
    for k, n, bits in groups:
        sel = [r for r in rows if (r["in"], r["out"], r["bits"]) == (k, n, bits)]
        rank = sorted({r["rank"] for r in sel}, key=lambda v: abs(v - min(k, n) // 4))[0]
        sel = sorted((r for r in sel if r["rank"] == rank), key=lambda r: r["m"])
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("decode", "split", "auto", "cublas", "unfused"):
            pts = [(r["m"], r[f"{name}_us"]) for r in sel if f"{name}_us" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="µs (median)",
               title=f"{k}→{n}, rank {rank}, int{bits}")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        path = out_dir / f"kernels_{k}x{n}_int{bits}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole sweep (long)")
    parser.add_argument("--dry-run", action="store_true", help="CPU + interpreter, tiny shapes")
    parser.add_argument("--autotune", action="store_true", help="also time GPT-2 XL pretuning cold/warm")
    parser.add_argument("--autotune-only", action="store_true", help="only the autotune timing")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--budget", type=float, help="seconds: start no new case after this (results kept)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        parser.error("no CUDA device: use --dry-run")
    dtype = getattr(torch, args.dtype)
    out_dir = results_dir(device_name() if device.type == "cuda" else "dry-run")
    print(f"device: {device_name()}  ->  {out_dir}", flush=True)
    if args.autotune or args.autotune_only:
        write_json(out_dir / "autotune_timing.json", {"env": environment(), **autotune_timing(device, out_dir)})
        if args.autotune_only:
            return 0
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
    env = environment()

    def save(rows: list[dict], hybrid_rows: list[dict], partial: bool = True) -> None:
        for row in rows:
            row["best_pct_copy_bw"] = round(100 * max(row[f"{p}_gbs"] for p in ("decode", "split", "auto")
                                                      if f"{p}_gbs" in row) / copy_gbs, 1)
        write_json(out_dir / "kernels.json", {"env": env, "copy_gbs": round(copy_gbs, 1), "rows": rows,
                                              "hybrid_rows": hybrid_rows, "partial": partial})

    rows = sweep(args, device, dtype, lambda done: save(done, []))
    hybrid_rows = hybrid_sweep(args, device, dtype, lambda done: save(rows, done))
    save(rows, hybrid_rows, partial=False)
    write_csv(out_dir / "kernels.csv", rows)
    write_csv(out_dir / "hybrid_kernels.csv", hybrid_rows)
    if not args.no_plots:
        plot(rows, out_dir)
    print(f"wrote {out_dir / 'kernels.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
