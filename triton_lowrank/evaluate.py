"""Quality of a compressed model against its dense original, RTN baselines, and budget sweeps.

Metrics compare the two models' next-token distributions on the same token windows: either
windows of a text file (the model's context length each), or sequences sampled from the dense
model itself with a fixed seed when no text is given. Calibration samples use a different seed,
so sampled evaluation data is always held out from whitening calibration.

Weight bytes everywhere count the stored weight matrices of the compressed layers (factors or
quantized dense weight, with their float32 scales); biases are excluded because every method
keeps the same bias. The RTN baselines are SIMULATED: the dense weights are quantized and
dequantized in place in a copy of the model (so compute stays in float), and their bytes are
what the int8/int4 storage plus scales would take (quant.factor_bytes), not what the copy holds.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import eval_mode, model_device
from .compress import compress_model, select_layers
from .config import LowRankConfig
from .factorize import dense_weight
from .layers import LowRankLinear
from .quant import dequantize, factor_bytes, quantize

EVAL_SEED = 1  # sampled evaluation sequences
CALIB_SEED = 0  # sampled calibration sequences: a different seed keeps evaluation held out
METRICS = ("ppl_dense", "ppl_compressed", "ppl_ratio", "kl", "top1_agreement", "cosine", "mse")


# ----------------------------------------------------------------------------- token windows


MAX_DEFAULT_WINDOW = 2048  # long-context models (128k positions) would otherwise sample 128k-token windows


def context_length(model: nn.Module) -> int:
    """Default window length: the model's context (GPT-2's n_positions), at most MAX_DEFAULT_WINDOW."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    return min(context, MAX_DEFAULT_WINDOW)


