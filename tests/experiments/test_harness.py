"""The benchmark harness: timing, result records, GPU-only exits."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments import harness

REPO = Path(__file__).resolve().parents[2]


def test_bench_measures_and_rotates_inputs():
    seen = []

    def fn(x):
        seen.append(x)
        time.sleep(0.002)

    t = harness.bench(fn, inputs=[1, 2, 3], warmup=2, rep=7, device="cpu")
    assert t["n"] == 7
    assert 1.5 <= t["median_ms"] < 200
    assert t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]
    assert seen == [1, 2, 1, 2, 3, 1, 2, 3, 1]  # warm-up then timed calls, rotating


def test_save_result_record(tmp_path):
    path = harness.save_result("unit_test", {"tok_s": 1.5}, args={"batch": 1}, out_dir=tmp_path)
    rec = json.loads(Path(path).read_text())
    for key in ("gpu", "torch", "triton", "fastzoo", "commit", "command", "date"):
        assert key in rec
    assert rec["figures"] == {"tok_s": 1.5} and rec["args"] == {"batch": 1} and rec["name"] == "unit_test"
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="result name"):
        harness.save_result("../x", {}, out_dir=tmp_path)


def test_gpu_slug():
    assert harness.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert harness.gpu_slug("NVIDIA H200") == "h200"


def test_print_table(capsys):
    harness.print_table([{"a": 1.23456, "b": "x"}, {"a": 12345.6, "b": "yy"}])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["a", "b"] and out[1].split() == ["1.23", "x"] and out[2].split() == ["12346", "yy"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
@pytest.mark.parametrize("module", ["experiments.ceilings"])
def test_gpu_only_benchmark_exits_2_without_gpu(module):
    r = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "needs a CUDA GPU" in r.stderr


def test_bench_ops_quick_runs_on_this_machine():
    r = subprocess.run([sys.executable, "-m", "experiments.bench_ops", "--quick"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "quantize_rows_int8" in r.stdout


@pytest.mark.cuda
def test_ceilings_are_plausible_on_gpu():
    gbps = harness.measure_copy_bandwidth(nbytes=1 << 28)
    tflops = harness.measure_matmul_tflops(torch.bfloat16, 4096)
    assert 100 < gbps < 20000 and 10 < tflops < 5000
