"""Bad inputs, each with the one-line error it must get (issue 12), plus what the package recovers from.

The tables hold the CLI cases (run in-process through `main`) and the API cases; a case marked early
must fail before any model is loaded (the loader is replaced by one that fails the test).
"""

import fcntl
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_gpt2, tiny_tokenizer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from test_cli import run
from torch import nn
from transformers import AutoModelForCausalLM
from triton_lowrank.kernels.configs import Problem

from triton_lowrank import CheckpointError, LowRankConfig, compress_model, load_compressed, save_compressed
from triton_lowrank.checkpoint.save_load import MANIFEST, output_folder, output_lock
from triton_lowrank.core.autotune import Autotuner, problem_key
from triton_lowrank.core.factorize import whitening_cholesky
from triton_lowrank.core.safe_io import MAX_SAMPLES, MAX_TOKENS, UnsafeInput, parse_json, read_text_file

# --------------------------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """model: tiny GPT-2 (context 64) with its tokenizer; compressed: its checkpoint; others as named."""
    root = tmp_path_factory.mktemp("adversarial")
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    paths = {name: root / name for name in ("model", "compressed", "no_tokenizer", "small_vocab", "nan_weight")}
    model = make_tiny_gpt2(vocab_size=vocab)
    model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    model.save_pretrained(paths["no_tokenizer"])  # transformers 5 builds a one-entry tokenizer from this
    make_tiny_gpt2(vocab_size=128).save_pretrained(paths["small_vocab"])  # 128 rows, a 300-token tokenizer
    tokenizer.save_pretrained(paths["small_vocab"])
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[2, 3] = float("nan")
    model.save_pretrained(paths["nan_weight"])
    compressed = make_tiny_gpt2(vocab_size=vocab)
    compress_model(compressed, LowRankConfig(rank=8), progress=False)
    save_compressed(compressed, paths["compressed"], tokenizer=tokenizer)
    return paths


@pytest.fixture
def paths(folders, tmp_path):
    """The shared folders, plus a fresh `out` and a damaged copy of the checkpoint per test."""
    return {**folders, "out": tmp_path / "out", "tmp": tmp_path}


def one_line_error(code, err) -> str:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("triton-lowrank: error:"), lines[0]
    return lines[0]


# Each setup gets the paths and prepares the damage a case needs.


def notes_folder(paths):
    (paths["out"] / "src").mkdir(parents=True)
    (paths["out"] / "notes.txt").write_text("mine")


