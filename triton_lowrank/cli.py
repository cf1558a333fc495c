"""`triton-lowrank`: compress, eval, generate, bench, autotune and demo from the command line.

Every expected failure (bad arguments, missing folders, invalid ranks, an existing output
folder, no GPU for autotune) ends as ONE line on stderr and a nonzero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from .config import LowRankConfig

PROG = "triton-lowrank"
# "gpt2" or "org/name": what a hub id looks like; anything else missing locally is a missing folder.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
BITS = {"16": None, "8": 8, "4": 4}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; the CLI promises a single line."""

    def error(self, message: str):
        print(f"{PROG}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def resolve_model(name: str) -> str:
    """A local folder as is; a hub id is passed on (from_pretrained resolves it when the hub is reachable)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{name} is a file; expected a model folder")
    if not HUB_ID.fullmatch(name) or name.startswith("."):
        raise FileNotFoundError(f"model folder not found: {name}")
    if not hub_reachable():
        raise FileNotFoundError(
            f"model folder not found: {name}; as a hub id it needs the Hugging Face hub, which is not reachable "
            "(HF_HUB_OFFLINE=1 uses the local cache)"
        )
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP probe: an unreachable hub otherwise costs ~25 s of retries and log lines."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True  # from_pretrained then reads the local cache only, without network
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout).close()
    except OSError:
        return False
    return True


def load(name: str, what: str = "model", keep_dtype: bool = False):
    """(model, tokenizer or None) on this machine's default device, in its runtime dtype or, with
    keep_dtype, the checkpoint's; hub failures become one error line."""
    from .demo import load_model, load_tokenizer, runtime

    source = resolve_model(name)
    device, dtype = runtime(source)
    dtype = None if keep_dtype else dtype
    try:
        model = load_model(source, device, dtype)
    except OSError as exc:
        if Path(source).is_dir():
            raise
        raise FileNotFoundError(f"{what} {name!r}: no such local folder, and the hub lookup failed ({exc})") from None
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError):
        tokenizer = None  # a folder saved without a tokenizer still compresses and evaluates on sampled text
    return model, tokenizer


def read_text(path: str | None) -> str | None:
    return None if path is None else Path(path).read_text(encoding="utf-8")


def rank_config(args) -> LowRankConfig:
    knobs = {k: getattr(args, k) for k in ("rank", "rank_ratio", "energy", "budget") if getattr(args, k) is not None}
    return LowRankConfig(
        **(knobs or {"budget": 0.5}), bits=BITS[args.bits], group_size=args.group_size, method=args.method
    )


# ----------------------------------------------------------------------------- commands


