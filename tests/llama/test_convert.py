import json

import pytest
import torch

from helpers import rel_err
from fastzoo.llama.checkpoint import load_model, permute_hf_to_meta, permute_meta_to_hf
from fastzoo.llama.config import LlamaError
from fastzoo.llama.convert import convert, main as convert_main
from llama_testutils import VOCAB, make_hf_model


def _check(hf, ckpt, tol=1e-4):
    model = load_model(ckpt, dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (1, 17))
    with torch.no_grad():
        assert rel_err(model(tokens), hf(tokens).logits) <= tol


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_hf_checkpoint(tmp_path, tiktoken_file, safe):
    hf = make_hf_model("gqa", seed=5)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    assert index.is_file()
    if not safe:  # rewrite as sharded pytorch_model-*.bin (transformers 5 no longer writes them)
        from safetensors.torch import load_file
        idx = json.loads(index.read_text())
        renamed = {}
        for f in sorted(set(idx["weight_map"].values())):
            renamed[f] = f.replace("model", "pytorch_model").replace(".safetensors", ".bin")
            torch.save(load_file(tmp_path / "hf" / f), tmp_path / "hf" / renamed[f])
            (tmp_path / "hf" / f).unlink()
        idx["weight_map"] = {k: renamed[v] for k, v in idx["weight_map"].items()}
        (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps(idx))
        index.unlink()
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "fz"), "--tokenizer", str(tiktoken_file),
                         "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "fz").iterdir()) == ["config.json", "model.pth", "tokenizer.model"]
    _check(hf, tmp_path / "fz")


def test_tied_embeddings(tmp_path, tiktoken_file):
    hf = make_hf_model("mha", seed=6, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    _check(hf, convert(tmp_path / "hf", tmp_path / "fz", tokenizer=tiktoken_file, progress=False))


def test_rope_permutation_roundtrip():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(permute_meta_to_hf(permute_hf_to_meta(w, 4), 4), w)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_consolidated_checkpoint(tmp_path, tiktoken_file, n_shards):
    """Meta layout (interleaved RoPE rows, tensor-parallel shards) built from an HF model."""
    hf = make_hf_model("gqa", seed=7)
    c = hf.config
    sd = hf.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta[f"layers.{i}.attention.wq.weight"] = permute_hf_to_meta(sd[p + "self_attn.q_proj.weight"], 4)
        meta[f"layers.{i}.attention.wk.weight"] = permute_hf_to_meta(sd[p + "self_attn.k_proj.weight"], 2)
        meta[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        meta[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        meta[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        meta[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        meta[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        meta[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    src = tmp_path / "meta"
    src.mkdir()
    for r in range(n_shards):
        shard = {}
        for k, v in meta.items():
            name = k.split(".")[-2]
            if "norm" in name or n_shards == 1:
                shard[k] = v.clone()
            elif name in ("wo", "w2", "tok_embeddings"):  # Llama 2: embedding split by columns
                shard[k] = v.chunk(n_shards, dim=1)[r].clone()
            else:
                shard[k] = v.chunk(n_shards, dim=0)[r].clone()
        shard["rope.freqs"] = torch.zeros(8)
        torch.save(shard, src / f"consolidated.{r:02d}.pth")
    (src / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                 "multiple_of": 4, "norm_eps": 1e-5, "vocab_size": -1}))
    (src / "tokenizer.model").write_bytes(tiktoken_file.read_bytes())
    ckpt = convert(src, tmp_path / "fz", progress=False)
    _check(hf, ckpt)


def test_failures_leave_nothing(tmp_path, converted):
    hf, _ = converted["mha"]
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(LlamaError, match="tokenizer"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    # unknown tensor in the source
    (tmp_path / "tok.model").write_bytes(b"aGk= 0\n")
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlamaError, match="q_norm"):
        convert(tmp_path / "hf", tmp_path / "out", tokenizer=tmp_path / "tok.model", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tok.model"]
    assert convert_main([str(tmp_path / "nope"), str(tmp_path / "out"), "--quiet"]) == 1


def test_weights_not_matching_config(tmp_path, converted):
    import shutil
    _, ckpt = converted["gqa"]
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlamaError, match=r"layers\.0\.feed_forward\.w13\.weight: expected shape \(256, 64\), found \(344, 64\)"):
        load_model(bad)


def test_loading_is_memory_mapped(converted):
    _, ckpt = converted["gqa"]
    model = load_model(ckpt)  # same dtype and device: the mmap'ed storages are assigned, not copied
    sd = torch.load(ckpt / "model.pth", mmap=True, weights_only=True)
    assert model.tok_embeddings.weight.dtype == sd["tok_embeddings.weight"].dtype
    assert torch.equal(model.layers[1].attention.wqkv.weight, sd["layers.1.attention.wqkv.weight"])
    assert not any(p.is_meta for p in model.parameters())
