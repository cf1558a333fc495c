"""`triton-lowrank`: compress, eval, generate, bench, autotune and demo from the command line.

Every expected failure (bad arguments, missing folders, invalid ranks, an existing output
folder, no GPU for autotune) ends as ONE line on stderr and a nonzero exit, never a traceback;
warnings (a clamped budget, a recovered save) are one line each too. Arguments that can be checked
without the model's weights (output folder, lengths against the model's context, text files) are
checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from .baselines import compress_copy, compressed_bytes, dense_bytes
from .checkpoint import check_output_folder, output_lock, recover_interrupted_save, save_compressed
from .compress import compress_model, recommended_calib_tokens, validate_layers
from .config import LowRankConfig
from .demo import greedy, run_demo
from .embedded import embedded_model_path
from .eval_data import calibration_batches, context_length
from .generation_bench import GENERATION_MODES, measure_generation, weight_bytes
from .loading import MissingTokenizer, checkpoint_dtype, load_model, load_tokenizer, max_context, runtime
from .metrics import evaluate
from .pretune import pretune_model
from .quant import DEFAULT_GROUP_SIZE

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
    if hub_constants.HF_HUB_OFFLINE:
        return True  # from_pretrained then reads the local cache only, without network
    try:
        socket.create_connection((urlparse(hub_constants.ENDPOINT).hostname, 443), timeout).close()
    except OSError:
        return False
    return True


def load(source: str, what: str = "model", keep_dtype: bool = False):
    """(model, tokenizer or None) from a resolved `source`, on this machine's default device, in its runtime
    dtype or, with keep_dtype, the checkpoint's; hub failures become one error line. A folder without a
    tokenizer gives None; a tokenizer that does not fit the model is an error naming the folder."""
    device, dtype = runtime(source)
    dtype = None if keep_dtype else dtype
    try:
        model = load_model(source, device, dtype)
    except OSError as exc:
        if Path(source).is_dir():
            raise
        raise FileNotFoundError(f"{what} {source!r}: no such local folder, and the hub lookup failed ({exc})") from None
    try:
        tokenizer = load_tokenizer(source, model)
    except MissingTokenizer:
        tokenizer = None  # a folder saved without a tokenizer still compresses and evaluates on sampled text
    return model, tokenizer


def read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def context_of(source: str) -> int | None:
    """The model's context length from its config alone (no weights loaded); None if it does not say."""
    try:
        return max_context(AutoConfig.from_pretrained(source))
    except (OSError, ValueError):
        return None  # loading the model reports what is wrong with the folder


def check_seq_len(seq_len: int | None, *sources: str) -> None:
    for source in sources:
        context = context_of(source)
        if seq_len is not None and context is not None and seq_len > context:
            raise ValueError(f"--seq-len {seq_len} is longer than the context of {source} ({context} tokens)")


def prompt_ids(model, tokenizer, prompt: str, new_tokens: int, source: str):
    """The prompt's ids [1, P], refused when empty or when it and the new tokens do not fit the context."""
    if tokenizer is None:
        load_tokenizer(source, model)  # raises, saying why the folder has no tokenizer
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # [1, P]
    if ids.shape[1] == 0:
        raise ValueError("--prompt encodes to no tokens")
    context = max_context(model.config)
    if context is not None and ids.shape[1] > context:
        raise ValueError(f"the prompt is {ids.shape[1]} tokens, longer than the context of {source} ({context})")
    if context is not None and ids.shape[1] + new_tokens > context:
        raise ValueError(
            f"the prompt ({ids.shape[1]} tokens) and {new_tokens} new tokens do not fit the context of {source} "
            f"({context} tokens); ask for at most {context - ids.shape[1]} new tokens"
        )
    return ids


def rank_config(args) -> LowRankConfig:
    knobs = {k: getattr(args, k) for k in ("rank", "rank_ratio", "energy", "budget") if getattr(args, k) is not None}
    base = {k: getattr(args, k) for k in ("base_bits", "base_group_size", "base_method") if hasattr(args, k)}
    if base.get("base_bits") is not None and not knobs:
        # No default budget here: what a hybrid budget must hold depends on the base (--base-bits, its groups).
        raise ValueError("--base-bits needs the correction's rank: --rank, --rank-ratio or --budget")
    return LowRankConfig(
        **(knobs or {"budget": 0.5}), bits=BITS[args.bits], group_size=args.group_size, method=args.method, **base
    )


# ----------------------------------------------------------------------------- commands


