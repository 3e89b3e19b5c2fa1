"""Tensor-parallel Llama (fastzoo.llama.tp) against the single-process model.

Two gloo ranks are spawned once for the module; rank 0 saves its logits and tokens and the
tests compare them with the unsharded model in this process."""
import contextlib
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastzoo.llama.checkpoint import load_model
from fastzoo.llama.config import LlamaConfig, LlamaError
from fastzoo.llama.generate import Generator, SpeculativeGenerator, generate
from fastzoo.llama.model import Transformer
from fastzoo.llama.tp import load_tp_model, shard_model_, shard_state_dict
from llama_testutils import VOCAB, make_tiny_model

WORLD = 2
KINDS = ("mha", "gqa")
QKINDS = ("int8-mha", "int8-gqa", "int4-g32")  # quantized checkpoints (fixture ``quantized``)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
NEW = 8
STOP_NEW, STOP_CHECK = 20, 2  # generation with stop tokens: checked every 2 steps
DRAFT = [[11, 12, 13], [21, 22, 23]]  # K = 3 tokens per sequence after the prompts (speculative verify)
COMPILED_KIND = "gqa"
SPEC_K, SPEC_NEW, SPEC_PROMPT = 3, 16, [PROMPTS[0]]  # speculative decoding (batch 1)
SPEC_KIND = "gqa"  # also runs a quantized checkpoint's draft, stop tokens and sampling


def _tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 11), generator=g)


def _stop_ids(greedy):
    """Stop tokens that end the two prompts' greedy continuations at different steps."""
    return sorted({greedy[0][2], greedy[1][4]})


