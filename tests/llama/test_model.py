import pytest
import torch

from helpers import rel_err
from fastzoo.llama.checkpoint import load_model
from fastzoo.llama.config import PRESETS, LlamaConfig
from fastzoo.llama.model import Transformer

from llama_testutils import TINY_CONFIGS, VOCAB


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_logits_match_transformers(converted, kind):
    hf, ckpt = converted[kind]
    model = load_model(ckpt, dtype=torch.float32)
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = model(tokens)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_kv_cache_stepwise_equals_full_forward(converted, kind):
    _, ckpt = converted[kind]
    model = load_model(ckpt, dtype=torch.float32)
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, 32, torch.float32)
        pre = model(tokens[:, :10], torch.arange(10))
        steps = [model(tokens[:, t:t + 1], torch.full((2, 1), t)) for t in range(10, 24)]
    got = torch.cat([pre] + steps, dim=1)
    assert rel_err(got, full) <= 1e-5


def test_per_sequence_positions_in_cache(converted):
    """Two sequences at different positions in one batch = each alone."""
    _, ckpt = converted["gqa"]
    model = load_model(ckpt, dtype=torch.float32)
    torch.manual_seed(3)
    a = torch.randint(0, VOCAB, (1, 9))
    b = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = model(a)[0, -1], model(b)[0, -1]
        model.setup_caches(2, 16, torch.float32)
        padded = torch.zeros(2, 8, dtype=torch.long)
        padded[0], padded[1, :4] = a[0, :8], b[0, :4]
        model(padded, torch.arange(8))
        nxt = torch.tensor([[a[0, 8]], [b[0, 4]]])
        out = model(nxt, torch.tensor([[8], [4]]))
    assert rel_err(out[0, 0], ref_a) <= 1e-5
    assert rel_err(out[1, 0], ref_b) <= 1e-5


def test_logits_at(converted):
    _, ckpt = converted["mha"]
    model = load_model(ckpt, dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (3, 7))
    at = torch.tensor([6, 2, 4])
    with torch.no_grad():
        full = model(tokens)
        sel = model(tokens, logits_at=at)
    assert torch.allclose(sel, full[torch.arange(3), at], atol=1e-5)


def test_presets_roundtrip_and_shapes():
    from transformers import LlamaConfig as HFConfig
    for name in PRESETS:
        cfg = LlamaConfig.from_preset(name)
        assert LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
        hf = HFConfig(**{k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")})
        back = LlamaConfig.from_hf_config(hf.to_dict())
        back.model_type = cfg.model_type
        assert back == cfg, name
    cfg = LlamaConfig.from_preset("llama-2-7b")
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(cfg).parameters())
    assert abs(n - 6.74e9) < 0.01e9
    cfg = LlamaConfig.from_preset("llama-3.1-8b")
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(cfg).parameters())
    assert abs(n - 8.03e9) < 0.01e9


def test_config_from_json(tmp_path, converted):
    hf, ckpt = converted["gqa_llama3_rope"]
    cfg = LlamaConfig.from_json(ckpt / "config.json")
    assert cfg.n_kv_heads == 2 and cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0