def cmd_compress(args) -> None:
    from .checkpoint import save_compressed
    from .compress import compress_model, recommended_calib_tokens, validate_layers
    from .demo import checkpoint_dtype
    from .evaluate import calibration_batches, context_length, dense_bytes, lowrank_bytes

    out = Path(args.out)
    # save_compressed checks this too, but only after minutes of work: fail before loading anything.
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} already exists; pass --overwrite to replace it")
    config = rank_config(args)
    for flag in ("calib_tokens", "calib_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number, got {getattr(args, flag)}")
    model, tokenizer = load(args.model)
    layers = validate_layers(model, config)  # bad ranks/bits fail before calibration sampling
    calibration = None
    if config.method == "whitened":
        recommended = recommended_calib_tokens(layers)
        seq_len = args.seq_len or context_length(model)
        tokens = args.calib_tokens or recommended
        if tokens < recommended:
            print(f"{PROG}: warning: --calib-tokens {tokens:,} is below the {recommended:,} recommended (8x the widest "
                  "layer's input features); whitening falls back toward plain SVD", file=sys.stderr)
        samples = args.calib_samples or -(-tokens // seq_len)
        calibration = calibration_batches(model, tokenizer, read_text(args.calib_text), samples, seq_len)
    fp16_bytes = dense_bytes(model, config)
    stored_dtype = checkpoint_dtype(resolve_model(args.model))
    saved_as_source = stored_dtype in (torch.float16, torch.bfloat16)
    if saved_as_source and config.bits is None:
        model.to(stored_dtype)  # float factors are sized (for --budget) and stored in the source dtype
    report = compress_model(model, config, calibration)
    if saved_as_source:
        model.to(stored_dtype)  # computed in fp32 on a CPU, saved as the source was; scales keep their values
    saved = save_compressed(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(report)
    # The report's "before" is in the dtype the model was compressed in (float32 on a CPU); the budget is fp16.
    factors = lowrank_bytes(model)
    print(f"factor + scale bytes {factors:,} = {factors / fp16_bytes:.1%} of the fp16 dense weights ({fp16_bytes:,})")
    print(f"saved to {saved}")


def cmd_eval(args) -> None:
    from .evaluate import evaluate

    dense, tokenizer = load(args.dense, "dense model")
    compressed, _ = load(args.compressed, "compressed model")
    metrics = evaluate(dense, compressed, tokenizer, read_text(args.text), args.samples, args.seq_len)
    for key, value in metrics.items():
        print(f"{key:<16} {value:.6g}" if isinstance(value, float) else f"{key:<16} {value}")


def cmd_generate(args) -> None:
    from .demo import greedy

    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer files; generate needs one")
    print(args.prompt + greedy(model, tokenizer, args.prompt, args.max_new_tokens))


def cmd_bench(args) -> None:
    from .generation_bench import measure_generation, weight_bytes

    if args.model is None:
        from .embedded import embedded_model_path

        args.model = str(embedded_model_path())
    dense, tokenizer = load(args.model, "dense model")
    if args.compressed is None:  # compress in memory at the demo's default: whitened int8, budget 0.5
        from .evaluate import calibration_batches, compress_copy

        config = LowRankConfig(budget=0.5, bits=8, method="whitened")
        compressed, _ = compress_copy(dense, config, calibration_batches(dense, tokenizer), progress=True)
    else:
        compressed, _ = load(args.compressed, "compressed model")
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids.to(next(dense.parameters()).device)  # [1, P]
    for name, model in (("dense", dense), ("compressed", compressed)):
        r = measure_generation(model, prompt, args.new_tokens, mode=args.mode)
        print(
            f"{name:<10} {weight_bytes(model):>12,} weight bytes  {r['tokens_per_s']:8.1f} tokens/s  "
            f"({r['new_tokens']} new tokens, {r['mode']}, {r['seconds']:.2f} s)"
        )


def cmd_autotune(args) -> None:
    import torch

    from .autotune import pretune_model

    if not torch.cuda.is_available():
        raise ValueError("autotune needs a CUDA GPU: the Triton kernels it tunes only run there")
    model, _ = load(args.compressed, "compressed model", keep_dtype=True)  # tune the dtype it will run in
    result = pretune_model(model, mode=args.mode)
    print(
        f"{result['layers']} layers, {result['unique_keys']} kernel shapes: {result['tuned']} tuned, "
        f"{result['cached']} already cached ({result['mode']} mode); cache: {result['cache_path']}"
    )


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.model, args.out, args.budget, BITS[args.bits], args.method, args.group_size, args.quick)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Quantized low-rank compression of transformer weights.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="compress a model folder or hub id and save it")
    p.add_argument("model", metavar="MODEL", help="local model folder, or a hub id when the hub is reachable")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    knobs = p.add_argument_group("rank (at most one; default --budget 0.5)")
    knobs.add_argument("--budget", type=float, help="factor bytes as a fraction of the fp16 dense bytes")
    knobs.add_argument("--rank-ratio", type=float, help="fraction of min(in, out) kept in every layer")
    knobs.add_argument("--rank", type=int, help="the same rank in every layer")
    knobs.add_argument("--energy", type=float, help="fraction of squared singular values kept per layer")
    add_format_args(p)
    p.add_argument("--calib-text", metavar="FILE", help="calibration text (default: sampled from the model)")
    p.add_argument("--calib-tokens", type=int, help="calibration tokens (default: 8x the widest layer's inputs)")
    p.add_argument("--calib-samples", type=int, help="calibration windows (default: enough for --calib-tokens)")
    p.add_argument("--seq-len", type=int, help="calibration window length (default: the model's context)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="quality of a compressed model against its dense original")
    p.add_argument("dense", metavar="DENSE")
    p.add_argument("compressed", metavar="COMPRESSED")
    p.add_argument("--text", metavar="FILE", help="evaluate perplexity on this text (default: sampled text)")
    p.add_argument("--samples", type=int, default=16, help="evaluation windows (default 16)")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's context)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation from a dense or compressed folder")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="generation tokens/sec and weight bytes, dense vs compressed")
    p.add_argument("compressed", metavar="COMPRESSED", nargs="?", help="compressed folder (default: compress now)")
    p.add_argument("--model", help="its dense original (default: the embedded model)")
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--mode", choices=("eager", "static_compiled"), default="eager")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("autotune", help="pre-tune the Triton kernels for a compressed model (CUDA)")
    p.add_argument("compressed", metavar="COMPRESSED_DIR")
    p.add_argument("--mode", choices=("fast", "max"), default="fast")
    p.set_defaults(func=cmd_autotune)

    p = sub.add_parser("demo", help="compress the embedded GPT-2 and report bytes, speed, quality, samples")
    p.add_argument("--model", help="model folder (default: the embedded GPT-2)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--budget", type=float, default=0.5, help="factor bytes / fp16 dense bytes (default 0.5)")
    add_format_args(p)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    p.set_defaults(func=cmd_demo)
    return parser


def add_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", choices=tuple(BITS), default="8", help="factor storage: 16 (float), 8 or 4 (default 8)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group width (default 128)")
    p.add_argument("--method", choices=("svd", "whitened"), default="whitened", help="default whitened")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep stderr for our own messages and progress bars
    hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        # OSError covers FileNotFoundError / FileExistsError; ImportError a missing optional part.
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
