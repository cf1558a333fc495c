"""bench/gpu_check.sh --dry-run: every bench script gpu_check.sh runs, on the CPU with tiny sizes (the kernels through
Triton's interpreter, the static report compiled for sm_90), so the GPU check cannot break unseen. About a minute of
CPU time; GPU-only steps are skipped with a message."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_result_and_the_summary(tmp_path):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script chooses per step
    env.update(BENCH_RESULTS_DIR=str(tmp_path / "results"), PYTHON=sys.executable, OUT=str(tmp_path))
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1200)
    log = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, log
    for step in ("install", "gpu-tests", "kernel-tests"):
        assert f"[{step}] SKIPPED in --dry-run: needs a GPU" in result.stdout, log
    out = tmp_path / "results"
    steps = (out / "gpu_check_steps.txt").read_text().split("\n")
    assert [line.split()[:2] for line in steps if line] == [
        ["bench-kernels", "rc=0"], ["bench-e2e", "rc=0"], ["sass-report", "rc=0"]], log
    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["rows"] and kernels["hybrid_rows"] and kernels["partial"] is False
    e2e = json.loads((out / "e2e-quick.json").read_text())
    assert e2e["runs"] and e2e["partial"] is False
    records = json.loads((out / "sass_report.json").read_text())
    assert records and all("error" not in r for r in records)
    assert any(loop["bytes_in_flight_per_sm"] > 0 for r in records for loop in r["hot_loops"])
    assert "benchmark summary" in (out / "summary.txt").read_text()
    assert (tmp_path / "results.tar.gz").stat().st_size > 0  # archived for the device tool
