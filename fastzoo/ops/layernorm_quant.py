"""LayerNorm fused with int8 quantization: the input of an int8 linear in one pass.

``layernorm_quant_int8(x, weight, bias, eps=1e-6, scale=None) -> (q, s)``::

    y = layer_norm(x, (D,), weight, bias, eps)                       # in fp32
    dynamic (scale None): s = max(absmax(y_row), EPS) / 127 per row  # (M, 1)
    static  (scale given, one element): s = scale for every row
    q = clamp(round(y / s), -127, 127)                               # int8 (ties to even)

``s`` is always returned with shape (..., 1) (in static mode every row holds the given
scale), so the next ``int8_scaled_mm`` takes it as a per-token scale either way.

A transformer block's pre-norm feeds a linear: unfused, LayerNorm writes y (2 bytes per
element in bf16) and the quantization reads it back and writes int8. Fused, x is read
once and only int8 values (1 byte per element) and one scale per row are written.

- ``layernorm_quant_int8_ref``: the definition (``F.layer_norm`` in fp32, then the same
  rounding as ``quantize_rows_int8``);
- ``layernorm_quant_int8_triton``: the kernel's launcher (a row block in registers;
  CUDA, or CPU tensors under Triton's interpreter);
- ``layernorm_quant_int8``: the public op ``torch.ops.fastzoo.layernorm_quant_int8``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import FLOAT_DTYPES, cuda_kernel_applies, launch, short_bench, triton_available
from .quantize_rows import EPS, round_clamp_int8_ref

_MAX_D = 16384  # a row must fit in registers


def _check(name, x, weight, bias, scale) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} expects x in float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} expects x of shape (..., D), got a scalar")
    D = x.shape[-1]
    if D == 0:
        raise ValueError(f"{name} expects x with D > 0 features to normalise, got shape {tuple(x.shape)}")
    for n, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (D,):
            raise ValueError(f"{name} expects {n} of shape ({D},), got {tuple(t.shape)}")
    if scale is not None:
        if scale.numel() != 1 or scale.dtype != torch.float32:
            raise ValueError(f"{name} expects a static scale of one float32 element, got shape "
                             f"{tuple(scale.shape)} dtype {scale.dtype}")
    devices = {t.device for t in (x, weight, bias, scale) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{name} expects all tensors on one device, got {sorted(map(str, devices))}")


def layernorm_quant_int8_ref(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: fp32 LayerNorm, then per-row (dynamic) or given (static) int8 quantization."""
    _check("layernorm_quant_int8_ref", x, weight, bias, scale)
    D = x.shape[-1]
    y = F.layer_norm(x.float(), (D,), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is None:
        s = torch.clamp(y.abs().amax(dim=-1, keepdim=True), min=EPS) / 127.0
    else:
        s = scale.float().reshape(1).expand(*x.shape[:-1], 1).contiguous()
    return round_clamp_int8_ref(y / s), s


if triton_available():
    import triton
    import triton.language as tl

    from .quantize_rows import _round_clamp_int8_tl

    # The autotuner's candidates, and more rows a program (timed one by one by
    # ``experiments.bench_ops --layernorm-quant``).
    # (rows a program, warps)
    LN_QUANT_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w)
                        for m, w in ((1, 4), (1, 8), (2, 4), (4, 4), (4, 8), (8, 8))]
    LN_QUANT_SWEEP_CONFIGS = LN_QUANT_CONFIGS + [triton.Config({"BLOCK_M": m}, num_warps=w)
                                                 for m, w in ((8, 4), (16, 8), (16, 16), (32, 16), (2, 2), (1, 2))]

    @triton.autotune(
        configs=LN_QUANT_CONFIGS,
        key=["D", "BLOCK_D", "STATIC"],
        do_bench=short_bench,
    )
    @triton.jit
    def _layernorm_quant_int8_kernel(
        x_ptr, w_ptr, b_ptr, scale_ptr, q_ptr, s_ptr, M, D, stride_xm, stride_qm, eps,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, STATIC: tl.constexpr, EPS_: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < M
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        y = xc * (1.0 / tl.sqrt(var + eps))[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if STATIC:
            s = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(scale_ptr)
        else:
            s = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1), EPS_) / 127.0
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], _round_clamp_int8_tl(y / s[:, None]),
                 mask=mask)
        tl.store(s_ptr + rows, s, mask=row_mask)


def layernorm_quant_int8_triton(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel (CUDA tensors, or CPU tensors under Triton's interpreter)."""
    if not triton_available():
        raise RuntimeError("layernorm_quant_int8_triton needs Triton, which is not importable here")
    _check("layernorm_quant_int8_triton", x, weight, bias, scale)
    D = x.shape[-1]
    if D > _MAX_D:
        raise ValueError(f"layernorm_quant_int8_triton expects D <= {_MAX_D}, got {D}")
    x2 = x.reshape(math.prod(x.shape[:-1]), D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, D), dtype=torch.int8, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0:
        w = weight.contiguous() if weight is not None else x2
        b = bias.contiguous() if bias is not None else x2
        sc = scale.reshape(1) if scale is not None else s
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        launch(
            _layernorm_quant_int8_kernel, grid,
            x2, w, b, sc, q, s, M, D, x2.stride(0), q.stride(0), float(eps),
            device=x.device, HAS_W=weight is not None, HAS_B=bias is not None, STATIC=scale is not None,
            EPS_=EPS, BLOCK_D=triton.next_power_of_2(D),
        )
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


@torch.library.custom_op("fastzoo::layernorm_quant_int8", mutates_args=())
def _layernorm_quant_int8_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    scale: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    params = [t for t in (weight, bias) if t is not None]
    if (cuda_kernel_applies(x, *params) and (scale is None or cuda_kernel_applies(x, scale))
            and x.shape[-1] <= _MAX_D):
        return layernorm_quant_int8_triton(x, weight, bias, eps, scale)
    q, s = layernorm_quant_int8_ref(x, weight, bias, eps, scale)
    return q.contiguous(), s


@_layernorm_quant_int8_op.register_fake
def _(x, weight, bias, eps, scale):
    return (torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


def layernorm_quant_int8(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension, quantized to int8: returns ``(q, s)`` with
    ``q * s ≈ layer_norm(x)``; ``s`` float32 (..., 1), per row (``scale=None``, dynamic)
    or the given one-element static ``scale`` repeated. One pass over x on CUDA (Ampere
    or newer, D ≤ 16384); the PyTorch reference elsewhere. Traceable by torch.compile."""
    _check("layernorm_quant_int8", x, weight, bias, scale)
    return _layernorm_quant_int8_op(x, weight, bias, float(eps), scale)
