"""The Hopper Gluon int8 GEMM (``fastzoo.ops.int8_mm_gluon``): parity with the reference on
the GPU (``cuda`` tests), and an ahead-of-time sm_90 compile on the CPU (no GPU needed),
which also checks that its wgmma stays asynchronous."""
import json

import pytest
import torch
from helpers import run_aot_compile

from fastzoo.ops.int8_mm import int8_scaled_mm, int8_scaled_mm_ref, int8_scaled_mm_triton
from fastzoo.ops import int8_mm_gluon
from fastzoo.ops.int8_mm_gluon import gluon_available

from tests.ops.test_int8_mm import MODES, _assert_int8_close, _assert_matches, _rand_int8


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _case(M, N, K, mode, scales, seed):
    """int8 operands, scales (per tensor / token / channel), bias, residual, out_scale for one epilogue mode."""
    activation, with_residual, out_kind = mode
    g = torch.Generator().manual_seed(seed)
    a, b = _rand_int8(M, K, generator=g), _rand_int8(N, K, generator=g)
    a_kind, b_kind = scales.split("/")
    a_s = torch.rand(M if a_kind == "token" else 1, 1, generator=g) * 2e-3 + 1e-4
    b_s = torch.rand(N if b_kind == "channel" else 1, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    residual = torch.randn(M, N, generator=g).to(torch.bfloat16) if with_residual else None
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    a, b, a_s, b_s, bias, residual = map(cuda, (a, b, a_s, b_s, bias, residual))
    out_scale = None
    if out_kind is not None:
        y = int8_scaled_mm_ref(a, b, a_s, b_s, bias.float(), torch.float32, activation=activation, residual=residual)
        amax = y.abs().amax(0) if out_kind == "channel" else y.abs().amax().reshape(1)
        out_scale = (amax / 120).clamp_min(1e-6)
    if residual is not None and out_scale is not None:
        residual = None  # the Gluon kernel reads a residual of the output's dtype only: int8 out takes none
    return (a, b, a_s, b_s, bias), dict(activation=activation, residual=residual, out_scale=out_scale)


# Odd sizes for the TMA path: M past a 128-row tile edge, N past a 256-column tile and a
# 128-column part, K past a 128-deep step (rows of 16 bytes: TMA's alignment); N and K below one
# part / one step (a tile's second column half wholly outside, a single K-step).
GLUON_SHAPES = [(4097, 208, 336), (4133, 400, 1040), (8192, 3072, 1024), (4100, 64, 64),
                # several tiles a program: one K-step each (the tile boundary right after the wait),
                # fewer K-steps than slots (loads crossing tiles), partial edge tiles
                (8192, 3072, 64), (8200, 3008, 208), (20000, 608, 48)]


KERNELS = {"tiles": int8_mm_gluon.DEFAULT_CONFIG, "pingpong": int8_mm_gluon.PINGPONG_CONFIG,
           "pingpong5": {**int8_mm_gluon.PINGPONG_CONFIG, "stages": 5}}  # default_config's ring at K <= 768


def force_kernel(monkeypatch, kernel):
    """The public ops take KERNELS[kernel] whatever K."""
    monkeypatch.setattr(int8_mm_gluon, "default_config", lambda K: dict(KERNELS[kernel]))


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("shape", GLUON_SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scales", ["token/channel", "tensor/channel", "tensor/tensor"])
def test_cuda_gluon_kernel_matches_reference(kernel, shape, mode, scales, monkeypatch):
    """Both Gluon kernels (the one-partition tile and the ping-pong one, forced whatever K)
    against the reference; shapes with several tiles a program exercise the ping-pong
    consumers' hand-over of the ring."""
    if not (_hopper() and gluon_available()):
        pytest.skip("the Gluon kernel runs on Hopper with Triton >= 3.5")
    force_kernel(monkeypatch, kernel)
    M, N, K = shape
    args, kw = _case(M, N, K, mode, scales, seed=M + N + K)
    out_dtype = torch.int8 if kw["out_scale"] is not None else torch.bfloat16
    out = int8_scaled_mm_triton(*args, out_dtype, persistent=True, gluon=True, **kw)
    ref = int8_scaled_mm_ref(*args, out_dtype, **kw)
    if out_dtype == torch.int8:
        _assert_int8_close(out, ref)
    else:
        _assert_matches(out, ref, out_dtype)
    # the public op takes the Gluon kernel here (a spy on its launcher), with the same result
    calls = []
    launch = int8_mm_gluon.int8_mm_gluon_launch
    monkeypatch.setattr(int8_mm_gluon, "int8_mm_gluon_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    assert torch.equal(int8_scaled_mm(*args, out_dtype, **kw), out)
    assert calls == [1]


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_gluon_fp16_output(kernel, residual, monkeypatch):
    if not (_hopper() and gluon_available()):
        pytest.skip("the Gluon kernel runs on Hopper with Triton >= 3.5")
    force_kernel(monkeypatch, kernel)
    # 8333 rows: 264 tiles of 128 x 128 on 132 programs, both ping-pong consumers busy
    (a, b, a_s, b_s, bias), kw = _case(8333, 400, 1040, ("none", residual, None), "token/channel", seed=5)
    bias = bias.float()  # a float32 bias serves any output dtype (a bf16 one only bf16)
    if residual:
        kw["residual"] = kw["residual"].half()
    out = int8_scaled_mm_triton(a, b, a_s, b_s, bias, torch.float16, persistent=True, gluon=True, **kw)
    _assert_matches(out, int8_scaled_mm_ref(a, b, a_s, b_s, bias, torch.float16, **kw), torch.float16)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_cuda_gluon_integer_product_is_exact(kernel, monkeypatch):
    if not (_hopper() and gluon_available()):
        pytest.skip("the Gluon kernel runs on Hopper with Triton >= 3.5")
    force_kernel(monkeypatch, kernel)
    g = torch.Generator().manual_seed(3)
    # entries in [-2, 2] and [-1, 1]: |a @ b.T| <= 2048 at K = 1024, integers fp16 holds exactly;
    # 16384 rows: several tiles a program in either kernel
    a = torch.randint(-2, 3, (16384, 1024), generator=g, dtype=torch.int8).cuda()
    b = torch.randint(-1, 2, (512, 1024), generator=g, dtype=torch.int8).cuda()
    one = torch.ones(1, device="cuda")
    out = int8_scaled_mm_triton(a, b, one, one, None, torch.float16, persistent=True, gluon=True)
    assert torch.equal(out.float(), torch._int_mm(a, b.t()).float())


def test_default_config_takes_ping_pong_up_to_its_k_limit():
    """The public op's kernel by K: ping-pong up to PINGPONG_MAX_K, the 128 x 256 tile beyond;
    a copy each time (a caller's change does not leak into the module's configs)."""
    limit, five = int8_mm_gluon.PINGPONG_MAX_K, int8_mm_gluon.PINGPONG_5_SLOTS_MAX_K
    assert int8_mm_gluon.default_config(64)["pingpong"] and int8_mm_gluon.default_config(limit)["pingpong"]
    assert not int8_mm_gluon.default_config(limit + 1).get("pingpong", False)
    assert int8_mm_gluon.default_config(five)["stages"] == 5
    assert int8_mm_gluon.default_config(five + 1)["stages"] == int8_mm_gluon.PINGPONG_CONFIG["stages"]
    cfg = int8_mm_gluon.default_config(limit)
    cfg["stages"] = 99
    assert int8_mm_gluon.PINGPONG_CONFIG["stages"] != 99


def test_gluon_refused_where_it_does_not_apply():
    """gluon=True on CPU tensors, or with persistent=False: an error, not another kernel."""
    pytest.importorskip("triton")
    from fastzoo.ops.int8_mm import _tma_api

    if not _tma_api():
        pytest.skip("this Triton has no TMA descriptors (the persistent kernels' API)")
    a, b = _rand_int8(4096, 64), _rand_int8(32, 64)
    one = torch.ones(1)
    for persistent in (True, None, False):
        with pytest.raises(ValueError, match="gluon=True"):
            int8_scaled_mm_triton(a, b, one, one, None, torch.bfloat16, persistent=persistent, gluon=True)


# Compiled in a fresh process: Triton's interpreter (on in this test process) replaces
# triton.language's functions, so code generation cannot run here.
_AOT_SCRIPT = r"""
import json, sys
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from fastzoo.ops import int8_mm_gluon as mod
from tests.helpers import sm90_compile_report

report = []
for variant in json.loads(sys.argv[1]):
    pingpong = variant.get("pingpong", False)
    cfg = mod.PINGPONG_CONFIG if pingpong else mod.DEFAULT_CONFIG
    bm, bn, bk = cfg["block"]
    part = bn if pingpong else bn // 2  # the output buffer: a consumer's whole tile / one part
    jit = mod._int8_mm_pingpong_kernel if pingpong else mod._int8_mm_gluon_kernel
    warps = 4 if pingpong else cfg["warps"]
    out = {"bf16": ("bf16", gl.bfloat16), "int8": ("i8", gl.int8)}[variant["out"]]

    def desc(name, dt, shape):
        return f"tensordesc<{name}[{shape[0]}, {shape[1]}],{gl.NVMMASharedLayout.get_default_for(shape, dt)!r}>"

    sig = {"a_desc": desc("i8", gl.int8, [bm, bk]), "b_desc": desc("i8", gl.int8, [bn, bk]),
           "c_desc": desc(*out, [bm, part]), "r_desc": desc(*out, [bm, part]), "as_ptr": "*fp32",
           "bs_ptr": "*fp32", "bias_ptr": "*bf16", "os_ptr": "*fp32"}
    const = {"STAGES": variant.get("stages", cfg["stages"]), "GROUP_M": cfg["group"], "num_warps": warps,
             **variant["flags"]}
    if pingpong:
        const.update(CONSUMER_REGS=cfg["regs"][0], PRODUCER_REGS=cfg["regs"][1])
    sig = {n: sig.get(n, "constexpr" if n in const else "i32") for n in jit.arg_names}
    src = GluonASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in const.items()},
                         attrs={(jit.arg_names.index(n),): [["tt.divisibility", 16]]
                                for n in ("as_ptr", "bs_ptr", "bias_ptr", "os_ptr")})
    # with ptxas' report on the PTX: "C7514" where it serializes every wgmma (an accumulator read
    # while an accumulating wgmma is in flight), which the epilogue's placement must avoid
    report.append(sm90_compile_report(src, warps, maxnreg=cfg.get("maxnreg")))
print("AOT-REPORT" + json.dumps(report))
"""


def test_gluon_kernel_compiles_for_hopper_without_a_gpu():
    """Compile both kernels for sm_90 ahead of time in their fullest epilogues (bias, GELU,
    int8 out; bias and residual): GPU-only compile errors show in CPU CI, and the K loop
    keeps wgmma in flight (a wait for at most this step's groups: the one-partition tile's two
    accumulator parts, the ping-pong consumer's one) where the ``tl`` kernel waits for 0
    after each; the ping-pong kernel moves registers between its partitions, unspilled."""
    if not gluon_available():
        pytest.skip("this Triton has no Gluon Hopper API")
    flags = dict(HAS_BIAS=True, ACT_GELU=False, HAS_RESIDUAL=False, OUT_INT8=False)
    variants = [{"out": "int8", "flags": {**flags, "ACT_GELU": True, "OUT_INT8": True}},
                {"out": "bf16", "flags": {**flags, "HAS_RESIDUAL": True}}]
    variants += [dict(v, pingpong=True) for v in variants]
    variants.append(dict(variants[-1], stages=5))  # the 5-slot ring at K <= 768: its shared memory fits
    proc = run_aot_compile(_AOT_SCRIPT, json.dumps(variants))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant, item in zip(variants, json.loads(proc.stdout.split("AOT-REPORT", 1)[1])):
        ptx = item["ptx"]
        assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx
        # the K loop: the previous step's MMAs only (two accumulator parts a step; ping-pong: one)
        assert f"wgmma.wait_group.sync.aligned {1 if variant.get('pingpong') else 2};" in ptx
        assert "cp.async.bulk.tensor.2d" in ptx  # TMA loads
        assert item["shared"] <= 227 * 1024
        assert item["ptxas_rc"] == 0, item["ptxas"][-2000:]
        assert "C7514" not in item["ptxas"], item["ptxas"][-2000:]  # wgmma not serialized
        if variant.get("pingpong"):  # warp-specialized: the partitions' registers moved between them
            regs = int8_mm_gluon.PINGPONG_CONFIG["regs"]
            assert f"setmaxnreg.inc.sync.aligned.u32 \t{regs[0]};" in ptx
            assert f"setmaxnreg.dec.sync.aligned.u32 \t{regs[1]};" in ptx
            assert "0 bytes spill stores" in item["ptxas"], item["ptxas"][-2000:]
