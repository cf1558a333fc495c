"""The commands behind `triton-lowrank` (compress, eval, generate, bench, autotune, demo).

The entry point and argument parser are `triton_lowrank_cli` (outside the package, standard library only,
so that `--help` and argument errors never wait for torch); it imports this module once the arguments parse
and calls `run(args)`. Expected failures raise ValueError / OSError / ImportError, which the entry point
prints as ONE line on stderr with a nonzero exit. Arguments that can be checked without the model's weights
(output folder, lengths against the model's context, text files) are checked before any model is loaded.
"""

from __future__ import annotations

import re
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from triton_lowrank.checkpoint.save_load import (
    check_output_folder,
    output_folder,
    output_lock,
    recover_interrupted_save,
    save_compressed,
)
from triton_lowrank.compression.compress import compress_model, recommended_calib_tokens, validate_layers
from triton_lowrank.compression.pretune import pretune_model
from triton_lowrank.core.config import LowRankConfig
from triton_lowrank.core.quant import DEFAULT_GROUP_SIZE
from triton_lowrank.core.safe_io import read_text_file
from triton_lowrank.embedded import embedded_model_path
from triton_lowrank.tools.baselines import compress_copy, compressed_bytes, dense_bytes
from triton_lowrank.tools.demo import describe_bytes, dtype_bytes, dtype_name, greedy, run_demo
from triton_lowrank.tools.eval_data import calibration_batches, context_length
from triton_lowrank.tools.generation_bench import decode_threads, measure_generation
from triton_lowrank.tools.loading import (
    MissingTokenizer,
    checkpoint_dtype,
    load_model,
    load_tokenizer,
    max_context,
    runtime,
)
from triton_lowrank.tools.metrics import evaluate

# "gpt2" or "org/name": what a hub id looks like; anything else missing locally is a missing folder.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


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
    return None if path is None else read_text_file(path)  # a regular UTF-8 file under safe_io.MAX_TEXT_BYTES


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
    rest = {"bits": args.bits, "group_size": args.group_size, "method": args.method, **base}
    if not knobs:  # the format's own default rank knob; a format without one (the hybrid) needs it given
        fmt = LowRankConfig(rank=1, **rest).weight_format
        if fmt.default_rank is None:
            raise ValueError(f"{fmt.rank_needed}: --rank, --rank-ratio or --budget")
        knobs = fmt.default_rank
    return LowRankConfig(**knobs, **rest)


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
    validate_layers(model, config)  # bad ranks/bits/weights fail before calibration sampling
    calibration = None
    if config.needs_calibration:
        seq_len = args.seq_len or context_length(model)
        samples = args.calib_samples or calibration_windows(model, config, args.calib_tokens, seq_len)
        calibration = calibration_batches(model, tokenizer, calib_text, samples, seq_len)
    fp16_bytes = dense_bytes(model, config)
    stored_dtype = checkpoint_dtype(source)
    saved_as_source = stored_dtype in (torch.float16, torch.bfloat16)
    if saved_as_source and config.bits is None:
        model.to(stored_dtype)  # float factors are sized (for --budget) and stored in the source dtype
    compute_dtype = next(model.parameters()).dtype
    report = compress_model(model, config, calibration)
    if saved_as_source:
        model.to(stored_dtype)  # computed in fp32 on a CPU, saved as the source was; scales keep their values
    saved = save_compressed(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(report)
    print(f"(the table's bytes before are the dense layers in {dtype_name(compute_dtype)}, the dtype they were "
          "compressed in; the budget counts float16)")
    stored = compressed_bytes(model)
    print(f"compressed layers ({config.weight_format.name} format): {stored:,} bytes, "
          f"{describe_bytes(dtype_bytes(model, layers_only=True))}, = {stored / fp16_bytes:.1%} of their float16 "
          f"dense weights ({fp16_bytes:,} bytes)")
    print(f"saved to {saved}")


def calibration_windows(model, config: LowRankConfig, tokens: int | None = None, seq_len: int | None = None) -> int:
    """Windows of seq_len (default: the context) that hold `tokens` (default: the recommended tokens for the
    layers `config` selects); fewer than recommended is warned about before the (slow) sampling."""
    recommended = recommended_calib_tokens(validate_layers(model, config))
    if tokens is not None and tokens < recommended:
        warnings.warn(f"--calib-tokens {tokens:,} is below the {recommended:,} recommended (8x the widest "
                      "layer's input features); whitening falls back toward plain SVD", stacklevel=1)
    return -(-(tokens or recommended) // (seq_len or context_length(model)))


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
        calibration = calibration_batches(dense, tokenizer, None, calibration_windows(dense, config, seq_len=128), 128)
        compressed, _ = compress_copy(dense, config, calibration, progress=True)
    else:
        compressed, _ = load(resolve_model(args.compressed), "compressed model")
    prompt = prompt.to(next(dense.parameters()).device)
    threads = decode_threads(dense, prompt)  # on the CPU: 1 or all threads, as the dense model is fastest
    for name, model in (("dense", dense), ("compressed", compressed)):
        r = measure_generation(model, prompt, args.new_tokens, mode=args.mode, threads=threads)
        print(
            f"{name:<10} {r['tokens_per_s']:8.1f} tokens/s ({r['new_tokens']} new tokens, {r['mode']}, timed in "
            f"{r['dtype']}{'' if r['threads'] is None else ' on ' + str(r['threads']) + ' thread(s)'}, "
            f"{r['seconds']:.2f} s)  weights as loaded on {prompt.device}: {describe_bytes(dtype_bytes(model))}"
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
    group_size = args.group_size or DEFAULT_GROUP_SIZE  # the demo's sweep names its baselines' groups explicitly
    # compress's OUT rules: a new or empty folder, or one the demo wrote (its manifest proves it) with nothing of
    # the user's added; re-running into the demo's own folder replaces it, a user's file in it is refused by name.
    with output_folder(args.out, overwrite=True, option="--out") as out:
        run_demo(args.model, out, args.budget, args.bits, args.method, group_size, args.quick, sweep=args.sweep)


COMMANDS = {
    "compress": cmd_compress,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "autotune": cmd_autotune,
    "demo": cmd_demo,
}


def run(args) -> None:
    """Run the parsed command (triton_lowrank_cli.build_parser); expected failures raise ValueError, OSError, ..."""
    hf_logging.set_verbosity_error()  # keep stderr for our own messages and progress bars
    hf_logging.disable_progress_bar()
    COMMANDS[args.command](args)
