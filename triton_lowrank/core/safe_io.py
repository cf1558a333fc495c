"""Bounded reads: regular files under a size limit, JSON with depth and size limits, counts with upper bounds.

Every input the package reads from a user (text files, config.json, safetensors headers, indexes, marker
files) goes through here, so a FIFO, a device (/dev/zero), a directory, a huge file or a deeply nested JSON
is refused with one line naming the file and the limit, never read until memory runs out, never a hang,
never a RecursionError. The limits are module constants, documented in the README ("Errors").
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

MAX_TEXT_BYTES = 256 * 2**20  # --calib-text, --text
MAX_JSON_BYTES = 16 * 2**20  # config.json, generation_config.json, model.safetensors.index.json, markers
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header (safetensors' own limit)
MAX_JSON_DEPTH = 64  # nesting of any JSON we parse (a config.json is 3-4 deep)
# Upper bounds of the counts a user gives (checked before any work, with the limit named in the error).
MAX_TOKENS = 10_000_000  # --calib-tokens (the recommended 8x widest input: ~230k for a 70B model)
MAX_SAMPLES = 100_000  # --calib-samples, eval --samples
MAX_NEW_TOKENS = 1_000_000  # --max-new-tokens, bench --new-tokens


_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


class UnsafeInput(ValueError):
    """An input that is not a regular file, too large, or JSON too deep; the message names the file and the limit."""


def open_regular(path: str | os.PathLike, what: str = "file"):
    """Open `path` for binary reading if it is a regular file (symlinks followed); never blocks on a FIFO.

    FileNotFoundError when it does not exist; UnsafeInput for a directory, FIFO, socket or device."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UnsafeInput(f"{what} {path} is a directory, not a regular file") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
                stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
        name = next((text for test, text in kind.items() if test(mode)), "not a regular file")
        raise UnsafeInput(f"{what} {path} is {name}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (the read stops at limit + 1 whatever stat says)."""
    with open_regular(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeInput(f"{what} {path} is larger than the {limit:,}-byte limit")
    return data


def read_text_file(path: str | os.PathLike, what: str = "text file", limit: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 text file for the CLI (--calib-text, --text): a regular file, at most `limit` bytes, not blank."""
    data = read_bytes(path, limit, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def json_depth_problem(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why `text` nests deeper than max_depth (None if it does not), without recursion: brackets inside
    strings do not count."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    brackets = _BRACKETS.findall(_STRINGS.sub("", text))  # C-speed; only the brackets are walked in Python
    depth = 0
    for char in brackets:
        depth += 1 if char in "[{" else -1
        if depth > max_depth:
            return f"JSON nested deeper than {max_depth} levels"
    return None


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str | bytes, where: str, max_depth: int = MAX_JSON_DEPTH):
    """JSON with duplicate keys, NaN/Infinity and nesting past max_depth refused: UnsafeInput naming `where`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")  # strictly: a byte-order mark or bad UTF-8 is not JSON here
        except UnicodeDecodeError as error:
            raise UnsafeInput(f"{where}: not UTF-8 ({error.reason} at byte {error.start})") from None
    problem = json_depth_problem(text, max_depth)
    if problem is None:
        try:
            return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
        except RecursionError:
            problem = f"JSON nested deeper than {max_depth} levels"
        except (ValueError, UnicodeDecodeError) as error:
            problem = f"not valid JSON ({' '.join(str(error).split())[:200]})"
    raise UnsafeInput(f"{where}: {problem}")


def read_json(path: str | os.PathLike, what: str = "JSON file", limit: int = MAX_JSON_BYTES):
    """A regular JSON file of at most `limit` bytes, parsed with parse_json's limits."""
    return parse_json(read_bytes(path, limit, what), str(path))


def check_count(name: str, value: int, maximum: int, minimum: int = 1) -> int:
    """`value` if it is an integer in [minimum, maximum], else ValueError naming the count and the limit."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} {value:,} is above the limit of {maximum:,}")
    return value
