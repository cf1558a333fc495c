"""Quality vs weight bytes of the embedded GPT-2: low-rank (svd, whitened) x bits x budget, and every baseline.

Baselines on the same layers and tokens (sweeps.ALL_RTN / ALL_GPTQ / ALL_HYBRID): RTN int8, int4, int3 and
int2; GPTQ int4 and int3 (weight-only, group-wise, on the calibration sequences); the hybrid format
(GPTQ base int4 / int3 / int2 + a rank-16 whitened int8 correction).

Writes sweep.json, sweep.csv and sweep.png into bench/results/quality/ and checks the targets:
whitened int8 at budget 0.5 keeps top-1 agreement >= 90% and perplexity ratio <= 1.10, and at
equal bytes whitened KL <= half of plain SVD's. Evaluation and calibration sequences are sampled
from the dense model with different seeds (or read from --text / --calib-text).

    .venv/bin/python bench/quality.py            # ~1 minute on an idle 2-core CPU

bench/results/quality/heldout_text/ was written with --text = the held-out split of the training
corpus (last 5% of each play, from scripts/train_embedded_model.py's load_plays + split_play) and
--calib-text = a 200,000-character slice of the training split; neither text is committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from triton_lowrank.tools.eval_data import calibration_batches, eval_tokens
from triton_lowrank.tools.loading import load_model, load_tokenizer, runtime
from triton_lowrank.tools.sweeps import ALL_GPTQ, ALL_HYBRID, ALL_RTN, sweep, write_sweep

OUT = Path(__file__).resolve().parent / "results" / "quality"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: the embedded GPT-2)")
    p.add_argument("--text", help="evaluation text file (default: sequences sampled from the dense model)")
    p.add_argument("--calib-text", help="calibration text file (default: sampled with another seed)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.375, 0.5, 0.625, 0.75])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[16, 8, 4])
    p.add_argument("--samples", type=int, default=32, help="evaluation windows")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--no-baselines", action="store_true", help="low-rank and RTN int8/int4 only (the old sweep)")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def check_targets(rows: list[dict]) -> list[str]:
    """Lines saying whether each quality target is met, from the sweep rows."""
    by_key = {(r["method"], r["bits"], r["budget"]): r for r in rows}
    lines = []
    main = by_key.get(("whitened", 8, 0.5))
    if main:
        ok = main["top1_agreement"] >= 0.90 and main["ppl_ratio"] <= 1.10
        lines.append(
            f"{'MET ' if ok else 'MISS'} whitened int8 budget 0.5: top-1 {main['top1_agreement']:.1%} (>= 90%), "
            f"ppl ratio {main['ppl_ratio']:.3f} (<= 1.10)"
        )
    for (method, bits, budget), row in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        svd = by_key.get(("svd", bits, budget))
        if method == "whitened" and svd:
            ok = row["kl"] <= 0.5 * svd["kl"]
            lines.append(
                f"{'MET ' if ok else 'MISS'} int{bits} budget {budget}: whitened KL {row['kl']:.4f} vs svd "
                f"{svd['kl']:.4f} (ratio {row['kl'] / svd['kl']:.2f}, target <= 0.5)"
            )
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.model is None:
        from triton_lowrank.embedded import embedded_model_path

        args.model = embedded_model_path()
    device, dtype = runtime(args.model)
    dense = load_model(args.model, device, dtype)
    tokenizer = load_tokenizer(args.model)
    read = lambda f: None if f is None else Path(f).read_text(encoding="utf-8")
    tokens = eval_tokens(dense, tokenizer, read(args.text), args.samples, args.seq_len)
    calibration = calibration_batches(dense, tokenizer, read(args.calib_text), args.calib_samples, args.seq_len)
    bits = [None if b == 16 else b for b in args.bits]
    baselines = {} if args.no_baselines else {"rtn_bits": ALL_RTN, "gptq": ALL_GPTQ, "hybrid": ALL_HYBRID}
    rows = sweep(dense, tokens, calibration, args.budgets, ("svd", "whitened"), bits, **baselines)
    paths = write_sweep(rows, args.out, f"{Path(args.model).name}: quality vs weight bytes ({device})")

    print(f"{'format':<34} {'bytes':>10} {'of fp16':>7} {'KL':>8} {'top-1':>6} {'ppl ratio':>9}")
    for r in rows:
        print(
            f"{r['label']:<34} {r['weight_bytes']:>10,} {r['bytes_fraction']:>7.1%} "
            f"{r['kl']:>8.4f} {r['top1_agreement']:>6.1%} {r['ppl_ratio']:>9.3f}"
        )
    print("\n".join(check_targets(rows)))
    print(f"dense perplexity {rows[0]['ppl_dense']:.2f} on {rows[0]['tokens']} tokens; wrote", *paths.values())


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
