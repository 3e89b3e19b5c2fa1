"""decode_linear / int8_weight_only_linear / int4_weight_only_linear: kernels vs references,
the modules of fastzoo.quant, public-op fallback and errors, compile, real Llama shapes."""
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastzoo.ops._common import triton_available
from fastzoo.ops.weight_only_linear import (
    decode_linear,
    decode_linear_ref,
    decode_linear_triton,
    int4_dequantize,
    int4_dequantize_ref,
    int4_dequantize_triton,
    int4_weight_only_linear,
    int4_weight_only_linear_ref,
    int4_weight_only_linear_triton,
    int8_weight_only_linear,
    int8_weight_only_linear_ref,
    int8_weight_only_linear_triton,
)
from fastzoo.quant.linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from helpers import exact_int4_cases, rel_err, run_aot_compile

DTYPES = [torch.bfloat16, torch.float16]
RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

# Forced tiles for the interpreter: the GEMV path (one row) and the 16-row dot path,
# each with and without split-K (fp32 atomics). None: the autotuner's first config.
GEMV = dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=64, SPLIT_K=1)
GEMV_SPLIT = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3)
DOT_SPLIT = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)
CONFIGS = {"first": None, "gemv": GEMV, "gemv_split": GEMV_SPLIT, "dot_split": DOT_SPLIT}


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _x(lead, K, dtype, g):
    return (torch.randn(*lead, K, generator=g) * 2).to(dtype)


def _bias(N, kind, dtype, g):
    if kind == "none":
        return None
    return torch.randn(N, generator=g).to(dtype if kind == "same" else torch.float32)


def _check(out, truth, dtype, shape):
    assert out.dtype == dtype and tuple(out.shape) == tuple(shape)
    err = rel_err(out, truth)
    assert err < RTOL[dtype], err


def _applies(config, M):
    return config is None or config["BLOCK_M"] == 16 or M == 1


def _to(dev, *ts):
    return [None if t is None else t.to(dev) for t in ts]


# ----------------------------------------------------------------------------------
# Kernels vs fp32 truth on the same (dequantized) weights
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("M,N,K", [(1, 7, 200), (3, 129, 64), (16, 33, 200), (33, 7, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_decode_linear_kernel(kernel_device, M, N, K, dtype, cfg):
    config = CONFIGS[cfg]
    if not _applies(config, M):
        pytest.skip("GEMV tile is for one row")
    g = _gen("bf", M, N, K, str(dtype), cfg)
    x, w = _x((M,), K, dtype, g), (torch.randn(N, K, generator=g) * 0.1).to(dtype)
    bias = _bias(N, "same" if M % 2 else "fp32", dtype, g)
    truth = F.linear(x.float(), w.float(), bias.float())
    out = decode_linear_triton(*_to(kernel_device, x, w, bias), config=config)
    _check(out, truth, dtype, (M, N))


@pytest.mark.parametrize("M,N,K", [(1, 7, 200), (3, 129, 64), (16, 33, 200), (33, 7, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("bias_kind", ["none", "same"])
def test_int8_kernel(kernel_device, M, N, K, dtype, cfg, bias_kind):
    config = CONFIGS[cfg]
    if not _applies(config, M):
        pytest.skip("GEMV tile is for one row")
    g = _gen("i8", M, N, K, str(dtype), cfg, bias_kind)
    x = _x((M,), K, dtype, g)
    w_q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    scales = (torch.rand(N, generator=g) * 1e-2 + 1e-3).to(dtype)
    bias = _bias(N, bias_kind, dtype, g)
    truth = F.linear(x.float(), w_q.float()) * scales.float()
    if bias is not None:
        truth = truth + bias.float()
    out = int8_weight_only_linear_triton(*_to(kernel_device, x, w_q, scales, bias), config=config)
    _check(out, truth, dtype, (M, N))


@pytest.mark.parametrize("M,N,K,group", [(1, 7, 256, 32), (1, 5, 96, 32), (3, 129, 96, 32), (16, 33, 256, 64),
                                         (1, 9, 256, 128), (33, 7, 256, 256)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_int4_kernel(kernel_device, M, N, K, group, dtype, cfg):
    config = CONFIGS[cfg]
    if not _applies(config, M):
        pytest.skip("GEMV tile is for one row")
    g = _gen("i4", M, N, K, group, str(dtype), cfg)
    x = _x((M,), K, dtype, g)
    w = torch.randn(N, K, generator=g) * 0.1
    packed, scales, zeros = Int4WeightOnlyLinear.quantize(w, group)
    scales, zeros = scales.to(dtype), zeros.to(dtype)
    bias = _bias(N, "same" if M % 2 else "none", dtype, g)
    w_deq = int4_dequantize(packed, scales, zeros, group, torch.float32)
    truth = F.linear(x.float(), w_deq, None if bias is None else bias.float())
    out = int4_weight_only_linear_triton(*_to(kernel_device, x, packed, scales, zeros), group,
                                         *_to(kernel_device, bias), config=config)
    _check(out, truth, dtype, (M, N))


def test_kernels_leading_dims_and_strided_x(kernel_device):
    g = _gen("lead")
    dtype = torch.bfloat16
    big = _x((2, 3), 300, dtype, g)
    x = big[..., 10:138]  # (2, 3, 128), rows not contiguous
    w = (torch.randn(21, 128, generator=g) * 0.1).to(dtype)
    w_q = torch.randint(-128, 128, (21, 128), dtype=torch.int8, generator=g)
    scales = (torch.rand(21, generator=g) * 1e-2).to(dtype)
    packed, s4, z4 = Int4WeightOnlyLinear.quantize(w.float(), 64)
    dev = kernel_device
    out = decode_linear_triton(*_to(dev, x, w))
    _check(out, F.linear(x.float(), w.float()), dtype, (2, 3, 21))
    out = int8_weight_only_linear_triton(*_to(dev, x, w_q, scales))
    _check(out, F.linear(x.float(), w_q.float()) * scales.float(), dtype, (2, 3, 21))
    out = int4_weight_only_linear_triton(*_to(dev, x, packed, s4.to(dtype), z4.to(dtype)), 64)
    deq = int4_dequantize(packed, s4.to(dtype), z4.to(dtype), 64, torch.float32)
    _check(out, F.linear(x.float(), deq), dtype, (2, 3, 21))
    # packed weights contiguous but one byte into their buffer (no int32 view of them): copied
    # for the kernel, not refused
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8)[1:].view(packed.shape)
    shifted.copy_(packed)
    assert shifted.is_contiguous() and shifted.storage_offset() == 1
    for rows in (x, x[:1, :1]):  # several rows and one (the GEMV)
        out = int4_weight_only_linear_triton(*_to(dev, rows, shifted, s4.to(dtype), z4.to(dtype)), 64)
        _check(out, F.linear(rows.float(), deq), dtype, (*rows.shape[:-1], 21))


def test_kernel_int8_extremes_exact_sum(kernel_device):
    """-128 and 127 weights, unit scales, integer x: every partial sum is exact in fp32."""
    K = 96
    x = torch.ones(1, K, dtype=torch.float16)  # sums up to 12288 are exact in fp16
    w_q = torch.full((5, K), -128, dtype=torch.int8)
    w_q[1] = 127
    w_q[2, ::2] = 127
    scales = torch.ones(5, dtype=torch.float16)
    for config in (None, GEMV_SPLIT):
        out = int8_weight_only_linear_triton(*_to(kernel_device, x, w_q, scales), config=config).float().cpu()
        assert out[0].tolist() == [-128 * K, 127 * K, (127 - 128) * K / 2, -128 * K, -128 * K]



# Forced GEMV tiles of the GPU lists (one row): int8 with BLOCK_K 1024 (masked at K = 1000,
# one block per split) and split-K; int4 with several quantization groups per block
# (group 32: 8 groups in 256 columns), partial last blocks, odd N, with and without the
# next block's loads issued ahead (PREFETCH).
INT8_WIDE = [dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=1024, SPLIT_K=1), dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=2)]
INT4_WIDE = [dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=1),
             dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=512, SPLIT_K=2, PREFETCH=True),
             dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=3, PREFETCH=True)]


@pytest.mark.parametrize("N,K", [(7, 1000), (37, 2048)])
@pytest.mark.parametrize("config", INT8_WIDE, ids=["k1024", "k256_split2"])
def test_int8_kernel_wide_gemv_tiles(kernel_device, N, K, config):
    g = _gen("i8wide", N, K, config["BLOCK_K"])
    x = _x((1,), K, torch.bfloat16, g)
    w_q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    scales = (torch.rand(N, generator=g) * 1e-2 + 1e-3).to(torch.bfloat16)
    truth = F.linear(x.float(), w_q.float()) * scales.float()
    out = int8_weight_only_linear_triton(*_to(kernel_device, x, w_q, scales), config=config)
    _check(out, truth, torch.bfloat16, (1, N))


# one-row tiles with evict-first weight loads (the autotuner's int8 GEMV tiles have them):
# whole and ragged K, splits past the end of K
INT8_EVICT = [dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=256, SPLIT_K=1, EVICT_W="evict_first"),
              dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128, SPLIT_K=3, EVICT_W="evict_first"),
              dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=64, SPLIT_K=16, EVICT_W="evict_first")]


