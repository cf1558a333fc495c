"""`triton-lowrank`: the command line's entry point and argument parser, standard library only.

`--help` and argument errors answer at once: importing the package (torch, transformers, the kernels)
takes 5-60 s, so it is imported only after the arguments parse, and the commands run in
`triton_lowrank.tools.cli`. This module lives outside the package because importing anything inside it runs
the package's `__init__`, which imports all of that (and must: `import triton_lowrank` registers the
transformers quantizer).

Every expected failure (bad arguments, missing folders, invalid ranks, an existing output folder, no GPU
for autotune) ends as ONE line on stderr and a nonzero exit, never a traceback; warnings (a clamped
budget, a recovered save) are one line each too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

PROG = "triton-lowrank"
BITS = {"16": None, "8": 8, "4": 4}  # --bits: factor storage (16 = float factors in the model's dtype)
GENERATION_MODES = ("eager", "static_compiled")  # generation_bench.GENERATION_MODES (a test holds them equal)
DEFAULT_BUDGET = 0.5


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; the CLI promises a single line."""

    def error(self, message: str):
        print(f"{PROG}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help: argparse's "(default: X)", unless the help already says it
    (a default computed at run time, such as "the model's context") or there is none (a flag, a required value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.required:
            return text
        return super()._get_help_string(action)


# Upper bounds of the counts a user gives, answered before any import (the same numbers as core/safe_io.py's, which
# the library checks; tests/test_cli.py holds them equal).
MAX_TOKENS = 10_000_000
MAX_SAMPLES = 100_000
MAX_NEW_TOKENS = 1_000_000


def at_least(minimum: int, maximum: int | None = None):
    """argparse type: an integer >= minimum, refused in argparse's one line otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value:,} is above the limit of {maximum:,}")
        return value

    return parse


def positive(text: str) -> float:
    """argparse type: a finite number > 0 (LowRankConfig checks the same; this answers before any import)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1], the fraction kept."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"is the fraction kept, in (0, 1]; got {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def add_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", choices=tuple(BITS), default="8",
                   help="factor storage: 16 (float factors in the model's dtype), int8 or int4")
    p.add_argument("--group-size", type=at_least(1), metavar="G",
                   help="int4 group width (with --bits 4; default: per layer the largest <= 128 dividing its widths)")
    p.add_argument("--method", choices=("svd", "whitened"), default="whitened",
                   help="plain truncated SVD, or SVD whitened by calibration activations (SVD-LLM)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Quantized low-rank compression of transformer weights.",
                           formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)

    p = command("compress", "compress a model folder or hub id and save it")
    p.add_argument("model", metavar="MODEL", help="local model folder, or a hub id when the hub is reachable")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    knobs = p.add_argument_group(f"rank (at most one; default: --budget {DEFAULT_BUDGET})")
    knobs = knobs.add_mutually_exclusive_group()
    knobs.add_argument("--budget", type=positive, metavar="B",
                       help="factor + scale bytes (with --base-bits: base + correction bytes) as a fraction of the "
                            "fp16 dense bytes, allocated across layers "
                            f"(default: {DEFAULT_BUDGET} without --base-bits)")
    knobs.add_argument("--rank-ratio", type=fraction, metavar="F",
                       help="fraction of min(in, out) kept in every layer (default: unset)")
    knobs.add_argument("--rank", type=at_least(1), metavar="R", help="the same rank in every layer (default: unset)")
    knobs.add_argument("--energy", type=fraction, metavar="E",
                       help="fraction of squared singular values kept in each layer (default: unset)")
    add_format_args(p)
    hybrid = p.add_argument_group("hybrid format W = Q + U·D (a quantized base plus the low-rank correction above)")
    hybrid.add_argument("--base-bits", type=int, choices=(4, 3, 2),
                        help="store a base at 4, 3 or 2 bits (then --rank, --rank-ratio or --budget is needed; "
                             "default: no base, the pure low-rank format)")
    hybrid.add_argument("--base-group-size", type=at_least(1), metavar="G",
                        help="base group width (default: per layer the largest <= 128 dividing its input width)")
    hybrid.add_argument("--base-method", choices=("gptq", "rtn"), default="gptq",
                        help="base fit: GPTQ on the calibration Hessian, or round to nearest")
    calib = p.add_argument_group("calibration (for --method whitened and GPTQ bases)")
    calib.add_argument("--calib-text", metavar="FILE", help="calibration text (default: text sampled from the model)")
    calib.add_argument("--calib-tokens", type=at_least(1, MAX_TOKENS), metavar="N",
                       help="calibration tokens (default: the recommended 8x the widest layer's input features)")
    calib.add_argument("--calib-samples", type=at_least(1, MAX_SAMPLES), metavar="N",
                       help="calibration windows (default: as many as the tokens need)")
    calib.add_argument("--seq-len", type=at_least(2), metavar="T",
                       help="calibration window length (default: the model's context, at most 2048)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT that holds a checkpoint")

    p = command("eval", "quality of a compressed model against its dense original",
                "Perplexity, KL(dense || compressed), top-1 agreement, logits cosine and MSE on the same windows.")
    p.add_argument("dense", metavar="DENSE", help="the dense original (folder or hub id)")
    p.add_argument("compressed", metavar="COMPRESSED", help="the compressed folder")
    p.add_argument("--text", metavar="FILE", help="evaluate on windows of this text (default: text sampled from DENSE)")
    p.add_argument("--samples", type=at_least(1, MAX_SAMPLES), default=16, metavar="N", help="evaluation windows")
    p.add_argument("--seq-len", type=at_least(2), metavar="T",
                   help="window length (default: the model's context, at most 2048)")

    p = command("generate", "greedy generation from a dense or compressed folder")
    p.add_argument("model", metavar="MODEL", help="model folder (dense or compressed) or hub id")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue (required)")
    p.add_argument("--max-new-tokens", type=at_least(1, MAX_NEW_TOKENS), default=50, metavar="N",
                   help="tokens to generate")

    p = command("bench", "generation tokens/sec and weight bytes, dense vs compressed")
    p.add_argument("compressed", metavar="COMPRESSED", nargs="?",
                   help=f"compressed folder (default: compress --model now, whitened int8 at budget {DEFAULT_BUDGET})")
    p.add_argument("--model", metavar="MODEL", help="its dense original (default: the embedded GPT-2)")
    p.add_argument("--prompt", default="ROMEO:", metavar="TEXT", help="prompt to continue")
    p.add_argument("--new-tokens", type=at_least(1, MAX_NEW_TOKENS), default=64, metavar="N",
                   help="tokens generated per timed run")
    p.add_argument("--mode", choices=GENERATION_MODES, default="eager",
                   help="eager, or a static cache that transformers compiles (CUDA)")

    p = command("autotune", "pre-tune the Triton kernels for a compressed model (CUDA)")
    p.add_argument("compressed", metavar="COMPRESSED_DIR", help="compressed folder")
    p.add_argument("--mode", choices=("fast", "max"), default="fast",
                   help="fast: a small candidate set of tile configs; max: a wide search")

    p = command("demo", "compress the embedded GPT-2 and report bytes, speed, quality, samples")
    p.add_argument("--model", metavar="PATH", help="model folder (default: the embedded GPT-2)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder")
    p.add_argument("--budget", type=positive, default=DEFAULT_BUDGET, metavar="B",
                   help="factor + scale bytes as a fraction of the fp16 dense bytes")
    add_format_args(p)
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="skip the comparison with the other formats and baselines (default: compare)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "bits"):
        args.bits = BITS[args.bits]  # the commands take the factor width: 8, 4 or None (float factors)
    # Idle OpenMP threads sleep instead of spinning: on a busy machine (other jobs on the same cores) spinning
    # threads starve the working ones and a decode step of the embedded GPT-2 took 0.5 s instead of 10 ms.
    # Read once, when torch starts its thread pool; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        with one_line_warnings():
            # The package (torch, transformers) only now: a mistake in the arguments never waits for it.
            from triton_lowrank.tools import cli as commands

            commands.run(args)
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
    """Each warning as one `triton-lowrank: warning:` line (the same warning once), not Python's two-line listing."""
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{PROG}: warning: {' '.join(str(message).split())}"
        if text not in shown:
            shown.add(text)
            print(text, file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
