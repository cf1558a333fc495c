"""Quality-vs-bytes sweeps on the same windows, as JSON, CSV and a plot. Families (a row's `method`):

- "svd" / "whitened": the pure low-rank format, one curve per factor width, over `budgets`;
- "rtn": round-to-nearest int8 / int4 / int3 / int2 (baselines.py), "gptq": GPTQ int4 / int3 / int2;
- "hybrid": the hybrid format W ≈ Q + U·D (a GPTQ base plus a whitened low-rank correction).

Every family is measured against the same dense logits and counted in the same bytes (stored codes,
factors, scales and zeros of the same layers, over their fp16 bytes), so the plot shows one quality-vs-
bytes curve per family.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from triton_lowrank.core.config import LowRankConfig
from triton_lowrank.core.quant import bits_label
from triton_lowrank.tools.baselines import (
    baseline_label,
    compress_copy,
    compressed_bytes,
    dense_bytes,
    gptq_baseline,
    layer_grams,
    rtn_baseline,
)
from triton_lowrank.tools.metrics import compare_logits, model_logits

# Every baseline family at a glance (bench/quality.py and the demo): (bits, group_size) and
# (base_bits, base_group_size, rank) points, from ~0.5 down to ~0.15 of the fp16 bytes.
ALL_RTN = ((8, 128), (4, 128), (4, 64), (3, 64), (2, 64))
ALL_GPTQ = ((4, 128), (3, 64))
ALL_HYBRID = ((4, 128, 16), (3, 64, 16), (2, 64, 16))
BASELINE_METHODS = ("rtn", "gptq", "hybrid")


def result_row(
    method: str,
    bits: int | None,
    budget: float | None,
    stored: int,
    reference: int,
    metrics: dict,
    group_size: int | None = None,
    label: str | None = None,
    rank: int | None = None,
    base_bits: int | None = None,
    base_group_size: int | None = None,
) -> dict:
    """One sweep table row: how a model was made, its weight bytes (also / fp16 dense bytes), its metrics.

    Every row has every key (None where it does not apply), so the rows make one CSV table.
    """
    if label is None:
        label = f"{method} {bits_label(bits)}" + (f" g{group_size}" if group_size else "")
        label += "" if budget is None else f" budget {budget:.3g}"
    return {
        "method": method,
        "label": label,
        "bits": bits,
        "group_size": group_size,
        "budget": budget,
        "rank": rank,
        "base_bits": base_bits,
        "base_group_size": base_group_size,
        "weight_bytes": stored,
        "bytes_fraction": stored / reference,
        **metrics,
    }


def hybrid_label(base_bits: int, base_group_size: int, rank: int, bits: int | None) -> str:
    return f"hybrid int{base_bits} g{base_group_size} + r{rank} {bits_label(bits)}"


def _pairs(points: Iterable[int | tuple[int, int]], group_size: int) -> list[tuple[int, int]]:
    """(bits, group_size) per point; a bare int takes the sweep's `group_size`."""
    return [(p, group_size) if isinstance(p, int) else tuple(p) for p in points]


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
    rtn_bits: Iterable[int | tuple[int, int]] | None = None,
    gptq: Iterable[int | tuple[int, int]] = (),
    hybrid: Iterable[tuple[int, int, int]] = (),
    hybrid_bits: int | None = 8,
) -> list[dict]:
    """Rows of {method, label, bits, group_size, budget, rank, base_bits, base_group_size, weight_bytes,
    bytes_fraction, metrics...} on the windows `tokens` [N, T], in this order:

    - low-rank for every method x bits x budget (whitened calibrated on `calibration`);
    - RTN baselines of the same layers at each width of `rtn_bits` (default: the quantized widths of `bits`);
    - GPTQ baselines at each width of `gptq` (default none), on the dense model's Grams over `calibration`;
    - hybrid points (base_bits, base_group_size, rank) of `hybrid` (default none): GPTQ base, whitened
      correction with `hybrid_bits` factors (int8 by default, int4 in groups of `group_size`).
    A width in `rtn_bits` / `gptq` is an int (grouped by `group_size`) or a (bits, group_size) pair.
    """
    bits = tuple(bits)
    if rtn_bits is None:
        rtn_bits = sorted({b for b in bits if b is not None}, reverse=True)
    rtn_points, gptq_points, hybrid_points = _pairs(rtn_bits, group_size), _pairs(gptq, group_size), list(hybrid)
    selection = LowRankConfig(budget=1.0)  # default include/exclude: the layers every method compresses
    reference = dense_bytes(dense_model, selection)
    dense_logits = model_logits(dense_model, tokens, batch_size)  # computed once, compared many times

    def row(method, bit, budget, model, stored, **info) -> dict:
        metrics = compare_logits(dense_logits, model_logits(model, tokens, batch_size), tokens)
        return result_row(method, bit, budget, stored, reference, metrics, **info)

    points = [("lowrank", (m, b, bud)) for m in methods for b in bits for bud in budgets]
    points += [("rtn", p) for p in rtn_points] + [("gptq", p) for p in gptq_points]
    points += [("hybrid", p) for p in hybrid_points]
    grams = layer_grams(dense_model, calibration, selection) if gptq_points else None
    rows = []
    for family, point in tqdm(points, desc="sweep", unit="point", disable=not progress):
        if family == "lowrank":
            method, bit, budget = point
            config = LowRankConfig(budget=budget, bits=bit, group_size=group_size, method=method)
            model, _ = compress_copy(dense_model, config, calibration)
            grouped = group_size if bit == 4 else None
            rows.append(row(method, bit, budget, model, compressed_bytes(model), group_size=grouped))
        elif family in ("rtn", "gptq"):
            bit, g = point
            if family == "rtn":
                model, stored = rtn_baseline(dense_model, bit, g, selection)
            else:
                model, stored = gptq_baseline(dense_model, bit, g, config=selection, grams=grams)
            grouped = None if bit == 8 else g
            rows.append(row(family, bit, None, model, stored, group_size=grouped, label=baseline_label(family, bit, g)))
        else:
            base_bits, base_group_size, rank = point
            config = LowRankConfig(rank=rank, bits=hybrid_bits, group_size=group_size, method="whitened",
                                   base_bits=base_bits, base_group_size=base_group_size)
            model, _ = compress_copy(dense_model, config, calibration)
            rows.append(row("hybrid", hybrid_bits, None, model, compressed_bytes(model),
                            group_size=group_size if hybrid_bits == 4 else None, rank=rank, base_bits=base_bits,
                            base_group_size=base_group_size,
                            label=hybrid_label(base_bits, base_group_size, rank, hybrid_bits)))
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


