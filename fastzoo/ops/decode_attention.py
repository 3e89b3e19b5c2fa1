"""Decode attention with RoPE and the KV-cache write fused: one op per layer and step.

A Llama layer's attention at decode time is, per sequence ``b`` and its T new tokens:

    q, k = rope(q), rope(k)                          rotate-half RoPE in fp32, rounded to x's dtype
    k_cache[b, :, input_pos[b]] = k;  v_cache[b, :, input_pos[b]] = v
    y = softmax(q · k_cache[b, h // G, :kv_len]ᵀ / sqrt(D) + mask) · v_cache[b, h // G, :kv_len]
    mask: a query at position p sees cache slots j <= p;  G = H / Hk (grouped-query attention)

with q (B, T, H, D), k, v (B, T, Hk, D) (views of the fused ``wqkv`` output are fine: only
the last dimension needs unit stride), inv_freq (D/2,) fp32 (the RoPE frequencies: angle =
position · inv_freq, see :func:`rope_cos_sin`), input_pos (B, T) int64
(the cache slots written, < S), k_cache/v_cache (Bmax, Hk, S, D) in x's dtype — mutated
for batch rows ``0..B-1`` — and a static ``kv_len`` (attend over slots ``0..kv_len-1``).
The result is y (B, T, H·D) in x's dtype, the input of the output projection ``wo``.

- ``apply_rope`` / ``decode_attention_ref``: the definition in plain PyTorch — exactly what
  ``fastzoo.llama.model.Attention`` computes (scatter into the cache, masked SDPA); the
  model's cached path calls :func:`decode_attention`, so there is one implementation.
- ``decode_attention_triton``: one decode token (T == 1). One program per (sequence,
  kv head, slice of the cache), covering the G query heads of that kv head so each cache
  tile is read once (cos/sin of its position computed in registers from inv_freq: no
  per-layer cos/sin tensors) — flash-decoding: each program loops only over the cache slots
  ``0..pos-1`` of its slice (later slots are masked anyway; a slice past ``pos`` does no
  work), keeps a running max, sum and fp32 accumulator per query head. Slices are multiples
  of 16 slots, about 4 programs per SM (B·Hk = 32 alone would leave 100 of 132 SMs idle,
  even at 128 slots). The slices merge in the same launch: each stores its partial to a
  workspace and bumps a per-(sequence, kv head) arrival counter; the last to arrive merges
  the partials in slice order (deterministic), writes y and resets the counter. RoPE of q
  and of the new k is applied in registers; the new k and v are written to the caches and
  enter the softmax from registers (no program reads slot ``pos`` from memory, so there is
  no race with the write). Head dims 64, 80, 128 (80 is masked inside a 128 block in registers only).
  Autotuned over the cache tile and warps, keyed on D, the kv_len bucket, G and the slice.
  On Hopper+ launched with programmatic dependent launch, as the decode linears are (the
  grid starts while the q/k/v projection drains and waits for its writes first).
- ``decode_attention``: the public op ``torch.ops.fastzoo.decode_attention`` (mutates
  ``k_cache`` and ``v_cache``): the kernel for one bf16/fp16 CUDA token, the reference
  otherwise (CPU, fp32, other head dims). Several tokens per sequence (prefill,
  speculative verification) call the reference as plain PyTorch, which inductor fuses.

**int8 caches** (``k_scales`` / ``v_scales`` given: ``torch.ops.fastzoo.decode_attention_int8``):
k_cache/v_cache int8 with one fp32 scale per (sequence, kv head, slot), scales
(Bmax, Hk, S, 1): the new k (after RoPE, in x's dtype) and v are quantized per slot as
``fastzoo.ops.quantize_rows_int8_ref`` (symmetric, max|x| / 127, ties to even), written with
their scales, and attention reads every slot, the new one included, dequantized to x's
dtype (q · scale, rounded): the values the reference's SDPA sees. The kernel reads the int8
tiles (about half the bytes of a bf16 cache) as exact integers, made by bit operations (no
int-to-float conversion): a slot's scale multiplies its score (q · k = scale · Σ q·k_int8) and
its softmax weight for v, so the dequantized values are never formed. Slices of at least
``_INT8_DOT_MIN_SLICE`` slots take the dot products on the tensor cores (fp16 operands: q and
the weights, times their slots' scales over the tile's largest, rounded to fp16; fp32
accumulation); shorter ones in fp32 on the CUDA cores, where
the 16 padded rows of a tensor-core product cost more than they save. The two agree to the
16-bit roundings.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (FLOAT_DTYPES, LOG2E, arrival_counters, cuda_kernel_applies, gdc_wait, int8_to_f32, launch,
                      next_pow2, pdl_options, short_bench, triton_available)
from .quantize_rows import EPS as _INT8_EPS
from .quantize_rows import quantize_rows_int8_ref

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_HEAD_DIMS = (64, 80, 128)
# A cache slice is a multiple of this many slots (the smallest BLOCK_N; the autotuner keeps
# tiles that divide the slice): short caches are split finely too (at a decode step's first
# hundred positions, one slice per (sequence, kv head) leaves most SMs idle).
_SPLIT_GRANULE = 16
_PROGRAMS_PER_SM = 4  # the default slicing aims at about this many programs per SM
# int8 caches: slices of at least this many slots take their dot products on the tensor cores
# (H100, one Llama-2-7B layer: B 8 at 4096 slots, slices of 1408, 220 -> 136 us; B 1 at 4096,
# slices of 256, 32.0 -> 35.5 us and at 256, slices of 16, 8.1 -> 15.1 us: the 16 padded rows
# and their merge cost more than short slices save)
_INT8_DOT_MIN_SLICE = 512


# ----------------------------------------------------------------------------------
# RoPE and the reference
# ----------------------------------------------------------------------------------
def rope_cos_sin(input_pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[B, T, 1, 2·len(inv_freq)]`` (fp32) of the angles ``input_pos · inv_freq``
    for positions ``input_pos [B, T]`` (rotate-half layout: both halves the same angles)."""
    freqs = input_pos.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``x [B, T, H, hd]`` (cos, sin broadcastable), in fp32, rounded to x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rot * sin).type_as(x)


