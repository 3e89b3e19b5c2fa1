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
