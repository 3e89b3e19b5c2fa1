"""build_sam_fast: regional / full compilation (counted with CPU backends) and the encoder
quantization options, on a tiny SAM."""
import copy

import pytest
import torch
from helpers import kernels_on_cpu, sqnr
from sam_testutils import randomize_
from torch import nn
from torch._dynamo.utils import counters

from fastzoo.quant import (Int8Dynamic, Int8DynamicLinear, Int8DynamicSparse24Linear, Int8Static, Int8StaticLinear,
                           Int4WeightOnlyLinear, Sparse24Linear, prune_2_4, quantize_image_encoder_)
from fastzoo.sam import build_sam_fast, build_sam_from_config
from fastzoo.sam import build as sam_build
from fastzoo.sam.build import compile_image_encoder

IMG = 128  # 8x8 token grid; window 4 -> 4 windows per image


def tiny_encoder(depth=4, global_idx=(1, 3), seed=0):
    torch.manual_seed(seed)
    sam = build_sam_from_config(32, depth, 2, global_idx, image_size=IMG, window_size=4)
    return randomize_(sam, seed).image_encoder.eval().requires_grad_(False)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("depth,global_idx", [(4, (1, 3)), (6, (2, 5))])
@torch.no_grad()
def test_regional_compile_one_graph_per_block_kind(fresh_dynamo, depth, global_idx):
    enc = tiny_encoder(depth, global_idx)
    ref = copy.deepcopy(enc)
    # a backend given by name gets a new wrapper object per block, as "inductor" does
    compile_image_encoder(enc, "regional", backend="eager")
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(enc(x), ref(x), rtol=1e-5, atol=1e-5)
    # windowed block + global block + patch embedding + neck, whatever the depth
    assert graphs() == 4
    x2 = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(enc(x2), ref(x2), rtol=1e-5, atol=1e-5)
    assert graphs() == 4, "a second batch of the same size recompiled"
    assert enc.state_dict().keys() == ref.state_dict().keys()


@torch.no_grad()
def test_regional_compile_many_batch_sizes_stay_compiled(fresh_dynamo):
    """Each new batch size adds one graph per region; past torch's default recompile limit (8 per
    code object, i.e. 4 batch sizes x 2 block kinds) they must still be compiled, not run eagerly."""
    enc = tiny_encoder()
    compile_image_encoder(enc, True, backend="eager")
    limit = torch._dynamo.config.recompile_limit
    for b in range(1, 6):
        enc(torch.randn(b, 3, IMG, IMG))
        assert graphs() == 4 * b
    assert torch._dynamo.config.recompile_limit == limit  # restored after the calls


@torch.no_grad()
def test_full_compile_one_graph(fresh_dynamo):
    enc = tiny_encoder()
    ref = copy.deepcopy(enc)
    compile_image_encoder(enc, "full", backend="eager")
    for _ in range(2):
        x = torch.randn(1, 3, IMG, IMG)
        torch.testing.assert_close(enc(x), ref(x), rtol=1e-5, atol=1e-5)
        assert graphs() == 1


def test_inductor_compiles_get_the_encoder_options_and_the_mode_as_options(monkeypatch):
    """torch.compile takes a mode or options, not both: with inductor the mode goes in as its
    options, after them ``INDUCTOR_OPTIONS``, then the caller's options; other backends get
    mode and options as given."""
    from fastzoo.sam.build import INDUCTOR_OPTIONS

    from torch._inductor import list_mode_options

    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append(kw))
    compile_image_encoder(tiny_encoder(depth=1, global_idx=(0,)), "regional", mode="max-autotune-no-cudagraphs",
                          options={"fx_graph_cache": True})
    assert len(calls) == 3  # patch embedding, one block, neck
    assert all("mode" not in kw and kw["backend"] == "inductor" and kw["dynamic"] is False for kw in calls)
    assert list_mode_options("max-autotune-no-cudagraphs")["max_autotune"] is True
    assert calls[0]["options"] == {**list_mode_options("max-autotune-no-cudagraphs"), **INDUCTOR_OPTIONS,
                                   "fx_graph_cache": True}
    for options, expected in ((None, {**INDUCTOR_OPTIONS, "fx_graph_cache": False}),  # multi-kernels: no FX cache
                              ({"triton.multi_kernel": 0}, {"triton.multi_kernel": 0})):
        calls.clear()
        compile_image_encoder(tiny_encoder(depth=1, global_idx=(0,)), "regional", mode="", options=options)
        assert calls[0]["options"] == expected
        torch._TorchCompileInductorWrapper(None, calls[0]["options"], False)  # inductor accepts the keys
    calls.clear()
    compile_image_encoder(tiny_encoder(depth=1, global_idx=(0,)), "regional", backend="eager", mode="default")
    assert calls[0] == {"backend": "eager", "dynamic": False, "mode": "default"}


