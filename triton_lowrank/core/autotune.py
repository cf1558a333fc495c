"""Autotuner for the low-rank kernels, with a persistent JSON cache of the winners.

Key: (rank, N, K, bits, group_size, activation dtype, M bucket) inside a section named by the
GPU and the Triton version, so entries never leak across hardware or compiler versions.

Selection: a winner in the user's cache, else a winner committed beside the kernels for this GPU
(kernels/tuned/<gpu-slug>.json), else tune (in the tuner's mode), else the heuristic.

Modes: "default" (the heuristic, no benchmarking: CI and the interpreter always use it),
"fast" (a small candidate set), "max" (a wide search). The mode comes from, in order: an
explicit argument (`tune(..., mode=)`, `pretune_model(mode=)`), the tuner's `mode`, and the
environment variable TRITON_LOWRANK_AUTOTUNE (for scripts). At run time the custom op asks the
process tuner `get_tuner()` for a config: a cached winner if there is one, else it tunes in the
tuner's mode, except while a CUDA graph is being captured (never benchmark then: a cached or committed
winner if there is one, else the heuristic).

Cache file: $TRITON_LOWRANK_CACHE_DIR/autotune.json (default ~/.cache/triton_lowrank/), merged and
written under an flock on autotune.json.lock (concurrent tuners lose no entry) and replaced atomically
(temp file + os.replace); a corrupt file is ignored with a warning and re-tuned. A cache that cannot be
read or written warns once and keeps the winners in memory: the forward pass never fails because of it.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from triton_lowrank.core.format import format_for_problem
from triton_lowrank.core.ops import use_config_selector
from triton_lowrank.kernels.configs import (
    DEFAULT_NUM_SMS,
    DEFAULT_SMEM_BYTES,
    FUSED_MAX_M,
    Problem,
    TileConfig,
    m_bucket,
    tuned_winners,
)

TUNE_MODES = ("default", "fast", "max")
ENV_MODE = "TRITON_LOWRANK_AUTOTUNE"
ENV_CACHE_DIR = "TRITON_LOWRANK_CACHE_DIR"
CACHE_VERSION = 2  # 2: the decode path of issue 9 replaced the fused one; older entries are re-tuned
_DTYPE_NAMES = {2: "float16", 4: "float32"}  # when a caller gives no dtype

Timer = Callable[[Problem, TileConfig], float]  # -> milliseconds


def default_config(p: Problem, num_sms: int = DEFAULT_NUM_SMS, interpret: bool = False,
                   fused_max_m: int = FUSED_MAX_M) -> TileConfig:
    """The no-benchmark heuristic (CI, the interpreter, any untuned shape): the problem's format's own."""
    return format_for_problem(p).default_config(p, num_sms, interpret, fused_max_m)


def candidate_configs(p: Problem, mode: str, num_sms: int = DEFAULT_NUM_SMS, smem_limit: int = DEFAULT_SMEM_BYTES,
                      fused_max_m: int = FUSED_MAX_M) -> list[TileConfig]:
    """Deterministically ordered, deduplicated candidates for `mode` ("default", "fast", "max"), the heuristic
    first (ties resolve to it): the problem's format's own."""
    return format_for_problem(p).candidates(p, mode, num_sms, smem_limit, fused_max_m)


def resolve_mode(mode: str | None = None) -> str:
    mode = mode or os.environ.get(ENV_MODE) or "default"
    if mode not in TUNE_MODES:
        raise ValueError(f"autotune mode must be one of {TUNE_MODES}, got {mode!r}")
    return mode


def default_cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    try:
        return Path.home() / ".cache" / "triton_lowrank"
    except RuntimeError:  # no HOME and no passwd entry (some containers): a cache that lives with the process
        return Path(tempfile.gettempdir()) / f"triton_lowrank-{os.getuid()}"


def problem_key(p: Problem, dtype: torch.dtype | str) -> str:
    """Cache key within a (GPU, Triton) section; group size only matters for int4. The format's part comes first
    (a hybrid problem's: its base's bits and group size; the default format's: nothing)."""
    group = p.group_size if p.bits == 4 else 0
    bits = "fp" if p.bits is None else f"int{p.bits}"
    dtype = str(dtype).replace("torch.", "")
    return f"{format_for_problem(p).problem_key(p)}r{p.rank}-n{p.n}-k{p.k}-{bits}-g{group}-{dtype}-m{m_bucket(p.m)}"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # CPU-only installs without Triton still get a usable tuner object
        return "none"


class Autotuner:
    """Chooses a TileConfig per problem; caches winners in memory and on disk.

    `timer(problem, config) -> ms` replaces the GPU benchmark (tests inject one).
    """

    def __init__(
        self,
        mode: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        gpu_name: str | None = None,
        triton_version: str | None = None,
        timer: Timer | None = None,
        num_sms: int | None = None,
        smem_bytes: int | None = None,
        progress: bool = True,
    ) -> None:
        self.mode = resolve_mode(mode)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.gpu_name = gpu_name or (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
        self.triton_version = triton_version or _triton_version()
        self.timer = timer
        self.progress = progress
        props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() and gpu_name is None else None
        self.num_sms = num_sms or (props.multi_processor_count if props else DEFAULT_NUM_SMS)
        self.smem_bytes = smem_bytes or getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_SMEM_BYTES
        self._cache_failed = False  # warned once already; the winners stay in memory from then on
        self.entries: dict[str, dict] = self._read_file()["sections"].get(self.section, {})
        self.shipped: dict[str, TileConfig] = tuned_winners(self.gpu_name)  # kernels/tuned/<gpu>.json

    # ---- cache file -------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        return self.cache_dir / "autotune.json"

    @property
    def section(self) -> str:
        return f"{self.gpu_name}|triton-{self.triton_version}"

    def _read_file(self) -> dict:
        empty = {"version": CACHE_VERSION, "sections": {}}
        try:
            text = self.cache_path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return empty  # nothing cached yet (or nowhere to cache: save() says so)
        except OSError as err:
            self._cache_unusable("read", err)
            return empty
        try:
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("version"), int) and data["version"] < CACHE_VERSION:
                return empty  # written for older kernels: re-tune quietly
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
                raise ValueError("unknown layout or version")
            if not isinstance(data.get("sections"), dict):
                raise ValueError("missing 'sections'")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            warnings.warn(f"triton_lowrank: ignoring corrupt autotune cache {self.cache_path} ({err}); "
                          "shapes will be re-tuned", RuntimeWarning, stacklevel=3)
            return empty
        # One unreadable entry (say, written by a newer version) costs that entry, not the other GPUs' sections.
        dropped = 0
        for section, entries in list(data["sections"].items()):
            if not isinstance(entries, dict):
                data["sections"][section], dropped = {}, dropped + 1
                continue
            for key in list(entries):
                try:
                    TileConfig.from_dict(entries[key]["config"])
                except (ValueError, TypeError, KeyError, AttributeError):
                    del entries[key]
                    dropped += 1
        if dropped:
            warnings.warn(f"triton_lowrank: dropped {dropped} unreadable entries of {self.cache_path}; "
                          "those shapes will be re-tuned", RuntimeWarning, stacklevel=3)
        return data

    def save(self) -> None:
        """Merge this tuner's section into the file and replace it atomically, under the cache's file lock.

        Never raises for the file: a cache that cannot be written warns once and the winners stay in memory."""
        if self._cache_failed:
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with open(self.cache_dir / "autotune.json.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # read-merge-write as one step: concurrent tuners lose nothing
                data = self._read_file()
                if self._cache_failed:
                    return  # unreadable: writing now would drop the other tuners' entries
                data["sections"].setdefault(self.section, {}).update(self.entries)
                fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".autotune-", suffix=".json.tmp")
                try:
                    with os.fdopen(fd, "w") as fh:
                        json.dump(data, fh, indent=1, sort_keys=True)
                    os.replace(tmp, self.cache_path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        except OSError as err:
            self._cache_unusable("write", err)

    def _cache_unusable(self, action: str, err: OSError) -> None:
        if not self._cache_failed:
            warnings.warn(f"triton_lowrank: cannot {action} the autotune cache {self.cache_path} ({err}); "
                          "tuned configs stay in memory for this process", RuntimeWarning, stacklevel=4)
        self._cache_failed = True

    # ---- selection --------------------------------------------------------------------
    def lookup(self, p: Problem, dtype: torch.dtype | str) -> TileConfig | None:
        """The user's cached winner, else the winner committed for this GPU, else None."""
        key = problem_key(p, dtype)
        entry = self.entries.get(key)
        return TileConfig.from_dict(entry["config"]) if entry else self.shipped.get(key)

    def config_for(self, p: Problem, dtype: torch.dtype | str | None = None) -> TileConfig:
        """The config the launcher uses: a cached or committed winner, else tune (in this tuner's mode; never while
        a CUDA graph is being captured), else the heuristic."""
        dtype = dtype or _DTYPE_NAMES[p.x_bytes]
        cached = self.lookup(p, dtype)
        if cached is not None:
            return cached
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if self.mode == "default" or capturing:
            return default_config(p, self.num_sms)
        return self.tune(p, dtype)

    def tune(self, p: Problem, dtype: torch.dtype | str | None = None, mode: str | None = None,
             save: bool = True) -> TileConfig:
        """Benchmark the candidates of `mode`; fastest median wins, ties go to the earlier candidate."""
        mode = mode or self.mode
        dtype = dtype or _DTYPE_NAMES[p.x_bytes]
        candidates = candidate_configs(p, mode, self.num_sms, self.smem_bytes)
        if mode == "default" or len(candidates) == 1:
            best, best_ms = candidates[0], float("nan")
        else:
            timer = self.timer or _make_gpu_timer(dtype)
            timings = []
            for index, config in enumerate(candidates):
                try:
                    timings.append((float(timer(p, config)), index))
                except Exception as err:  # a config the compiler rejects (e.g. registers) just loses
                    warnings.warn(f"triton_lowrank: config {config} failed on {p}: {err}", RuntimeWarning,
                                  stacklevel=2)
            best_ms, best_index = min(timings) if timings else (float("nan"), 0)
            best = candidates[best_index]
        self.entries[problem_key(p, dtype)] = {"config": best.to_dict(), "ms": best_ms, "mode": mode}
        if save:
            self.save()
        return best

    def tune_many(self, problems: Iterable[tuple[Problem, str]], mode: str | None = None) -> dict[str, TileConfig]:
        """Tune each distinct key once (tqdm progress), then write the cache once."""
        unique = {problem_key(p, d): (p, d) for p, d in problems}
        todo = {k: v for k, v in unique.items() if k not in self.entries}
        items = list(todo.items())
        bar = tqdm(items, desc=f"autotune[{mode or self.mode}]", disable=not self.progress)
        for _key, (p, d) in bar:
            self.tune(p, d, mode, save=False)
        if todo:
            self.save()
        return {k: TileConfig.from_dict(self.entries[k]["config"]) for k in unique}


def _make_gpu_timer(dtype: torch.dtype | str) -> Timer:
    """Median time (ms) of one launch on random data of the problem's shape (triton.testing.do_bench)."""
    import triton.testing  # only a GPU benchmark needs it

    torch_dtype = getattr(torch, str(dtype).replace("torch.", ""))

    def timer(p: Problem, config: TileConfig) -> float:
        x = torch.randn(p.m, p.k, device="cuda", dtype=torch_dtype, generator=torch.Generator("cuda").manual_seed(0))
        out = torch.empty(p.m, p.n, device="cuda", dtype=torch_dtype)
        fmt = format_for_problem(p)
        stored = fmt.random_storage(p, torch_dtype, "cuda")
        return triton.testing.do_bench(lambda: fmt.launch(x, stored, config, out), return_mode="median")

    return timer


_PROCESS_TUNER: Autotuner | None = None


def get_tuner() -> Autotuner:
    """The process-wide tuner the custom op consults (created on first use; mode from the env)."""
    global _PROCESS_TUNER
    if _PROCESS_TUNER is None:
        _PROCESS_TUNER = Autotuner()
    return _PROCESS_TUNER


def tuned_config(problem: Problem, dtype: torch.dtype) -> TileConfig:
    """The launcher's config selector: the process tuner's choice (cached winner, tuning, or heuristic)."""
    return get_tuner().config_for(problem, dtype)


use_config_selector(tuned_config)
