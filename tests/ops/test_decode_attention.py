"""decode_attention: kernel vs reference (output and cache contents), the reference vs the
unfused math, errors, compile (one frame; inductor reinplaces the cache mutation), real shapes."""
import copy
import re
import zlib

import pytest
import torch

from fastzoo.ops.decode_attention import (
    apply_rope,
    decode_attention,
    decode_attention_ref,
    decode_attention_triton,
)
from helpers import rel_err, run_aot_compile

DTYPES = [torch.bfloat16, torch.float16]
RTOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-5}


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _inv_freq(D: int) -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def _rope_cos_sin(pos: torch.Tensor, D: int):
    """The RoPE tables written out here (independently of fastzoo's rope_cos_sin)."""
    freqs = pos.to(torch.float32)[..., None] * _inv_freq(D)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def _inputs(B, T, H, Hk, D, S, positions, dtype, *key, Bmax=None):
    """q, k, v as views of one fused (B, T, (H + 2Hk)·D) projection, RoPE frequencies, positions
    (B, T), and caches (Bmax, Hk, S, D) pre-filled with random values."""
    g = _gen(*key)
    Bmax = Bmax or B
    fused = torch.randn(B, T, (H + 2 * Hk) * D, generator=g).to(dtype)
    q, k, v = fused.split([H * D, Hk * D, Hk * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hk, D), v.view(B, T, Hk, D)
    input_pos = torch.tensor(positions, dtype=torch.int64).reshape(B, T)
    k_cache = torch.randn(Bmax, Hk, S, D, generator=g).to(dtype)
    v_cache = torch.randn(Bmax, Hk, S, D, generator=g).to(dtype)
    return q, k, v, _inv_freq(D), input_pos, k_cache, v_cache


def _to(dev, ts):
    return [t.to(dev) for t in ts]


def _assert_caches_equal(got: torch.Tensor, want: torch.Tensor, input_pos: torch.Tensor):
    """Caches after the kernel equal the reference's: exactly, except the rotated new keys at
    the written slots, which may differ by one ulp of the cache dtype (the kernel's fp32 RoPE
    may contract to an FMA, and Triton's interpreter rounds fp32 to bf16 by truncation)."""
    got = got.cpu()
    written = torch.zeros(got.shape[:1] + got.shape[2:3], dtype=torch.bool)
    written[torch.arange(input_pos.shape[0])[:, None], input_pos.cpu()] = True
    keep = ~written[:, None, :, None].expand_as(got)
    assert torch.equal(got[keep], want[keep])
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[got.dtype]
    torch.testing.assert_close(got[~keep].float(), want[~keep].float(), rtol=ulp, atol=0)


def _assert_attention_by_hand(y, qr, kc, vc, pos, H, Hk, D):
    """y (B, T, H·D) is, per sequence, token and head, softmax over slots 0..pos of the cached
    keys kc (B, Hk, S, D) times the rotated query qr, times the cached values vc."""
    B, T = pos.shape
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            for h in range(H):
                s = kc[b, h // (H // Hk), :p + 1] @ qr[b, t, h] / D**0.5
                o = torch.softmax(s, 0) @ vc[b, h // (H // Hk), :p + 1]
                torch.testing.assert_close(y[b, t, h * D:(h + 1) * D], o, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# The reference is the math the model did before (RoPE, scatter, masked SDPA)
# ----------------------------------------------------------------------------------
def test_reference_equals_unfused_math():
    B, T, H, Hk, D, S, kv_len = 2, 3, 4, 2, 16, 20, 13
    args = _inputs(B, T, H, Hk, D, S, [[2, 3, 4], [7, 8, 9]], torch.float32, "ref", Bmax=3)
    q, k, v, inv_freq, pos, kc, vc = args
    cos, sin = _rope_cos_sin(pos, D)
    kc0, vc0 = kc.clone(), vc.clone()
    y = decode_attention_ref(*args, kv_len)
    # by hand: per sequence, per head, per token
    kr, qr = apply_rope(k, cos, sin), apply_rope(q, cos, sin)
    for b in range(B):
        for t in range(T):
            kc0[b, :, pos[b, t]] = kr[b, t]
            vc0[b, :, pos[b, t]] = v[b, t]
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)  # row 2 (>= B) untouched
    _assert_attention_by_hand(y, qr, kc0, vc0, pos, H, Hk, D)


def test_apply_rope_rotates_pairs():
    """Rotate-half RoPE preserves each (i, i + D/2) pair's norm and is the identity at position 0."""
    g = _gen("rope")
    x = torch.randn(2, 3, 4, 8, generator=g)
    cos, sin = _rope_cos_sin(torch.tensor([[0, 1, 5], [2, 3, 7]]), 8)
    y = apply_rope(x, cos, sin)
    pair = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731
    torch.testing.assert_close(pair(y), pair(x))
    torch.testing.assert_close(y[0, 0], x[0, 0])


# ----------------------------------------------------------------------------------
# Kernel vs reference (Triton's interpreter on the CPU)
# ----------------------------------------------------------------------------------
CASES = {  # B, H, Hk, D, S, kv_len, positions, split_len
    "mha_b1": (1, 4, 4, 64, 150, 137, [136], None),
    "gqa_b3": (3, 8, 2, 80, 300, 261, [0, 140, 37], 128),
    "mha_b3_split": (3, 4, 4, 80, 400, 389, [388, 5, 200], 128),
    "gqa_b1_d64_pos_past_kv_len": (1, 8, 2, 64, 40, 17, [30], None),
    "gqa3_b2_split": (2, 6, 2, 64, 140, 131, [130, 60], 128),  # 3 query heads per kv head (padded to 4)
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_vs_reference(kernel_device, case, dtype):
    B, H, Hk, D, S, kv_len, positions, split_len = CASES[case]
    args = _inputs(B, 1, H, Hk, D, S, positions, dtype, case, str(dtype), Bmax=B + 1)
    ref_args = [t.clone() if i >= 6 else t for i, t in enumerate(args)]
    want = decode_attention_ref(*ref_args, kv_len)
    dev_args = _to(kernel_device, args)
    got = decode_attention_triton(*dev_args, kv_len, split_len=split_len)
    assert got.dtype == dtype and tuple(got.shape) == (B, 1, H * D)
    assert rel_err(got, want) < RTOL[dtype]
    # the caches: the new k (rotated) and v written at input_pos, nothing else changed
    _assert_caches_equal(dev_args[5], ref_args[5], args[4])
    _assert_caches_equal(dev_args[6], ref_args[6], args[4])


FINE = {  # B, H, Hk, D, S, kv_len, positions, split_len, dtype: slices of 16/32 slots, some empty
    "kv1_mha_pos_past": (2, 4, 4, 64, 8, 1, [0, 5], 16, torch.bfloat16),
    "kv7_gqa_d128": (3, 8, 2, 128, 20, 7, [6, 0, 3], 16, torch.float16),
    "kv129_gqa_d80_s16": (3, 8, 2, 80, 140, 129, [128, 3, 70], 16, torch.bfloat16),
    "kv197_mha_s32": (2, 4, 4, 64, 200, 197, [196, 40], 32, torch.float16),
    # 13 slices merged 4 at a time; pos 230 >= kv_len (every slice live, the new token
    # unseen); pos 16: the new token sits in slice 1's range but enters slice 0's softmax
    "kv197_gqa3_d128_s16": (2, 6, 2, 128, 250, 197, [230, 16], 16, torch.bfloat16),
    "kv129_mha_default": (1, 2, 2, 64, 129, 129, [100], None, torch.float16),  # CPU default: 9 slices of 16
}


@pytest.mark.parametrize("case", list(FINE))
def test_fine_slices_merge_in_launch(kernel_device, case):
    """Slices of 16/32 slots, merged by the last program of each (sequence, kv head) to
    arrive: equal to the reference, caches written, every arrival counter back at zero, and
    a second call (the counters reused, the workspace uninitialised) gives the same result."""
    from fastzoo.ops._common import ARRIVAL_COUNTERS

    B, H, Hk, D, S, kv_len, positions, split_len, dtype = FINE[case]
    args = _inputs(B, 1, H, Hk, D, S, positions, dtype, "fine", case)
    ref_args = [t.clone() if i >= 5 else t for i, t in enumerate(args)]
    want = decode_attention_ref(*ref_args, kv_len)
    dev_args = _to(kernel_device, args)
    got = decode_attention_triton(*dev_args, kv_len, split_len=split_len)
    assert rel_err(got, want) < RTOL[dtype]
    _assert_caches_equal(dev_args[5], ref_args[5], args[4])
    _assert_caches_equal(dev_args[6], ref_args[6], args[4])
    if split_len is not None and kv_len > split_len:  # several slices: the counters are used
        assert got.device in ARRIVAL_COUNTERS
    counters = ARRIVAL_COUNTERS.get(got.device)
    assert counters is None or int(counters.abs().sum()) == 0
    again = decode_attention_triton(*dev_args, kv_len, split_len=split_len)
    assert torch.equal(got, again)
    assert counters is None or int(counters.abs().sum()) == 0


def test_arrival_counters_persist_and_grow():
    """One zeroed int32 buffer per device, the same object for every call that fits in it; a
    larger request gets a new power-of-two buffer and the outgrown one stays alive (a
    captured CUDA graph may hold its address)."""
    from fastzoo.ops import _common

    cpu = torch.device("cpu")
    buf = _common.arrival_counters(cpu, 10)
    assert buf.dtype == torch.int32 and buf.numel() >= 1 << 16 and int(buf.abs().sum()) == 0
    assert _common.arrival_counters(cpu, 1000) is buf
    n = buf.numel() + 1
    big = _common.arrival_counters(cpu, n)
    assert big.numel() == 1 << (n - 1).bit_length() and int(big.abs().sum()) == 0
    assert _common.ARRIVAL_COUNTERS[cpu] is big and any(b is buf for b in _common._RETIRED_COUNTERS)


def test_split_len_default_and_validation():
    """Default slices: multiples of 16 slots (of 128 when long), at most about 4 programs per
    SM (CPU: 8 "SMs"); a forced split_len must be a positive multiple of 16."""
    from fastzoo.ops.decode_attention import _split_len

    cpu = torch.device("cpu")
    assert _split_len(128, 2, cpu) == 16  # 16 slices wanted, 8 of 16 slots
    assert _split_len(4096, 2, cpu) == 256
    assert _split_len(4096, 64, cpu) == 4096  # enough programs without slicing
    assert _split_len(1, 1, cpu) == 16
    assert _split_len(1000, 2, cpu) == 64  # 63 slots wanted: a multiple of 32
    assert _split_len(4096, 3, cpu) == 384  # 373 wanted: a multiple of 128 (every tile divides it)
    pytest.importorskip("triton")
    args = _inputs(1, 1, 4, 4, 64, 40, [3], torch.float16, "split_len")
    for bad in (0, 8, 24, -16):
        with pytest.raises(ValueError, match=rf"split_len a positive multiple of 16, got {bad}"):
            decode_attention_triton(*args, 20, split_len=bad)


def test_autotune_prune():
    pytest.importorskip("triton")
    from fastzoo.ops.decode_attention import _CONFIGS, _prune

    assert _CONFIGS[0].kwargs["BLOCK_N"] == 16
    # as the autotuner calls it: positional arguments by name, the constexpr keywords apart
    mha = _prune(_CONFIGS, {"Hk": 32, "kv_len": 4096}, G_PAD=1, D_PAD=128, D=128)
    assert {c.kwargs["BLOCK_N"] for c in mha} == {16, 32, 64, 128}
    assert all(128 * c.kwargs["BLOCK_N"] <= 2048 * c.num_warps for c in mha)  # 64 products per thread
    gqa = _prune(_CONFIGS, {"Hk": 8, "kv_len": 4096}, G_PAD=8, D_PAD=128, D=128)
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in gqa] == [(16, 8)]
    # tiles divide the slice: 48 slots keep only 16-slot tiles, 64 slots no 128-slot tile
    assert {c.kwargs["BLOCK_N"] for c in _prune(_CONFIGS, {}, G_PAD=1, D_PAD=128, SPLIT_LEN=48)} == {16}
    assert {c.kwargs["BLOCK_N"] for c in _prune(_CONFIGS, {}, G_PAD=1, D_PAD=128, SPLIT_LEN=64)} == {16, 32, 64}
    # int8 caches in long slices (tl.dot, 16 padded rows): 4 warps or more, 32 cache values a
    # thread per tile at most; in short slices (no DOT) the float rule
    dot = _prune(_CONFIGS, {"Hk": 32, "kv_len": 4096}, G_PAD=16, D_PAD=128, D=128, INT8=True, DOT=True)
    assert sorted((c.kwargs["BLOCK_N"], c.num_warps) for c in dot) == [(16, 4), (16, 8), (32, 4), (32, 8), (64, 8)]
    assert _prune(_CONFIGS, {"Hk": 32, "kv_len": 4096}, G_PAD=1, D_PAD=128, D=128, INT8=True, DOT=False) == mha


def test_kernel_ignores_slots_past_position(kernel_device):
    """Slots after each sequence's position (random garbage) do not change the output."""
    B, H, Hk, D, S, kv_len = 2, 4, 2, 64, 200, 190
    args = _inputs(B, 1, H, Hk, D, S, [3, 150], torch.float16, "garbage")
    other = [t.clone() for t in args]
    other[5][:, :, 151:] = 1e3
    other[6][:, :, 151:] = -1e3
    other[5][0, :, 4:] = 7.0
    other[6][0, :, 4:] = 7.0
    a = decode_attention_triton(*_to(kernel_device, args), kv_len, split_len=128)
    b = decode_attention_triton(*_to(kernel_device, other), kv_len, split_len=128)
    assert torch.equal(a, b)


def test_public_op_falls_back_on_cpu_any_t():
    """On the CPU (and for T > 1) the public op is the reference, fp32 included."""
    for T, dtype in ((1, torch.bfloat16), (3, torch.float32)):
        positions = [[4 + t for t in range(T)], [9 + t for t in range(T)]]
        args = _inputs(2, T, 4, 2, 16, 24, positions, dtype, "fallback", T)
        ref_args = [t.clone() for t in args]
        y = decode_attention(*args, 20)
        assert torch.equal(y, decode_attention_ref(*ref_args, 20))
        assert torch.equal(args[5], ref_args[5]) and torch.equal(args[6], ref_args[6])


def test_errors_name_expected_and_found():
    args = _inputs(2, 1, 4, 2, 16, 24, [3, 5], torch.float32, "errors")
    q, k, v, inv_freq, pos, kc, vc = args

    def call(**over):
        a = dict(q=q, k=k, v=v, inv_freq=inv_freq, input_pos=pos, k_cache=kc, v_cache=vc, kv_len=20)
        a.update(over)
        return decode_attention(**a)

    cases = [
        (dict(q=q[..., :8]), ValueError, r"k of shape \(B=2, T=1, Hk, D=8\), got \(2, 1, 2, 16\)"),
        (dict(k=k[:, :, :1].expand(2, 1, 3, 16)), ValueError,
         r"query heads \(4\) to be a multiple of the kv heads \(3\)"),
        (dict(v=v.half()), TypeError, r"v in q's dtype \(torch.float32\), got torch.float16"),
        (dict(k_cache=kc.bfloat16()), TypeError,
         r"k_cache in q's dtype \(torch.float32\) \(or int8 with k_scales / v_scales\), got torch.bfloat16"),
        (dict(k_scales=kc[..., :1].float()), ValueError, r"both k_scales and v_scales \(an int8 cache\) or neither"),
        (dict(k_scales=kc[..., :1].float(), v_scales=vc[..., :1].float()), TypeError,
         r"k_cache in torch.int8 with k_scales / v_scales given, got torch.float32"),
        (dict(k_cache=kc.to(torch.int8), v_cache=vc.to(torch.int8), k_scales=kc[..., :1].float(),
              v_scales=vc[:, :, :10, :1].float()), ValueError,
         r"v_scales of shape \(Bmax, Hk, S, 1\) = \(2, 2, 24, 1\), got \(2, 2, 10, 1\)"),
        (dict(k_cache=kc.to(torch.int8), v_cache=vc.to(torch.int8), k_scales=kc[..., :1].double(),
              v_scales=vc[..., :1].float()), TypeError, r"k_scales in float32, got torch.float64"),
        (dict(inv_freq=inv_freq.half()), TypeError, r"inv_freq in float32, got torch.float16"),
        (dict(inv_freq=inv_freq[:3]), ValueError, r"inv_freq of shape \(D/2,\) = \(8,\), got \(3,\)"),
        (dict(input_pos=pos.int()), TypeError, r"input_pos in torch.int64, got torch.int32"),
        (dict(input_pos=pos[:1]), ValueError, r"input_pos of shape \(B, T\) = \(2, 1\), got \(1, 1\)"),
        (dict(k_cache=kc[:1], v_cache=vc[:1]), ValueError,
         r"k_cache of shape \(Bmax >= 2, Hk=2, S, D=16\), got \(1, 2, 24, 16\)"),
        (dict(v_cache=vc[:, :, :10]), ValueError, r"v_cache of k_cache's shape \(2, 2, 24, 16\), got \(2, 2, 10, 16\)"),
        (dict(kv_len=25), ValueError, r"kv_len in 1..24 \(the cache length\), got 25"),
    ]
    for over, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call(**over)
    pytest.importorskip("triton")
    with pytest.raises(TypeError, match="bfloat16 or float16, got torch.float32"):
        decode_attention_triton(*args, 20)
    h = _inputs(2, 1, 4, 2, 48, 24, [3, 5], torch.float16, "errors48")
    with pytest.raises(ValueError, match=r"head dim in \(64, 80, 128\), got 48"):
        decode_attention_triton(*h, 20)
    t2 = _inputs(1, 2, 4, 2, 64, 24, [[3, 4]], torch.float16, "errorsT")
    with pytest.raises(ValueError, match="T == 1.*got T=2"):
        decode_attention_triton(*t2, 20)


# ----------------------------------------------------------------------------------
# int8 caches: a scale per (sequence, kv head, slot)
# ----------------------------------------------------------------------------------
INT8_CASES = {name: CASES[name] + (dtype,) for name, dtype in (
    ("mha_b1", torch.bfloat16), ("gqa_b3", torch.float16), ("mha_b3_split", torch.bfloat16),
    ("gqa_b1_d64_pos_past_kv_len", torch.float16), ("gqa3_b2_split", torch.bfloat16))}
INT8_CASES.update({name: FINE[name] for name in ("kv7_gqa_d128", "kv197_gqa3_d128_s16")})
# slices of 512 slots and more: the dot products on the tensor cores (tl.dot, 16 padded rows)
INT8_CASES["dot_mha_b2_d64_s512"] = (2, 4, 4, 64, 1100, 1030, [1029, 600], 512, torch.bfloat16)
INT8_CASES["dot_gqa_b1_d128_s512"] = (1, 8, 2, 128, 700, 650, [649], 512, torch.float16)


def _int8_inputs(case, B, H, Hk, D, S, positions, dtype, v_scale=1.0):
    """_inputs with the random caches quantized per slot: (q, k, v, inv_freq, input_pos,
    k_cache, v_cache, k_scales, v_scales); v and its cache times ``v_scale``."""
    from fastzoo.ops.quantize_rows import quantize_rows_int8_ref

    q, k, v, inv_freq, pos, kc, vc = _inputs(B, 1, H, Hk, D, S, positions, dtype, "int8", case, Bmax=B + 1)
    v, vc = (v * v_scale).to(dtype), (vc * v_scale).to(dtype)
    (kq, ks), (vq, vs) = quantize_rows_int8_ref(kc), quantize_rows_int8_ref(vc)
    return [q, k, v, inv_freq, pos, kq, vq, ks, vs]


@pytest.mark.parametrize("case", list(INT8_CASES))
def test_int8_cache_kernel_vs_reference(kernel_device, case):
    """int8 caches: the kernel against the reference (which quantizes the new k and v per slot
    and reads the slots dequantized): the output; the new v and its scale written exactly (it
    is quantized from the input as is); the new k within one quantization step (its RoPE may
    differ by an ulp, see _assert_caches_equal); every other slot untouched."""
    B, H, Hk, D, S, kv_len, positions, split_len, dtype = INT8_CASES[case]
    args = _int8_inputs(case, B, H, Hk, D, S, positions, dtype)
    ref = [t.clone() for t in args]
    want = decode_attention_ref(*ref[:7], kv_len, ref[7], ref[8])
    dev = _to(kernel_device, args)
    got = decode_attention_triton(*dev[:7], kv_len, split_len=split_len, k_scales=dev[7], v_scales=dev[8])
    assert got.dtype == dtype and tuple(got.shape) == (B, 1, H * D)
    assert rel_err(got, want) < RTOL[dtype]
    kq, vq, ks, vs = (t.cpu() for t in dev[5:9])
    assert torch.equal(vq, ref[6]) and torch.equal(vs, ref[8])
    written = torch.zeros(B + 1, S, dtype=torch.bool)
    written[torch.arange(B)[:, None], args[4]] = True
    keep = ~written[:, None, :].expand(B + 1, Hk, S)
    assert torch.equal(kq[keep], ref[5][keep]) and torch.equal(ks[..., 0][keep], ref[7][..., 0][keep])
    step = ref[7][..., 0][~keep][:, None]
    deq, want_k = kq[~keep].float() * ks[..., 0][~keep][:, None], ref[5][~keep].float() * step
    assert ((deq - want_k).abs() <= step + 2**-7 * want_k.abs() + 1e-6).all()  # a step, and an ulp of k


@pytest.mark.parametrize("case", ["gqa_b1_d64_pos_past_kv_len", "dot_gqa_b1_d128_s512"])
def test_int8_cache_small_values_keep_their_precision(kernel_device, case):
    """Values of 1e-3 (their scales ~1e-5): the softmax weights times the slots' scales would
    fall below fp16's normal range in the tensor-core products; both paths stay within fp16's
    tolerance of the reference."""
    B, H, Hk, D, S, kv_len, positions, split_len, _ = INT8_CASES[case]
    dtype = torch.float16
    args = _int8_inputs(case, B, H, Hk, D, S, positions, dtype, v_scale=1e-3)
    want = decode_attention_ref(*[t.clone() for t in args][:7], kv_len, args[7].clone(), args[8].clone())
    dev = _to(kernel_device, args)
    got = decode_attention_triton(*dev[:7], kv_len, split_len=split_len, k_scales=dev[7], v_scales=dev[8])
    assert rel_err(got, want) < RTOL[dtype]


def test_int8_cache_reference_is_quantize_then_float_attention():
    """The int8 reference by hand: the new k (rotated) and v quantized per slot into the cache
    with their scales, attention over the dequantized slots (several tokens, GQA)."""
    from fastzoo.ops.quantize_rows import quantize_rows_int8_ref

    B, T, H, Hk, D, S, kv_len = 2, 3, 4, 2, 16, 20, 13
    q, k, v, inv_freq, pos, kc, vc = _inputs(B, T, H, Hk, D, S, [[2, 3, 4], [7, 8, 9]], torch.float32, "int8ref")
    (kq, ks), (vq, vs) = quantize_rows_int8_ref(kc), quantize_rows_int8_ref(vc)
    kf, vf = kq.float() * ks, vq.float() * vs  # the caches as attention reads them
    cos, sin = _rope_cos_sin(pos, D)
    kr, qr = apply_rope(k, cos, sin), apply_rope(q, cos, sin)
    for b in range(B):
        for t in range(T):
            for src, dst in ((kr, kf), (v, vf)):
                xq, xs = quantize_rows_int8_ref(src[b, t])
                dst[b, :, pos[b, t]] = xq.float() * xs
    y = decode_attention_ref(q, k, v, inv_freq, pos, kq, vq, kv_len, ks, vs)
    assert torch.equal(kq.float() * ks, kf) and torch.equal(vq.float() * vs, vf)  # what was written
    _assert_attention_by_hand(y, qr, kf, vf, pos, H, Hk, D)


def test_custom_op_opcheck():
    from fastzoo.ops.decode_attention import _decode_attention_op

    for T, dtype in ((1, torch.float32), (3, torch.bfloat16)):
        positions = [[3 + t for t in range(T)], [5 + t for t in range(T)]]
        args = _inputs(2, T, 4, 2, 16, 24, positions, dtype, "opcheck", T)
        torch.library.opcheck(_decode_attention_op, (*args, 20))
    from fastzoo.ops.decode_attention import _decode_attention_int8_op
    from fastzoo.ops.quantize_rows import quantize_rows_int8_ref

    for T, dtype in ((1, torch.float32), (3, torch.bfloat16)):
        positions = [[3 + t for t in range(T)], [5 + t for t in range(T)]]
        q, k, v, inv_freq, pos, kc, vc = _inputs(2, T, 4, 2, 16, 24, positions, dtype, "opcheck8", T)
        (kq, ks), (vq, vs) = quantize_rows_int8_ref(kc), quantize_rows_int8_ref(vc)
        torch.library.opcheck(_decode_attention_int8_op, (q, k, v, inv_freq, pos, kq, vq, ks, vs, 20))


_AOT_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
mod = importlib.import_module("fastzoo.ops.decode_attention")  # (fastzoo.ops.decode_attention is the function)

# dtype, D, group, slices, slots per slice, config, int arguments equal to 1 (which Triton
# turns into constants on the GPU: input_pos's batch stride always, one kv head for MQA)
# programmatic dependent launch on (griddepcontrol.wait) in two of them
# (the last two: int8 caches with fp32 scales)
VARIANTS = [("bf16", 128, 1, 8, 512, mod._CONFIGS[-1], {"sp_b": 1, "PDL": False}),
            ("bf16", 128, 1, 8, 16, mod._CONFIGS[0], {"sp_b": 1, "Hk": 1, "PDL": True}),
            ("fp16", 128, 8, 13, 16, mod._CONFIGS[2], {"sp_b": 1, "PDL": False}),
            ("fp16", 80, 4, 1, 512, mod._CONFIGS[4], {"kv_len": 1, "PDL": True}),
            ("bf16", 128, 1, 8, 512, mod._CONFIGS[-1], {"sp_b": 1, "PDL": True, "INT8": True, "DOT": True}),
            ("fp16", 128, 4, 13, 16, mod._CONFIGS[2], {"sp_b": 1, "PDL": False, "INT8": True, "DOT": False})]
for dt, D, G, n_splits, split_len, cfg, ones in VARIANTS:
    jit = mod._decode_attn_kernel.fn
    ws = "*fp32" if n_splits > 1 else "*" + dt
    int8 = ones.setdefault("INT8", False)
    dot = ones.setdefault("DOT", False)
    cache, scales = ("*i8", "*fp32") if int8 else ("*" + dt, "*" + dt)
    types = {"q_ptr": "*" + dt, "k_ptr": "*" + dt, "v_ptr": "*" + dt, "kc_ptr": cache, "vc_ptr": cache,
             "ks_ptr": scales, "vs_ptr": scales,
             "out_ptr": "*" + dt, "invf_ptr": "*fp32", "pos_ptr": "*i64", "ws_m_ptr": ws,
             "ws_l_ptr": ws, "ws_acc_ptr": ws, "cnt_ptr": "*i32" if n_splits > 1 else "*" + dt,
             "scale_log2e": "fp32"}
    G_PAD, D_PAD = max(16 if dot else 1, mod.next_pow2(G)), mod.next_pow2(D)
    constexprs = dict(D=D, D_PAD=D_PAD, GROUP=G, G_PAD=G_PAD, SPLIT_LEN=split_len, N_SPLITS=n_splits,
                      MERGE=max(1, min(mod.next_pow2(n_splits), 2048 // (G_PAD * D_PAD))), EPS_=mod._INT8_EPS,
                      **ones, **cfg.kwargs)
    signature = {n: types.get(n, "constexpr" if n in constexprs else "i32") for n in jit.arg_names}
    src = ASTSource(fn=jit, signature=signature,
                    constexprs={(jit.arg_names.index(k),): v for k, v in constexprs.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps}).asm["ptx"]
    # RoPE angles reach thousands of radians: accurate cos/sin, never the .approx instructions
    assert "cos.approx" not in ptx and "sin.approx" not in ptx, "approximate cos/sin"
    # slices merge in the launch through an acq_rel arrival counter; one slice needs none
    assert ("atom.global.acq_rel" in ptx or ".acq_rel" in ptx) == (n_splits > 1), (dt, D, G, n_splits)
    assert ("griddepcontrol.wait" in ptx) == ones["PDL"], (dt, D, G, n_splits)
    # int8: the new k and v quantized with IEEE divisions (the reference's bits); float: no division
    assert ("div.rn.f32" in ptx) == int8, (dt, D, G, n_splits, int8)
    # int8 in long slices: the dot products on the tensor cores; never an int-to-float conversion
    assert ("mma.sync" in ptx) == dot and not re.search(r"cvt\.rn\.f(16|32)\.[su](8|16)\b", ptx), (dt, D, G, n_splits)
print("AOT-OK")
"""


def test_kernel_compiles_for_hopper_without_a_gpu():
    """Ahead-of-time sm_90 compile (Triton's bundled ptxas, no GPU) of the kernel: bf16 MHA
    (D 128) with 8 slices of 512 and of 16 slots (one kv head: Hk = 1 a constant), fp16 GQA
    (D 128, group 8) with 13 slices merged 2 at a time, and fp16 GQA (D 80, group 4) in one
    slice with kv_len = 1 a constant; two of them with programmatic dependent launch; and
    two with int8 caches (IEEE divisions in the quantization of the new k and v; tensor-core
    dot products in the long slices, no int-to-float conversion)."""
    proc = run_aot_compile(_AOT_SCRIPT)
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------
# torch.compile: one frame; inductor mutates the caches in place (no copy of them)
# ----------------------------------------------------------------------------------
def test_compile_fullgraph_one_frame():
    import torch._dynamo.testing

    args = _inputs(2, 1, 4, 2, 16, 24, [3, 5], torch.float32, "compile")
    eager_args = [t.clone() for t in args]

    def f(fused, inv_freq, pos, kc, vc):
        q, k, v = fused.split([64, 32, 32], dim=-1)
        return decode_attention(q.view(2, 1, 4, 16), k.view(2, 1, 2, 16), v.view(2, 1, 2, 16),
                                inv_freq, pos, kc, vc, 20) * 2

    def fused(a):
        return torch.cat([a[0].flatten(2), a[1].flatten(2), a[2].flatten(2)], dim=-1)

    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    got = compiled(fused(args), *args[3:])
    want = f(fused(eager_args), *eager_args[3:])
    assert torch.equal(got, want)
    assert torch.equal(args[5], eager_args[5]) and torch.equal(args[6], eager_args[6])
    assert counter.frame_count == 1
    assert any("decode_attention" in str(n.target) for g in counter.graphs for n in g.graph.nodes)


def test_compile_several_tokens_traces_the_reference():
    """T > 1 (prefill, verification): the reference is traced as plain PyTorch (inductor
    fuses it), one frame, no custom op; results and caches equal eager."""
    import torch._dynamo.testing

    args = _inputs(2, 3, 4, 2, 16, 24, [[3, 4, 5], [8, 9, 10]], torch.float32, "compileT")
    eager_args = [t.clone() for t in args]
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: decode_attention(*a, 20), backend=counter, fullgraph=True)
    assert torch.equal(compiled(*args), decode_attention(*eager_args, 20))
    assert torch.equal(args[5], eager_args[5]) and torch.equal(args[6], eager_args[6])
    assert counter.frame_count == 1
    assert not any("decode_attention" in str(n.target) for g in counter.graphs for n in g.graph.nodes)


def _tiny_model():
    from fastzoo.llama.config import LlamaConfig
    from fastzoo.llama.model import Transformer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                      max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def check_decode_step_reinplaced(model: torch.nn.Module, device: torch.device, kv_len: int):
    """Compile a cached decode step with inductor: outputs and caches equal eager, and the
    generated code passes the cache buffers themselves to the op (no clone / copy of a
    cache-sized buffer), q/k/v as views of the fused projection."""
    from torch._inductor.utils import run_and_get_code

    eager = copy.deepcopy(model)
    B, S = 2, model.max_seq_length
    tok = torch.randint(0, model.config.vocab_size, (B, 1), device=device)
    pos = torch.tensor([[kv_len // 3], [kv_len - 1]], device=device)

    def step(m, tok, pos):
        return m(tok, pos, kv_len=kv_len)

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="inductor")
        got, codes = run_and_get_code(compiled, model, tok, pos)
        want = step(eager, tok, pos)
    tol = 1e-5 if got.dtype == torch.float32 else 2e-2  # bf16: inductor's fusions round differently
    assert rel_err(got, want) < tol
    for a, b in zip(model.layers, eager.layers):
        for name in ("k_cache", "v_cache"):
            assert rel_err(getattr(a.attention.kv_cache, name), getattr(b.attention.kv_cache, name)) < tol
    code = "\n".join(codes)
    calls = [ln.strip() for ln in code.splitlines() if "torch.ops.fastzoo.decode_attention.default(" in ln]
    assert len(calls) == len(model.layers), calls
    for ln in calls:
        args = _call_args(ln.split("torch.ops.fastzoo.decode_attention.default", 1)[1])
        assert len(args) == 8, args
        # q, k, v: views of the fused wqkv output (no copies); the caches: the graph's own
        # inputs (the model's buffers), not a clone written back after the op.
        assert all(a.startswith("reinterpret_tensor(") for a in args[:3]), args[:3]
        assert all(re.fullmatch(r"arg\d+_1", a) for a in args[5:7]), args[5:7]
    cfg = model.config
    numel = model.max_batch_size * cfg.n_kv_heads * S * cfg.head_dim
    assert not re.search(r"empty_strided_\w+\(\((?:\d+, )*" + str(numel) + r"\b", code), "a cache-sized buffer"
    # no line of the generated code copies into or out of a cache (other small copies, e.g.
    # of positions, are inductor's business: torch 2.11 emits one on the GPU)
    caches = {a for ln in calls for a in _call_args(ln.split("torch.ops.fastzoo.decode_attention.default", 1)[1])[5:7]}
    copies = [ln for ln in code.splitlines() if re.search(r"clone|\.copy_\(|aten\.copy", ln)]
    assert not [ln for ln in copies if any(re.search(rf"\b{c}\b", ln) for c in caches)], copies


def _call_args(text: str) -> list[str]:
    """The top-level, comma-separated arguments of ``(a, f(b, c), d)``."""
    args, depth, cur = [], 0, ""
    for ch in text[text.index("(") + 1:]:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            if depth == 0:
                break
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return args + ([cur.strip()] if cur.strip() else [])


def test_compiled_decode_step_reinplaces_caches():
    model = _tiny_model()
    model.setup_caches(2, 40, torch.float32)
    check_decode_step_reinplaced(model, torch.device("cpu"), kv_len=24)


def test_reinplace_check_detects_a_clone(monkeypatch):
    """Negative control: with inductor's reinplacing pass switched off the caches are cloned
    around the op, and the inspection above says so."""
    import torch._inductor.fx_passes.reinplace as reinplace

    if not hasattr(reinplace, "reinplace_inplaceable_ops_core"):
        pytest.skip("this torch has no reinplace_inplaceable_ops_core to switch off")
    monkeypatch.setattr(reinplace, "reinplace_inplaceable_ops_core", lambda graph: None)
    model = _tiny_model()
    model.setup_caches(2, 40, torch.float32)
    with torch._inductor.config.patch(fx_graph_cache=False), pytest.raises(AssertionError):
        check_decode_step_reinplaced(model, torch.device("cpu"), kv_len=24)


# ----------------------------------------------------------------------------------
# CUDA: Llama-2-7B shapes; the compiled decode step on the GPU
# ----------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("kv_len", [128, 256, 2048])
@pytest.mark.parametrize("B", [1, 3])
def test_cuda_llama2_7b_shapes(kv_len, B):
    dev = torch.device("cuda")
    H, D, S = 32, 128, 4096
    positions = [kv_len - 1, kv_len // 2, 7][:B]
    args = _to(dev, _inputs(B, 1, H, H, D, S, positions, torch.bfloat16, "7b", kv_len, B))
    ref_args = [t.clone() if i >= 6 else t for i, t in enumerate(args)]
    want = decode_attention_ref(*ref_args, kv_len)
    got = decode_attention(*args, kv_len)
    assert rel_err(got, want) < 1e-2
    _assert_caches_equal(args[5], ref_args[5].cpu(), args[4])
    _assert_caches_equal(args[6], ref_args[6].cpu(), args[4])


@pytest.mark.cuda
@pytest.mark.parametrize("split_len", [16, 48, None])
def test_cuda_slices_merge_deterministically(split_len):
    """Many slices merged in the launch by the last to arrive (a race there would show as
    a wrong or varying result): 30 calls are bit-identical, match the reference, and leave
    every arrival counter at zero; CUDA-graph replays too."""
    from fastzoo.ops._common import ARRIVAL_COUNTERS

    dev = torch.device("cuda")
    args = _to(dev, _inputs(3, 1, 32, 8, 128, 1100, [1000, 17, 500], torch.bfloat16, "race", split_len))
    ref_args = [t.clone() if i >= 5 else t for i, t in enumerate(args)]
    want = decode_attention_ref(*ref_args, 1024)
    first = decode_attention_triton(*args, 1024, split_len=split_len)
    assert rel_err(first, want) < 1e-2
    outs = [decode_attention_triton(*args, 1024, split_len=split_len) for _ in range(30)]
    assert all(torch.equal(first, o) for o in outs)
    assert int(ARRIVAL_COUNTERS[first.device].abs().sum()) == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = decode_attention_triton(*args, 1024, split_len=split_len)
    for _ in range(10):
        graph.replay()
        assert torch.equal(static, first)
    assert int(ARRIVAL_COUNTERS[first.device].abs().sum()) == 0


@pytest.mark.cuda
def test_cuda_gqa_head_dims():
    dev = torch.device("cuda")
    for H, Hk, D in ((32, 8, 128), (16, 16, 64), (12, 4, 80)):
        args = _to(dev, _inputs(2, 1, H, Hk, D, 1024, [1000, 3], torch.float16, "gqa", H, D))
        ref_args = [t.clone() if i >= 6 else t for i, t in enumerate(args)]
        want = decode_attention_ref(*ref_args, 1001)
        assert rel_err(decode_attention(*args, 1001), want) < 3e-3
        _assert_caches_equal(args[5], ref_args[5].cpu(), args[4])
        _assert_caches_equal(args[6], ref_args[6].cpu(), args[4])


@pytest.mark.cuda
def test_cuda_compiled_decode_step_reinplaces_caches():
    """The same inspection on the GPU (this torch's inductor, the Triton kernel in the step)."""
    dev = torch.device("cuda")
    from fastzoo.llama.config import LlamaConfig
    from fastzoo.llama.model import Transformer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                      max_position_embeddings=512, bos_token_id=None, eos_token_id=None)
    model = Transformer(cfg).to(dev, torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.setup_caches(2, 384)
    check_decode_step_reinplaced(model, dev, kv_len=300)
