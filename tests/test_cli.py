"""triton-lowrank CLI: one-line errors with nonzero exits, a compress/eval/generate round trip, the demo."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_gpt2, tiny_tokenizer
from safetensors import safe_open

import triton_lowrank_cli
from triton_lowrank import HybridLinear, LowRankConfig, load_compressed
from triton_lowrank.tools.baselines import compressed_bytes, dense_bytes
from triton_lowrank.tools.generation_bench import GENERATION_MODES
from triton_lowrank_cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GPT-2 with its tokenizer, saved like any local model folder."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = tiny_tokenizer()
    make_tiny_gpt2(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("triton-lowrank: error:") and fragment in lines[0], lines[0]


def test_missing_model_folder(tmp_path, capsys):
    code, _, err = run(["compress", tmp_path / "missing", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "model folder not found")


def test_two_rank_knobs(model_dir, tmp_path, capsys):
    code, _, err = run(["compress", model_dir, tmp_path / "out", "--rank", 4, "--budget", 0.5], capsys)
    assert_one_line_error(code, err, "argument --budget: not allowed with argument --rank")


def test_rank_too_big_fails_before_calibration(model_dir, tmp_path, capsys):
    code, _, err = run(["compress", model_dir, tmp_path / "out", "--rank", 100_000], capsys)  # whitened
    assert_one_line_error(code, err, "out of range")
    assert not (tmp_path / "out").exists()


def test_existing_output_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    code, _, err = run(["compress", model_dir, out, "--rank", 4], capsys)
    assert_one_line_error(code, err, "already exists")
    assert (out / "keep.txt").read_text() == "not ours"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["compress"], "required"),
        (["compress", "a", "b", "--bits", "3"], "invalid choice"),
        (["nonsense"], "invalid choice"),
        (["eval", "/nonexistent/dense", "/nonexistent/compressed"], "model folder not found"),
        (["generate", "/nonexistent/model", "--prompt", "hi"], "model folder not found"),
        (["demo", "--model", "/nonexistent/model", "--quick"], "model folder not found"),
        (["demo", "--budget", "-1", "--quick"], "argument --budget: must be > 0 and finite, got -1"),
        (["compress", "a", "b", "--rank-ratio", "1.5"], "argument --rank-ratio: is the fraction kept, in (0, 1]"),
        (["compress", "a", "b", "--energy", "nan"], "argument --energy: must be finite"),
    ],
)
def test_bad_arguments(argv, fragment, capsys):
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["compress", "model"], ["demo", "--bits", "3"]])
def test_help_and_argument_errors_never_import_torch(argv):
    """`--help` and argument errors answer before the package (torch, transformers: 5-60 s) is imported."""
    code = ("import sys, triton_lowrank_cli\n"
            "try:\n    triton_lowrank_cli.main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'triton_lowrank') if m in sys.modules)\n"
            "print('exit', code, 'imported', heavy, file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, env=env)
    assert result.stderr.strip().splitlines()[-1] == f"exit {0 if '--help' in argv else 2} imported []", result.stderr


def test_every_option_says_what_it_does_and_its_default():
    parser = triton_lowrank_cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action)
            assert action.help, f"{name} {action.dest} has no help text"
            flag = action.nargs == 0
            assert flag or action.required or "default" in text, f"{name} {action.dest}: no default in {text!r}"
    assert triton_lowrank_cli.GENERATION_MODES == GENERATION_MODES


def test_every_option_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    summary = readme[readme.index("## Command line"):readme.index("## Layout")]
    parser = triton_lowrank_cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        assert f"triton-lowrank {name}" in summary
        for action in command._actions:
            for option in action.option_strings:
                assert option in ("-h", "--help") or option in summary, f"{name} {option} is not in the README"


def test_hub_id_without_a_reachable_hub(monkeypatch, capsys):
    monkeypatch.setattr("triton_lowrank.tools.cli.hub_reachable", lambda timeout=3.0: False)  # never touch the network
    code, _, err = run(["generate", "someorg/no-such-model", "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, "not reachable")


def test_autotune_without_gpu_is_one_line(model_dir, capsys):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("has a GPU")
    code, _, err = run(["autotune", model_dir], capsys)
    assert_one_line_error(code, err, "CUDA")


def test_compress_eval_generate_round_trip(model_dir, tmp_path, capsys):
    out = tmp_path / "compressed"
    code, stdout, _ = run(["compress", model_dir, out, "--rank-ratio", 0.5, "--method", "svd"], capsys)
    assert code == 0 and "8 layers" in stdout and (out / "config.json").is_file()
    code, stdout, _ = run(["eval", model_dir, out, "--samples", 2, "--seq-len", 16], capsys)
    assert code == 0 and "top1_agreement" in stdout and "kl" in stdout
    code, stdout, _ = run(["generate", out, "--prompt", "To be", "--max-new-tokens", 3], capsys)
    assert code == 0 and stdout.startswith("To be")


def check_demo(argv, out, capsys, saved_dtype="float32"):
    code, stdout, err = run([*argv, "--out", out, "--quick"], capsys)
    assert code == 0, err
    assert "warning" not in err  # it calibrates as much as the package recommends
    result = json.loads((out / "demo.json").read_text())
    assert {"quality", "speed", "samples", "layer_weight_bytes", "sweep", "checkpoint_bytes"} <= set(result)
    assert result["layer_weight_bytes"]["compressed"] <= 0.5 * result["layer_weight_bytes"]["dense_fp16"]
    check_saved_dtype(out / "model", result, saved_dtype)
    rows = result["sweep"]
    assert [r["method"] for r in rows] == ["whitened", "svd", "rtn", "rtn", "rtn", "gptq", "hybrid", "whitened"]
    check_demo_comparison(rows, stdout)
    assert (out / "sweep.png").is_file() and (out / "model" / "config.json").is_file()
    assert "tokens/s" in stdout and "top-1 agreement" in stdout and "CPU path" in stdout
    assert "thread(s)" in stdout  # the speed line says at how many threads both models were timed


def check_saved_dtype(folder, result, saved_dtype):
    """Saved in the model's own dtype (scales stay float32), and said so next to the bytes."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = [k for k in f.keys() if "scale" not in k and not k.endswith(("down", "up_t"))]  # noqa: SIM118
        floats = {f.get_slice(k).get_dtype() for k in names}
    assert floats == {{"float32": "F32", "float16": "F16"}[saved_dtype]}
    assert result["saved_dtype"] == saved_dtype
    assert result["checkpoint_bytes"]["compressed"] < result["checkpoint_bytes"]["dense"]


