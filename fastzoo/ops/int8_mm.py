"""int8 × int8 matmul with a fused dequantization epilogue, and the dynamic int8 linear.

``int8_scaled_mm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16, *,
activation="none", residual=None, out_scale=None)``::

    y   = act((a @ bᵀ as exact int32) * a_scale * b_scale[None, :] + bias) + residual
    out = y.to(out_dtype)                                        # dynamic: bf16/fp16/fp32
    out = clamp(round(y / out_scale), -127, 127)                 # static: out_dtype=torch.int8 (ties to even)

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

Two kernels, one op: the plain kernel (one program per output tile, pointer loads
pipelined by ``num_stages``; Ampere, small M, Triton's interpreter) and, on Hopper
(capability 9.x) for M >= ``TMA_MIN_M`` with TMA-compatible strides (16-byte aligned
rows, contiguous last dimension), a persistent kernel: NUM_SMS · OCC programs walk the
output tiles in grouped order; a and b tiles arrive by TMA (host-side tensor descriptors,
no global allocator), the tile and K loops are flattened into one software pipeline (the
next tile's loads in flight during the epilogue), the epilogue runs on column parts of the
tile and writes by TMA; configurations with two or three CTAs per SM let one CTA's
epilogue overlap another's MMAs. ``int8_scaled_mm_triton(..., persistent=...)`` forces
either kernel.

Cost of the kernel: 2·M·N·K integer ops; reads M·K + N·K bytes (plus re-reads from
L2 across tiles), writes M·N·sizeof(out_dtype) bytes. Autotuning is keyed on
(next power of two of M, N, K) (and, for the persistent kernel, the epilogue), so a new
token count reuses its bucket's choice.

Not done yet: fusing the per-row quantization of x into the GEMM's prologue (today
``int8_dynamic_linear`` writes int8 x and its scales once, then the GEMM reads them).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ._common import _capability, cuda_kernel_applies, launch, short_bench, triton_available
from .quantize_rows import quantize_rows_int8, quantize_rows_int8_ref, round_clamp_int8_ref

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
    """Static int8 quantization: ``clamp(round(y / out_scale), -127, 127)`` (ties to even), in fp32.
    ``out_scale`` broadcasts against y's last dimension (one element, or one per column)."""
    s = out_scale.to(torch.float32)
    s = s.reshape(-1) if s.numel() > 1 else s.reshape(())
    return round_clamp_int8_ref(y.to(torch.float32) / s)


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

    from .quantize_rows import _round_clamp_int8_tl

    @triton.jit
    def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """(row tile, column tile) of output tile ``tile_id`` in grouped order: GROUP_M
        row-tiles share the same column-tiles of b while they are hot in L2."""
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = tile_id // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _dequantize_tile(acc, a_s, b_s, bias, HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr):
        """fp32 epilogue values of an int32 accumulator tile: ``act(acc · a_s · b_s + bias)``
        (a_s per row, b_s and bias per column; bias ignored without HAS_BIAS)."""
        out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            out = out + bias[None, :]
        if ACT_GELU:
            out = _gelu(out)
        return out

    @triton.jit
    def _gelu(x):
        """GELU as ``nn.GELU()`` (erf form) to fp32 rounding: x·Φ(x) with ``h = Φ(−|x|) =
        2^p(t)``, t = min(|x|, 6.5), p a degree-7 polynomial with p(0) = −1 (a least-squares
        fit on Chebyshev nodes of log2(erfc(t/√2)/2), t ∈ [0, 6.5], coefficients rounded to
        fp32), Φ(x) = 1 − h for x ≥ 0 and h for x < 0, so the negative tail keeps its relative
        accuracy down to x = −6.5 (1e-5 to −6, 2e-5 to −6.5); below −6.5 the result is
        x·Φ(−6.5) (|·| < 4.1e-11·|x|, as the exact value's), and −inf gives −inf (torch: NaN).
        Max absolute error (relative above 1) 7e-7 against float64 for |x| ≤ 1e4 (torch's own
        fp32 GELU: 3e-7; below −6.5 the error is under 4.1e-11·|x|);
        ``tests/ops/test_int8_mm.py`` checks the bounds. One ex2 and 13 ALU operations against
        libdevice erf's ~35 with two MUFU (in fc1's epilogue, GELU and int8 out, erf was most
        of the epilogue's time), and four fewer than a degree-11 fit over [0, 9], which the
        int8 or bf16 output cannot resolve."""
        t = tl.minimum(tl.abs(x), 6.5)
        p = -1.7635135236560018e-06 * t + 6.008596028550528e-05
        p = p * t - 0.0009179245680570602
        p = p * t + 0.008455728180706501
        p = p * t - 0.053848426789045334
        p = p * t - 0.45858052372932434
        p = p * t - 1.15120267868042
        p = p * t - 1.0
        h = tl.math.exp2(p)
        return x * tl.where(x < 0, h, 1.0 - h)

    @triton.jit
    def _requantize_tile(out, inv_scale):
        """Static int8 output: ``clamp(round(out / scale), -127, 127)`` (ties to even, as the
        reference) with the reciprocal of the per-column scale (one reciprocal per column, not
        per element) and ``_round_clamp_int8_tl``: four FP32 ALU operations an element (the
        half-away rounding it replaces took eleven, about a third of the ALU operations of
        fc1's GELU epilogue). ±inf clamp to ±127; NaN gives −127 (the reference's cast of NaN
        is undefined)."""
        return _round_clamp_int8_tl(out * inv_scale[None, :])

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
        do_bench=short_bench,
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
        pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

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
        bias = b_s
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out = _dequantize_tile(acc, a_s, b_s, bias, HAS_BIAS, ACT_GELU)
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
        if OUT_INT8:  # static quantization of the output: round to nearest (ties to even), clamp
            o_s = tl.load(os_ptr + offs_n * stride_os, mask=n_mask, other=1.0)
            tl.store(c_ptrs, _requantize_tile(out, 1.0 / o_s), mask=c_mask)
        else:
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


    # ------------------------------------------------------------------------------
    # Hopper: persistent kernel, TMA tensor descriptors
    # ------------------------------------------------------------------------------
    @triton.jit
    def _tma_epilogue_part(acc, a_s, off_m, off_n, N, bs_ptr, bias_ptr, os_ptr, c_desc, r_desc,
                           stride_bs, stride_os, HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, OUT_INT8: tl.constexpr, PART_N: tl.constexpr):
        """Epilogue of one (BLOCK_M, PART_N) part of an output tile at (off_m, off_n): the
        per-column vectors by pointer (masked), the residual by TMA (zero-padded), the
        output by a TMA store (clipped at the tensor's edges)."""
        offs_n = off_n + tl.arange(0, PART_N)
        n_mask = offs_n < N
        b_s = tl.load(bs_ptr + offs_n * stride_bs, mask=n_mask, other=0.0)
        bias = b_s
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out = _dequantize_tile(acc, a_s, b_s, bias, HAS_BIAS, ACT_GELU)
        if HAS_RESIDUAL:
            out = out + r_desc.load([off_m, off_n]).to(tl.float32)
        if OUT_INT8:
            o_s = tl.load(os_ptr + offs_n * stride_os, mask=n_mask, other=1.0)
            c_desc.store([off_m, off_n], _requantize_tile(out, 1.0 / o_s))
        else:
            c_desc.store([off_m, off_n], out.to(c_desc.dtype))

    @triton.jit
    def _int8_scaled_mm_tma_kernel(
        a_desc, b_desc, c_desc, r_desc, as_ptr, bs_ptr, bias_ptr, os_ptr,
        M, N, K, M_BUCKET, stride_as, stride_bs, stride_os, out_bytes,  # M_BUCKET, out_bytes: tuning keys
        NUM_SMS: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, OUT_INT8: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        OCC: tl.constexpr, SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr,
        FLOAT_AB: tl.constexpr = False, DOT_F32: tl.constexpr = False,
    ):
        # Persistent: NUM_SMS · OCC programs (OCC per SM) walk the output tiles in grouped
        # order with a stride of the program count. a (M, K) and b (N, K) tiles arrive by
        # TMA into swizzled shared memory (zeros past the edges: no masks, any K), the
        # int32 accumulator stays in registers (wgmma), and the epilogue runs on SUBTILE
        # column parts of the tile (fewer live fp32 registers, TMA stores of each part).
        # FLATTEN lets the compiler fuse the tile and K loops into one software pipeline,
        # so the next tile's first loads are in flight during this tile's epilogue.
        start = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        num_tiles = num_pid_m * num_pid_n
        NUM_PROGS: tl.constexpr = NUM_SMS * OCC
        PART_N: tl.constexpr = BLOCK_N // SUBTILE
        # The epilogue's tile index is kept apart from the loop's (a separate counter), so
        # that the flattened loop does not carry tile coordinates across its stages.
        tile_epi = start - NUM_PROGS
        for tile_id in tl.range(start, num_tiles, NUM_PROGS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
            pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
            off_am = pid_m * BLOCK_M
            off_bn = pid_n * BLOCK_N
            # FLOAT_AB: bf16/fp16 a and b (``linear_act``), an fp32 accumulator (scales of 1);
            # DOT_F32: operands widened first (Triton's interpreter, whose bf16 dot is wrong)
            if FLOAT_AB:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for ki in range(k_tiles):
                off_k = ki * BLOCK_K
                a = a_desc.load([off_am, off_k])
                b = b_desc.load([off_bn, off_k])
                if DOT_F32:
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc)
                elif FLOAT_AB:
                    acc = tl.dot(a, b.T, acc)
                else:
                    acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)

            tile_epi += NUM_PROGS
            pid_m, pid_n = _tile_coords(tile_epi, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            offs_m = off_m + tl.arange(0, BLOCK_M)
            a_s = tl.load(as_ptr + offs_m * stride_as, mask=offs_m < M, other=0.0)
            if SUBTILE == 1:
                _tma_epilogue_part(acc, a_s, off_m, off_n, N, bs_ptr, bias_ptr, os_ptr, c_desc, r_desc, stride_bs,
                                   stride_os, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8, PART_N)
            else:
                # columns [0, BLOCK_N/2) and [BLOCK_N/2, BLOCK_N) of the tile
                halves = tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)).permute(0, 2, 1)
                acc0, acc1 = tl.split(halves)
                if SUBTILE == 2:
                    _tma_epilogue_part(acc0, a_s, off_m, off_n, N, bs_ptr, bias_ptr, os_ptr, c_desc, r_desc,
                                       stride_bs, stride_os, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8, PART_N)
                    _tma_epilogue_part(acc1, a_s, off_m, off_n + PART_N, N, bs_ptr, bias_ptr, os_ptr, c_desc,
                                       r_desc, stride_bs, stride_os, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8,
                                       PART_N)
                else:  # SUBTILE == 4: each half split again
                    q0, q1 = tl.split(tl.reshape(acc0, (BLOCK_M, 2, PART_N)).permute(0, 2, 1))
                    _tma_epilogue_part(q0, a_s, off_m, off_n, N, bs_ptr, bias_ptr, os_ptr, c_desc, r_desc,
                                       stride_bs, stride_os, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8, PART_N)
                    _tma_epilogue_part(q1, a_s, off_m, off_n + PART_N, N, bs_ptr, bias_ptr, os_ptr, c_desc,
                                       r_desc, stride_bs, stride_os, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8,
                                       PART_N)
                    q2, q3 = tl.split(tl.reshape(acc1, (BLOCK_M, 2, PART_N)).permute(0, 2, 1))
                    _tma_epilogue_part(q2, a_s, off_m, off_n + 2 * PART_N, N, bs_ptr, bias_ptr, os_ptr, c_desc,
                                       r_desc, stride_bs, stride_os, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8,
                                       PART_N)
                    _tma_epilogue_part(q3, a_s, off_m, off_n + 3 * PART_N, N, bs_ptr, bias_ptr, os_ptr, c_desc,
                                       r_desc, stride_bs, stride_os, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8,
                                       PART_N)

    def _tma_block_shapes(nargs):
        """Autotuner pre-hook: the TMA descriptors' block shapes follow the configuration."""
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        part_n = bn // nargs["SUBTILE"]
        nargs["a_desc"].block_shape = [bm, bk]
        nargs["b_desc"].block_shape = [bn, bk]
        nargs["c_desc"].block_shape = [bm, part_n]
        nargs["r_desc"].block_shape = [bm, part_n]

    def _tma_cfg(bm, bn, bk, warps, stages, occ=1, sub=2, flatten=True, ws=False, group=8, maxnreg=None):
        return triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "OCC": occ, "SUBTILE": sub,
             "FLATTEN": flatten, "WARP_SPEC": ws},
            num_warps=warps, num_stages=stages, maxnreg=maxnreg, pre_hook=_tma_block_shapes,
        )

    def tma_config_name(cfg) -> str:
        """Short name of a persistent-kernel configuration, e.g. ``128x256x128_w8_s4_o1_sub2_flat``."""
        kw = cfg.kwargs
        name = (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}_w{cfg.num_warps}_s{cfg.num_stages}"
                f"_o{kw['OCC']}_sub{kw['SUBTILE']}")
        name += "_flat" if kw["FLATTEN"] else ""
        name += "_ws" if kw["WARP_SPEC"] else ""
        name += f"_g{kw['GROUP_M']}" if kw["GROUP_M"] != 8 else ""
        name += f"_r{cfg.maxnreg}" if cfg.maxnreg else ""
        return name

    # Every candidate of the Hopper persistent kernel, timed one by one by
    # ``experiments.bench_int8_mm --sweep`` (int8 K tiles of 64 or 128 bytes: TMA rows of
    # one 64/128-byte swizzle). Shared memory per CTA: see ``tma_shared_bytes``. OCC > 1
    # asks for several CTAs per SM (each under its share of the SM's 228 KiB; maxnreg
    # where their threads would otherwise not fit the register file), so that one CTA's
    # epilogue (GELU, int/float conversions) overlaps another's MMAs.
    TMA_SWEEP_CONFIGS = [
        # one CTA per SM, big tiles: 2 consumer warpgroups of 64 rows (or 128 rows)
        _tma_cfg(128, 256, 128, 8, 4, sub=2),
        _tma_cfg(128, 256, 128, 8, 4, sub=4),
        _tma_cfg(128, 256, 128, 8, 3, sub=2),
        _tma_cfg(128, 256, 128, 8, 4, sub=2, flatten=False),
        _tma_cfg(256, 128, 128, 8, 4, sub=2),
        _tma_cfg(256, 128, 128, 8, 3, sub=1),
        _tma_cfg(128, 256, 64, 8, 6, sub=2),
        _tma_cfg(128, 128, 128, 8, 4, sub=1),
        _tma_cfg(128, 128, 128, 4, 4, sub=2),
        # several CTAs per SM: the epilogue of one overlapping the mainloop of another
        _tma_cfg(128, 128, 128, 8, 3, occ=2, sub=2, maxnreg=128),
        _tma_cfg(128, 128, 128, 8, 3, occ=2, sub=4, maxnreg=128),
        _tma_cfg(128, 128, 128, 4, 3, occ=2, sub=2),
        _tma_cfg(128, 128, 64, 8, 4, occ=2, sub=4, maxnreg=128),
        _tma_cfg(128, 128, 64, 4, 4, occ=2, sub=2),
        _tma_cfg(64, 128, 128, 4, 2, occ=3, sub=2, maxnreg=168),
        # one warpgroup per CTA on the widest wgmma (m64n256), two CTAs per SM
        _tma_cfg(64, 256, 64, 4, 4, occ=2, sub=2),
        _tma_cfg(64, 256, 128, 4, 2, occ=2, sub=2),
        # tl.range(warp_specialize=True): on sm_90 Triton 3.6/3.8 leave this loop as it
        # is (no partitions in the TTGIR, checked ahead of time); timed to confirm
        _tma_cfg(128, 256, 128, 8, 4, sub=2, flatten=False, ws=True),
    ]
    # What the autotuner tries at run time (the first is the default): sweep candidates
    # that compile for sm_90 on Triton 3.6 and 3.8 (checked ahead of time), a big tile and
    # tiles for two CTAs per SM; ``_prune_tma`` drops those whose shared memory cannot fit
    # the call's epilogue buffers.
    # The 4 configurations that together are the best of the sweep in each of its 12 cases (4
    # ViT-L shapes x 3 epilogues) on an H200 (experiments/results/h200/int8_mm_sweep.json),
    # and the autotuner's choice for qkv with an int8 output before that sweep.
    _TMA_AUTOTUNE_NAMES = (
        "128x128x128_w4_s3_o2_sub2_flat",
        "128x128x128_w8_s3_o2_sub4_flat_r128",
        "128x128x128_w8_s3_o2_sub2_flat_r128",
        "128x256x128_w8_s4_o1_sub4_flat",
        "64x256x64_w4_s4_o2_sub2_flat",
    )
    _TMA_CONFIGS = [c for n in _TMA_AUTOTUNE_NAMES for c in TMA_SWEEP_CONFIGS if tma_config_name(c) == n]
    # Triton's interpreter (the CPU tests): small tiles, several tiles per program.
    TMA_INTERPRETER_CONFIGS = [
        _tma_cfg(32, 32, 32, 4, 2, sub=2),
        _tma_cfg(16, 64, 32, 4, 2, sub=4, flatten=False),
        _tma_cfg(32, 16, 64, 4, 2, sub=1),
    ]
    TMA_INTERPRETER_PROGRAMS = 3  # NUM_SMS stand-in on the CPU: programs loop over several tiles

    def _prune_tma(configs, named_args, **kwargs):
        """Autotuner pre-filter: only the configurations whose shared memory (operand
        pipeline, output and residual tiles) fits one CTA, and its share of the SM when
        OCC > 1; always at least one."""
        out_bytes = named_args["c_desc"].base.element_size()
        res_bytes = named_args["r_desc"].base.element_size() if kwargs.get("HAS_RESIDUAL") else 0
        in_bytes = named_args["a_desc"].base.element_size()
        kept = [c for c in configs if tma_shared_bytes(c, out_bytes, res_bytes, in_bytes) <= _tma_shared_limit(c)]
        return kept or list(configs[:1])

    _int8_scaled_mm_tma = triton.autotune(
        configs=_TMA_CONFIGS,
        key=["M_BUCKET", "N", "K", "out_bytes", "HAS_BIAS", "ACT_GELU", "HAS_RESIDUAL", "OUT_INT8", "NUM_SMS"],
        prune_configs_by={"early_config_prune": _prune_tma},
        do_bench=short_bench,
    )(_int8_scaled_mm_tma_kernel)

    # Candidates of the same kernel on bf16/fp16 operands (``fastzoo.ops.linear_act``): K tiles
    # of 64 elements (128 bytes, one TMA swizzle row), twice the shared memory per stage of
    # int8's; timed one by one by ``experiments.bench_linear_act --sweep``.
    TMA_FLOAT_SWEEP_CONFIGS = [
        _tma_cfg(128, 256, 64, 8, 3, sub=2),
        _tma_cfg(128, 256, 64, 8, 3, sub=4),
        _tma_cfg(128, 256, 64, 8, 4, sub=4),
        _tma_cfg(256, 128, 64, 8, 3, sub=2),
        _tma_cfg(256, 128, 64, 8, 4, sub=4),
        _tma_cfg(128, 128, 64, 8, 4, sub=2),
        _tma_cfg(128, 128, 64, 8, 5, sub=2),
        _tma_cfg(128, 128, 64, 8, 6, sub=4),
        _tma_cfg(128, 128, 64, 4, 3, occ=2, sub=2),
        _tma_cfg(128, 128, 64, 8, 3, occ=2, sub=4, maxnreg=128),
        _tma_cfg(64, 256, 64, 4, 2, occ=2, sub=2),
        _tma_cfg(128, 256, 64, 8, 3, sub=2, group=16),
        _tma_cfg(128, 256, 64, 8, 3, sub=2, flatten=False),
        _tma_cfg(128, 256, 64, 8, 3, sub=2, group=32),
        _tma_cfg(128, 256, 64, 8, 3, sub=4, group=16),
        _tma_cfg(256, 128, 64, 8, 3, sub=2, group=16),
        _tma_cfg(128, 128, 64, 4, 3, occ=2, sub=2, group=16),
        _tma_cfg(128, 128, 64, 4, 3, occ=2, sub=4, group=16),
    ]
    # What the autotuner tries at run time: the sweep's winners at SAM vit_b / vit_h and ViT-L
    # MLP shapes on an H100 (experiments/results/h100-80gb-hbm3/linear_act_sweep*.json; two
    # sweeps, which differ by up to ~5 % per config): GROUP_M 16 for the big tiles (lin2,
    # fc2, most lin1), two CTAs per SM where the GELU epilogue dominates (vit_b's lin1).
    _TMA_FLOAT_AUTOTUNE_NAMES = (
        "128x256x64_w8_s3_o1_sub2_flat_g16",
        "128x128x64_w4_s3_o2_sub2_flat",
        "128x256x64_w8_s3_o1_sub2_flat",
        "256x128x64_w8_s3_o1_sub2_flat",
        "128x256x64_w8_s4_o1_sub4_flat",
    )
    TMA_FLOAT_CONFIGS = [c for n in _TMA_FLOAT_AUTOTUNE_NAMES for c in TMA_FLOAT_SWEEP_CONFIGS
                         if tma_config_name(c) == n]
    assert len(TMA_FLOAT_CONFIGS) == len(_TMA_FLOAT_AUTOTUNE_NAMES), "a float autotune name matches no candidate"
    _float_mm_tma = triton.autotune(
        configs=TMA_FLOAT_CONFIGS,
        key=["M_BUCKET", "N", "K", "out_bytes", "HAS_BIAS", "ACT_GELU", "HAS_RESIDUAL", "NUM_SMS"],
        prune_configs_by={"early_config_prune": _prune_tma},
        do_bench=short_bench,
    )(_int8_scaled_mm_tma_kernel)