def cmd_compress(args) -> None:
    source = resolve_model(args.model)
    out = Path(args.out)
    local = Path(source) if Path(source).is_dir() else None
    # Everything that needs no weights is checked first: a mistake costs seconds, not a compression.
    check_output_folder(out, args.overwrite, local, option="--overwrite")
    config = rank_config(args)
    check_seq_len(args.seq_len, source)
    calib_text = read_text(args.calib_text)
    with output_lock(out):  # a second run to the same OUT fails here, not after its compression
        recover_interrupted_save(out)
        check_output_folder(out, args.overwrite, local, option="--overwrite")
        compress_and_save(args, source, config, calib_text, out)


def compress_and_save(args, source: str, config: LowRankConfig, calib_text: str | None, out: Path) -> None:
    model, tokenizer = load(source)
    layers = validate_layers(model, config)  # bad ranks/bits/weights fail before calibration sampling
    calibration = None
    if config.method == "whitened" or (config.base_bits is not None and config.base_method == "gptq"):
        recommended = recommended_calib_tokens(layers)
        seq_len = args.seq_len or context_length(model)
        tokens = args.calib_tokens or recommended
        if tokens < recommended:
            print(f"{PROG}: warning: --calib-tokens {tokens:,} is below the {recommended:,} recommended (8x the widest "
                  "layer's input features); whitening falls back toward plain SVD", file=sys.stderr)
        samples = args.calib_samples or -(-tokens // seq_len)
        calibration = calibration_batches(model, tokenizer, calib_text, samples, seq_len)
    fp16_bytes = dense_bytes(model, config)
    stored_dtype = checkpoint_dtype(source)
    saved_as_source = stored_dtype in (torch.float16, torch.bfloat16)
    if saved_as_source and config.bits is None:
        model.to(stored_dtype)  # float factors are sized (for --budget) and stored in the source dtype
    report = compress_model(model, config, calibration)
    if saved_as_source:
        model.to(stored_dtype)  # computed in fp32 on a CPU, saved as the source was; scales keep their values
    saved = save_compressed(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(report)
    # The report's "before" is in the dtype the model was compressed in (float32 on a CPU); the budget is fp16.
    factors = compressed_bytes(model)
    print(f"factor + scale bytes {factors:,} = {factors / fp16_bytes:.1%} of the fp16 dense weights ({fp16_bytes:,})")
    print(f"saved to {saved}")


def cmd_eval(args) -> None:
    dense_source, compressed_source = resolve_model(args.dense), resolve_model(args.compressed)
    check_seq_len(args.seq_len, dense_source, compressed_source)
    text = read_text(args.text)
    dense, tokenizer = load(dense_source, "dense model")
    compressed, _ = load(compressed_source, "compressed model")
    sizes = [m.config.vocab_size for m in (dense, compressed)]
    if sizes[0] != sizes[1]:
        raise ValueError(
            f"{args.dense} has a vocabulary of {sizes[0]} tokens, {args.compressed} of {sizes[1]}: "
            "eval compares a compressed model with its own dense original"
        )
    metrics = evaluate(dense, compressed, tokenizer, text, args.samples, args.seq_len)
    for key, value in metrics.items():
        print(f"{key:<16} {value:.6g}" if isinstance(value, float) else f"{key:<16} {value}")


def cmd_generate(args) -> None:
    if not args.prompt:
        raise ValueError("--prompt is empty; give the text to continue")
    source = resolve_model(args.model)
    model, tokenizer = load(source)
    prompt_ids(model, tokenizer, args.prompt, args.max_new_tokens, source)
    print(args.prompt + greedy(model, tokenizer, args.prompt, args.max_new_tokens))


def cmd_bench(args) -> None:
    if not args.prompt:
        raise ValueError("--prompt is empty; give the text to continue")
    if args.model is None:
        args.model = str(embedded_model_path())
    source = resolve_model(args.model)
    dense, tokenizer = load(source, "dense model")
    prompt = prompt_ids(dense, tokenizer, args.prompt, args.new_tokens, source)  # [1, P]
    if args.compressed is None:  # compress in memory at the demo's default: whitened int8, budget 0.5
        config = LowRankConfig(budget=0.5, bits=8, method="whitened")
        compressed, _ = compress_copy(dense, config, calibration_batches(dense, tokenizer), progress=True)
    else:
        compressed, _ = load(resolve_model(args.compressed), "compressed model")
    prompt = prompt.to(next(dense.parameters()).device)
    for name, model in (("dense", dense), ("compressed", compressed)):
        r = measure_generation(model, prompt, args.new_tokens, mode=args.mode)
        print(
            f"{name:<10} {weight_bytes(model):>12,} weight bytes  {r['tokens_per_s']:8.1f} tokens/s  "
            f"({r['new_tokens']} new tokens, {r['mode']}, {r['seconds']:.2f} s)"
        )


def cmd_autotune(args) -> None:
    if not torch.cuda.is_available():
        raise ValueError("autotune needs a CUDA GPU: the Triton kernels it tunes only run there")
    model, _ = load(resolve_model(args.compressed), "compressed model", keep_dtype=True)  # tune its run dtype
    result = pretune_model(model, mode=args.mode)
    print(
        f"{result['layers']} layers, {result['unique_keys']} kernel shapes: {result['tuned']} tuned, "
        f"{result['cached']} already cached ({result['mode']} mode); cache: {result['cache_path']}"
    )


def cmd_demo(args) -> None:
    run_demo(args.model, args.out, args.budget, BITS[args.bits], args.method, args.group_size or DEFAULT_GROUP_SIZE,
             args.quick)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Quantized low-rank compression of transformer weights.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="compress a model folder or hub id and save it")
    p.add_argument("model", metavar="MODEL", help="local model folder, or a hub id when the hub is reachable")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    knobs = p.add_argument_group("rank (at most one; default --budget 0.5)")
    knobs.add_argument("--budget", type=float,
                       help="factor bytes (with --base-bits: base + correction) as a fraction of the fp16 dense bytes")
    knobs.add_argument("--rank-ratio", type=float, help="fraction of min(in, out) kept in every layer")
    knobs.add_argument("--rank", type=at_least(1), help="the same rank in every layer")
    knobs.add_argument("--energy", type=float, help="fraction of squared singular values kept per layer")
    add_format_args(p)
    hybrid = p.add_argument_group("hybrid format W = Q + U·D (a quantized base plus the low-rank correction above)")
    hybrid.add_argument("--base-bits", type=int, choices=(4, 3, 2),
                        help="store a base at 4, 3 or 2 bits (then --rank, --rank-ratio or --budget is needed)")
    hybrid.add_argument("--base-group-size", type=at_least(1),
                        help="base group width (default: per layer the largest <= 128 dividing its input width)")
    hybrid.add_argument("--base-method", choices=("gptq", "rtn"), default="gptq", help="base fit (default gptq)")
    p.add_argument("--calib-text", metavar="FILE", help="calibration text (default: sampled from the model)")
    p.add_argument("--calib-tokens", type=at_least(1), help="calibration tokens (default: 8x the widest inputs)")
    p.add_argument("--calib-samples", type=at_least(1), help="calibration windows (default: enough for the tokens)")
    p.add_argument("--seq-len", type=at_least(2), help="calibration window length (default: the model's context)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="quality of a compressed model against its dense original")
    p.add_argument("dense", metavar="DENSE")
    p.add_argument("compressed", metavar="COMPRESSED")
    p.add_argument("--text", metavar="FILE", help="evaluate perplexity on this text (default: sampled text)")
    p.add_argument("--samples", type=at_least(1), default=16, help="evaluation windows (default 16)")
    p.add_argument("--seq-len", type=at_least(2), help="window length (default: the model's context)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation from a dense or compressed folder")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=at_least(1), default=50)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="generation tokens/sec and weight bytes, dense vs compressed")
    p.add_argument("compressed", metavar="COMPRESSED", nargs="?", help="compressed folder (default: compress now)")
    p.add_argument("--model", help="its dense original (default: the embedded model)")
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--new-tokens", type=at_least(1), default=64)
    p.add_argument("--mode", choices=GENERATION_MODES, default="eager")
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


def at_least(minimum: int):
    """argparse type: an integer >= minimum, refused in argparse's one line otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", choices=tuple(BITS), default="8", help="factor storage: 16 (float), 8 or 4 (default 8)")
    p.add_argument("--group-size", type=at_least(1),
                   help="int4 group width (default: per layer the largest <= 128 dividing its widths)")
    p.add_argument("--method", choices=("svd", "whitened"), default="whitened", help="default whitened")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hf_logging.set_verbosity_error()  # keep stderr for our own messages and progress bars
    hf_logging.disable_progress_bar()
    try:
        with one_line_warnings():
            args.func(args)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        # OSError covers FileNotFoundError / FileExistsError; ImportError a missing optional part.
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Each warning as one `triton-lowrank: warning:` line, not Python's two-line source listing."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
