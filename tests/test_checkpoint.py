"""save_compressed / load_compressed: round trips, no dense weights, atomic and crash-safe writes that
replace only a checkpoint, and checkpoints verified as a whole (config, tensor set, bytes, scales) by both loaders."""

import fcntl
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_gpt2, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import triton_lowrank.checkpoint.save_load as checkpoint
from triton_lowrank import (
    CheckpointError,
    LowRankConfig,
    TritonLowRankConfig,
    compress_model,
    load_compressed,
    save_compressed,
)
from triton_lowrank.checkpoint.format import RECORD_KEY, checksum_metadata, covered_config
from triton_lowrank.checkpoint.save_load import output_lock, recover_interrupted_save
from triton_lowrank.formats.lowrank.layer import LowRankLinear

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
    assert config["quant_method"] == "triton_lowrank" and config["format_version"] == 2
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


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_existing_folder_is_refused_unless_overwrite(tmp_path, model8):
    out = tmp_path / "out"
    out.mkdir()
    save_compressed(model8, out)  # an empty folder is fine
    with pytest.raises(FileExistsError, match=f"{out} already exists.*pass overwrite=True"):
        save_compressed(model8, out)
    (out / "model.safetensors").write_bytes(b"stale")
    save_compressed(model8, out, overwrite=True)  # an earlier checkpoint is replaced
    load_compressed(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder or lock left behind


def test_overwrite_replaces_only_a_checkpoint(tmp_path, model8):
    """The issue's data loss: `compress MODEL . --overwrite` in a folder with notes.txt and src/ replaced it all."""
    out = tmp_path / "work"
    (out / "src").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a triton_lowrank checkpoint \(it holds notes\.txt, src/\)"):
        save_compressed(model8, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "src").is_dir()
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(FileExistsError, match="not a triton_lowrank checkpoint"):
        save_compressed(model8, out, overwrite=True)  # someone else's quantized model is not ours to delete
    with pytest.raises(FileExistsError, match="is a file"):
        save_compressed(model8, out / "notes.txt", overwrite=True)
    with pytest.raises(NotADirectoryError, match="notes.txt is a file"):
        save_compressed(model8, out / "notes.txt" / "deeper")


def test_unwritable_parent_is_refused_before_writing(tmp_path, model8, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # root ignores chmod
    with pytest.raises(PermissionError, match=f"{tmp_path} is not writable"):
        save_compressed(model8, tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []


def test_plain_module_gets_a_clear_message(tmp_path):
    with pytest.raises(TypeError, match="needs a transformers model.*got Sequential"):
        save_compressed(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "out")


def test_failed_overwrite_keeps_the_old_folder(tmp_path, monkeypatch, model8):
    out = save_compressed(model8, tmp_path / "out")
    before = folder_digest(out)
    model = model8

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, out, overwrite=True)
    assert folder_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("failing_rename", [1, 2])
def test_a_failing_rename_keeps_the_old_folder(tmp_path, monkeypatch, model8, failing_rename):
    """Rename 1 parks OUT as .OUT.old-*, rename 2 moves the new folder in (then OUT is put back)."""
    out = save_compressed(model8, tmp_path / "out")
    before = folder_digest(out)
    calls, rename = [], os.rename

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == failing_rename:
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="rename failed"):
        save_compressed(model8, out, overwrite=True)
    assert folder_digest(out) == before and leftovers(tmp_path) == []


# --- a save killed at each step: the next run restores or removes what it left, and says so --------------

def _exit_at(step: str) -> None:
    """In a forked child: make the save die (os._exit: no cleanup, no finally) at `step`."""
    die = lambda *args, **kwargs: os._exit(9)
    rename, remove = os.rename, checkpoint._remove_leftover
    if step == "writing":  # the new checkpoint is (partly) written in .OUT.tmp-*
        checkpoint.verify_checkpoint = die
    elif step in ("before_park", "parked"):  # killed before rename 1, or between renames 1 and 2
        calls = []

        def rename_then_die(src, dst):
            calls.append(src)
            if len(calls) == (1 if step == "before_park" else 2):
                os._exit(9)
            rename(src, dst)

        os.rename = rename_then_die
    elif step == "swapped":  # the new one is in place, the old one not yet deleted
        checkpoint._remove_leftover = lambda p, *a, **k: os._exit(9) if ".old-" in str(p) else remove(p, *a, **k)
    elif step == "deleting":  # killed halfway through deleting the old one (its marker goes last)
        def half_then_die(path, *args, **kwargs):
            if ".old-" in str(path):
                (Path(path) / "model.safetensors").unlink()
                (Path(path) / "config.json").unlink()
                os._exit(9)
            remove(path, *args, **kwargs)

        checkpoint._remove_leftover = half_then_die


def save_killed_at(step: str, model, out: Path) -> None:
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            _exit_at(step)
            save_compressed(model, out, overwrite=True)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail(f"the save killed at {step} hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 9, "the kill point was never reached"


KILL_STEPS = {  # step: (which checkpoint OUT holds after recovery, what the warning says)
    "writing": ("old", "removed 1 leftover"),
    "before_park": ("old", "removed 1 leftover"),
    "parked": ("old", "restored out from .out.old-"),
    "swapped": ("new", "removed 1 leftover"),
    "deleting": ("new", "removed 1 leftover"),
}


@pytest.mark.parametrize("step", list(KILL_STEPS))
def test_a_save_killed_at_each_step_is_recovered(tmp_path, model8, step):
    old_model = make_tiny_gpt2()
    compress_model(old_model, LowRankConfig(rank=8), progress=False)
    out = save_compressed(old_model, tmp_path / "out")
    old, expected_state = folder_digest(out), KILL_STEPS[step][0]
    save_killed_at(step, model8, out)
    assert leftovers(tmp_path), "a kill leaves something behind"
    with output_lock(out), pytest.warns(RuntimeWarning, match=KILL_STEPS[step][1]):
        recover_interrupted_save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left, lock file included
    assert (folder_digest(out) == old) == (expected_state == "old")
    loaded = load_compressed(out)  # a complete checkpoint either way
    assert loaded.transformer.h[0].attn.c_attn.rank == (8 if expected_state == "old" else 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        save_compressed(model8, out, overwrite=True)  # nothing left to recover: no warning


def test_the_next_save_recovers_by_itself(tmp_path, model8):
    out = save_compressed(model8, tmp_path / "out")
    save_killed_at("parked", model8, out)
    assert not out.exists()
    with pytest.warns(RuntimeWarning, match="restored out.*removed 1 leftover"):
        save_compressed(model8, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_compressed(out)


def test_a_second_run_to_the_same_folder_fails_at_once(tmp_path, model8):
    """Another process holds the lock (an flock on another open file conflicts even in one process)."""
    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    try:
        with pytest.raises(FileExistsError, match=r"being written by another run \(process 4242"):
            save_compressed(model8, tmp_path / "out")
    finally:
        os.close(fd)
    assert not (tmp_path / "out").exists()
    save_compressed(model8, tmp_path / "out")  # the lock was released: now it works


def test_tokenizer_is_saved(tmp_path, model8):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    folder = save_compressed(model8, tmp_path / "out", tokenizer=tokenizer)
    assert (folder / "tokenizer.json").is_file()


def test_broken_tokenizer_files_are_not_copied(tmp_path):
    """A source folder whose tokenizer files do not make a tokenizer (here: only its config) gets none copied."""
    source = tmp_path / "dense"
    make_tiny_gpt2(vocab_size=len(tiny_tokenizer())).save_pretrained(source)
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    shutil.copy(tmp_path / "tok" / "tokenizer_config.json", source)
    model = AutoModelForCausalLM.from_pretrained(source)
    compress_model(model, LowRankConfig(rank=8), progress=False)
    with pytest.warns(UserWarning, match=f"tokenizer files of {source} were not copied"):
        out = save_compressed(model, tmp_path / "out")
    assert not (out / "tokenizer_config.json").exists()
    shutil.copy(tmp_path / "tok" / "tokenizer.json", source)  # now complete: copied
    assert (save_compressed(model, tmp_path / "out", overwrite=True) / "tokenizer.json").is_file()


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


def rewrite(path: Path, change, recompute: bool = False, metadata_change=None) -> None:
    """Change the tensors of a checkpoint file; recompute=True also recomputes its checksums and record, as a
    careful forger (or a tool that re-saves) would, so only the checks against the model can catch it."""
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not iterable)
    change(tensors)
    if recompute:
        config = AutoConfig.from_pretrained(path.parent)
        q = config.quantization_config
        layers = TritonLowRankConfig.from_dict(q if isinstance(q, dict) else q.to_dict()).layers
        config_json = json.loads((path.parent / "config.json").read_text())
        metadata = checksum_metadata(tensors, covered_config(layers, config.tie_word_embeddings), config_json)
    if metadata_change is not None:
        metadata_change(metadata)
    save_file(tensors, path, metadata={"format": "pt"} | {k: v for k, v in metadata.items() if k != "format"})


def edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def edit_header(path: Path, change) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])


def logits_of(model):
    with torch.no_grad():
        return model(PROMPT).logits


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
    # With its checksum record the edit is refused as an edit; without checking the record (verify=False,
    # or a file from before the record) the layer's shapes still name the tensor.
    edit_config(copy_of, lambda c: c["quantization_config"]["layers"]["transformer.h.1.attn.c_attn"].update(rank=12))
    assert_both_fail(copy_of, "config.json does not match the checksum record")
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.1\.attn\.c_attn\.down' has shape \[16, 64\], "
                                              r"expected \[12, 64\]"):
        load_compressed(copy_of, verify=False)


