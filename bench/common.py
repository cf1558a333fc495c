"""Shared benchmark helpers (kernel_bench.py, e2e.py): device naming, results directory, timing with
cold L2 (rotating buffers + CUDA graphs), copy bandwidth, and JSON/CSV output."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_L2_BYTES = 50 * 2**20  # H100/H200 class, used when the device does not say


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_dir(name: str | None = None) -> Path:
    """bench/results/<gpu-name-slug>/, created; $BENCH_RESULTS_DIR instead where set (gpu_check.sh --dry-run, tests)."""
    override = os.environ.get("BENCH_RESULTS_DIR")
    path = Path(override) if override else BENCH_DIR / "results" / slug(name or device_name())
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict:
    import triton_lowrank

    info = {"device": device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "package_path": str(Path(triton_lowrank.__path__[0]))}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(sms=props.multi_processor_count, l2_bytes=l2_bytes(), memory_gb=round(props.total_memory / 1e9, 1))
    return info


def l2_bytes() -> int:
    if not torch.cuda.is_available():
        return DEFAULT_L2_BYTES
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_count(bytes_per_set: int, max_sets: int = 256) -> int:
    """Distinct weight sets needed so cycling through them streams > 2x L2 (every read is cold)."""
    return max(2, min(max_sets, math.ceil(2 * l2_bytes() / max(1, bytes_per_set))))


def time_ms(fn: Callable[[int], object], n_sets: int, device: torch.device | str) -> float:
    """Median milliseconds of one fn(i) call, i cycling over n_sets rotating inputs.

    CUDA: the n_sets calls are captured into one CUDA graph and timed with
    triton.testing.do_bench (median of replays) / n_sets: GPU time with cold L2, without Python
    launch overhead (decode-time kernels run under graphs in serving), the same for every
    contender. Falls back to eager do_bench when capture fails. CPU (dry runs): wall clock.
    """
    if torch.device(device).type != "cuda":
        samples = []
        for rep in range(5):
            start = time.perf_counter()
            fn(rep % n_sets)
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    import triton.testing

    for i in range(n_sets):  # warm up: compile, autotune lookups, workspace allocation
        fn(i)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n_sets):
                fn(i)
        return triton.testing.do_bench(graph.replay, return_mode="median") / n_sets
    except Exception as err:  # noqa: BLE001 - report and fall back to eager timing
        print(f"  (graph capture failed: {type(err).__name__}: {err}; timing eagerly)")
        counter = iter(range(10**9))
        return triton.testing.do_bench(lambda: fn(next(counter) % n_sets), return_mode="median")


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 512 * 2**20) -> float:
    """Device-to-device copy bandwidth (read + write bytes / median time), measured now."""
    on_gpu = torch.device(device).type == "cuda"
    nbytes = nbytes if on_gpu else 16 * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if on_gpu:
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    else:
        ms = time_ms(lambda i: dst.copy_(src), 1, device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    if not rows:
        path.write_text("")
        return path
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path
