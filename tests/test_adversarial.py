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
import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_gpt2, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli import run
from torch import nn
from triton_lowrank.kernels.configs import Problem

from triton_lowrank import LowRankConfig, compress_model, load_compressed, save_compressed
from triton_lowrank.core.autotune import Autotuner, problem_key
from triton_lowrank.core.factorize import whitening_cholesky

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
