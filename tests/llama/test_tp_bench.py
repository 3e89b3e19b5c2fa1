"""experiments/llama_tp on the CPU: the random sharded model and one world-size-1 run."""
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
    saved = tmp_path / "llama_tp_tiny_fp32_ws1_eager.json"
    assert saved.is_file()
    capsys.readouterr()
    llama_tp.main(["--summary", str(saved)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["model", "weights", "gpus", "compile"]
    assert table[1].split()[:4] == ["tiny", "fp32", "1", "False"]


def test_tp_benchmark_needs_gpu_for_big_presets():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    from experiments import llama_tp
    with pytest.raises(SystemExit) as e:
        llama_tp.main(["--preset", "llama-2-70b", "--no-save"])
    assert e.value.code == 2