def _multi_token_logits(model):
    """Prefill the padded prompts, then forward ``DRAFT`` (K tokens per sequence) at each
    sequence's own next positions through the KV cache: the call speculative decoding's
    verification makes.  Returns the ``[B, K, V]`` logits; the caches are cleared."""
    B, Tb = len(PROMPTS), max(map(len, PROMPTS))
    tokens = torch.zeros(B, Tb, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    K = len(DRAFT[0])
    model.setup_caches(B, 32)
    with torch.no_grad():
        model(tokens, torch.arange(Tb), kv_len=16)
        pos = lengths[:, None] + torch.arange(K)  # [B, K], per sequence
        out = model(torch.tensor(DRAFT), pos, kv_len=16)
    model.clear_caches()
    return out


def _count_all_reduces(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "all_reduce" in str(n.target))


def _compiled_results(model):
    """Greedy tokens and one decode-step's logits with the steps compiled (``fullgraph``, so a
    graph break is an error; aot_eager: the AOT / functionalisation path inductor takes),
    and the number of all-reduces in each traced graph."""
    from torch._dynamo.backends.registry import lookup_backend
    aot_eager = lookup_backend("aot_eager")
    counts = []

    def backend(gm, example_inputs):
        counts.append(_count_all_reduces(gm))
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    tokens = Generator(model, compile=True, compile_backend=backend).generate(PROMPTS, NEW).tokens
    model.setup_caches(2, 32)
    cur, pos = torch.tensor([[3], [4]]), torch.tensor([[5], [3]])
    with torch.no_grad():
        eager = model(cur, pos, kv_len=16)
        step = torch.compile(lambda m, t, p: m(t, p, kv_len=16), backend=backend, fullgraph=True, dynamic=False)
        compiled = step(model, cur, pos)
    model.clear_caches()
    torch._dynamo.reset()
    return tokens, eager, compiled, counts


def _spec_run(target, draft, **kw):
    """Greedy speculative decoding of ``SPEC_PROMPT``: (tokens, finished, rounds and accepted drafts)."""
    out = SpeculativeGenerator(target, draft, SPEC_K).generate(SPEC_PROMPT, SPEC_NEW, temperature=0, **kw)
    return out.tokens, out.finished, (out.stats["rounds"], out.stats["accepted"])


def _quantized_copy(model, config):
    """The draft of ``generate --draft-quantize CONFIG`` without --draft-checkpoint."""
    from argparse import Namespace

    from fastzoo.llama.generate import _load_draft
    return _load_draft(Namespace(draft_checkpoint=None, draft_quantize=config), model, None, None, None)


def _speculative_results(res, kind, model, rank, qckpts, tiny_ckpt):
    """Speculative decoding under TP: the draft is the target, a quantized copy of its shard
    (int8), and for ``SPEC_KIND`` a TP-loaded int8 checkpoint (greedy, with a stop token, and
    sampled on both ranks with the same seed); plus an int4 copy of a tiny model's shard."""
    import torch.distributed as dist
    res[kind, "spec_same"] = _spec_run(model, model)
    res[kind, "spec_int8_copy"] = _spec_run(model, _quantized_copy(model, "int8"))
    if kind == SPEC_KIND:
        draft = load_tp_model(qckpts[f"int8-{kind}"], rank, WORLD, dtype=torch.float32)
        res["spec_int8_ckpt"] = _spec_run(model, draft)
        stop = [_spec_stop_id(res[kind, "greedy"])]
        res["spec_stop"] = _spec_run(model, draft, stop_ids=stop)
        # rank 0 alone finishes early: it must keep running rounds (collectives) until rank 1 is done
        every = [None] * WORLD
        dist.all_gather_object(every, _spec_run(model, draft, stop_ids=stop if rank == 0 else []))
        res["spec_rank0_stops"] = every
        torch.manual_seed(1234)  # every rank the same seed (as run_cli arranges)
        sampled = SpeculativeGenerator(model, draft, SPEC_K).generate(SPEC_PROMPT, SPEC_NEW, temperature=1.0,
                                                                       top_k=50)
        every = [None] * WORLD
        dist.all_gather_object(every, (sampled.tokens, sampled.stats["rounds"], sampled.stats["accepted"]))
        res["spec_sampled"] = every
    if tiny_ckpt is not None:
        tiny = load_tp_model(tiny_ckpt, rank, WORLD, dtype=torch.float32)
        res["spec_int4_copy"] = _spec_run(tiny, _quantized_copy(tiny, "int4-g32"))


def _spec_stop_id(greedy):
    """A stop token ending ``SPEC_PROMPT``'s greedy continuation after a few tokens (the first
    token from the 4th on that did not occur before)."""
    row = greedy[0]
    return next(t for i, t in enumerate(row) if i >= 3 and t not in row[:i])


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _worker(rank, init_file, ckpts, qckpts, tiny_ckpt, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res = {}
        for kind, ckpt in ckpts.items():
            model = load_tp_model(ckpt, rank, WORLD, dtype=torch.float32)
            with torch.no_grad():
                res[kind, "logits"] = model(_tokens())
            res[kind, "greedy"] = generate(model, PROMPTS, NEW).tokens
            g = Generator(model).generate(PROMPTS, STOP_NEW, stop_ids=_stop_ids(res[kind, "greedy"]),
                                          check_every=STOP_CHECK)
            res[kind, "stopped"] = (g.tokens, g.finished, g.steps)
            res[kind, "multi_token"] = _multi_token_logits(model)
            _speculative_results(res, kind, model, rank, qckpts, tiny_ckpt if kind == SPEC_KIND else None)
            if kind == COMPILED_KIND:
                res[kind, "compiled"] = _compiled_results(model)
            res[kind, "local"] = (model.config.n_heads, model.config.n_kv_heads,
                                  tuple(model.layers[0].attention.wqkv.weight.shape))
            if kind == COMPILED_KIND:  # the all-reduce choice on gloo / CPU
                res["allreduce_auto"] = (model.tp_allreduce, model.layers[0].attention.tp_symm)
                try:
                    load_tp_model(ckpt, rank, WORLD, dtype=torch.float32, allreduce="symm_mem")
                    res["symm_mem_error"] = None
                except LlamaError as e:
                    res["symm_mem_error"] = str(e)
                res["nccl_logits"] = load_tp_model(ckpt, rank, WORLD, dtype=torch.float32,
                                                   allreduce="nccl")(_tokens()).detach()
        for qkind, ckpt in qckpts.items():  # quantized checkpoints: quantize, then shard
            model = load_tp_model(ckpt, rank, WORLD, dtype=torch.float32)
            with torch.no_grad():
                res[qkind, "logits"] = model(_tokens())
            res[qkind, "greedy"] = generate(model, PROMPTS, NEW).tokens
            res[qkind, "modules"] = {name.rpartition(".")[2]: (type(m).__name__, {k: tuple(t.shape) for k, t in
                                                                                 m.state_dict().items()})
                                     for name, m in model.layers[0].named_modules()
                                     if name.endswith(("wqkv", "wo", "w13", "w2"))}
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def quantized(converted, tiktoken_file, tmp_path_factory):
    """{qkind: (float checkpoint, quantized checkpoint)}: int8 of the converted MHA and GQA models
    (written by ``quantize_checkpoint``) and int4 with group size 32 of a tiny GQA model whose
    row-parallel layers hold whole groups on each of 2 ranks (written by the quantize CLI)."""
    from fastzoo.llama.checkpoint import save_checkpoint
    from fastzoo.llama.quantize import main as quantize_main
    from fastzoo.llama.quantize import quantize_checkpoint
    d = tmp_path_factory.mktemp("tpq")
    out = {f"int8-{k}": (converted[k][1], quantize_checkpoint(converted[k][1], d / f"int8-{k}", "int8",
                                                              progress=False)) for k in KINDS}
    tiny = make_tiny_model(vocab_size=VOCAB)  # intermediate_size 128: w2's local width 64
    fp = save_checkpoint(tiny, tiny.config, d / "tiny", tokenizer_path=tiktoken_file)
    assert quantize_main(["--checkpoint", str(fp), "--out", str(d / "int4-g32"), "--mode", "int4",
                          "--group-size", "32", "--device", "cpu"]) == 0
    out["int4-g32"] = (fp, d / "int4-g32")
    return out


@pytest.fixture(scope="module")
def tp_results(converted, quantized, tmp_path_factory):
    import torch.multiprocessing as mp
    d = tmp_path_factory.mktemp("tp")
    ckpts = {k: str(converted[k][1]) for k in KINDS}
    qckpts = {k: str(quantized[k][1]) for k in QKINDS}
    tiny = str(quantized["int4-g32"][0])  # float tiny GQA model (int4-g32 fits each rank's w2)
    mp.spawn(_worker, args=(str(d / "init"), ckpts, qckpts, tiny, str(d / "out.pt")), nprocs=WORLD, join=True)
    return torch.load(d / "out.pt")


# ---------------------------------------------------------------------------- in-process
def test_heads_not_divisible_is_a_clear_error():
    cfg = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=172)
    with torch.device("meta"):
        model = Transformer(cfg)
    with pytest.raises(LlamaError) as e:
        shard_model_(model, 0, 4)
    msg = str(e.value)
    assert "4 tensor-parallel ranks" in msg and "num_attention_heads 4" in msg and "num_key_value_heads 2" in msg
    assert "intermediate_size" not in msg.split(" (")[0] and "divides 2," in msg, msg
    assert model.config.n_kv_heads == 2  # untouched
    cfg = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=4, intermediate_size=171)
    with torch.device("meta"):
        model = Transformer(cfg)
    with pytest.raises(LlamaError) as e:
        shard_model_(model, 1, 2)
    msg = str(e.value)  # the hint names every count, not only the head counts
    assert "intermediate_size 171" in msg and "num_key_value_heads" not in msg, msg
    assert "divides 1, the greatest common divisor of the head counts and intermediate_size" in msg, msg


def test_load_tp_model_error_names_heads(converted):
    with pytest.raises(LlamaError, match=r"num_key_value_heads 2.*over|over 4 .*num_key_value_heads 2"):
        load_tp_model(converted["gqa"][1], 0, 4)