def _check_args(name, q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len, k_scales=None,
                v_scales=None) -> None:
    for label, t in (("q", q), ("k", k), ("v", v), ("inv_freq", inv_freq), ("input_pos", input_pos),
                     ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} expects {label} to be a tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"{name} expects q of shape (B, T, H, D), got {tuple(q.shape)}")
    B, T, H, D = q.shape
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} expects q in bfloat16, float16 or float32, got {q.dtype}")
    if k.dim() != 4 or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"{name} expects k of shape (B={B}, T={T}, Hk, D={D}), got {tuple(k.shape)}")
    Hk = k.shape[2]
    if Hk == 0 or H % Hk:
        raise ValueError(f"{name} expects the query heads ({H}) to be a multiple of the kv heads ({Hk})")
    if D % 2:
        raise ValueError(f"{name} expects an even head dim (rotate-half RoPE), got D={D}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{name} expects v of k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for label, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} expects {label} in q's dtype ({q.dtype}), got {t.dtype}")
    int8 = k_scales is not None or v_scales is not None
    if int8 and (k_scales is None or v_scales is None):
        raise ValueError(f"{name} expects both k_scales and v_scales (an int8 cache) or neither")
    for label, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if int8 and t.dtype != torch.int8:
            raise TypeError(f"{name} expects {label} in torch.int8 with k_scales / v_scales given, got {t.dtype}")
        if not int8 and t.dtype != q.dtype:
            raise TypeError(f"{name} expects {label} in q's dtype ({q.dtype}) (or int8 with k_scales / v_scales), "
                            f"got {t.dtype}")
    if tuple(inv_freq.shape) != (D // 2,):
        raise ValueError(f"{name} expects inv_freq of shape (D/2,) = ({D // 2},), got {tuple(inv_freq.shape)}")
    if inv_freq.dtype != torch.float32:
        raise TypeError(f"{name} expects inv_freq in float32, got {inv_freq.dtype}")
    if tuple(input_pos.shape) != (B, T):
        raise ValueError(f"{name} expects input_pos of shape (B, T) = ({B}, {T}), got {tuple(input_pos.shape)}")
    if input_pos.dtype != torch.int64:
        raise TypeError(f"{name} expects input_pos in torch.int64, got {input_pos.dtype}")
    if k_cache.dim() != 4 or k_cache.shape[0] < B or k_cache.shape[1] != Hk or k_cache.shape[3] != D:
        raise ValueError(f"{name} expects k_cache of shape (Bmax >= {B}, Hk={Hk}, S, D={D}), "
                         f"got {tuple(k_cache.shape)}")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"{name} expects v_cache of k_cache's shape {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    S = k_cache.shape[2]
    if not isinstance(kv_len, (int, torch.SymInt)) or not 0 < kv_len <= S:
        raise ValueError(f"{name} expects an int kv_len in 1..{S} (the cache length), got {kv_len!r}")
    if int8:
        want = (*k_cache.shape[:3], 1)
        for label, t in (("k_scales", k_scales), ("v_scales", v_scales)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} expects {label} to be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != want:
                raise ValueError(f"{name} expects {label} of shape (Bmax, Hk, S, 1) = {want}, got {tuple(t.shape)}")
            if t.dtype != torch.float32:
                raise TypeError(f"{name} expects {label} in float32, got {t.dtype}")
    extra = (k_scales, v_scales) if int8 else ()
    devices = {t.device for t in (q, k, v, inv_freq, input_pos, k_cache, v_cache, *extra)}
    if len(devices) > 1:
        raise ValueError(f"{name} expects all tensors on one device, got {sorted(map(str, devices))}")


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                         input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_len: int, k_scales: Optional[torch.Tensor] = None,
                         v_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference (mutates the caches): RoPE, scatter k/v into the caches at ``input_pos``,
    SDPA over the first ``kv_len`` slots with the per-position mask; returns (B, T, H·D).
    With ``k_scales`` / ``v_scales`` (int8 caches): k and v are quantized per slot
    (``quantize_rows_int8_ref``) and scattered with their scales, and SDPA reads the slots
    dequantized to q's dtype."""
    B, T, H, D = q.shape
    Hk = k.shape[2]
    cos, sin = rope_cos_sin(input_pos, inv_freq)
    q = apply_rope(q, cos, sin).transpose(1, 2)
    k = apply_rope(k, cos, sin).transpose(1, 2)
    v = v.transpose(1, 2)
    if B != k_cache.shape[0]:
        k_cache, v_cache = k_cache[:B], v_cache[:B]
    idx = input_pos[:, None, :, None].expand(B, Hk, T, D)
    if k_scales is None:
        k_cache.scatter_(2, idx, k)
        v_cache.scatter_(2, idx, v)
        k, v = k_cache, v_cache
        if kv_len != k.shape[2]:
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    else:
        deq = []
        for cache, scales, x in ((k_cache, k_scales, k), (v_cache, v_scales, v)):
            if B != scales.shape[0]:
                scales = scales[:B]
            xq, xs = quantize_rows_int8_ref(x)
            cache.scatter_(2, idx, xq)
            scales.scatter_(2, idx[..., :1], xs)
            deq.append((cache[:, :, :kv_len].float() * scales[:, :, :kv_len]).to(q.dtype))
        k, v = deq
    if Hk != H:  # query head h uses kv head h // rep (no host sync)
        rep = H // Hk
        S = k.shape[2]
        k = k[:, :, None].expand(B, Hk, rep, S, D).reshape(B, H, S, D)
        v = v[:, :, None].expand(B, Hk, rep, S, D).reshape(B, H, S, D)
    slots = torch.arange(kv_len, device=q.device)
    mask = (slots[None, None, :] <= input_pos[:, :, None])[:, None]  # [B, 1, T, kv_len]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2).reshape(B, T, H * D)


# ----------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------
def _kv_bucket(kv_len: int) -> int:
    """Autotuning key for kv_len: the next power of two (at least 64)."""
    return max(64, next_pow2(kv_len))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_len(kv_len: int, programs: int, device: torch.device) -> int:
    """Slots per cache slice: at most enough slices for about ``_PROGRAMS_PER_SM`` programs
    per SM (``programs`` = B·Hk per slice), each a multiple of ``_SPLIT_GRANULE`` slots — of
    up to 128 for long slices, so that wide tiles divide them."""
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = 8
    want = max(1, -(-_PROGRAMS_PER_SM * sms // max(1, programs)))
    per = -(-kv_len // want)
    granule = min(128, max(_SPLIT_GRANULE, 1 << (per.bit_length() - 1)))  # a power of two <= per
    return -(-per // granule) * granule


if triton_available():
    import triton
    import triton.language as tl

    # First: small, what Triton's interpreter (the CPU tests) runs.
    _CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=2)] + [
        triton.Config({"BLOCK_N": bn}, num_warps=w) for bn in (16, 32, 64, 128) for w in (2, 4, 8)
    ][1:]

    def _prune(configs, named_args, **kwargs):
        """Keep the (query heads × cache tile × head dim) fp32 products of one tile within 64
        per thread (wide tiles for one query head per kv head, narrow ones for groups), and
        tiles that divide the slice (no masked-off half tiles).
        (The autotuner passes the positional arguments as ``named_args``, keywords as ``kwargs``.)"""
        args = {**named_args, **kwargs}
        split = args.get("SPLIT_LEN")
        if args.get("DOT"):
            # the products are tl.dot's with 16-row (G_PAD) fp32 accumulators: at least 4 warps and
            # at most 32 cache values a thread per tile (sm_90 ptxas: 128-255 registers, the
            # others spill)
            def fits(c):
                return c.num_warps >= 4 and args["D_PAD"] * c.kwargs["BLOCK_N"] <= 32 * 32 * c.num_warps
        else:
            def fits(c):
                return args["G_PAD"] * args["D_PAD"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps
        kept = [c for c in configs if fits(c) and (split is None or split % c.kwargs["BLOCK_N"] == 0)]
        return kept or configs[:1]

    from .quantize_rows import _round_clamp_int8_tl

    @triton.jit
    def _int8_to_f16(w):
        """An int8 tile in fp16, exact, without an int-to-float conversion: the byte with its sign
        bit flipped (b + 128, 0..255) in the mantissa of 1024, bits(1024 + b + 128) = 0x6400 | (b + 128),
        minus 1152 (fp16 holds the integers up to 2048 exactly)."""
        u = w.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x6480
        return u.to(tl.float16, bitcast=True) - 1152.0

    @triton.jit
    def _quantize_kv(x, dmask, EPS_: tl.constexpr):
        """One slot's (D_PAD,) fp32 values → (int8 values, fp32 scale): quantize_rows_int8_ref
        (IEEE divisions: the reference's bits)."""
        amax = tl.max(tl.where(dmask, tl.abs(x), 0.0), axis=0)
        scale = tl.math.div_rn(tl.maximum(amax, EPS_), 127.0)
        return _round_clamp_int8_tl(tl.math.div_rn(x, scale + tl.zeros_like(x))), scale

    # The kernel may run several times while autotuning: its cache writes are idempotent
    # (computed from k and v, never from the cache), every launch leaves its arrival counters
    # at zero and writes the workspace before reading it, so nothing needs restoring.
    @triton.autotune(configs=_CONFIGS, key=["D", "KV_BUCKET", "GROUP", "SPLIT_LEN", "INT8"],
                     prune_configs_by={"early_config_prune": _prune}, do_bench=short_bench)
    @triton.jit
    def _decode_attn_kernel(
        q_ptr, k_ptr, v_ptr, invf_ptr, pos_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, ws_m_ptr, ws_l_ptr,
        ws_acc_ptr, cnt_ptr,
        Hk, kv_len, S, KV_BUCKET, scale_log2e,
        sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sp_b,
        skc_b, skc_h, skc_s, svc_b, svc_h, svc_s, sks_b, sks_h, sks_s, svs_b, svs_h, svs_s,
        D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
        SPLIT_LEN: tl.constexpr, N_SPLITS: tl.constexpr, MERGE: tl.constexpr, PDL: tl.constexpr,
        INT8: tl.constexpr, DOT: tl.constexpr, EPS_: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One (sequence b, kv head hk, cache slice): the GROUP query heads of hk read each
        cache tile once. Scores are (G_PAD, BLOCK_N) sums of q · k over D in fp32.

        With several slices each live slice stores its (max, sum, acc) per query head in the
        workspace (rows (b, hk, g) of G_PAD heads, padded heads included: they are finite),
        then arrives at the (b, hk) counter; the last of the N_SPLITS programs to arrive
        merges the live slices in slice order (deterministic), stores the output and resets
        the counter to zero. PDL: launched while the previous kernel (the q/k/v projection)
        finishes; every memory access waits for its writes.

        INT8: int8 caches with fp32 scales per slot (ks_ptr / vs_ptr): the new k and v are
        quantized in registers (_quantize_kv) and written with their scales; a cache tile is
        read int8-exact, its slots' scales applied to the scores and to the softmax weights (the
        module docstring): in fp32 (int8_to_f32), or with DOT (long slices) as fp16
        (_int8_to_f16) in tl.dot with q and with the weights in fp16 (G_PAD >= 16 rows, tl.dot's
        least; fp32 accumulation; the weights times their slots' scales over the tile's largest
        scale, so that they stay within fp16's normal range)."""
        if PDL:
            gdc_wait()
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // Hk
        hk = pid % Hk
        HALF: tl.constexpr = D // 2
        offs_d = tl.arange(0, D_PAD)
        offs_g = tl.arange(0, G_PAD)
        dmask = offs_d < D
        gmask = offs_g < GROUP
        qmask = gmask[:, None] & dmask[None, :]
        b64 = b.to(tl.int64)
        heads = hk * GROUP + offs_g  # this program's query heads
        partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)  # rotate-half partner
        # loads that do not depend on the position go out with it (one round trip)
        pos = tl.load(pos_ptr + b64 * sp_b).to(tl.int32)  # slots < 2^31; pointer math below in int64
        invf = tl.load(invf_ptr + offs_d % HALF, mask=dmask, other=0.0)
        q_rows = q_ptr + b64 * sq_b + heads[:, None] * sq_h
        qx = tl.load(q_rows + offs_d[None, :], mask=qmask, other=0.0).to(tl.float32)
        qp = tl.load(q_rows + partner[None, :], mask=qmask, other=0.0).to(tl.float32)
        k_row = k_ptr + b64 * sk_b + hk * sk_h
        kx = tl.load(k_row + offs_d, mask=dmask, other=0.0).to(tl.float32)
        kp = tl.load(k_row + partner, mask=dmask, other=0.0).to(tl.float32)
        v_new = tl.load(v_ptr + b64 * sv_b + hk * sv_h + offs_d, mask=dmask, other=0.0)
        rows = b64 * Hk * GROUP + heads  # (sequence, query head) rows of the output
        ws_rows = (pid.to(tl.int64) * G_PAD + offs_g) * N_SPLITS  # workspace rows of slice 0
        # Slots 0..pos-1 come from the cache, slot pos from registers (when it is among the
        # first kv_len slots); the first slice's program writes the new k, v. A slice is live
        # when it holds a slot < pos (slice 0 always: the new token, or slot 0 when pos >=
        # kv_len); the others only arrive at the counter.
        n_ctx = tl.minimum(pos, kv_len)
        start = split * SPLIT_LEN
        if (split == 0) | (start < n_ctx):
            sign = tl.where(offs_d < HALF, -1.0, 1.0)
            # the angles position · inv_freq in fp32 as the reference computes them; tl.cos/sin
            # lower to the accurate libdevice functions on NVIDIA GPUs (no .approx: positions
            # reach thousands of radians)
            angle = pos.to(tl.float32) * invf
            cos = tl.cos(angle)
            sin = tl.sin(angle)
            # RoPE of q and of the new k in fp32, rounded to the input dtype as the reference does.
            DT = q_ptr.dtype.element_ty
            q = (qx * cos[None, :] + sign[None, :] * qp * sin[None, :]).to(DT).to(tl.float32)
            k_new = (kx * cos + sign * kp * sin).to(DT)
            kc_row = kc_ptr + b64 * skc_b + hk * skc_h
            vc_row = vc_ptr + b64 * svc_b + hk * svc_h
            ks_row = ks_ptr + b64 * sks_b + hk * sks_h
            vs_row = vs_ptr + b64 * svs_b + hk * svs_h
            new_visible = pos < kv_len
            in_cache = dmask & (pos < S)
            if INT8:
                kq, k_sc = _quantize_kv(k_new.to(tl.float32), dmask, EPS_)
                vq, v_sc = _quantize_kv(v_new.to(tl.float32), dmask, EPS_)
                k_use = int8_to_f32(kq) * k_sc  # what a later step reads back
                v_use = int8_to_f32(vq) * v_sc
                if split == 0:
                    tl.store(kc_row + pos.to(tl.int64) * skc_s + offs_d, kq, mask=in_cache)
                    tl.store(vc_row + pos.to(tl.int64) * svc_s + offs_d, vq, mask=in_cache)
                    tl.store(ks_row + pos.to(tl.int64) * sks_s, k_sc, mask=pos < S)
                    tl.store(vs_row + pos.to(tl.int64) * svs_s, v_sc, mask=pos < S)
            else:
                k_use = k_new.to(tl.float32)
                v_use = v_new.to(tl.float32)
                if split == 0:
                    tl.store(kc_row + pos.to(tl.int64) * skc_s + offs_d, k_new, mask=in_cache)
                    tl.store(vc_row + pos.to(tl.int64) * svc_s + offs_d, v_new, mask=in_cache)
            qs = q * scale_log2e  # scores in log2 units: exp2 below
            if DOT:
                qs16 = qs.to(tl.float16)  # tl.dot's operand (G_PAD >= 16 rows: padded heads are zeros)
            s_new = tl.sum(qs * k_use[None, :], axis=1)  # (G_PAD,)
            first = (split == 0) & new_visible  # the new token enters slice 0's running softmax
            m_i = tl.where(first, s_new, float("-inf"))
            l_i = tl.where(first, 1.0, 0.0) + tl.zeros((G_PAD,), dtype=tl.float32)
            acc = tl.where(first, v_use[None, :], 0.0) + tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
            end = tl.minimum(start + SPLIT_LEN, n_ctx)
            offs_n = tl.arange(0, BLOCK_N)
            for n0 in range(start, end, BLOCK_N):
                slots = n0 + offs_n
                nmask = slots < end
                lmask = nmask[:, None] & dmask[None, :]
                # both tiles in flight before the scores need the first
                kt = tl.load(kc_row + slots.to(tl.int64)[:, None] * skc_s + offs_d[None, :], mask=lmask, other=0)
                vt = tl.load(vc_row + slots.to(tl.int64)[:, None] * svc_s + offs_d[None, :], mask=lmask, other=0)
                if INT8:  # int8-exact tiles; each slot's scale on its score
                    ksc = tl.load(ks_row + slots.to(tl.int64) * sks_s, mask=nmask, other=0.0)
                    vsc = tl.load(vs_row + slots.to(tl.int64) * svs_s, mask=nmask, other=0.0)
                    if DOT:  # fp16 on the tensor cores
                        s = tl.dot(qs16, tl.trans(_int8_to_f16(kt))) * ksc[None, :]
                    else:
                        s = tl.sum(int8_to_f32(kt)[None, :, :] * qs[:, None, :], axis=2) * ksc[None, :]
                else:
                    s = tl.sum(kt.to(tl.float32)[None, :, :] * qs[:, None, :], axis=2)  # (G_PAD, BLOCK_N)
                s = tl.where(nmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                if DOT:  # and on its softmax weight for v, relative to the tile's largest scale
                    # (p · scale in fp16 would lose its precision below 2^-14 when v is small)
                    vmax = tl.maximum(tl.max(vsc, axis=0), 1e-30)
                    pv = tl.dot((p * (vsc / vmax)[None, :]).to(tl.float16), _int8_to_f16(vt)) * vmax
                elif INT8:
                    pv = tl.sum((p * vsc[None, :])[:, :, None] * int8_to_f32(vt)[None, :, :], axis=1)
                else:
                    pv = tl.sum(p[:, :, None] * vt.to(tl.float32)[None, :, :], axis=1)
                acc = acc * alpha[:, None] + pv
                l_i = l_i * alpha + tl.sum(p, axis=1)
                m_i = m_new
            if N_SPLITS == 1:
                out = acc / l_i[:, None]
                tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=qmask)
            else:
                w = ws_rows + split
                tl.store(ws_m_ptr + w, m_i)
                tl.store(ws_l_ptr + w, l_i)
                tl.store(ws_acc_ptr + w[:, None] * D + offs_d[None, :], acc, mask=dmask[None, :])
        if N_SPLITS > 1:
            tl.debug_barrier()  # every thread's partial is stored before the arrival is released
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if arrived == N_SPLITS - 1:
                # live slices 0..n_live-1, MERGE at a time; slice 0 is live, so the running
                # max is finite after the first chunk and dead rows of a chunk weigh exp2(-inf) = 0
                n_live = tl.maximum((n_ctx + SPLIT_LEN - 1) // SPLIT_LEN, 1)
                offs_c = tl.arange(0, MERGE)
                m_run = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
                l_run = tl.zeros((G_PAD,), dtype=tl.float32)
                acc_run = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
                for c0 in range(0, n_live, MERGE):
                    sl = c0 + offs_c
                    cmask = sl < n_live
                    w = ws_rows[None, :] + sl[:, None]  # (MERGE, G_PAD)
                    ms = tl.load(ws_m_ptr + w, mask=cmask[:, None], other=float("-inf"), cache_modifier=".cg")
                    ls = tl.load(ws_l_ptr + w, mask=cmask[:, None], other=0.0, cache_modifier=".cg")
                    accs = tl.load(ws_acc_ptr + w[:, :, None] * D + offs_d[None, None, :],
                                   mask=cmask[:, None, None] & dmask[None, None, :], other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m_run, tl.max(ms, axis=0))
                    alpha = tl.exp2(m_run - m_new)
                    wgt = tl.exp2(ms - m_new[None, :])  # (MERGE, G_PAD)
                    acc_run = acc_run * alpha[:, None] + tl.sum(accs * wgt[:, :, None], axis=0)
                    l_run = l_run * alpha + tl.sum(ls * wgt, axis=0)
                    m_run = m_new
                out = acc_run / l_run[:, None]
                tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=qmask)
                tl.atomic_xchg(cnt_ptr + pid, 0)


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                            input_pos: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, kv_len: int, split_len: Optional[int] = None, *,
                            k_scales: Optional[torch.Tensor] = None,
                            v_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the decode kernel (T == 1, bf16/fp16, D in 64/80/128; mutates the caches, and
    the scales of int8 caches).

    ``split_len`` (tests): slots per cache slice, a positive multiple of ``_SPLIT_GRANULE``
    (16); default: chosen so that B·Hk·slices is about ``_PROGRAMS_PER_SM`` programs per SM.
    ``k_scales`` / ``v_scales``: int8 caches (the module docstring).
    """
    name = "decode_attention_triton"
    _check_args(name, q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len, k_scales, v_scales)
    if not triton_available():
        raise RuntimeError(f"{name} needs Triton, which is not importable here")
    B, T, H, D = q.shape
    Hk = k.shape[2]
    if T != 1:
        raise ValueError(f"{name} expects one new token per sequence (T == 1), got T={T}")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} expects bfloat16 or float16, got {q.dtype}")
    if D not in KERNEL_HEAD_DIMS:
        raise ValueError(f"{name} expects a head dim in {KERNEL_HEAD_DIMS}, got {D}")
    for label, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} expects {label} with a unit-stride last dim, got strides {t.stride()}")
    int8 = k_scales is not None
    ks, vs = (k_scales, v_scales) if int8 else (k_cache, v_cache)  # unread without INT8
    if split_len is None:
        split_len = _split_len(kv_len, B * Hk, q.device)
    elif not isinstance(split_len, int) or split_len <= 0 or split_len % _SPLIT_GRANULE:
        raise ValueError(f"{name} expects split_len a positive multiple of {_SPLIT_GRANULE}, got {split_len!r}")
    out = torch.empty((B, 1, H * D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    n_splits = -(-kv_len // split_len)
    G = H // Hk
    # int8 caches in long slices: the products are tl.dot's, whose operands have at least 16 rows
    dot = int8 and split_len >= _INT8_DOT_MIN_SLICE
    G_PAD, D_PAD = max(16 if dot else 1, next_pow2(G)), next_pow2(D)
    if n_splits > 1:
        rows = B * Hk * G_PAD * n_splits  # (sequence, kv head, padded query head, slice)
        ws = torch.empty((rows * (D + 2),), dtype=torch.float32, device=q.device)  # written before read
        ws_acc, ws_m, ws_l = ws[:rows * D], ws[rows * D:rows * (D + 1)], ws[rows * (D + 1):]
        cnt = arrival_counters(q.device, B * Hk)
    else:
        ws_acc = ws_m = ws_l = cnt = out
    # slices merged at a time: (MERGE, G_PAD, D_PAD) fp32 tiles of at most 2048 values
    merge = max(1, min(next_pow2(n_splits), 2048 // (G_PAD * D_PAD)))
    launch(_decode_attn_kernel, (B * Hk, n_splits),
           q, k, v, inv_freq.contiguous(), input_pos, k_cache, v_cache, ks, vs, out, ws_m, ws_l, ws_acc, cnt,
           Hk, kv_len, k_cache.shape[2], _kv_bucket(kv_len), LOG2E / math.sqrt(D),
           q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
           input_pos.stride(0),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
           ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
           device=q.device, D=D, D_PAD=D_PAD, GROUP=G, G_PAD=G_PAD, SPLIT_LEN=split_len,
           N_SPLITS=n_splits, MERGE=merge, INT8=int8, DOT=dot, EPS_=_INT8_EPS, **pdl_options(q))
    return out


# ----------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------
def _kernel_applies(q, k, v, inv_freq, input_pos, k_cache, v_cache, int8: bool = False) -> bool:
    caches_ok = (all(t.dtype == torch.int8 and t.device == q.device for t in (k_cache, v_cache)) if int8
                 else cuda_kernel_applies(q, k_cache, v_cache, dtypes=KERNEL_DTYPES))
    return (
        q.shape[1] == 1
        and q.shape[-1] in KERNEL_HEAD_DIMS
        and cuda_kernel_applies(q, k, v, dtypes=KERNEL_DTYPES)
        and caches_ok
        and all(t.device == q.device for t in (inv_freq, input_pos))
        and all(t.stride(-1) == 1 for t in (q, k, v, k_cache, v_cache))
    )


@torch.library.custom_op("fastzoo::decode_attention", mutates_args=("k_cache", "v_cache"))
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                         input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_len: int) -> torch.Tensor:
    if _kernel_applies(q, k, v, inv_freq, input_pos, k_cache, v_cache):
        return decode_attention_triton(q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len)
    return decode_attention_ref(q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len)


@_decode_attention_op.register_fake
def _(q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len):
    B, T, H, D = q.shape
    return q.new_empty((B, T, H * D))


@torch.library.custom_op("fastzoo::decode_attention_int8", mutates_args=("k_cache", "v_cache", "k_scales",
                                                                          "v_scales"))
def _decode_attention_int8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                              input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              k_scales: torch.Tensor, v_scales: torch.Tensor, kv_len: int) -> torch.Tensor:
    scales = dict(k_scales=k_scales, v_scales=v_scales)
    if _kernel_applies(q, k, v, inv_freq, input_pos, k_cache, v_cache, int8=True):
        return decode_attention_triton(q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len, **scales)
    return decode_attention_ref(q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len, **scales)


@_decode_attention_int8_op.register_fake
def _(q, k, v, inv_freq, input_pos, k_cache, v_cache, k_scales, v_scales, kv_len):
    B, T, H, D = q.shape
    return q.new_empty((B, T, H * D))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                     input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kv_len: int, k_scales: Optional[torch.Tensor] = None,
                     v_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RoPE + KV-cache write + masked GQA attention of T new tokens per sequence (see the
    module docstring); mutates ``k_cache``/``v_cache`` rows ``0..B-1``; returns (B, T, H·D).

    The Triton kernel (through the custom op) for one bf16/fp16 token on CUDA (D 64/80/128),
    the reference otherwise; T > 1 calls the reference directly (traceable PyTorch).
    Traceable by ``torch.compile(fullgraph=True)``; under inductor the cache
    mutation happens in place (no copy of the caches).
    ``k_scales`` / ``v_scales`` (Bmax, Hk, S, 1) fp32: int8 caches, quantized per slot (the
    module docstring; ``torch.ops.fastzoo.decode_attention_int8``, which mutates the scales too).
    """
    _check_args("decode_attention", q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len, k_scales, v_scales)
    if q.shape[1] != 1:
        # Several tokens (prefill, speculative verification): no kernel; the reference is
        # traced as plain PyTorch, so under torch.compile inductor fuses it as before.
        return decode_attention_ref(q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len, k_scales, v_scales)
    if k_scales is not None:
        return _decode_attention_int8_op(q, k, v, inv_freq, input_pos, k_cache, v_cache, k_scales, v_scales, kv_len)
    return _decode_attention_op(q, k, v, inv_freq, input_pos, k_cache, v_cache, kv_len)
