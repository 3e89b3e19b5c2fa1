import pytest


def test_decode_benchmark_runs_tiny_preset_on_cpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the benchmark is run by hand")
    from experiments import llama_decode
    figs = llama_decode.main(["--preset", "tiny", "--batch-sizes", "1,2", "--new-tokens", "6", "--no-compile",
                              "--dtype", "fp32", "--prefill-len", "20", "--runs", "1", "--no-save"])
    assert set(figs["batches"]) == {"1", "2"}
    assert figs["batches"]["2"]["total_tokens_per_s"] > 0 and figs["prefill_tokens_per_s"] > 0


def test_decode_benchmark_needs_gpu_for_big_presets():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    from experiments import llama_decode
    with pytest.raises(SystemExit) as e:
        llama_decode.main(["--preset", "llama-2-7b", "--no-save"])
    assert e.value.code == 2
