"""A float linear with its activation and residual in the GEMM's epilogue.

``linear_act(x, weight, bias=None, *, activation="none", residual=None)``::

    out = act(x @ weight.T + bias) + residual          # act: "none" or "gelu" (exact, erf)

Compiled PyTorch runs ``F.linear`` on cuBLAS and the GELU and residual add as passes of
their own over the (M, N) output: cuBLAS has no exact-GELU epilogue. For SAM vit_h's MLP
(M = 65536 tokens at batch 16, K = 1280, N = 5120) the GELU pass is 0.52 ms next to a 1.18 ms
GEMM (H100). Here the product runs on the int8 op's persistent TMA kernel
(``fastzoo.ops.int8_mm``) with bf16/fp16 operands and an fp32 accumulator, and the epilogue
(bias, GELU, residual, one rounding to x's dtype) is applied on the accumulator tile.

- ``linear_act_ref``: ``F.linear``, ``F.gelu``, ``+ residual`` in x's dtype, as a plain
  model computes it;
- ``linear_act_triton``: the kernel's launcher (Hopper CUDA tensors, or CPU tensors under
  Triton's interpreter);
- ``linear_act``: the public op ``torch.ops.fastzoo.linear_act``: the kernel on Hopper for
  bf16/fp16 with at least ``TMA_MIN_M`` rows and TMA-compatible strides, the reference
  elsewhere.

Tested against the reference under the interpreter and on an H100; timed by
``experiments.bench_linear_act`` (1.01-1.28x compiled cuBLAS + GELU / add at SAM and ViT-L MLP
shapes on an H100, experiments/results/h100-80gb-hbm3/linear_act.json).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import triton_available
from .int8_mm import ACTIVATIONS, _int8_scaled_mm_tma_launch, _tma_path_applies, _tma_ok

KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # the kernel's; the reference takes any float


def _check(name, x, weight, bias, activation, residual) -> None:
    if not x.dtype.is_floating_point or weight.dtype != x.dtype:
        raise TypeError(f"{name} expects x and weight of one float dtype, got x {x.dtype} and weight {weight.dtype}")
    if x.dim() == 0 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name} expects x (..., K) and weight (N, K), got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{name} expects bias of shape ({N},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} expects activation in {ACTIVATIONS}, got {activation!r}")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], N):
        raise ValueError(f"{name} expects residual of shape {(*x.shape[:-1], N)}, got {tuple(residual.shape)}")


def linear_act_ref(x, weight, bias=None, *, activation="none", residual=None):
    """Reference: ``F.linear``, then ``F.gelu`` (exact) and ``+ residual``, each in x's dtype."""
    _check("linear_act_ref", x, weight, bias, activation, residual)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual


def linear_act_triton(x, weight, bias=None, *, activation="none", residual=None, config=None):
    """Launch the persistent kernel (``config``: a ``TMA_INTERPRETER_CONFIGS`` entry for CPU
    tensors under Triton's interpreter; None: the autotuner on CUDA). Raises where TMA cannot
    address the tensors."""
    if not triton_available():
        raise RuntimeError("linear_act_triton needs Triton, which is not importable here")
    _check("linear_act_triton", x, weight, bias, activation, residual)
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"linear_act_triton expects bf16 or fp16 x, got {x.dtype}")
    K, N = x.shape[-1], weight.shape[0]
    a = x.reshape(-1, K)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = weight if weight.stride(-1) == 1 else weight.contiguous()
    res = None if residual is None else residual.reshape(-1, N)
    out = torch.empty((a.shape[0], N), dtype=x.dtype, device=x.device)
    if not all(_tma_ok(t) for t in (a, b, out) + (() if res is None else (res,))):
        raise ValueError(f"linear_act_triton needs 16-byte aligned rows (K and N multiples of 8 for bf16/fp16), "
                         f"got K={K}, N={N}")
    one = torch.ones(1, dtype=torch.float32, device=x.device)
    bias_arg = None if bias is None else bias.contiguous()
    _int8_scaled_mm_tma_launch(a, b, one, one, bias_arg, out, res, None, activation, config=config)
    return out.reshape(*x.shape[:-1], N)


@torch.library.custom_op("fastzoo::linear_act", mutates_args=())
def _linear_act_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                   residual: Optional[torch.Tensor]) -> torch.Tensor:
    K, N = x.shape[-1], weight.shape[0]
    out_like = x.new_empty((1, N))
    res = None if residual is None else residual.reshape(-1, N)
    if (x.dtype in KERNEL_DTYPES and x.is_cuda and weight.device == x.device
            and (bias is None or bias.device == x.device) and (res is None or res.device == x.device)
            and _tma_path_applies(x.reshape(-1, K), weight, out_like, res)):
        return linear_act_triton(x, weight, bias, activation=activation, residual=residual)
    return linear_act_ref(x, weight, bias, activation=activation, residual=residual)


@_linear_act_op.register_fake
def _(x, weight, bias, activation, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               activation: str = "none", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(x @ weight.T + bias) + residual`` in x's dtype (``activation``: "none" or "gelu",
    exact). The persistent Hopper kernel with the epilogue fused (bf16/fp16, at least
    ``TMA_MIN_M`` rows); ``F.linear`` + ``F.gelu`` + add elsewhere. Traceable by
    ``torch.compile(fullgraph=True)``."""
    _check("linear_act", x, weight, bias, activation, residual)
    return _linear_act_op(x, weight, bias, activation, residual)