@pytest.mark.parametrize("N,K", [(7, 1000), (37, 1024), (1, 197)])
@pytest.mark.parametrize("config", INT8_EVICT, ids=["k256", "k128_split3", "k64_split16"])
@pytest.mark.parametrize("opts", ["plain", "glu+norm+res"])
def test_int8_gemv_evict_first(kernel_device, N, K, config, opts):
    g = _gen("i8evict", N, K, config["BLOCK_K"], opts)
    x, w, scales, bias, fopts, truth = _fused_inputs(1, N, K, torch.bfloat16, opts if opts != "plain" else "", 1, g)
    fopts = dict(fopts, norm_weight=_to(kernel_device, fopts["norm_weight"])[0],
                 residual=_to(kernel_device, fopts["residual"])[0])
    out = int8_weight_only_linear_triton(*_to(kernel_device, x, w, scales, bias), config=config, **fopts)
    _check(out, truth, torch.bfloat16, (1, N))


@pytest.mark.parametrize("N,K,group", [(37, 768, 32), (19, 1280, 128), (5, 768, 256), (33, 320, 64)])
@pytest.mark.parametrize("config", INT4_WIDE, ids=["k256", "k512_split2_prefetch", "k256_split3_prefetch"])
def test_int4_kernel_wide_gemv_tiles(kernel_device, N, K, group, config):
    g = _gen("i4wide", N, K, group, config["BLOCK_K"])
    x = _x((1,), K, torch.float16, g)
    w = torch.randn(N, K, generator=g) * 0.1
    packed, scales, zeros = Int4WeightOnlyLinear.quantize(w, group)
    scales, zeros = scales.half(), zeros.half()
    truth = F.linear(x.float(), int4_dequantize(packed, scales, zeros, group, torch.float32))
    out = int4_weight_only_linear_triton(*_to(kernel_device, x, packed, scales, zeros), group, config=config)
    _check(out, truth, torch.float16, (1, N))


