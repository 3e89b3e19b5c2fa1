"""GPU checks of the quantization features (run by scripts/gpu_check.sh)."""
import copy

import pytest
import torch

from fastzoo.llama.generate import Generator, SpeculativeGenerator
from fastzoo.llama.quantize import gptq_quantize_llama_
from fastzoo.quant import Int4WeightOnly, Int4WeightOnlyLinear, quantize_
from fastzoo.quant.gptq import GPTQ
from helpers import sqnr
from llama_testutils import make_tiny_model

pytestmark = pytest.mark.cuda
PROMPT = [[3, 17, 42, 5, 61]]


def _no_sync(fn):
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
        torch.cuda.synchronize()


def test_speculative_decode_loop_has_no_host_sync():
    target = make_tiny_model(std=0.15).cuda()
    draft = quantize_(copy.deepcopy(target), "int8")
    spec = SpeculativeGenerator(target, draft, 3)
    state = spec.prefill(PROMPT, 32, temperature=0.8, top_k=20, stop_ids=[3])
    _no_sync(lambda: spec.decode(state, 32, check_every=1))


def test_int8_kv_decode_loop_has_no_host_sync():
    model = make_tiny_model(std=0.1).cuda()
    gen = Generator(model, kv_cache_dtype=torch.int8)
    state = gen.prefill([[1, 2, 3], [4, 5]], 24, temperature=0.8, top_k=20, stop_ids=[3])
    _no_sync(lambda: gen.decode(state, check_every=4))


@pytest.mark.parametrize("draft_kind", ["self", "int4"])
def test_compiled_speculative_equals_greedy_target(draft_kind):
    target = make_tiny_model(std=0.15).cuda()
    draft = target if draft_kind == "self" else quantize_(copy.deepcopy(target), "int4-g32")
    ref = Generator(target).generate(PROMPT, 40, temperature=0)
    spec = SpeculativeGenerator(target, draft, 4, compile=True)
    for _ in range(2):  # the second run replays the CUDA graphs
        out = spec.generate(PROMPT, 40, temperature=0)
        assert out.tokens == ref.tokens, out.stats
    if draft_kind == "self":
        assert out.stats["acceptance_rate"] == 1.0


@pytest.mark.parametrize("head_dim", [16, 64])
def test_compiled_int8_kv_bf16_close_to_bf16_cache(head_dim, monkeypatch):
    """Compiled decode steps on the int8 cache against the bf16 cache: head_dim 16 runs the
    reference (no kernel for it), 64 the fused kernel (int8 tiles dequantized in registers),
    which every decode step of every layer calls; and it agrees with the reference's int8
    cache run eagerly."""
    import importlib

    da = importlib.import_module("fastzoo.ops.decode_attention")  # (fastzoo.ops.decode_attention: the function)

    calls = []
    real = da.decode_attention_triton
    monkeypatch.setattr(da, "decode_attention_triton", lambda *a, **k: calls.append(k.get("k_scales") is not None)
                        or real(*a, **k))
    model = make_tiny_model(std=0.1, dim=4 * head_dim).cuda().to(torch.bfloat16)
    tokens = torch.randint(0, 96, (2, 48), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    outs = {}
    for kv, compiled in ((None, True), (torch.int8, True), (torch.int8, False)):
        model.setup_caches(2, 64, kv_cache_dtype=kv)
        step = torch.compile(lambda t, p: model(t, p), fullgraph=True, dynamic=False) if compiled else model
        if not compiled:  # the reference: the op's eager fallback
            monkeypatch.setattr(da, "_kernel_applies", lambda *a, **k: False)
        with torch.no_grad():
            logits = [model(tokens[:, :32], torch.arange(32, device="cuda"))]
            for i in range(32, 48):
                logits.append(step(tokens[:, i:i + 1], torch.full((2, 1), i, device="cuda")))
        outs[kv, compiled] = torch.cat(logits, 1).float()
        model.clear_caches()
    assert sqnr(outs[torch.int8, True], outs[None, True]) > 25
    assert sqnr(outs[torch.int8, True], outs[torch.int8, False]) > 35
    if head_dim == 64:  # 16 steps × 2 layers on the int8 cache (and as many on the bf16 one)
        assert calls.count(True) == 32 and calls.count(False) == 32
    else:
        assert not calls


def test_gptq_on_gpu_layer_by_layer_from_cpu_model():
    model = make_tiny_model()
    tokens = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    cpu = gptq_quantize_llama_(copy.deepcopy(model), tokens, GPTQ(32, 64), device="cpu", progress=False)
    gpu = gptq_quantize_llama_(copy.deepcopy(model), tokens, GPTQ(32, 64), device="cuda", progress=False)
    assert isinstance(gpu.layers[0].attention.wqkv, Int4WeightOnlyLinear)
    assert all(t.device.type == "cpu" for t in gpu.state_dict().values())  # layers went back
    rtn = quantize_(copy.deepcopy(model), Int4WeightOnly(32))
    with torch.no_grad():
        ref = model(tokens)
        assert sqnr(gpu(tokens), ref) > sqnr(rtn(tokens), ref) - 1.0
        assert sqnr(gpu(tokens), cpu(tokens)) > 15  # same algorithm; rounding may flip a few values
