"""int8 × int8 matmul with a fused dequantization epilogue, and the dynamic int8 linear.

``int8_scaled_mm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16, *,
activation="none", residual=None, out_scale=None)``::

    y   = act((a @ bᵀ as exact int32) * a_scale * b_scale[None, :] + bias) + residual
    out = y.to(out_dtype)                                        # dynamic: bf16/fp16/fp32
    out = clamp(round_half_away(y / out_scale), -127, 127)       # static: out_dtype=torch.int8

- ``a``: int8 (M, K), the quantized activations (one row per token);
- ``b``: int8 (N, K), the quantized weight in ``nn.Linear``'s (out, in) layout, so the
  product is ``a @ bᵀ`` with both operands contiguous along K (what int8 tensor cores
  want: "column-major B");
- ``a_scale``: float32, per token (M, 1) or (M,), or per tensor (one element);
- ``b_scale``: float32, per output channel (N,) or (N, 1), or per tensor (one element);
- ``bias``: optional (N,), in ``out_dtype`` or float32;
- ``out_dtype``: bfloat16, float16 or float32; or ``torch.int8`` with ``out_scale``
  (float32, one element per tensor or (N,) per output channel): the output re-quantized
  in the epilogue (static quantization: the next int8 GEMM reads it directly);
- ``activation``: ``"none"`` or ``"gelu"`` (exact erf GELU, ``nn.GELU()``), applied
  after the bias (an MLP's fc1 then writes GELU'd values, int8 in static mode);
- ``residual``: optional (M, N) float tensor added last (a block's skip connection),
  so the sum is never a separate pass over memory.

The epilogue (int32 → fp32, both scales, bias, GELU, residual, cast or re-quantization) runs in registers on the
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
from .quantize_rows import _round_half_away, quantize_rows_int8, quantize_rows_int8_ref

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ACTIVATIONS = ("none", "gelu")
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
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
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
    if out_dtype not in OUT_DTYPES + (torch.int8,):
        raise TypeError(f"{name} expects out_dtype bfloat16, float16, float32 or int8 (with out_scale), "
                        f"got {out_dtype}")
    if (out_dtype == torch.int8) != (out_scale is not None):
        raise ValueError(f"{name} expects out_scale exactly when out_dtype is torch.int8, got out_dtype "
                         f"{out_dtype} and out_scale {'None' if out_scale is None else 'given'}")
    if out_scale is not None:
        if out_scale.dtype != torch.float32:
            raise TypeError(f"{name} expects a float32 out_scale, got {out_scale.dtype}")
        if not (out_scale.numel() == 1 or tuple(out_scale.shape) in ((N,), (N, 1))):
            raise ValueError(f"{name} expects out_scale of one element (per tensor) or shape ({N},) "
                             f"(per output channel), got shape {tuple(out_scale.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} expects activation in {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        if tuple(residual.shape) != (M, N):
            raise ValueError(f"{name} expects residual of shape ({M}, {N}), got {tuple(residual.shape)}")
        if residual.dtype not in OUT_DTYPES:
            raise TypeError(f"{name} expects a float residual, got {residual.dtype}")
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
        if bias.dtype not in (out_dtype, torch.float32) and not (out_dtype == torch.int8 and bias.dtype in OUT_DTYPES):
            raise TypeError(
                f"{name} expects bias in out_dtype ({out_dtype}) or float32, got {bias.dtype}"
            )
    tensors = [("a", a), ("b", b), ("a_scale", a_scale), ("b_scale", b_scale)]
    for n, t in (("bias", bias), ("residual", residual), ("out_scale", out_scale)):
        if t is not None:
            tensors.append((n, t))
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


def requantize_int8_ref(y: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """Static int8 quantization: ``clamp(round_half_away(y / out_scale), -127, 127)``, in fp32.
    ``out_scale`` broadcasts against y's last dimension (one element, or one per column)."""
    s = out_scale.to(torch.float32)
    s = s.reshape(-1) if s.numel() > 1 else s.reshape(())
    return _round_half_away(y.to(torch.float32) / s).clamp_(-127, 127).to(torch.int8)