def test_cuda_graph_modes_begin_a_step_per_call_and_copy_the_output_out(monkeypatch):
    """With a mode (or options) that turns on inductor's CUDA graphs, each encoder call begins a
    new cudagraph-tree step and returns a copy (callers may keep embeddings across calls: the
    graphs reuse their memory); without, the forward is left as it was."""
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: None)  # the regions stay eager here
    x = torch.randn(1, 3, IMG, IMG)
    for mode, options, marked in (("reduce-overhead", None, True), (None, {"triton.cudagraphs": True}, True),
                                  (None, None, False), ("max-autotune-no-cudagraphs", None, False)):
        steps.clear()
        enc = tiny_encoder(depth=1, global_idx=(0,)).eval()
        with torch.no_grad():
            want = enc(x)
            compile_image_encoder(enc, "regional", mode=mode, options=options)
            outs = [enc(x), enc(x)]
        assert steps == ([1, 1] if marked else []), (mode, options)
        assert all(torch.equal(o, want) for o in outs)
    # the copy out of the graphs' memory: a forward returning one fixed buffer gives new storage
    from fastzoo.sam.build import _cudagraph_steps
    fixed = torch.randn(3)
    got = _cudagraph_steps(lambda: fixed)()
    assert torch.equal(got, fixed) and got.data_ptr() != fixed.data_ptr()


def test_build_sam_fast_compiles_with_cuda_graphs_by_default_on_cuda():
    """Without a compile_mode, CUDA devices get CUDA graphs (one image at a time is host-bound
    otherwise), other devices torch's default mode; a given mode is kept."""
    from fastzoo.sam.build import default_compile_mode

    assert default_compile_mode("cuda", None) == "reduce-overhead"
    assert default_compile_mode(torch.device("cuda", 1), None) == "reduce-overhead"
    assert default_compile_mode("cpu", None) is None
    assert default_compile_mode("cuda", "default") == "default"
    assert default_compile_mode("cuda", "max-autotune-no-cudagraphs") == "max-autotune-no-cudagraphs"


def test_compile_and_quantize_argument_errors():
    with pytest.raises(ValueError, match="compile must be one of .*'regional', 'full'.*found 'partial'"):
        compile_image_encoder(tiny_encoder(), "partial")
    with pytest.raises(ValueError, match="compile must be one of"):
        build_sam_fast("vit_b", device="cpu", compile="max-autotune")
    with pytest.raises(ValueError, match="unknown quantize='int4'.*int8, sparse, int8\\+sparse, int8dq.*int8static"):
        build_sam_fast("vit_b", device="cpu", compile=False, quantize="int4")
    with pytest.raises(ValueError, match="unknown quantize='int4' for SAM's image encoder"):
        quantize_image_encoder_(tiny_encoder(), "int4")
    with pytest.raises(TypeError, match="quantize for SAM's image encoder expects .*got a int"):
        build_sam_fast("vit_b", device="cpu", compile=False, quantize=8)
    # SAM's attention has relative-position terms: the int8 attention kernel is refused, up front
    for q in ("int8dq-qattn", "int8static-qattn", Int8Dynamic(attention="int8"), Int8Static(attention="int8")):
        with pytest.raises(ValueError, match="attention='int8' is not available for SAM's image encoder.*"
                                             "expected None, one of int8, sparse, int8\\+sparse, int8dq"):
            build_sam_fast("vit_b", device="cpu", compile=False, quantize=q, calibration=[torch.zeros(1)])
    # static quantization needs calibration images; calibration is refused where it is not used
    for q in ("int8static", Int8Static(observer="percentile")):
        with pytest.raises(ValueError, match=f"quantize={q!r} needs calibration images.*calibration=batches".replace(
                "(", "\\(").replace(")", "\\)")):
            build_sam_fast("vit_b", device="cpu", compile=False, quantize=q)
    for q in (None, "int8", "int8dq"):
        with pytest.raises(ValueError, match=f"calibration= is used only by calibrated quantization.*found quantize={q!r}"):
            build_sam_fast("vit_b", device="cpu", compile=False, quantize=q, calibration=[torch.zeros(1)])


