"""int8_scaled_mm's Hopper path: the persistent TMA kernel vs the reference.

On the CPU the kernel runs under Triton's interpreter (which reads and writes TMA
descriptors, zero padding and clipping included) with its small test tiles; an ahead-of-time
compile for sm_90 checks the GPU tiles (wgmma, TMA loads and stores, shared memory, no
spills) without a GPU; the CUDA tests run every autotuned tile at the ViT-L shapes.
"""
import zlib

import pytest
import torch

from fastzoo.ops.int8_mm import int8_scaled_mm, int8_scaled_mm_ref, int8_scaled_mm_triton
from helpers import run_aot_compile

triton = pytest.importorskip("triton")
from fastzoo.ops import int8_mm  # noqa: E402

if not int8_mm._tma_api():
    pytest.skip(f"Triton {triton.__version__} has no host-side TMA descriptors", allow_module_level=True)


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _rand_int8(*shape, generator):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)


# Epilogues: (name, activation, residual, out_scale kind, out dtype, activation scale kind)
EPILOGUES = {
    "bare": ("none", False, None, torch.bfloat16, "token"),
    "fp16": ("none", False, None, torch.float16, "tensor"),
    "fp32": ("none", False, None, torch.float32, "token"),
    "gelu": ("gelu", False, None, torch.bfloat16, "token"),
    "residual": ("none", True, None, torch.bfloat16, "tensor"),
    "static": ("none", False, "channel", torch.int8, "tensor"),
    "static_gelu": ("gelu", False, "tensor", torch.int8, "tensor"),
    "full": ("gelu", True, "tensor", torch.int8, "token"),
}


def _case(M, N, K, epilogue, g, bias_kind="fp32"):
    """Inputs and the reference of one case (CPU tensors)."""
    activation, with_res, out_kind, out_dtype, a_kind = EPILOGUES[epilogue]
    a, b = _rand_int8(M, K, generator=g), _rand_int8(N, K, generator=g)
    a_s = torch.rand(M if a_kind == "token" else 1, 1, generator=g) * 1e-2 + 1e-3
    b_s = torch.rand(N, generator=g) * 1e-2 + 1e-3
    bias = torch.randn(N, generator=g)
    if bias_kind == "bf16" and out_dtype in (torch.bfloat16, torch.int8):  # else fp32 (bias in out_dtype or fp32)
        bias = bias.to(torch.bfloat16)
    residual = (torch.randn(M, N, generator=g) * 2).to(torch.bfloat16) if with_res else None
    out_scale = None
    if out_kind is not None:  # about 1/100 of the output's range (a few values clamp at ±127)
        y = int8_scaled_mm_ref(a, b, a_s, b_s, bias.float(), torch.float32, activation=activation, residual=residual)
        amax = y.abs().amax(0) if out_kind == "channel" else y.abs().amax().reshape(1)
        out_scale = (amax.clamp_min(1e-3) / 100) * (torch.rand(amax.shape, generator=g) * 0.5 + 0.75)
    kw = dict(activation=activation, residual=residual, out_scale=out_scale)
    ref = int8_scaled_mm_ref(a, b, a_s, b_s, bias, out_dtype, **kw)
    return (a, b, a_s, b_s, bias, out_dtype), kw, ref


def _assert_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    out, ref = out.cpu(), ref.cpu()
    if ref.dtype == torch.int8:
        # equal up to a value landing on a .5 boundary in one fp32 evaluation order only
        diff = (out.int() - ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, (diff.max(), (diff > 0).float().mean())
        assert ref.abs().max() > 50  # the int8 range is exercised
        return
    rtol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[ref.dtype]
    ref32 = ref.float()
    torch.testing.assert_close(out.float(), ref32, rtol=rtol, atol=rtol * ref32.abs().max().item() * 0.1)


def _run_persistent(device, args, kw, config):
    """The persistent kernel on ``device``: the given test tile under the interpreter; on a
    Hopper GPU the autotuned kernel through the launcher."""
    a, b, a_s, b_s, bias, out_dtype = [t.to(device) if isinstance(t, torch.Tensor) else t for t in args]
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] != 9:
            pytest.skip("the persistent TMA kernel is for Hopper")
        return int8_scaled_mm_triton(a, b, a_s, b_s, bias, out_dtype, **kw, persistent=True, gluon=False)
    M, N = a.shape[0], b.shape[0]
    out = torch.empty(M, N, dtype=out_dtype)
    o_s = kw["out_scale"].reshape(-1) if kw["out_scale"] is not None else None
    return int8_mm._int8_scaled_mm_tma_launch(a, b, a_s.reshape(-1), b_s, bias, out, kw["residual"], o_s,
                                              kw["activation"], config=config)


