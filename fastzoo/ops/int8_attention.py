"""Mixed-precision attention: int8 Q·Kᵀ, fp32 online softmax, bf16/fp16 P·V (QAttn-style).

``int8_attention(q, k, v, q_scale, k_scale, v_scale=None, *, sm_scale=None,
out_dtype=torch.bfloat16, out_scale=None)``::

    S   = (q_int8 @ k_int8ᵀ as exact int32) * q_scale[..., :, None] * k_scale[..., None, :] * sm_scale
    P   = softmax(S)                         # fp32, online (flash-style), never in memory
    out = P @ (v_int8 * v_scale[..., None])  # P and the dequantized V in bf16/fp16, fp32 accumulation
    out → out_dtype (dynamic), or clamp(round(out / out_scale), -127, 127) int8 (static; ties to even)

- ``q``, ``k``: int8 (B, H, Nq, D) / (B, H, Nk, D), any strides with a unit last stride
  (e.g. views into a fused qkv projection's output: no permute copies);
- ``q_scale``, ``k_scale``: float32, broadcastable to (B, H, Nq) / (B, H, Nk): per token
  (and head) for dynamic quantization, one element per tensor for static;
- ``v``: int8 with ``v_scale`` (like the others), or bf16/fp16 with ``v_scale=None``
  (V kept in floating point);
- ``out_dtype``: bfloat16, float16 (float32 accepted: P·V still in bf16), or ``torch.int8`` with ``out_scale`` (one float32
  element; the int8 input of the next int8 GEMM).

The output is (B, H, Nq, D) laid out as (B, Nq, H, D) in memory, so that
``out.transpose(1, 2).reshape(B, Nq, H * D)`` (the projection's input) is free.

Every sequence length works (ViT's 197 / 577 / 785: the last key tile is masked); the
grid is (query tiles, B·H), so batch × heads in the thousands fills the GPU.

- ``int8_attention_ref``: the definition (dequantize, fp32 ``scaled_dot_product_attention``);
- ``int8_attention_triton``: the kernel's launcher (CUDA; CPU tensors under Triton's interpreter);
- ``int8_attention``: the public op ``torch.ops.fastzoo.int8_attention``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import LOG2E, cuda_kernel_applies, launch, short_bench, triton_available, unit_stride_last
from .int8_mm import requantize_int8_ref

FLOAT_OUT = (torch.bfloat16, torch.float16, torch.float32)
_KERNEL_V = (torch.int8, torch.bfloat16, torch.float16)  # fp32 V: the reference
_MAX_D = 256


def _scale_view(s: torch.Tensor, B: int, H: int, N: int, name: str, fn: str) -> torch.Tensor:
    """``s`` as a (B, H, N) float32 view (stride 0 along broadcast dimensions)."""
    if s.dtype != torch.float32:
        raise TypeError(f"{fn} expects float32 {name}, got {s.dtype}")
    if s.dim() == 4 and s.shape[-1] == 1:
        s = s.squeeze(-1)
    if s.numel() == 1:
        s = s.reshape(1, 1, 1)
    try:
        return torch.broadcast_to(s, (B, H, N))
    except RuntimeError:
        raise ValueError(f"{fn} expects {name} broadcastable to (B, H, N) = ({B}, {H}, {N}) (per token) "
                         f"or one element (per tensor), got shape {tuple(s.shape)}") from None


def _check(fn, q, k, v, q_scale, k_scale, v_scale, out_dtype, out_scale):
    if q.dtype != torch.int8 or k.dtype != torch.int8:
        raise TypeError(f"{fn} expects int8 q and k, got {q.dtype} and {k.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{fn} expects 4-D q, k, v (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"{fn} expects k and v of shape ({B}, {H}, Nk, {D}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    Nk = k.shape[2]
    if v.dtype == torch.int8:
        if v_scale is None:
            raise ValueError(f"{fn} expects v_scale with an int8 v")
    elif v.dtype in FLOAT_OUT:
        if v_scale is not None:
            raise ValueError(f"{fn} expects v_scale=None with a {v.dtype} v (V kept in floating point)")
    else:
        raise TypeError(f"{fn} expects v in int8, bfloat16, float16 or float32, got {v.dtype}")
    if out_dtype not in FLOAT_OUT + (torch.int8,):
        raise TypeError(f"{fn} expects out_dtype bfloat16, float16, float32 or int8 (with out_scale), got {out_dtype}")
    if (out_dtype == torch.int8) != (out_scale is not None):
        raise ValueError(f"{fn} expects out_scale exactly when out_dtype is torch.int8")
    if out_scale is not None and (out_scale.numel() != 1 or out_scale.dtype != torch.float32):
        raise ValueError(f"{fn} expects out_scale of one float32 element, got shape {tuple(out_scale.shape)} "
                         f"dtype {out_scale.dtype}")
    qs = _scale_view(q_scale, B, H, Nq, "q_scale", fn)
    ks = _scale_view(k_scale, B, H, Nk, "k_scale", fn)
    vs = None if v_scale is None else _scale_view(v_scale, B, H, Nk, "v_scale", fn)
    devices = {t.device for t in (q, k, v, q_scale, k_scale, v_scale, out_scale) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{fn} expects all tensors on one device, got {sorted(map(str, devices))}")
    return qs, ks, vs


def _new_out(B, H, N, D, dtype, device):
    """(B, H, N, D) view of a (B, N, H, D) buffer: the projection's input layout."""
    return torch.empty((B, N, H, D), dtype=dtype, device=device).transpose(1, 2)


