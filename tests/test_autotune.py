"""Autotune selection and cache logic, with an injected timer (no GPU benchmarking here)."""

import dataclasses
import json

import pytest
import torch
from torch import nn
from triton_lowrank.kernels.configs import Problem, TileConfig, m_bucket, smem_bytes

from triton_lowrank.compression.pretune import pretune_model
from triton_lowrank.core.autotune import Autotuner, candidate_configs, default_config, problem_key, resolve_mode
from triton_lowrank.formats.lowrank.layer import LowRankLinear

PROBLEM = Problem(m=1, n=6400, k=1600, rank=400, bits=8, group_size=0)


class FakeTimer:
    """Deterministic timings: the candidate whose repr sorts last is fastest; counts calls."""

    def __init__(self, fail_path=None):
        self.calls = 0
        self.fail_path = fail_path

    def __call__(self, problem, config):
        self.calls += 1
        if config.path == self.fail_path:
            raise RuntimeError("out of resources")
        return 1.0 / (1 + sorted(map(repr, candidate_configs(problem, "fast"))).index(repr(config)))


def make_tuner(tmp_path, **kwargs):
    kwargs.setdefault("gpu_name", "NVIDIA H100 80GB HBM3")
    kwargs.setdefault("triton_version", "3.6.0")
    kwargs.setdefault("mode", "fast")
    kwargs.setdefault("progress", False)
    return Autotuner(cache_dir=tmp_path, **kwargs)


def expected_winner(problem):
    return max(candidate_configs(problem, "fast"), key=repr)


def test_tune_writes_cache_and_fresh_tuner_reloads(tmp_path):
    timer = FakeTimer()
    best = make_tuner(tmp_path, timer=timer).tune(PROBLEM, "float16")
    assert best == expected_winner(PROBLEM) and timer.calls == len(candidate_configs(PROBLEM, "fast"))
    data = json.loads((tmp_path / "autotune.json").read_text())
    assert "NVIDIA H100 80GB HBM3|triton-3.6.0" in data["sections"]

    reloaded = make_tuner(tmp_path, timer=lambda p, c: pytest.fail("re-benchmarked a cached key"))
    assert reloaded.lookup(PROBLEM, "float16") == best
    assert reloaded.config_for(PROBLEM, "float16") == best


def test_corrupt_cache_warns_and_is_retuned(tmp_path):
    (tmp_path / "autotune.json").write_text('{"version": 1, "sections": {"x": {"k": {"config": {"path": ')
    with pytest.warns(RuntimeWarning, match="corrupt autotune cache"):
        tuner = make_tuner(tmp_path, timer=FakeTimer())
    assert tuner.entries == {}
    with pytest.warns(RuntimeWarning, match="corrupt"):  # save() re-reads the file before merging
        tuner.tune(PROBLEM, "float16")
    assert make_tuner(tmp_path).lookup(PROBLEM, "float16") == expected_winner(PROBLEM)


def test_an_invalid_entry_is_dropped_alone_and_other_gpus_sections_survive(tmp_path):
    make_tuner(tmp_path, gpu_name="NVIDIA H200", timer=FakeTimer()).tune(PROBLEM, "float16")
    data = json.loads((tmp_path / "autotune.json").read_text())
    data["sections"]["g|triton-1"] = {"k": {"config": {"path": "fused", "block_m": 3}}}  # unreadable
    (tmp_path / "autotune.json").write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="dropped 1 unreadable"):
        tuner = make_tuner(tmp_path, gpu_name="g", triton_version="1", timer=FakeTimer())
    assert tuner.entries == {}
    with pytest.warns(RuntimeWarning, match="dropped 1 unreadable"):  # save() re-reads the file before merging
        tuner.tune(PROBLEM, "float16")
    assert make_tuner(tmp_path, gpu_name="NVIDIA H200").lookup(PROBLEM, "float16") == expected_winner(PROBLEM)


@pytest.mark.parametrize("change", ["gpu_name", "triton_version", "bits", "dtype", "m_bucket"])
def test_keys_do_not_collide(tmp_path, change):
    make_tuner(tmp_path, timer=FakeTimer()).tune(PROBLEM, "float16")
    tuner_kwargs, problem, dtype = {}, PROBLEM, "float16"
    if change == "gpu_name":
        tuner_kwargs["gpu_name"] = "NVIDIA H200"
    elif change == "triton_version":
        tuner_kwargs["triton_version"] = "3.9.0"
    elif change == "bits":
        problem = Problem(1, 6400, 1600, 400, 4, 128)
    elif change == "dtype":
        dtype = "bfloat16"
    else:
        problem = Problem(300, 6400, 1600, 400, 8, 0)
    other = make_tuner(tmp_path, **tuner_kwargs)
    assert other.lookup(problem, dtype) is None