def int8_scaled_mm_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference: exact int32 ``a @ bᵀ``, then ``* a_scale * b_scale + bias``, activation,
    ``+ residual`` in fp32; cast to ``out_dtype`` or re-quantized with ``out_scale``."""
    M, N, _ = _check_args("int8_scaled_mm_ref", a, b, a_scale, b_scale, bias, out_dtype, activation,
                          residual, out_scale)
    acc = _exact_int_product(a, b).to(torch.float32)
    out = acc * a_scale.reshape(-1, 1) * b_scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    if activation == "gelu":
        out = torch.nn.functional.gelu(out)
    if residual is not None:
        out = out + residual.to(torch.float32)
    if out_scale is not None:
        return requantize_int8_ref(out, out_scale).reshape(M, N)
    return out.to(out_dtype).reshape(M, N)


# ----------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------
def _m_bucket(M: int) -> int:
    """Autotuning key for M: the next power of two (at least 16), so that a new
    sequence length does not re-run the autotuner (Llama prefill, SAM batch sizes)."""
    return max(16, 1 << max(0, (M - 1).bit_length()))


LARGE_M = 16384  # from this M bucket on, only the big-tile configurations are tried


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner pre-filter: no row tile taller than M's bucket (a 128-row tile for a
    handful of tokens only wastes tuning time); for large M (ViT / SAM encoders at
    batch: tens of thousands of tokens) only the 8-warp tiles of at least 128×128, which
    are the ones that reach the int8 tensor-core rate, so that tuning (and compiling)
    stays short. Always keeps at least one config."""
    M_BUCKET = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= M_BUCKET]
    if M_BUCKET >= LARGE_M:
        kept = [c for c in kept if c.num_warps == 8 and min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 128]
    return kept or list(configs[:1])


