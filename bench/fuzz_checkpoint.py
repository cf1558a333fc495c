"""Fuzz both checkpoint loaders with seeded mutations of a small compressed checkpoint (issue 22).

Each case copies a small checkpoint (single-file or sharded), applies one seeded mutation (byte flips,
truncations, trailing bytes, safetensors header and metadata edits, dtype / shape / offset edits, index
edits, config.json edits, a stray pytorch_model.bin, a FIFO or /dev/zero in place of a file) and loads it
with load_compressed and with transformers' from_pretrained. Each load must either give logits identical
to the original's or raise CheckpointError: any other exception, a load past the time limit, or different
logits is a failure, printed with the seed that replays it (`--seed S --cases 1`).

    .venv/bin/python bench/fuzz_checkpoint.py --cases 2000          # ~0.1 s a case on a 2-core CPU
    .venv/bin/python bench/fuzz_checkpoint.py --seed 1234 --cases 1 -v

tests/test_fuzz_checkpoint.py runs a few hundred cases in CI through `run_cases`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from triton_lowrank import CheckpointError, LowRankConfig, compress_model, load_compressed, save_compressed
from triton_lowrank.checkpoint.hf_quantizer import TritonLowRankHfQuantizer, mark_compressed

PROMPT = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 8, 16, 32, 60, 3, 7]])
TIMEOUT_S = 30.0
DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U16", "X", "", 7]
WEIRD_VALUES = [None, 0, -1, 1, 2**63, 1.5, float("1e308"), "", "x", "gelu", [], [1], {}, {"a": 1}, True, False]
COSMETIC = ("transformers_version", "_name_or_path")


def tiny_compressed_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    compress_model(model, LowRankConfig(rank=4, bits=8, include=("*.attn.c_*",)), progress=False)
    compress_model(model, LowRankConfig(rank=4, bits=4, group_size=16, include=("*.mlp.c_*",)), progress=False)
    return model


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


@dataclass
class Base:
    single: Path
    sharded: Path
    logits: torch.Tensor


def make_base(root: Path) -> Base:
    """The original checkpoint, once as model.safetensors and once in shards with an index."""
    model = tiny_compressed_model()
    single = save_compressed(model, root / "single")
    mark_compressed(model)
    model.save_pretrained(root / "sharded", max_shard_size="8KB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file(), "no shards written"
    logits = logits_of(load_compressed(single))
    assert torch.equal(logits, logits_of(load_compressed(root / "sharded")))
    return Base(single, root / "sharded", logits)


# ----------------------------------------------------------------------------- file helpers


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())


def split(path: Path) -> tuple[bytes, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return data[8 : 8 + length], data[8 + length :]


def join(path: Path, header: bytes, body: bytes) -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + body)


def edit_header(path: Path, change) -> None:
    raw, body = split(path)
    header = json.loads(raw)
    result = change(header)
    join(path, result if isinstance(result, bytes) else json.dumps(header).encode(), body)


def pick_tensor(rng: random.Random, header: dict) -> str:
    return rng.choice(sorted(k for k in header if k != "__metadata__"))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ----------------------------------------------------------------------------- mutations of safetensors


def byte_flip(rng, folder):
    path = rng.choice(shard_files(folder))
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    count = rng.choice([1, 1, 2, 8])
    where = []
    for _ in range(count):
        i = rng.randrange(header_end) if rng.random() < 0.5 else rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        where.append(i)
    path.write_bytes(bytes(data))
    return f"flip bytes {where} of {path.name}"


def truncate(rng, folder):
    path = rng.choice(shard_files(folder))
    data = path.read_bytes()
    keep = rng.choice([0, 4, 8, 12, rng.randrange(len(data)), len(data) - 1, len(data) - rng.randrange(1, 64)])
    path.write_bytes(data[: max(keep, 0)])
    return f"truncate {path.name} to {keep} bytes"


def trailing_bytes(rng, folder):
    path = rng.choice(shard_files(folder))
    extra = rng.choice([1, 4, 8, 100])
    path.write_bytes(path.read_bytes() + bytes(extra))
    return f"append {extra} bytes to {path.name}"


def header_length(rng, folder):
    path = rng.choice(shard_files(folder))
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    new = rng.choice([0, 1, length - 1, length + 1, length + 8, 2**40, 2**63 + 5, len(data)])
    data[:8] = (new % 2**64).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return f"header length of {path.name} {length} -> {new}"


def dtype_edit(rng, folder):
    path = rng.choice(shard_files(folder))
    code = rng.choice(DTYPE_CODES)
    name = []

    def change(header):
        name.append(pick_tensor(rng, header))
        header[name[0]]["dtype"] = code

    edit_header(path, change)
    return f"dtype of {name[0]} -> {code!r}"


def dtype_relabel_same_size(rng, folder):
    """F16 <-> BF16, F32 <-> I32, I8 <-> U8: the same bytes, read as something else."""
    path = rng.choice(shard_files(folder))
    swap = {"F16": "BF16", "BF16": "F16", "F32": "I32", "I32": "F32", "I8": "U8", "U8": "I8"}
    done = []

    def change(header):
        name = pick_tensor(rng, header)
        old = header[name]["dtype"]
        header[name]["dtype"] = swap.get(old, old)
        done.append(f"{name} {old} -> {header[name]['dtype']}")

    edit_header(path, change)
    return f"relabel {done[0]}"


def shape_edit(rng, folder):
    path = rng.choice(shard_files(folder))
    done = []

    def change(header):
        name = pick_tensor(rng, header)
        shape = header[name]["shape"]
        choice = rng.randrange(4)
        if choice == 0 and len(shape) == 2:
            header[name]["shape"] = [shape[1], shape[0]]  # same bytes, transposed
        elif choice == 1:
            header[name]["shape"] = [*shape, 1]
        elif choice == 2:
            header[name]["shape"] = [rng.choice([0, 1, 3, -1, 2**40, "x", None])]
        else:
            header[name]["shape"] = shape[:-1] if shape else [1]
        done.append(f"{name} {shape} -> {header[name]['shape']}")

    edit_header(path, change)
    return f"shape {done[0]}"


def offset_edit(rng, folder):
    path = rng.choice(shard_files(folder))
    done = []

    def change(header):
        names = sorted(k for k in header if k != "__metadata__")
        a, b = rng.choice(names), rng.choice(names)
        choice = rng.randrange(5)
        if choice == 0:  # swap two tensors' bytes (same size only keeps the tiling)
            header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        elif choice == 1:  # alias: a reads b's bytes
            header[a]["data_offsets"] = list(header[b]["data_offsets"])
        elif choice == 2:
            begin, end = header[a]["data_offsets"]
            shift = rng.choice([-4, -1, 1, 4])
            header[a]["data_offsets"] = [begin + shift, end + shift]
        elif choice == 3:
            header[a]["data_offsets"] = [rng.choice([0, -1, 2**62, "0"]), rng.choice([0, 8, 2**63])]
        else:
            header[a]["data_offsets"] = header[a]["data_offsets"][:1]
        done.append(f"{a} / {b} choice {choice}")

    edit_header(path, change)
    return f"offsets {done[0]}"


def entry_edit(rng, folder):
    path = rng.choice(shard_files(folder))
    done = []

    def change(header):
        name = pick_tensor(rng, header)
        choice = rng.randrange(6)
        if choice == 0:
            del header[name]
        elif choice == 1:
            header[name + ".copy"] = dict(header[name])
        elif choice == 2:
            header[name] = rng.choice([None, [], "x", 1, {"dtype": "F32"}])
        elif choice == 3:
            header[name]["extra"] = {"deep": json.loads(nested(rng.choice([3, 40])))}
        elif choice == 4:
            header[rng.choice(["", "..", "lm_head.weight", "transformer.h.0.attn.c_attn.weight"])] = header.pop(name)
        else:
            header["__metadata__"] = rng.choice([None, [], "x", {"a": 1}, {}])
        done.append(f"{name} choice {choice}")

    edit_header(path, change)
    return f"header entry {done[0]}"


def raw_header_edit(rng, folder):
    """Text-level edits json.dumps cannot make: duplicate keys, deep nesting, bad JSON, NaN."""
    path = rng.choice(shard_files(folder))
    raw, body = split(path)
    text = raw.decode()
    choice = rng.randrange(6)
    if choice == 0:  # a duplicate key: the second copy of an entry under the same name
        header = json.loads(text)
        name = pick_tensor(rng, header)
        text = text[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    elif choice == 1:
        text = text[:-1] + ', "deep": ' + nested(rng.choice([100, 5000, 100000])) + "}"
    elif choice == 2:
        text = text[: rng.randrange(len(text))]
    elif choice == 3:
        text = text.replace('"shape":[', '"shape":[NaN,', 1).replace('"shape": [', '"shape": [NaN, ', 1)
    elif choice == 4:
        text = text + " " * rng.choice([1, 7, 8])  # padding safetensors itself writes: must still load
    else:
        text = "\ufeff" + text
    join(path, text.encode(), body)
    return f"raw header edit {choice} of {path.name}"


def metadata_edit(rng, folder):
    files = shard_files(folder)
    path = rng.choice(files)
    done = []

    def change(header):
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(["triton_lowrank.sha256", "triton_lowrank.record"])
        choice = rng.randrange(7)
        if choice == 0:
            meta.pop(key, None)
        elif choice == 1:  # every checksum null: the offloaded marker must not switch verification off
            sums = json.loads(meta.get("triton_lowrank.sha256", "{}"))
            meta["triton_lowrank.sha256"] = json.dumps(dict.fromkeys(sums))
        elif choice == 2 and key in meta:
            value = json.loads(meta[key])
            if isinstance(value, dict) and value:
                value.pop(rng.choice(sorted(value)))
            meta[key] = json.dumps(value)
        elif choice == 3:
            meta[key] = rng.choice(["", "null", "[]", "{}", nested(10000), '{"a": 1, "a": 2}', "x"])
        elif choice == 4 and key in meta:
            value = json.loads(meta[key])
            if isinstance(value, dict) and value:
                value[rng.choice(sorted(value))] = "0" * 64
            meta[key] = json.dumps(value)
        elif choice == 5:
            meta[key] = 5  # not a string
        else:
            meta.clear()
        done.append(f"{key} choice {choice}")

    edit_header(path, change)
    return f"metadata {done[0]} in {path.name}"


# ----------------------------------------------------------------------------- other files


def index_edit(rng, folder):
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return byte_flip(rng, folder)
    data = json.loads(index.read_text())
    weight_map = data["weight_map"]
    name = rng.choice(sorted(weight_map))
    choice = rng.randrange(9)
    if choice == 0:
        data["weight_map"] = {}
    elif choice == 1:
        weight_map[name] = "../" + weight_map[name]
        shutil.copy(folder / data["weight_map"][name].removeprefix("../"), folder.parent / weight_map[name][3:])
    elif choice == 2:
        weight_map[name] = str((folder / weight_map[name]).absolute())
    elif choice == 3:
        others = sorted(set(weight_map.values()) - {weight_map[name]})
        weight_map[name] = rng.choice(others) if others else "x.safetensors"
    elif choice == 4:
        del weight_map[name]
    elif choice == 5:
        weight_map[name + ".extra"] = weight_map[name]
    elif choice == 6:
        data["weight_map"] = rng.choice([None, [], "x", {"a": 1}])
    elif choice == 7:
        index.write_text(json.dumps(data)[:-1] + ', "deep": ' + nested(rng.choice([100, 100000])) + "}")
        return f"index deep nesting {choice}"
    else:
        weight_map[name] = "pytorch_model.bin"
    index.write_text(json.dumps(data))
    return f"index edit {choice} on {name}"


def config_edit(rng, folder):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    choice = rng.randrange(8)
    if choice == 0:  # a field that changes the maths, or any other, set to another value or kind
        key = rng.choice(sorted(config))
        config[key] = rng.choice(WEIRD_VALUES)
        described = f"{key} = {config[key]!r}"
    elif choice == 1:
        key = rng.choice(sorted(config))
        del config[key]
        described = f"del {key}"
    elif choice == 2:  # a cosmetic field: must load, identical
        key = rng.choice(COSMETIC)
        config[key] = rng.choice(["4.0.0", "elsewhere", "x" * 100])
        described = f"cosmetic {key}"
    elif choice == 3:
        key = rng.choice(["layer_norm_epsilon", "n_head", "activation_function", "scale_attn_weights",
                          "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "n_inner", "dtype"])
        config[key] = rng.choice({"layer_norm_epsilon": [1e-3, 0.0, -1.0], "n_head": [1, 4, 0, 3],
                                  "activation_function": ["relu", "gelu", "nope"],
                                  "scale_attn_weights": [False, "no"], "scale_attn_by_inverse_layer_idx": [True, 2],
                                  "reorder_and_upcast_attn": [True], "n_inner": [16, 0, -5],
                                  "dtype": ["float16", "bfloat16", "int8", "nope"]}[key])
        described = f"maths {key} = {config[key]!r}"
    elif choice == 4:
        q = config["quantization_config"]
        layer = rng.choice(sorted(q["layers"]))
        field = rng.choice(sorted(q["layers"][layer]))
        q["layers"][layer][field] = rng.choice(WEIRD_VALUES)
        described = f"layers[{layer}].{field}"
    elif choice == 5:
        path.write_text(json.dumps(config)[:-1] + ', "deep": ' + nested(rng.choice([100, 100000])) + "}")
        return "config.json deep nesting"
    elif choice == 6:
        text = path.read_text()
        path.write_text(text[: rng.randrange(len(text))])
        return "config.json truncated"
    else:
        path.write_text(json.dumps(config)[:-1] + ', "n_head": 1}')
        return "config.json duplicate key n_head"
    path.write_text(json.dumps(config))
    return f"config.json {described}"


def special_file(rng, folder):
    """A FIFO, /dev/zero or a directory where a checkpoint file belongs (must fail, never hang)."""
    target = rng.choice(["config.json", "model.safetensors", "generation_config.json",
                         "model.safetensors.index.json"])
    path = folder / target
    if not path.exists():
        path = rng.choice(shard_files(folder))
    path.unlink()
    kind = rng.choice(["fifo", "dev_zero", "dir"])
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    return f"{path.name} is a {kind}"


def stray_bin(rng, folder):
    """A pytorch_model.bin with other weights beside the safetensors: ignored (identical logits) or refused."""
    model = tiny_compressed_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return "stray pytorch_model.bin with other weights"


MUTATIONS = [byte_flip, truncate, trailing_bytes, header_length, dtype_edit, dtype_relabel_same_size, shape_edit,
             offset_edit, entry_edit, raw_header_edit, metadata_edit, index_edit, index_edit, config_edit,
             config_edit, config_edit, special_file, stray_bin]


# ----------------------------------------------------------------------------- running cases

# from_pretrained reads config.json, the index and the file list itself before our quantizer is reached;
# what it refuses there is transformers' own error (README "Errors"). Whether our quantizer was reached is
# recorded per thread: once it was, every failure must be a CheckpointError.
_reached = threading.local()
_original_hook = TritonLowRankHfQuantizer._process_model_before_weight_loading


def _recording_hook(self, model, **kwargs):
    _reached.value = True
    return _original_hook(self, model, **kwargs)


TritonLowRankHfQuantizer._process_model_before_weight_loading = _recording_hook


def _load_with(loader: str, folder: Path):
    if loader == "load_compressed":
        return load_compressed(folder)
    return AutoModelForCausalLM.from_pretrained(folder)


def _outcome(loader: str, folder: Path, expected: torch.Tensor) -> str | None:
    """None when the load is right (identical logits, or CheckpointError); "before" when from_pretrained refused
    it with its own error before reaching our quantizer; else what went wrong."""
    _reached.value = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _load_with(loader, folder)
            logits = logits_of(model)
    except CheckpointError:
        return None
    except Exception as error:  # noqa: BLE001 -- any other type is the failure this fuzzer looks for
        if loader == "from_pretrained" and not _reached.value:
            return "before"
        tail = traceback.format_exception(type(error), error, error.__traceback__)[-3:]
        return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}\n{''.join(tail)}"
    if loader == "from_pretrained" and not _reached.value and not _names_our_quantizer(folder):
        return "before"  # a config.json without our quant_method: transformers loads it as a plain model
    if not torch.equal(logits, expected):
        return f"loaded with different logits (max diff {(logits - expected).abs().max().item():.3g})"
    return None


def _append_outcome(result: list, loader: str, folder: Path, expected: torch.Tensor) -> None:
    result.append(_outcome(loader, folder, expected))


def _names_our_quantizer(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == \
            "triton_lowrank"
    except Exception:  # noqa: BLE001 -- any damage means: not ours by its config
        return False


def run_case(seed: int, base: Base, work: Path, loaders=("load_compressed", "from_pretrained"),
             timeout: float = TIMEOUT_S, before: list | None = None) -> list[str]:
    """Failures of one seeded case (empty when both loaders behave); cases from_pretrained refused before
    reaching our quantizer are appended to `before`."""
    rng = random.Random(seed)
    source = base.sharded if rng.random() < 0.3 else base.single
    folder = work / f"case-{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder, symlinks=True)
    mutation = rng.choice(MUTATIONS)
    try:
        described = mutation(rng, folder)
    except Exception as error:  # noqa: BLE001 -- a mutation that does not apply to this file
        described = f"{mutation.__name__} not applied ({type(error).__name__})"
    failures = []
    for loader in loaders:
        result: list = []
        worker = threading.Thread(target=_append_outcome, args=(result, loader, folder, base.logits), daemon=True)
        worker.start()
        worker.join(timeout)
        problem = f"hung (no result after {timeout:.0f} s)" if not result else result[0]
        if problem == "before":
            if before is not None:
                before.append(f"seed {seed} [{source.name}, {described}]")
        elif problem is not None:
            failures.append(f"seed {seed} [{source.name}, {described}] {loader}: {problem}")
    if not failures:
        shutil.rmtree(folder, ignore_errors=True)
    return failures


def run_cases(first_seed: int, cases: int, work: Path, loaders=("load_compressed", "from_pretrained"),
              verbose: bool = False) -> list[str]:
    base = make_base(work / "base")
    failures, before = [], []
    for seed in range(first_seed, first_seed + cases):
        found = run_case(seed, base, work, loaders, before=before)
        failures += found
        if verbose or found:
            print("\n".join(found) if found else f"seed {seed}: ok", flush=True)
    if before:
        print(f"{len(before)} case(s) refused by transformers' own checks before our quantizer (from_pretrained), "
              f"e.g. {before[0]}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="first seed (cases use seed, seed+1, ...)")
    parser.add_argument("--loader", choices=("both", "load_compressed", "from_pretrained"), default="both")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    loaders = ("load_compressed", "from_pretrained") if args.loader == "both" else (args.loader,)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-checkpoint-") as work:
        failures = run_cases(args.seed, args.cases, Path(work), loaders, args.verbose)
    seconds = time.perf_counter() - started
    print(f"{args.cases} cases (seeds {args.seed}..{args.seed + args.cases - 1}), {len(loaders)} loader(s): "
          f"{len(failures)} failure(s) in {seconds:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