# ----------------------------------------------------------------------------------
# fused_linear: norms, SwiGLU and residuals fused into the projections
# ----------------------------------------------------------------------------------
def _tiny_with_norms(seed=0):
    from llama_testutils import make_tiny_model

    model = make_tiny_model(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _hook_every_linear(model):
    """A no-op forward pre-hook on every module with fused_forward: fused_linear composes."""
    return [m.register_forward_pre_hook(lambda m, args: None)
            for m in model.modules() if getattr(m, "fused_forward", None) is not None]


@pytest.mark.parametrize("quant", [None, "int8", "int8dq", "int4-32"])
def test_fused_linear_calls_and_equals_composition(monkeypatch, quant):
    """Each block hands wqkv its attention_norm, wo the residual x, w13 its ffn_norm, w2 the
    SwiGLU and the residual h, the output head the final norm (after the logits_at row
    selection); on the CPU (the ops' references) the result equals the plain composition
    bit for bit, with and without KV cache, for modules that fuse and modules that don't;
    above 16 rows it composes."""
    model = _tiny_with_norms()
    if quant is not None:
        from fastzoo import quant as q

        q.quantize_(model, q.Int4WeightOnly(group_size=32) if quant == "int4-32" else quant)
    calls = []
    for cls in {type(m) for m in model.modules() if getattr(m, "fused_forward", None) is not None}:
        orig = cls.fused_forward

        def spy(self, x, *, norm=None, glu=False, residual=None, _orig=orig):
            calls.append((self, norm, glu, None if residual is None else tuple(residual.shape), x.dim()))
            return _orig(self, x, norm=norm, glu=glu, residual=residual)
        monkeypatch.setattr(cls, "fused_forward", spy)
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    logits_at = torch.tensor([6, 3])
    with torch.no_grad():
        fused = model(tokens, logits_at=logits_at)
        model.setup_caches(2, 16, torch.float32)
        fused_cached = model(tokens, torch.arange(7))
        handles = _hook_every_linear(model)
        composed_cached = model(tokens, torch.arange(7))
        model.clear_caches()
        composed = model(tokens, logits_at=logits_at)
    for h in handles:
        h.remove()
    assert torch.equal(fused, composed) and fused.shape == (2, 96)
    assert torch.equal(fused_cached, composed_cached)
    if quant in ("int8dq", "int4-32"):  # these modules do not fuse
        assert calls == []
        return
    expected = []
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        expected += [(att.wqkv, layer.attention_norm, False, None), (att.wo, None, False, (2, 7, 64)),
                     (ff.w13, layer.ffn_norm, False, None), (ff.w2, None, True, (2, 7, 64))]
    expected += [(model.output, model.norm, False, None)]
    got = [c[:4] for c in calls]
    assert got[:len(expected)] == expected  # the first, cache-less forward
    assert [c[4] for c in calls[:len(expected)]] == [3] * (len(expected) - 1) + [2]  # head: logits_at rows
    assert len(calls) == 2 * len(expected)  # then the cached one; the hooked ones compose
    calls.clear()
    with torch.no_grad():
        model(torch.randint(0, 96, (3, 7)))
    assert calls == []  # more than 16 rows (prefill): composed, the GEMM is F.linear's


def test_compiled_graph_has_no_separate_norm_or_silu():
    """torch.compile(fullgraph) of the model: every RMSNorm, SwiGLU and residual add lives
    in a decode_linear call (on the CPU the op runs its reference)."""
    import torch._dynamo.testing

    model = _tiny_with_norms(1)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    tokens = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens), rtol=0, atol=0)
    targets = [str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    assert sum("decode_linear" in t for t in targets) == 4 * len(model.layers) + 1
    assert not [t for t in targets if "rsqrt" in t or "silu" in t], targets


@pytest.mark.parametrize("kv_cache_dtype", [None, torch.int8])
def test_rope_table_only_where_a_layer_applies_it(monkeypatch, kv_cache_dtype):
    """KVCache and Int8KVCache apply RoPE inside their attention op: the model builds no
    cos/sin table then; without caches it does."""
    import fastzoo.llama.model as model_mod
    from llama_testutils import make_tiny_model

    model = make_tiny_model(0)
    calls = []
    real = model_mod.rope_cos_sin
    monkeypatch.setattr(model_mod, "rope_cos_sin", lambda *a: calls.append(1) or real(*a))
    tokens = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        full = model(tokens)
        assert len(calls) == 1
        model.setup_caches(1, 8, torch.float32, kv_cache_dtype=kv_cache_dtype)
        cached = model(tokens, torch.arange(6))
    assert len(calls) == 1
    assert rel_err(cached, full) <= (5e-2 if kv_cache_dtype == torch.int8 else 1e-5)
