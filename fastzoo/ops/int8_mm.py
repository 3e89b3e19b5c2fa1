"""int8 × int8 matmul with a fused dequantization epilogue, and the dynamic int8 linear.

``int8_scaled_mm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16)``::

    out = ((a @ bᵀ as exact int32) * a_scale * b_scale[None, :] + bias).to(out_dtype)

- ``a``: int8 (M, K), the quantized activations (one row per token);
- ``b``: int8 (N, K), the quantized weight in ``nn.Linear``'s (out, in) layout, so the
  product is ``a @ bᵀ`` with both operands contiguous along K (what int8 tensor cores
  want: "column-major B");
- ``a_scale``: float32, per token (M, 1) or (M,), or per tensor (one element);
- ``b_scale``: float32, per output channel (N,) or (N, 1), or per tensor (one element);
- ``bias``: optional (N,), in ``out_dtype`` or float32;
- ``out_dtype``: bfloat16, float16 or float32.

The epilogue (int32 → fp32, both scales, bias, cast) runs in registers on the
accumulator tile: the int32 product never goes to memory.

- ``int8_scaled_mm_ref``: the definition in PyTorch (exact integer product via float64,
  or ``torch._int_mm`` on CUDA where its shape rules allow; epilogue in fp32).
- ``int8_scaled_mm_triton``: the Triton kernel's launcher (CUDA, or CPU tensors under
  Triton's interpreter in the tests).
- ``int8_scaled_mm``: the public op (``torch.ops.fastzoo.int8_scaled_mm``): kernel on
  supported CUDA inputs, reference otherwise.

``int8_dynamic_linear(x, w_int8, w_scale, bias=None)`` quantizes ``x`` per row with
``quantize_rows_int8`` and calls ``int8_scaled_mm``: the forward of a linear layer with
int8 dynamic (per-token) activation and int8 per-channel weight quantization.
``int8_dynamic_linear_ref`` composes the two references.

Cost of the kernel: 2·M·N·K integer ops; reads M·K + N·K bytes (plus re-reads from
L2 across tiles), writes M·N·sizeof(out_dtype) bytes. Autotuning is keyed on
(next power of two of M, N, K), so a new token count reuses its bucket's choice.

Not done yet: fusing the per-row quantization of x into the GEMM's prologue (today
``int8_dynamic_linear`` writes int8 x and its scales once, then the GEMM reads them).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import cuda_kernel_applies, launch, triton_available
from .quantize_rows import quantize_rows_int8, quantize_rows_int8_ref

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Largest K whose int32 sum of int8 products cannot overflow: K · 128 · 128 < 2^31.
MAX_K = (2**31 - 1) // (128 * 128)
_INT8 = (torch.int8,)
_FP32 = (torch.float32,)


# ----------------------------------------------------------------------------------
# Argument checks (shared by the reference, the launcher and the public op)
# ----------------------------------------------------------------------------------
def _check_args(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> tuple[int, int, int]:
    """Validate the arguments; return (M, N, K). Errors name what was expected and found."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"{name} expects int8 a and b, got a {a.dtype} and b {b.dtype}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{name} expects 2-D a (M, K) and b (N, K), got a of shape {tuple(a.shape)} "
            f"and b of shape {tuple(b.shape)}"
        )
    M, K = a.shape
    N, Kb = b.shape
    if Kb != K:
        raise ValueError(
            f"{name} expects b of shape (N, K={K}) (nn.Linear's (out, in) layout, the product "
            f"is a @ b.T), got b of shape {tuple(b.shape)} for a of shape {tuple(a.shape)}"
        )
    if K > MAX_K:
        raise ValueError(
            f"{name} expects K <= {MAX_K} (an int32 accumulator of int8 products could "
            f"overflow beyond), got K={K}"
        )
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{name} expects out_dtype bfloat16, float16 or float32, got {out_dtype}")
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise TypeError(
            f"{name} expects float32 a_scale and b_scale, got a_scale {a_scale.dtype} "
            f"and b_scale {b_scale.dtype}"
        )
    if not (a_scale.numel() == 1 or tuple(a_scale.shape) in ((M, 1), (M,))):
        raise ValueError(
            f"{name} expects a_scale of shape ({M}, 1) (per token) or one element (per tensor), "
            f"got shape {tuple(a_scale.shape)}"
        )
    if not (b_scale.numel() == 1 or tuple(b_scale.shape) in ((N,), (N, 1))):
        raise ValueError(
            f"{name} expects b_scale of shape ({N},) (per output channel) or one element "
            f"(per tensor), got shape {tuple(b_scale.shape)}"
        )
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{name} expects bias of shape ({N},), got shape {tuple(bias.shape)}")
        if bias.dtype not in (out_dtype, torch.float32):
            raise TypeError(
                f"{name} expects bias in out_dtype ({out_dtype}) or float32, got {bias.dtype}"
            )
    tensors = [("a", a), ("b", b), ("a_scale", a_scale), ("b_scale", b_scale)]
    if bias is not None:
        tensors.append(("bias", bias))
    devices = {t.device for _, t in tensors}
    if len(devices) != 1:
        found = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ValueError(f"{name} expects all tensors on one device, got {found}")
    return M, N, K


