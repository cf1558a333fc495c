"""Compression time and peak memory of SmolLM2-135M-Instruct per format, through the library path (compress_model:
whitened, block by block, default group sizes), each format in a fresh process so its peak RSS is its own.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_compress.py       # writes bench/results/smollm2/compression.json

Calibration: `--calib-tokens` tokens of the calibration half of the Language Reference (triton_lowrank/smollm2.py).
Peak RSS is the process's (ru_maxrss): model, calibration activations, Gram matrices and the fit together; the RSS
after loading the fp32 model is given beside it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "smollm2"
FORMATS = {  # format -> LowRankConfig keywords (budgets: bytes of GPTQ int4 / int3 g64 + ~0.03, and equal bytes)
    "low rank": dict(budget=0.3, bits=8, method="whitened"),
    "hybrid int4": dict(budget=0.31, bits=8, method="whitened", base_bits=4),
    "hybrid int3": dict(budget=0.28125, bits=8, method="whitened", base_bits=3),
    "hybrid int2": dict(budget=0.2266, bits=8, method="whitened", base_bits=2),
}


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 2**20


def one(name: str, calib_tokens: int, seq_len: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from triton_lowrank import LowRankConfig, compress_model
    from triton_lowrank.tools import smollm2
    from triton_lowrank.tools.baselines import compressed_bytes, dense_bytes
    from triton_lowrank.tools.eval_data import batches, text_windows

    torch.set_num_threads(threads)
    folder = smollm2.smollm2_folder(progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    calibration = batches(text_windows(tokenizer, smollm2.technical_split()[0], seq_len, calib_tokens // seq_len), 4)
    config = LowRankConfig(**FORMATS[name])
    reference = dense_bytes(model, config)
    loaded = rss_gb()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = compress_model(model, config, calibration, progress=False)
    seconds = time.perf_counter() - start
    groups = sorted({(getattr(m, "base_group_size", None), m.group_size) for m in model.modules()
                     if hasattr(m, "group_size") and hasattr(m, "spec")}, key=str)
    return {"format": name, "config": ", ".join(f"{k}={v}" for k, v in FORMATS[name].items()),
            "compress_s": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "loaded_rss_gb": loaded, "bytes_fraction": compressed_bytes(model) / reference,
            "layers": len(report.layers), "group_sizes (base, factors)": groups}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one format, its row as JSON on stdout
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(one(args.one, args.calib_tokens, args.seq_len, args.threads)), flush=True)
        return
    path = args.out / "compression.json"
    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    data["machine"] = (f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, {args.threads} "
                       f"torch thread(s), torch {torch.__version__}")
    data["note"] = (f"compress_model on {args.calib_tokens} calibration tokens (windows of {args.seq_len}), "
                    "whitened, sequential (block by block), default group sizes; 210 layers; one fresh process each.")
    for name in args.formats:
        child = subprocess.run([sys.executable, __file__, "--one", name, "--calib-tokens", str(args.calib_tokens),
                                "--seq-len", str(args.seq_len), "--threads", str(args.threads)],
                               capture_output=True, text=True, check=True)
        row = json.loads(next(line[4:] for line in child.stdout.splitlines() if line.startswith("ROW ")))
        print(row, flush=True)
        data["rows"] = [r for r in data["rows"] if r["format"] != name] + [row]
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
