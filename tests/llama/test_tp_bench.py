"""experiments/llama_tp on the CPU: the random sharded model and one world-size-1 run."""
import argparse

import pytest
import torch

from fastzoo.llama.config import LlamaConfig
from fastzoo.llama.tp import shard_config


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)


def test_random_tp_model_shards_and_replicas():
    """Each rank gets its shard's shapes; replicated tensors are equal across ranks, sharded
    ones differ; quantization applies block by block (output included)."""
    from experiments.llama_tp import random_tp_model
    from fastzoo.quant.linear import Int8WeightOnlyLinear
    cfg = LlamaConfig.from_preset("tiny")
    local = shard_config(cfg, 2)
    ranks = [random_tp_model(cfg, r, 2, "cpu", torch.float32) for r in range(2)]
    for m in ranks:
        assert m.config == local and m.tp_config == cfg
        assert m.layers[0].attention.wqkv.weight.shape == ((local.n_heads + 2 * local.n_kv_heads) * cfg.head_dim,
                                                          cfg.dim)
        assert m.layers[1].feed_forward.w2.weight.shape == (cfg.dim, local.intermediate_size)
        assert all(p.device.type == "cpu" for p in m.parameters())
    a, b = (dict(m.named_parameters()) for m in ranks)
    for name in ("tok_embeddings.weight", "output.weight", "norm.weight", "layers.0.ffn_norm.weight"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not torch.equal(a["layers.0.attention.wo.weight"], b["layers.0.attention.wo.weight"])
    assert a["tok_embeddings.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    q = random_tp_model(cfg, 1, 2, "cpu", torch.float32, quantize="int8")
    assert isinstance(q.layers[1].feed_forward.w13, Int8WeightOnlyLinear)
    assert isinstance(q.output, Int8WeightOnlyLinear)


def test_tp_benchmark_world_size_1_on_cpu(tmp_path, capsys):
    from experiments import llama_tp
    figs = llama_tp.main(["--preset", "tiny", "--dtype", "fp32", "--no-compile", "--new-tokens", "6", "--runs", "1",
                          "--out-dir", str(tmp_path)])
    assert figs["world_size"] == 1 and figs["decode_tokens_per_s"] > 0 and figs["time_to_first_token_ms"] > 0
    assert figs["allreduce"] == "none"  # one rank, whatever --allreduce asks
    saved = tmp_path / "llama_tp_tiny_fp32_ws1_eager.json"
    assert saved.is_file()
    capsys.readouterr()
    llama_tp.main(["--summary", str(saved)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["model", "weights", "gpus", "allreduce", "compile"]
    assert table[1].split()[:5] == ["tiny", "fp32", "1", "none", "False"]


def test_tp_benchmark_simulated_world_on_cpu(tmp_path, capsys):
    """--simulate-world 2: one process runs a plain model of one rank's shard (half the heads and
    MLP width, embedding and output whole), recorded under its own name; --summary does not take
    it as the 1-GPU baseline."""
    from experiments import llama_tp
    from fastzoo.llama.config import LlamaConfig
    args = ["--preset", "tiny", "--dtype", "fp32", "--no-compile", "--new-tokens", "6", "--runs", "1",
            "--out-dir", str(tmp_path)]
    full = llama_tp.main(args)
    sim = llama_tp.main(args + ["--simulate-world", "2"])
    assert sim["simulated_world_size"] == 2 and sim["world_size"] == 1 and full["simulated_world_size"] is None
    cfg = LlamaConfig.from_preset("tiny")
    # the projections of a block (wqkv, wo, w1|w3, w2), fp32; half of them leave each block
    per_block = (cfg.dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 3 * cfg.dim * cfg.intermediate_size) * 4
    assert full["weight_bytes_per_gpu"] - sim["weight_bytes_per_gpu"] == cfg.n_layers * per_block // 2
    capsys.readouterr()
    llama_tp.main(["--summary", str(tmp_path / "llama_tp_tiny_fp32_ws1_eager.json"),
                   str(tmp_path / "llama_tp_tiny_fp32_ws1_eager_sim2.json")])
    rows = [r.split() for r in capsys.readouterr().out.splitlines()[1:3]]
    assert rows[0][2] == "1" and rows[0][6] == "1"  # the baseline: vs_1gpu 1
    assert rows[1][2:6] == ["1", "as", "2", "(no"]
    with pytest.raises(SystemExit, match="cannot shard"):
        llama_tp.main(args + ["--simulate-world", "3"])
    with pytest.raises(SystemExit, match="goes with --simulate-world"):
        llama_tp.main(args + ["--simulate-allreduce", "lamport"])
    ns = argparse.Namespace(name=None, preset="llama-2-7b", quantize=None, dtype="bf16", compile=True,
                            simulate_world=2, simulate_allreduce="lamport")
    assert llama_tp._result_name(ns, 1, "lamport (one rank)") == "llama_tp_llama-2-7b_bf16_ws1_compile_sim2_lamport"


def test_tp_benchmark_names_and_summary_of_allreduce_records(tmp_path, capsys):
    """symm_mem runs get their own record name (NCCL / one-rank names unchanged); --summary
    tabulates the micro-benchmark's rows after the decode table."""
    import argparse
    import json

    from experiments import llama_tp
    a = argparse.Namespace(name=None, preset="llama-2-7b", quantize=None, dtype="bf16", compile=True)
    assert llama_tp._result_name(a, 2, "symm_mem") == "llama_tp_llama-2-7b_bf16_ws2_compile_symm_mem"
    assert llama_tp._result_name(a, 2, "nccl") == "llama_tp_llama-2-7b_bf16_ws2_compile"
    assert llama_tp._result_name(a, 1, "none") == "llama_tp_llama-2-7b_bf16_ws1_compile"
    rec = {"figures": {"world_size": 2, "dtype": "torch.bfloat16", "symm_mem_backend": "CUDA",
                       "rows": [{"kb": 8.0, "nccl_graph_us": 30.5, "symm_mem_graph_us": 6.25}]}}
    path = tmp_path / "ar.json"
    path.write_text(json.dumps(rec))
    llama_tp.main(["--summary", str(path)])
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert table[-2] == ["gpus", "kb", "nccl_graph_us", "symm_mem_graph_us"]
    assert table[-1] == ["2", "8", "30.5", "6.25"]


def test_allreduce_bench_needs_two_gpus():
    from experiments import llama_tp
    with pytest.raises(SystemExit, match="needs >= 2 ranks on CUDA GPUs"):
        llama_tp.main(["--allreduce-bench", "--no-save"])


def test_tp_benchmark_needs_gpu_for_big_presets():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    from experiments import llama_tp
    with pytest.raises(SystemExit) as e:
        llama_tp.main(["--preset", "llama-2-70b", "--no-save"])
    assert e.value.code == 2
