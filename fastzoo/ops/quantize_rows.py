"""Per-row dynamic int8 quantization: the first op of the op pattern.

For a tensor ``x`` of shape (..., N), every row (the last dimension) gets one
scale ``s = max(absmax(row), EPS) / 127`` and int8 values
``q = clamp(round(x / s), -127, 127)``, so that ``q * s ≈ x`` (``round``: to nearest, ties
to even, as ``torch.round`` and PyTorch's own quantizers).
An all-zero row gets the finite, non-zero scale ``EPS / 127`` and zeros.

- ``quantize_rows_int8_ref``: pure PyTorch, the definition.
- ``quantize_rows_int8_triton``: the Triton kernel's launcher (CUDA, or CPU under
  Triton's interpreter in the tests).
- ``quantize_rows_int8``: the public op (``torch.ops.fastzoo.quantize_rows_int8``),
  kernel on supported CUDA inputs, reference otherwise.

Cost: one read of x and one write of int8 values plus a scale per row; the
kernel keeps a row in registers (one pass) up to ``_MAX_SINGLE_PASS`` columns
and makes two passes over longer rows.
"""
from __future__ import annotations

import math

import torch

from ._common import FLOAT_DTYPES, cuda_kernel_applies, launch, short_bench, triton_available

EPS = 1e-12
_MAX_SINGLE_PASS = 16384


def round_clamp_int8_ref(v: torch.Tensor) -> torch.Tensor:
    """int8 of ``clamp(round(v), -127, 127)`` (ties to even, as ``torch.round``): the rounding
    of every int8 quantization in fastzoo (per-row, LayerNorm + quantize, GEMM and attention
    epilogues)."""
    return torch.round(v).clamp_(-127, 127).to(torch.int8)


def quantize_rows_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: int8 values of x's shape and float32 scales of shape (..., 1)."""
    xf = x.to(torch.float32)
    if x.shape[-1] == 0:  # rows of length zero: the scale of an all-zero row
        return torch.empty_like(x, dtype=torch.int8), xf.new_full((*x.shape[:-1], 1), EPS / 127.0)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(amax, min=EPS) / 127.0
    return round_clamp_int8_ref(xf / scale), scale


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _round_clamp_int8_tl(v):
        """``round_clamp_int8_ref`` in a kernel, with three FP32 ALU operations: clamp to
        ±127 (NaN gives −127: max(NaN, −127) is −127, as PTX's max.f32), then ``+ 1.5·2²³``,
        whose rounding to nearest even leaves the integer in the low bits of the float's word
        (two's complement), so that its low byte is the int8 (conversions and ``rint`` issue
        at a fraction of the FP32 rate on Hopper)."""
        c = tl.minimum(tl.maximum(v, -127.0), 127.0) + 12582912.0
        return c.to(tl.int32, bitcast=True).to(tl.int8)

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": 1}, num_warps=4),
            triton.Config({"BLOCK_M": 1}, num_warps=8),
            triton.Config({"BLOCK_M": 1}, num_warps=16),
            triton.Config({"BLOCK_M": 2}, num_warps=8),
            triton.Config({"BLOCK_M": 4}, num_warps=4),
            triton.Config({"BLOCK_M": 8}, num_warps=4),
            triton.Config({"BLOCK_M": 16}, num_warps=4),
        ],
        key=["N", "BLOCK_N", "SINGLE_PASS"],
        do_bench=short_bench,
    )
    @triton.jit
    def _quantize_rows_int8_kernel(
        x_ptr, q_ptr, s_ptr, M, N, stride_xm, stride_qm,
        EPS_: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        cols = tl.arange(0, BLOCK_N)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
        if SINGLE_PASS:
            mask = row_mask[:, None] & (cols[None, :] < N)
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(x), axis=1), EPS_) / 127.0
            tl.store(q_rows + cols[None, :], _round_clamp_int8_tl(x / scale[:, None]), mask=mask)
        else:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            scale = tl.maximum(amax, EPS_) / 127.0
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(q_rows + c[None, :], _round_clamp_int8_tl(x / scale[:, None]), mask=mask)
        tl.store(s_ptr + rows, scale, mask=row_mask)


def quantize_rows_int8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel (x on CUDA, or on the CPU under Triton's interpreter)."""
    if not triton_available():
        raise RuntimeError("quantize_rows_int8_triton needs Triton, which is not importable here")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_rows_int8_triton expects float32/float16/bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize_rows_int8_triton expects at least one dimension, got a scalar")
    N = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), N)
    if N > 0 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, N), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0 and N > 0:
        single = N <= _MAX_SINGLE_PASS
        block_n = triton.next_power_of_2(N) if single else 4096
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        launch(
            _quantize_rows_int8_kernel, grid,
            x2, q, scale, M, N, x2.stride(0), q.stride(0),
            device=x.device, EPS_=EPS, BLOCK_N=block_n, SINGLE_PASS=single,
        )
    elif M > 0:  # rows of length zero: the scale of an all-zero row
        scale.fill_(EPS / 127.0)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


@torch.library.custom_op("fastzoo::quantize_rows_int8", mutates_args=())
def _quantize_rows_int8_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() > 0 and cuda_kernel_applies(x):
        return quantize_rows_int8_triton(x)
    return quantize_rows_int8_ref(x)


@_quantize_rows_int8_op.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
    )


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dimension) symmetric int8 quantization: returns ``(q, scale)``.

    ``q``: int8, x's shape; ``scale``: float32, shape (..., 1); ``q * scale ≈ x``.
    Runs the Triton kernel for float CUDA tensors on Ampere or newer, the
    PyTorch reference otherwise. Traceable by ``torch.compile(fullgraph=True)``.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_rows_int8 expects a float32, float16 or bfloat16 tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize_rows_int8 expects a tensor with at least one dimension, got a scalar")
    return _quantize_rows_int8_op(x)