# (M, N, K): M at and off tile edges (1, 7, 129, 197), N and K multiples of 16 (TMA row
# strides) but not of the tiles, K tails zero-padded by TMA. Each epilogue meets each
# interpreter tile (flattened / not; epilogue in 1, 2 or 4 column parts) on some shape.
SHAPES = [(1, 32, 64), (7, 48, 96), (129, 80, 160), (197, 32, 80)]
CASES = [(SHAPES[i % 4], epi, i % len(int8_mm.TMA_INTERPRETER_CONFIGS)) for i, epi in enumerate(EPILOGUES)]
CASES += [((197, 48, 64), "full", 1), ((129, 96, 48), "bare", 2), ((7, 64, 64), "static_gelu", 0)]


@pytest.mark.parametrize("shape,epilogue,config", CASES, ids=str)
def test_persistent_kernel_matches_reference(kernel_device, shape, epilogue, config):
    g = _gen(shape, epilogue, config)
    args, kw, ref = _case(*shape, epilogue, g, bias_kind="bf16" if config == 1 else "fp32")
    out = _run_persistent(kernel_device, args, kw, int8_mm.TMA_INTERPRETER_CONFIGS[config])
    _assert_close(out, ref)


def test_persistent_integer_product_is_exact(kernel_device):
    """Unit scales, fp32 out: the exact int32 product, -128·-128 terms and a K tail included."""
    g = _gen("exact")
    a, b = _rand_int8(37, 96, generator=g), _rand_int8(48, 96, generator=g)
    a[0], b[:3] = -128, -128
    one_a, one_b = torch.ones(1, 1), torch.ones(1)
    out = _run_persistent(kernel_device, (a, b, one_a, one_b, None, torch.float32),
                          dict(activation="none", residual=None, out_scale=None), int8_mm.TMA_INTERPRETER_CONFIGS[2])
    assert torch.equal(out.cpu().to(torch.int64), a.to(torch.int64) @ b.to(torch.int64).t())


def test_persistent_requires_tma_layout():
    """persistent=True on tensors TMA cannot address (row stride not a multiple of 16
    bytes) is an error that names the strides; the automatic choice never picks it on the CPU."""
    g = _gen("layout")
    a, b = _rand_int8(8, 40, generator=g), _rand_int8(16, 40, generator=g)
    a_s, b_s = torch.ones(1), torch.ones(16)
    with pytest.raises(ValueError, match=r"16-byte aligned rows.*a \(40, 1\)"):
        int8_scaled_mm_triton(a, b, a_s, b_s, persistent=True)
    out = torch.empty(8, 16, dtype=torch.bfloat16)
    assert not int8_mm._tma_path_applies(a, b, out, None)  # CPU tensors


def test_persistent_configs_are_consistent():
    """Config names are unique, the autotuned ones are sweep candidates, the shared memory
    of their operand pipelines fits Hopper's 227 KiB per CTA (half of 228 KiB for two CTAs
    per SM), and the registers of OCC CTAs fit one SM."""
    names = [int8_mm.tma_config_name(c) for c in int8_mm.TMA_SWEEP_CONFIGS]
    assert len(set(names)) == len(names)
    tuned = [int8_mm.tma_config_name(c) for c in int8_mm._TMA_CONFIGS]
    assert tuned == list(int8_mm._TMA_AUTOTUNE_NAMES) and len(tuned) >= 3
    for c in int8_mm.TMA_SWEEP_CONFIGS:
        kw = c.kwargs
        operands = c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"]
        assert operands <= (227 if kw["OCC"] == 1 else 112) * 1024, int8_mm.tma_config_name(c)
        assert kw["BLOCK_N"] % kw["SUBTILE"] == 0 and kw["BLOCK_K"] * 1 >= 16  # TMA boxes of >= 16 bytes
        # OCC CTAs' threads fit the 64K-register file at their register cap (255 without maxnreg)
        assert kw["OCC"] * c.num_warps * 32 * (c.maxnreg or 255) <= 65536, int8_mm.tma_config_name(c)


