"""int8 KV cache (per-token, per-head scales): logits close to the float cache, decode sync-free."""
import pytest
import torch

from fastzoo.llama.generate import Generator
from fastzoo.llama.model import Int8KVCache
from helpers import sqnr
from llama_testutils import make_tiny_model

KV_INT8_MIN_SQNR_DB = 30.0  # logits with the int8 cache vs the float cache (measured ≈ 40 dB here)


def _logits_with_cache(model, tokens, n_decode, kv_cache_dtype):
    model.setup_caches(1, 64, dtype=torch.float32, kv_cache_dtype=kv_cache_dtype)
    T = tokens.shape[1] - n_decode
    outs = [model(tokens[:, :T], torch.arange(T))]
    for i in range(T, tokens.shape[1]):
        outs.append(model(tokens[:, i:i + 1], torch.tensor([i])))
    model.clear_caches()
    return torch.cat(outs, dim=1)


def test_int8_kv_cache_logits_sqnr():
    model = make_tiny_model(std=0.1)
    tokens = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _logits_with_cache(model, tokens, 16, None)
        out = _logits_with_cache(model, tokens, 16, torch.int8)
        assert torch.allclose(ref, model(tokens), atol=1e-4)  # the float cache is exact
    s = sqnr(out, ref)
    assert KV_INT8_MIN_SQNR_DB < s < float("inf"), s


def test_int8_kv_quantize_roundtrip():
    x = torch.randn(2, 3, 5, 16) * torch.rand(2, 3, 5, 1) * 10
    q, s = Int8KVCache.quantize(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 5, 1)
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def test_generate_with_int8_cache_fullgraph():
    """The compiled decode step (fullgraph: no host sync / graph break) runs on the int8 cache."""
    model = make_tiny_model(std=0.1)
    prompts = [[1, 2, 3, 4], [5, 6]]
    ref = Generator(model).generate(prompts, 8)
    gen = Generator(model, compile=True, compile_backend="eager", kv_cache_dtype=torch.int8)
    out = gen.generate(prompts, 8)
    assert isinstance(model.layers[0].attention.kv_cache, Int8KVCache)
    assert [len(t) for t in out.tokens] == [8, 8]
    agree = sum(a == b for r, o in zip(ref.tokens, out.tokens) for a, b in zip(r, o))
    assert agree >= 12, (ref.tokens, out.tokens)  # greedy: nearly the same tokens


def test_cli_kv_cache_int8(tmp_path, capsys):
    from fastzoo.llama.checkpoint import save_checkpoint
    from fastzoo.llama.generate import main
    from llama_testutils import write_tiktoken_file
    m = make_tiny_model(std=0.1, vocab_size=576)
    ckpt = save_checkpoint(m, m.config, tmp_path / "ck", tokenizer_path=write_tiktoken_file(tmp_path / "t.model"))
    argv = ["--checkpoint", str(ckpt), "--prompt", "hello", "--prompt", "the fox", "--max-new-tokens", "6",
            "--temperature", "0", "--device", "cpu"]
    assert main(argv + ["--kv-cache-dtype", "int8"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 2
    with pytest.raises(SystemExit):
        main(argv + ["--kv-cache-dtype", "int4"])