def test_sections_coexist_in_one_file(tmp_path):
    make_tuner(tmp_path, timer=FakeTimer()).tune(PROBLEM, "float16")
    make_tuner(tmp_path, gpu_name="NVIDIA H200", timer=FakeTimer()).tune(PROBLEM, "float16")
    sections = json.loads((tmp_path / "autotune.json").read_text())["sections"]
    assert len(sections) == 2


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    tuner = make_tuner(tmp_path, timer=FakeTimer())
    tuner.tune(PROBLEM, "float16")
    before = (tmp_path / "autotune.json").read_text()

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("triton_lowrank.core.autotune.json.dump", broken_dump)
    with pytest.warns(RuntimeWarning, match="cannot write the autotune cache .*disk full"):  # never raises
        tuner.tune(Problem(16, 6400, 1600, 400, 8, 0), "float16")
    assert (tmp_path / "autotune.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autotune.json", "autotune.json.lock"]


def test_ties_resolve_to_the_heuristic(tmp_path):
    tuner = make_tuner(tmp_path, timer=lambda p, c: 1.0)
    assert tuner.tune(PROBLEM, "float16") == default_config(PROBLEM, tuner.num_sms)


def test_failing_candidates_lose_with_a_warning(tmp_path):
    problem = Problem(1, 768, 768, 96, 8, 0)
    with pytest.warns(RuntimeWarning, match="failed"):
        best = make_tuner(tmp_path, timer=FakeTimer(fail_path="decode")).tune(problem, "float16")
    assert best.path == "split"


@pytest.mark.parametrize("m", [1, 16])
def test_fast_candidates_hold_every_path_that_can_win(m):
    """Decode on CUDA cores (M <= 4), decode on tensor cores and split are all timed in "fast" mode."""
    kinds = {(c.path, c.uses_dot) for c in candidate_configs(Problem(m, 6400, 1600, 400, 8, 0), "fast")}
    assert kinds == ({("decode", False)} if m <= 4 else set()) | {("decode", True), ("split", True)}