@pytest.mark.parametrize("kind", [*KINDS, "int8-gqa", "int4-g32"])
def test_shards_partition_the_weights(converted, quantized, kind):
    """Each rank's wqkv / w13 tensors hold the rows of its heads / hidden units, its wo / w2
    tensors their input columns (packed int4 pairs, int4 groups) with int8's per-channel
    scales whole; the rest is replicated.  Sharding a loaded (float or quantized) model in
    place slices exactly like sharding the state dict."""
    ckpt = quantized[kind][1] if kind in QKINDS else converted[kind][1]
    ref = load_model(ckpt, dtype=torch.float32)
    cfg = ref.config
    sd = ref.state_dict()
    q, kv, inter = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size
    parts = [shard_state_dict(sd, cfg, r, WORLD) for r in range(WORLD)]
    seen = set()
    for k, full in sd.items():
        got = [p[k] for p in parts]
        if ".attention.wqkv." in k:
            lq, lkv = q // WORLD, kv // WORLD
            for off, size, lo, lsize in [(0, q, 0, lq), (q, kv, lq, lkv), (q + kv, kv, lq + lkv, lkv)]:
                assert torch.equal(torch.cat([g[lo:lo + lsize] for g in got]), full[off:off + size]), k
        elif ".feed_forward.w13." in k:
            li = inter // WORLD
            assert torch.equal(torch.cat([g[:li] for g in got]), full[:inter]), k
            assert torch.equal(torch.cat([g[li:] for g in got]), full[inter:]), k
        elif k.endswith(("attention.wo.scales", "feed_forward.w2.scales")) and full.dim() == 1:
            assert all(torch.equal(g, full) for g in got), k  # int8 per-channel scales
        elif ".attention.wo." in k or ".feed_forward.w2." in k:
            assert all(g.shape[1] == full.shape[1] // WORLD for g in got), k
            assert torch.equal(torch.cat(got, dim=1), full), k
        else:
            assert all(torch.equal(g, full) for g in got), k  # replicated
        seen.add(k.rpartition(".")[2])
    assert seen == {"weight"} | ({"scales"} if kind.startswith("int8") else set()) | \
        ({"scales", "zeros"} if kind.startswith("int4") else set())
    m = load_model(ckpt, dtype=torch.float32)
    shard_model_(m, 1, WORLD)
    assert m.config.n_heads == cfg.n_heads // WORLD and m.config.n_kv_heads == cfg.n_kv_heads // WORLD
    assert m.tp_config.n_heads == cfg.n_heads
    local = m.state_dict()
    assert local.keys() == parts[1].keys()
    for name, t in local.items():
        assert t.dtype == parts[1][name].dtype and torch.equal(t, parts[1][name]), name


def test_int4_group_must_fit_the_local_width():
    """int4 row-parallel layers split K by whole groups: a clear error names the layer, the local
    width and the group size when it does not divide (building the model and slicing tensors)."""
    from fastzoo.llama.tp import shard_tensor
    from fastzoo.quant import quantize_
    cfg = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=160)
    with torch.device("meta"):
        model = quantize_(Transformer(cfg), "int4-g32")  # 160 = 5 groups: fine on one rank
    with pytest.raises(LlamaError) as e:
        shard_model_(model, 0, WORLD)
    msg = str(e.value)
    assert "layers.0.feed_forward.w2" in msg and "group size 32" in msg and "local input width 80" in msg, msg
    with pytest.raises(LlamaError, match=r"layers.0.feed_forward.w2.scales over 2 .*local input width 80 is not a "
                                         r"multiple of the group size 32"):
        shard_tensor("layers.0.feed_forward.w2.scales", torch.ones(64, 5), cfg, 0, WORLD)