@pytest.mark.parametrize("config", [GEMV, INT4_WIDE[0], INT4_WIDE[2]], ids=["gemv", "k256", "k256_prefetch"])
def test_int4_gemv_every_nibble_exact(kernel_device, config):
    """Every nibble value at every position of a word (the GEMV takes nibbles 0-3 and 4-7
    in place, from the word and from word >> 16), integer x, unit scales, zero point -8:
    every partial sum is an integer below 2048, so the fp16 result is exact."""
    N, K = 16, 256
    n, k = torch.arange(N)[:, None], torch.arange(K)[None, :]
    q = ((n + k + k // 8) % 16).to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    x = torch.randint(-3, 4, (1, K), generator=_gen("nibbles")).half()
    scales = torch.ones(N, K // 32, dtype=torch.float16)
    zeros = torch.full((N, K // 32), -8.0, dtype=torch.float16)
    expected = F.linear(x.float(), q.float() - 8).half()
    assert expected.abs().max() < 2048
    out = int4_weight_only_linear_triton(*_to(kernel_device, x, packed, scales, zeros), 32, config=config)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("config", [GEMV_SPLIT, DOT_SPLIT], ids=["gemv", "dot"])
def test_split_k_reduces_in_launch_and_resets_counters(kernel_device, config):
    """Split-K sums its partials in the same launch: repeated calls (the counters reused,
    the workspace uninitialised) give bit-identical results equal to the one-split
    result up to fp32 summation order, and leave every arrival counter at zero."""
    from fastzoo.ops._common import ARRIVAL_COUNTERS as _COUNTERS

    g = _gen("splitk", config["BLOCK_M"])
    M = 1 if config["BLOCK_M"] == 1 else 19
    x, w = _x((M,), 200, torch.float16, g), (torch.randn(37, 200, generator=g) * 0.1).half()
    bias = torch.randn(37, generator=g)
    x, w, bias = _to(kernel_device, x, w, bias)
    outs = [decode_linear_triton(x, w, bias, config=config) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    one = decode_linear_triton(x, w, bias, config=dict(config, SPLIT_K=1))
    assert rel_err(outs[0], one) < 2e-3
    assert int(_COUNTERS[x.device].abs().sum()) == 0

# ----------------------------------------------------------------------------------
# Fusions: RMSNorm / SwiGLU prologue, residual epilogue
# ----------------------------------------------------------------------------------
FUSIONS = ["norm", "glu+res", "norm+res", "glu+norm+res"]  # each option, with and without the others


def _fused_inputs(M, N, K, dtype, opts, quant, g):
    """x (M, K or 2K), the weight (float, or int8 + scales), the options, and the fp32 truth."""
    glu = "glu" in opts
    x = _x((M,), 2 * K if glu else K, dtype, g)
    nw = (torch.rand(K, generator=g) + 0.5).to(dtype) if "norm" in opts else None
    res = torch.randn(M, N, generator=g).to(dtype) if "res" in opts else None
    bias = _bias(N, "same" if M % 2 else "none", dtype, g)
    if quant:
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
        scales = (torch.rand(N, generator=g) * 1e-2 + 1e-3).to(dtype)
        w_true = w.float() * scales.float()[:, None]
    else:
        w = (torch.randn(N, K, generator=g) * 0.1).to(dtype)
        scales, w_true = None, w.float()
    xf = x.float()
    if glu:
        xf = F.silu(xf[:, :K]) * xf[:, K:]
    if nw is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.float()
    truth = F.linear(xf, w_true, None if bias is None else bias.float())
    if res is not None:
        truth = truth + res.float()
    opts = dict(norm_weight=nw, norm_eps=1e-5, glu=glu, residual=res)
    return x, w, scales, bias, opts, truth


@pytest.mark.parametrize("M,N,K,dtype", [(1, 7, 200, torch.bfloat16), (3, 129, 64, torch.float16),
                                         (16, 7, 200, torch.float16), (1, 129, 64, torch.float16)])
@pytest.mark.parametrize("quant", [0, 1], ids=["float", "int8"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("opts", FUSIONS)
def test_fused_kernel(kernel_device, M, N, K, dtype, quant, cfg, opts):
    """Each fusion and their combinations, GEMV / dot paths, with and without split-K
    (the split-K RMSNorm combines per-split Σx²), against an fp32 computation."""
    config = CONFIGS[cfg]
    if not _applies(config, M):
        pytest.skip("GEMV tile is for one row")
    g = _gen("fused", M, N, K, str(dtype), quant, cfg, opts)
    x, w, scales, bias, fopts, truth = _fused_inputs(M, N, K, dtype, opts, quant, g)
    dev = kernel_device
    fopts = dict(fopts, norm_weight=_to(dev, fopts["norm_weight"])[0], residual=_to(dev, fopts["residual"])[0])
    if quant:
        out = int8_weight_only_linear_triton(*_to(dev, x, w, scales, bias), config=config, **fopts)
        ref = int8_weight_only_linear_ref(x, w, scales, bias, **_to_cpu_opts(fopts))
    else:
        out = decode_linear_triton(*_to(dev, x, w, bias), config=config, **fopts)
        ref = decode_linear_ref(x, w, bias, **_to_cpu_opts(fopts))
    _check(out, truth, dtype, (M, N))
    _check(ref, truth, dtype, (M, N))  # the reference's roundings stay within the same tolerance


def _to_cpu_opts(opts):
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in opts.items()}


@pytest.mark.parametrize("bf16_norm_weight", [False, True])
def test_fused_kernel_leading_dims_fp32_norm_weight_and_split_k_repeat(kernel_device, bf16_norm_weight):
    """(2, 3, K) x with strided rows, a float32 norm weight; split-K repeated: bit-identical,
    the counters back at zero."""
    from fastzoo.ops._common import ARRIVAL_COUNTERS as _COUNTERS

    g = _gen("fused-lead", bf16_norm_weight)
    dtype = torch.bfloat16
    x = _x((2, 3), 300, dtype, g)[..., 10:138]
    w = (torch.randn(21, 64, generator=g) * 0.1).to(dtype)
    nw = torch.rand(64, generator=g) + 0.5
    nw = nw.to(dtype) if bf16_norm_weight else nw
    res = torch.randn(2, 3, 21, generator=g).to(dtype)
    xf = F.silu(x.float()[..., :64]) * x.float()[..., 64:]
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.float()
    truth = F.linear(xf, w.float()) + res.float()
    x, w, nw, res = _to(kernel_device, x, w, nw, res)
    outs = [decode_linear_triton(x, w, config=DOT_SPLIT, norm_weight=nw, norm_eps=1e-6, glu=True, residual=res)
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    _check(outs[0], truth, dtype, (2, 3, 21))
    assert int(_COUNTERS[x.device].abs().sum()) == 0


def test_fused_reference_is_the_model_math():
    """The references compose the model's own pieces bit for bit: RMSNorm (the model's
    module), silu·mul, the linear, + residual, in x's dtype."""
    from fastzoo.llama.model import RMSNorm
    from fastzoo.ops.weight_only_linear import rms_norm_ref, silu_mul_ref

    g = _gen("fused-ref")
    for dtype in (torch.bfloat16, torch.float32):
        norm = RMSNorm(64, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
        x = _x((2, 3), 64, dtype, g)
        x2 = _x((2, 3), 128, dtype, g)
        w = (torch.randn(24, 64, generator=g) * 0.1).to(dtype)
        res = torch.randn(2, 3, 24, generator=g).to(dtype)
        assert torch.equal(rms_norm_ref(x, norm.weight, 1e-6), norm(x))
        a, b = x2.split(64, dim=-1)
        assert torch.equal(silu_mul_ref(x2), F.silu(a) * b)
        expected = res + F.linear(norm(x), w)
        got = decode_linear(x, w, norm_weight=norm.weight, norm_eps=norm.eps, residual=res)  # CPU: reference
        assert torch.equal(got, expected)
        expected = res + F.linear(F.silu(a) * b, w)
        assert torch.equal(decode_linear(x2, w, glu=True, residual=res), expected)
        w_q = torch.randint(-127, 128, (24, 64), dtype=torch.int8, generator=g)
        s = torch.rand(24, generator=g).to(dtype)
        expected = res + int8_weight_only_linear_ref(norm(x), w_q, s)
        assert torch.equal(int8_weight_only_linear(x, w_q, s, norm_weight=norm.weight, norm_eps=1e-6, residual=res),
                           expected)


def test_fused_options_reject_bad_input():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    w_q = torch.zeros(8, 32, dtype=torch.int8)
    s = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"w of shape \(N, K=32\), got \(8, 64\) \(glu=True"):
        decode_linear(x, w, glu=True)
    with pytest.raises(ValueError, match=r"glu=True expects x of shape \(..., 2K\).*odd"):
        decode_linear(x[:, :63], w[:, :31], glu=True)
    with pytest.raises(ValueError, match=r"norm_weight of shape \(K,\) = \(64,\), got \(32,\)"):
        decode_linear(x, w, norm_weight=torch.ones(32, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"norm_weight in x's dtype \(torch.bfloat16\) or float32, got torch.float16"):
        decode_linear(x, w, norm_weight=torch.ones(64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"residual of shape \(2, 8\), got \(2, 9\)"):
        decode_linear(x, w, residual=torch.zeros(2, 9, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"residual in x's dtype \(torch.bfloat16\), got torch.float32"):
        int8_weight_only_linear(x[:, :32], w_q, s, residual=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"norm_eps >= 0, got -1"):
        decode_linear(x, w, norm_weight=torch.ones(64, dtype=torch.bfloat16), norm_eps=-1.0)


# ----------------------------------------------------------------------------------
# References and the quant modules
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_reference_equals_module_forward(dtype):
    g = _gen("mod8", str(dtype))
    lin = nn.Linear(96, 40).to(dtype)
    mod = Int8WeightOnlyLinear.from_linear(lin)
    x = _x((2, 5), 96, dtype, g)
    expected = mod(x)
    assert torch.equal(int8_weight_only_linear_ref(x, mod.weight, mod.scales, mod.bias), expected)
    assert torch.equal(int8_weight_only_linear(x, mod.weight, mod.scales, mod.bias), expected)  # CPU: reference


@pytest.mark.parametrize("group", [32, 128])
def test_int4_reference_equals_module_forward(group):
    g = _gen("mod4", group)
    lin = nn.Linear(256, 24).to(torch.bfloat16)
    mod = Int4WeightOnlyLinear.from_linear(lin, group_size=group)
    x = _x((3,), 256, torch.bfloat16, g)
    expected = mod(x)
    args = (x, mod.weight, mod.scales, mod.zeros, group, mod.bias)
    assert torch.equal(int4_weight_only_linear_ref(*args), expected)
    assert torch.equal(int4_weight_only_linear(*args), expected)
    assert torch.equal(int4_dequantize(mod.weight, mod.scales, mod.zeros, group, torch.bfloat16),
                       Int4WeightOnlyLinear.dequantize(mod.weight, mod.scales, mod.zeros, group, torch.bfloat16))


def test_module_buffers_through_kernel(kernel_device):
    """The kernels on the modules' own buffers match the modules' forward (bf16 rounding)."""
    g = _gen("modk")
    lin = nn.Linear(128, 19).to(torch.bfloat16)
    x = _x((1, 2), 128, torch.bfloat16, g)
    m8 = Int8WeightOnlyLinear.from_linear(lin)
    m4 = Int4WeightOnlyLinear.from_linear(lin, group_size=64)
    dev = kernel_device
    out8 = int8_weight_only_linear_triton(*_to(dev, x, m8.weight, m8.scales, m8.bias.detach()))
    assert rel_err(out8, m8(x)) < 1e-2
    out4 = int4_weight_only_linear_triton(*_to(dev, x, m4.weight, m4.scales, m4.zeros), 64, m4.bias.detach().to(dev))
    assert rel_err(out4, m4(x)) < 1e-2
    outb = decode_linear_triton(*_to(dev, x, lin.weight.detach(), lin.bias.detach()))
    assert rel_err(outb, lin(x)) < 1e-2


# ----------------------------------------------------------------------------------
# Public ops: fallback, errors, compile
# ----------------------------------------------------------------------------------
def test_public_ops_fall_back_on_cpu():
    g = _gen("cpu")
    for dtype in (torch.bfloat16, torch.float32):
        x = _x((4,), 64, dtype, g)
        w = torch.randn(10, 64, generator=g).to(dtype)
        b = torch.randn(10, generator=g).to(dtype)
        assert torch.equal(decode_linear(x, w, b), F.linear(x, w, b))
        w_q = torch.randint(-127, 128, (10, 64), dtype=torch.int8, generator=g)
        s = torch.rand(10, generator=g).to(dtype)
        assert torch.equal(int8_weight_only_linear(x, w_q, s, b), int8_weight_only_linear_ref(x, w_q, s, b))
        p, s4, z4 = Int4WeightOnlyLinear.quantize(w.float(), 32)
        assert torch.equal(int4_weight_only_linear(x, p, s4, z4, 32, b),
                           int4_weight_only_linear_ref(x, p, s4, z4, 32, b))


def test_public_ops_reject_bad_input():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    w_q = torch.zeros(8, 64, dtype=torch.int8)
    s = torch.ones(8, dtype=torch.bfloat16)
    p, s4, z4 = torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2), torch.zeros(8, 2)
    with pytest.raises(TypeError, match="x in bfloat16, float16 or float32, got torch.int32"):
        decode_linear(x.int(), w)
    with pytest.raises(ValueError, match=r"w of shape \(N, K=64\), got \(8, 63\)"):
        decode_linear(x, w[:, :63])
    with pytest.raises(TypeError, match=r"w in x's dtype \(torch.bfloat16\), got torch.float16"):
        decode_linear(x, w.half())
    with pytest.raises(ValueError, match=r"bias of shape \(8,\), got shape \(9,\)"):
        decode_linear(x, w, torch.zeros(9, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"bias in x's dtype \(torch.bfloat16\) or float32, got torch.float16"):
        decode_linear(x, w, torch.zeros(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="w_int8 of dtype torch.int8, got torch.uint8"):
        int8_weight_only_linear(x, w_q.to(torch.uint8), s)
    with pytest.raises(ValueError, match=r"w_int8 of shape \(N, K=64\), got \(8, 32\)"):
        int8_weight_only_linear(x, w_q[:, :32], s)
    with pytest.raises(ValueError, match=r"scales of shape \(8,\) .*got shape \(7,\)"):
        int8_weight_only_linear(x, w_q, s[:7])
    with pytest.raises(TypeError, match="floating-point scales, got torch.int8"):
        int8_weight_only_linear(x, w_q, w_q[:, 0])
    with pytest.raises(ValueError, match=r"group_size in \(32, 64, 128, 256\), got 48"):
        int4_weight_only_linear(x, p, s4, z4, 48)
    with pytest.raises(ValueError, match="K divisible by group_size=128, got K=64"):
        int4_weight_only_linear(x, p, s4, z4, 128)
    with pytest.raises(TypeError, match="w_packed of dtype torch.uint8 .*got torch.int8"):
        int4_weight_only_linear(x, p.to(torch.int8), s4, z4, 32)
    with pytest.raises(ValueError, match=r"w_packed of shape \(N, K/2=32\), got \(8, 64\)"):
        int4_weight_only_linear(x, torch.zeros(8, 64, dtype=torch.uint8), s4, z4, 32)
    with pytest.raises(ValueError, match=r"zeros of shape \(N, K/group_size\) = \(8, 2\), got \(8, 3\)"):
        int4_weight_only_linear(x, p, s4, torch.zeros(8, 3), 32)
    with pytest.raises(ValueError, match="one device, got x on cpu, w on meta"):
        decode_linear(x, w.to("meta"))


# (N, K, group): one row, odd rows, K not a multiple of the kernel's 256-column block
@pytest.mark.parametrize("N,K,group", [(1, 64, 32), (7, 96, 32), (129, 384, 128), (19, 512, 256), (33, 640, 64)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_dequantize_kernel(kernel_device, N, K, group, scale_dtype):
    """The one-pass dequantization kernel against the reference: the same bits in fp32 and
    fp16 (no FMA contraction: q · scale and + zero round separately, as in the reference);
    bf16 to one unit in the last place under Triton's interpreter (its fp32 -> bf16 cast
    truncates), the same bits on the GPU."""
    g = _gen("deq", N, K, group)
    p, s4, z4 = Int4WeightOnlyLinear.quantize(torch.randn(N, K, generator=g), group)
    p, s4, z4 = _to(kernel_device, p, s4.to(scale_dtype), z4.to(scale_dtype))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = int4_dequantize_triton(p, s4, z4, group, dtype)
        ref = int4_dequantize_ref(p, s4, z4, group, dtype)
        assert out.dtype == dtype and out.shape == (N, K)
        if dtype == torch.bfloat16 and kernel_device.type == "cpu":
            assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()
        else:
            assert torch.equal(out, ref), dtype
    # strided views: weights inside a wider buffer (row stride != K/2, a storage offset),
    # scales and zeros transposed in memory
    big = torch.randint(0, 256, (N, K // 2 + 24), generator=g, dtype=torch.uint8).to(kernel_device)
    pv = big[:, 10:10 + K // 2]
    st, zt = s4.t().contiguous().t(), z4.t().contiguous().t()
    assert pv.stride(0) == K // 2 + 24 and pv.storage_offset() == 10 and (N == 1 or st.stride(0) == 1)
    assert torch.equal(int4_dequantize_triton(pv, st, zt, group, torch.float32),
                       int4_dequantize_ref(pv, st, zt, group, torch.float32))


def test_int4_dequantize_public_op_and_errors():
    """On CPU tensors the public op is the reference; its argument errors name what was
    expected and what was found."""
    g = _gen("deq-public")
    p, s4, z4 = Int4WeightOnlyLinear.quantize(torch.randn(8, 128, generator=g), 64)
    assert torch.equal(int4_dequantize(p, s4, z4, 64, torch.bfloat16), int4_dequantize_ref(p, s4, z4, 64, torch.bfloat16))
    with pytest.raises(ValueError, match=r"group_size in \(32, 64, 128, 256\), got 48"):
        int4_dequantize(p, s4, z4, 48, torch.bfloat16)
    with pytest.raises(ValueError, match=r"scales of shape \(N, K/group_size\) = \(8, 2\), got \(8, 1\)"):
        int4_dequantize(p, s4[:, :1], z4, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="w_packed of dtype torch.uint8 .*got torch.int8"):
        int4_dequantize(p.to(torch.int8), s4, z4, 64, torch.bfloat16)
    pytest.importorskip("triton")
    with pytest.raises(TypeError, match="bfloat16, float16 or float32, got torch.int32"):
        int4_dequantize_triton(p, s4, z4, 64, torch.int32)


def _op_in_graphs(counter, name):
    return any(name in str(n.target) for g in counter.graphs for n in g.graph.nodes)


def test_compile_fullgraph_one_frame():
    import torch._dynamo.testing

    g = _gen("compile")
    w = torch.randn(24, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(24, generator=g).to(torch.bfloat16)
    w_q = torch.randint(-127, 128, (24, 64), dtype=torch.int8, generator=g)
    s = torch.rand(24, generator=g).to(torch.bfloat16)
    p, s4, z4 = Int4WeightOnlyLinear.quantize(w.float(), 32)
    s4, z4 = s4.to(torch.bfloat16), z4.to(torch.bfloat16)

    def f(x):
        y = decode_linear(x * 2, w, b)
        y = y + int8_weight_only_linear(x, w_q, s, b)
        y = y + F.linear(x, int4_dequantize(p, s4, z4, 32, x.dtype))
        return y + int4_weight_only_linear(x, p, s4, z4, 32, None)

    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    x = _x((1, 2), 64, torch.bfloat16, g)
    torch.testing.assert_close(compiled(x), f(x))
    assert counter.frame_count == 1
    for name in ("decode_linear", "int8_weight_only_linear", "int4_weight_only_linear", "int4_dequantize"):
        assert _op_in_graphs(counter, name), name


def test_custom_ops_opcheck():
    from fastzoo.ops.weight_only_linear import _decode_linear_op, _int4_dequantize_op, _int4_op, _int8_op

    g = _gen("opcheck")
    x = _x((2, 3), 64, torch.bfloat16, g)
    w = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    w_q = torch.randint(-127, 128, (8, 64), dtype=torch.int8, generator=g)
    s = torch.rand(8, generator=g).to(torch.bfloat16)
    p, s4, z4 = Int4WeightOnlyLinear.quantize(w.float(), 32)
    torch.library.opcheck(_decode_linear_op, (x, w, None))
    torch.library.opcheck(_int8_op, (x, w_q, s, s))
    torch.library.opcheck(_int4_op, (x, p, s4, z4, 32, None))
    torch.library.opcheck(_int4_dequantize_op, (p, s4, z4, 32, torch.float16))
    nw, res = torch.rand(64, generator=g).to(torch.bfloat16), torch.randn(2, 3, 8, generator=g).to(torch.bfloat16)
    torch.library.opcheck(_decode_linear_op, (x, w, None, nw, 1e-6, False, res))
    torch.library.opcheck(_int8_op, (x, w_q[:, :32], s, None, None, 1e-5, True, res))


def test_autotune_prune():
    pytest.importorskip("triton")
    from fastzoo.ops.weight_only_linear import (
        _FLOAT_CONFIGS, _INT4_CONFIGS, _INT8_CONFIGS, _MIN_BLOCK_N, MAX_SPLIT_K, _linear_kernel, _m_bucket, _prune,
        _prune_linear, _workspace_splits)

    assert [_m_bucket(m) for m in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16]
    # _linear_kernel's one autotuner: each kind keeps its own GEMV tiles and the shared dot tiles
    gemv = {q: [c for c in _linear_kernel.configs if c.kwargs["BLOCK_M"] == 1
                and c in _prune_linear(_linear_kernel.configs, {"M_BUCKET": 1, "N": 4096, "K": 4096}, QUANT=q)]
            for q in (0, 1)}
    assert gemv[0] and gemv[1] and not set(map(id, gemv[0])) & set(map(id, gemv[1]))
    assert max(c.kwargs["BLOCK_K"] for c in gemv[1]) > max(c.kwargs["BLOCK_K"] for c in gemv[0])
    assert _prune_linear(_linear_kernel.configs, {"M_BUCKET": 8, "N": 4096, "K": 4096}, QUANT=1) == \
        _prune_linear(_linear_kernel.configs, {"M_BUCKET": 8, "N": 4096, "K": 4096}, QUANT=0)
    # int4 GEMV: at most 2 words per lane (BLOCK_K / 8 <= 2 · 32), see _int4_kernel
    assert all(c.kwargs["BLOCK_K"] // 8 <= 64 for c in _INT4_CONFIGS if c.kwargs["BLOCK_M"] == 1)
    for configs in (_FLOAT_CONFIGS, _INT8_CONFIGS, _INT4_CONFIGS):
        c0 = configs[0].kwargs
        assert c0["BLOCK_M"] == 16 and c0["SPLIT_K"] == 1 and c0["BLOCK_N"] <= 16
        one = _prune(configs, {"M_BUCKET": 1, "N": 4096, "K": 4096})
        assert one and all(c.kwargs["BLOCK_M"] == 1 for c in one)
        assert any(c.kwargs["SPLIT_K"] > 1 for c in one)
        eight = _prune(configs, {"M_BUCKET": 8, "N": 128256, "K": 4096})
        assert eight and all(c.kwargs["BLOCK_M"] == 16 for c in eight)
        # the arrival counters and the split-K workspace are sized from these bounds
        assert min(c.kwargs["BLOCK_N"] for c in configs) >= _MIN_BLOCK_N
        assert max(c.kwargs["SPLIT_K"] for c in configs) <= MAX_SPLIT_K
        for M, N in ((1, 4096), (16, 128256), (16, 32000)):
            kept = _prune(configs, {"M_BUCKET": M, "N": N, "K": 4096})
            assert all(c.kwargs["SPLIT_K"] <= _workspace_splits(M, N) for c in kept)
    # the tensor-core int4 GEMV: splits bounded by the workspace and by K's 128-column segments
    from fastzoo.ops.weight_only_linear import INT4_MMA_SWEEP, _prune_mma
    assert max(c.kwargs["SPLIT_K"] for c in INT4_MMA_SWEEP) <= MAX_SPLIT_K
    for N, K in ((4096, 4096), (600_000, 4096), (4096, 512), (4096, 128)):
        kept = _prune_mma(INT4_MMA_SWEEP, {"N": N, "K": K})
        assert kept and all(c.kwargs["SPLIT_K"] <= min(_workspace_splits(1, N), K // 128) for c in kept)
    assert {c.kwargs["SPLIT_K"] for c in _prune_mma(INT4_MMA_SWEEP, {"N": 4096, "K": 4096})} == {1, 2, 4, 8, 16}
    # its one autotuner: the one-row tiles for one row, the several-row tiles for 2 to 16 rows
    # (ROWS 8 or 16), the workspace bounding ROWS × N
    from fastzoo.ops.weight_only_linear import _INT4_MMA_CONFIGS, _INT4_MMA_ROWS_CONFIGS, _int4_mma_kernel
    one = _prune_mma(_int4_mma_kernel.configs, {"N": 4096, "K": 4096}, ROWS=1)
    assert one and {id(c) for c in one} <= {id(c) for c in _INT4_MMA_CONFIGS}
    for rows in (8, 16):
        for N in (4096, 32000, 128256):
            kept = _prune_mma(_int4_mma_kernel.configs, {"N": N, "K": 4096, "ROWS": rows})
            assert kept and all(c.kwargs["SPLIT_K"] <= _workspace_splits(rows, N) for c in kept)
            assert {id(c) for c in kept} <= {id(c) for c in _INT4_MMA_ROWS_CONFIGS} or kept[0].kwargs["SPLIT_K"] == 1
    # the wider int8 GEMV sweep list: one-row tiles of 16 to 64 weights per thread, within the
    # bounds the counters and the workspace are sized for, and it contains the autotuner's tiles
    from fastzoo.ops.weight_only_linear import INT8_GEMV_SWEEP
    key = lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"], c.num_warps)  # noqa: E731
    assert all(c.kwargs["BLOCK_M"] == 1 and 16 <= c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps) <= 64
               and c.kwargs["BLOCK_N"] >= _MIN_BLOCK_N and c.kwargs["SPLIT_K"] <= MAX_SPLIT_K for c in INT8_GEMV_SWEEP)
    assert {key(c) for c in _INT8_CONFIGS if c.kwargs["BLOCK_M"] == 1} <= {key(c) for c in INT8_GEMV_SWEEP}
    # the autotuner's int8 GEMV tiles load weights evict-first; the --int8-variants list has
    # each int8 tile with and without (the bf16 tiles keep the default policy: not measured)
    from fastzoo.ops.weight_only_linear import INT8_GEMV_VARIANTS
    int8_gemv = [c for c in _INT8_CONFIGS if c.kwargs["BLOCK_M"] == 1]
    assert all(c.kwargs["EVICT_W"] == "evict_first" for c in int8_gemv)
    assert all("EVICT_W" not in c.kwargs for c in _FLOAT_CONFIGS)
    assert sorted((key(c), c.kwargs["EVICT_W"]) for c in INT8_GEMV_VARIANTS) == sorted(
        (key(c), ev) for c in int8_gemv for ev in ("", "evict_first"))


# ----------------------------------------------------------------------------------
# CUDA: real Llama decode shapes, the public ops on the kernels
# ----------------------------------------------------------------------------------
LLAMA_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096),
                (6144, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


# The kernels on the GPU at every Llama shape with forced tiles (split-K included): each tile
# compiles once for all shapes, where the autotuner would compile its whole list per kernel
# variant (that made this file's GPU tests run for over 7 minutes on a cold H100). The
# autotuned public ops are covered by test_cuda_autotuned_ops and test_cuda_graph_capture_and_compile.
CUDA_TILES = {
    1: dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, SPLIT_K=2, num_warps=4),
    8: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3),
}
CUDA_INT4_TILES = {
    1: dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, num_warps=4),
    8: dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3),
}


def _cuda_weights(N, K, M, dev, g, dtype=torch.bfloat16):
    x = torch.randn(M, K, device=dev, generator=g).to(dtype)
    w = (torch.randn(N, K, device=dev, generator=g) * K**-0.5).to(dtype)
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev, generator=g)
    s = (torch.rand(N, device=dev, generator=g) * 1e-3).to(dtype)
    return x, w, w_q, s


@pytest.mark.cuda
@pytest.mark.parametrize("N,K", LLAMA_SHAPES)
@pytest.mark.parametrize("M", [1, 8])
def test_cuda_llama_shapes(N, K, M):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(N + K + M)
    dtype = torch.bfloat16
    x, w, w_q, s = _cuda_weights(N, K, M, dev, g)
    bias = torch.randn(N, device=dev, generator=g).to(dtype)
    tile = CUDA_TILES[M]
    ref = F.linear(x.float(), w.float(), bias.float())
    assert rel_err(decode_linear_triton(x, w, bias, config=tile), ref) < 1e-2
    ref8 = F.linear(x.float(), w_q.float()) * s.float()
    assert rel_err(int8_weight_only_linear_triton(x, w_q, s, config=tile), ref8) < 1e-2
    for group in (32, 128):
        p, s4, z4 = Int4WeightOnlyLinear.quantize(w, group)
        s4, z4 = s4.to(dtype), z4.to(dtype)
        ref4 = F.linear(x.float(), int4_dequantize(p, s4, z4, group, torch.float32))
        out4 = int4_weight_only_linear_triton(x, p, s4, z4, group, config=CUDA_INT4_TILES[M])
        assert rel_err(out4, ref4) < 1e-2
    # The large-M path (prefill) equals the reference.
    xl = torch.randn(40, K, device=dev, generator=g).to(dtype)
    assert torch.equal(int8_weight_only_linear(xl, w_q, s), int8_weight_only_linear_ref(xl, w_q, s))


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 8])
def test_cuda_autotuned_ops(M):
    """The public ops (the autotuner's choice, the fusions included) at w2's shape, whose K
    (11008) is no multiple of most blocks, against fp32."""
    dev = torch.device("cuda")
    N, K, dtype = 4096, 11008, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(M)
    x, w, w_q, s = _cuda_weights(N, K, M, dev, g)
    assert rel_err(decode_linear(x, w), F.linear(x.float(), w.float())) < 1e-2
    assert rel_err(int8_weight_only_linear(x, w_q, s), F.linear(x.float(), w_q.float()) * s.float()) < 1e-2
    p, s4, z4 = Int4WeightOnlyLinear.quantize(w, 128)
    s4, z4 = s4.to(dtype), z4.to(dtype)
    ref4 = F.linear(x.float(), int4_dequantize(p, s4, z4, 128, torch.float32))
    assert rel_err(int4_weight_only_linear(x, p, s4, z4, 128), ref4) < 1e-2
    gc = torch.Generator().manual_seed(M)
    xf, wf, _, bias, fopts, truth = _fused_inputs(M, N, K, dtype, "glu+norm+res", 0, gc)  # truth has the bias
    fopts = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in fopts.items()}
    bias = None if bias is None else bias.to(dev)
    assert rel_err(decode_linear(xf.to(dev), wf.to(dev), bias, **fopts), truth.to(dev)) < 1e-2


# Llama-2-7B's fused projections: (N, K, fusions)
LLAMA_FUSED = [(12288, 4096, "norm"), (4096, 4096, "res"), (22016, 4096, "norm"), (4096, 11008, "glu+res"),
               (32000, 4096, "norm"), (4096, 4096, "glu+norm+res")]


@pytest.mark.cuda
@pytest.mark.parametrize("N,K,opts", LLAMA_FUSED)
@pytest.mark.parametrize("M", [1, 8])
def test_cuda_fused_llama_shapes(N, K, opts, M):
    """The fused projections of a Llama-2-7B decode step (forced tiles, split-K) against fp32."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(N + K + M)
    for quant in (0, 1):
        x, w, scales, bias, fopts, truth = _fused_inputs(M, N, K, torch.bfloat16, opts, quant, g)
        x, w, scales, bias = _to(dev, x, w, scales, bias)
        fopts = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in fopts.items()}
        if quant:
            out = int8_weight_only_linear_triton(x, w, scales, bias, config=CUDA_TILES[M], **fopts)
        else:
            out = decode_linear_triton(x, w, bias, config=CUDA_TILES[M], **fopts)
        assert rel_err(out, truth.to(dev)) < 1e-2, (quant, rel_err(out, truth.to(dev)))


@pytest.mark.cuda
def test_cuda_every_quantized_gemv_config():
    """Every int8 and int4 GEMV tile the autotuner may pick (one row), and the int8 tiles
    with and without evict-first loads, forced, on a w2-like shape whose K (11008) is no
    multiple of most blocks (whole blocks and a masked tail), against an fp32 product of the
    same weights: a tile that only the GPU compiler gets wrong cannot hide behind the
    autotuner's choice on the GPU the tests run on."""
    from fastzoo.ops.weight_only_linear import (INT8_GEMV_VARIANTS, _int4_kernel, _int4_mma_kernel, _linear_kernel,
                                                _prune, _prune_linear)

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(11008)
    N, K, dtype = 4096, 11008, torch.bfloat16
    named = {"M_BUCKET": 1, "N": N, "K": K}
    x = torch.randn(1, K, device=dev, generator=g).to(dtype)
    w_q = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=dev, generator=g)
    s = (torch.rand(N, device=dev, generator=g) * 1e-3).to(dtype)
    ref8 = F.linear(x.float(), w_q.float()) * s.float()
    p, s4, z4 = Int4WeightOnlyLinear.quantize(torch.randn(N, K, device=dev, generator=g) * K**-0.5, 128)
    s4, z4 = s4.to(dtype), z4.to(dtype)
    ref4 = F.linear(x.float(), int4_dequantize(p, s4, z4, 128, torch.float32))
    for c in _prune_linear(_linear_kernel.configs, named, QUANT=1) + _prune(INT8_GEMV_VARIANTS, named):
        cfg = dict(c.kwargs, num_warps=c.num_warps)
        assert rel_err(int8_weight_only_linear_triton(x, w_q, s, config=cfg), ref8) < 1e-2, cfg
    for c in _prune(_int4_kernel.configs, named):
        cfg = dict(c.kwargs, num_warps=c.num_warps)
        assert rel_err(int4_weight_only_linear_triton(x, p, s4, z4, 128, config=cfg), ref4) < 1e-2, cfg
    for c in _int4_mma_kernel.configs:
        cfg = dict(c.kwargs, MMA=True, num_warps=c.num_warps)
        assert rel_err(int4_weight_only_linear_triton(x, p, s4, z4, 128, config=cfg), ref4) < 5e-3, cfg


# The one-row tensor-core int4 kernel (inline PTX: CUDA only), forced tiles: prefetch or
# not, split-K, one or several row blocks per warp.
MMA_TILES = [dict(MMA=True, BLOCK_N=64, SPLIT_K=1, PREFETCH=False, num_warps=4),
             dict(MMA=True, BLOCK_N=128, SPLIT_K=4, PREFETCH=True, num_warps=4),
             dict(MMA=True, BLOCK_N=32, SPLIT_K=3, PREFETCH=True, num_warps=2)]


@pytest.mark.cuda
@pytest.mark.parametrize("group", [128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_int4_tensor_core_gemv(group, dtype):
    """The tensor-core GEMV against an fp32 product of the same dequantized weights, at
    Llama shapes and at N not a multiple of 16, with a bias; bit-exact where every product
    is exact; and one nonzero weight lands in its own row only (a warp whose lanes were not
    one row block's would spread it)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(group)
    for N, K in [(4096, 4096), (4096, 11008), (1000, 4096)]:
        x = torch.randn(1, K, device=dev, generator=g).to(dtype)
        p, s4, z4 = Int4WeightOnlyLinear.quantize(torch.randn(N, K, device=dev, generator=g) * K**-0.5, group)
        s4, z4 = s4.to(dtype), z4.to(dtype)
        bias = torch.randn(N, device=dev, generator=g).to(dtype)
        ref = F.linear(x.float(), int4_dequantize(p, s4, z4, group, torch.float32), bias.float())
        assert rel_err(int4_weight_only_linear(x, p, s4, z4, group, bias), ref) < RTOL[dtype] / 2, (N, K)
        for tile in MMA_TILES:
            out = int4_weight_only_linear_triton(x, p, s4, z4, group, bias, config=tile)
            assert rel_err(out, ref) < RTOL[dtype] / 2, (N, K, tile)
    # exact: integer x / 4, every nibble value, scales 2^-e, integer zeros
    for xx, p, s4, z4, truth in exact_int4_cases(48, 512, group, dtype, (17, 5), g, dev):
        for tile in MMA_TILES:
            assert torch.equal(int4_weight_only_linear_triton(xx, p, s4, z4, group, config=tile), truth), tile


if triton_available():
    import triton
    import triton.language as tl

    from fastzoo.ops.weight_only_linear import _int4_rows_result

    @triton.jit
    def _rows_result_tagged(out_ptr, G: tl.constexpr, XB: tl.constexpr):
        """_int4_rows_result on accumulators tagged 1000 · (x row) + (weight row)."""
        e = tl.arange(0, 32 * G)
        n = (e // 32) * 16 + (e % 32) // 4  # weight row r of row block g
        m = 2 * (e % 4)  # x row 2c
        A0 = ((1000 * m + n).to(tl.float32), (1000 * (m + 1) + n).to(tl.float32),
              (1000 * m + n + 8).to(tl.float32), (1000 * (m + 1) + n + 8).to(tl.float32))
        A1 = (A0[0] + 8000.0, A0[1] + 8000.0, A0[2] + 8000.0, A0[3] + 8000.0)  # x rows 8..15
        res = _int4_rows_result(A0, A1, G, XB)
        rows = tl.arange(0, 8 * XB)
        cols = tl.arange(0, 16 * G)
        tl.store(out_ptr + rows[:, None] * (16 * G) + cols[None, :], res)


@pytest.mark.parametrize("G,XB", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_int4_several_rows_result_layout(kernel_device, G, XB):
    """The several-row tensor-core kernel's epilogue mapping (its mma is inline PTX, which
    the interpreter cannot run; the mapping is plain Triton): lane 4r + c of row block g holds
    (weight row r, x rows 2c, 2c + 1) and (weight row r + 8, x rows 2c, 2c + 1) of each block of
    8 rows of x; _int4_rows_result must place each at [x row, weight row 16g + 8h + r]."""
    out = torch.empty(8 * XB, 16 * G, device=kernel_device)
    _rows_result_tagged[(1,)](out, G=G, XB=XB)
    want = 1000.0 * torch.arange(8 * XB)[:, None] + torch.arange(16 * G)[None, :]
    assert torch.equal(out.cpu(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_int4_tensor_core_several_rows(dtype):
    """2 to 16 rows on the tensor-core kernel (B's 8 columns are rows of x): against an fp32
    product of the same dequantized weights at Llama shapes and at N not a multiple of 16,
    with a bias, x strided and with leading dims, through the public op (the autotuner's
    choice) and every forced tile; bit-exact where every product is exact, with rows of x
    that differ (a product that took another row of x, or a weight from another row, would
    show); and every several-row tile the autotuner may pick, at 8 and 16 rows."""
    from fastzoo.ops.weight_only_linear import _int4_mma_kernel, _prune_mma

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(29)
    for group, (N, K) in [(128, (4096, 4096)), (128, (1000, 11008)), (256, (12288, 4096))]:
        p, s4, z4 = Int4WeightOnlyLinear.quantize(torch.randn(N, K, device=dev, generator=g) * K**-0.5, group)
        s4, z4 = s4.to(dtype), z4.to(dtype)
        bias = torch.randn(N, device=dev, generator=g).to(dtype)
        w = int4_dequantize(p, s4, z4, group, torch.float32)
        for M in (2, 7, 8, 9, 16):
            x = torch.randn(M, K + 64, device=dev, generator=g).to(dtype)[:, 32:K + 32]  # strided, offset
            ref = F.linear(x.float(), w, bias.float())
            assert rel_err(int4_weight_only_linear(x, p, s4, z4, group, bias), ref) < RTOL[dtype] / 2, (N, K, M)
            for tile in MMA_TILES:
                out = int4_weight_only_linear_triton(x, p, s4, z4, group, bias, config=tile)
                assert rel_err(out, ref) < RTOL[dtype] / 2, (N, K, M, tile)
        x3 = torch.randn(2, 3, K, device=dev, generator=g).to(dtype)  # leading dims: 6 rows
        out3 = int4_weight_only_linear(x3, p, s4, z4, group)
        assert out3.shape == (2, 3, N) and rel_err(out3, F.linear(x3.float(), w)) < RTOL[dtype] / 2
        xo = torch.randn(5, K + 3, device=dev, generator=g).to(dtype)[:, 1:K + 1]  # no int64 view: copied
        assert rel_err(int4_weight_only_linear(xo, p, s4, z4, group), F.linear(xo.float(), w)) < RTOL[dtype] / 2
    for M in (3, 8, 13, 16):
        for xx, p, s4, z4, truth in exact_int4_cases(48, 512, 128, dtype, (17, 5), g, dev, rows=M):
            for tile in MMA_TILES:
                assert torch.equal(int4_weight_only_linear_triton(xx, p, s4, z4, 128, config=tile), truth), (M, tile)
    N, K = 4096, 11008
    p, s4, z4 = Int4WeightOnlyLinear.quantize(torch.randn(N, K, device=dev, generator=g) * K**-0.5, 128)
    s4, z4 = s4.to(dtype), z4.to(dtype)
    w = int4_dequantize(p, s4, z4, 128, torch.float32)
    for M, rows in ((8, 8), (16, 16)):
        x = torch.randn(M, K, device=dev, generator=g).to(dtype)
        ref = F.linear(x.float(), w)
        for c in _prune_mma(_int4_mma_kernel.configs, {"N": N, "K": K}, ROWS=rows):
            cfg = dict(c.kwargs, MMA=True, num_warps=c.num_warps)
            assert rel_err(int4_weight_only_linear_triton(x, p, s4, z4, 128, config=cfg), ref) < RTOL[dtype] / 2, cfg


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_int4_prefill_path(dtype, monkeypatch):
    """More than 16 rows (prefill): the one-pass dequantization kernel then cuBLAS, the same
    bits as the reference's dequantize + F.linear at Llama-2-7B's w2 shape; the kernel is
    what ran."""
    from fastzoo.ops import weight_only_linear as wol

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(7)
    N, K, group = 4096, 11008, 128
    p, s4, z4 = Int4WeightOnlyLinear.quantize(torch.randn(N, K, device=dev, generator=g) * K**-0.5, group)
    s4, z4 = s4.to(dtype), z4.to(dtype)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(int4_dequantize(p, s4, z4, group, out_dtype), int4_dequantize_ref(p, s4, z4, group, out_dtype))
    x = torch.randn(3, 40, K, device=dev, generator=g).to(dtype)
    bias = torch.randn(N, device=dev, generator=g).to(dtype)
    ref = F.linear(x, int4_dequantize_ref(p, s4, z4, group, dtype), bias)
    calls = []
    real = wol.int4_dequantize_triton
    monkeypatch.setattr(wol, "int4_dequantize_triton", lambda *a: calls.append(a[-1]) or real(*a))
    assert torch.equal(int4_weight_only_linear(x, p, s4, z4, group, bias), ref)
    assert torch.equal(int4_dequantize(p, s4, z4, group, torch.float16), int4_dequantize_ref(p, s4, z4, group,
                                                                                          torch.float16))
    assert calls == [dtype, torch.float16]  # the kernel ran for the prefill and for the public op
    torch.library.opcheck(wol._int4_dequantize_op, (p[:64], s4[:64], z4[:64], group, torch.bfloat16))


@pytest.mark.cuda
def test_cuda_graph_capture_and_compile():
    """reduce-overhead compile (CUDA graphs) over the three ops and the fusions, split-K or not."""
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    K, N = 4096, 4096
    w = (torch.randn(N, K, device=dev) * K**-0.5).to(dtype)
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
    s = (torch.rand(N, device=dev) * 1e-3).to(dtype)
    p, s4, z4 = Int4WeightOnlyLinear.quantize(w, 64)
    s4, z4 = s4.to(dtype), z4.to(dtype)

    nw = (torch.rand(K, device=dev) + 0.5).to(dtype)

    def f(x):
        y = (decode_linear(x, w) + int8_weight_only_linear(x, w_q, s)
             + int4_weight_only_linear(x, p, s4, z4, 64))
        y = decode_linear(y, w, norm_weight=nw, residual=x)  # the fusions too (split-K Σx² partials)
        return int8_weight_only_linear(torch.cat([x, y], -1), w_q, s, glu=True, residual=y)

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        x = torch.randn(1, 1, K, device=dev).to(dtype)
        out = compiled(x).clone()
        assert rel_err(out, f(x)) < 1e-2


# The end of both ahead-of-time compile scripts: ``jit``, ``sig`` (the pointer types),
# ``const`` and ``warps`` given; the other arguments int32, and what a launch on aligned
# tensors specialises (16-byte pointers, sizes and strides % 16); sets ``ptx`` for sm_90.
_AOT_PTX = r"""
for name in jit.arg_names:
    sig.setdefault(name, "constexpr" if name in const else "i32")
# what a launch on aligned tensors specialises: 16-byte pointers, sizes and strides % 16
aligned = [n for n in jit.arg_names if sig[n].startswith("*") or n in ("N", "K") or n.startswith("stride")]
src = triton.compiler.ASTSource(fn=jit, signature=sig,
                                constexprs={(jit.arg_names.index(k),): v for k, v in const.items()},
                                attrs={(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
"""

_AOT_COMPILE = r"""
import re
import sys
import triton
from triton.backends.compiler import GPUTarget
from fastzoo.ops import weight_only_linear as wol

kernel_name, split, opts = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
block_n, block_k, warps = map(int, sys.argv[4:7])
jit = getattr(wol, kernel_name).fn.fn  # autotune -> heuristics -> jit
dot = "dot" in opts  # the 16-row tl.dot path (M a runtime int); else the GEMV (M = 1, a constant)
common = {"M_BUCKET": 16 if dot else 1, "HAS_BIAS": True, "UPCAST_DOT": False, "BLOCK_M": 16 if dot else 1,
          "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "PDL": split > 1}
if not dot:
    common["M"] = 1
if kernel_name == "_linear_kernel":
    sig = dict(x_ptr="*bf16", w_ptr="*i8", s_ptr="*bf16", b_ptr="*bf16", nw_ptr="*bf16", r_ptr="*bf16", eps="fp32")
    const = dict(common, QUANT=1, EVEN_K=True, GLU="glu" in opts, NORM="norm" in opts, HAS_RES="res" in opts,
                 EVICT_W="evict_first" if "evict" in opts else "")
else:
    sig = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", b_ptr="*bf16")
    const = dict(common, GROUP=128, GPB=max(1, block_k // 128), EVEN_W=True, PREFETCH=split > 1)
sig.update(out_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
""" + _AOT_PTX + r"""
print("acq_rel" if ".acq_rel" in ptx else "no-atomics", "pdl" if "griddepcontrol.wait" in ptx else "no-pdl",
      "i2f" if re.search(r"cvt\.rn\.f32\.s(8|16)\b", ptx) else "no-i2f", "v2-loads" if "ld.global.v2.b32" in ptx else "no-v2-loads",
      "evict-first" if "L2::evict_first" in ptx else "no-evict",
      "trigger" if "griddepcontrol.launch_dependents" in ptx else "no-trigger")
"""


# (kernel, SPLIT_K, fusions, BLOCK_N, BLOCK_K, warps): old and new GEMV tiles of both kernels
# (int8: BLOCK_K 2048; int4: 64 rows, 2 words per lane), the fusions, the 16-row dot path
@pytest.mark.parametrize("kernel_name,split,opts,block_n,block_k,warps", [
    ("_linear_kernel", 1, "-", 8, 512, 4), ("_linear_kernel", 4, "-", 8, 512, 4), ("_linear_kernel", 1, "-", 8, 2048, 8),
    ("_int4_kernel", 4, "-", 8, 256, 4), ("_int4_kernel", 1, "-", 64, 512, 8),
    ("_linear_kernel", 1, "norm,res", 8, 512, 4), ("_linear_kernel", 4, "norm,glu,res", 8, 512, 4),
    ("_linear_kernel", 2, "glu", 8, 1024, 8), ("_linear_kernel", 1, "evict,norm", 8, 1024, 4),
    ("_linear_kernel", 4, "evict,glu,res", 16, 512, 4),
    ("_linear_kernel", 1, "dot,norm,glu,res", 32, 128, 4), ("_linear_kernel", 2, "dot,norm,res", 32, 128, 4)])
def test_kernels_compile_for_hopper(kernel_name, split, opts, block_n, block_k, warps):
    """Compile the kernels ahead of time for sm_90 with M = 1 (which Triton turns into a
    constant on the GPU, unlike the interpreter) and with programmatic dependent launch,
    which the interpreter never runs, with and without the RMSNorm / SwiGLU / residual
    fusions, and the 16-row dot path: catches code that only the GPU compiler rejects,
    without a GPU. In a fresh process without Triton's interpreter. Also checks the
    compiled int8 GEMV has no int-to-float conversion of its weights (the fusions convert
    K once: an s32 conversion), the int4 GEMV loads its words two per lane, and
    EVICT_W="evict_first" gives the weight loads an L2 evict-first policy."""
    r = run_aot_compile(_AOT_COMPILE, kernel_name, str(split), opts, str(block_n), str(block_k), str(warps))
    assert r.returncode == 0, r.stderr[-3000:]
    flags = r.stdout.split()[-6:]
    # the arrival counter with split-K; griddepcontrol.wait where PDL is on (here: with split-K)
    assert flags[:2] == (["acq_rel", "pdl"] if split > 1 else ["no-atomics", "no-pdl"])
    assert flags[2] == "no-i2f"
    if kernel_name == "_int4_kernel":
        assert flags[3] == "v2-loads"
    assert flags[4] == ("evict-first" if "evict" in opts else "no-evict")
    # the bf16 / int8 one-row GEMV lets the next kernel launch early (PDL); the int4 kernel and
    # the 16-row dot path do not
    trigger = split > 1 and kernel_name == "_linear_kernel" and "dot" not in opts
    assert flags[5] == ("trigger" if trigger else "no-trigger")


_AOT_MMA = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from fastzoo.ops import weight_only_linear as wol

block_n, warps, split, group, rows = map(int, sys.argv[1:6])
prefetch, f16 = sys.argv[6] == "1", sys.argv[7] == "1"
jit = wol._int4_mma_kernel.fn  # autotune -> jit
dt = "fp16" if f16 else "bf16"
sig = dict(x_ptr="*i64", w_ptr="*i64", s_ptr=f"*{dt}", z_ptr=f"*{dt}", b_ptr=f"*{dt}", out_ptr=f"*{dt}",
           ws_ptr="*fp32", cnt_ptr="*i32")
const = dict(GROUP=group, HAS_BIAS=True, F16=f16, PDL=True, ROWS=rows, BLOCK_N=block_n, SPLIT_K=split,
             PREFETCH=prefetch)
if rows == 1:
    const["M"] = 1  # as a launch with one row specialises it
""" + _AOT_PTX + r"""
print(ptx.count("mma.sync.aligned.m16n8k16"), "local" if ".local" in ptx else "no-local",
      "vector" if ".v2." in ptx.split("mma.sync")[0] or ".v4." in ptx.split("mma.sync")[0] else "scalar")
"""


# (BLOCK_N, warps, SPLIT_K, group, ROWS, prefetch, fp16)
@pytest.mark.parametrize("block_n,warps,split,group,rows,prefetch,f16", [
    (64, 4, 1, 128, 1, 0, 0), (128, 4, 4, 128, 1, 1, 0), (32, 2, 2, 256, 1, 1, 1), (128, 8, 16, 128, 1, 0, 1),
    (32, 1, 8, 128, 8, 0, 0), (64, 2, 16, 128, 8, 1, 1), (64, 2, 8, 256, 16, 0, 0), (128, 8, 16, 128, 16, 1, 0)])
def test_int4_tensor_core_kernel_compiles_for_hopper(block_n, warps, split, group, rows, prefetch, f16):
    """The tensor-core int4 kernel is inline PTX, which Triton's interpreter cannot run:
    compile it ahead of time for sm_90 (Triton's ptxas, no GPU) and check what its
    correctness rests on: two m16n8k16 mma per word pair and two per Σx (16 per segment,
    row block and block of 8 rows of x: twice that for 16 rows), scalar loads before the
    products (a vector load is what lets the compiler give a warp's lanes to several row
    blocks), no local-memory spills."""
    r = run_aot_compile(_AOT_MMA, str(block_n), str(warps), str(split), str(group), str(rows), str(prefetch),
                        str(f16))
    assert r.returncode == 0, r.stderr[-3000:]
    n_mma, local, loads = r.stdout.split()[-3:]
    assert local == "no-local" and loads == "scalar"
    per = 16 * max(1, rows // 8)
    assert int(n_mma) >= per and int(n_mma) % per == 0


def test_pdl_only_on_hopper_cuda():
    """Programmatic dependent launch is asked for only on CUDA tensors of a Hopper-or-newer
    GPU; CPU tensors (the interpreter) never get the flag or the launch option."""
    pytest.importorskip("triton")
    from fastzoo.ops._common import pdl_options as _pdl

    assert _pdl(torch.zeros(2)) == {"PDL": False}
    if torch.cuda.is_available():
        out = _pdl(torch.zeros(2, device="cuda"))
        assert out["PDL"] == out.get("launch_pdl", False)  # the kernel flag and the launch option agree
        if torch.cuda.get_device_capability() < (9, 0):
            assert not out["PDL"]
