"""The Hopper Gluon int4 GEMV (``fastzoo.ops.int4_gemv_gluon``): parity with the reference
on the GPU (``cuda`` tests), and an ahead-of-time sm_90 compile on the CPU (no GPU needed)
that checks the layout its correctness and speed rest on."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import exact_int4_cases, rel_err, run_aot_compile

from fastzoo.ops import int4_gemv_gluon as ig
from fastzoo.ops.int8_mm_gluon import gluon_available
from fastzoo.ops.weight_only_linear import (int4_dequantize, int4_weight_only_linear, int4_weight_only_linear_ref,
                                            int4_weight_only_linear_triton)
from fastzoo.quant.linear import Int4WeightOnlyLinear


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not (_hopper() and gluon_available()),
                                  reason="the Gluon GEMV runs on Hopper with Triton's Gluon")

RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

# forced configurations: one row block a warp or two, split-K with splits of unequal length
# or none at all (6 segments in 4 splits: 2, 2, 2, 0), a ring shallower and deeper than a
# split's segments, two segments a slot (a split of an odd number of segments: its last slot
# half used); segments side by side in different warps (par: one row block a warp, or two of
# different segments; steps past a split's last segment)
TILES = [dict(GLUON=True, block_n=64, warps=4, split_k=1, stages=4),
         dict(GLUON=True, block_n=128, warps=4, split_k=4, stages=8),
         dict(GLUON=True, block_n=32, warps=2, split_k=3, stages=2),
         dict(GLUON=True, block_n=256, warps=8, split_k=16, stages=12),
         dict(GLUON=True, block_n=64, warps=4, split_k=3, stages=3, segs=2),
         dict(GLUON=True, block_n=32, warps=4, par=2, split_k=3, stages=2),
         dict(GLUON=True, block_n=128, warps=8, par=2, split_k=2, stages=2),
         dict(GLUON=True, block_n=16, warps=4, par=4, split_k=1, stages=2, segs=2)]


def _weights(N, K, group, dtype, g, dev):
    p, s, z = Int4WeightOnlyLinear.quantize(torch.randn(N, K, device=dev, generator=g) * K**-0.5, group)
    return p, s.to(dtype), z.to(dtype)


def _check_against_fp32(shapes, group, dtype, g, monkeypatch):
    """For each (N, K): x at an offset of one element, with and without bias, against an fp32
    product of the same dequantized weights: the public op (which must take the Gluon GEMV)
    and every forced tile."""
    dev = torch.device("cuda")
    calls = []
    launch = ig.int4_gemv_gluon_launch
    monkeypatch.setattr(ig, "int4_gemv_gluon_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    for N, K in shapes:
        x = torch.randn(1, K + 1, device=dev, generator=g).to(dtype)[:, 1:]
        p, s4, z4 = _weights(N, K, group, dtype, g, dev)
        for bias in (None, torch.randn(N, device=dev, generator=g).to(dtype)):
            ref = F.linear(x.float(), int4_dequantize(p, s4, z4, group, torch.float32),
                           None if bias is None else bias.float())
            calls.clear()
            assert rel_err(int4_weight_only_linear(x, p, s4, z4, group, bias), ref) < RTOL[dtype] / 2, (N, K)
            assert calls, "the public op did not take the Gluon GEMV"
            for tile in TILES:
                out = int4_weight_only_linear_triton(x, p, s4, z4, group, bias, config=tile)
                assert rel_err(out, ref) < RTOL[dtype] / 2, (N, K, tile)


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("group", [128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gluon_gemv_matches_fp32(group, dtype, monkeypatch):
    """Against an fp32 product of the same dequantized weights at Llama-2-7B shapes, at N not
    a multiple of 16 (1000, 17) and below one row block (5: the TMA box taller than the
    tensor), one segment (K = 128) or two, splits past the segments (6 segments in splits of
    2); with and without bias; the public op takes this kernel; x at an offset of one
    element (the staging's scalar loads take any offset)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(group)
    _check_against_fp32([(4096, 4096), (12288, 4096), (4096, 11008), (1000, 4096), (17, 768), (5, 256),
                         (4100, group)], group, dtype, g, monkeypatch)


@pytest.mark.cuda
@needs_hopper
def test_cuda_gluon_gemv_without_pdl_with_trigger_and_misaligned_weights(monkeypatch):
    """The kernel without programmatic dependent launch and with the early-launch trigger
    gives the same bits; packed weights TMA cannot read (base not 16-byte aligned) go to the
    tl kernel, with the same result up to summation order."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(11)
    N, K, group = 4096, 4096, 128
    x = torch.randn(1, K, device=dev, generator=g).to(torch.bfloat16)
    p, s4, z4 = _weights(N, K, group, torch.bfloat16, g, dev)
    cfg = dict(block_n=64, warps=4, split_k=4, stages=4)
    base = ig.int4_gemv_gluon_launch(x, p, s4, z4, group, None, cfg, pdl=True)
    assert torch.equal(ig.int4_gemv_gluon_launch(x, p, s4, z4, group, None, cfg, pdl=False), base)
    assert torch.equal(ig.int4_gemv_gluon_launch(x, p, s4, z4, group, None, dict(cfg, trigger=True), pdl=True), base)
    buf = torch.empty(N * K // 2 + 1, dtype=torch.uint8, device=dev)
    shifted = buf[1:].view(N, K // 2)
    shifted.copy_(p)
    assert not ig.int4_gemv_gluon_applies(x, shifted, s4, z4, group)
    calls = []
    launch = ig.int4_gemv_gluon_launch
    monkeypatch.setattr(ig, "int4_gemv_gluon_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    out = int4_weight_only_linear(x, shifted, s4, z4, group)
    assert not calls
    assert rel_err(out, base.float()) < 5e-3


@pytest.mark.cuda
@needs_hopper
def test_cuda_gluon_gemv_exact_and_rows_kept_apart():
    """Bit-exact where every product and sum is exact (integer x / 4, every nibble value,
    scales 2^-e, integer zeros), for every forced tile; one nonzero weight lands in its own
    row only (lanes of different row blocks or rows r / r + 8 mixed would spread it)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(3)
    for x, p, s4, z4, truth in exact_int4_cases(48, 768, 128, torch.bfloat16, (25, 300), g, dev):
        for tile in TILES:
            assert torch.equal(int4_weight_only_linear_triton(x, p, s4, z4, 128, config=tile), truth), tile


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gluon_gemv_small_groups(group, dtype, monkeypatch):
    """Groups of 32 and 64 columns (4 or 2 to a segment, kept apart in the mma's output
    columns): bit-exact where every product and sum is exact, for every forced tile (each group
    with its own power-of-two scale and integer zero: a group summed under another's scale, or
    counted twice, changes the bits; one nonzero weight stays in its row); within the dtype's
    tolerance of fp32 at odd shapes and Llama-2-7B's, with and without bias, x at an offset of
    one element, through the public op (which takes this kernel) and with the options fused
    (every combination); an int4 module of these groups fuses on Hopper."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(group)
    for x, p, s4, z4, truth in exact_int4_cases(48, 768, group, dtype, (25, 300), g, dev):
        for tile in TILES:
            assert torch.equal(int4_weight_only_linear_triton(x, p, s4, z4, group, config=tile), truth), tile
    _check_against_fp32([(4096, 4096), (4096, 11008), (1000, 768), (5, 128)], group, dtype, g, monkeypatch)
    for opts in FUSIONS:
        x, args, fopts, truth = _fused_case(1000, 1024, group, dtype, opts, g, dev)
        for tile in TILES:
            out = int4_weight_only_linear_triton(x, *args, config=tile, **fopts)
            assert rel_err(out, truth) < RTOL[dtype], (opts, tile)
    lin = Int4WeightOnlyLinear(4096, 64, group_size=group, device=dev, dtype=dtype)
    assert lin.fuses(torch.empty(1, 1, 4096, device=dev, dtype=dtype))


def test_gluon_gemv_group_sizes():
    """The group sizes the Gluon GEMV takes: 32, 64 (whole groups in a lane's 32 columns of a
    segment) and multiples of 128 (a segment in one group); others go to the other kernels."""
    assert [gs for gs in (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 0) if ig.group_applies(gs)] == [32, 64, 128,
                                                                                                       256, 384]


@pytest.mark.cuda
@needs_hopper
def test_cuda_gluon_split_k_repeatable_and_counters_reset():
    """Split-K partials meet in the same launch: repeated calls give identical bits and
    leave every arrival counter at zero; the tl tensor-core kernel (gluon=False) agrees."""
    from fastzoo.ops._common import ARRIVAL_COUNTERS

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    x = torch.randn(1, 4096, device=dev, generator=g).to(torch.bfloat16)
    p, s4, z4 = _weights(4096, 4096, 128, torch.bfloat16, g, dev)
    tile = dict(GLUON=True, block_n=64, warps=4, split_k=8, stages=4)
    outs = [int4_weight_only_linear_triton(x, p, s4, z4, 128, config=tile) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert int(ARRIVAL_COUNTERS[x.device].abs().sum()) == 0
    tl_out = int4_weight_only_linear_triton(x, p, s4, z4, 128, gluon=False)
    assert rel_err(outs[0], tl_out.float()) < 5e-3


FUSIONS = ["norm", "glu+res", "norm+res", "glu+norm+res", "res"]


def _fused_case(N, K, group, dtype, opts, g, dev):
    """x (1, K or 2K), packed weights, bias, the options, and the fp32 truth (independent of
    the reference's code)."""
    glu = "glu" in opts
    x = torch.randn(1, 2 * K if glu else K, device=dev, generator=g).to(dtype)
    p, s4, z4 = _weights(N, K, group, dtype, g, dev)
    nw = (torch.rand(K, device=dev, generator=g) + 0.5).to(dtype) if "norm" in opts else None
    res = torch.randn(1, N, device=dev, generator=g).to(dtype) if "res" in opts else None
    bias = torch.randn(N, device=dev, generator=g).to(dtype)
    xf = x.float()
    if glu:
        xf = F.silu(xf[:, :K]) * xf[:, K:]
    if nw is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.float()
    truth = F.linear(xf, int4_dequantize(p, s4, z4, group, torch.float32), bias.float())
    if res is not None:
        truth = truth + res.float()
    return x, (p, s4, z4, group, bias), dict(norm_weight=nw, norm_eps=1e-5, glu=glu, residual=res), truth


@pytest.mark.parametrize("opts", FUSIONS)
def test_int4_options_compose_to_the_fp32_truth(kernel_device, opts):
    """The options (RMSNorm, SwiGLU, residual) where no kernel runs them (the CPU op, the tl
    kernels under the interpreter: composed in PyTorch) and in the reference: within the
    dtype's tolerance of an fp32 computation."""
    g = torch.Generator().manual_seed(len(opts))
    x, args, fopts, truth = _fused_case(37, 256, 128, torch.bfloat16, opts, g, torch.device("cpu"))
    for out in (int4_weight_only_linear(x, *args, **fopts), int4_weight_only_linear_ref(x, *args, **fopts)):
        assert rel_err(out, truth) < RTOL[torch.bfloat16], opts
    dev = kernel_device
    moved = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in fopts.items()}
    out = int4_weight_only_linear_triton(x.to(dev), *(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args),
                                         **moved)
    assert rel_err(out.cpu(), truth) < RTOL[torch.bfloat16], opts


def test_int4_module_fuses_only_where_the_kernel_runs_the_options(monkeypatch):
    """On the CPU an int4 module does not fuse: ``fused_linear`` composes the options around
    its forward without calling ``fused_forward``, and both give the reference op's result
    with the options."""
    from fastzoo.llama.model import RMSNorm, fused_linear

    g = torch.Generator().manual_seed(1)
    lin = Int4WeightOnlyLinear.from_linear(torch.nn.Linear(256, 40, bias=True).to(torch.bfloat16), 128)
    x = torch.randn(1, 1, 512, generator=g).to(torch.bfloat16)
    res = torch.randn(1, 1, 40, generator=g).to(torch.bfloat16)
    norm = RMSNorm(256).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256, generator=g) + 0.5)
    assert not lin.fuses(x) and not lin.fuses(x[..., :256], norm)
    fused = lin.fused_forward
    calls = []
    monkeypatch.setattr(lin, "fused_forward", lambda *a, **k: calls.append(1) or fused(*a, **k))
    bufs = (lin.weight, lin.scales, lin.zeros, lin.group_size, lin.bias)
    for kwargs, ref_kwargs, inp in ((dict(glu=True, residual=res), dict(glu=True, residual=res), x),
                                    (dict(norm=norm), dict(norm_weight=norm.weight, norm_eps=norm.eps), x[..., :256])):
        ref = int4_weight_only_linear_ref(inp, *bufs, **ref_kwargs).float()
        assert rel_err(fused_linear(lin, inp, **kwargs), ref) < RTOL[torch.bfloat16], kwargs
        assert rel_err(fused(inp, **kwargs), ref) < RTOL[torch.bfloat16], kwargs
    assert not calls


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("opts", FUSIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gluon_gemv_options_match_fp32(opts, dtype, monkeypatch):
    """The options inside the Gluon kernel (the product's input staged in shared memory, the
    norm's factor on the sums) at Llama-2-7B's shapes (w13 with a norm, w2 with SwiGLU) and
    odd ones, every forced tile and the tuned one: within the dtype's tolerance of fp32, and
    the public op takes the kernel; an int4 module on Hopper fuses."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(len(opts))
    calls = []
    launch = ig.int4_gemv_gluon_launch
    monkeypatch.setattr(ig, "int4_gemv_gluon_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    for N, K in [(22016, 4096), (4096, 11008), (1000, 768), (5, 128)]:
        x, args, fopts, truth = _fused_case(N, K, 128, dtype, opts, g, dev)
        calls.clear()
        assert rel_err(int4_weight_only_linear(x, *args, **fopts), truth) < RTOL[dtype], (N, K)
        assert calls, "the public op did not take the Gluon GEMV"
        for tile in TILES:
            out = int4_weight_only_linear_triton(x, *args, config=tile, **fopts)
            assert rel_err(out, truth) < RTOL[dtype], (N, K, tile)
    from fastzoo.llama.model import RMSNorm

    lin = Int4WeightOnlyLinear(4096, 64, group_size=128, device=dev, dtype=dtype)
    one = torch.empty(1, 1, 4096, device=dev, dtype=dtype)
    assert lin.fuses(one) and lin.fuses(one, RMSNorm(4096).to(dev, dtype))
    assert not lin.fuses(torch.empty(2, 1, 4096, device=dev, dtype=dtype))
    assert not lin.fuses(one, RMSNorm(4096).to(dev))  # an fp32 norm weight: composed around forward


def test_gluon_gemv_refused_where_it_does_not_apply():
    """gluon=True where the kernel does not apply (here: CPU tensors): an error that names
    the conditions, not another kernel; a config that contradicts ``gluon=False``."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    p, s4, z4 = Int4WeightOnlyLinear.quantize(torch.randn(32, 256, generator=g), 128)
    x = torch.randn(1, 256, generator=g)
    with pytest.raises(ValueError, match="Gluon GEMV needs one row"):
        int4_weight_only_linear_triton(x.bfloat16(), p, s4.bfloat16(), z4.bfloat16(), 128, gluon=True)
    with pytest.raises(ValueError, match="contradicts"):
        int4_weight_only_linear_triton(x.bfloat16(), p, s4.bfloat16(), z4.bfloat16(), 128, gluon=False,
                                       config=TILES[0])
    assert not ig.int4_gemv_gluon_applies(x.bfloat16(), p, s4.bfloat16(), z4.bfloat16(), 128)


def test_gluon_gemv_refuses_a_ring_larger_than_shared_memory():
    """A forced tile whose ring cannot fit in a Hopper program's shared memory beside the
    smallest staged input: an error naming the bytes, before anything is launched (also for a
    ring that fits alone); the staged input fits beside the tuner's rings at Llama-2-7B's K
    with one split."""
    if not gluon_available():
        pytest.skip("this Triton has no Gluon Hopper API")
    g = torch.Generator().manual_seed(0)
    p, s4, z4 = Int4WeightOnlyLinear.quantize(torch.randn(32, 256, generator=g), 128)
    x = torch.randn(1, 256, generator=g).bfloat16()
    with pytest.raises(ValueError, match="bytes of shared memory"):
        ig.int4_gemv_gluon_launch(x, p, s4.bfloat16(), z4.bfloat16(), 128,
                                  config=dict(block_n=256, warps=8, split_k=1, stages=12, segs=2))
    with pytest.raises(ValueError, match="positive multiple of 128"):  # K = 200: the kernel takes whole segments
        ig.int4_gemv_gluon_launch(torch.randn(1, 200, generator=g).bfloat16(), p, s4.bfloat16(), z4.bfloat16(), 128)
    with pytest.raises(ValueError, match=r"\(twice that with glu\), got 384"):  # [a | b] of 192 columns each
        ig.int4_gemv_gluon_launch(torch.randn(1, 384, generator=g).bfloat16(), p, s4.bfloat16(), z4.bfloat16(), 128,
                                  glu=True)
    for group in (16, 96):  # groups the kernel would mix: refused before anything is compiled
        with pytest.raises(ValueError, match="group_size must be"):
            ig.int4_gemv_gluon_launch(x, p, s4.bfloat16(), z4.bfloat16(), group)
    with pytest.raises(ValueError, match="bytes of shared memory"):  # 221 KiB of ring: no room for the input
        ig.int4_gemv_gluon_launch(x, p, s4.bfloat16(), z4.bfloat16(), 128,
                                  config=dict(block_n=256, warps=8, split_k=1, stages=7, segs=2))
    for c in ig.candidates(4096, 11008, 132):
        assert ig.ring_bytes(c) + ig._staged_bytes(11008 // 128, 1, c["warps"]) + 1024 <= ig.SHARED_LIMIT, c
    with pytest.raises(ValueError, match="262144 bytes of shared memory"):  # 8 slots of 2 x 4 segments of 64 rows
        ig.int4_gemv_gluon_launch(x, p, s4.bfloat16(), z4.bfloat16(), 128,
                                  config=dict(block_n=64, warps=4, par=4, split_k=1, stages=8, segs=2))
    with pytest.raises(ValueError, match="par .* must be 1, 2 or 4"):
        ig.int4_gemv_gluon_launch(x, p, s4.bfloat16(), z4.bfloat16(), 128, config=dict(par=3))
    with pytest.raises(ValueError, match="a row block of 16 for each of the 8 warps"):  # 2 · 32 rows: 4 row blocks
        ig.int4_gemv_gluon_launch(x, p, s4.bfloat16(), z4.bfloat16(), 128, config=dict(block_n=32, warps=8, par=2))
    with pytest.raises(ValueError, match="one row block of a segment"):  # 8 row blocks of a segment on 4 warps
        ig.int4_gemv_gluon_launch(x, p, s4.bfloat16(), z4.bfloat16(), 128, config=dict(block_n=128, warps=4, par=2))


def test_gluon_gemv_tuner_times_the_options_and_keeps_each_candidates_best_round(monkeypatch):
    """The tuner times each candidate with the options the call runs (they change the kernel),
    in three rounds of alternating order, and picks by each candidate's best round: a
    candidate slow in one round only still wins; another set of options is tuned anew."""
    import fastzoo.ops._common as common
    import fastzoo.ops.int8_mm as int8_mm

    cands = [dict(block_n=64, warps=4, split_k=1), dict(block_n=32, warps=4, par=2, split_k=1),
             dict(block_n=16, warps=4, par=4, split_k=1)]
    # µs of each candidate in rounds 1, 2, 3: by one round's median candidate 2 would win
    script = {0: [5.0, 5.0, 5.0], 1: [6.0, 3.0, 6.0], 2: [4.0, 4.0, 4.0]}
    calls, order = [], []
    monkeypatch.setattr(ig, "candidates", lambda N, K, n: cands)
    monkeypatch.setattr(int8_mm, "_num_sms", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(ig, "int4_gemv_gluon_launch", lambda *a, **k: calls.append((a[6], k)))

    def fake_bench(fn, quantiles):
        fn()
        i = cands.index(calls[-1][0])
        order.append(i)
        return script[i][sum(1 for j in order if j == i) - 1]

    monkeypatch.setattr(common, "short_bench", fake_bench)
    monkeypatch.setattr(ig, "_TUNED", {})
    x = torch.empty(1, 2 * 256, device="meta", dtype=torch.bfloat16)
    w, s, z = (torch.empty(48, 128, device="meta", dtype=torch.uint8),
               *(torch.empty(48, 2, device="meta", dtype=torch.bfloat16) for _ in range(2)))
    res = torch.empty(1, 48, device="meta", dtype=torch.bfloat16)
    assert ig.tuned_config(x, w, s, z, 128, None, True, glu=True, residual=res) is cands[1]
    assert order == [0, 1, 2, 2, 1, 0, 0, 1, 2]
    assert all(k == dict(glu=True, residual=res) for _, k in calls)
    n = len(calls)
    assert ig.tuned_config(x, w, s, z, 128, None, True, glu=True, residual=res) is cands[1]  # cached
    assert len(calls) == n
    order.clear()
    ig.tuned_config(x[:, :256], w, s, z, 128, None, True)  # no options: another kernel, tuned anew
    assert len(calls) == n + 9 and all(k == {} for _, k in calls[n:])


def test_gluon_gemv_candidates_fill_the_gpu():
    """The tuner's candidates: each split has at least one segment, every warp a row block (at
    most one of a segment with par), and the grid gives every SM a program where the shape
    allows (Llama-2-7B's shapes on 132 SMs; segments side by side, par, exempt); par
    candidates among them."""
    for N, K in [(4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (32000, 4096), (48, 256)]:
        cands = ig.candidates(N, K, 132)
        assert cands
        for c in cands:
            assert 1 <= c["split_k"] <= max(1, K // ig.SEGMENT)
            assert c["block_n"] * c.get("par", 1) % (16 * c["warps"]) == 0
            assert c.get("par", 1) == 1 or c["block_n"] <= 16 * c["warps"]
            tiles = -(-N // c["block_n"])
            if N * K >= 4096 * 4096 and c.get("par", 1) == 1:  # (par candidates without split-K may
                # leave SMs idle at small N: 128 programs of 8 warps at N = 4096 won in the probe)
                assert tiles * c["split_k"] >= 132, (N, K, c)
        assert any(c.get("par", 1) > 1 for c in cands)


# Compiled in a fresh process: Triton's interpreter (on in this test process) replaces
# triton.language's functions, so code generation cannot run here.
_AOT_SCRIPT = r"""
import json, sys
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from fastzoo.ops import int4_gemv_gluon as mod
from tests.helpers import sm90_compile_report

jit = mod._int4_gemv_gluon_kernel
report = []
for v in json.loads(sys.argv[1]):
    dt = "fp16" if v["f16"] else "bf16"
    lay = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    ptrs = {"xe_ptr": f"*{dt}", "nw_ptr": f"*{dt}", "r_ptr": f"*{dt}", "s_ptr": f"*{dt}",
            "z_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    sig = {"w_desc": f"tensordesc<i32[{v['block_n']}, 16],{lay!r}>", "eps": "fp32", **ptrs}
    const = {"GROUP": v["group"], "HAS_BIAS": True, "F16": v["f16"], "SPLIT_K": v["split_k"], "STAGES": v["stages"],
             "SEGS": v["segs"], "PAR": v.get("par", 1), "NORM": v["norm"], "GLU": v["glu"], "HAS_RES": v["res"],
             "NS": mod._staged_segments(v["n_seg"], v["split_k"], v["warps"]),
             "PDL": v["pdl"], "TRIGGER": v["trigger"], "num_warps": v["warps"]}
    sig = {n: sig.get(n, "constexpr" if n in const else "i32") for n in jit.arg_names}
    src = GluonASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): c for k, c in const.items()},
                         attrs={(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptrs})
    report.append({**sm90_compile_report(src, v["warps"]), **v})
print("AOT-REPORT" + json.dumps(report))
"""


def test_gluon_gemv_compiles_for_hopper_without_a_gpu():
    """Compile for sm_90 ahead of time: GPU-only compile errors show in CPU CI. In the
    slot loop: one row block a warp needs 16 m16n8k16 mma a segment; its words reach
    the lanes by two 16-byte shared loads (rows r and r + 8, 512 bytes apart) and no
    shuffle (the relabelling of the loaded tile to the lanes' layout is checked trivial at
    compile time); the staging loads x (and the norm weight) 16 bytes a thread; TMA fills
    the ring; no local-memory spills; with PDL the wait comes after the first TMA requests."""
    if not gluon_available():
        pytest.skip("this Triton has no Gluon Hopper API")
    plain = dict(norm=False, glu=False, res=False)  # n_seg: K / 128 (4096, or 11008 for w2)
    variants = [dict(block_n=64, warps=4, split_k=8, stages=8, segs=1, group=128, f16=False, pdl=True, trigger=True,
                     n_seg=32, **plain),
                dict(block_n=128, warps=4, split_k=1, stages=4, segs=1, group=256, f16=True, pdl=False, trigger=False,
                     n_seg=32, **plain),
                dict(block_n=64, warps=4, split_k=4, stages=4, segs=2, group=128, f16=False, pdl=True, trigger=False,
                     n_seg=32, **plain),
                # the options: RMSNorm + residual (wqkv, w13 and output's prologue, wo and w2's epilogue),
                # SwiGLU (w2), all three with two segments a slot
                dict(block_n=64, warps=4, split_k=4, stages=4, segs=1, group=128, f16=False, pdl=True, trigger=False,
                     norm=True, glu=False, res=True, n_seg=32),
                dict(block_n=128, warps=4, split_k=8, stages=8, segs=1, group=128, f16=True, pdl=True, trigger=False,
                     norm=False, glu=True, res=True, n_seg=86),
                dict(block_n=64, warps=4, split_k=2, stages=4, segs=2, group=128, f16=False, pdl=True, trigger=False,
                     norm=True, glu=True, res=False, n_seg=6),
                # groups of 32 and 64 (kept apart in the mma's output columns)
                dict(block_n=64, warps=4, split_k=1, stages=4, segs=2, group=32, f16=False, pdl=True, trigger=False,
                     n_seg=32, **plain),
                dict(block_n=128, warps=4, split_k=4, stages=8, segs=1, group=64, f16=True, pdl=True, trigger=False,
                     norm=True, glu=False, res=True, n_seg=32),
                # segments side by side in different warps: one row block a warp, two (of different
                # segments) a warp, with the options and two segments a slot
                dict(block_n=32, warps=4, par=2, split_k=1, stages=4, segs=1, group=128, f16=False, pdl=True,
                     trigger=False, n_seg=32, **plain),
                dict(block_n=64, warps=4, par=2, split_k=2, stages=3, segs=1, group=64, f16=True, pdl=True,
                     trigger=False, norm=True, glu=False, res=True, n_seg=32),
                dict(block_n=16, warps=4, par=4, split_k=2, stages=2, segs=2, group=128, f16=False, pdl=True,
                     trigger=False, norm=False, glu=True, res=True, n_seg=86)]
    proc = run_aot_compile(_AOT_SCRIPT, json.dumps(variants))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for item in json.loads(proc.stdout.split("AOT-REPORT", 1)[1]):
        ptx = item["ptx"]
        loop = [part for part in ptx.split("Loop Header")[1:] if "mma.sync" in part.split("_crit_edge", 1)[0]]
        assert len(loop) == 1  # the segment loop (the options add the staging and norm loops before it)
        loop = loop[0].split("_crit_edge", 1)[0]
        par, blocks, warps = item.get("par", 1), item["block_n"] // 16, item["warps"]
        per_warp = blocks * par // warps * item["segs"]  # row blocks (of one segment each) a warp a slot
        xs_per_warp = max(1, par * min(blocks, warps) // warps)  # segments of x a warp reads a step
        # one mma a 16 columns (Σx comes from the staged buffer, not from a second mma)
        assert loop.count("mma.sync.aligned.m16n8k16") == 8 * per_warp
        # the words (rows r and r + 8) of each row block, and x from the staged buffer: the lane's
        # 32 columns (64 bytes) of each segment, already in the mma's pair order
        assert loop.count("ld.shared.v4.b32") == 2 * per_warp + 4 * item["segs"] * xs_per_warp
        assert "prmt" not in loop
        assert "+512]" in loop  # rows r + 8: 8 rows of 64 bytes on
        assert "shfl" not in loop
        # the staging: 8 columns a thread in one 16-byte load of x (a and b with SwiGLU) and of the
        # norm weight (32 values a thread a pass)
        assert ptx.count("ld.global.v4.b32") == 4 * (1 + item["glu"] + item["norm"])
        assert "cp.async.bulk.tensor.2d" in ptx
        assert ".local" not in ptx
        if item["pdl"]:
            assert ptx.index("cp.async.bulk.tensor") < ptx.index("griddepcontrol.wait")
        else:
            assert "griddepcontrol.wait" not in ptx
        assert ("griddepcontrol.launch_dependents" in ptx) == item["trigger"]
        assert item["shared"] <= 227 * 1024
        assert item["ptxas_rc"] == 0, item["ptxas"][-2000:]
        # no register blow-up: ptxas spills at most a few words (at 80 registers it keeps 2-3 of the
        # staging pass's values on the stack, stored and reloaded once before the segment loop, per
        # the SASS of Triton 3.6 and 3.8)
        spilled = re.search(r"(\d+) bytes spill stores", item["ptxas"])
        assert spilled is None or int(spilled.group(1)) <= 16, item["ptxas"][-2000:]