def check_demo_comparison(rows, stdout):
    """The hybrid beside the pure low-rank format at (about) its bytes and the RTN/GPTQ baselines, in the table."""
    by_label = {r["label"]: r for r in rows}
    hybrid = next(r for r in rows if r["method"] == "hybrid")
    assert hybrid["base_bits"] == 4 and hybrid["rank"] == 16 and hybrid["bits"] == 8
    lowrank = rows[-1]  # the pure low-rank format again, its budget = the hybrid's bytes
    assert lowrank["budget"] == pytest.approx(hybrid["bytes_fraction"])
    assert 0.8 * hybrid["weight_bytes"] < lowrank["weight_bytes"] <= hybrid["weight_bytes"]
    g = hybrid["base_group_size"]
    rtn4, gptq4 = by_label[f"RTN int4 g{g}"], by_label[f"GPTQ int4 g{g}"]
    assert rtn4["weight_bytes"] == gptq4["weight_bytes"]
    if g == 128:  # int3 g64 is smaller than int4 g128 (at small groups the scales and zeros outweigh the bit)
        assert by_label["RTN int3 g64"]["weight_bytes"] < rtn4["weight_bytes"]
    assert rtn4["weight_bytes"] < hybrid["weight_bytes"] < by_label["RTN int8"]["weight_bytes"]
    table = stdout[stdout.index("quality against weight bytes"):]
    assert all(r["label"] in table for r in rows)


def test_demo_quick_on_a_local_model(model_dir, tmp_path, capsys):
    check_demo(["demo", "--model", model_dir, "--group-size", 32], tmp_path / "demo", capsys)


def test_demo_quick_on_the_embedded_model(tmp_path, capsys):
    from triton_lowrank.embedded import embedded_model_path

    try:
        embedded_model_path()
    except FileNotFoundError:
        pytest.skip("the embedded checkpoint is not trained yet")
    check_demo(["demo"], tmp_path / "demo", capsys, saved_dtype="float16")