CONFIG_EDITS = {
    # the silent one: one layer's bias dropped, logits off by up to 0.31
    "bias dropped": lambda c: c["quantization_config"]["layers"]["transformer.h.0.mlp.c_fc"].update(bias=False),
    "layer entry removed": lambda c: c["quantization_config"]["layers"].pop("transformer.h.0.attn.c_attn"),
    "head untied": lambda c: c.update(tie_word_embeddings=False),
    "bits changed": lambda c: c["quantization_config"]["layers"]["transformer.h.0.mlp.c_fc"].update(bits=None),
}


@pytest.mark.parametrize("edit", list(CONFIG_EDITS))
def test_config_edits_are_caught_by_the_checksum_record(copy_of, edit):
    edit_config(copy_of, CONFIG_EDITS[edit])
    assert_both_fail(copy_of, "config.json does not match the checksum record")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.pop("transformer.h.0.ln_1.weight"), r"'transformer\.h\.0\.ln_1\.weight' is missing"),
        (lambda t: t.pop("transformer.wte.weight"), r"'(transformer\.wte|lm_head)\.weight' is missing"),
        (lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}), "would overwrite"),
        (lambda t: t.update({"extra.tensor": torch.ones(3)}), "'extra.tensor' .*no parameter or buffer"),
        (lambda t: t["transformer.h.1.mlp.c_proj.up_t_scale"].__setitem__(3, float("nan")),
         r"'transformer\.h\.1\.mlp\.c_proj\.up_t_scale'.*1 scale\(s\) are NaN or infinite"),
        (lambda t: t["transformer.h.0.attn.c_attn.down_scale"].__setitem__(0, float("inf")), "NaN or infinite"),
    ],
    ids=["ln_1 deleted", "wte deleted", "tied alias added", "unknown tensor added", "nan scale", "inf scale"],
)
def test_tensor_edits_with_recomputed_checksums_are_refused_by_both_loaders(copy_of, change, match):
    """Through from_pretrained too: a missing tensor would be random-initialised, an extra one skipped or
    written over a tied weight, behind only transformers' load report."""
    rewrite(copy_of / "model.safetensors", change, recompute=True)
    assert_both_fail(copy_of, match)