# Compiled in a fresh process (the test process runs Triton's interpreter). Prints one
# JSON line per compiled (config, epilogue) with what the PTX and ptxas report.
_AOT_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastzoo.ops import int8_mm as mod

jit = mod._int8_scaled_mm_tma.fn
cfgs = {mod.tma_config_name(c): c for c in mod.TMA_SWEEP_CONFIGS + mod.TMA_FLOAT_CONFIGS}
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for job in sys.argv[1].split(";"):
    name, epilogue = job.split("|")
    cfg = cfgs[name]
    kw = cfg.kwargs
    full = epilogue == "full"  # GELU, residual, int8 out: every epilogue buffer and the most registers
    flt = epilogue == "float"  # bf16 a and b (linear_act), GELU and residual, bf16 out
    out_ty = "i8" if full else "bf16"
    in_ty = "bf16" if flt else "i8"
    part = kw["BLOCK_N"] // kw["SUBTILE"]
    types = {"a_desc": f"tensordesc<{in_ty}[{kw['BLOCK_M']}, {kw['BLOCK_K']}]>",
             "b_desc": f"tensordesc<{in_ty}[{kw['BLOCK_N']}, {kw['BLOCK_K']}]>",
             "c_desc": f"tensordesc<{out_ty}[{kw['BLOCK_M']}, {part}]>",
             "r_desc": f"tensordesc<bf16[{kw['BLOCK_M']}, {part}]>",
             "as_ptr": "*fp32", "bs_ptr": "*fp32", "bias_ptr": "*bf16", "os_ptr": "*fp32"}
    const = dict(kw, NUM_SMS=132, HAS_BIAS=True, ACT_GELU=full or flt, HAS_RESIDUAL=full or flt, OUT_INT8=full,
                 FLOAT_AB=flt, DOT_F32=False, stride_as=0 if flt else 1, stride_bs=0 if flt else 1, stride_os=0,
                 out_bytes=1 if full else 2)
    sig = {n: types.get(n, "constexpr" if n in const else "i32") for n in jit.arg_names}
    aligned = ["as_ptr", "bs_ptr", "bias_ptr", "os_ptr", "M", "N", "K", "M_BUCKET"]
    src = ASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in const.items()},
                    attrs={(jit.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg:
        opts["maxnreg"] = cfg.maxnreg
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", os.path.join(d, "k.ptx"), "-o",
                              os.path.join(d, "k.o")], capture_output=True, text=True).stderr
    spills = re.search(r"(\d+) bytes spill stores", log)
    print("AOT" + json.dumps({"name": name, "epilogue": epilogue, "shared": kernel.metadata.shared,
                              "spills": int(spills.group(1)) if spills else None,
                              "wgmma": "wgmma.mma_async" in ptx, "tma_load": "cp.async.bulk.tensor.2d.shared" in ptx,
                              "tma_store": "cp.async.bulk.tensor.2d.global.shared" in ptx}))
"""


def test_persistent_kernel_compiles_for_hopper_without_a_gpu():
    """The default autotuned tile in the plain epilogue, and the first autotuned tiles of one
    and of two CTAs per SM that take the fullest epilogue (GELU, residual, int8 out): int8
    wgmma, TMA loads and stores, no register spills, and the shared memory that
    ``tma_shared_bytes`` predicts (within barriers and padding) inside the CTA's limit."""
    import json

    def fits_full(c):
        return int8_mm.tma_shared_bytes(c, 1, 2) <= int8_mm._tma_shared_limit(c)

    tuned = int8_mm._TMA_CONFIGS
    one = next(c for c in tuned if c.kwargs["OCC"] == 1 and fits_full(c))
    two = next(c for c in tuned if c.kwargs["OCC"] == 2 and fits_full(c))
    jobs = [(tuned[0], "bare"), (one, "full"), (two, "full")] + [(c, "float") for c in int8_mm.TMA_FLOAT_CONFIGS[:1]]
    r = run_aot_compile(_AOT_SCRIPT, ";".join(f"{int8_mm.tma_config_name(c)}|{e}" for c, e in jobs))
    assert r.returncode == 0, r.stderr[-3000:]
    report = [json.loads(line[3:]) for line in r.stdout.splitlines() if line.startswith("AOT")]
    assert [(x["name"], x["epilogue"]) for x in report] == [(int8_mm.tma_config_name(c), e) for c, e in jobs]
    for (cfg, epilogue), x in zip(jobs, report):
        assert x["wgmma"] and x["tma_load"] and x["tma_store"], x
        predicted = {"full": int8_mm.tma_shared_bytes(cfg, 1, 2), "float": int8_mm.tma_shared_bytes(cfg, 2, 2, 2)
                     }.get(epilogue, int8_mm.tma_shared_bytes(cfg, 2))
        assert predicted <= x["shared"] <= predicted + 1536, (x, predicted)
        assert x["shared"] <= int8_mm.SM90_SHARED_PER_CTA, x
        assert (x["shared"] + 1024) * cfg.kwargs["OCC"] <= int8_mm.SM90_SHARED_PER_SM, x  # OCC CTAs fit one SM
        assert x["spills"] == 0, x


