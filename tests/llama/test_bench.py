import pytest


def test_decode_benchmark_runs_tiny_preset_on_cpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the benchmark is run by hand")
    from experiments import llama_decode
    figs = llama_decode.main(["--preset", "tiny", "--batch-sizes", "1,2", "--new-tokens", "6", "--no-compile",
                              "--dtype", "fp32", "--prefill-len", "20", "--runs", "3", "--no-save"])
    assert set(figs["batches"]) == {"1", "2"}
    assert figs["batches"]["2"]["total_tokens_per_s"] > 0 and figs["prefill_tokens_per_s"] > 0
    # every timed run is kept, and the reported rate is their median
    for e in figs["batches"].values():
        runs = e["runs_tokens_per_s_per_seq"]
        assert len(runs) == 3 and len(e["runs_time_to_first_token_ms"]) == 3
        assert e["decode_tokens_per_s_per_seq"] == sorted(runs)[1]


def test_decode_benchmark_needs_gpu_for_big_presets():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    from experiments import llama_decode
    with pytest.raises(SystemExit) as e:
        llama_decode.main(["--preset", "llama-2-7b", "--no-save"])
    assert e.value.code == 2


def test_decode_benchmark_quantized_int8_kv_and_speculative_on_cpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the benchmark is run by hand")
    from experiments import llama_decode
    figs = llama_decode.main(["--preset", "tiny", "--quick", "--new-tokens", "6", "--no-compile", "--dtype", "fp32",
                              "--quantize", "int8", "--kv-cache-dtype", "int8", "--speculate-k", "2",
                              "--draft-quantize", "int8", "--no-save"])
    assert set(figs["batches"]) == {"1"} and "prefill_tokens_per_s" not in figs  # --quick: batch 1, no prefill
    spec = figs["speculative"]
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["bytes_read_per_token"] > 0
    assert spec["speedup_vs_baseline"] > 0 and figs["kv_cache_dtype"] == "int8"


def test_decode_benchmark_gptq_mode():
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from experiments import llama_decode
    from fastzoo.quant import Int4WeightOnlyLinear
    from llama_testutils import make_tiny_model
    model = make_tiny_model()
    figs = llama_decode.quantize_model(model, "gptq-g32", model.config, torch.device("cpu"),
                                       SimpleNamespace(gptq_samples=2, gptq_seq_len=16))
    assert figs["quantize_s"] > 0 and isinstance(model.output, Int4WeightOnlyLinear)
    # the tiny preset runs int4 and GPTQ through the CLI; a group that does not fit is a clean error
    for mode in ("int4-g64", "gptq-g32"):
        out = llama_decode.main(["--preset", "tiny", "--quick", "--new-tokens", "4", "--no-compile", "--dtype", "fp32",
                                 "--quantize", mode, "--gptq-samples", "2", "--gptq-seq-len", "16", "--no-save"])
        assert out["quantize"] == mode and out["batches"]["1"]["decode_tokens_per_s_per_seq"] > 0
    with pytest.raises(SystemExit, match="--quantize int4-g128: .*group_size=128"):
        llama_decode.main(["--preset", "tiny", "--quick", "--no-compile", "--quantize", "int4-g128", "--no-save"])
    with pytest.raises(SystemExit, match="group_size"):
        llama_decode.quantize_model(model, "gptq-g48", model.config, torch.device("cpu"), None)
    with pytest.raises(SystemExit):
        llama_decode.main(["--preset", "tiny", "--speculate-k", "2", "--batch-sizes", "1,2", "--no-save"])