def test_demo_without_the_sweep(model_dir, tmp_path, capsys):
    code, stdout, err = run(["demo", "--model", model_dir, "--group-size", 32, "--out", tmp_path, "--quick",
                             "--no-sweep"], capsys)
    assert code == 0 and "warning" not in err, err
    result = json.loads((tmp_path / "demo.json").read_text())
    assert len(result["sweep"]) == 1 and not (tmp_path / "sweep.png").exists()
    assert "quality against weight bytes" not in stdout and "tokens/s" in stdout
    assert "-> lowrank format " in stdout and "(int8 " in stdout and "float32 embeddings, norms and biases" in stdout


def test_overwrite_replaces_only_an_earlier_checkpoint(model_dir, tmp_path, capsys, monkeypatch):
    """The issue's data loss: `compress MODEL . --overwrite` in a folder with notes.txt and src/ replaced it all."""
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    code, _, err = run(["compress", model_dir, ".", "--rank", 4, "--method", "svd", "--overwrite"], capsys)
    assert_one_line_error(code, err, "it is not a triton_lowrank checkpoint (it holds notes.txt, src/)")
    assert (work / "notes.txt").read_text() == "mine" and (work / "src").is_dir()
    out = tmp_path / "out"
    for rank in (4, 8):  # the second run replaces the first checkpoint
        code, _, err = run(["compress", model_dir, out, "--rank", rank, "--method", "svd", "--overwrite"], capsys)
        assert code == 0, err
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert {spec["rank"] for spec in layers.values()} == {8}


def test_an_interrupted_save_is_recovered_and_said_in_one_line(model_dir, tmp_path, capsys):
    """A kill between the swap's renames left OUT missing, the old checkpoint parked and the new one half-written."""
    out = tmp_path / "out"
    code, _, err = run(["compress", model_dir, out, "--rank", 4, "--method", "svd"], capsys)
    assert code == 0, err
    out.rename(tmp_path / ".out.old-abcd1234")
    (tmp_path / ".out.tmp-wxyz5678").mkdir()
    (tmp_path / ".out.tmp-wxyz5678" / "model.safetensors").write_bytes(b"half")
    for name in (".out.old-abcd1234", ".out.tmp-wxyz5678"):  # the marker a save writes before it can be killed
        (tmp_path / name / ".triton_lowrank-leftover").write_text(json.dumps({"leftover": name}))
    code, _, err = run(["compress", model_dir, out, "--rank", 4, "--method", "svd"], capsys)
    warning, error = err.strip().splitlines()
    assert warning.startswith("triton-lowrank: warning:") and "restored out from .out.old-abcd1234" in warning
    assert "removed 1 leftover folder(s) of an interrupted save: .out.tmp-wxyz5678" in warning
    assert code == 1 and "out already exists and is not empty; pass --overwrite" in error  # the restored one is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").is_file()


def test_compress_hybrid_with_a_budget(model_dir, tmp_path, capsys):
    hybrid = ["--base-bits", 4, "--base-group-size", 16, "--bits", 8, "--calib-samples", 2, "--seq-len", 16]
    code, out, err = run(["compress", model_dir, tmp_path / "out", "--budget", 0.5, *hybrid], capsys)
    assert code == 0, err
    loaded = load_compressed(tmp_path / "out")
    layers = [m for m in loaded.modules() if isinstance(m, HybridLinear)]
    assert len(layers) == 8 and len({m.rank for m in layers}) > 1  # ranks allocated across layers
    fp16 = dense_bytes(make_tiny_gpt2(vocab_size=loaded.config.vocab_size), LowRankConfig(budget=0.5))
    assert 0.45 * fp16 < compressed_bytes(loaded) <= 0.5 * fp16
    assert "compressed layers (hybrid format): " in out and "(uint8 " in out and "float32 " in out
    assert f"of their float16 dense weights ({fp16:,} bytes)" in out
    code, _, err = run(["compress", model_dir, tmp_path / "small", "--budget", 0.3, *hybrid], capsys)
    assert_one_line_error(code, err, "use budget >= 0.3")
    assert not (tmp_path / "small").exists()
    code, _, err = run(["compress", model_dir, tmp_path / "energy", "--energy", 0.9, *hybrid], capsys)
    assert_one_line_error(code, err, "energy is not supported for the hybrid format")


def test_the_entry_point_limits_are_the_library_limits():
    import triton_lowrank_cli as entry
    from triton_lowrank.core import safe_io

    assert (entry.MAX_TOKENS, entry.MAX_SAMPLES, entry.MAX_NEW_TOKENS) == (
        safe_io.MAX_TOKENS, safe_io.MAX_SAMPLES, safe_io.MAX_NEW_TOKENS)