# ----------------------------------------------------------------------------------
# Hopper fast path: persistent TMA kernel
# ----------------------------------------------------------------------------------
TMA_MIN_M = 4096  # below, the plain kernel (fewer tiles than a few waves of SMs)
SM90_SHARED_PER_SM = 228 * 1024  # H100 / H200: 228 KiB per SM, at most 227 KiB per CTA,
SM90_SHARED_PER_CTA = 227 * 1024  # 1 KiB of each CTA's share reserved by the system


def tma_shared_bytes(cfg, out_bytes: int, res_bytes: int = 0, in_bytes: int = 1) -> int:
    """Shared memory of a persistent-kernel configuration: the operand pipeline (stages ·
    (BLOCK_M + BLOCK_N) · BLOCK_K elements of ``in_bytes``: 1 for int8), the TMA store buffer
    of one output part and, with a residual, its TMA load buffer (BLOCK_M × BLOCK_N / SUBTILE
    each); what Triton allocates is this plus barriers and alignment padding (about 1 KiB at
    most, checked ahead of time)."""
    kw = cfg.kwargs
    part = kw["BLOCK_M"] * kw["BLOCK_N"] // kw["SUBTILE"]
    return (cfg.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * in_bytes
            + part * (out_bytes + res_bytes))


def _tma_shared_limit(cfg) -> int:
    """Shared memory one CTA may use so that OCC of them share an SM."""
    occ = cfg.kwargs["OCC"]
    return min(SM90_SHARED_PER_CTA, SM90_SHARED_PER_SM // occ - 1024)


@functools.lru_cache(maxsize=None)
def _tma_api() -> bool:
    """Whether this Triton has host-side TMA descriptors and ``tl.range``'s ``flatten`` /
    ``warp_specialize`` (Triton >= 3.4; the GPU's 3.6 and this repo's 3.8 both do)."""
    if not triton_available():
        return False
    try:
        import inspect

        import triton.language as tl
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    params = inspect.signature(tl.range.__init__).parameters
    return "flatten" in params and "warp_specialize" in params


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tma_ok(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can address: 16-byte aligned base and row stride, unit last stride."""
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


def _tma_path_applies(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """The persistent TMA kernel runs on Hopper (capability 9.x) for M >= TMA_MIN_M when
    every matrix has TMA-compatible strides; anything else takes the plain kernel."""
    if not (a.is_cuda and a.shape[0] >= TMA_MIN_M and _tma_api()):
        return False
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if _capability(index)[0] != 9:
        return False
    return all(_tma_ok(t) for t in (a, b, out) + (() if residual is None else (residual,)))


def _int8_scaled_mm_tma_launch(a, b, a_s, b_s, bias, out, residual, o_s, activation, config=None,
                               return_kernel=False):
    """Launch the persistent TMA kernel into ``out`` (arguments already checked and laid
    out: a, b, out, residual TMA-compatible; a_s, b_s, o_s flat; bias contiguous). a and b
    int8, or both bf16/fp16 (``linear_act``: an fp32 accumulator, a_s and b_s ones).
    ``config``: one of ``TMA_SWEEP_CONFIGS`` / ``TMA_INTERPRETER_CONFIGS`` to run it
    without the autotuner (the sweep, the CPU tests); None: autotuned on CUDA.
    Returns ``out``, or ``(out, compiled kernel)`` with ``return_kernel`` (its registers,
    spills and shared memory, for the sweep's record)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = b.shape[0]

    def desc(t):  # block shape set by the configuration's pre-hook
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])

    c_desc = desc(out)
    descs = {"a_desc": desc(a), "b_desc": desc(b), "c_desc": c_desc,
             "r_desc": desc(residual) if residual is not None else c_desc}
    num_sms = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device()) \
        if a.is_cuda else TMA_INTERPRETER_PROGRAMS
    args = (descs["a_desc"], descs["b_desc"], descs["c_desc"], descs["r_desc"], a_s, b_s,
            bias if bias is not None else b_s, o_s if o_s is not None else b_s,
            M, N, K, _m_bucket(M),
            a_s.stride(0) if a_s.numel() > 1 else 0,
            b_s.stride(0) if b_s.numel() > 1 else 0,
            o_s.stride(0) if o_s is not None and o_s.numel() > 1 else 0,
            out.element_size())
    float_ab = a.dtype != torch.int8  # bf16/fp16 operands (linear_act): an fp32 accumulator
    flags = dict(NUM_SMS=num_sms, HAS_BIAS=bias is not None, ACT_GELU=activation == "gelu",
                 HAS_RESIDUAL=residual is not None, OUT_INT8=o_s is not None,
                 FLOAT_AB=float_ab, DOT_F32=float_ab and not a.is_cuda)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(meta["NUM_SMS"] * meta["OCC"], tiles),)

    if config is None and a.is_cuda:
        kernel = (_float_mm_tma if float_ab else _int8_scaled_mm_tma)[grid](*args, **flags)
    else:
        config = config if config is not None else TMA_INTERPRETER_CONFIGS[0]
        kwargs = {**flags, **config.all_kwargs()}
        _tma_block_shapes({**descs, **kwargs})
        kernel = _int8_scaled_mm_tma.fn[grid](*args, **kwargs)
    return (out, kernel) if return_kernel else out

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
    persistent: Optional[bool] = None,
    gluon: Optional[bool] = None,
) -> torch.Tensor:
    """Launch the Triton kernel (tensors on CUDA, or on the CPU under Triton's interpreter).

    ``persistent``: None picks the kernel (the persistent TMA kernel on Hopper for
    M >= ``TMA_MIN_M`` with TMA-compatible strides, the plain kernel otherwise); False
    forces the plain kernel; True the persistent one (raises where TMA cannot address the
    tensors; on CPU tensors it runs under the interpreter with its first test tile).
    ``gluon``: which persistent kernel. None: the Gluon kernel with asynchronous wgmma
    (``fastzoo.ops.int8_mm_gluon``) on CUDA where it applies, else the ``tl`` one; False:
    the ``tl`` kernel; True: the Gluon kernel (raises where it does not apply)."""
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
    if gluon and persistent is False:
        raise ValueError("int8_scaled_mm_triton: gluon=True is a persistent kernel; persistent=False contradicts it")
    if gluon and persistent is None:
        persistent = True  # the Gluon kernel is persistent: the TMA conditions below apply to it
    if persistent is None:
        persistent = _tma_path_applies(a, b, out, residual)
    elif persistent and not (_tma_api() and all(_tma_ok(t) for t in (a, b, out) + ((residual,) if residual is not None
                                                                                   else ()))):
        raise ValueError("int8_scaled_mm_triton(persistent=True) needs Triton >= 3.4 and 2-D a, b, out and residual "
                         "with 16-byte aligned rows and a contiguous last dimension (TMA), got strides "
                         f"a {a.stride()}, b {b.stride()}, out {out.stride()}"
                         + (f", residual {residual.stride()}" if residual is not None else ""))
    if persistent:  # Hopper, large M: a persistent TMA kernel
        o_s = out_scale.reshape(-1) if out_scale is not None else None
        from .int8_mm_gluon import gluon_path_applies, int8_mm_gluon_launch

        applies = gluon_path_applies(a, out, residual)
        if gluon and not applies:
            raise ValueError("int8_scaled_mm_triton(gluon=True) needs CUDA tensors on a Hopper GPU, Triton with Gluon "
                             "(>= 3.5), a bf16, fp16 or int8 output and a residual of the output's dtype; got device "
                             f"{a.device}, output {out.dtype}, residual {None if residual is None else residual.dtype}")
        if applies and gluon is not False:
            return int8_mm_gluon_launch(a, b, a_s, b_s, None if bias is None else bias_arg, out, residual, o_s,
                                        activation)
        return _int8_scaled_mm_tma_launch(a, b, a_s, b_s, None if bias is None else bias_arg, out, residual, o_s,
                                          activation)
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