def lock_held(paths):
    paths["lock"] = os.open(paths["tmp"] / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(paths["lock"], fcntl.LOCK_EX)  # another open file: conflicts as another process would
    os.write(paths["lock"], b"31337")


def binary_file(paths):
    (paths["tmp"] / "calib.bin").write_bytes(bytes(range(256)))


def empty_file(paths):
    (paths["tmp"] / "calib.bin").write_text("  \n")


def damaged_copy(change):
    def setup(paths):
        shutil.copytree(paths["compressed"], paths["tmp"] / "damaged")
        change(paths["tmp"] / "damaged")

    return setup


def quant_method_foo(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "foo"
    (folder / "config.json").write_text(json.dumps(config))


def strip_metadata(folder):
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    save_file(tensors, path, metadata={"format": "pt"})


def garble_header(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["transformer.h.0.attn.c_attn.down"]["offsets"] = header["transformer.h.0.attn.c_attn.down"].pop(
        "data_offsets"
    )
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])


LONG_PROMPT = "To be, or not to be, that is the question " * 20  # far more than 64 tokens

CLI_CASES = [
    # (argv, expected fragment of the one line, setup, early: refused before any model is loaded)
    pytest.param(["compress", "{model}", "{out}", "--overwrite"],
                 r"refusing to replace .*out: it is not a triton_lowrank checkpoint \(it holds notes\.txt, src/\)",
                 notes_folder, True, id="overwrite-non-checkpoint"),
    pytest.param(["compress", "{model}", "{out}"], r"out already exists and is not empty; pass --overwrite",
                 notes_folder, True, id="out-exists"),
    pytest.param(["compress", "{model}", "{model}/sub", "--overwrite"], "overlaps", None, True, id="out-inside-model"),
    pytest.param(["compress", "{model}", "{out}"], r"being written by another run \(process 31337", lock_held, True,
                 id="concurrent-run"),
    pytest.param(["compress", "{model}", "{out}", "--seq-len", 100000],
                 r"--seq-len 100000 is longer than the context of .*model \(64 tokens\)", None, True,
                 id="compress-seq-len-past-context"),
    pytest.param(["eval", "{model}", "{compressed}", "--seq-len", 65], r"--seq-len 65 is longer than the context",
                 None, True, id="eval-seq-len-past-context"),
    pytest.param(["compress", "{model}", "{out}", "--seq-len", 0], "argument --seq-len: must be at least 2, got 0",
                 None, True, id="seq-len-0"),
    pytest.param(["compress", "{model}", "{out}", "--calib-samples", 0],
                 "argument --calib-samples: must be at least 1, got 0", None, True, id="calib-samples-0"),
    pytest.param(["eval", "{model}", "{compressed}", "--samples", "x"], "argument --samples: expected an integer",
                 None, True, id="samples-not-a-number"),
    pytest.param(["compress", "{model}", "{out}", "--budget", "inf"],
                 "argument --budget: must be > 0 and finite, got inf", None, True, id="budget-inf"),
    pytest.param(["compress", "{model}", "{out}", "--budget", "nan"],
                 "argument --budget: must be > 0 and finite, got nan", None, True, id="budget-nan"),
    pytest.param(["compress", "{model}", "{out}", "--rank-ratio", "1.5"], "argument --rank-ratio: is the fraction kept",
                 None, True, id="rank-ratio-1.5"),
    pytest.param(["compress", "{model}", "{out}", "--calib-text", "{tmp}/calib.bin"],
                 r"calib\.bin is not UTF-8 text \(invalid start byte at byte 128\)", binary_file, True,
                 id="binary-calibration-file"),
    pytest.param(["compress", "{model}", "{out}", "--calib-text", "{tmp}/calib.bin"], r"calib\.bin is empty",
                 empty_file, True, id="empty-calibration-file"),
    pytest.param(["generate", "{model}", "--prompt", ""], "--prompt is empty", None, True, id="empty-prompt"),
    pytest.param(["generate", "{model}", "--prompt", LONG_PROMPT], r"the prompt is \d+ tokens, longer than the "
                 r"context of .*model \(64\)", None, False, id="prompt-past-context"),
    pytest.param(["generate", "{model}", "--prompt", "To be", "--max-new-tokens", 1000],
                 r"the prompt \(\d+ tokens\) and 1000 new tokens do not fit the context .*ask for at most \d+",
                 None, False, id="max-new-tokens-past-context"),
    pytest.param(["generate", "{model}", "--prompt", "To be", "--max-new-tokens", 0],
                 "argument --max-new-tokens: must be at least 1, got 0", None, True, id="max-new-tokens-0"),
    pytest.param(["eval", "{small_vocab}", "{compressed}"], r"the tokenizer has \d+ tokens, more than the 128 rows",
                 None, False, id="tokenizer-larger-than-embedding"),
    pytest.param(["generate", "{no_tokenizer}", "--prompt", "To be"],
                 r"no_tokenizer: the tokenizer has 1 entry \(no tokenizer files\?\)", None, False,
                 id="folder-without-tokenizer"),
    pytest.param(["compress", "{nan_weight}", "{out}", "--method", "svd", "--rank", 4],
                 r"transformer\.h\.1\.mlp\.c_fc: weight has 1 NaN or infinite value\(s\)", None, False,
                 id="nan-weight"),
    pytest.param(["generate", "{tmp}/damaged", "--prompt", "To be"],
                 r"transformer\.h\.0\.attn\.c_attn\.down' in .*not \{dtype, shape, data_offsets\}",
                 damaged_copy(garble_header), False, id="garbled-safetensors-header"),
    pytest.param(["generate", "{tmp}/damaged", "--prompt", "To be"], "quant_method is 'foo', expected 'triton_lowrank'",
                 damaged_copy(quant_method_foo), False, id="unknown-quant-method"),
    pytest.param(["generate", "{tmp}/damaged", "--prompt", "To be"], r"model\.safetensors has no checksums",
                 damaged_copy(strip_metadata), False, id="checksums-stripped"),
]


@pytest.mark.parametrize("argv, fragment, setup, early", CLI_CASES)
def test_cli_bad_input_gets_one_line(paths, argv, fragment, setup, early, capsys, monkeypatch):
    if setup is not None:
        setup(paths)
    if early:  # the check must come before the (slow) load
        monkeypatch.setattr("triton_lowrank.tools.cli.load", lambda *a, **k: pytest.fail("loaded a model first"))
    try:
        code, _, err = run([str(a).format(**paths) for a in argv], capsys)
    finally:
        if "lock" in paths:
            os.close(paths["lock"])
    line = one_line_error(code, err)
    assert re.search(fragment, line), line
    assert "overwrite=True" not in line  # a CLI user is told about --overwrite, never the API's spelling


def test_eval_between_models_with_different_vocabularies(paths, capsys):
    # small_vocab's own tokenizer would be refused first: without one, the vocabulary check is reached
    shutil.copytree(paths["small_vocab"], paths["tmp"] / "dense", ignore=shutil.ignore_patterns("tokenizer*"))
    code, _, err = run(["eval", paths["tmp"] / "dense", paths["compressed"], "--seq-len", 8], capsys)
    assert "has a vocabulary of 128 tokens" in one_line_error(code, err)


# --------------------------------------------------------------------------------------------- API

SINGULAR = torch.ones(8, 8)  # rank 1: Cholesky needs damping


def compress_with(**kwargs):
    def call():
        model = make_tiny_gpt2()
        compress_model(model, progress=False, **kwargs)

    return call


def nan_weight_model():
    model = make_tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight[0, 0] = float("inf")
    compress_model(model, LowRankConfig(rank=4), progress=False)


API_CASES = [
    # (callable, exception type, expected message)
    pytest.param(lambda: LowRankConfig(rank=4, damping=float("nan")), ValueError,
                 "damping must be > 0 and finite, got nan", id="damping-nan"),
    pytest.param(lambda: LowRankConfig(rank=4, damping=-1), ValueError, "damping must be > 0 and finite, got -1",
                 id="damping-negative"),
    pytest.param(lambda: LowRankConfig(rank=4, error_feedback="no"), TypeError,
                 "error_feedback must be True or False, got 'no'", id="error-feedback-string"),
    pytest.param(lambda: LowRankConfig(rank=4, group_size=32.0), TypeError,
                 r"group_size must be an integer, got 32\.0 \(float\)", id="group-size-float"),
    pytest.param(lambda: LowRankConfig(budget="0.5"), TypeError, r"budget must be a number, got '0\.5' \(str\)",
                 id="budget-string"),
    pytest.param(lambda: LowRankConfig(rank="4"), TypeError, "rank must be an integer, got '4'", id="rank-string"),
    pytest.param(lambda: LowRankConfig(rank_ratio="0.5"), TypeError, "rank_ratio must be a number",
                 id="rank-ratio-string"),
    pytest.param(lambda: LowRankConfig(energy=True), TypeError, "energy must be a number, got True",
                 id="energy-bool"),
    pytest.param(lambda: LowRankConfig(rank=4, bits=8.0), TypeError, "bits must be an integer", id="bits-float"),
    pytest.param(lambda: LowRankConfig(budget=math.inf), ValueError, "budget must be > 0 and finite, got inf",
                 id="budget-inf"),
    pytest.param(lambda: LowRankConfig(rank=4, method=["svd"]), TypeError, "method must be a string",
                 id="method-list"),
    pytest.param(lambda: LowRankConfig(rank=4, include=[1]), TypeError, "include patterns must be strings",
                 id="include-ints"),
    pytest.param(lambda: LowRankConfig(rank=4, group_size=-2), ValueError, "group_size must be >= 0",
                 id="group-size-negative"),
    pytest.param(lambda: whitening_cholesky(SINGULAR, float("nan"), "layer"), ValueError,
                 "layer: damping must be > 0 and finite", id="cholesky-nan-damping-no-hang"),
    pytest.param(compress_with(config=LowRankConfig(rank=4, method="whitened"),
                               calibration=torch.randint(0, 128, (2, 16))),
                 TypeError, r"calibration is one Tensor; pass a list of batches", id="one-calibration-tensor"),
    pytest.param(nan_weight_model, ValueError, r"transformer\.h\.0\.attn\.c_proj: weight has 1 NaN or infinite",
                 id="inf-weight"),
    pytest.param(lambda: save_compressed(nn.Linear(4, 4), "/tmp/never-written"), TypeError,
                 "save_compressed needs a transformers model", id="save-plain-module"),
    pytest.param(lambda: load_compressed("/nonexistent/ckpt"), FileNotFoundError,
                 "checkpoint folder not found: /nonexistent/ckpt", id="load-missing-folder"),
]


@pytest.mark.parametrize("call, error, message", API_CASES)
def test_api_bad_input_gets_a_clear_error(call, error, message):
    result = []
    worker = threading.Thread(target=lambda: result.append(_raised(call)), daemon=True)
    worker.start()
    worker.join(timeout=60)  # the Cholesky retry once looped forever on NaN damping
    assert result, "hung"
    raised = result[0]
    assert isinstance(raised, error), repr(raised)
    assert re.search(message, str(raised)), str(raised)
    assert "\n" not in str(raised)


def test_cholesky_retries_are_bounded(monkeypatch):
    """Even a factorization that never succeeds ends the retries (NaN damping once made them endless)."""
    calls = []

    def never(matrix):
        calls.append(1)
        return matrix, torch.tensor(1)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", never)
    with pytest.raises(ValueError, match="layer: calibration Gram matrix is not positive definite"):
        whitening_cholesky(SINGULAR, 1e300, "layer")
    assert len(calls) <= 64


def _raised(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


# --------------------------------------------------------------------------------------------- recovered from


def test_budget_above_full_rank_is_clamped_with_a_warning(paths, capsys):
    code, out, err = run(["compress", paths["model"], paths["out"], "--budget", 1.5, "--method", "svd"], capsys)
    assert code == 0, err
    assert "triton-lowrank: warning: budget 1.5 is more than full rank needs" in err and "clamped" in err
    config = json.loads((paths["out"] / "config.json").read_text())["quantization_config"]["layers"]
    assert all(spec["rank"] == min(spec["in_features"], spec["out_features"]) for spec in config.values())


def test_compress_without_tokenizer_writes_none(paths, capsys):
    """transformers 5 builds a one-entry tokenizer for a folder without tokenizer files; it must not be saved."""
    code, _, err = run(["compress", paths["no_tokenizer"], paths["out"], "--rank", 4, "--method", "svd"], capsys)
    assert code == 0, err
    assert not [p.name for p in paths["out"].iterdir() if p.name.startswith(("tokenizer", "vocab", "merges"))]


def test_whitened_compresses_a_model_with_an_all_zero_layer():
    """c_attn all zero (GPT-2 biases start at zero) leaves c_proj only zero inputs: plain SVD for it, with a warning."""
    model = make_tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.zero_()
    calibration = [torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.warns(UserWarning, match=r"h\.0\.attn\.c_proj: calibration gave this layer only zero inputs"):
        report = compress_model(model, LowRankConfig(rank=8, method="whitened"), calibration, progress=False)
    assert len(report.layers) == 8 and all(math.isfinite(row.rel_error) for row in report.layers)


@pytest.mark.parametrize("outlier", [1e3, 1e30])
def test_report_error_is_the_true_error_with_an_outlier(outlier):
    """The report's relative error against one measured through the layer itself (identity input), in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight[5, 7] = outlier
    weight = model[0].weight.detach().double().clone()  # [out, in]
    report = compress_model(model, LowRankConfig(rank=8, bits=8), progress=False)
    with torch.no_grad():
        applied = (model[0](torch.eye(64)) - model[0].bias).double().t()  # [out, in]: what the layer computes
    true = ((applied - weight).norm() / weight.norm()).item()
    assert 0 < report.layers[0].rel_error < math.inf  # float32 norms overflowed at 1e30: the report said 0
    assert report.layers[0].rel_error == pytest.approx(true, rel=1e-3, abs=1e-6)  # abs: float32 forward rounding


def test_report_error_is_nan_or_inf_when_the_result_is(monkeypatch):
    monkeypatch.setattr("triton_lowrank.formats.lowrank.fit.truncated_factors",
                        lambda w, r, chol=None: (torch.full((w.shape[0], r), float("inf")), torch.ones(r, w.shape[1])))
    report = compress_model(nn.Sequential(nn.Linear(32, 32)), LowRankConfig(rank=4, bits=None), progress=False)
    assert not math.isfinite(report.layers[0].rel_error)


# --------------------------------------------------------------------------------------------- autotune cache

PROBLEMS = [Problem(m=1, n=64 * (1 + i % 8), k=64 * (1 + i // 8), rank=16, bits=8, group_size=0) for i in range(64)]


def _tune_many(cache_dir, first, count):
    tuner = Autotuner(mode="default", cache_dir=cache_dir, gpu_name="g", triton_version="t", progress=False)
    for problem in PROBLEMS[first : first + count]:
        tuner.tune(problem, "float16")  # saves after each: the read-merge-write race of the issue


def test_concurrent_tuners_lose_no_entry(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_tune_many, args=(tmp_path, 32 * i, 32)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    entries = json.loads((tmp_path / "autotune.json").read_text())["sections"]["g|triton-t"]
    assert set(entries) == {problem_key(p, "float16") for p in PROBLEMS}


def test_unwritable_cache_warns_once_and_keeps_winners_in_memory(tmp_path):
    (tmp_path / "file").write_text("")
    tuner = Autotuner(mode="default", cache_dir=tmp_path / "file" / "cache", gpu_name="g", triton_version="t")
    with pytest.warns(RuntimeWarning, match="cannot write the autotune cache") as caught:
        for problem in PROBLEMS[:3]:
            tuner.config_for(problem, "float16")  # what the forward pass calls: never raises
            tuner.tune(problem, "float16")
    assert len([w for w in caught if "autotune cache" in str(w.message)]) == 1
    assert all(tuner.lookup(p, "float16") is not None for p in PROBLEMS[:3])


def test_unreadable_cache_never_reaches_the_forward_pass(tmp_path):
    (tmp_path / "autotune.json").mkdir()  # reading it fails with IsADirectoryError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner = Autotuner(mode="default", cache_dir=tmp_path, gpu_name="g", triton_version="t")
        tuner.tune(PROBLEMS[0], "float16")
    assert [str(w.message) for w in caught if "autotune cache" in str(w.message)][0].startswith(
        "triton_lowrank: cannot read the autotune cache"
    )
    assert tuner.lookup(PROBLEMS[0], "float16") is not None
    assert Path(tmp_path / "autotune.json").is_dir()  # left alone


# --------------------------------------------------------------------------------------------- issue 22
# Nothing of a user's lost; verification that cannot be switched off; bounded reads and work; one error type.

PROMPT = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


def logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    """A float16 checkpoint (int8 factors, float16 biases and embeddings) and its logits."""
    model = make_tiny_gpt2()
    compress_model(model, LowRankConfig(rank=8), progress=False)
    model.to(torch.float16)
    folder = save_compressed(model, tmp_path_factory.mktemp("fp16") / "ck")
    return folder, logits(load_compressed(folder, dtype=torch.float32))


@pytest.fixture
def ck(paths):
    """A fresh copy of the float32 checkpoint."""
    folder = paths["tmp"] / "ck"
    shutil.copytree(paths["compressed"], folder)
    return folder


def header_of(path):
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return data[8 : 8 + length], data[8 + length :]


def write_header(path, raw: bytes, body: bytes) -> None:
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def change_header(path, change) -> None:
    raw, body = header_of(path)
    header = json.loads(raw)
    change(header)
    write_header(path, json.dumps(header).encode(), body)


def change_config(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def both_refuse(folder, match, from_pretrained=True):
    with pytest.raises(CheckpointError, match=match) as caught:
        load_compressed(folder)
    assert "\n" not in str(caught.value)
    if from_pretrained:
        with pytest.raises(CheckpointError, match=match):
            AutoModelForCausalLM.from_pretrained(folder)


def within(seconds, call):
    """call() in a thread; the test fails if it has not returned in `seconds` (a hang)."""
    result = []

    def target():
        try:
            result.append(call())
        except Exception as exc:  # noqa: BLE001
            result.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"hung for {seconds} s"
    return result[0]


# --- 1. nothing of a user's is deleted or overwritten ------------------------------------------------------

def test_a_lookalike_backup_of_the_user_is_never_removed_nor_restored(paths):
    model = load_compressed(paths["compressed"])
    out = paths["tmp"] / "ck"
    backup = paths["tmp"] / ".ck.old-20241231"  # matches the leftover pattern, but we did not write it
    backup.mkdir()
    (backup / "mine.txt").write_text("precious")
    save_compressed(model, out)  # OUT missing: the old recovery moved the backup into OUT
    assert (backup / "mine.txt").read_text() == "precious" and not (out / "mine.txt").exists()
    save_compressed(model, out, overwrite=True)  # the old recovery removed it
    assert (backup / "mine.txt").read_text() == "precious"
    tmp_lookalike = paths["tmp"] / ".ck.tmp-abcdefgh"
    tmp_lookalike.mkdir()
    save_compressed(model, out, overwrite=True)
    assert tmp_lookalike.is_dir()


def test_an_overwrite_that_would_delete_files_we_did_not_write_refuses_and_lists_them(paths):
    model = load_compressed(paths["compressed"])
    out = save_compressed(model, paths["tmp"] / "ck")
    (out / "README.md").write_text("my model card")
    (out / "evals").mkdir()
    with pytest.raises(FileExistsError, match=r"did not write \(README\.md, evals/\)"):
        save_compressed(model, out, overwrite=True)
    assert (out / "README.md").read_text() == "my model card" and (out / "evals").is_dir()
    (out / "README.md").unlink()
    (out / "evals").rmdir()
    save_compressed(model, out, overwrite=True)  # only what we wrote: replaced


def test_a_checkpoint_from_before_the_manifest_is_replaced_only_if_it_holds_a_checkpoints_files(paths):
    model = load_compressed(paths["compressed"])
    out = save_compressed(model, paths["tmp"] / "ck")
    (out / MANIFEST).unlink()
    save_compressed(model, out, overwrite=True)
    (out / MANIFEST).unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write \(notes\.txt\)"):
        save_compressed(model, out, overwrite=True)


def test_output_folder_for_the_demo_follows_the_out_rules(paths):
    """The function `demo --out` uses: new or empty, or (with overwrite) a folder it wrote with nothing added."""
    out = paths["tmp"] / "demo_out"
    with output_folder(out, option="--overwrite") as folder:
        (folder / "demo.json").write_text("{}")
        (folder / "sweep.png").write_bytes(b"png")
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"), output_folder(out, option="--overwrite"):
        pass
    with output_folder(out, overwrite=True, option="--overwrite"):
        (out / "demo.json").write_text('{"again": 1}')
    (out / "sweep.csv").write_text("user's")
    with pytest.raises(FileExistsError, match=r"did not write \(sweep\.csv\)"), \
            output_folder(out, overwrite=True, option="--overwrite"):
        pytest.fail("ran in a folder holding a user's file")
    assert (out / "sweep.csv").read_text() == "user's"
    mine = paths["tmp"] / "mine"
    mine.mkdir()
    (mine / "demo.json").write_text("the user's own")
    with pytest.raises(FileExistsError, match=r"did not write \(demo\.json\)"), \
            output_folder(mine, overwrite=True, option="--overwrite"):
        pass
    assert (mine / "demo.json").read_text() == "the user's own"


def test_an_out_name_too_long_for_the_temp_folder_is_refused_before_any_work(paths, capsys, monkeypatch):
    monkeypatch.setattr("triton_lowrank.tools.cli.load", lambda *a, **k: pytest.fail("loaded a model first"))
    code, _, err = run(["compress", paths["model"], paths["tmp"] / ("x" * 250)], capsys)
    assert "is too long" in one_line_error(code, err)


# --- 2. verification that cannot be switched off or sidestepped ---------------------------------------------

def null_checksums(folder):
    def change(header):
        sums = json.loads(header["__metadata__"]["triton_lowrank.sha256"])
        header["__metadata__"]["triton_lowrank.sha256"] = json.dumps(dict.fromkeys(sums))
        begin = header["transformer.h.0.attn.c_attn.down"]["data_offsets"][0]
        header["__metadata__"]["flip"] = str(begin)

    change_header(folder / "model.safetensors", change)
    raw, body = header_of(folder / "model.safetensors")
    flip = int(json.loads(raw)["__metadata__"]["flip"])
    body = bytearray(body)
    body[flip] ^= 0x40  # changed bytes that the nulls would have let through
    write_header(folder / "model.safetensors", raw, bytes(body))


def test_null_checksums_do_not_switch_verification_off(ck):
    null_checksums(ck)
    both_refuse(ck, r"null checksum")


def test_a_dtype_relabel_f16_to_bf16_is_caught(fp16_checkpoint, paths):
    folder = paths["tmp"] / "fp16"
    shutil.copytree(fp16_checkpoint[0], folder)
    change_header(folder / "model.safetensors", lambda h: h["transformer.wte.weight"].update(dtype="BF16"))
    both_refuse(folder, r"dtype or shape .* was changed after saving")


MATHS_EDITS = {
    "heads": lambda c: c.update(n_head=2),
    "activation": lambda c: c.update(activation_function="relu"),
    "norm epsilon": lambda c: c.update(layer_norm_epsilon=0.1),
    "attention scaling": lambda c: c.update(scale_attn_weights=False),
    "inverse layer scaling": lambda c: c.update(scale_attn_by_inverse_layer_idx=True),
}


@pytest.mark.parametrize("edit", list(MATHS_EDITS))
def test_config_json_edits_that_change_the_maths_are_caught(ck, edit):
    change_config(ck, MATHS_EDITS[edit])
    both_refuse(ck, r"config\.json was changed after saving")


def test_cosmetic_config_fields_may_change(ck, paths):
    expected = logits(load_compressed(paths["compressed"]))
    change_config(ck, lambda c: c.update(transformers_version="9.9.9", _name_or_path="elsewhere"))
    for load in (load_compressed, AutoModelForCausalLM.from_pretrained):
        assert torch.equal(logits(load(ck)), expected)


def test_a_stray_pytorch_model_bin_is_never_loaded(ck, paths):
    expected = logits(load_compressed(paths["compressed"]))
    other = make_tiny_gpt2(vocab_size=300, seed=5)
    compress_model(other, LowRankConfig(rank=8), progress=False)
    torch.save(other.state_dict(), ck / "pytorch_model.bin")
    for load in (load_compressed, AutoModelForCausalLM.from_pretrained):
        assert torch.equal(logits(load(ck)), expected)


@pytest.fixture
def sharded(paths):
    model = load_compressed(paths["compressed"])
    folder = paths["tmp"] / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def change_index(folder, change):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    change(data["weight_map"], data)
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_paths_stay_inside_the_folder(sharded, where):
    def change(weight_map, data):
        name = sorted(weight_map)[0]
        if where == "parent":
            shutil.copy(sharded / weight_map[name], sharded.parent / weight_map[name])
            weight_map[name] = "../" + weight_map[name]
        else:
            weight_map[name] = str(sharded / weight_map[name])

    change_index(sharded, change)
    with pytest.raises(CheckpointError, match="is not a .safetensors file inside the folder"):
        load_compressed(sharded)
    with pytest.raises((CheckpointError, ValueError), match="outside|inside"):  # transformers refuses it first
        AutoModelForCausalLM.from_pretrained(sharded)


def test_files_saved_before_the_extended_record_still_load_with_a_warning(ck, paths):
    """A version 2 file whose record covers only the quantization_config and the names (saved before issue 22)."""
    expected = logits(load_compressed(paths["compressed"]))

    def old_record(header):
        record = json.loads(header["__metadata__"]["triton_lowrank.record"])
        header["__metadata__"]["triton_lowrank.record"] = json.dumps({k: record[k] for k in ("config", "tensors")})

    change_header(ck / "model.safetensors", old_record)
    for load in (load_compressed, AutoModelForCausalLM.from_pretrained):
        with pytest.warns(UserWarning, match="older triton_lowrank: its record does not cover"):
            assert torch.equal(logits(load(ck)), expected)


# --- 3. bounded reads and work ------------------------------------------------------------------------------

def fifo(paths):
    os.mkfifo(paths["tmp"] / "calib.txt")


def dev_zero(paths):
    (paths["tmp"] / "calib.txt").symlink_to("/dev/zero")


def directory(paths):
    (paths["tmp"] / "calib.txt").mkdir()


@pytest.mark.parametrize("command", ["compress", "eval"])
@pytest.mark.parametrize("setup, fragment", [(fifo, "is a FIFO"), (dev_zero, "is a character device"),
                                             (directory, "is a directory")], ids=["fifo", "dev-zero", "directory"])
def test_text_inputs_must_be_regular_files(paths, capsys, monkeypatch, command, setup, fragment):
    setup(paths)
    monkeypatch.setattr("triton_lowrank.tools.cli.load", lambda *a, **k: pytest.fail("loaded a model first"))
    argv = {"compress": ["compress", paths["model"], paths["out"], "--calib-text"],
            "eval": ["eval", paths["model"], paths["compressed"], "--text"]}[command]
    code, _, err = within(30, lambda: run([*argv, paths["tmp"] / "calib.txt"], capsys))
    assert fragment + ", not a regular file" in one_line_error(code, err)


def test_a_text_file_over_the_limit_is_refused(tmp_path):
    (tmp_path / "big.txt").write_text("word " * 100)
    with pytest.raises(UnsafeInput, match="larger than the 64-byte limit"):
        read_text_file(tmp_path / "big.txt", limit=64)


@pytest.mark.parametrize("argv, fragment", [
    (["compress", "{model}", "{out}", "--calib-tokens", "1000000000000"],
     f"argument --calib-tokens: 1,000,000,000,000 is above the limit of {MAX_TOKENS:,}"),
    (["compress", "{model}", "{out}", "--calib-samples", "10000000"], f"above the limit of {MAX_SAMPLES:,}"),
    (["eval", "{model}", "{compressed}", "--samples", "1000000000"],
     f"argument --samples: 1,000,000,000 is above the limit of {MAX_SAMPLES:,}"),
    (["generate", "{model}", "--prompt", "x", "--max-new-tokens", "10000000000"], "is above the limit"),
], ids=["calib-tokens", "calib-samples", "eval-samples", "max-new-tokens"])
def test_counts_have_upper_bounds_checked_before_any_work(paths, capsys, monkeypatch, argv, fragment):
    monkeypatch.setattr("triton_lowrank.tools.cli.load", lambda *a, **k: pytest.fail("loaded a model first"))
    code, _, err = run([a.format(**paths) for a in argv], capsys)
    assert code != 0 and fragment in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "directory"])
def test_a_config_json_that_is_not_a_regular_file_never_hangs(ck, kind):
    (ck / "config.json").unlink()
    if kind == "dev_zero":
        (ck / "config.json").symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(ck / "config.json")
    else:
        (ck / "config.json").mkdir()
    raised = within(30, lambda: load_compressed(ck))
    assert isinstance(raised, CheckpointError) and "not a regular file" in str(raised), repr(raised)


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev_zero"])
def test_a_model_safetensors_that_is_not_a_regular_file_is_named_as_such(ck, kind):
    path = ck / "model.safetensors"
    path.unlink()
    {"fifo": os.mkfifo, "directory": os.mkdir, "dev_zero": lambda p: p.symlink_to("/dev/zero")}[kind](path)
    raised = within(30, lambda: load_compressed(ck))
    assert isinstance(raised, CheckpointError) and "not a regular file" in str(raised), repr(raised)
    assert "missing" not in str(raised)


def test_json_depth_and_duplicates_are_limited():
    with pytest.raises(UnsafeInput, match="nested deeper than 64"):
        parse_json("[" * 100000 + "]" * 100000, "x")
    with pytest.raises(UnsafeInput, match="duplicate key 'a'"):
        parse_json('{"a": 1, "a": 2}', "x")
    assert parse_json('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', "x")


# --- 4. one error type for a bad checkpoint -----------------------------------------------------------------

def deep_header(folder):
    raw, body = header_of(folder / "model.safetensors")
    deep = b"[" * 50000 + b"]" * 50000
    write_header(folder / "model.safetensors", raw.rstrip()[:-1] + b', "deep": ' + deep + b"}", body)


def deep_record(folder):
    change_header(folder / "model.safetensors",
                  lambda h: h["__metadata__"].update({"triton_lowrank.record": "[" * 50000 + "]" * 50000}))


def deep_config(folder):
    text = (folder / "config.json").read_text().rstrip()
    (folder / "config.json").write_text(text[:-1] + ', "deep": ' + "[" * 50000 + "]" * 50000 + "}")


def trailing(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 8)


def duplicate_key(folder):
    raw, body = header_of(folder / "model.safetensors")
    header = json.loads(raw)
    entry = json.dumps(header["transformer.h.0.attn.c_attn.down"]).encode()
    write_header(folder / "model.safetensors",
                 raw.rstrip()[:-1] + b', "transformer.h.0.attn.c_attn.down": ' + entry + b"}", body)


def aliased(folder):
    def change(header):
        names = [n for n in header if n != "__metadata__" and header[n]["dtype"] == "F32"]
        a, b = sorted(names, key=lambda n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0])[:2]
        header[a]["data_offsets"] = list(header[b]["data_offsets"])
        header[a]["shape"] = list(header[b]["shape"])

    change_header(folder / "model.safetensors", change)


def unknown_dtype(folder):
    change_header(folder / "model.safetensors", lambda h: h["transformer.wte.weight"].update(dtype="F8_E4M3"))


def empty_weight_map(folder):
    model = load_compressed(folder)
    shutil.rmtree(folder)
    model.save_pretrained(folder, max_shard_size="100KB")
    change_index(folder, lambda weight_map, data: data.update(weight_map={}))


BAD_CHECKPOINTS = {
    # name: (damage, message, also checked through from_pretrained)
    "deep header": (deep_header, "nested deeper than 64", True),
    "deep record": (deep_record, "is not a JSON record|nested", True),
    "deep config.json": (deep_config, "nested deeper than 64", False),  # transformers parses it first
    "trailing bytes": (trailing, "8 trailing byte", True),
    "duplicate key": (duplicate_key, "duplicate key", True),
    "aliased offsets": (aliased, "alias those of", True),
    "unknown dtype": (unknown_dtype, "unknown header dtype 'F8_E4M3'", True),
    "empty weight_map": (empty_weight_map, "weight_map is missing or empty", False),  # transformers' IndexError first
    "n_head a string": (lambda f: change_config(f, lambda c: c.update(n_head="x")), "config.json", False),
    "n_layer null": (lambda f: change_config(f, lambda c: c.update(n_layer=None)), "config.json", False),
    "in_features 2**63": (lambda f: change_config(f, lambda c: c["quantization_config"]["layers"][
        "transformer.h.0.attn.c_attn"].update(in_features=2**63)), "builds no layer", True),  # fuzz seed 6037
    "quantization_config a list": (lambda f: change_config(f, lambda c: c.update(quantization_config=[1])),
                                   "quantization_config is not a JSON object", False),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_every_bad_checkpoint_is_a_checkpoint_error(ck, name):
    damage, message, through_from_pretrained = BAD_CHECKPOINTS[name]
    damage(ck)
    both_refuse(ck, message, from_pretrained=through_from_pretrained)


def test_a_full_disk_during_save_is_an_oserror_and_keeps_the_old_checkpoint(paths, monkeypatch, capsys):
    out = paths["tmp"] / "ck"
    shutil.copytree(paths["compressed"], out)
    before = (out / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    with pytest.raises(OSError, match=r"cannot write .*ck: .*StorageFull"):
        save_compressed(load_compressed(paths["compressed"]), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in paths["tmp"].iterdir() if p.name.startswith(".ck")) == []


@pytest.mark.parametrize("batch, message", [
    (torch.full((2, 16), 100000), r"calibration batch 1: token id 100000 is outside the model's vocabulary"),
    (torch.zeros(1, 65, dtype=torch.long), r"calibration batch 1: 65 tokens, longer than the model's context \(64\)"),
    (torch.zeros(2, 8), r"calibration batch 1: input ids must be a \[batch, tokens\] integer tensor"),
], ids=["outside-vocabulary", "past-context", "float-ids"])
def test_bad_calibration_batches_get_one_line_naming_the_batch(batch, message):
    model = make_tiny_gpt2()
    good = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match=message) as caught:
        compress_model(model, LowRankConfig(rank=4, method="whitened"), [good, batch], progress=False)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("option, error, message", [
    ({"device_map": "cuda:7"}, ValueError, r"device_map names 'cuda:7', but this machine has \d+ CUDA device"),
    ({"device_map": "nonsense"}, ValueError, "device_map names 'nonsense', which is not a device"),
    ({"device_map": {"": "cuda:9"}}, ValueError, "cuda:9"),
    ({"device_map": 3.5}, TypeError, "device_map must be None, a device"),
    ({"dtype": "int8"}, ValueError, r"dtype must be None, a float torch.dtype or one of \['bfloat16', 'float16'"),
    ({"dtype": torch.int8}, ValueError, "dtype must be None, a float torch.dtype"),
], ids=["missing-gpu", "not-a-device", "map-missing-gpu", "float-map", "int8-name", "int8-dtype"])
def test_bad_loader_options_get_one_clear_line(paths, option, error, message):
    with pytest.raises(error, match=message) as caught:
        load_compressed(paths["compressed"], **option)
    assert "\n" not in str(caught.value)


def test_dtype_may_be_given_by_name(paths):
    assert load_compressed(paths["compressed"], dtype="float16").transformer.wte.weight.dtype == torch.float16


def test_saving_a_model_on_meta_is_refused_in_one_line(paths):
    loaded = load_compressed(paths["compressed"])
    loaded.transformer.h[0].ln_1.weight = nn.Parameter(torch.empty(64, device="meta"))
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.ln_1\.weight' is on the meta device"):
        save_compressed(loaded, paths["out"])
    assert not paths["out"].exists()


def test_saving_a_loaded_model_does_not_warn_about_offloaded_modules(paths):
    model = load_compressed(paths["compressed"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_compressed(model, paths["out"])
    assert not [w for w in caught if "offloaded" in str(w.message)]


# --- 5. the lock file is removed on SIGTERM and SIGINT ------------------------------------------------------

HOLD_LOCK = """
import sys, time
from triton_lowrank.checkpoint.save_load import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_the_lock_file_is_removed_on_sigterm_and_sigint(tmp_path, signal_name):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert (tmp_path / ".out.lock").exists()
        child.send_signal(getattr(signal, signal_name))
        child.wait(60)
    finally:
        child.kill()
    assert not (tmp_path / ".out.lock").exists(), f"{signal_name} left the lock file"
    with output_lock(out):  # and the next run takes it
        pass


def test_a_failed_demo_run_leaves_what_it_wrote_replaceable(paths):
    out = paths["tmp"] / "demo_out"
    with pytest.raises(RuntimeError), output_folder(out, option="--overwrite"):
        (out / "sweep.json").write_text("[]")
        raise RuntimeError("the run failed halfway")
    with output_folder(out, overwrite=True, option="--overwrite"):
        (out / "demo.json").write_text("{}")
    assert json.loads((out / MANIFEST).read_text())["files"] == {"demo.json": "file", "sweep.json": "file"}