# ---------------------------------------------------------------------------- 2 ranks
@pytest.mark.parametrize("kind", KINDS)
def test_tp_logits_match_single_process(converted, tp_results, kind):
    ref = load_model(converted[kind][1], dtype=torch.float32)
    with torch.no_grad():
        want = ref(_tokens())
    got = tp_results[kind, "logits"]
    assert got.shape == want.shape
    assert _rel_err(got, want) <= 1e-5
    n_heads, n_kv, wqkv_shape = tp_results[kind, "local"]
    cfg = ref.config
    assert (n_heads, n_kv) == (cfg.n_heads // WORLD, cfg.n_kv_heads // WORLD)
    assert wqkv_shape == ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim // WORLD, cfg.dim)


@pytest.mark.parametrize("kind", KINDS)
def test_tp_greedy_generation_matches(converted, tp_results, kind):
    ref = load_model(converted[kind][1], dtype=torch.float32)
    want = generate(ref, PROMPTS, NEW).tokens
    assert tp_results[kind, "greedy"] == want
    assert all(len(t) == NEW for t in want)


@pytest.mark.parametrize("qkind", QKINDS)
def test_tp_quantized_checkpoint_matches_single_process(quantized, tp_results, qkind):
    """A quantized checkpoint (int8, int4) loaded under TP (quantize, then shard: every rank holds
    the single-process quantized values) gives the single-process quantized logits up to the
    all-reduce's summation order, and the same greedy tokens."""
    fp_ckpt, ckpt = quantized[qkind]
    ref = load_model(ckpt, dtype=torch.float32)
    with torch.no_grad():
        want = ref(_tokens())
        fp = load_model(fp_ckpt, dtype=torch.float32)(_tokens())
    got = tp_results[qkind, "logits"]
    assert got.shape == want.shape
    assert _rel_err(got, want) <= 1e-5
    assert _rel_err(want, fp) > 1e-3  # really quantized: far from the float model at this tolerance
    assert tp_results[qkind, "greedy"] == generate(ref, PROMPTS, NEW).tokens
    # the quantized module types, with the local shapes
    cls = "Int8WeightOnlyLinear" if qkind.startswith("int8") else "Int4WeightOnlyLinear"
    att, ff = ref.layers[0].attention, ref.layers[0].feed_forward
    single = {"wqkv": att.wqkv, "wo": att.wo, "w13": ff.w13, "w2": ff.w2}
    assert tp_results[qkind, "modules"].keys() == single.keys()
    for name, (tp_cls, shapes) in tp_results[qkind, "modules"].items():
        assert tp_cls == type(single[name]).__name__ == cls
        full = {k: tuple(t.shape) for k, t in single[name].state_dict().items()}
        assert shapes.keys() == full.keys()
        for k, (n, *rest) in full.items():
            if name in ("wo", "w2"):  # row-parallel: K (in its units) split, 1-D per-channel scales whole
                want_shape = (n, rest[0] // WORLD) if rest else (n,)
            else:  # column-parallel: output rows split
                want_shape = (n // WORLD, *rest)
            assert shapes[k] == want_shape, (name, k, shapes[k], want_shape)


@pytest.mark.parametrize("kind", KINDS)
def test_tp_stop_tokens_end_every_rank_at_the_same_step(converted, tp_results, kind):
    """With stop tokens the TP loop stops (at the same step on both ranks, or the job would
    hang) exactly where the single-process loop does."""
    ref = load_model(converted[kind][1], dtype=torch.float32)
    stop = _stop_ids(tp_results[kind, "greedy"])
    out = Generator(ref).generate(PROMPTS, STOP_NEW, stop_ids=stop, check_every=STOP_CHECK)
    assert tp_results[kind, "stopped"] == (out.tokens, out.finished, out.steps)
    assert all(out.finished) and out.steps < STOP_NEW - 1  # really stopped early


@pytest.mark.parametrize("kind", KINDS)
def test_tp_multi_token_cached_forward_matches(converted, tp_results, kind):
    """K tokens per sequence at per-sequence positions through the KV cache (speculative
    decoding's verification step) give the single-process logits."""
    ref = load_model(converted[kind][1], dtype=torch.float32)
    want = _multi_token_logits(ref)
    got = tp_results[kind, "multi_token"]
    assert got.shape == want.shape == (len(PROMPTS), len(DRAFT[0]), VOCAB)
    assert _rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_tp_speculative_greedy_equals_single_process_target(converted, tp_results, kind):
    """Greedy speculative decoding under TP (k = 3) gives the single-process greedy target's
    tokens with the target as its own draft (every draft accepted, as in one process) and with
    a quantized copy of the rank's shard as the draft (--draft-quantize int8 under torchrun)."""
    ref = load_model(converted[kind][1], dtype=torch.float32)
    want = Generator(ref).generate(SPEC_PROMPT, SPEC_NEW, temperature=0).tokens
    assert len(want[0]) == SPEC_NEW
    tokens, finished, (rounds, accepted) = tp_results[kind, "spec_same"]
    assert tokens == want and finished == [False]
    assert (rounds, accepted) == _spec_run(ref, ref)[2]
    assert accepted == SPEC_K * rounds and rounds < SPEC_NEW - 1  # really speculated: several tokens per round
    tokens, finished, (rounds, accepted) = tp_results[kind, "spec_int8_copy"]
    assert tokens == want and finished == [False]
    assert 0 <= accepted <= SPEC_K * rounds and rounds <= SPEC_NEW - 1


def test_tp_speculative_quantized_drafts_match_single_process(converted, quantized, tp_results):
    """Drafts equal to their single-process counterparts give the single-process rounds and
    acceptances, not only its tokens: an int8 checkpoint loaded with load_tp_model (quantize,
    then shard), and int4 (group 32) quantization of the rank's shard of a float model (each
    group within one rank's slice, so the draft is the single-process int4 draft)."""
    import copy

    from fastzoo.quant import quantize_
    ref = load_model(converted[SPEC_KIND][1], dtype=torch.float32)
    draft = load_model(quantized[f"int8-{SPEC_KIND}"][1], dtype=torch.float32)
    want = _spec_run(ref, draft)
    assert want[0] == Generator(ref).generate(SPEC_PROMPT, SPEC_NEW, temperature=0).tokens
    assert tp_results["spec_int8_ckpt"] == want
    tiny = load_model(quantized["int4-g32"][0], dtype=torch.float32)
    want = _spec_run(tiny, quantize_(copy.deepcopy(tiny), "int4-g32"))
    assert want[0] == Generator(tiny).generate(SPEC_PROMPT, SPEC_NEW, temperature=0).tokens
    assert tp_results["spec_int4_copy"] == want
    rounds, accepted = want[2]
    assert 0 < accepted < SPEC_K * rounds  # both paths: accepted drafts and corrections


def test_tp_speculative_stops_and_samples_in_lockstep(converted, tp_results):
    """With a stop token, speculative TP decoding stops where the single-process target does;
    when only rank 0 is done, it keeps running rounds until rank 1 is (the stop decision is
    all-reduced; otherwise the job would hang); sampled with one seed, both ranks emit the
    same tokens."""
    ref = load_model(converted[SPEC_KIND][1], dtype=torch.float32)
    stop = _spec_stop_id(tp_results[SPEC_KIND, "greedy"])
    want = Generator(ref).generate(SPEC_PROMPT, SPEC_NEW, temperature=0, stop_ids=[stop])
    tokens, finished, _ = tp_results["spec_stop"]
    assert (tokens, finished) == (want.tokens, want.finished) == (want.tokens, [True])
    assert len(tokens[0]) < SPEC_NEW - 1
    assert len(tokens[0]) >= 3
    # rank 0 alone done: it keeps running rounds until rank 1 is done (no hang). Rank 1's later
    # tokens are meaningless (the ranks' partial sums then come from different tokens: tensor
    # parallel ranks must decode the same tokens), its earlier ones are rank 0's
    r0, r1 = tp_results["spec_rank0_stops"]
    assert r0 == tp_results["spec_stop"]
    assert len(r1[0][0]) == SPEC_NEW and r1[1] == [False] and r1[0][0][:len(tokens[0])] == tokens[0]
    (t0, r0, a0), (t1, r1, a1) = tp_results["spec_sampled"]
    assert t0 == t1 and (r0, a0) == (r1, a1)
    assert len(t0[0]) == SPEC_NEW and r0 <= SPEC_NEW - 1


def test_speculative_draft_sharded_differently_is_an_error(converted):
    target = load_tp_model(converted["gqa"][1], 0, 1, dtype=torch.float32)
    draft = load_model(converted["gqa"][1], dtype=torch.float32)
    shard_model_(draft, 0, WORLD)  # a draft on 2 ranks, the target on 1
    with pytest.raises(LlamaError, match="draft is sharded over 2 tensor-parallel ranks, the target over 1"):
        SpeculativeGenerator(target, draft, SPEC_K)


@pytest.mark.parametrize("config", ["int8", "int4-g32"])
def test_quantizing_a_shard_vs_sharding_the_quantized_model(config):
    """--draft-quantize under torchrun quantizes the rank's shard of the target.  int4 (each
    group within one rank's input columns) and every column-parallel layer equal the rank's
    slice of the single-process quantization; int8's row-parallel wo / w2 take per-channel
    scales over the rank's columns only: smaller or equal, each weight within half a step."""
    import copy

    from fastzoo.quant import quantize_
    from llama_testutils import make_tiny_model
    full = make_tiny_model(vocab_size=VOCAB)
    single = quantize_(copy.deepcopy(full), config)
    for rank in range(WORLD):
        want = shard_model_(copy.deepcopy(single), rank, WORLD).state_dict()
        shard = shard_model_(copy.deepcopy(full), rank, WORLD)
        got = quantize_(shard, config).state_dict()
        assert got.keys() == want.keys()
        differ = {k for k in got if not torch.equal(got[k], want[k])}
        if config == "int4-g32":
            assert not differ, sorted(differ)
            continue
        assert differ == {f"layers.{i}.{m}.{p}" for i in range(full.config.n_layers)
                          for m in ("attention.wo", "feed_forward.w2") for p in ("weight", "scales")}, sorted(differ)
        float_sd = shard_model_(copy.deepcopy(full), rank, WORLD).state_dict()
        for k in differ:
            if k.endswith(".scales"):
                assert (got[k] <= want[k]).all() and (got[k] < want[k]).any(), k
            else:
                s = got[k.replace("weight", "scales")][:, None]
                assert ((got[k].float() * s - float_sd[k]).abs() <= s / 2 + 1e-6).all(), k


def test_tp_compiled_matches_eager(converted, tp_results):
    """torch.compile(fullgraph=True) traces the all-reduces (functional collectives: one per
    block half, no graph break) and gives the eager TP logits and tokens."""
    tokens, eager, compiled, counts = tp_results[COMPILED_KIND, "compiled"]
    n_layers = load_model(converted[COMPILED_KIND][1], dtype=torch.float32).config.n_layers
    assert counts and all(c == 2 * n_layers for c in counts), counts  # prefill, decode, forward graphs
    assert len(counts) == 3, counts
    assert tokens == tp_results[COMPILED_KIND, "greedy"]
    assert _rel_err(compiled, eager) <= 1e-6


def test_tp_allreduce_choice_on_cpu(converted, tp_results):
    """On gloo / CPU, "auto" picks the functional collective (the logits above are its), an
    explicit "nccl" gives the same logits, and an explicit "symm_mem" is an error naming why."""
    assert tp_results["allreduce_auto"] == ("nccl", None)
    torch.testing.assert_close(tp_results["nccl_logits"], tp_results[COMPILED_KIND, "logits"], rtol=0, atol=0)
    msg = tp_results["symm_mem_error"]
    assert msg is not None and "symm_mem all-reduce was requested but is not available" in msg and "needs CUDA GPUs" in msg, msg


def test_setup_allreduce_rejects_unknown_choice(converted):
    from fastzoo.llama.tp import setup_allreduce_
    model = load_tp_model(converted["gqa"][1], 0, 1, dtype=torch.float32)
    assert model.tp_allreduce == "none"  # one rank: nothing to reduce
    with pytest.raises(LlamaError, match="unknown all-reduce 'mpi'.*auto, nccl, symm_mem"):
        setup_allreduce_(model, "mpi")


@pytest.fixture
def fake_collective(monkeypatch):
    """Replaces the functional all-reduce by a doubling that records its calls."""
    import torch.distributed._functional_collectives as funcol
    calls = []

    def fake_all_reduce(y, op, group):
        calls.append((op, group))
        return y * 2

    monkeypatch.setattr(funcol, "all_reduce", fake_all_reduce)
    return calls


def test_all_reduce_static_choice(fake_collective):
    """The choice of the traced all-reduce, from static facts: no spec, another dtype, a message
    larger than the buffer or not a whole number of 16-byte vectors go to the collective."""
    from fastzoo.llama import _allreduce
    group = object()
    spec = ("symm_mem", "g", torch.float32, 64)
    for y, s in [(torch.ones(2, 8), None), (torch.ones(2, 8, dtype=torch.float64), spec),
                 (torch.ones(5, 16), spec), (torch.ones(1, 3), spec),
                 (torch.ones(5, 16), ("lamport", "g", torch.float32, 64))]:
        fake_collective.clear()
        out = _allreduce.all_reduce(y, group, s)
        assert fake_collective == [("sum", group)] and torch.equal(out, 2 * y)


def test_symm_mem_all_reduce_traces_into_one_graph(fake_collective):
    """torch.compile(fullgraph=True) through AOT autograd (fake tensors, functionalisation: the
    path inductor takes) keeps the symm_mem custom op as one node, its fake impl giving the
    output's shape; a message over the buffer becomes the collective in the same graph; the
    lamport op takes its residual (no separate add)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    from fastzoo.llama._allreduce import all_reduce
    graphs = []

    def backend(gm, example_inputs):
        def fw(g, inputs):
            graphs.append(g)
            return lambda *a: [torch.zeros(n.meta["val"].shape) for n in g.graph.find_nodes(op="output")[0].args[0]]
        return aot_module_simplified(gm, example_inputs, fw_compiler=fw)

    spec = ("symm_mem", "tp_group_7", torch.float32, 256)
    w = torch.randn(8, 16)

    def step(h):
        small = all_reduce(h @ w, None, spec)        # 4 x 16 floats: symm_mem
        big = all_reduce(h.repeat(1, 40), None, spec)  # 4 x 320 floats > 256: the collective
        lamport = all_reduce(small, None, ("lamport",) + spec[1:], residual=h @ w)  # one op, the residual in it
        return small, big, lamport

    torch._dynamo.reset()
    try:
        small, big, lamport = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)(torch.randn(4, 8))
    finally:
        torch._dynamo.reset()
    assert small.shape == (4, 16) and big.shape == (4, 320) and lamport.shape == (4, 16)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    symm = [t for t in targets if "symm_mem_all_reduce" in t]
    assert symm == ["fastzoo.symm_mem_all_reduce.default"], targets
    assert [t for t in targets if "lamport" in t] == ["fastzoo.lamport_all_reduce.default"], targets
    assert sum(t.startswith("aten.add") for t in targets) == 0, targets  # the residual is in the op
    assert len(fake_collective) == 1  # the big message, traced through the (faked) collective


# ---------------------------------------------------------------------------- 2 GPUs (NCCL)
def _no_multicast():
    """NVLink multicast (NVLS) stays off on the test machines, for NCCL and symmetric memory."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"


@contextlib.contextmanager
def _cuda_rank(rank: int, init_file: str):
    """Within the block: this rank's GPU (yielded) and its NCCL process group (multicast
    off), destroyed on exit."""
    import torch.distributed as dist
    _no_multicast()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300), device_id=device)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _save_on_rank0(res, out) -> None:
    """Gather every rank's ``res`` and save the list on rank 0."""
    import torch.distributed as dist
    every = [None] * WORLD
    dist.all_gather_object(every, res)
    if dist.get_rank() == 0:
        torch.save(every, out)


def _cuda_worker(rank, init_file, ckpt, out, allreduce):
    from torch._dynamo.utils import counters
    with _cuda_rank(rank, init_file) as device:
        model = load_tp_model(ckpt, rank, WORLD, device=device, dtype=torch.float32, allreduce=allreduce)
        res = {"eager": generate(model, PROMPTS, NEW).tokens, "allreduce": model.tp_allreduce}
        torch._dynamo.reset()
        counters.clear()
        gen = Generator(model, compile=True)  # inductor, CUDA graphs: as generate --compile
        res["compiled"] = gen.generate(PROMPTS, NEW).tokens
        stop = _stop_ids(res["eager"])
        g = gen.generate(PROMPTS, STOP_NEW, stop_ids=stop, check_every=STOP_CHECK)
        res["stopped"] = (g.tokens, g.finished)
        res["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
        _save_on_rank0(res, out)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,allreduce", [("gqa", "nccl"), ("gqa", "symm_mem"), ("int4-g32", "symm_mem"),
                                            ("gqa", "lamport"), ("int4-g32", "lamport")])