# ----------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------
def _int_mm_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Shapes for which ``torch._int_mm`` (cuBLAS int8 GEMM) is documented to work."""
    M, K = a.shape
    N = b.shape[0]
    return a.is_cuda and M > 16 and K >= 16 and K % 8 == 0 and N % 8 == 0


def _exact_int_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ bᵀ as exact int32 (float64 holds every int8·int8 sum up to K ≈ 2^38)."""
    if _int_mm_applies(a, b):
        return torch._int_mm(a.contiguous(), b.contiguous().t())
    return torch.matmul(a.to(torch.float64), b.to(torch.float64).t()).to(torch.int32)


def int8_scaled_mm_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Reference: exact int32 ``a @ bᵀ``, then ``* a_scale * b_scale + bias`` in fp32, cast."""
    M, N, _ = _check_args("int8_scaled_mm_ref", a, b, a_scale, b_scale, bias, out_dtype)
    acc = _exact_int_product(a, b).to(torch.float32)
    out = acc * a_scale.reshape(-1, 1) * b_scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype).reshape(M, N)


# ----------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------
def _m_bucket(M: int) -> int:
    """Autotuning key for M: the next power of two (at least 16), so that a new
    sequence length does not re-run the autotuner (Llama prefill, SAM batch sizes)."""
    return max(16, 1 << max(0, (M - 1).bit_length()))


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner pre-filter: no row tile taller than M's bucket (a 128-row tile for a
    handful of tokens only wastes tuning time). Always keeps at least one config."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= named_args["M_BUCKET"]]
    return kept or list(configs[:1])


if triton_available():
    import triton
    import triton.language as tl

    def _cfg(bm, bn, bk, warps, stages, group=8):
        return triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
            num_warps=warps, num_stages=stages,
        )

    # The first configuration is the one Triton's interpreter runs in the tests (small:
    # tl.dot needs every tile dimension >= 16; int8 mma wants BLOCK_K >= 32). The rest
    # are for Hopper/Ampere at the shapes of SAM / ViT / Llama linears; the autotuner
    # drops those that do not fit the GPU's shared memory.
    _CONFIGS = [
        _cfg(16, 32, 64, 4, 2),
        # small M (decode, few tokens)
        _cfg(16, 64, 128, 4, 4),
        _cfg(32, 64, 128, 4, 4),
        _cfg(64, 64, 128, 4, 4),
        # medium
        _cfg(64, 128, 128, 4, 4),
        _cfg(128, 64, 128, 4, 4),
        _cfg(128, 128, 64, 4, 4),
        _cfg(128, 128, 128, 8, 3),
        _cfg(128, 128, 128, 4, 4),
        # large M (SAM encoder, prefill)
        _cfg(128, 256, 64, 8, 4),
        _cfg(128, 256, 128, 8, 3),
        _cfg(256, 128, 64, 8, 4),
        _cfg(256, 128, 128, 8, 3),
    ]

    @triton.autotune(
        configs=_CONFIGS,
        key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _int8_scaled_mm_kernel(
        a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr,
        M, N, K, M_BUCKET,
        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_as, stride_bs,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        # Grouped program order: GROUP_M row-tiles share the same column-tiles of b
        # while they are hot in L2.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows/columns past the edge wrap around (valid addresses, results discarded by
        # the store mask), so the loads in the K loop need no M/N masks.
        offs_am = offs_m % M
        offs_bn = offs_n % N
        a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        # b is (N, K); the tile is read as its transpose (BLOCK_K, BLOCK_N).
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn.to(tl.int64)[None, :] * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a_tile = tl.load(a_ptrs)
                b_tile = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a_tile = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
                b_tile = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
            acc = tl.dot(a_tile, b_tile, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        # Fused epilogue, in fp32 on the accumulator tile.
        m_mask = offs_m < M
        n_mask = offs_n < N
        a_s = tl.load(as_ptr + offs_m * stride_as, mask=m_mask, other=0.0)
        b_s = tl.load(bs_ptr + offs_n * stride_bs, mask=n_mask, other=0.0)
        out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            out = out + bias[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int8_scaled_mm_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Launch the Triton kernel (tensors on CUDA, or on the CPU under Triton's interpreter)."""
    if not triton_available():
        raise RuntimeError("int8_scaled_mm_triton needs Triton, which is not importable here")
    M, N, K = _check_args("int8_scaled_mm_triton", a, b, a_scale, b_scale, bias, out_dtype)
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:  # empty sum: the epilogue of a zero accumulator
        out.copy_(int8_scaled_mm_ref(a, b, a_scale, b_scale, bias, out_dtype))
        return out
    # Both operands K-contiguous: the layout int8 tensor-core MMAs (wgmma) read.
    if a.stride(1) != 1:
        a = a.contiguous()
    if b.stride(1) != 1:
        b = b.contiguous()
    a_s = a_scale.reshape(-1)
    b_s = b_scale.reshape(-1)
    bias_arg = bias if bias is not None else b_s  # any pointer; not read without bias
    if bias is not None and bias.stride(0) != 1:
        bias_arg = bias.contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(
        _int8_scaled_mm_kernel, grid,
        a, b, a_s, b_s, bias_arg, out,
        M, N, K, _m_bucket(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        a_s.stride(0) if a_s.numel() > 1 else 0,
        b_s.stride(0) if b_s.numel() > 1 else 0,
        device=a.device, HAS_BIAS=bias is not None,
    )
    return out


# ----------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------
@torch.library.custom_op("fastzoo::int8_scaled_mm", mutates_args=())
def _int8_scaled_mm_op(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if (
        cuda_kernel_applies(a, b, dtypes=_INT8)
        and cuda_kernel_applies(a, a_scale, b_scale, dtypes=_INT8 + _FP32)
        and (bias is None or cuda_kernel_applies(a, bias, dtypes=_INT8 + OUT_DTYPES))
        and a.shape[0] > 0
        and b.shape[0] > 0
        and a.shape[1] > 0
    ):
        return int8_scaled_mm_triton(a, b, a_scale, b_scale, bias, out_dtype)
    return int8_scaled_mm_ref(a, b, a_scale, b_scale, bias, out_dtype)


@_int8_scaled_mm_op.register_fake
def _(a, b, a_scale, b_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``((a @ bᵀ) * a_scale * b_scale + bias).to(out_dtype)`` with an exact int32 product.

    ``a`` int8 (M, K); ``b`` int8 (N, K) (nn.Linear's weight layout); ``a_scale`` float32
    (M, 1) or one element; ``b_scale`` float32 (N,) or one element; ``bias`` (N,) in
    ``out_dtype`` or float32. Returns (M, N) in ``out_dtype`` (bf16, fp16 or fp32).
    Runs the fused Triton kernel on CUDA (Ampere or newer), the PyTorch reference
    otherwise. Traceable by ``torch.compile(fullgraph=True)``.
    """
    _check_args("int8_scaled_mm", a, b, a_scale, b_scale, bias, out_dtype)
    return _int8_scaled_mm_op(a, b, a_scale, b_scale, bias, out_dtype)


# ----------------------------------------------------------------------------------
# Dynamic int8 linear: per-token activation quantization + int8_scaled_mm
# ----------------------------------------------------------------------------------
def _check_linear_args(name, x, w_int8, w_scale) -> None:
    if x.dtype not in OUT_DTYPES:
        raise TypeError(f"{name} expects x in float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} expects x with at least one dimension (..., K), got a scalar")
    if w_int8.dim() != 2 or w_int8.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{name} expects w_int8 of shape (N, K={x.shape[-1]}), got {tuple(w_int8.shape)} "
            f"for x of shape {tuple(x.shape)}"
        )


def int8_dynamic_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear`` with int8 dynamic per-token activations and an int8 weight.

    ``x`` float (..., K); ``w_int8`` int8 (N, K); ``w_scale`` float32 (N,) (or one
    element); ``bias`` (N,) in x's dtype or float32. Returns x's dtype, shape (..., N).
    """
    _check_linear_args("int8_dynamic_linear", x, w_int8, w_scale)
    K = x.shape[-1]
    q, s = quantize_rows_int8(x.reshape(-1, K))
    out = int8_scaled_mm(q, w_int8, s, w_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], w_int8.shape[0])


def int8_dynamic_linear_ref(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of ``int8_dynamic_linear``: the two references composed."""
    _check_linear_args("int8_dynamic_linear_ref", x, w_int8, w_scale)
    K = x.shape[-1]
    q, s = quantize_rows_int8_ref(x.reshape(-1, K))
    out = int8_scaled_mm_ref(q, w_int8, s, w_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], w_int8.shape[0])