# Baseline families: one dashed curve each through its points in byte order, every point tagged.
FAMILY_STYLE = {  # colours outside the first six of the default cycle, which the low-rank curves take
    "rtn": {"marker": "*", "color": "black", "markersize": 12, "label": "RTN"},
    "gptq": {"marker": "D", "color": "teal", "markersize": 7, "label": "GPTQ"},
    "hybrid": {"marker": "s", "color": "magenta", "markersize": 8, "label": "hybrid (GPTQ base + low-rank)"},
}


def point_tag(row: dict) -> str:
    """The short name written next to a baseline point: "int4 g128", "int3 g64 + r16"."""
    if row["method"] == "hybrid":
        return f"int{row['base_bits']} g{row['base_group_size']} + r{row['rank']}"
    return f"int{row['bits']}" + (f" g{row['group_size']}" if row["group_size"] else "")


def plot_sweep(rows: list[dict], path: str | Path, title: str) -> None:
    """Three panels (KL, perplexity ratio, top-1 agreement) against weight bytes, one curve per family."""
    import matplotlib  # optional at import time: only plotting needs it

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    panels = (
        ("kl", "KL(dense || compressed) per token", True),
        ("ppl_ratio", "perplexity ratio", False),
        ("top1_agreement", "top-1 agreement", False),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    lowrank = [r for r in rows if r["method"] not in BASELINE_METHODS]
    curves = sorted({(r["method"], r["bits"]) for r in lowrank}, key=lambda c: (c[0], c[1] or 99))
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for method, bit in curves:
            pts = sorted((r["bytes_fraction"], r[key]) for r in lowrank if (r["method"], r["bits"]) == (method, bit))
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"low-rank {method} {bits_label(bit)}")
        for family, style in FAMILY_STYLE.items():
            members = sorted((r for r in rows if r["method"] == family), key=lambda r: r["bytes_fraction"])
            if not members:
                continue
            xs, ys = [r["bytes_fraction"] for r in members], [r[key] for r in members]
            ax.plot(xs, ys, linestyle="--", zorder=3, **style)
            for r, x, y in zip(members, xs, ys, strict=True):
                ax.annotate(point_tag(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=style["color"])
        ax.set(xlabel="weight bytes / fp16 dense bytes", ylabel=label, yscale="log" if log else "linear")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
