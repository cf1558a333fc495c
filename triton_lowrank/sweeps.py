"""Quality-vs-bytes sweeps: low-rank points and RTN baselines on the same windows, as JSON, CSV and a plot."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .baselines import compress_copy, compressed_bytes, dense_bytes, rtn_baseline
from .config import LowRankConfig
from .metrics import compare_logits, model_logits


def result_row(method: str, bits: int | None, budget: float | None, stored: int, reference: int, metrics: dict):
    """One sweep table row: how a model was made, its weight bytes (also / fp16 dense bytes), its metrics."""
    return {
        "method": method,
        "bits": bits,
        "budget": budget,
        "weight_bytes": stored,
        "bytes_fraction": stored / reference,
        **metrics,
    }


def sweep(
    dense_model: nn.Module,
    tokens: torch.Tensor,
    calibration: list,
    budgets: Iterable[float] = (0.25, 0.375, 0.5, 0.625, 0.75),
    methods: Iterable[str] = ("svd", "whitened"),
    bits: Iterable[int | None] = (8, 4),
    group_size: int = 128,
    batch_size: int = 8,
    progress: bool = True,
    rtn_bits: Iterable[int] | None = None,
) -> list[dict]:
    """Rows of {method, bits, budget, weight_bytes, bytes_fraction, metrics...} on the windows `tokens`
    [N, T]: low-rank for every method x bits x budget (whitened calibrated on `calibration`), then RTN
    baselines of the same layers at each width of `rtn_bits` (default: the quantized widths of `bits`)."""
    bits = tuple(bits)
    rtn_bits = sorted({b for b in bits if b is not None} if rtn_bits is None else set(rtn_bits), reverse=True)
    selection = LowRankConfig(budget=1.0)  # default include/exclude: the layers every method compresses
    reference = dense_bytes(dense_model, selection)
    dense_logits = model_logits(dense_model, tokens, batch_size)  # computed once, compared many times

    def row(method, bit, budget, model, stored) -> dict:
        metrics = compare_logits(dense_logits, model_logits(model, tokens, batch_size), tokens)
        return result_row(method, bit, budget, stored, reference, metrics)

    points = [(m, b, bud) for m in methods for b in bits for bud in budgets]
    rows = []
    for method, bit, budget in tqdm(points, desc="sweep", unit="point", disable=not progress):
        config = LowRankConfig(budget=budget, bits=bit, group_size=group_size, method=method)
        model, _ = compress_copy(dense_model, config, calibration)
        rows.append(row(method, bit, budget, model, compressed_bytes(model)))
    for bit in rtn_bits:
        model, stored = rtn_baseline(dense_model, bit, group_size, selection)
        rows.append(row("rtn", bit, None, model, stored))
    return rows


def write_sweep(rows: list[dict], out_dir: str | Path, title: str = "quality vs weight bytes") -> dict:
    """Write sweep.json, sweep.csv and sweep.png into `out_dir`; returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "sweep.json", "csv": out_dir / "sweep.csv", "png": out_dir / "sweep.png"}
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_sweep(rows, paths["png"], title)
    return paths


def plot_sweep(rows: list[dict], path: str | Path, title: str) -> None:
    """Three panels (KL, perplexity ratio, top-1 agreement) against weight bytes, RTN as stars."""
    import matplotlib  # optional at import time: only plotting needs it

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    panels = (
        ("kl", "KL(dense || compressed) per token", True),
        ("ppl_ratio", "perplexity ratio", False),
        ("top1_agreement", "top-1 agreement", False),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    curves = sorted({(r["method"], r["bits"]) for r in rows if r["method"] != "rtn"}, key=lambda c: (c[0], c[1] or 99))
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for method, bit in curves:
            pts = sorted((r["bytes_fraction"], r[key]) for r in rows if (r["method"], r["bits"]) == (method, bit))
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{method} " + (f"int{bit}" if bit else "float"))
        for r in rows:
            if r["method"] == "rtn":
                ax.scatter(
                    r["bytes_fraction"],
                    r[key],
                    marker="*" if r["bits"] == 8 else "P",
                    s=150,
                    zorder=3,
                    color="black",
                    label=f"RTN int{r['bits']}",
                )
        ax.set(xlabel="weight bytes / fp16 dense bytes", ylabel=label, yscale="log" if log else "linear")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