def _pruned_mlp_copy(enc, names):
    out = copy.deepcopy(enc)
    for blk in out.blocks:
        for name in names:
            lin = blk.get_submodule(name)
            lin.weight.copy_(prune_2_4(lin.weight))
    return out


@torch.no_grad()
def test_quantize_options_on_tiny_encoder():
    enc = tiny_encoder()
    x = torch.randn(1, 3, IMG, IMG)
    ref = enc(x)

    int8 = quantize_image_encoder_(copy.deepcopy(enc), "int8")
    for blk in int8.blocks:
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.lin1, blk.mlp.lin2):
            assert type(lin) is Int8DynamicLinear
    assert not any(type(m) is nn.Linear for m in int8.blocks.modules())
    assert sqnr(int8(x), ref) >= 20

    # sparse = the float model with its MLP weights 2:4-pruned (same math on the CPU)
    sparse = quantize_image_encoder_(copy.deepcopy(enc), "sparse")
    assert all(type(b.mlp.lin1) is Sparse24Linear and type(b.mlp.lin2) is Sparse24Linear for b in sparse.blocks)
    assert all(type(b.attn.qkv) is nn.Linear for b in sparse.blocks)
    pruned = _pruned_mlp_copy(enc, ("mlp.lin1", "mlp.lin2"))
    torch.testing.assert_close(sparse(x), pruned(x), rtol=1e-6, atol=1e-6)

    # int8+sparse = int8 dynamic on attention and on the pruned lin1, 2:4 on lin2
    both = quantize_image_encoder_(copy.deepcopy(enc), "int8+sparse")
    for b in both.blocks:
        assert type(b.attn.qkv) is Int8DynamicLinear and type(b.attn.proj) is Int8DynamicLinear
        assert type(b.mlp.lin1) is Int8DynamicSparse24Linear and type(b.mlp.lin2) is Sparse24Linear
    from fastzoo.quant import quantize_

    expected = _pruned_mlp_copy(enc, ("mlp.lin1", "mlp.lin2"))
    quantize_(expected, Int8Dynamic(), filter_fn=lambda m, fqn: (  # lin2 stays float in int8+sparse
        isinstance(m, nn.Linear) and fqn.startswith("blocks.") and not fqn.endswith("mlp.lin2")))
    torch.testing.assert_close(both(x), expected(x), rtol=1e-6, atol=1e-6)
    assert sqnr(both(x), pruned(x)) >= 20