def int8_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
    v_scale: Optional[torch.Tensor] = None, *, sm_scale: Optional[float] = None,
    out_dtype: torch.dtype = torch.bfloat16, out_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference: dequantize to fp32, ``F.scaled_dot_product_attention``, cast or re-quantize."""
    qs, ks, vs = _check("int8_attention_ref", q, k, v, q_scale, k_scale, v_scale, out_dtype, out_scale)
    qf = q.float() * qs[..., None]
    kf = k.float() * ks[..., None]
    vf = v.float() * vs[..., None] if vs is not None else v.float()
    o = F.scaled_dot_product_attention(qf, kf, vf, scale=sm_scale)
    o = requantize_int8_ref(o, out_scale) if out_scale is not None else o.to(out_dtype)
    out = _new_out(*o.shape, o.dtype, o.device)
    out.copy_(o)
    return out


if triton_available():
    import triton
    import triton.language as tl

    from .quantize_rows import _round_clamp_int8_tl

    # The first configuration runs under Triton's interpreter (CPU tests): small. The
    # others: Ampere/Hopper at ViT lengths (197 = 128 + 69, 577, 785).
    _CONFIGS = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]

    @triton.autotune(configs=_CONFIGS, key=["Nq", "Nk", "BLOCK_D", "V_INT8", "OUT_INT8", "PV_FP16"],
                     do_bench=short_bench)
    @triton.jit
    def _int8_attention_kernel(
        q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, o_ptr, os_ptr,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
        sqs_b, sqs_h, sqs_n, sks_b, sks_h, sks_n, svs_b, svs_h, svs_n,
        so_b, so_h, so_n,
        H, Nq, Nk, D, qk_scale,
        V_INT8: tl.constexpr, OUT_INT8: tl.constexpr, PV_FP16: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < Nq
        d_mask = offs_d < D

        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0)
        # q's scale with the softmax scale and log2(e) folded in (exp2 below).
        q_s = tl.load(qs_ptr + b * sqs_b + h * sqs_h + offs_m * sqs_n, mask=m_mask, other=0.0) * qk_scale

        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        ks_base = ks_ptr + b * sks_b + h * sks_h
        vs_base = vs_ptr + b * svs_b + h * svs_h
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, Nk, BLOCK_N):
            n = start + offs_n
            n_mask = n < Nk
            kt = tl.load(k_base + n[None, :] * sk_n + offs_d[:, None],
                         mask=n_mask[None, :] & d_mask[:, None], other=0)
            s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32)  # exact int8·int8 sums
            k_s = tl.load(ks_base + n * sks_n, mask=n_mask, other=0.0)
            s = s * q_s[:, None] * k_s[None, :]
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + n[:, None] * sv_n + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0)
            if V_INT8:
                v_s = tl.load(vs_base + n * svs_n, mask=n_mask, other=0.0)
                vf = v.to(tl.float32) * v_s[:, None]
                if PV_FP16:
                    v = vf.to(tl.float16)
                else:
                    v = vf.to(tl.bfloat16)
            p = p.to(v.dtype)
            if DOT_F32:  # the interpreter multiplies raw bf16 bits in tl.dot: widen the rounded operands
                pv = tl.dot(p.to(tl.float32), v.to(tl.float32))
            else:
                pv = tl.dot(p, v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        o_ptrs = o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :]
        o_mask = m_mask[:, None] & d_mask[None, :]
        if OUT_INT8:
            o_s = tl.load(os_ptr)
            tl.store(o_ptrs, _round_clamp_int8_tl(out / o_s), mask=o_mask)
        else:
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)


def int8_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
    v_scale: Optional[torch.Tensor] = None, *, sm_scale: Optional[float] = None,
    out_dtype: torch.dtype = torch.bfloat16, out_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the kernel (CUDA tensors, or CPU tensors under Triton's interpreter)."""
    if not triton_available():
        raise RuntimeError("int8_attention_triton needs Triton, which is not importable here")
    qs, ks, vs = _check("int8_attention_triton", q, k, v, q_scale, k_scale, v_scale, out_dtype, out_scale)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if D > _MAX_D:
        raise ValueError(f"int8_attention_triton expects head dim <= {_MAX_D}, got {D}")
    if sm_scale is None:
        sm_scale = D ** -0.5
    out = _new_out(B, H, Nq, D, out_dtype, q.device)
    if out.numel() == 0 or Nk == 0:
        if out.numel():
            out.copy_(int8_attention_ref(q, k, v, q_scale, k_scale, v_scale, sm_scale=sm_scale,
                                         out_dtype=out_dtype, out_scale=out_scale))
        return out
    q, k, v = (unit_stride_last(t) for t in (q, k, v))
    vs_arg = vs if vs is not None else qs  # any pointer; not read with a float v
    pv_fp16 = (v.dtype == torch.float16) if v.dtype != torch.int8 else out_dtype == torch.float16
    os_arg = out_scale.reshape(1) if out_scale is not None else qs
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)  # noqa: E731
    launch(
        _int8_attention_kernel, grid,
        q, k, v, qs, ks, vs_arg, out, os_arg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        qs.stride(0), qs.stride(1), qs.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vs_arg.stride(0), vs_arg.stride(1), vs_arg.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, Nq, Nk, D, float(sm_scale) * LOG2E,
        device=q.device, V_INT8=v.dtype == torch.int8, OUT_INT8=out_scale is not None, PV_FP16=pv_fp16,
        DOT_F32=q.device.type != "cuda", BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out


@torch.library.custom_op("fastzoo::int8_attention", mutates_args=())
def _int8_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
    v_scale: Optional[torch.Tensor], sm_scale: float, out_dtype: torch.dtype, out_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    kw = dict(sm_scale=sm_scale, out_dtype=out_dtype, out_scale=out_scale)
    tensors = [t for t in (q_scale, k_scale, v_scale, out_scale) if t is not None]
    if (cuda_kernel_applies(q, k, v, dtypes=_KERNEL_V)
            and cuda_kernel_applies(q, *tensors, dtypes=(torch.int8, torch.float32))
            and q.shape[-1] <= _MAX_D and k.shape[2] > 0):
        return int8_attention_triton(q, k, v, q_scale, k_scale, v_scale, **kw)
    return int8_attention_ref(q, k, v, q_scale, k_scale, v_scale, **kw)


@_int8_attention_op.register_fake
def _(q, k, v, q_scale, k_scale, v_scale, sm_scale, out_dtype, out_scale):
    B, H, Nq, D = q.shape
    return q.new_empty((B, Nq, H, D), dtype=out_dtype).transpose(1, 2)


def int8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
    v_scale: Optional[torch.Tensor] = None, *, sm_scale: Optional[float] = None,
    out_dtype: torch.dtype = torch.bfloat16, out_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(dequant(q) · dequant(k)ᵀ · sm_scale) · dequant(v) with int8 Q·Kᵀ (see the module doc).

    Returns (B, H, Nq, D) in ``out_dtype`` (bf16/fp16, or int8 with ``out_scale``), stored
    as (B, Nq, H, D). The Triton kernel on CUDA (Ampere or newer, head dim ≤ 256), the
    SDPA reference otherwise. Traceable by ``torch.compile(fullgraph=True)``.
    """
    _check("int8_attention", q, k, v, q_scale, k_scale, v_scale, out_dtype, out_scale)
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    sm_scale = float(sm_scale)
    if not math.isfinite(sm_scale):
        raise ValueError(f"int8_attention expects a finite sm_scale, got {sm_scale}")
    return _int8_attention_op(q, k, v, q_scale, k_scale, v_scale, sm_scale, out_dtype, out_scale)