def test_tp_two_gpus_compiled_with_cuda_graphs(converted, quantized, tmp_path, kind, allreduce):
    """On 2 GPUs (NCCL, the one-shot symmetric-memory all-reduce or the lamport one): the decode step compiled as
    generate --compile (inductor, CUDA graphs, none skipped) gives the single-process greedy
    tokens, with and without stop tokens; a quantized (int4) checkpoint too."""
    import torch.multiprocessing as mp
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    ckpt = str(quantized[kind][1] if kind in QKINDS else converted[kind][1])
    mp.spawn(_cuda_worker, args=(str(tmp_path / "init"), ckpt, str(tmp_path / "out.pt"), allreduce),
             nprocs=WORLD, join=True)
    every = torch.load(tmp_path / "out.pt")
    ref = load_model(ckpt, device="cuda", dtype=torch.float32)
    want = generate(ref, PROMPTS, NEW).tokens
    out = Generator(ref).generate(PROMPTS, STOP_NEW, stop_ids=_stop_ids(want), check_every=STOP_CHECK)
    for res in every:  # every rank
        assert res["allreduce"] == allreduce
        assert res["cudagraph_skips"] == 0
        assert res["eager"] == want and res["compiled"] == want
        assert res["stopped"] == (out.tokens, out.finished) and all(out.finished)