@pytest.mark.parametrize("quantize,int8_linears", [("int8", 4), ("int8+sparse", 3)])
@torch.no_grad()
def test_int8_encoder_kernel_path_matches_reference_path(kernel_device, monkeypatch, quantize, int8_linears):
    """SAM's int8 dynamic linears through the Triton kernels (Triton's interpreter on the CPU)
    against the reference path, on the 4-D (B, H, W, C) token grids SAM's linears get: a
    windowed block (5x5 grid, 25 tokens, padded to 2x2 windows of 3 after qkv) and a global
    block. ``int8+sparse``: lin1 is int8 on the pruned weight (cuSPARSELt only on a GPU), lin2
    2:4 in float (no kernel on the CPU)."""
    if kernel_device.type == "cuda":
        pytest.skip("on a GPU the kernels run in test_quantize_options_cuda")
    torch.manual_seed(0)
    enc = randomize_(build_sam_from_config(32, 2, 2, (1,), image_size=80, window_size=3), 0).image_encoder
    enc = quantize_image_encoder_(enc.eval().requires_grad_(False), quantize)
    x = torch.randn(1, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    ref = enc(x)
    launched = kernels_on_cpu(monkeypatch, ("int8_mm", "quantize_rows"))
    out = enc(x)
    # per block: each int8 linear quantizes its rows, then runs the int8 GEMM with the fused epilogue
    assert sorted(set(launched)) == ["_int8_scaled_mm_kernel", "_quantize_rows_int8_kernel"]
    assert launched.count("_int8_scaled_mm_kernel") == launched.count("_quantize_rows_int8_kernel") == 2 * int8_linears
    db = sqnr(out, ref)
    print(f"\n{quantize} kernel path vs reference path: SQNR {db:.1f} dB")
    assert db >= 40, f"kernel path vs reference path: SQNR {db:.1f} dB"


def _calibration(n=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, IMG, IMG, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("quantize", ["int8", "int8dq", "int8static"])
@torch.no_grad()
def test_int8_mlps_run_gelu_in_lin1s_epilogue(quantize):
    """int8 dynamic / static MLPs become Int8GeluMlp: the same state dict (keys and values) and
    the same output as the module-by-module chain (lin1, nn.GELU, lin2) that quantize_ builds."""
    from fastzoo.quant import quantize_
    from fastzoo.quant.vit import Int8GeluMlp, _encoder_linears, resolve_image_encoder_quant

    enc = tiny_encoder()
    cal = _calibration() if quantize == "int8static" else None
    fused = quantize_image_encoder_(copy.deepcopy(enc), quantize, calibration=cal)
    cfg = resolve_image_encoder_quant(quantize)
    chain = copy.deepcopy(enc)
    if isinstance(cfg, str):
        cfg = Int8Dynamic()  # the "int8" plan: int8 dynamic on every linear
    quantize_(chain, cfg, filter_fn=_encoder_linears, calibration=cal)
    assert all(type(b.mlp) is Int8GeluMlp for b in fused.blocks)
    assert all(type(b.mlp).__name__ == "MLPBlock" for b in chain.blocks)
    sd, sd_chain = fused.state_dict(), chain.state_dict()
    assert list(sd) == list(sd_chain)
    assert all(torch.equal(sd[k], sd_chain[k]) for k in sd)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fused(x), chain(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_static_norms_write_int8_for_their_linears():
    """int8 static: each block's norm1 / norm2 becomes an Int8StaticLayerNorm that quantizes with
    the in_scale of the linear it feeds (qkv, lin1), read at each call (same state dict); the
    output is that of the module chain quantize_ builds (LayerNorm, then the linear's own
    quantization), also after a cast and a state-dict load of other scales (in place, and with
    assign=True); int8 dynamic keeps its LayerNorms, and so does a linear without a bias."""
    from fastzoo.quant import quantize_
    from fastzoo.quant.vit import Int8StaticLayerNorm, _encoder_linears

    enc = tiny_encoder()
    cal = _calibration()
    fused = quantize_image_encoder_(copy.deepcopy(enc), "int8static", calibration=cal)
    chain = copy.deepcopy(enc)
    quantize_(chain, Int8Static(), filter_fn=_encoder_linears, calibration=cal)
    for b in fused.blocks:
        assert type(b.norm1) is Int8StaticLayerNorm and b.norm1._reader[0] is b.attn.qkv
        assert type(b.norm2) is Int8StaticLayerNorm and b.norm2._reader[0] is b.mlp.lin1
    assert all(type(b.norm1) is nn.LayerNorm for b in chain.blocks)
    sd, sd_chain = fused.state_dict(), chain.state_dict()
    assert list(sd) == list(sd_chain) and all(torch.equal(sd[k], sd_chain[k]) for k in sd)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fused(x), chain(x), rtol=1e-5, atol=1e-5)
    other = {k: v * 2 if k.endswith("in_scale") else v for k, v in sd.items()}
    for assign in (False, True):
        for m in (fused, chain):  # casts replace every float buffer (the scales too), then a load
            m.half().float().load_state_dict(other, assign=assign)
        torch.testing.assert_close(fused(x), chain(x), rtol=1e-5, atol=1e-5)
        assert fused.blocks[0].mlp.lin1.in_scale.item() == 2 * sd["blocks.0.mlp.lin1.in_scale"].item()
    dyn = quantize_image_encoder_(copy.deepcopy(enc), "int8dq")
    assert all(type(b.norm1) is nn.LayerNorm and type(b.norm2) is nn.LayerNorm for b in dyn.blocks)
    no_bias = copy.deepcopy(enc)
    no_bias.blocks[0].attn.qkv.bias = None
    no_bias = quantize_image_encoder_(no_bias, "int8static", calibration=cal)
    assert type(no_bias.blocks[0].norm1) is nn.LayerNorm and type(no_bias.blocks[0].norm2) is Int8StaticLayerNorm
    compiled = torch.compile(fused.blocks[0], fullgraph=True, backend="eager")  # dynamo reads the held linear
    h = torch.randn(1, 4, 4, 32)
    torch.testing.assert_close(compiled(h), fused.blocks[0](h))


@pytest.mark.parametrize("proj", ["float", "int8static", "int8dq", "int8+sparse"])
@torch.no_grad()
def test_attention_adds_the_residual_in_projections_that_fuse_it(monkeypatch, proj):
    """``Attention(x, window, residual=r)`` is ``r + Attention(x, window)``; a projection that says
    it ``fuses_residual`` (fastzoo.quant's int8 linears) gets r in its call, one that does not
    (float, int8 + 2:4) is called without it."""
    from fastzoo.quant import quantize_
    from fastzoo.quant.sparse import Int8DynamicSparse24Linear

    enc = tiny_encoder(depth=1, global_idx=(0,))
    if proj == "int8+sparse":
        enc.blocks[0].attn.proj = Int8DynamicSparse24Linear.from_linear(enc.blocks[0].attn.proj)
    elif proj != "float":
        cal = _calibration(1) if proj == "int8static" else None
        quantize_(enc, Int8Static() if proj == "int8static" else Int8Dynamic(),
                  filter_fn=lambda m, fqn: fqn.endswith("attn.proj"), calibration=cal)
    attn = enc.blocks[0].attn
    seen = []
    forward = type(attn.proj).forward
    monkeypatch.setattr(type(attn.proj), "forward", lambda self, *a, **k: (seen.append(sorted(k)), forward(self, *a, **k))[1])
    gen = torch.Generator().manual_seed(2)
    x, r = (torch.randn(2, 5, 5, 32, generator=gen) for _ in range(2))
    torch.testing.assert_close(attn(x, 0, residual=r), r + attn(x, 0), rtol=1e-5, atol=1e-5)
    fuses = proj in ("int8static", "int8dq")
    assert seen[0] == (["residual"] if fuses else []) and seen[1] == []


@pytest.mark.parametrize("quantize", ["sparse", "int8+sparse", "weight-only int8", "int4-g32"])
def test_other_mlps_keep_their_modules(quantize):
    from fastzoo.quant import Int8WeightOnly
    from fastzoo.sam.modeling.common import MLPBlock

    quantize = Int8WeightOnly() if quantize == "weight-only int8" else quantize

    enc = quantize_image_encoder_(tiny_encoder(), quantize)
    assert all(type(b.mlp) is MLPBlock for b in enc.blocks)


@torch.no_grad()
def test_only_exact_gelu_mlp_blocks_of_int8_linears_are_fused():
    """Left as they are: a tanh GELU, an MLP with another child, a lin1 that has its own
    out_scale (it already writes int8 for something else)."""
    from fastzoo.quant.vit import Int8GeluMlp, _fuse_gelu_mlps
    from fastzoo.sam.modeling.common import MLPBlock

    enc = quantize_image_encoder_(tiny_encoder(depth=3, global_idx=(2,)), "int8static", calibration=_calibration(1))
    mlps = [b.mlp for b in enc.blocks]  # re-made into MLPBlocks below
    for b, m in zip(enc.blocks, mlps):
        b.mlp = MLPBlock(8, 8)
        b.mlp.lin1, b.mlp.lin2 = m.lin1, m.lin2
    enc.blocks[0].mlp.act = nn.GELU(approximate="tanh")
    enc.blocks[1].mlp.extra = nn.Identity()
    l1 = enc.blocks[2].mlp.lin1
    l1.out_scale = torch.ones(1)
    _fuse_gelu_mlps(enc)
    assert all(type(b.mlp) is MLPBlock for b in enc.blocks)
    l1.out_scale = None
    _fuse_gelu_mlps(enc)
    assert [type(b.mlp) for b in enc.blocks] == [MLPBlock, MLPBlock, Int8GeluMlp]


@torch.no_grad()
def test_static_gelu_mlp_returns_the_input_dtype_without_a_bias():
    """lin2 gets int8 from lin1; its output is x's dtype, not the bias-free default (bf16)."""
    from fastzoo.quant.vit import Int8GeluMlp
    from fastzoo.sam.modeling.common import MLPBlock

    torch.manual_seed(0)
    mlp = MLPBlock(16, 32)
    mlp.lin2 = nn.Linear(32, 16, bias=False)
    x = torch.randn(3, 16)
    chain = Int8GeluMlp(Int8StaticLinear.from_linear(mlp.lin1, x.abs().amax() / 127),
                        Int8StaticLinear.from_linear(mlp.lin2, torch.tensor(0.02)))
    assert chain(x).dtype == torch.float32 and chain(x, residual=x).dtype == torch.float32


@torch.no_grad()
def test_int8static_encoder_kernel_path_matches_reference_path(kernel_device, monkeypatch):
    """The static MLP's lin1 through the Triton kernel (GELU and int8 out in the epilogue, the
    interpreter on the CPU) against the reference path."""
    if kernel_device.type == "cuda":
        pytest.skip("on a GPU the kernels run in the cuda tests")
    enc = quantize_image_encoder_(tiny_encoder(depth=2, global_idx=(1,)), "int8static", calibration=_calibration(1))
    x = torch.randn(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    ref = enc(x)
    launched = kernels_on_cpu(monkeypatch, ("int8_mm", "layernorm_quant"))
    out = enc(x)
    # 2 blocks x (norm1 -> int8, qkv, proj, norm2 -> int8, lin1 + GELU -> int8, lin2)
    assert launched == ["_layernorm_quant_int8_kernel", "_int8_scaled_mm_kernel", "_int8_scaled_mm_kernel",
                        "_layernorm_quant_int8_kernel", "_int8_scaled_mm_kernel", "_int8_scaled_mm_kernel"] * 2
    db = sqnr(out, ref)
    assert db >= 40, f"kernel path vs reference path: SQNR {db:.1f} dB"


TINY = dict(encoder_embed_dim=32, encoder_depth=4, encoder_num_heads=2, encoder_global_attn_indexes=(1, 3),
            image_size=IMG, window_size=4)


@pytest.fixture
def tiny_sam_checkpoint(tmp_path, monkeypatch):
    """``build_sam_fast("vit_b", path)`` builds the tiny SAM of ``tiny_encoder`` with its random weights."""
    monkeypatch.setitem(sam_build.SAM_CONFIGS, "vit_b", TINY)
    torch.manual_seed(0)
    sam = randomize_(build_sam_from_config(**TINY), 0)
    path = tmp_path / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return path


@pytest.mark.parametrize("quantize,linear,min_db", [
    pytest.param("int8dq", Int8DynamicLinear, 25, id="int8dq"),
    pytest.param(Int8Dynamic(), Int8DynamicLinear, 25, id="Int8Dynamic()"),
    pytest.param("int8static", Int8StaticLinear, 20, id="int8static"),
    pytest.param(Int8Static(observer="percentile", percentile=99.9, weight="tensor"), Int8StaticLinear, 20,
                 id="Int8Static(percentile,tensor)"),
    pytest.param("int4-g32", Int4WeightOnlyLinear, 18, id="int4-g32"),
])
@torch.no_grad()
def test_build_sam_fast_quantize_configs_tiny(tiny_sam_checkpoint, quantize, linear, min_db):
    """Each ``fastzoo.quant`` config build_sam_fast accepts equals quantize_image_encoder_ on the
    same float model (calibration moved to the model's dtype), and is close to the float encoder."""
    kw = dict(device="cpu", dtype=torch.float32, compile=False)
    gen = torch.Generator().manual_seed(3)
    cal = [torch.randn(2, 3, IMG, IMG, generator=gen) for _ in range(2)]
    static = isinstance(quantize, Int8Static) or quantize == "int8static"
    calibration = dict(calibration=[c.double() for c in cal]) if static else {}  # any float dtype is cast
    x = torch.randn(2, 3, IMG, IMG, generator=gen)

    enc = build_sam_fast("vit_b", tiny_sam_checkpoint, quantize=quantize, **calibration, **kw).image_encoder
    for blk in enc.blocks:
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.lin1, blk.mlp.lin2):
            assert type(lin) is linear
    float_enc = build_sam_fast("vit_b", tiny_sam_checkpoint, **kw).image_encoder
    ref = float_enc(x)
    direct = quantize_image_encoder_(float_enc, quantize, calibration=cal if static else None)
    out = enc(x)
    torch.testing.assert_close(out, direct(x), rtol=0, atol=0)
    db = sqnr(out, ref)
    print(f"\ntiny SAM encoder {quantize}: SQNR {db:.1f} dB vs float")
    assert db >= min_db, f"{quantize}: SQNR {db:.1f} dB vs the float encoder"


def test_build_sam_fast_cpu_quantized_vit_b():
    """The real entry point on the CPU (fp32, no compile): right modules, encoder dtype kept."""
    sam = build_sam_fast("vit_b", device="cpu", dtype=torch.float32, compile=False, quantize="int8+sparse")
    blk = sam.image_encoder.blocks[0]
    assert type(blk.attn.qkv) is Int8DynamicLinear and type(blk.mlp.lin1) is Int8DynamicSparse24Linear
    assert type(blk.mlp.lin2) is Sparse24Linear and not blk.mlp.lin2.uses_semi_structured
    assert sam.dtype == torch.float32 and sam.device.type == "cpu"
    assert all(type(m) is nn.Linear for m in sam.mask_decoder.modules() if isinstance(m, nn.Linear))


# --------------------------------------------------------------------------- GPU
def _seeded_vit_b(**kw):
    torch.manual_seed(0)  # same random weights for every build
    return build_sam_fast("vit_b", device="cuda", dtype=torch.bfloat16, **kw)


@pytest.mark.cuda
@torch.no_grad()
def test_default_build_runs_cuda_graphs_and_keeps_each_calls_embeddings_cuda(fresh_dynamo):
    """build_sam_fast's defaults on the GPU (regional compile, CUDA graphs): one image at a time,
    each call's embeddings match the eager encoder's and stay valid after the next call."""
    eager = _seeded_vit_b(compile=False).image_encoder
    enc = _seeded_vit_b().image_encoder
    xs = [torch.randn(1, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    outs = [enc(x) for x in xs]  # warm-up, recording, replay
    kept = [o.clone() for o in outs]
    enc(torch.randn_like(xs[0]))  # a later replay must not overwrite what the callers hold
    for x, o, k in zip(xs, outs, kept):
        assert torch.equal(o, k)
        assert sqnr(o, eager(x)) >= 25  # bf16 fusion order differs from eager


@pytest.mark.cuda
@torch.no_grad()
def test_quantize_options_cuda():
    """vit_b bf16 on the GPU: int8 SQNR vs bf16; 2:4 paths vs the pruned dense model (same math)."""
    x = torch.randn(2, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    dense = _seeded_vit_b(compile=False)
    ref = dense.image_encoder(x)
    int8 = _seeded_vit_b(compile=False, quantize="int8").image_encoder(x)
    assert sqnr(int8, ref) >= 20
    pruned = _pruned_mlp_copy(dense.image_encoder, ("mlp.lin1", "mlp.lin2"))
    ref_pruned = pruned(x)
    sparse = _seeded_vit_b(compile=False, quantize="sparse").image_encoder
    assert all(b.mlp.lin1.uses_semi_structured and b.mlp.lin2.uses_semi_structured for b in sparse.blocks)
    out = sparse(x)
    print(f"2:4 on the MLPs, random weights: SQNR vs the dense model {sqnr(out, ref):.1f} dB")
    assert sqnr(out, ref_pruned) >= 25
    both = _seeded_vit_b(compile=False, quantize="int8+sparse").image_encoder
    print("int8 2:4 lin1 on cuSPARSELt:", both.blocks[0].mlp.lin1.uses_semi_structured)
    assert sqnr(both(x), ref_pruned) >= 18


@pytest.mark.cuda
@torch.no_grad()
def test_static_int8_cuda():
    """vit_b bf16 on the GPU: static int8 (calibrated on other random images, given on the CPU in
    fp32: build_sam_fast moves them) vs the bf16 encoder."""
    x = torch.randn(2, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    ref = _seeded_vit_b(compile=False).image_encoder(x)
    cal = [torch.randn(2, 3, 1024, 1024)]
    for q in ("int8static", Int8Static(observer="percentile")):
        enc = _seeded_vit_b(compile=False, quantize=q, calibration=cal).image_encoder
        assert type(enc.blocks[0].mlp.lin1) is Int8StaticLinear
        db = sqnr(enc(x), ref)
        print(f"vit_b {q}: image embeddings SQNR vs bf16 {db:.1f} dB")
        assert db >= 20


@pytest.mark.cuda
@torch.no_grad()
def test_regional_inductor_compile_cuda(fresh_dynamo):
    """Real inductor on the GPU, with the int8 + 2:4 modules inside the compiled blocks."""
    sam = _seeded_vit_b(compile=False, quantize="int8+sparse")
    enc = sam.image_encoder
    x = torch.randn(1, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    eager = enc(x)
    compile_image_encoder(enc, "regional")
    out = enc(x)
    assert graphs() == 4
    assert sqnr(out, eager) >= 25  # bf16 fusion order differs from eager
    enc(torch.randn_like(x))
    assert graphs() == 4


@pytest.fixture
def fused_and_plain_cpu(tiny_sam_checkpoint):
    """The tiny SAM built on the CPU in fp32 with kernel="fused" (the default) and "sdpa"."""
    kw = dict(device="cpu", dtype=torch.float32, compile=False)
    return (build_sam_fast("vit_b", tiny_sam_checkpoint, **kw),
            build_sam_fast("vit_b", tiny_sam_checkpoint, kernel="sdpa", **kw))


@torch.no_grad()
def test_fused_proj_is_the_plain_proj_where_its_kernel_does_not_apply(fused_and_plain_cpu, monkeypatch):
    """build_sam_fast(kernel="fused") turns on the attention projections' ``linear_act`` path (a
    plain model keeps proj + add); on the CPU it computes exactly ``residual + proj(y)``; a
    hooked proj, autocast or mixed dtypes take the module call."""
    import fastzoo.sam.modeling.image_encoder as ie

    fused, plain = fused_and_plain_cpu
    attns = [m for m in fused.image_encoder.modules() if isinstance(m, ie.Attention)]
    assert attns and all(a.fused_proj for a in attns)
    assert not any(a.fused_proj for a in plain.image_encoder.modules() if isinstance(a, ie.Attention))
    assert not ie.Attention.fused_proj  # off in a plain model (build_sam_vit_*, build_sam_model)
    attn = attns[0]
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(1, 4, 4, 32, generator=g), torch.randn(1, 4, 4, 32, generator=g)
    y = attn.attend(attn.qkv(x))
    calls = []
    orig = ie.ops.linear_act
    monkeypatch.setattr(ie.ops, "linear_act", lambda *a, **k: calls.append(1) or orig(*a, **k))
    assert torch.equal(attn(x, residual=r), r + attn.proj(y)) and calls == [1]
    seen = []
    hook = attn.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    assert torch.equal(attn(x, residual=r), r + attn.proj(y)) and calls == [1] and seen  # called as a module
    hook.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside proj: the module call
        out = attn(x, residual=r)
    assert calls == [1] and out.dtype == torch.float32
    assert torch.equal(attn(x, residual=r.double()), r.double() + attn.proj(y)) and calls == [1]


@torch.no_grad()
def test_fused_mlp_is_the_plain_mlp_where_its_kernel_does_not_apply(fused_and_plain_cpu):
    """build_sam_fast(kernel="fused") turns on the encoder MLPs' ``fastzoo.ops.linear_act`` path
    after quantization (not while calibrating); on the CPU it computes exactly what the plain
    MLP does (F.linear, F.gelu, the residual add)."""
    from fastzoo.sam.modeling.common import MLPBlock

    fused, plain = fused_and_plain_cpu
    mlps = [m for m in fused.image_encoder.modules() if isinstance(m, MLPBlock)]
    assert mlps and all(m.fused_mlp for m in mlps)
    assert not any(m.fused_mlp for m in plain.image_encoder.modules() if isinstance(m, MLPBlock))
    assert not any(m.fused_mlp for m in fused.mask_decoder.modules() if isinstance(m, MLPBlock))
    x = torch.randn(1, 4, 4, 32, generator=torch.Generator().manual_seed(4))
    block = fused.image_encoder.blocks[0]
    ref = block.mlp.lin2(block.mlp.act(block.mlp.lin1(x))) + x
    assert torch.equal(block.mlp(x, residual=x), ref)
    seen = []
    hook = block.mlp.lin2.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    assert torch.equal(block.mlp(x, residual=x), ref) and seen == [(1, 4, 4, 128)]  # hooked: called as modules
    hook.remove()
    static = quantize_image_encoder_(fused.image_encoder, "int8static",  # calibration sees the linears
                                     calibration=[torch.randn(1, 3, IMG, IMG)])
    assert all(type(b.mlp).__name__ == "Int8GeluMlp" for b in static.blocks)
