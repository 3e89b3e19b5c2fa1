import pytest
import torch

from fastzoo.llama.checkpoint import load_model
from fastzoo.llama.config import LlamaError
from fastzoo.llama.generate import Generator, generate, logits_to_probs, sample
from llama_testutils import VOCAB


def _prompts(seed=0, lens=(5, 11, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("kind", ["mha", "gqa_llama3_rope"])
def test_greedy_equals_transformers_generate(converted, kind):
    hf, ckpt = converted[kind]
    model = load_model(ckpt, dtype=torch.float32)
    prompt = _prompts(1, (7,))[0]
    n = 20
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    out = generate(model, [prompt], n, temperature=0.0)
    assert out.tokens[0] == ref


def test_batch_of_different_lengths_equals_each_alone(converted):
    _, ckpt = converted["gqa"]
    model = load_model(ckpt, dtype=torch.float32)
    prompts = _prompts(2, (5, 13, 2, 9))
    gen = Generator(model)
    batch = gen.generate(prompts, 16, temperature=0.0)
    for p, toks in zip(prompts, batch.tokens):
        alone = Generator(model).generate([p], 16, temperature=0.0)
        assert toks == alone.tokens[0]


def test_stop_at_eos_per_sequence(converted):
    _, ckpt = converted["gqa"]
    model = load_model(ckpt, dtype=torch.float32)
    prompts = _prompts(3, (4, 8))
    free = Generator(model).generate(prompts, 12, temperature=0.0)
    stop = free.tokens[0][3]  # sequence 0 produces this at step 3
    assert stop not in free.tokens[0][:3]
    out = Generator(model).generate(prompts, 12, temperature=0.0, stop_ids=[stop], pad_id=0)
    assert out.tokens[0] == free.tokens[0][:3] and out.finished[0]
    cut1 = free.tokens[1].index(stop) if stop in free.tokens[1] else None
    assert out.tokens[1] == free.tokens[1][:cut1]
    # all sequences stop -> the loop ends early
    if cut1 is None:
        single = Generator(model).generate([prompts[0]], 12, temperature=0.0, stop_ids=[stop])
        assert single.steps <= 4 and single.tokens[0] == free.tokens[0][:3]


def test_sampling_reproducible_and_in_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    torch.manual_seed(1)
    a = sample(logits, 1.0, top_k=3)
    torch.manual_seed(1)
    b = sample(logits, 1.0, top_k=3)
    assert torch.equal(a, b)
    top3 = logits.topk(3).indices
    assert all(a[i] in top3[i] for i in range(4))
    # top-p with a tiny p keeps only the most likely token
    assert torch.equal(sample(logits, 1.0, top_p=1e-6), logits.argmax(-1))
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


def test_sampling_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    s = sample(logits, 1.0)
    freq = torch.bincount(s, minlength=4).float() / s.numel()
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.02)


def test_top_k_sampling_distribution():
    """The top-k fast path (sampling among the k candidates) draws from the softmax of
    the k largest logits, like logits_to_probs' masking of the full vocabulary."""
    row = torch.tensor([0.5, -2.0, 1.5, 0.0, 2.0, -1.0, 1.0])
    logits = row.repeat(30000, 1)
    torch.manual_seed(0)
    s = sample(logits, 0.7, top_k=3)
    freq = torch.bincount(s, minlength=row.numel()).float() / s.numel()
    assert torch.allclose(freq, logits_to_probs(row[None], 0.7, top_k=3)[0], atol=0.01)
    assert freq[[0, 1, 3, 5]].sum() == 0  # never outside the top 3


def test_prompt_too_long(converted):
    _, ckpt = converted["mha"]
    model = load_model(ckpt, dtype=torch.float32)
    with pytest.raises(LlamaError, match="maximum sequence length"):
        generate(model, [[1] * 250], 10)


def test_invalid_sampling_args(converted):
    _, ckpt = converted["mha"]
    model = load_model(ckpt, dtype=torch.float32)
    for kw in (dict(temperature=-1.0), dict(temperature=1.0, top_k=0), dict(temperature=1.0, top_p=1.5)):
        with pytest.raises(LlamaError):
            generate(model, [[1, 2]], 4, **kw)


@pytest.mark.cuda
def test_decode_loop_has_no_host_sync(converted):
    _, ckpt = converted["gqa"]
    model = load_model(ckpt, device="cuda", dtype=torch.float32)
    gen = Generator(model)
    state = gen.prefill(_prompts(4, (5, 9)), 32, temperature=0.8, top_k=50, stop_ids=[3], pad_id=0)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gen.decode(state, check_every=4)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_compiled_decode_equals_eager(converted):
    _, ckpt = converted["gqa_llama3_rope"]
    model = load_model(ckpt, device="cuda", dtype=torch.float32)
    prompts = _prompts(5, (5, 20, 9))
    eager = Generator(model).generate(prompts, 24, temperature=0.0)
    comp = Generator(model, compile=True)
    for _ in range(2):  # second run replays the CUDA graphs
        out = comp.generate(prompts, 24, temperature=0.0)
        assert out.tokens == eager.tokens


def test_decode_inductor_options():
    """The compiled decode steps ask inductor for coordinate-descent tuning, CUDA graphs and,
    where this PyTorch has it, programmatic dependent launch; prefill gets none of them and
    another backend no options at all."""
    import torch._inductor.config as icfg
    from fastzoo.llama.generate import _inductor_options

    dec = _inductor_options("inductor", cudagraphs=True)
    assert dec["coordinate_descent_tuning"] and dec["triton.cudagraphs"]
    assert dec.get("triton.enable_pdl", False) == hasattr(icfg.triton, "enable_pdl")
    assert _inductor_options("inductor", cudagraphs=False) == {}
    assert _inductor_options("eager", cudagraphs=True) is None


@pytest.mark.cuda
@pytest.mark.parametrize("quantize", [None, "int8", "int4-g128"])
def test_compiled_decode_pdl_equals_without(quantize, monkeypatch):
    """Programmatic dependent launch changes when kernels start, never what they compute: a
    compiled bf16 batch-1 decode (plain, int8 or int4 weights: fastzoo's one-row GEMVs
    between inductor's kernels) gives the same greedy tokens with and without it (on
    Hopper; skipped on older GPUs, where inductor leaves it off). A tiny model (dim 256)."""
    import torch._dynamo
    import torch._inductor.config as icfg
    from fastzoo import quant as q
    import importlib

    gen_mod = importlib.import_module("fastzoo.llama.generate")
    from llama_testutils import make_tiny_model

    if not hasattr(icfg.triton, "enable_pdl"):
        pytest.skip("this PyTorch's inductor has no triton.enable_pdl")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("inductor uses programmatic dependent launch on Hopper and newer only")
    model = make_tiny_model(dim=256, intermediate_size=512, std=0.05).to(device="cuda", dtype=torch.bfloat16)
    if quantize == "int4-g128":
        q.quantize_(model, q.Int4WeightOnly(group_size=128))
    elif quantize:
        q.quantize_(model, quantize)
    prompt = [[5, 17, 3, 44, 9, 60, 2]]
    torch._dynamo.reset()
    with_pdl = Generator(model, compile=True).generate(prompt, 40, temperature=0.0).tokens
    real = gen_mod._inductor_options
    monkeypatch.setattr(gen_mod, "_inductor_options",
                        lambda b, cudagraphs: {k: v for k, v in (real(b, cudagraphs) or {}).items()
                                               if k != "triton.enable_pdl"})
    torch._dynamo.reset()
    without = Generator(model, compile=True).generate(prompt, 40, temperature=0.0).tokens
    torch._dynamo.reset()
    assert with_pdl == without and len(with_pdl[0]) == 40


def test_compiled_graphs_trace_whole_and_bucket_prefill(converted):
    """fullgraph tracing of prefill/decode (dynamo, eager backend) and no recompiles within a bucket."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    _, ckpt = converted["gqa"]
    model = load_model(ckpt, dtype=torch.float32)
    torch._dynamo.reset()
    counters.clear()
    gen = Generator(model, compile=True, compile_backend="eager", max_seq_length=64)
    eager = Generator(model, max_seq_length=64)
    for lens in [(3,), (7,), (12,), (16,), (29,)]:  # all in the smallest (32-token) bucket
        prompts = _prompts(6, lens)
        assert gen.generate(prompts, 6).tokens == eager.generate(prompts, 6).tokens
    frames = counters["stats"]["unique_graphs"]
    assert frames == 2, counters["stats"]  # one prefill graph, one decode graph
    torch._dynamo.reset()