def as_version_1_without_record(folder):
    """What a version 1 file saved before the record existed looks like (version 2 files all have one)."""
    rewrite(folder / "model.safetensors", lambda t: None, metadata_change=lambda m: m.pop(RECORD_KEY))
    edit_config(folder, lambda c: c["quantization_config"].update(format_version=1))


def test_untied_head_is_caught_against_the_model_without_a_record(copy_of):
    """A file from before the record: flipping tie_word_embeddings leaves lm_head.weight missing, and says so."""
    as_version_1_without_record(copy_of)
    edit_config(copy_of, CONFIG_EDITS["head untied"])
    assert_both_fail(copy_of, r"'lm_head\.weight' is missing")


def test_a_file_without_checksums_is_refused_unless_verify_false(copy_of, saved):
    rewrite(copy_of / "model.safetensors", lambda t: None, metadata_change=lambda m: m.clear())
    assert_both_fail(copy_of, r"model\.safetensors has no checksums .*verify=False")
    with pytest.warns(UserWarning, match="without checking its checksums"):
        model = load_compressed(copy_of, verify=False)
    assert torch.equal(logits_of(model), saved[8][1])


def test_a_version_2_file_without_its_record_is_refused(copy_of):
    """Every version 2 writer wrote the record (it came first): one without it had it stripped."""
    rewrite(copy_of / "model.safetensors", lambda t: None, metadata_change=lambda m: m.pop(RECORD_KEY))
    assert_both_fail(copy_of, r"no 'triton_lowrank\.record' record, which every format version 2 file carries")


