"""vLLM throughput, dense vs compressed (both formats), same dtype: generated tokens per second with 1 and with
8 concurrent prompts. Runs in .venv-vllm (scripts/setup_vllm.sh):

    .venv-vllm/bin/python bench/vllm_bench.py [--model DENSE_DIR] [--dtype bfloat16] [--new-tokens 64]

It compresses the dense model (default: the embedded GPT-2) in each format, starts one vLLM engine per
checkpoint (enforce_eager, VLLM_CPU_KVCACHE_SPACE=1 on the CPU) and writes vllm_bench.json / vllm_bench.md to
bench/results/vllm-<device>/ with the machine it ran on. Concurrency 1 runs the prompts one after another,
concurrency 8 submits 8 at once; ignore_eos makes every request generate exactly --new-tokens tokens; one
warm-up generate per engine is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import vllm
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import LLM, SamplingParams

import triton_lowrank
from triton_lowrank import LowRankConfig, compress_model, embedded_model_path, save_compressed

BENCH_DIR = Path(__file__).resolve().parent
PROMPTS = ["ROMEO:", "JULIET: O Romeo", "First Citizen:\nBefore we proceed", "KING HENRY:", "MENENIUS:",
           "CORIOLANUS: What", "LADY MACBETH:", "HAMLET: To be"]
FORMATS = {  # name -> LowRankConfig fields
    "lowrank int4 r32": {"rank": 32, "bits": 4, "group_size": 64},
    "hybrid int3 base + int8 r16": {"rank": 16, "bits": 8, "base_bits": 3, "base_group_size": 64,
                                    "base_method": "rtn"},
}


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                            text=True).stdout.strip()
    return {"device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                       * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
            "triton_lowrank": triton_lowrank.__version__, "commit": commit,
            "load_average_1min": round(os.getloadavg()[0], 1)}  # a shared machine's other work slows every row


def checkpoints(dense: str, workdir: Path) -> dict[str, str]:
    folders = {"dense": dense}
    tokenizer = AutoTokenizer.from_pretrained(dense)
    for name, fields in FORMATS.items():
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
        compress_model(model, LowRankConfig(**fields), progress=False)
        folders[name] = str(save_compressed(model, workdir / name.split()[0], tokenizer))
    return folders


def weight_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def throughput(folder: str, dtype: str, new_tokens: int, max_model_len: int) -> dict:
    start = time.perf_counter()
    llm = LLM(model=folder, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=0)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(PROMPTS[:1], params, use_tqdm=False)  # warm-up
    row = {"engine_start_s": round(startup, 1)}
    for concurrency in (1, 8):
        start = time.perf_counter()
        if concurrency == 1:
            outputs = [o for p in PROMPTS[:4] for o in llm.generate([p], params, use_tqdm=False)]
        else:
            outputs = llm.generate(PROMPTS[:concurrency], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        row[f"tok_s_c{concurrency}"] = round(tokens / seconds, 1)
    del llm
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="dense HF folder (default: the embedded GPT-2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--out", help="results folder (default bench/results/vllm-cpu or vllm-<gpu>)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    dense = args.model or str(embedded_model_path())
    info = machine()
    out = Path(args.out) if args.out else BENCH_DIR / "results" / (
        "vllm-cpu" if info["device"] == "cpu" else "vllm-" + info["device"].split(": ")[1].lower().replace(" ", "-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in checkpoints(dense, Path(tmp)).items():
            row = {"model": name, "weights_mib": round(weight_bytes(folder) / 2**20, 2),
                   **throughput(folder, args.dtype, args.new_tokens, args.max_model_len)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    settings = {"model": "embedded GPT-2 (6 layers, 256 wide, 4096 vocab)" if not args.model else args.model,
                "dtype": args.dtype, "new_tokens": args.new_tokens, "enforce_eager": True,
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE")}
    (out / "vllm_bench.json").write_text(json.dumps({"machine": info, "settings": settings, "rows": rows},
                                                    indent=2) + "\n")
    lines = [f"# vLLM throughput: {settings['model']}, {args.dtype}, {args.new_tokens} new tokens per request", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "| model | weights MiB | tok/s, 1 prompt at a time | tok/s, 8 concurrent | engine start s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['weights_mib']} | {r['tok_s_c1']} | {r['tok_s_c8']} | {r['engine_start_s']} |"
              for r in rows]
    (out / "vllm_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":  # vLLM spawns its engine: the guard keeps the child from re-running the benchmark
    main()