def _cuda_spec_worker(rank, init_file, ckpt, out, allreduce):
    from torch._dynamo.utils import counters
    with _cuda_rank(rank, init_file) as device:
        model = load_tp_model(ckpt, rank, WORLD, device=device, dtype=torch.float32, allreduce=allreduce)
        greedy = generate(model, SPEC_PROMPT, SPEC_NEW).tokens
        torch._dynamo.reset()
        counters.clear()
        # as generate --compile --speculate-k 3 --draft-quantize int8 under torchrun
        gen = SpeculativeGenerator(model, _quantized_copy(model, "int8"), SPEC_K, compile=True)
        res = {"greedy": greedy, "allreduce": model.tp_allreduce}
        out_ = gen.generate(SPEC_PROMPT, SPEC_NEW, temperature=0)
        res["compiled"] = (out_.tokens, out_.stats["rounds"], out_.stats["accepted"])
        stopped = gen.generate(SPEC_PROMPT, SPEC_NEW, temperature=0, stop_ids=[_spec_stop_id(greedy)])
        res["stopped"] = (stopped.tokens, stopped.finished)
        res["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
        _save_on_rank0(res, out)


@pytest.mark.cuda
@pytest.mark.parametrize("allreduce", ["nccl", "symm_mem", "lamport"])
def test_tp_two_gpus_speculative_compiled(converted, tmp_path, allreduce):
    """On 2 GPUs, speculative decoding compiled as generate --compile (inductor, CUDA graphs: the
    draft step and the verify forward) with an int8 copy of each rank's shard as the draft gives
    the single-process greedy tokens on every rank, and stops at a stop token (the stop decision
    lags one round on CUDA: the extra rounds must stay within the KV cache)."""
    import torch.multiprocessing as mp
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    ckpt = str(converted[SPEC_KIND][1])
    mp.spawn(_cuda_spec_worker, args=(str(tmp_path / "init"), ckpt, str(tmp_path / "out.pt"), allreduce),
             nprocs=WORLD, join=True)
    ref = load_model(ckpt, device="cuda", dtype=torch.float32)
    want = generate(ref, SPEC_PROMPT, SPEC_NEW).tokens
    stop = _spec_stop_id(want)
    want_stop = Generator(ref).generate(SPEC_PROMPT, SPEC_NEW, temperature=0, stop_ids=[stop])
    every = torch.load(tmp_path / "out.pt")
    for res in every:
        assert res["allreduce"] == allreduce and res["cudagraph_skips"] == 0
        assert res["greedy"] == want and res["compiled"][0] == want
        assert res["stopped"] == (want_stop.tokens, [True])
    assert every[0]["compiled"] == every[1]["compiled"]


def _symm_worker(rank, init_file, out):
    """symm_mem vs NCCL on random bf16 tensors: eager, and a compiled function (inductor,
    fullgraph) replayed under CUDA graphs (mode="reduce-overhead")."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from fastzoo.llama._allreduce import _BUFFERS, all_reduce, setup_symm_mem, symm_mem_backend, symm_mem_problem
    with _cuda_rank(rank, init_file) as device:
        group = dist.group.WORLD
        res = {"problem": symm_mem_problem(device, group)}
        spec = setup_symm_mem(group, device, torch.bfloat16, max_bytes=64 * 1024)
        res["backend"], res["numel"] = symm_mem_backend(device), spec[3]
        buf = _BUFFERS[spec[1], torch.bfloat16, rank]

        def staged(x):  # the symm_mem path ran on x: x is what the symmetric buffer holds now
            return _rel_err(buf[:x.numel()].view(x.shape), x) if x.numel() <= buf.numel() else None

        g = torch.Generator(device=device).manual_seed(100 + rank)
        res["eager"] = []
        for shape in [(1, 1, 4096), (3, 1, 4096), (2, 5, 1000), (1, 1, 2 * spec[3])]:  # the last: NCCL
            x = torch.randn(shape, dtype=torch.bfloat16, device=device, generator=g)
            want = x.clone()
            dist.all_reduce(want)
            res["eager"].append((shape, (all_reduce(x, group, spec) - want).abs().max().item(), staged(x)))
        w = torch.randn(256, 4096, dtype=torch.bfloat16, device=device, generator=g)

        def step(h):
            return all_reduce(h @ w, group, spec) * 0.5

        counters.clear()
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        res["compiled"] = []
        for _ in range(6):  # warm-up, capture, replays
            h = torch.randn(2, 1, 256, dtype=torch.bfloat16, device=device, generator=g)
            want = h @ w
            dist.all_reduce(want)
            got = compiled(h).clone()
            res["compiled"].append((_rel_err(got, want * 0.5), staged(h @ w)))
        res["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
        _save_on_rank0(res, out)


def _spawn_on_gpus(worker, tmp_path):
    """Run ``worker(rank, init_file, out)`` on WORLD GPUs (skip with fewer); every rank's results."""
    import torch.multiprocessing as mp
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=WORLD, join=True)
    return torch.load(tmp_path / "out.pt")