def test_a_file_from_before_the_record_loads_with_a_warning(copy_of, saved):
    as_version_1_without_record(copy_of)
    for load in (load_compressed, AutoModelForCausalLM.from_pretrained):
        with pytest.warns(UserWarning, match="older triton_lowrank.*save it again"):
            model = load(copy_of)
        assert torch.equal(logits_of(model), saved[8][1])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h: h["transformer.h.0.attn.c_attn.down"].pop("data_offsets"),
         r"'transformer\.h\.0\.attn\.c_attn\.down'.*not {dtype, shape, data_offsets}"),
        (lambda h: h["transformer.h.0.attn.c_attn.down"].update(data_offsets="x"), "data_offsets is not"),
        (lambda h: h["transformer.h.0.attn.c_attn.down"].update(shape=[-1]), "shape is not a list of sizes"),
        (lambda h: h["transformer.h.0.attn.c_attn.down"].update(shape=[3, 3]), r"bytes for shape \[3, 3\]"),
        (lambda h: h.update(__metadata__=[1]), "__metadata__ is not a map"),
    ],
    ids=["no data_offsets", "offsets garbled", "negative size", "size mismatch", "metadata garbled"],
)
def test_garbled_header_is_a_checkpoint_error(copy_of, change, match):
    edit_header(copy_of / "model.safetensors", change)
    assert_both_fail(copy_of, match)


def test_unknown_format_version_fails_naming_the_field(copy_of):
    config_path = copy_of / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["format_version"] = 99
    config_path.write_text(json.dumps(config))
    assert_both_fail(copy_of, "format_version")


def test_missing_uncompressed_tensor_fails_in_both_loaders(copy_of):
    # transformers itself only warns and random-initialises a missing dense tensor; our quantizer refuses too.
    rewrite(copy_of / "model.safetensors", lambda t: t.pop("transformer.ln_f.weight"))
    assert_both_fail(copy_of, r"'transformer\.ln_f\.weight' is missing")


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


def test_offloaded_tensors_are_hashed_where_they_are_loaded_from_never_null():
    from triton_lowrank.checkpoint.format import tensor_checksums

    stored = {"b": torch.arange(3.0)}
    sums = tensor_checksums({"a": torch.arange(4.0), "b": torch.empty(3, device="meta")}, stored.__getitem__)
    assert sums["b"] == tensor_checksums(stored)["b"] and len(sums["a"]) == 64
    with pytest.raises(ValueError, match="'b' is on the meta device and not offloaded anywhere"):
        tensor_checksums({"b": torch.empty(3, device="meta")})