# ----------------------------------------------------------------------------------
# CUDA (Hopper): every autotuned tile at the ViT-L shapes, the public op's dispatch
# ----------------------------------------------------------------------------------
VIT_L = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]  # qkv, proj, fc1, fc2 (N, K)


def _hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")


@pytest.mark.cuda
@pytest.mark.parametrize("NK", VIT_L)
@pytest.mark.parametrize("epilogue", ["bare", "static_gelu", "full"])
def test_cuda_every_tuned_config_at_vit_l(NK, epilogue):
    """Each autotuned tile whose shared memory fits the epilogue (what the autotuner's
    pre-filter keeps), forced, and the public op (autotuned, persistent) against the
    reference. The other epilogues go through the public op in test_int8_mm.py's CUDA tests."""
    _hopper()
    N, K = NK
    M = 24 * 197 + 5  # >= TMA_MIN_M, a partial last row tile
    args, kw, ref = _case(M, N, K, epilogue, _gen(NK, epilogue), bias_kind="bf16")
    a, b, a_s, b_s, bias, out_dtype = [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]
    kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    o_s = kw["out_scale"].reshape(-1) if kw["out_scale"] is not None else None
    out_bytes = torch.empty(0, dtype=out_dtype).element_size()
    res_bytes = 2 if kw["residual"] is not None else 0
    fitting = [c for c in int8_mm._TMA_CONFIGS
               if int8_mm.tma_shared_bytes(c, out_bytes, res_bytes) <= int8_mm._tma_shared_limit(c)]
    assert fitting
    for cfg in fitting:
        out = torch.empty(M, N, dtype=out_dtype, device="cuda")
        int8_mm._int8_scaled_mm_tma_launch(a, b, a_s.reshape(-1), b_s, bias, out, kw["residual"], o_s,
                                           kw["activation"], config=cfg)
        _assert_close(out, ref)
    out = int8_scaled_mm(a, b, a_s, b_s, bias, out_dtype, **kw)  # the public op: autotuned, persistent
    assert int8_mm._tma_path_applies(a, b, out, kw["residual"])
    _assert_close(out, ref)


@pytest.mark.cuda
def test_cuda_small_m_and_unaligned_take_the_plain_kernel():
    _hopper()
    g = _gen("plain")
    a, b = _rand_int8(100, 1024, generator=g).cuda(), _rand_int8(1024, 1024, generator=g).cuda()
    out = torch.empty(100, 1024, dtype=torch.bfloat16, device="cuda")
    assert not int8_mm._tma_path_applies(a, b, out, None)  # M < TMA_MIN_M
    big = _rand_int8(8192, 1000, generator=g).cuda()
    w = _rand_int8(64, 1000, generator=g).cuda()
    out = torch.empty(8192, 64, dtype=torch.bfloat16, device="cuda")
    assert not int8_mm._tma_path_applies(big, w, out, None)  # K = 1000: rows not 16-byte aligned
    a_s, b_s = torch.full((8192, 1), 1e-3, device="cuda"), torch.full((64,), 1e-3, device="cuda")
    _assert_close(int8_scaled_mm(big, w, a_s, b_s), int8_scaled_mm_ref(big, w, a_s, b_s))