@pytest.mark.cuda
def test_symm_mem_all_reduce_equals_nccl_two_gpus(tmp_path):
    for res in _spawn_on_gpus(_symm_worker, tmp_path):
        assert res["problem"] is None
        assert res["backend"] in (None, "CUDA"), res["backend"]
        # two ranks: one correctly rounded addition either way, so the sums are equal
        assert all(d == 0 for _, d, _ in res["eager"]), res["eager"]
        assert [st == 0 for _, _, st in res["eager"][:3]] == [True] * 3, res["eager"]  # through symm_mem
        assert res["eager"][3][2] is None  # larger than the buffer: NCCL
        assert len(res["compiled"]) == 6, res["compiled"]
        assert all(e <= 1e-2 and st <= 1e-2 for e, st in res["compiled"]), res["compiled"]  # symm_mem in the graph
        assert res["cudagraph_skips"] == 0


def _lamport_worker(rank, init_file, out):
    """lamport vs NCCL on random tensors (bf16, fp32) of many sizes, with and without a residual,
    eager calls back to back, and a compiled chain of 64 dependent calls (inductor, fullgraph)
    replayed under CUDA graphs; after each phase the buffers hold only the sentinel again."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from fastzoo.llama._allreduce import _LAMPORT, all_reduce, setup_lamport
    with _cuda_rank(rank, init_file) as device:
        group = dist.group.WORLD
        res = {"eager": [], "compiled": [], "clean": []}
        g = torch.Generator(device=device).manual_seed(200 + rank)
        for dtype in (torch.bfloat16, torch.float32):
            spec = setup_lamport(group, device, dtype, max_bytes=64 * 1024)
            state = _LAMPORT[spec[1], dtype, rank]
            ibits = state.buf.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
            for i, shape in enumerate([(1, 1, 4096), (3, 1, 4096), (1, 7), (1, 1), (2, 5, 1000),
                                       (1, spec[3]), (1, 1, 4096), (1, 1, 2 * spec[3])]):  # the last: NCCL
                x = torch.randn(shape, dtype=dtype, device=device, generator=g)
                x.view(-1)[0] = -0.0
                r = torch.randn(shape, dtype=dtype, device=device, generator=g) if i % 2 and i < 7 else None
                want = x.float()
                dist.all_reduce(want)
                want = (want if r is None else want + r.float()).to(dtype)
                res["eager"].append((str(dtype), shape, (all_reduce(x, group, spec, residual=r) - want).abs().max().item()))
            torch.cuda.synchronize(device)
            res["clean"].append(bool((ibits == torch.iinfo(ibits.dtype).min).all()))
        w = torch.randn(256, 256, dtype=torch.bfloat16, device=device, generator=g) / 64  # |h| grows ~1.06x a step
        spec = setup_lamport(group, device, torch.bfloat16, max_bytes=64 * 1024)

        def step(h):  # a decode step's pattern: a chain of dependent all-reduces, each plus a residual
            for _ in range(64):
                h = all_reduce(h @ w, group, spec, residual=h)
            return h

        def want_step(h):
            for _ in range(64):
                y = (h @ w).float()
                dist.all_reduce(y)
                h = (y + h.float()).to(h.dtype)
            return h

        counters.clear()
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        for _ in range(6):  # warm-up, capture, replays
            h = torch.randn(2, 1, 256, dtype=torch.bfloat16, device=device, generator=g)
            got = compiled(h).clone()
            res["compiled"].append(((got.float() - want_step(h).float()).abs().max().item(),
                                    got.float().abs().max().item()))
            every = [None] * WORLD
            dist.all_gather_object(every, got.cpu())
            res["compiled"][-1] += (all(torch.equal(e, every[0]) for e in every),)
        torch.cuda.synchronize(device)
        state = _LAMPORT[spec[1], torch.bfloat16, rank]
        res["clean"].append(bool((state.buf.view(torch.int16) == -32768).all()))
        res["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
        _save_on_rank0(res, out)


@pytest.mark.cuda
def test_lamport_all_reduce_equals_nccl_two_gpus(tmp_path):
    for res in _spawn_on_gpus(_lamport_worker, tmp_path):
        # two ranks: the fp32 sum of two values and the residual, rounded once, as computed here
        assert all(d == 0 for _, _, d in res["eager"]), res["eager"]
        assert res["clean"] == [True, True, True], res["clean"]
        assert len(res["compiled"]) == 6
        # 64 chained steps, the reference rounded as the kernel rounds (inductor's GEMM may differ in
        # the last bits, which the chain carries): close, and the same bits on every rank
        assert all(e <= 0.02 * max(m, 1) and same for e, m, same in res["compiled"]), res["compiled"]
        assert res["cudagraph_skips"] == 0


# ---------------------------------------------------------------------------- torchrun CLI
REPO = Path(__file__).resolve().parents[2]


def _python(*argv, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    launch = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.run([sys.executable, *launch, "-m", "fastzoo.llama.generate", *map(str, argv)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.parametrize("kind", ["gqa", "int4-g32"])
def test_torchrun_cli_only_rank0_prints(converted, quantized, kind):
    """torchrun generate on 2 ranks prints once what the single process prints; a quantized
    checkpoint (int4, written by the quantize CLI) loads under torchrun with no extra flag."""
    ckpt = quantized[kind][1] if kind in QKINDS else converted[kind][1]
    args = ["--checkpoint", ckpt, "--prompt", "hello world", "--max-new-tokens", 6, "--temperature", 0,
            "--device", "cpu"]
    r = _python(*args, nproc=WORLD)
    if r.returncode != 0:  # one retry: a launcher hiccup (port, rendezvous) on a loaded machine
        r = _python(*args, nproc=WORLD)
    assert r.returncode == 0, r.stderr[-3000:]
    single = _python(*args)
    assert single.returncode == 0, single.stderr[-3000:]
    assert r.stdout == single.stdout, (r.stdout, single.stdout, r.stderr[-3000:])  # same text, printed once
    assert r.stderr.count("time to first token") == 1, r.stderr[-3000:]
    assert r.stderr.count("tensor parallel: 2 ranks, gloo, all-reduce: nccl") == 1, r.stderr[-3000:]  # auto on CPU


def test_torchrun_cli_four_ranks(converted):
    """torchrun generate on 4 ranks (one kv head each of the MHA model) prints what the single
    process prints."""
    args = ["--checkpoint", converted["mha"][1], "--prompt", "hello world", "--max-new-tokens", 6,
            "--temperature", 0, "--device", "cpu"]
    r = _python(*args, nproc=4)
    if r.returncode != 0:  # one retry: a launcher hiccup (port, rendezvous) on a loaded machine
        r = _python(*args, nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    single = _python(*args)
    assert single.returncode == 0, single.stderr[-3000:]
    assert r.stdout == single.stdout, (r.stdout, single.stdout, r.stderr[-3000:])
    assert r.stderr.count("tensor parallel: 4 ranks, gloo") == 1, r.stderr[-3000:]


def test_torchrun_cli_symm_mem_on_cpu_is_an_error(converted):
    r = _python("--checkpoint", converted["gqa"][1], "--prompt", "hi", "--device", "cpu",
                "--tp-allreduce", "symm_mem", nproc=WORLD)
    assert r.returncode != 0
    assert r.stderr.count("error: the symm_mem all-reduce was requested but is not available") == 1, r.stderr[-3000:]
    assert "needs CUDA GPUs" in r.stderr


def test_torchrun_cli_heads_not_divisible(converted):
    r = _python("--checkpoint", converted["mha"][1], "--prompt", "hi", "--device", "cpu", nproc=3)
    assert r.returncode != 0
    assert r.stderr.count("error: cannot shard the model over 3 tensor-parallel ranks") == 1, r.stderr[-3000:]
    assert "num_attention_heads 4" in r.stderr


def test_torchrun_cli_speculative(converted, quantized):
    """torchrun generate --speculate-k with --draft-checkpoint on 2 ranks: the draft (an int8
    checkpoint) is loaded sharded by the same loader as the target; greedy, it prints the
    single-process target's text once, and the acceptance rate once (rank 0).  (The
    --draft-quantize path, a quantized copy of the shard, runs in the gloo tests above.)"""
    args = ["--checkpoint", converted[SPEC_KIND][1], "--prompt", "hello world", "--max-new-tokens", 8,
            "--temperature", 0, "--device", "cpu"]
    spec = [*args, "--speculate-k", SPEC_K, "--draft-checkpoint", quantized[f"int8-{SPEC_KIND}"][1]]
    r = _python(*spec, nproc=WORLD)
    if r.returncode != 0:  # one retry: a launcher hiccup (port, rendezvous) on a loaded machine
        r = _python(*spec, nproc=WORLD)
    assert r.returncode == 0, r.stderr[-3000:]
    single = _python(*args)  # the target alone, one process
    assert single.returncode == 0, single.stderr[-3000:]
    assert r.stdout == single.stdout, (r.stdout, single.stdout, r.stderr[-3000:])
    assert r.stderr.count("speculative: acceptance rate") == 1, r.stderr[-3000:]
    assert r.stderr.count("time to first token") == 1, r.stderr[-3000:]
    assert r.stderr.count("tensor parallel: 2 ranks") == 1, r.stderr[-3000:]  # once, not again for the draft
