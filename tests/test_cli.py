"""triton-lowrank CLI: one-line errors with nonzero exits, a compress/eval/generate round trip, the demo."""

import json

import pytest
from conftest import make_tiny_gpt2, tiny_tokenizer

from triton_lowrank import HybridLinear, LowRankConfig, load_compressed
from triton_lowrank.tools.baselines import compressed_bytes, dense_bytes
from triton_lowrank.tools.cli import main


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
    assert_one_line_error(code, err, "exactly one of rank, rank_ratio, energy, budget")


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
        (["demo", "--budget", "-1", "--quick"], "budget must be > 0"),
    ],
)
def test_bad_arguments(argv, fragment, capsys):
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, fragment)


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


def check_demo(argv, out, capsys):
    code, stdout, err = run([*argv, "--out", out, "--quick"], capsys)
    assert code == 0, err
    result = json.loads((out / "demo.json").read_text())
    assert {"quality", "speed", "samples", "layer_weight_bytes", "sweep"} <= set(result)
    assert result["layer_weight_bytes"]["compressed"] <= 0.5 * result["layer_weight_bytes"]["dense_fp16"]
    rows = result["sweep"]
    assert [r["method"] for r in rows] == ["whitened", "svd", "rtn", "rtn", "rtn", "gptq", "hybrid", "whitened"]
    check_demo_comparison(rows, stdout)
    assert (out / "sweep.png").is_file() and (out / "model" / "config.json").is_file()
    assert "tokens/s" in stdout and "top-1 agreement" in stdout and "reference path" in stdout


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
    check_demo(["demo"], tmp_path / "demo", capsys)


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
    assert f"of the fp16 dense weights ({fp16:,})" in out
    code, _, err = run(["compress", model_dir, tmp_path / "small", "--budget", 0.3, *hybrid], capsys)
    assert_one_line_error(code, err, "use budget >= 0.3")
    assert not (tmp_path / "small").exists()
    code, _, err = run(["compress", model_dir, tmp_path / "energy", "--energy", 0.9, *hybrid], capsys)
    assert_one_line_error(code, err, "energy is not supported for the hybrid format")