if triton_available():
    import triton
    import triton.language as tl

    from .quantize_rows import _round_half_away_tl

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
        # Hopper, large M (ViT-L at batch 512: M = 100k tokens): 4-stage pipelines of
        # 128-deep int8 K tiles (192 KiB of shared memory) and 8 warps (two warpgroups).
        _cfg(128, 256, 128, 8, 4),
        _cfg(256, 128, 128, 8, 4),
        _cfg(128, 128, 128, 8, 4),
        _cfg(256, 64, 128, 4, 4),
    ]

    @triton.autotune(
        configs=_CONFIGS,
        key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def _int8_scaled_mm_kernel(
        a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr, res_ptr, os_ptr,
        M, N, K, M_BUCKET,
        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_as, stride_bs, stride_rm, stride_rn, stride_os,
        HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, OUT_INT8: tl.constexpr,
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
        if ACT_GELU:  # exact GELU, as nn.GELU()
            out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
        c_mask = m_mask[:, None] & n_mask[None, :]
        # 64-bit tile base, 32-bit offsets inside the tile: a 128×256 tile of 64-bit
        # pointers would take most of the registers (and spill) in the epilogue.
        row0 = (pid_m * BLOCK_M).to(tl.int64)
        col0 = pid_n * BLOCK_N
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        if HAS_RESIDUAL:
            r_base = res_ptr + row0 * stride_rm + col0 * stride_rn
            r_ptrs = r_base + (rm[:, None] * stride_rm + rn[None, :] * stride_rn)
            out = out + tl.load(r_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        c_base = c_ptr + row0 * stride_cm + col0 * stride_cn
        c_ptrs = c_base + (rm[:, None] * stride_cm + rn[None, :] * stride_cn)
        if OUT_INT8:  # static quantization of the output: round half away from zero, clamp
            o_s = tl.load(os_ptr + offs_n * stride_os, mask=n_mask, other=1.0)
            v = out / o_s[None, :]
            v = _round_half_away_tl(v)
            v = tl.minimum(tl.maximum(v, -127.0), 127.0)
            tl.store(c_ptrs, v.to(tl.int8), mask=c_mask)
        else:
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


def int8_scaled_mm_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the Triton kernel (tensors on CUDA, or on the CPU under Triton's interpreter)."""
    if not triton_available():
        raise RuntimeError("int8_scaled_mm_triton needs Triton, which is not importable here")
    M, N, K = _check_args("int8_scaled_mm_triton", a, b, a_scale, b_scale, bias, out_dtype, activation,
                          residual, out_scale)
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:  # empty sum: the epilogue of a zero accumulator
        out.copy_(int8_scaled_mm_ref(a, b, a_scale, b_scale, bias, out_dtype, activation=activation,
                                     residual=residual, out_scale=out_scale))
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
    res_arg = residual if residual is not None else out  # any pointer; not read without residual
    o_s = out_scale.reshape(-1) if out_scale is not None else b_s
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(
        _int8_scaled_mm_kernel, grid,
        a, b, a_s, b_s, bias_arg, out, res_arg, o_s,
        M, N, K, _m_bucket(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        a_s.stride(0) if a_s.numel() > 1 else 0,
        b_s.stride(0) if b_s.numel() > 1 else 0,
        res_arg.stride(0), res_arg.stride(1),
        o_s.stride(0) if o_s.numel() > 1 else 0,
        device=a.device, HAS_BIAS=bias is not None, ACT_GELU=activation == "gelu",
        HAS_RESIDUAL=residual is not None, OUT_INT8=out_scale is not None,
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
    activation: str,
    residual: Optional[torch.Tensor],
    out_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    kw = dict(activation=activation, residual=residual, out_scale=out_scale)
    if (
        cuda_kernel_applies(a, b, dtypes=_INT8)
        and cuda_kernel_applies(a, a_scale, b_scale, dtypes=_INT8 + _FP32)
        and all(t is None or cuda_kernel_applies(a, t, dtypes=_INT8 + OUT_DTYPES) for t in (bias, residual, out_scale))
        and a.shape[0] > 0
        and b.shape[0] > 0
        and a.shape[1] > 0
    ):
        return int8_scaled_mm_triton(a, b, a_scale, b_scale, bias, out_dtype, **kw)
    return int8_scaled_mm_ref(a, b, a_scale, b_scale, bias, out_dtype, **kw)


@_int8_scaled_mm_op.register_fake
def _(a, b, a_scale, b_scale, bias, out_dtype, activation, residual, out_scale):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(act((a @ bᵀ) * a_scale * b_scale + bias) + residual).to(out_dtype)``, exact int32 product.

    ``a`` int8 (M, K); ``b`` int8 (N, K) (nn.Linear's weight layout); ``a_scale`` float32
    (M, 1) per token or one element per tensor; ``b_scale`` float32 (N,) per channel or
    one element; ``bias`` (N,) in ``out_dtype`` or float32; ``activation`` "none" or
    "gelu"; ``residual`` (M, N) float. Returns (M, N) in ``out_dtype`` (bf16, fp16 or
    fp32), or int8 re-quantized by ``out_scale`` (one element or (N,)) when
    ``out_dtype=torch.int8``. Runs the fused Triton kernel on CUDA (Ampere or newer),
    the PyTorch reference otherwise. Traceable by ``torch.compile(fullgraph=True)``.
    """
    _check_args("int8_scaled_mm", a, b, a_scale, b_scale, bias, out_dtype, activation, residual, out_scale)
    return _int8_scaled_mm_op(a, b, a_scale, b_scale, bias, out_dtype, activation, residual, out_scale)


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
    *,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear`` with int8 dynamic per-token activations and an int8 weight.

    ``x`` float (..., K); ``w_int8`` int8 (N, K); ``w_scale`` float32 (N,) (or one
    element); ``bias`` (N,) in x's dtype or float32; ``activation`` ("none"/"gelu") and
    ``residual`` (..., N) fused in the GEMM's epilogue. Returns x's dtype, shape (..., N).
    """
    _check_linear_args("int8_dynamic_linear", x, w_int8, w_scale)
    K, N = x.shape[-1], w_int8.shape[0]
    q, s = quantize_rows_int8(x.reshape(-1, K))
    res = None if residual is None else residual.reshape(-1, N)
    out = int8_scaled_mm(q, w_int8, s, w_scale, bias, out_dtype=x.dtype, activation=activation, residual=res)
    return out.reshape(*x.shape[:-1], N)


def int8_dynamic_linear_ref(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: str = "none",
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of ``int8_dynamic_linear``: the two references composed."""
    _check_linear_args("int8_dynamic_linear_ref", x, w_int8, w_scale)
    K, N = x.shape[-1], w_int8.shape[0]
    q, s = quantize_rows_int8_ref(x.reshape(-1, K))
    res = None if residual is None else residual.reshape(-1, N)
    out = int8_scaled_mm_ref(q, w_int8, s, w_scale, bias, out_dtype=x.dtype, activation=activation, residual=res)
    return out.reshape(*x.shape[:-1], N)