def text_windows(tokenizer, text: str, length: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize `text` into non-overlapping [N, length] windows (the tail is dropped); at most
    `max_windows` of them, evenly spaced so that a long file is sampled from end to end."""
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to evaluate or calibrate on a text file")
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # [tokens]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); at least 2 are needed")
    if len(ids) < length:
        return ids[None]  # one short window beats no data for a small file
    windows = ids[: len(ids) // length * length].view(-1, length)  # [N, length]
    if max_windows is None or max_windows >= len(windows):
        return windows
    return windows[torch.linspace(0, len(windows) - 1, max_windows).round().long()]  # [max_windows, length]


@torch.no_grad()
def sample_sequences(
    model: nn.Module, num: int, length: int, seed: int, batch_size: int = 16, progress: bool = True
) -> torch.Tensor:
    """[num, length] token ids sampled (temperature 1, no top-k) from `model`, starting at BOS."""
    config = model.config
    start_id = config.bos_token_id if config.bos_token_id is not None else 0
    if not 0 <= start_id < config.vocab_size:
        start_id = 0
    device = model_device(model)
    chunks = []
    # fork_rng leaves the caller's global RNG state untouched; the seed makes the data reproducible.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for first in tqdm(range(0, num, batch_size), desc="sampling", unit="batch", disable=not progress):
            rows = min(batch_size, num - first)
            start = torch.full((rows, 1), start_id, dtype=torch.long, device=device)  # [rows, 1]
            out = model.generate(
                start,
                attention_mask=torch.ones_like(start),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=length - 1,
                min_new_tokens=length - 1,  # never stop early at EOS: every row has `length` tokens
                pad_token_id=start_id,
            )
            chunks.append(out.cpu())  # [rows, length]
    return torch.cat(chunks)


def eval_tokens(
    model: nn.Module,
    tokenizer=None,
    text: str | None = None,
    num_samples: int = 16,
    seq_len: int | None = None,
    seed: int = EVAL_SEED,
    progress: bool = True,
) -> torch.Tensor:
    """[N, T] evaluation (or calibration) windows: from `text` when given, else sampled from `model`."""
    length = seq_len or context_length(model)
    if text is not None:
        return text_windows(tokenizer, text, length, num_samples)
    return sample_sequences(model, num_samples, length, seed, progress=progress)


def batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split [N, T] windows into calibration/evaluation batches of at most `batch_size` rows."""
    return list(tokens.split(batch_size))


def calibration_batches(
    model: nn.Module,
    tokenizer=None,
    text: str | None = None,
    num_samples: int = 16,
    seq_len: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Whitening calibration: windows of `text`, else sequences sampled with CALIB_SEED (never EVAL_SEED)."""
    return batches(eval_tokens(model, tokenizer, text, num_samples, seq_len, CALIB_SEED, progress), batch_size)


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def model_logits(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, progress: bool = False):
    """Float32 logits [B, T, V] per batch of `tokens`, on the CPU."""
    device = model_device(model)
    with eval_mode(model):
        return [
            model(input_ids=batch.to(device)).logits.float().cpu()
            for batch in tqdm(batches(tokens, batch_size), desc="logits", unit="batch", disable=not progress)
        ]


def compare_logits(dense: list[torch.Tensor], compressed: list[torch.Tensor], tokens: torch.Tensor) -> dict:
    """Perplexities, KL(dense || compressed) per token, top-1 agreement, logits cosine and MSE."""
    sums = dict.fromkeys(("nll_dense", "nll_compressed", "kl", "agree", "cosine", "sq_err"), 0.0)
    positions = predicted = 0
    for ld, lc, ids in zip(dense, compressed, batches(tokens, dense[0].shape[0]), strict=True):  # ld, lc: [B, T, V]
        logp_d, logp_c = ld.log_softmax(-1), lc.log_softmax(-1)  # [B, T, V]
        # KL per position; identical logits give exactly 0 because the log-probabilities cancel.
        sums["kl"] += (logp_d.exp() * (logp_d - logp_c)).sum(-1).sum().item()
        sums["agree"] += (ld.argmax(-1) == lc.argmax(-1)).sum().item()
        sums["cosine"] += F.cosine_similarity(ld, lc, dim=-1).clamp(max=1.0).sum().item()
        sums["sq_err"] += (ld - lc).square().mean(-1).sum().item()
        targets = ids[:, 1:, None]  # [B, T-1, 1]: position t predicts token t+1
        sums["nll_dense"] -= logp_d[:, :-1].gather(-1, targets).sum().item()
        sums["nll_compressed"] -= logp_c[:, :-1].gather(-1, targets).sum().item()
        positions += ids.numel()
        predicted += targets.numel()
    ppl_dense = math.exp(sums["nll_dense"] / predicted)
    ppl_compressed = math.exp(sums["nll_compressed"] / predicted)
    return {
        "tokens": positions,
        "ppl_dense": ppl_dense,
        "ppl_compressed": ppl_compressed,
        "ppl_ratio": ppl_compressed / ppl_dense,
        "kl": sums["kl"] / positions,
        "top1_agreement": sums["agree"] / positions,
        "cosine": sums["cosine"] / positions,
        "mse": sums["sq_err"] / positions,
    }


def evaluate(
    dense_model: nn.Module,
    compressed_model: nn.Module,
    tokenizer=None,
    text: str | None = None,
    num_samples: int = 16,
    seq_len: int | None = None,
    batch_size: int = 8,
    seed: int = EVAL_SEED,
    tokens: torch.Tensor | None = None,
    progress: bool = True,
) -> dict:
    """Compare `compressed_model` to `dense_model` on the same windows; returns a dict of metrics.

    The windows are `tokens` [N, T] if given, else `num_samples` windows of `text` (tokenized with
    `tokenizer`), else `num_samples` sequences sampled from the dense model with `seed`.
    `source` in the result says which.
    """
    if tokens is not None:
        source = "given tokens"
    else:
        source = "text" if text is not None else f"sampled from the dense model (seed {seed})"
        tokens = eval_tokens(dense_model, tokenizer, text, num_samples, seq_len, seed, progress)
    dense = model_logits(dense_model, tokens, batch_size, progress)
    compressed = model_logits(compressed_model, tokens, batch_size, progress)
    return {"source": source, **compare_logits(dense, compressed, tokens)}


# ----------------------------------------------------------------------------- byte counts and RTN


def dense_bytes(model: nn.Module, config: LowRankConfig, float_bytes: int = 2) -> int:
    """Bytes of the selected layers' dense weight matrices stored as fp16 (the budget's reference)."""
    return sum(dense_weight(m).numel() * float_bytes for m in select_layers(model, config).values())


def lowrank_bytes(model: nn.Module) -> int:
    """Stored factor + scale bytes of every LowRankLinear in `model` (buffers only: bias excluded)."""
    return sum(
        b.numel() * b.element_size() for m in model.modules() if isinstance(m, LowRankLinear) for b in m.buffers()
    )


@torch.no_grad()
def rtn_baseline(dense_model: nn.Module, bits: int, group_size: int = 128, config: LowRankConfig | None = None):
    """(copy of the model with RTN quantize-dequantized weights, bytes the quantized storage takes).

    The layers are those `config` (include/exclude only) selects, so a baseline covers the same
    matrices as the low-rank compression it is compared with. int8 has one scale per output row;
    int4 one scale per `group_size` input features.
    """
    model = copy.deepcopy(dense_model)
    stored = 0
    for module in select_layers(model, config or LowRankConfig(budget=1.0)).values():
        weight = dense_weight(module)  # [out, in]; a view, so copy_ writes through for Conv1D too
        storage, scale = quantize(weight, bits, group_size)
        weight.copy_(dequantize(storage, scale, bits, group_size))
        stored += factor_bytes(*weight.shape, bits, group_size)
    return model, stored


# ----------------------------------------------------------------------------- sweeps


def compress_copy(
    dense_model: nn.Module, config: LowRankConfig, calibration: Iterable | None = None, progress: bool = False
):
    """(compressed deep copy of `dense_model`, CompressionReport); the dense model is left as is."""
    model = copy.deepcopy(dense_model)
    report = compress_model(model, config, calibration if config.method == "whitened" else None, progress)
    return model, report


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
) -> list[dict]:
    """Rows of {method, bits, budget, weight_bytes, bytes_fraction, metrics...} on the windows `tokens`
    [N, T]: low-rank for every method x bits x budget (whitened calibrated on `calibration`), then the
    int8 and int4 RTN baselines of the same layers."""
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
        rows.append(row(method, bit, budget, model, lowrank_bytes(model)))
    for bit in (8, 4):
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
    import matplotlib

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
