"""save_compressed / load_compressed: round trips, no dense weights, atomic writes, checkpoint validation."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_gpt2
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from triton_lowrank import CheckpointError, LowRankConfig, compress_model, load_compressed, save_compressed
from triton_lowrank.layers import LowRankLinear

PROMPT = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 8, 16, 32, 64, 3, 7]])
BITS = {None: {}, 8: {}, 4: {"group_size": 32}}


def compressed_gpt2(bits=8, **config):
    model = make_tiny_gpt2()
    compress_model(model, LowRankConfig(rank=16, bits=bits, **{**BITS[bits], **config}), progress=False)
    return model


@pytest.fixture(scope="module")
def model8():
    """One compressed model for the tests that only need something to save (compressing costs most of the time)."""
    return compressed_gpt2(8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{bits: (folder, logits of the in-memory compressed model)} for the tiny GPT-2."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for bits in BITS:
        model = compressed_gpt2(bits)
        with torch.no_grad():
            out[bits] = (save_compressed(model, root / f"bits{bits}"), model(PROMPT).logits)
    return out


def both_loaders(folder):
    return {"load_compressed": load_compressed(folder), "from_pretrained": AutoModelForCausalLM.from_pretrained(folder)}


@pytest.mark.parametrize("bits", list(BITS))
def test_round_trip_gives_identical_logits(saved, bits):
    folder, expected = saved[bits]
    for how, model in both_loaders(folder).items():
        with torch.no_grad():
            assert torch.equal(model(PROMPT).logits, expected), how
        layer = model.transformer.h[0].attn.c_attn
        assert isinstance(layer, LowRankLinear) and layer.bits == bits, how


def test_checkpoint_holds_factors_not_dense_weights(saved):
    folder, _ = saved[8]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "triton_lowrank" and config["format_version"] == 1
    assert config["bits"] == 8 and config["layers"]["transformer.h.0.attn.c_attn"]["kind"] == "Conv1D"
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("transformer.h.0.mlp.c_fc.down").dtype == torch.int8
        assert f.get_tensor("transformer.h.0.mlp.c_fc.down_scale").dtype == torch.float32
    for layer in config["layers"]:
        assert f"{layer}.weight" not in keys and f"{layer}.down" in keys
    assert (folder / "generation_config.json").is_file()
    for model in both_loaders(folder).values():
        assert not any(key.endswith("c_attn.weight") for key in model.state_dict())


def test_dtype_applies_to_floats_only(saved):
    folder, _ = saved[4]
    half = torch.float16
    for model in (load_compressed(folder, dtype=half), AutoModelForCausalLM.from_pretrained(folder, dtype=half)):
        layer = model.transformer.h[1].mlp.c_proj
        assert (layer.down.dtype, layer.down_scale.dtype, layer.bias.dtype) == (torch.uint8, torch.float32, half)
        assert model.transformer.wte.weight.dtype == torch.float16


def test_load_compressed_with_auto_device_map(saved):
    folder, expected = saved[8]
    model = load_compressed(folder, device_map="auto", max_memory={"cpu": "1GiB"})
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, expected)


def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_source_folder_is_never_modified(tmp_path):
    source = tmp_path / "dense"
    make_tiny_gpt2().save_pretrained(source)
    before = folder_digest(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    compress_model(model, LowRankConfig(rank=8), progress=False)
    for inside_or_same in (source, source / "compressed", tmp_path):
        with pytest.raises(ValueError, match="loaded from"):
            save_compressed(model, inside_or_same, overwrite=True)
    save_compressed(model, tmp_path / "out")
    assert folder_digest(source) == before


def test_existing_folder_is_refused_unless_overwrite(tmp_path, model8):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    model = model8
    with pytest.raises(FileExistsError, match=str(out)):
        save_compressed(model, out)
    save_compressed(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_failed_overwrite_keeps_the_old_folder(tmp_path, monkeypatch, model8):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    model = model8

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tokenizer_is_saved(tmp_path, model8):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    folder = save_compressed(model8, tmp_path / "out", tokenizer=tokenizer)
    assert (folder / "tokenizer.json").is_file()


# --- validation: every failure names the tensor or field, in both load paths -----------------------------


@pytest.fixture
def copy_of(saved, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved[8][0], folder)
    return folder


def assert_both_fail(folder, match):
    with pytest.raises(CheckpointError, match=match):
        load_compressed(folder)
    with pytest.raises(CheckpointError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def data_range(path: Path, name: str) -> tuple[int, int]:
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    begin, end = json.loads(path.read_bytes()[8 : 8 + header_len])[name]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def rewrite(path: Path, change) -> None:
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not iterable)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"} | {k: v for k, v in metadata.items() if k != "format"})


def test_truncated_file_fails_naming_the_tensor(copy_of):
    path = copy_of / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_both_fail(copy_of, r"tensor '[\w.]+' .*truncated")


def test_tampered_bytes_fail_naming_the_tensor(copy_of):
    path = copy_of / "model.safetensors"
    begin, _ = data_range(path, "transformer.h.1.mlp.c_fc.up_t")
    data = bytearray(path.read_bytes())
    data[begin] ^= 0x01
    path.write_bytes(bytes(data))
    assert_both_fail(copy_of, r"'transformer\.h\.1\.mlp\.c_fc\.up_t'.*checksum")


def test_missing_tensor_fails_naming_it(copy_of):
    rewrite(copy_of / "model.safetensors", lambda t: t.pop("transformer.h.0.attn.c_proj.down_scale"))
    assert_both_fail(copy_of, r"'transformer\.h\.0\.attn\.c_proj\.down_scale' is missing")


def test_shape_mismatch_fails_naming_the_tensor(copy_of):
    config_path = copy_of / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["layers"]["transformer.h.1.attn.c_attn"]["rank"] = 12
    config_path.write_text(json.dumps(config))
    assert_both_fail(copy_of, r"'transformer\.h\.1\.attn\.c_attn\.down' has shape \[16, 64\], expected \[12, 64\]")


def test_unknown_format_version_fails_naming_the_field(copy_of):
    config_path = copy_of / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["format_version"] = 99
    config_path.write_text(json.dumps(config))
    assert_both_fail(copy_of, "format_version")


def test_missing_uncompressed_tensor_fails_in_load_compressed(copy_of):
    # transformers itself only warns and random-initialises a missing dense tensor; load_compressed refuses.
    rewrite(copy_of / "model.safetensors", lambda t: t.pop("transformer.ln_f.weight"))
    with pytest.raises(CheckpointError, match=r"'transformer\.ln_f\.weight' is missing"):
        load_compressed(copy_of)


def test_saved_folder_gets_umask_permissions_not_tempdir_ones(saved):
    folder, _ = saved[8]
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in folder.iterdir())


def test_no_dense_weight_is_materialised_while_loading(saved, monkeypatch):
    """Every Conv1D built while loading (the dense layers later swapped for factors) stays on meta."""
    from transformers.pytorch_utils import Conv1D

    devices = []
    original_init = Conv1D.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        devices.append(self.weight.device.type)

    monkeypatch.setattr(Conv1D, "__init__", recording_init)
    folder, _ = saved[8]
    for load in (load_compressed, AutoModelForCausalLM.from_pretrained):
        devices.clear()
        load(folder)
        assert devices and set(devices) == {"meta"}, f"{load.__name__} built dense weights on {set(devices)}"


def test_offloaded_tensors_are_recorded_as_unchecked_not_missing():
    from triton_lowrank.checkpoint_format import tensor_checksums

    sums = tensor_checksums({"a": torch.arange(4.0), "b": torch.empty(3, device="meta")})
    assert len(sums["a"]) == 64 and "b" in sums and sums["b"] is None