def test_graph_capture_uses_a_cached_winner_and_never_benchmarks(tmp_path, monkeypatch):
    winner = expected_winner(PROBLEM)
    make_tuner(tmp_path, timer=FakeTimer()).tune(PROBLEM, "float16")
    tuner = make_tuner(tmp_path, timer=lambda p, c: pytest.fail("benchmarked during capture"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuner.config_for(PROBLEM, "float16") == winner != default_config(PROBLEM, tuner.num_sms)
    other = Problem(1, 4096, 1024, 256, 8, 0)  # no winner: the heuristic
    assert tuner.config_for(other, "float16") == default_config(other, tuner.num_sms)


def test_committed_winners_are_used_when_the_user_cache_has_none(tmp_path, monkeypatch):
    shipped = dataclasses.replace(default_config(PROBLEM), split_k=1, num_warps=2)
    folder = tmp_path / "tuned"
    folder.mkdir()
    (folder / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "entries": {
        problem_key(PROBLEM, "float16"): {"config": shipped.to_dict()},
        "r1-n2-k3-int8-g0-float16-m1": {"config": {"path": "fused", "block_m": 1}},  # stale: skipped
    }}))
    monkeypatch.setattr("triton_lowrank.kernels.configs.TUNED_DIR", folder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    tuner = make_tuner(tmp_path / "cache", timer=lambda p, c: pytest.fail("benchmarked"))
    assert tuner.config_for(PROBLEM, "float16") == shipped
    own = TileConfig("split", 16, 64, 64, 64)  # the user's own cache wins over the committed file
    tuner.entries[problem_key(PROBLEM, "float16")] = {"config": own.to_dict(), "ms": 1.0, "mode": "fast"}
    assert tuner.config_for(PROBLEM, "float16") == own
    assert make_tuner(tmp_path / "cache", gpu_name="NVIDIA A100").shipped == {}  # no file: nothing


def test_default_mode_never_benchmarks_or_writes(tmp_path):
    tuner = make_tuner(tmp_path, mode="default", timer=lambda p, c: pytest.fail("benchmarked"))
    assert tuner.config_for(PROBLEM, "float16") == default_config(PROBLEM, tuner.num_sms)
    assert not (tmp_path / "autotune.json").exists()


def test_fast_mode_tunes_on_miss(tmp_path):
    timer = FakeTimer()
    tuner = make_tuner(tmp_path, timer=timer)
    assert tuner.config_for(PROBLEM, "float16") == expected_winner(PROBLEM)
    calls = timer.calls
    tuner.config_for(Problem(1, 6400, 1600, 400, 8, 0), "float16")  # same key: cached
    assert timer.calls == calls


def test_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_LOWRANK_AUTOTUNE", "max")
    assert resolve_mode() == "max" and make_tuner(tmp_path, mode=None).mode == "max"
    assert resolve_mode("fast") == "fast"  # an explicit argument wins over the environment
    monkeypatch.delenv("TRITON_LOWRANK_AUTOTUNE")
    assert resolve_mode() == "default"
    with pytest.raises(ValueError, match="turbo"):
        resolve_mode("turbo")


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_LOWRANK_CACHE_DIR", str(tmp_path / "here"))
    tuner = Autotuner(gpu_name="g", triton_version="t", timer=FakeTimer(), mode="fast", progress=False)
    tuner.tune(PROBLEM, "float16")
    assert (tmp_path / "here" / "autotune.json").exists()


def test_pretune_model_dedupes_and_reuses(tmp_path):
    def layer(i, o, r):
        return LowRankLinear(i, o, r, bits=8, dtype=torch.float16)

    model = nn.Sequential(layer(64, 96, 8), layer(64, 96, 8), layer(96, 64, 8))  # two identical shapes
    timer = FakeTimer()
    tuner = make_tuner(tmp_path, timer=timer)
    summary = pretune_model(model, mode="fast", m_values=(1, 2, 256), tuner=tuner)
    # M buckets are powers of two: 3 buckets x 2 distinct shapes
    assert summary["layers"] == 3 and summary["unique_keys"] == 6 and summary["tuned"] == 6
    again = pretune_model(model, mode="fast", m_values=(1, 2, 256), tuner=make_tuner(tmp_path, timer=timer))
    assert again["tuned"] == 0 and again["cached"] == 6


def test_pretune_model_tunes_the_models_own_activation_dtype(tmp_path):
    # A bf16 model whose layers have no bias: the dtype comes from the model's other float tensors.
    model = nn.Sequential(nn.LayerNorm(64), LowRankLinear(64, 96, 8, bits=8, bias=False)).to(torch.bfloat16)
    summary = pretune_model(model, mode="fast", m_values=(1,), tuner=make_tuner(tmp_path, timer=FakeTimer()))
    assert list(summary["configs"]) and all("bfloat16" in key for key in make_tuner(tmp_path).entries)


# ---- config builders ---------------------------------------------------------------------------
@pytest.mark.parametrize("problem", [
    PROBLEM,
    Problem(1, 11008, 4096, 1024, 8, 0),
    Problem(7, 768, 3072, 96, 4, 128),
    Problem(4096, 6400, 1600, 800, 4, 64),
    Problem(64, 50, 30, 1, None, 0),
])
@pytest.mark.parametrize("mode", ["fast", "max"])
def test_candidates_are_pruned_deduped_and_start_with_default(problem, mode):
    candidates = candidate_configs(problem, mode)
    assert candidates[0] == default_config(problem)
    assert len(set(candidates)) == len(candidates)
    for c in candidates[1:]:
        assert smem_bytes(c, problem) <= 232448
        assert c.block_m <= max(16, m_bucket(problem.m))
        if c.uses_dot:
            assert min(c.block_m, c.block_n, c.block_k, c.block_r) >= 16
    assert len(candidate_configs(problem, "max")) >= len(candidate_configs(problem, "fast"))


def test_small_shared_memory_prunes_big_tiles():
    problem = Problem(4096, 4096, 4096, 1024, 8, 0)
    roomy, tight = candidate_configs(problem, "max"), candidate_configs(problem, "max", smem_limit=48 * 1024)
    assert len(tight) < len(roomy)
    assert all(smem_bytes(c, problem) <= 48 * 1024 for c in tight[1:])


def test_default_config_paths_follow_m():
    assert default_config(Problem(1, 6400, 1600, 400, 8, 0)).path == "decode"
    assert default_config(Problem(1, 6400, 1600, 400, 8, 0)).block_m == 1  # CUDA cores
    assert default_config(Problem(16, 6400, 1600, 400, 8, 0)).block_m == 16  # tensor cores
    assert default_config(Problem(1, 6402, 1600, 400, 8, 0)).path == "split"  # rows not 16-byte multiples
    assert default_config(Problem(4096, 6400, 1600, 400, 8, 0)).path == "split"


def test_config_roundtrip_and_validation():
    c = TileConfig("split", 64, 64, 32, 16, expand_lowp=True)
    assert TileConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="power of two"):
        TileConfig("split", 48, 64, 32, 16)
    assert problem_key(PROBLEM, torch.float16) == "r400-n6400-k1600-int8-g0-float16-m1"
