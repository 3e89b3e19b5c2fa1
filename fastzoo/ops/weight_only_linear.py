"""Bandwidth-bound linears for LLM decode: bf16, int8 weight-only and int4 weight-only.

At decode time (1 to 16 tokens) a linear layer reads every weight once per step and
does almost no arithmetic per byte, so its speed is the weight bytes over the memory
bandwidth. The kernels here are built for that regime:

- each weight byte is read exactly once, with loads contiguous along K;
- int8 / int4 weights are dequantized in registers (never written back as bf16);
- fp32 accumulation; the few rows of ``x`` are re-read per K block (they stay in L1/L2);
- one program per ``BLOCK_N`` output columns and per K slice (split-K) so that even
  N = 4096 fills the GPU. The splits reduce themselves in the same launch: each stores its
  fp32 partial tile, then bumps an arrival counter of its output tile; the last to arrive
  sums the partials in split order (deterministic), adds the bias, writes the output in
  x's dtype and resets the counter to zero. No zeroed workspace, no cast kernel: one
  launch per linear. (The counters live in a small zeroed int32 buffer per device; the
  launches of one device must not run concurrently on two streams.)
- on Hopper and newer, programmatic dependent launch: the bf16 / int8 one-row GEMV lets
  the next launch once all its programs have started (``griddepcontrol.launch_dependents``),
  so a kernel starts while the previous one drains; it requests its first weight tile, then
  ``griddepcontrol.wait`` orders its reads of x after the previous kernel's writes.
- one token (M = 1): a GEMV whose accumulator is a (BLOCK_N, BLOCK_K) fp32 tile reduced
  once at the end; 2 to 16 tokens: a 16-row ``tl.dot`` (tensor cores, rows past M are
  masked). Autotuned per (M bucket, N, K) over tile sizes, split-K, warps and stages.
  int4 with groups of 128 or more on CUDA: one to 16 tokens on the tensor cores through
  inline ``mma.sync`` with the nibbles turned into 16-bit floats by bit operations
  (``_int4_mma_kernel``; one token on Hopper: the Gluon GEMV, ``int4_gemv_gluon``).

Ops (each: ``<op>_ref``, ``<op>_triton``, public ``<op>`` = ``torch.ops.fastzoo.<op>``):

``decode_linear(x, w, bias=None)``
    ``F.linear(x, w, bias)``; x (..., K) bf16/fp16 (or fp32: reference only), w (N, K)
    of x's dtype. Kernel for at most 16 rows; ``F.linear`` (cuBLAS) otherwise.
``int8_weight_only_linear(x, w_int8, scales, bias=None)``
    ``F.linear(x, w_int8.to(x.dtype)) * scales + bias``; w_int8 (N, K) int8, scales (N,)
    float. Kernel for at most 16 rows; dequantize + ``F.linear`` otherwise (prefill).
``int4_weight_only_linear(x, w_packed, scales, zeros, group_size, bias=None)``
    W4A16, the layout of ``fastzoo.quant.Int4WeightOnlyLinear``: w_packed uint8 (N, K/2)
    with column 2j in the low nibble and 2j+1 in the high nibble; scales and zeros
    (N, K/group_size) float; w[n, k] = q[n, k] · scales[n, k // g] + zeros[n, k // g].
    Kernel for at most 16 rows; dequantize + ``F.linear`` otherwise.

``decode_linear``, ``int8_weight_only_linear`` and ``int4_weight_only_linear`` take
keyword-only fusions (default: none, the plain linear): ``norm_weight`` (K,) with ``norm_eps``: the product's input is
RMSNorm(x) (``rms_norm_ref``: the model's RMSNorm); ``glu=True``: x holds 2K columns
[a | b] and the input is silu(a)·b (before the norm where both are given); ``residual``
(..., N) in x's dtype: added to the output. In the kernel the prologue works per K block
(the norm weight times x, Σx² from the same loads) and the epilogue applies the row
factor rsqrt(Σx²/K + eps) (it factors out of the dot) and the residual; with split-K each
split stores its partial Σx² next to its partial tile and the reducing split combines
them. All in fp32 without the reference's intermediate roundings to x's dtype (after
silu·mul, the normalisation, the product), so the two agree to x's dtype's rounding. (The
2–16-row path feeds tl.dot x · norm weight in x's dtype, before the row factor: in fp16 it
must stay below 65504.) int4 runs them in its one-row Hopper kernel (``int4_gemv_gluon``:
the product's input, x · norm weight rounded to x's dtype as there, staged in shared
memory; the same fp16 bound) and composes them in PyTorch around its other kernels.

All accept leading batch dims on ``x`` and return x's dtype, shape (..., N). The
kernels compute in fp32 and round once (the reference rounds after the matmul, the
scale and the bias in x's dtype), so they agree with an fp32 computation on the same
dequantized weights to the output dtype's rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (arrival_counters, cuda_kernel_applies, gdc_launch_dependents, gdc_wait, int8_to_f32, launch,
                      next_pow2, pdl_options, short_bench, triton_available, unit_stride_last)

MAX_KERNEL_ROWS = 16  # flattened rows of x up to which the decode kernels run
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_MMA_MIN_GROUP = 128  # the one-row tensor-core int4 kernel: a 128-column segment in one group


# ----------------------------------------------------------------------------------
# Argument checks (errors name what was expected and what was found)
# ----------------------------------------------------------------------------------
def _check_x(name: str, x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects x to be a tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"{name} expects x in bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} expects x of shape (..., K), got a scalar")
    return x.shape[-1]


def _check_bias(name: str, x: torch.Tensor, bias: Optional[torch.Tensor], N: int) -> None:
    if bias is None:
        return
    if tuple(bias.shape) != (N,):
        raise ValueError(f"{name} expects bias of shape ({N},), got shape {tuple(bias.shape)}")
    if bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} expects bias in x's dtype ({x.dtype}) or float32, got {bias.dtype}")


def _check_devices(name: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {k: t for k, t in tensors.items() if t is not None}
    if len({t.device for t in present.values()}) > 1:
        found = ", ".join(f"{k} on {t.device}" for k, t in present.items())
        raise ValueError(f"{name} expects all tensors on one device, got {found}")


def _gemv_k(name: str, x: torch.Tensor, glu: bool) -> int:
    """K of the product: x's last dim, or half of it with ``glu`` (x holds [a | b])."""
    K = _check_x(name, x)
    if glu and K % 2:
        raise ValueError(f"{name} with glu=True expects x of shape (..., 2K) ([a | b]), got an odd last dim "
                         f"in {tuple(x.shape)}")
    return K // 2 if glu else K


def _glu_note(x: torch.Tensor, glu: bool) -> str:
    return f" (glu=True: x of shape {tuple(x.shape)} holds [a | b])" if glu else f" for x of shape {tuple(x.shape)}"


def _check_fusion(name, x, N, K, norm_weight, norm_eps, residual) -> None:
    """The prologue / epilogue options: norm_weight (K,) float, residual (..., N) in x's dtype."""
    if norm_weight is not None:
        if tuple(norm_weight.shape) != (K,):
            raise ValueError(f"{name} expects norm_weight of shape (K,) = ({K},), got {tuple(norm_weight.shape)}")
        if norm_weight.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} expects norm_weight in x's dtype ({x.dtype}) or float32, got {norm_weight.dtype}")
        if not norm_eps >= 0:
            raise ValueError(f"{name} expects norm_eps >= 0, got {norm_eps}")
    if residual is not None:
        want = (*x.shape[:-1], N)
        if tuple(residual.shape) != want:
            raise ValueError(f"{name} expects residual of shape {want}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{name} expects residual in x's dtype ({x.dtype}), got {residual.dtype}")
    _check_devices(name, x=x, norm_weight=norm_weight, residual=residual)


def _check_float_args(name, x, w, bias, glu=False) -> tuple[int, int]:
    K = _gemv_k(name, x, glu)
    if w.dim() != 2 or w.shape[1] != K:
        raise ValueError(f"{name} expects w of shape (N, K={K}), got {tuple(w.shape)}{_glu_note(x, glu)}")
    if w.dtype != x.dtype:
        raise TypeError(f"{name} expects w in x's dtype ({x.dtype}), got {w.dtype}")
    N = w.shape[0]
    _check_bias(name, x, bias, N)
    _check_devices(name, x=x, w=w, bias=bias)
    return N, K


def _check_int8_args(name, x, w_int8, scales, bias, glu=False) -> tuple[int, int]:
    K = _gemv_k(name, x, glu)
    if w_int8.dtype != torch.int8:
        raise TypeError(f"{name} expects w_int8 of dtype torch.int8, got {w_int8.dtype}")
    if w_int8.dim() != 2 or w_int8.shape[1] != K:
        raise ValueError(f"{name} expects w_int8 of shape (N, K={K}), got {tuple(w_int8.shape)}{_glu_note(x, glu)}")
    N = w_int8.shape[0]
    if not scales.dtype.is_floating_point:
        raise TypeError(f"{name} expects floating-point scales, got {scales.dtype}")
    if tuple(scales.shape) not in ((N,), (N, 1)):
        raise ValueError(f"{name} expects scales of shape ({N},) (per output channel), got shape {tuple(scales.shape)}")
    _check_bias(name, x, bias, N)
    _check_devices(name, x=x, w_int8=w_int8, scales=scales, bias=bias)
    return N, K


def _check_packed(name, w_packed, scales, zeros, group_size) -> tuple[int, int]:
    """The packed int4 weights, scales and zeros (Int4WeightOnlyLinear's layout): (N, K)."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{name} expects group_size in {INT4_GROUP_SIZES}, got {group_size}")
    if w_packed.dtype != torch.uint8:
        raise TypeError(f"{name} expects w_packed of dtype torch.uint8 (two int4 per byte), got {w_packed.dtype}")
    if w_packed.dim() != 2:
        raise ValueError(f"{name} expects w_packed of shape (N, K/2), got {tuple(w_packed.shape)}")
    N, K = w_packed.shape[0], w_packed.shape[1] * 2
    if K % group_size:
        raise ValueError(f"{name} expects K divisible by group_size={group_size}, got K={K}")
    G = K // group_size
    for label, t in (("scales", scales), ("zeros", zeros)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} expects floating-point {label}, got {t.dtype}")
        if tuple(t.shape) != (N, G):
            raise ValueError(f"{name} expects {label} of shape (N, K/group_size) = ({N}, {G}), got {tuple(t.shape)}")
    _check_devices(name, w_packed=w_packed, scales=scales, zeros=zeros)
    return N, K


def _check_int4_args(name, x, w_packed, scales, zeros, group_size, bias, glu=False) -> tuple[int, int]:
    K = _gemv_k(name, x, glu)
    if w_packed.dtype == torch.uint8 and (w_packed.dim() != 2 or w_packed.shape[1] * 2 != K):
        raise ValueError(
            f"{name} expects w_packed of shape (N, K/2={K // 2}), got {tuple(w_packed.shape)}{_glu_note(x, glu)}"
        )
    N, _ = _check_packed(name, w_packed, scales, zeros, group_size)
    _check_bias(name, x, bias, N)
    _check_devices(name, x=x, w_packed=w_packed, scales=scales, zeros=zeros, bias=bias)
    return N, K


# ----------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, the math of ``fastzoo.llama.model.RMSNorm`` (which calls
    this): normalise in fp32, round to x's dtype, times ``weight``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.type_as(x)


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: x = [a | b] along the last dim → ``F.silu(a) * b`` in x's dtype."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def norm_options(norm) -> dict:
    """The ``norm_weight`` / ``norm_eps`` options of the decode linears from an RMSNorm module
    (``.weight``, ``.eps``), or none for ``norm=None``."""
    return {} if norm is None else {"norm_weight": norm.weight, "norm_eps": norm.eps}


def _prologue_ref(x, norm_weight, norm_eps, glu):
    """The input of the product: silu(a)·b where ``glu``, then RMSNorm where ``norm_weight``."""
    if glu:
        x = silu_mul_ref(x)
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, norm_eps).to(x.dtype)
    return x


def _residual_ref(y, residual):
    return y if residual is None else residual + y


def decode_linear_ref(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                      norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5, glu: bool = False,
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: ``F.linear(x, w, bias)`` (bias cast to x's dtype); with the options,
    ``residual + F.linear(RMSNorm(silu(a)·b), w, bias)`` in x's dtype, each step as the
    model's modules compute it."""
    N, K = _check_float_args("decode_linear_ref", x, w, bias, glu)
    _check_fusion("decode_linear_ref", x, N, K, norm_weight, norm_eps, residual)
    x = _prologue_ref(x, norm_weight, norm_eps, glu)
    return _residual_ref(F.linear(x, w, None if bias is None else bias.to(x.dtype)), residual)


def int8_weight_only_linear_ref(
    x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
    norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5, glu: bool = False,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference: ``F.linear(x, w_int8.to(x.dtype)) * scales + bias`` in x's dtype
    (what ``Int8WeightOnlyLinear.forward`` computes); the options as in ``decode_linear_ref``."""
    N, K = _check_int8_args("int8_weight_only_linear_ref", x, w_int8, scales, bias, glu)
    _check_fusion("int8_weight_only_linear_ref", x, N, K, norm_weight, norm_eps, residual)
    x = _prologue_ref(x, norm_weight, norm_eps, glu)
    y = F.linear(x, w_int8.to(x.dtype)) * scales.reshape(-1).to(x.dtype)
    return _residual_ref(y + bias.to(x.dtype) if bias is not None else y, residual)


def int4_dequantize_ref(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """(N, K/2) packed uint8 → (N, K) ``dtype``: q · scale + zero per group, in fp32, then cast."""
    N = w_packed.shape[0]
    q = torch.stack([w_packed & 0xF, w_packed >> 4], dim=-1).reshape(N, -1, group_size)
    w = q.to(torch.float32) * scales.to(torch.float32)[..., None] + zeros.to(torch.float32)[..., None]
    return w.reshape(N, -1).to(dtype)


def int4_weight_only_linear_ref(
    x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    bias: Optional[torch.Tensor] = None, *, norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5,
    glu: bool = False, residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference: dequantize to x's dtype, then ``F.linear`` (what ``Int4WeightOnlyLinear.forward``
    computes); the options as in ``decode_linear_ref``."""
    name = "int4_weight_only_linear_ref"
    N, K = _check_int4_args(name, x, w_packed, scales, zeros, group_size, bias, glu)
    _check_fusion(name, x, N, K, norm_weight, norm_eps, residual)
    x = _prologue_ref(x, norm_weight, norm_eps, glu)
    w = int4_dequantize_ref(w_packed, scales, zeros, group_size, x.dtype)
    return _residual_ref(F.linear(x, w, None if bias is None else bias.to(x.dtype)), residual)


# ----------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------
def _m_bucket(M: int) -> int:
    """Autotuning key for M: 1, 2, 4, 8 or 16 (the next power of two)."""
    return next_pow2(M)


MAX_SPLIT_K = 16  # the largest split in the configurations
_WORKSPACE_ELEMS = 1 << 22  # fp32 partials per launch at most (16 MiB): bounds SPLIT_K · M · N


def _workspace_splits(M: int, N: int) -> int:
    """How many (M, N) fp32 partials the split-K workspace holds: split-K configurations
    with more splits are pruned."""
    return max(1, min(MAX_SPLIT_K, _WORKSPACE_ELEMS // max(1, M * N)))


def _prune(configs, named_args, **kwargs):
    """Keep the GEMV tiles (BLOCK_M == 1) for one row only, the 16-row dot tiles otherwise;
    drop split-K where the K slices would be shorter than a block or N alone fills the GPU."""
    M_bucket, N, K = named_args["M_BUCKET"], named_args["N"], named_args["K"]
    kept = []
    for c in configs:
        kw = c.kwargs
        if (kw["BLOCK_M"] == 1) != (M_bucket == 1):
            continue
        if kw["SPLIT_K"] > 1:
            n_tiles = -(-N // kw["BLOCK_N"])
            if (K < kw["SPLIT_K"] * kw["BLOCK_K"] * 2 or n_tiles >= 1024
                    or kw["SPLIT_K"] > _workspace_splits(M_bucket, N)):
                continue
        kept.append(c)
    return kept or [c for c in configs if c.kwargs["BLOCK_M"] == 16][:1]


if triton_available():
    import triton
    import triton.language as tl

    def _cfg(bm, bn, bk, split, warps, stages, **extra):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, **extra},
                             num_warps=warps, num_stages=stages)

    def _configs(gemv: tuple, dot: tuple, first_bk: int) -> list:
        """gemv: (BLOCK_N, BLOCK_K, warps, splits[, extra meta-parameters]) tiles for one row,
        each with the SPLIT_K values listed (one stage: pipelining stages measured no faster
        for this loop);
        dot: (BLOCK_N, BLOCK_K) 16-row tl.dot tiles in 3 and 5 stages, SPLIT_K 1 to 8.
        Every configuration costs a compilation at the first call of a shape (start-up
        time), so the GEMV list is the few tiles that came within ~3 % of the best on an
        H100 for Llama-2-7B's shapes (``experiments.bench_weight_only_linear --sweep``);
        the autotuner still chooses among them on the GPU it runs on. Pruned per shape."""
        # First: small, runs in Triton's interpreter (the CPU tests) for any M.
        out = [_cfg(16, 16, first_bk, 1, 4, 1)]
        for bn, bk, warps, splits, *extra in gemv:
            out += [_cfg(1, bn, bk, split, warps, 1, **(extra[0] if extra else {})) for split in splits]
        for split in (1, 2, 4, 8):
            for bn, bk in dot:
                for stages in (3, 5):
                    out.append(_cfg(16, bn, bk, split, 4, stages))
        return out

    # BLOCK_K in weight columns (int4: unpacked columns; at least one quantization group).
    # Register budget (sm_90 ptxas, no spills): BLOCK_N·BLOCK_K fp32 accumulator over the threads.
    _LINEAR_DOT = ((32, 128), (64, 128), (64, 256), (128, 128))
    _FLOAT_CONFIGS = _configs(
        gemv=((8, 512, 4, (1, 2)), (4, 512, 4, (1,)), (8, 1024, 8, (1,)), (16, 256, 4, (1, 2)),
              (8, 256, 2, (1, 2, 8)), (32, 256, 8, (1, 2, 4)), (64, 128, 8, (1, 8, 16))),
        dot=_LINEAR_DOT, first_bk=32)
    # int8 GEMV tiles: a byte per weight, so twice bf16's columns per thread for the same
    # bytes in flight (16 B loads; 32 to 64 weights and 100-120 registers per thread, no
    # spills). BLOCK_K 256 keeps K = 11008 (w2) unmasked; 1024/2048 for K = 4096.
    # Evict-first weight loads: they stream once (as inductor's GEMV loads them). On an H100
    # (``--int8-variants``) the best evict-first tile was at least as fast as the best
    # default one for each Llama-2-7B shape (wqkv 22.5 vs 23.7 µs, wo 16.1 vs 16.4, w13 37.0
    # vs 37.7, w2 20.4 vs 22.9); whole int8 decode steps measured the same within noise. A
    # prefetch of the next weight tile into registers measured slower and was dropped.
    _EVICT = {"EVICT_W": "evict_first"}
    _INT8_CONFIGS = _configs(
        gemv=tuple(t + (_EVICT,) for t in ((8, 1024, 4, (1, 2)), (4, 1024, 4, (1,)), (16, 1024, 8, (1,)),
                                          (8, 2048, 8, (1,)), (16, 512, 4, (1, 2)), (32, 512, 8, (1, 4)),
                                          (64, 256, 8, (1, 8)))),
        dot=_LINEAR_DOT, first_bk=32)
    # One autotuner for _linear_kernel (its key has QUANT): the float tiles, then the int8
    # GEMV tiles; _prune_linear keeps the GEMV tiles of the launch's kind.
    _LINEAR_CONFIGS = _FLOAT_CONFIGS + [c for c in _INT8_CONFIGS if c.kwargs["BLOCK_M"] == 1]
    _INT8_GEMV_IDS = frozenset(id(c) for c in _LINEAR_CONFIGS[len(_FLOAT_CONFIGS):])
    # the int8 GEMV candidates ``experiments.bench_weight_only_linear --sweep --int8-wide``
    # times (not the autotuner's list: 16 to 64 weights per thread, splits 1 to 16)
    INT8_GEMV_SWEEP = [_cfg(1, bn, bk, split, warps, 1)
                       for bn in (4, 8, 16, 32, 64, 128) for bk in (256, 512, 1024, 2048) for warps in (4, 8)
                       if 16 <= bn * bk // (32 * warps) <= 64 for split in (1, 2, 4, 8, 16)]

    # the autotuner's int8 GEMV tiles with and without evict-first weight loads
    # (``--int8-variants``)
    INT8_GEMV_VARIANTS = [_cfg(1, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"], c.num_warps, 1,
                               EVICT_W=ev)
                          for c in _INT8_CONFIGS if c.kwargs["BLOCK_M"] == 1 for ev in ("", "evict_first")]

    def _prune_linear(configs, named_args, **kwargs):
        """_prune on the GEMV tiles of the launch's kind (int8 when QUANT == 1, else float)
        and the shared 16-row dot tiles."""
        int8 = kwargs.get("QUANT", named_args.get("QUANT", 0)) == 1
        own = [c for c in configs if c.kwargs["BLOCK_M"] == 16 or (id(c) in _INT8_GEMV_IDS) == int8]
        return _prune(own, named_args, **kwargs)
    # int4 GEMV tiles: BLOCK_K / 8 words per row and block, at most 64 (two per lane: see
    # _int4_kernel); 8 or 16 row-words per thread, 4 to 16 KB of weights per block; with
    # PREFETCH the next block's loads are in flight during this block's arithmetic (sm_90
    # ptxas: 96 to 178 registers, no spills; without, 64 to 128). Not yet timed on a GPU:
    # both kinds are listed for the autotuner. Split-K for N = 4096 (wo, w2).
    _PF = {"PREFETCH": True}
    _INT4_CONFIGS = _configs(
        gemv=((32, 512, 4, (1, 2, 4)), (64, 256, 4, (1, 4, 8)),
              (16, 512, 4, (1, 2, 4), _PF), (32, 512, 4, (1, 2), _PF), (64, 512, 8, (1,), _PF)),
        dot=((32, 128), (32, 256), (64, 128), (64, 256)), first_bk=64)

    @triton.jit
    def _finish(total, ss, offs_m, offs_n, mask, n_mask, K, b_ptr, r_ptr, out_ptr, stride_om, stride_rm, eps,
                HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr):
        """The output tile's last steps in fp32, one rounding: the RMSNorm factor of each row
        (rsqrt(Σx²/K + eps): it factors out of the dot), the bias, the residual; store."""
        if NORM:
            total = total * tl.rsqrt(ss / K + eps)[:, None]
        if HAS_BIAS:
            total = total + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            r_off = offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
            total = total + tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        o_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptr + o_off, total.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fused_store(res, ss, offs_m, offs_n, M, N, K, pid_n, pid_m, pid_k, b_ptr, r_ptr, out_ptr, ws_ptr, cnt_ptr,
                     stride_om, stride_rm, eps, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
                     SPLIT_K: tl.constexpr):
        """Epilogue. SPLIT_K == 1: finish and store. Otherwise store this split's fp32
        partial in the workspace (SPLIT_K, M, N) and, with NORM, its partial Σx² per row
        after it (SPLIT_K, M, output tiles: each tile its own slot, no race); the last split
        of the output tile to arrive (arrival counter, acq_rel) sums the partials in split
        order, finishes, stores, and resets the counter for the next launch."""
        n_mask = offs_n < N
        m_mask = offs_m < M
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            _finish(res, ss, offs_m, offs_n, mask, n_mask, K, b_ptr, r_ptr, out_ptr, stride_om, stride_rm, eps,
                    HAS_BIAS, NORM, HAS_RES)
        else:
            # int32 offsets: the workspace holds at most _WORKSPACE_ELEMS floats (M and N may
            # arrive as Python ints: Triton specialises an argument equal to 1)
            p_off = offs_m[:, None] * N + offs_n[None, :]
            tl.store(ws_ptr + pid_k * M * N + p_off, res, mask=mask)
            n_tiles = tl.num_programs(0)
            ss_off = SPLIT_K * M * N + offs_m * n_tiles + pid_n
            if NORM:
                tl.store(ws_ptr + ss_off + pid_k * M * n_tiles, ss, mask=m_mask)
            tl.debug_barrier()  # every thread's partial is stored before the arrival is released
            tile = pid_m * n_tiles + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.zeros_like(res)
                total_ss = ss
                if NORM:
                    total_ss = tl.zeros_like(ss)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(ws_ptr + s * M * N + p_off, mask=mask, other=0.0, cache_modifier=".cg")
                    if NORM:
                        total_ss += tl.load(ws_ptr + ss_off + s * M * n_tiles, mask=m_mask, other=0.0,
                                            cache_modifier=".cg")
                _finish(total, total_ss, offs_m, offs_n, mask, n_mask, K, b_ptr, r_ptr, out_ptr, stride_om,
                        stride_rm, eps, HAS_BIAS, NORM, HAS_RES)
                tl.atomic_xchg(cnt_ptr + tile, 0)

    @triton.jit
    def _bias_and_store(res, offs_m, offs_n, M, N, pid_n, pid_m, pid_k, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                        stride_om, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
        """The epilogue without RMSNorm factor or residual (``_fused_store``)."""
        _fused_store(res, 0.0, offs_m, offs_n, M, N, 1, pid_n, pid_m, pid_k, b_ptr, b_ptr, out_ptr, ws_ptr,
                     cnt_ptr, stride_om, 0, 0.0, HAS_BIAS, False, False, SPLIT_K)

    @triton.jit
    def _x_block(x_ptrs, nw_ptrs, k, K, kmask, EVEN: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr):
        """Prologue: x's block at column k as the product consumes it, and its values before
        the norm weight (their squares sum to Σx²). GLU: silu(a)·b of x = [a | b] (b starts K
        columns on); NORM: times the RMSNorm weight (the row factor comes in the epilogue).
        fp32 where an option applies, the plain load in x's dtype otherwise."""
        if GLU:
            if EVEN:
                a = tl.load(x_ptrs + k).to(tl.float32)
                g = tl.load(x_ptrs + (k + K)).to(tl.float32)
            else:
                a = tl.load(x_ptrs + k, mask=kmask, other=0.0).to(tl.float32)
                g = tl.load(x_ptrs + (k + K), mask=kmask, other=0.0).to(tl.float32)
            v = a * tl.sigmoid(a) * g
        elif EVEN:
            v = tl.load(x_ptrs + k)
        else:
            v = tl.load(x_ptrs + k, mask=kmask, other=0.0)
        xv = v
        if NORM:
            v = v.to(tl.float32)
            if EVEN:
                xv = v * tl.load(nw_ptrs + k).to(tl.float32)
            else:
                xv = v * tl.load(nw_ptrs + k, mask=kmask, other=0.0).to(tl.float32)
        return xv, v

    @triton.jit
    def _weight_f32(w, QUANT: tl.constexpr):
        """A weight tile in fp32. int8 (QUANT == 1) without an int-to-float conversion
        (``int8_to_f32``: an I2F would bound the int8 GEMV below the bandwidth)."""
        if QUANT == 1:
            return int8_to_f32(w)
        else:
            return w.to(tl.float32)

    @triton.autotune(configs=_LINEAR_CONFIGS, key=["M_BUCKET", "N", "K", "QUANT", "GLU", "NORM", "HAS_RES"],
                     prune_configs_by={"early_config_prune": _prune_linear}, do_bench=short_bench)
    @triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
    @triton.jit
    def _linear_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, nw_ptr, r_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, M_BUCKET, stride_xm, stride_wn, stride_om, stride_rm, eps,
        QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
        UPCAST_DOT: tl.constexpr, PDL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr, EVICT_W: tl.constexpr = "",
    ):
        """out[m, n] = Σ_k x[m, k] · w[n, k] (· s[n] when QUANT == 1: int8 w) + b[n]; with
        GLU x[m, k] is silu(x[m, k]) · x[m, K + k], with NORM it is RMS-normalised (weight
        nw[k] per block, rsqrt(Σx²/K + eps) per row in the epilogue), with HAS_RES
        r[m, n] is added (fp32, one rounding). One-row tiles: EVICT_W is the weight loads'
        L1/L2 eviction policy ("" or "evict_first": the weights stream once, x and the
        outputs stay)."""
        if PDL and BLOCK_M == 1:
            # the next kernel may launch once every program here has started (it waits for
            # this one's writes): +2 to +4.5 % int8 and +1 % bf16 batch-1 decode on an H100
            # (with it the int4 kernels and decode attention measured slower: they do not
            # call it; the 16-row path is not measured with it)
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = (offs_n % N).to(tl.int64)  # past-the-edge rows wrap: loads need no N mask
        offs_k = tl.arange(0, BLOCK_K)
        k_blocks = tl.cdiv(K, BLOCK_K)
        k_per_split = tl.cdiv(k_blocks, SPLIT_K) * BLOCK_K
        k_start = pid_k * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]
        if BLOCK_M == 1:
            x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + offs_k
            nw_ptrs = nw_ptr + offs_k
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            ssq = tl.zeros((BLOCK_K,), dtype=tl.float32)
            k_loop = k_start
            if PDL:
                # Launched while the previous kernel finishes: the weights do not depend on
                # it, so the first tile is requested before waiting for its writes (x).
                first = offs_k < k_end - k_start
                w0 = tl.load(w_ptrs + k_start, mask=first[None, :], other=0, eviction_policy=EVICT_W)
                gdc_wait()
                x0, v0 = _x_block(x_ptrs, nw_ptrs, k_start, K, first, False, GLU, NORM)
                acc2 += _weight_f32(w0, QUANT) * x0.to(tl.float32)[None, :]
                if NORM:
                    ssq += v0 * v0
                k_loop = k_start + BLOCK_K
            for k in range(k_loop, k_end, BLOCK_K):
                kmask = offs_k < K - k
                xv, v = _x_block(x_ptrs, nw_ptrs, k, K, kmask, EVEN_K, GLU, NORM)
                if EVEN_K:
                    wv = tl.load(w_ptrs + k, eviction_policy=EVICT_W)
                else:
                    wv = tl.load(w_ptrs + k, mask=kmask[None, :], other=0, eviction_policy=EVICT_W)
                acc2 += _weight_f32(wv, QUANT) * xv.to(tl.float32)[None, :]
                if NORM:
                    ssq += v * v
            res = tl.sum(acc2, axis=1)[None, :]  # (1, BLOCK_N)
            ss = tl.zeros((1,), dtype=tl.float32) + tl.sum(ssq, axis=0)
            offs_m = pid_m + tl.arange(0, 1)
        else:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
            nw_ptrs = nw_ptr + offs_k[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
            if PDL:
                gdc_wait()
            for k in range(k_start, k_end, BLOCK_K):
                kmask = (offs_k < K - k)[None, :]
                xv, v = _x_block(x_ptrs, nw_ptrs, k, K, kmask, EVEN_K, GLU, NORM)
                if EVEN_K:
                    wv = tl.load(w_ptrs + k)
                else:
                    wv = tl.load(w_ptrs + k, mask=kmask, other=0)
                if NORM:
                    ss += tl.sum(v * v, axis=1)
                if UPCAST_DOT:
                    acc = tl.dot(xv.to(tl.float32), tl.trans(wv.to(tl.float32)), acc, input_precision="ieee")
                else:
                    x_dtype = x_ptr.dtype.element_ty
                    acc = tl.dot(xv.to(x_dtype), tl.trans(wv.to(x_dtype)), acc)
            res = acc
        if QUANT == 1:
            res = res * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        _fused_store(res, ss, offs_m, offs_n, M, N, K, pid_n, pid_m, pid_k, b_ptr, r_ptr, out_ptr, ws_ptr, cnt_ptr,
                     stride_om, stride_rm, eps, HAS_BIAS, NORM, HAS_RES, SPLIT_K)

    @triton.jit
    def _int4_gemv_block(acc, wv, sv, zv, x_ptrs, cmask, magic, EVEN_W: tl.constexpr):
        """acc + one block of the int4 GEMV (see _int4_kernel): wv (rows, words) int32, sv and
        zv the words' scales and zeros, x_ptrs the words' first x columns (8·word)."""
        hi = wv >> 12  # nibbles 5, 6, 7 in bits 8..19 (higher bits: masked off)
        inner = tl.zeros_like(acc)
        xsum = tl.sum(inner, axis=0)  # zeros, one per word
        for i in tl.static_range(8):
            if EVEN_W:
                xi = tl.load(x_ptrs + i).to(tl.float32)
            else:
                xi = tl.load(x_ptrs + i, mask=cmask, other=0.0).to(tl.float32)
            xsum += xi
            # nibble i in place, at bit p < 20 (inside fp32's 23-bit mantissa): q · 2^p, with
            # x's column pre-scaled by 2^-p (exact)
            p = 4 * i if i < 5 else 4 * (i - 3)
            src = wv if i < 5 else hi
            bits = (src & (15 << p)) | magic
            qp = bits.to(tl.float32, bitcast=True) - 8388608.0  # q · 2^p, exact
            inner += qp * (xi * (1.0 / (1 << p)))[None, :]
        return acc + inner * sv.to(tl.float32) + zv.to(tl.float32) * xsum[None, :]

    @triton.jit
    def _int4_gemv_whole_block(acc, w_ptrs, s_ptrs, z_ptrs, x_ptrs, magic):
        """_int4_gemv_block on a whole block: unmasked loads."""
        return _int4_gemv_block(acc, tl.load(w_ptrs), tl.load(s_ptrs), tl.load(z_ptrs), x_ptrs, None, magic, True)

    @triton.autotune(configs=_INT4_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP"],
                     prune_configs_by={"early_config_prune": _prune}, do_bench=short_bench)
    @triton.heuristics({"GPB": lambda a: max(1, a["BLOCK_K"] // a["GROUP"]),
                        "EVEN_W": lambda a: a["K"] % (a["BLOCK_K"] * a["SPLIT_K"]) == 0,
                        "PREFETCH": lambda a: a.get("PREFETCH", False)})
    @triton.jit
    def _int4_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, M_BUCKET, stride_xm, stride_wn, stride_sn, stride_zn, stride_om, magic,
        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, PDL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        GPB: tl.constexpr, EVEN_W: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        """W4A16. ``w_ptr`` is the packed weight read as int32 words (N, K/8): nibble i
        (bits 4i..4i+3) of word j is column 8j + i (the uint8 layout, little-endian). A
        nibble becomes fp32 with integer ops, no int-to-float conversion: bits(q | 0x4B000000)
        = 2^23 + q, minus 2^23. ``magic`` is 0x4B000000 passed at run time: as a register
        operand, ``(word & mask) | magic`` is one LOP3 (two constants would take two).

        One row (BLOCK_M == 1), a GEMV over a (BLOCK_N, BLOCK_K / 8) tile of words: two
        consecutive words per lane (an 8-byte load; a warp reads 256 B of a row), rows over
        the warps and registers. Each word's 8 nibbles are taken in place, without a shift:
        (word or word >> 12) & (0xF << p) is q · 2^p with p < 20 (nibbles 0-4 of the word,
        5-7 of word >> 12), and x's column 8·word + i is pre-scaled by 2^-p (exact), so a
        nibble costs LOP3, FADD (-2^23), FFMA, and a word one shift. x's columns
        are strided loads in the words' own layout (no shared-memory shuffle; x stays in
        L1). The group's scale and zero apply per word, factorised: Σ_k (q·s + z)·x =
        s·Σ q·x + z·Σ x, two FFMAs per word, and the fp32 (BLOCK_N, words) accumulator is
        reduced once at the end. (Four words per lane measured slower in the compiled code:
        x's layout then needs a shared-memory shuffle per block.)

        2 to 16 rows: a 16-row ``tl.dot`` over GPB whole groups per block (weights
        dequantized to x's dtype in registers)."""
        WPG: tl.constexpr = GROUP // 8  # int32 words per group
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_i = tl.arange(0, 8)
        if BLOCK_M == 1:
            BLOCK_W: tl.constexpr = BLOCK_K // 8  # words per row and block
            n_words = K // 8
            w_per_split = tl.cdiv(tl.cdiv(n_words, BLOCK_W), SPLIT_K) * BLOCK_W
            w_start = pid_k * w_per_split
            w_end = tl.minimum(n_words, w_start + w_per_split)
            # contiguity 2: the load is 2 words per lane (the compiler would make it 4, and
            # x's strided columns could then no longer share the words' layout)
            offs_c = tl.max_contiguous(tl.arange(0, BLOCK_W), 2)
            # loop-invariant int32 offsets from scalar bases advanced per block: one
            # IMAD.WIDE per address (the launcher checks that the offsets fit in int32)
            rows = offs_n % N  # past-the-edge rows wrap: loads need no N mask
            w_offs = rows[:, None] * stride_wn + offs_c[None, :]
            s_offs = rows[:, None] * stride_sn + (offs_c // WPG)[None, :]
            z_offs = rows[:, None] * stride_zn + (offs_c // WPG)[None, :]
            x_base = x_ptr + pid_m.to(tl.int64) * stride_xm
            acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
            # c is a multiple of BLOCK_W, and WPG divides BLOCK_W or the reverse (powers of
            # two): word c + j is in group c // WPG + j // WPG
            if PREFETCH:
                # the next block's words, scales and zeros are requested before this block's
                # arithmetic (twice the bytes in flight, more registers); the first block's
                # before waiting for the previous kernel (PDL: weights do not depend on it)
                cmask = offs_c < w_end - w_start
                wv = tl.load(w_ptr + w_start + w_offs, mask=cmask[None, :], other=0)
                sv = tl.load(s_ptr + w_start // WPG + s_offs, mask=cmask[None, :], other=0.0)
                zv = tl.load(z_ptr + w_start // WPG + z_offs, mask=cmask[None, :], other=0.0)
                if PDL:  # launched while the previous kernel finishes: wait for its writes (x)
                    gdc_wait()
                for c in range(w_start, w_end, BLOCK_W):
                    nmask = offs_c < w_end - (c + BLOCK_W)  # none past the last block
                    w_next = tl.load(w_ptr + (c + BLOCK_W) + w_offs, mask=nmask[None, :], other=0)
                    s_next = tl.load(s_ptr + (c + BLOCK_W) // WPG + s_offs, mask=nmask[None, :], other=0.0)
                    z_next = tl.load(z_ptr + (c + BLOCK_W) // WPG + z_offs, mask=nmask[None, :], other=0.0)
                    acc = _int4_gemv_block(acc, wv, sv, zv, x_base + c * 8 + offs_c * 8, cmask, magic, EVEN_W)
                    wv, sv, zv, cmask = w_next, s_next, z_next, nmask
            else:
                if PDL:  # launched while the previous kernel finishes: wait for its writes (x)
                    gdc_wait()
                for c in range(w_start, w_end, BLOCK_W):
                    # unmasked code for every whole block (a branch uniform over the program)
                    if EVEN_W:
                        acc = _int4_gemv_whole_block(acc, w_ptr + c + w_offs, s_ptr + c // WPG + s_offs,
                                                     z_ptr + c // WPG + z_offs, x_base + c * 8 + offs_c * 8, magic)
                    elif c + BLOCK_W <= w_end:
                        acc = _int4_gemv_whole_block(acc, w_ptr + c + w_offs, s_ptr + c // WPG + s_offs,
                                                     z_ptr + c // WPG + z_offs, x_base + c * 8 + offs_c * 8, magic)
                    else:
                        cmask = offs_c < w_end - c
                        wv = tl.load(w_ptr + c + w_offs, mask=cmask[None, :], other=0)
                        sv = tl.load(s_ptr + c // WPG + s_offs, mask=cmask[None, :], other=0.0)
                        zv = tl.load(z_ptr + c // WPG + z_offs, mask=cmask[None, :], other=0.0)
                        acc = _int4_gemv_block(acc, wv, sv, zv, x_base + c * 8 + offs_c * 8, cmask, magic, False)
            res = tl.sum(acc, axis=1)[None, :]
            offs_m = pid_m + tl.arange(0, 1)
        else:
            if PDL:  # launched while the previous kernel finishes: wait for its writes (x)
                gdc_wait()
            rows = (offs_n % N).to(tl.int64)
            n_groups = K // GROUP
            g_per_split = tl.cdiv(tl.cdiv(n_groups, GPB), SPLIT_K) * GPB
            g_start = pid_k * g_per_split
            g_end = tl.minimum(n_groups, g_start + g_per_split)
            offs_g = tl.arange(0, GPB)
            offs_w = tl.arange(0, WPG)
            shifts = (4 * offs_i)[None, None, None, :]
            w_ptrs = w_ptr + rows[:, None, None] * stride_wn + (offs_g[None, :, None] * WPG + offs_w[None, None, :])
            s_ptrs = s_ptr + rows[:, None] * stride_sn + offs_g[None, :]
            z_ptrs = z_ptr + rows[:, None] * stride_zn + offs_g[None, :]
            xcol = offs_g[:, None, None] * GROUP + offs_w[None, :, None] * 8 + offs_i[None, None, :]  # (GPB, WPG, 8)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None, None, None] * stride_xm + xcol[None, :, :, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for g in range(g_start, g_end, GPB):
                gmask = offs_g < n_groups - g
                wv = tl.load(w_ptrs + g * WPG, mask=gmask[None, :, None], other=0)
                s = tl.load(s_ptrs + g, mask=gmask[None, :], other=0.0).to(tl.float32)[:, :, None, None]
                z = tl.load(z_ptrs + g, mask=gmask[None, :], other=0.0).to(tl.float32)[:, :, None, None]
                xv = tl.load(x_ptrs + g * GROUP, mask=gmask[None, :, None, None], other=0.0)
                q = ((wv[:, :, :, None] >> shifts) & 0xF) | 0x4B000000
                w = (q.to(tl.float32, bitcast=True) - 8388608.0) * s + z
                x2 = tl.reshape(xv, (BLOCK_M, GPB * GROUP))
                w2 = tl.trans(tl.reshape(w, (BLOCK_N, GPB * GROUP)))
                if UPCAST_DOT:
                    acc = tl.dot(x2.to(tl.float32), w2, acc, input_precision="ieee")
                else:
                    acc = tl.dot(x2, w2.to(x2.dtype), acc)
            res = acc
        _bias_and_store(res, offs_m, offs_n, M, N, pid_n, pid_m, pid_k, b_ptr, out_ptr, ws_ptr, cnt_ptr, stride_om,
                        HAS_BIAS, SPLIT_K)

    # int4 one-row tensor-core GEMV tiles (BLOCK_N = 16 rows per row block, at least one
    # block per warp; split-K over 128-column segments; prefetching the next segment's
    # words or not): the best for each of Llama-2-7B's shapes among INT4_MMA_SWEEP on an H200
    # and an H100 (``experiments.bench_weight_only_linear --sweep``).
    def _mma_cfg(bn, warps, split, pf):
        return triton.Config({"BLOCK_N": bn, "SPLIT_K": split, "PREFETCH": pf}, num_warps=warps, num_stages=1)

    _INT4_MMA_CONFIGS = [_mma_cfg(*c) for c in ((64, 1, 8, False), (64, 1, 4, False), (128, 2, 16, False),
                                                (256, 8, 16, True), (64, 2, 8, True), (64, 2, 16, False))]
    # the candidates ``experiments.bench_weight_only_linear --sweep`` times (one to four row
    # blocks per warp)
    INT4_MMA_SWEEP = [_mma_cfg(bn, warps, split, pf)
                      for bn, warps in ((32, 2), (64, 2), (64, 4), (128, 8), (64, 1), (128, 4), (128, 2), (256, 8))
                      for split in (1, 2, 4, 8, 16) for pf in (False, True)]

    # 2 to 16 rows of x (ROWS 8 or 16): the best for each of Llama-2-7B's shapes at 8 and at 16
    # rows among INT4_MMA_ROWS_SWEEP on an H100, and the runners-up within ~5 %
    # (``experiments.bench_weight_only_linear --sweep --kinds int4 --groups 128 --ms 8 16``)
    _INT4_MMA_ROWS_CONFIGS = [_mma_cfg(*c) for c in (
        (32, 1, 4, True), (32, 1, 4, False), (32, 1, 2, True), (32, 1, 2, False), (32, 1, 8, False),
        (64, 2, 16, False), (64, 2, 8, False), (64, 2, 8, True), (64, 4, 8, False), (128, 4, 16, False))]
    _INT4_MMA_ROWS_IDS = frozenset(id(c) for c in _INT4_MMA_ROWS_CONFIGS)
    # the several-row candidates ``experiments.bench_weight_only_linear --sweep --ms 8 16`` times
    # (one or two row blocks per warp: more spill at 16 rows)
    INT4_MMA_ROWS_SWEEP = [_mma_cfg(bn, warps, split, pf)
                           for bn, warps in ((32, 1), (32, 2), (64, 2), (64, 4), (128, 4), (128, 8))
                           for split in (2, 4, 8, 16) for pf in (False, True)]

    def _prune_mma(configs, named_args, **kwargs):
        """The one-row tiles for one row (``ROWS`` 1), the several-row tiles otherwise (a list
        without either kind, as INT4_MMA_SWEEP, is kept whole); no more splits than the split-K
        workspace holds for ROWS × N (``_workspace_splits``, as ``_prune``) or than K has
        128-column segments; one split where none fits."""
        N, K = named_args["N"], named_args["K"]
        rows = kwargs.get("ROWS", named_args.get("ROWS", 1))
        own = [c for c in configs if (id(c) in _INT4_MMA_ROWS_IDS) == (rows > 1)] or configs
        limit = min(_workspace_splits(rows, N), max(1, K // 128))
        return [c for c in own if c.kwargs["SPLIT_K"] <= limit] or [_mma_cfg(64, 2, 1, False)]

    def _nibble_lines(u: str, v: str, dest: str) -> list:
        """PTX lines: the int32 words ``u`` (row r) and ``v`` (row r + 8) → 8 registers ``dest``
        (a format with one field: 0..3 from u, 4..7 from v), register i holding nibbles i and
        i + 4 of its word as the 16-bit floats magic + q (magic in register ``m``; ``h`` scratch)."""
        lines = []
        for word, base in ((u, 0), (v, 4)):
            lines.append(f"lop3.b32 {dest.format(base)}, {word}, 0x000F000F, m, 0xEA;")  # (a & b) | c
            for i in range(1, 4):
                lines += [f"shr.u32 h, {word}, {4 * i};", f"lop3.b32 {dest.format(base + i)}, h, 0x000F000F, m, 0xEA;"]
        return lines

    def _int4_mma_asm(f16: bool, with_sum: bool = True) -> str:
        """PTX for one word pair of _int4_mma_kernel. In: $8 / $9 the int32 words of rows r
        and r + 8 (8 nibbles each, nibble i at bits 4i: the lane's columns c0..c7 of this
        word), $10..$13 x's pairs {x0,x4} {x1,x5} {x2,x6} {x3,x7}, $14..$17 the mma
        accumulator, $18..$21 the accumulator of Σx. Out: $0..$3 and $4..$7, the two
        accumulators after this word. (word >> 4i) & 0x000F000F | magic is nibbles i and
        i + 4 as the 16-bit floats t = magic + q, exact (magic = 2^7 in bf16, 2^10 in fp16;
        q < 16 fits the mantissa): the mma multiplies t, not q, and the caller subtracts
        magic·Σx (from a second mma with A = 1) in fp32. Two m16n8k16 mma per product: rows
        r and r + 8, the lane's 8 columns (slots 2c, 2c + 1, 2c + 8, 2c + 9 of two k16 tiles).
        ``with_sum=False`` (``_int4_mma_word_p``, for a caller that has Σx): the products'
        mma only, x's pairs given in the mma's order, operands numbered from $4."""
        ty, magic, one = ("f16", "0x64006400", "0x3C003C00") if f16 else ("bf16", "0x43004300", "0x3F803F80")
        # ``with_sum=False`` (the Gluon GEMV, which has Σx): no second mma, operands 4 lower ($4 / $5
        # the words, $6..$9 x's pairs, $10..$13 the accumulator)
        n_out = 8 if with_sum else 4
        reg = [f"${n_out + i}" for i in range(14)]  # words (2), x pairs (4), accumulator (4), Σx accumulator (4)
        lines = ([".reg .b32 h, m, one, q<8>;", f"mov.b32 m, {magic};", f"mov.b32 one, {one};"] if with_sum
                 else [".reg .b32 h, m, q<8>;", f"mov.b32 m, {magic};"])
        lines += _nibble_lines(reg[0], reg[1], "q{}")
        mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
        lines += [f"{mma} {{$0, $1, $2, $3}}, {{q0, q4, q1, q5}}, {{{reg[2]}, {reg[3]}}}, "
                  f"{{{reg[6]}, {reg[7]}, {reg[8]}, {reg[9]}}};",
                  f"{mma} {{$0, $1, $2, $3}}, {{q2, q6, q3, q7}}, {{{reg[4]}, {reg[5]}}}, {{$0, $1, $2, $3}};"]
        if with_sum:
            lines += [f"{mma} {{$4, $5, $6, $7}}, {{one, one, one, one}}, {{{reg[2]}, {reg[3]}}}, "
                      f"{{{reg[10]}, {reg[11]}, {reg[12]}, {reg[13]}}};",
                      f"{mma} {{$4, $5, $6, $7}}, {{one, one, one, one}}, {{{reg[4]}, {reg[5]}}}, {{$4, $5, $6, $7}};"]
        return "{\n" + "\n".join(lines) + "\n}"

    _MMA_BF16 = tl.constexpr(_int4_mma_asm(False))
    _MMA_F16 = tl.constexpr(_int4_mma_asm(True))
    _MMA_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["r"] * 6 + ["f"] * 8))
    _PRMT = tl.constexpr("prmt.b32 $0, $2, $3, 0x5410; prmt.b32 $1, $2, $3, 0x7632;")

    @triton.jit
    def _x_pairs(x0, x1, x2, x3):
        """A lane's 8 x columns of a word as int32 pairs {x0,x1} {x2,x3} {x4,x5} {x6,x7} → the
        mma's pairs {x0,x4} {x1,x5} {x2,x6} {x3,x7} (two PRMT each)."""
        p0, p1 = tl.inline_asm_elementwise(_PRMT, "=r,=r,r,r", [x0, x2], dtype=(tl.int32, tl.int32), is_pure=True,
                                           pack=1)
        p2, p3 = tl.inline_asm_elementwise(_PRMT, "=r,=r,r,r", [x1, x3], dtype=(tl.int32, tl.int32), is_pure=True,
                                           pack=1)
        return p0, p1, p2, p3

    @triton.jit
    def _int4_mma_word(D, S, uw, vw, x0, x1, x2, x3, F16: tl.constexpr):
        """The accumulators D (rows' products) and S (Σx), 4 fp32 tensors each, plus one
        word pair (rows r, r + 8) times x: _int4_mma_asm's PTX. x0..x3: the lane's 8 x
        columns of this word as int32 pairs {x0,x1} {x2,x3} {x4,x5} {x6,x7}."""
        p0, p1, p2, p3 = _x_pairs(x0, x1, x2, x3)
        args = [uw, vw, p0, p1, p2, p3, D[0], D[1], D[2], D[3], S[0], S[1], S[2], S[3]]
        out = tl.inline_asm_elementwise(_MMA_F16 if F16 else _MMA_BF16, _MMA_CONSTRAINTS, args,
                                        dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        return (out[0], out[1], out[2], out[3]), (out[4], out[5], out[6], out[7])

    _MMA_BF16_P = tl.constexpr(_int4_mma_asm(False, False))
    _MMA_F16_P = tl.constexpr(_int4_mma_asm(True, False))
    _MMA_P_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 6 + ["f"] * 4))

    @triton.jit
    def _int4_mma_word_p(D, uw, vw, p0, p1, p2, p3, F16: tl.constexpr):
        """D (4 fp32 tensors) plus one word pair (rows r, r + 8) times x's pairs in the mma's
        order: _int4_mma_asm(with_sum=False)."""
        args = [uw, vw, p0, p1, p2, p3, D[0], D[1], D[2], D[3]]
        out = tl.inline_asm_elementwise(_MMA_F16_P if F16 else _MMA_BF16_P, _MMA_P_CONSTRAINTS, args,
                                        dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        return (out[0], out[1], out[2], out[3])

    def _int4_frags_asm(f16: bool) -> str:
        """PTX: a word pair (rows r and r + 8; $8 / $9) → the 8 A-fragment registers of
        _int4_mma_asm (q0..q3 from row r's word, q4..q7 from row r + 8's; $0..$7), as 16-bit
        floats t = magic + q. For the several-row kernel, which multiplies one word pair by
        one or two blocks of 8 rows of x (``_int4_mma_x_asm``)."""
        magic = "0x64006400" if f16 else "0x43004300"
        lines = [".reg .b32 h, m;", f"mov.b32 m, {magic};", *_nibble_lines("$8", "$9", "${}")]
        return "{\n" + "\n".join(lines) + "\n}"

    def _int4_mma_x_asm(f16: bool) -> str:
        """PTX: the A fragments of ``_int4_frags_asm`` ($8..$15) times one block of 8 rows of x
        (B: column j is row j of the block; x's pairs $16..$19 in the mma's order), plus the
        accumulators $20..$23 (products) and $24..$27 (Σx per row of x, from A = 1): out $0..$3
        and $4..$7. As _int4_mma_asm, two m16n8k16 mma per product."""
        ty, one = ("f16", "0x3C003C00") if f16 else ("bf16", "0x3F803F80")
        mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
        return "{\n" + "\n".join([
            ".reg .b32 one;", f"mov.b32 one, {one};",
            f"{mma} {{$0, $1, $2, $3}}, {{$8, $12, $9, $13}}, {{$16, $17}}, {{$20, $21, $22, $23}};",
            f"{mma} {{$0, $1, $2, $3}}, {{$10, $14, $11, $15}}, {{$18, $19}}, {{$0, $1, $2, $3}};",
            f"{mma} {{$4, $5, $6, $7}}, {{one, one, one, one}}, {{$16, $17}}, {{$24, $25, $26, $27}};",
            f"{mma} {{$4, $5, $6, $7}}, {{one, one, one, one}}, {{$18, $19}}, {{$4, $5, $6, $7}};"]) + "\n}"

    _FRAGS_BF16 = tl.constexpr(_int4_frags_asm(False))
    _FRAGS_F16 = tl.constexpr(_int4_frags_asm(True))
    _FRAGS_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 2))
    _MMA_X_BF16 = tl.constexpr(_int4_mma_x_asm(False))
    _MMA_X_F16 = tl.constexpr(_int4_mma_x_asm(True))
    _MMA_X_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["r"] * 12 + ["f"] * 8))

    @triton.jit
    def _int4_frags(uw, vw, F16: tl.constexpr):
        """_int4_frags_asm: a word pair → its 8 A-fragment registers (a tuple)."""
        return tl.inline_asm_elementwise(_FRAGS_F16 if F16 else _FRAGS_BF16, _FRAGS_CONSTRAINTS, [uw, vw],
                                         dtype=(tl.int32,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _int4_mma_x(D, S, Q, x0, x1, x2, x3, F16: tl.constexpr):
        """D (products) and S (Σx), 4 fp32 tensors each, plus the fragments Q times one block of
        8 rows of x: x0..x3 as in _int4_mma_word (the lane's 8 columns of its row of x)."""
        p0, p1, p2, p3 = _x_pairs(x0, x1, x2, x3)
        args = [Q[0], Q[1], Q[2], Q[3], Q[4], Q[5], Q[6], Q[7], p0, p1, p2, p3, D[0], D[1], D[2], D[3],
                S[0], S[1], S[2], S[3]]
        out = tl.inline_asm_elementwise(_MMA_X_F16 if F16 else _MMA_X_BF16, _MMA_X_CONSTRAINTS, args,
                                        dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        return (out[0], out[1], out[2], out[3]), (out[4], out[5], out[6], out[7])

    @triton.jit
    def _int4_rows_terms(A, Da, Db, Sa, Sb, SZ, F16: tl.constexpr):
        """A segment's sums into the accumulators A of one block of 8 rows of x: (weight row r,
        x row 2c), (r, 2c + 1), (r + 8, 2c), (r + 8, 2c + 1), as _int4_group_terms (the mma's
        D layout: S's entries 0 and 2 are x row 2c's Σx, 1 and 3 row 2c + 1's)."""
        MAGIC: tl.constexpr = 1024.0 if F16 else 128.0
        sr, zr, sr8, zr8 = SZ
        s0 = Sa[0] + Sb[0]
        s1 = Sa[1] + Sb[1]
        cr = zr - MAGIC * sr
        cr8 = zr8 - MAGIC * sr8
        return (A[0] + sr * (Da[0] + Db[0]) + cr * s0, A[1] + sr * (Da[1] + Db[1]) + cr * s1,
                A[2] + sr8 * (Da[2] + Db[2]) + cr8 * s0, A[3] + sr8 * (Da[3] + Db[3]) + cr8 * s1)

    @triton.jit
    def _int4_rows_segment(A0, A1, U, V, X0, X1, SZ, XB: tl.constexpr, F16: tl.constexpr):
        """One 128-column segment of the several-row path of _int4_mma_kernel: each word pair's
        fragments are made once and multiplied by XB blocks of 8 rows of x (X0, and X1 when XB
        is 2); two independent chains per block (words 0, 1 and 2, 3)."""
        zero = tl.zeros_like(A0[0])
        Z4 = (zero, zero, zero, zero)
        Da0, Sa0, Db0, Sb0 = Z4, Z4, Z4, Z4
        Da1, Sa1, Db1, Sb1 = Z4, Z4, Z4, Z4
        for w in tl.static_range(2):
            Qa = _int4_frags(U[w], V[w], F16)
            Qb = _int4_frags(U[w + 2], V[w + 2], F16)
            Da0, Sa0 = _int4_mma_x(Da0, Sa0, Qa, X0[2 * w][0], X0[2 * w][1], X0[2 * w + 1][0], X0[2 * w + 1][1], F16)
            Db0, Sb0 = _int4_mma_x(Db0, Sb0, Qb, X0[2 * w + 4][0], X0[2 * w + 4][1], X0[2 * w + 5][0],
                                   X0[2 * w + 5][1], F16)
            if XB == 2:
                Da1, Sa1 = _int4_mma_x(Da1, Sa1, Qa, X1[2 * w][0], X1[2 * w][1], X1[2 * w + 1][0], X1[2 * w + 1][1],
                                       F16)
                Db1, Sb1 = _int4_mma_x(Db1, Sb1, Qb, X1[2 * w + 4][0], X1[2 * w + 4][1], X1[2 * w + 5][0],
                                       X1[2 * w + 5][1], F16)
        A0 = _int4_rows_terms(A0, Da0, Db0, Sa0, Sb0, SZ, F16)
        if XB == 2:
            A1 = _int4_rows_terms(A1, Da1, Db1, Sa1, Sb1, SZ, F16)
        return A0, A1

    @triton.jit
    def _int4_rows_block(A, G: tl.constexpr):
        """One block's accumulators (element e = 32g + 4r + c, see _int4_rows_terms) → the
        (8, 16G) tile [x row, weight row 16g + 8h + r]."""
        lo = tl.reshape(tl.join(A[0], A[1]), (G, 8, 8))  # [g, r, 2c + p]
        hi = tl.reshape(tl.join(A[2], A[3]), (G, 8, 8))
        return tl.reshape(tl.permute(tl.join(lo, hi), (2, 0, 3, 1)), (8, 16 * G))

    @triton.jit
    def _int4_rows_result(A0, A1, G: tl.constexpr, XB: tl.constexpr):
        """The accumulators of XB blocks of 8 rows of x → the (8·XB, 16G) result [x row, weight
        row] (rows 8..15, block A1, after rows 0..7)."""
        res = _int4_rows_block(A0, G)
        if XB == 2:
            res = tl.reshape(tl.permute(tl.join(res, _int4_rows_block(A1, G)), (2, 0, 1)), (16, 16 * G))
        return res

    @triton.jit
    def _int4_mma_segment_p(acc_r, acc_r8, U, V, P, SZ, sx, zero, F16: tl.constexpr):
        """_int4_mma_segment for x already in the mma's pair order and its Σx given (the Gluon
        GEMV makes both once a program): P as _int4_mma_xs's X, but word k's pairs are
        (x0, x4), (x1, x5), (x2, x6), (x3, x7) of its 8 columns (no permutes), and ``sx`` the
        segment's Σx (no second mma). ``zero``: zeros like ``acc_r``, made by the caller (in the
        Gluon kernel the tensors carry explicit layouts)."""
        Da = (zero, zero, zero, zero)  # two independent chains: words 0, 2 and 1, 3
        Db = (zero, zero, zero, zero)
        Da = _int4_mma_word_p(Da, U[0], V[0], P[0][0], P[0][1], P[1][0], P[1][1], F16)
        Db = _int4_mma_word_p(Db, U[1], V[1], P[2][0], P[2][1], P[3][0], P[3][1], F16)
        Da = _int4_mma_word_p(Da, U[2], V[2], P[4][0], P[4][1], P[5][0], P[5][1], F16)
        Db = _int4_mma_word_p(Db, U[3], V[3], P[6][0], P[6][1], P[7][0], P[7][1], F16)
        return _int4_group_terms(acc_r, acc_r8, Da[0] + Db[0], Da[2] + Db[2], SZ, sx, F16)

    @triton.jit
    def _int4_group_terms(acc_r, acc_r8, d_r, d_r8, SZ, sx, F16: tl.constexpr):
        """A segment's sums into the rows' accumulators: its group's scale and zero apply once,
        in fp32: s·(Σ t·x) + (z − magic·s)·Σx = Σ (q·s + z)·x (d_r, d_r8: Σ t·x of rows r and
        r + 8; sx: Σx)."""
        MAGIC: tl.constexpr = 1024.0 if F16 else 128.0
        sr, zr, sr8, zr8 = SZ
        acc_r += sr * d_r + (zr - MAGIC * sr) * sx
        acc_r8 += sr8 * d_r8 + (zr8 - MAGIC * sr8) * sx
        return acc_r, acc_r8

    @triton.jit
    def _halves(v):
        """An int64 tensor → its low and high int32 halves."""
        return v.to(tl.int32), (v >> 32).to(tl.int32)

    @triton.jit
    def _int4_mma_words(w_ptr, seg, u_offs, v_offs):
        """Segment ``seg``'s 4 words of rows r and r + 8 of each lane (w an int64 view: two
        scalar 8-byte loads a row, one element per thread)."""
        wb = w_ptr + seg * 8
        u0, u1 = _halves(tl.load(wb + u_offs))
        u2, u3 = _halves(tl.load(wb + u_offs + 1))
        v0, v1 = _halves(tl.load(wb + v_offs))
        v2, v3 = _halves(tl.load(wb + v_offs + 1))
        return (u0, u1, u2, u3), (v0, v1, v2, v3)

    @triton.jit
    def _int4_mma_x_block(x_ptr, seg, x_offs):
        """Segment ``seg``'s 32 columns of x for the lane (x an int64 view: 8 scalar loads, 16
        int32 pairs)."""
        xb = x_ptr + seg * 32 + x_offs
        return (_halves(tl.load(xb)), _halves(tl.load(xb + 1)), _halves(tl.load(xb + 2)), _halves(tl.load(xb + 3)),
                _halves(tl.load(xb + 4)), _halves(tl.load(xb + 5)), _halves(tl.load(xb + 6)), _halves(tl.load(xb + 7)))

    @triton.jit
    def _int4_mma_xs(x_ptr, s_ptr, z_ptr, seg, x_offs, s_offs, z_offs, s8_offs, z8_offs, GROUP: tl.constexpr):
        """Segment ``seg``'s x for the lane (_int4_mma_x_block) and the group's scales and zeros
        of rows r and r + 8, in fp32."""
        return (_int4_mma_x_block(x_ptr, seg, x_offs),
                _int4_mma_sz(s_ptr, z_ptr, seg, s_offs, z_offs, s8_offs, z8_offs, GROUP))

    @triton.jit
    def _int4_mma_sz(s_ptr, z_ptr, seg, s_offs, z_offs, s8_offs, z8_offs, GROUP: tl.constexpr):
        """Segment ``seg``'s group's scales and zeros of rows r and r + 8, in fp32."""
        g = (seg * 128) // GROUP
        return (tl.load(s_ptr + g + s_offs).to(tl.float32), tl.load(z_ptr + g + z_offs).to(tl.float32),
                tl.load(s_ptr + g + s8_offs).to(tl.float32), tl.load(z_ptr + g + z8_offs).to(tl.float32))

    @triton.jit
    def _int4_mma_segment(acc_r, acc_r8, U, V, X, SZ, F16: tl.constexpr):
        """One 128-column segment of _int4_mma_kernel (one quantization group), from the values
        of _int4_mma_words and _int4_mma_xs: the products chain in the mma accumulator; the group's
        scale and zero apply once (_int4_group_terms), Σx from a second mma with A = 1."""
        zero = tl.zeros_like(acc_r)
        # two independent accumulator chains (words 0, 1 and 2, 3): half the mma latency in series
        Da = (zero, zero, zero, zero)
        Sa = (zero, zero, zero, zero)
        Db = (zero, zero, zero, zero)
        Sb = (zero, zero, zero, zero)
        for w in tl.static_range(2):
            Da, Sa = _int4_mma_word(Da, Sa, U[w], V[w], X[2 * w][0], X[2 * w][1], X[2 * w + 1][0], X[2 * w + 1][1],
                                    F16)
            Db, Sb = _int4_mma_word(Db, Sb, U[w + 2], V[w + 2], X[2 * w + 4][0], X[2 * w + 4][1], X[2 * w + 5][0],
                                    X[2 * w + 5][1], F16)
        # D[0]: row r, D[2]: row r + 8
        return _int4_group_terms(acc_r, acc_r8, Da[0] + Db[0], Da[2] + Db[2], SZ, Sa[0] + Sb[0], F16)

    @triton.jit
    def _int4_mma_rows_xs(x_ptr, s_ptr, z_ptr, seg, x0_offs, x1_offs, s_offs, z_offs, s8_offs, z8_offs,
                          GROUP: tl.constexpr, XB: tl.constexpr):
        """Segment ``seg``'s x for the lane (one row of each block of 8) and the group's scales
        and zeros (_int4_mma_sz). With one block X1 is X0 (unused)."""
        X0 = _int4_mma_x_block(x_ptr, seg, x0_offs)
        X1 = X0
        if XB == 2:
            X1 = _int4_mma_x_block(x_ptr, seg, x1_offs)
        return X0, X1, _int4_mma_sz(s_ptr, z_ptr, seg, s_offs, z_offs, s8_offs, z8_offs, GROUP)

    @triton.jit
    def _int4_mma_rows(x_ptr, w_ptr, s_ptr, z_ptr, M, stride_xm, r, cc, u_offs, v_offs, s_offs, z_offs, s8_offs,
                       z8_offs, seg_start, seg_end, n_seg, GROUP: tl.constexpr, F16: tl.constexpr, PDL: tl.constexpr,
                       ROWS: tl.constexpr, G: tl.constexpr, PREFETCH: tl.constexpr):
        """The several-row path of _int4_mma_kernel over the program's segments: the (ROWS,
        BLOCK_N) fp32 result [row of x, weight row]."""
        XB: tl.constexpr = ROWS // 8
        x0_offs = tl.minimum(r, M - 1) * stride_xm + cc * 8  # rows past M repeat row M - 1 (not stored)
        x1_offs = tl.minimum(r + 8, M - 1) * stride_xm + cc * 8
        zero = tl.zeros((32 * G,), dtype=tl.float32)
        A0 = (zero, zero, zero, zero)
        A1 = (zero, zero, zero, zero)
        if PREFETCH:  # as in _int4_mma_kernel
            first = tl.minimum(seg_start, n_seg - 1)
            last = tl.maximum(seg_end - 1, first)
            U, V = _int4_mma_words(w_ptr, first, u_offs, v_offs)
            if PDL:
                gdc_wait()
            X0, X1, SZ = _int4_mma_rows_xs(x_ptr, s_ptr, z_ptr, first, x0_offs, x1_offs, s_offs, z_offs, s8_offs,
                                           z8_offs, GROUP, XB)
            for seg in range(seg_start, seg_end):
                nxt = tl.minimum(seg + 1, last)
                U1, V1 = _int4_mma_words(w_ptr, nxt, u_offs, v_offs)
                X01, X11, SZ1 = _int4_mma_rows_xs(x_ptr, s_ptr, z_ptr, nxt, x0_offs, x1_offs, s_offs, z_offs,
                                                  s8_offs, z8_offs, GROUP, XB)
                A0, A1 = _int4_rows_segment(A0, A1, U, V, X0, X1, SZ, XB, F16)
                U, V, X0, X1, SZ = U1, V1, X01, X11, SZ1
        else:
            if PDL:
                gdc_wait()
            for seg in range(seg_start, seg_end):
                U, V = _int4_mma_words(w_ptr, seg, u_offs, v_offs)
                X0, X1, SZ = _int4_mma_rows_xs(x_ptr, s_ptr, z_ptr, seg, x0_offs, x1_offs, s_offs, z_offs, s8_offs,
                                               z8_offs, GROUP, XB)
                A0, A1 = _int4_rows_segment(A0, A1, U, V, X0, X1, SZ, XB, F16)
        return _int4_rows_result(A0, A1, G, XB)

    @triton.autotune(configs=_INT4_MMA_CONFIGS + _INT4_MMA_ROWS_CONFIGS, key=["N", "K", "GROUP", "ROWS"],
                     prune_configs_by={"early_config_prune": _prune_mma}, do_bench=short_bench)
    @triton.jit
    def _int4_mma_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_wn, stride_sn, stride_zn,
        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, F16: tl.constexpr, PDL: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        """W4A16 for 1 to 16 rows of x on tensor cores (CUDA, sm_80+: inline PTX), on the
        canonical packed layout read as int64 (N, K/16; two int32 words of 8 nibbles each), x
        as int64 (4 bf16 / fp16 each) (the launcher's views);
        group size >= 128 and K a multiple of 128 (the launcher checks).

        One row (``ROWS`` 1): rows in blocks of 16, one ``mma.sync.m16n8k16`` per 16 columns
        with the weights as A and x as B, replicated in B's 8 columns (so every lane's
        accumulator holds its rows' results). Per 128-column segment, lane l = 4r + c of a
        warp loads words 4c..4c+3 (32 columns) of rows r and r + 8 and x's same 32 columns;
        the order of the columns in a product is free, so each lane feeds its own columns to
        the slots of its A and B fragments: no data crosses lanes. Every tensor is 1-D, element e = 32·(row block) +
        lane, one element per thread per row block, all loads scalar: the only layout Triton
        can give it, so element e is lane e % 32 of a warp in every Triton version (a 2-D
        tensor or vector loads let the compiler choose layouts where a warp's lanes are not
        one row block's, which the mma would silently mix). Nibbles become 16-bit floats by
        bit operations only (see _int4_mma_asm), a segment's products accumulate in fp32 in
        the tensor cores, and the group's scale and zero apply once per row in fp32. Row r's
        result is in lanes 4r..4r+3 (all equal), reduced once at the end.
        ``BLOCK_N`` = 16 · (row blocks); split-K over segments.

        2 to 16 rows of x (``ROWS`` 8 or 16; ``M`` rows, ``stride_xm`` in int64 units): B's
        column j is row j of a block of 8 rows of x instead of a copy of the one row, so lane
        4r + c loads row r's (the block's; rows past M repeat row M − 1) same 32 columns, and
        its accumulator holds weight rows r, r + 8 times x rows 2c, 2c + 1. Each word pair's
        fragments are made once for both blocks (``ROWS`` 16); Σx per row of x comes from the
        mma with A = 1 as for one row. The weights are read once for all rows."""
        G: tl.constexpr = BLOCK_N // 16
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        e = tl.arange(0, 32 * G)
        lane = e % 32
        r = lane // 4
        cc = lane % 4
        row = (pid_n * BLOCK_N + (e // 32) * 16 + r) % N  # past-the-edge rows wrap: no N mask
        row8 = (pid_n * BLOCK_N + (e // 32) * 16 + 8 + r) % N
        u_offs = row * stride_wn + cc * 2  # int64 units: a lane's 4 words are 2 int64
        v_offs = row8 * stride_wn + cc * 2
        s_offs = row * stride_sn
        z_offs = row * stride_zn
        s8_offs = row8 * stride_sn
        z8_offs = row8 * stride_zn
        n_seg = K // 128
        seg_per_split = tl.cdiv(n_seg, SPLIT_K)
        seg_start = pid_k * seg_per_split
        seg_end = tl.minimum(n_seg, seg_start + seg_per_split)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if ROWS > 1:
            res = _int4_mma_rows(x_ptr, w_ptr, s_ptr, z_ptr, M, stride_xm, r, cc, u_offs, v_offs, s_offs, z_offs,
                                 s8_offs, z8_offs, seg_start, seg_end, n_seg, GROUP, F16, PDL, ROWS, G, PREFETCH)
            _bias_and_store(res, tl.arange(0, ROWS), offs_n, M, N, pid_n, 0, pid_k, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                            N, HAS_BIAS, SPLIT_K)
        else:
            x_offs = cc * 8  # int64 units: the lane's 32 columns are 8 int64 of x
            acc_r = tl.zeros((32 * G,), dtype=tl.float32)
            acc_r8 = tl.zeros((32 * G,), dtype=tl.float32)
            if PREFETCH:
                # the next segment's words, x and scales are requested before this one's
                # arithmetic (the last segment is read again instead of masking); the first
                # segment's words before waiting for the previous kernel (PDL: weights do not
                # depend on it), its x after
                first = tl.minimum(seg_start, n_seg - 1)  # a split past the end loads (and adds) nothing
                last = tl.maximum(seg_end - 1, first)
                U, V = _int4_mma_words(w_ptr, first, u_offs, v_offs)
                if PDL:
                    gdc_wait()
                X, SZ = _int4_mma_xs(x_ptr, s_ptr, z_ptr, first, x_offs, s_offs, z_offs, s8_offs, z8_offs, GROUP)
                for seg in range(seg_start, seg_end):
                    nxt = tl.minimum(seg + 1, last)
                    U1, V1 = _int4_mma_words(w_ptr, nxt, u_offs, v_offs)
                    X1, SZ1 = _int4_mma_xs(x_ptr, s_ptr, z_ptr, nxt, x_offs, s_offs, z_offs, s8_offs, z8_offs, GROUP)
                    acc_r, acc_r8 = _int4_mma_segment(acc_r, acc_r8, U, V, X, SZ, F16)
                    U, V, X, SZ = U1, V1, X1, SZ1
            else:
                if PDL:
                    gdc_wait()
                for seg in range(seg_start, seg_end):
                    U, V = _int4_mma_words(w_ptr, seg, u_offs, v_offs)
                    X, SZ = _int4_mma_xs(x_ptr, s_ptr, z_ptr, seg, x_offs, s_offs, z_offs, s8_offs, z8_offs, GROUP)
                    acc_r, acc_r8 = _int4_mma_segment(acc_r, acc_r8, U, V, X, SZ, F16)
            # row r's result is in lanes 4r..4r+3 (equal): (G, 8) per half, rows 16g + 8h + r
            lo = tl.max(tl.reshape(acc_r, (G, 8, 4)), axis=2)
            hi = tl.max(tl.reshape(acc_r8, (G, 8, 4)), axis=2)
            res = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (1, BLOCK_N))
            _bias_and_store(res, tl.arange(0, 1), offs_n, 1, N, pid_n, 0, pid_k, b_ptr, out_ptr, ws_ptr, cnt_ptr, N,
                            HAS_BIAS, SPLIT_K)

    @triton.jit
    def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn,
                             GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One pass of int4_dequantize: a (BLOCK_N, BLOCK_K) tile of w read as packed bytes,
        q · scale + zero in fp32 (launched without FMA contraction: the reference's two
        roundings), written in out's dtype."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        rows = rows.to(tl.int64)
        nb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_ptr + rows[:, None] * stride_wn + nb[None, :],
                    mask=rmask[:, None] & (nb < K // 2)[None, :], other=0).to(tl.int32)
        q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))  # column 2j: low nibble, 2j + 1: high
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols < K)[None, :]
        g = cols // GROUP
        sc = tl.load(s_ptr + rows[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        zr = tl.load(z_ptr + rows[:, None] * stride_zn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * sc + zr
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

_EXP_2_23 = 0x4B000000  # bits of 2.0**23: the int4 kernel's magic, passed at run time (see _int4_kernel)
_MIN_BLOCK_N = 4  # the smallest BLOCK_N of the configurations: bounds the number of output tiles


def _run(kernel, M: int, N: int, out: torch.Tensor, args: list, kwargs: dict,
         config: Optional[dict], norm_partials: bool = False) -> torch.Tensor:
    """Launch ``kernel`` writing (M, N) into ``out`` and return ``out``. The split-K
    workspace (fp32 partials, never read before written) and the arrival counters are
    passed to every launch; ``norm_partials``: the workspace also holds each split's Σx²
    per row and output tile (SPLIT_K, M, N / BLOCK_N) after the (SPLIT_K, M, N) partials.
    ``config`` (tests) forces one configuration:
    {"BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", optional "num_warps"} (the int4
    tensor-core kernel: {"BLOCK_N", "SPLIT_K", "PREFETCH"}, no BLOCK_M: one program has
    all M rows)."""
    device = out.device
    max_split = _workspace_splits(M, N) if config is None else config["SPLIT_K"]
    per_split = M * N + (M * triton.cdiv(N, _MIN_BLOCK_N) if norm_partials else 0)
    ws = torch.empty(max_split * per_split, dtype=torch.float32, device=device)
    cnt = arrival_counters(device, M * triton.cdiv(N, _MIN_BLOCK_N))
    scalars = kwargs.pop("_scalars")
    if config is not None:
        cfg = dict(config)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"], triton.cdiv(M, cfg.get("BLOCK_M", M)))
        kernel.fn[grid](*args, out, ws, cnt, *scalars, **kwargs, **cfg)
        return out
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"],  # noqa: E731
                         triton.cdiv(M, meta.get("BLOCK_M", M)))
    launch(kernel, grid, *args, out, ws, cnt, *scalars, device=device, **kwargs)
    return out


def _upcast_dot(x: torch.Tensor) -> bool:
    """Triton's interpreter (CPU tensors) multiplies bf16 tiles in tl.dot wrongly (as raw
    bits); there the dot operands go to fp32. On the GPU they stay in x's dtype."""
    return x.device.type != "cuda" and x.dtype == torch.bfloat16


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    return unit_stride_last(x.reshape(-1, K))


def _require_triton(name: str) -> None:
    if not triton_available():
        raise RuntimeError(f"{name} needs Triton, which is not importable here")


def _check_kernel_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} (the kernel) expects x in bfloat16 or float16, got {x.dtype}")


def _float_or_int8_triton(name, x, w, scales, bias, N, K, quant, config, norm_weight, norm_eps, glu, residual):
    _require_triton(name)
    _check_kernel_dtype(name, x)
    _check_fusion(name, x, N, K, norm_weight, norm_eps, residual)
    x2 = _rows(x, 2 * K if glu else K)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        r = None if residual is None else unit_stride_last(residual.reshape(M, N))
        if K == 0:
            out.zero_()
            if bias is not None:
                out += bias.to(x.dtype)
            if r is not None:
                out += r
        else:
            w = unit_stride_last(w)
            s = scales.reshape(-1).contiguous() if scales is not None else w
            b = bias.contiguous() if bias is not None else w
            nw = norm_weight.contiguous() if norm_weight is not None else w
            out = _run(_linear_kernel, M, N, out, [x2, w, s, b, nw, w if r is None else r],
                       {"_scalars": (M, N, K, _m_bucket(M), x2.stride(0), w.stride(0), N,
                                     N if r is None else r.stride(0), float(norm_eps)),
                        "QUANT": quant, "HAS_BIAS": bias is not None, "GLU": bool(glu),
                        "NORM": norm_weight is not None, "HAS_RES": r is not None,
                        "UPCAST_DOT": _upcast_dot(x), **pdl_options(x)}, config, norm_partials=norm_weight is not None)
    return out.reshape(*x.shape[:-1], N)


def decode_linear_triton(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         config: Optional[dict] = None, *, norm_weight: Optional[torch.Tensor] = None,
                         norm_eps: float = 1e-5, glu: bool = False,
                         residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the decode kernel (any M; it is built for M <= 16). ``config`` forces a tile (tests).
    Options as in ``decode_linear``."""
    name = "decode_linear_triton"
    N, K = _check_float_args(name, x, w, bias, glu)
    return _float_or_int8_triton(name, x, w, None, bias, N, K, 0, config, norm_weight, norm_eps, glu, residual)


def int8_weight_only_linear_triton(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor,
                                   bias: Optional[torch.Tensor] = None, config: Optional[dict] = None, *,
                                   norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5,
                                   glu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the int8 weight-only decode kernel (any M; built for M <= 16). Options as in
    ``int8_weight_only_linear``."""
    name = "int8_weight_only_linear_triton"
    N, K = _check_int8_args(name, x, w_int8, scales, bias, glu)
    return _float_or_int8_triton(name, x, w_int8, scales, bias, N, K, 1, config, norm_weight, norm_eps, glu,
                                 residual)


def _int4_mma_applies(x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> bool:
    """The tensor-core int4 kernel (1 to 16 rows): inline PTX (CUDA, sm_80+, not Triton's
    interpreter), mma on x's dtype with scales and zeros in it, groups of at least 128
    columns and K a multiple of 128."""
    return (cuda_kernel_applies(x, dtypes=_KERNEL_DTYPES) and scales.dtype == x.dtype
            and zeros.dtype == x.dtype and group_size >= INT4_MMA_MIN_GROUP and x.shape[-1] % 128 == 0)


def int4_weight_only_linear_triton(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
                                   zeros: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None,
                                   config: Optional[dict] = None, gluon: Optional[bool] = None, *,
                                   norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5,
                                   glu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the int4 weight-only decode kernel (any M; built for M <= 16). One row on a
    CUDA GPU with scales and zeros in x's dtype: on Hopper the Gluon GEMV with a TMA ring
    (``int4_gemv_gluon``; ``gluon=False`` keeps the ``tl`` kernels, ``gluon=True`` raises
    where it does not apply), else, and for 2 to 16 rows, the tensor-core kernel
    (``_int4_mma_kernel``; groups >= 128, K % 128 == 0; ``_int4_kernel`` otherwise), unless
    ``config`` forces a tile of ``_int4_kernel`` (a config with ``"MMA": True`` forces one
    of the tensor-core kernel's, one with ``"GLUON": True`` one of the Gluon kernel's). The
    options (``decode_linear``'s: RMSNorm, SwiGLU, residual) run inside the Gluon kernel;
    around the ``tl`` kernels they are composed in PyTorch."""
    name = "int4_weight_only_linear_triton"
    N, K = _check_int4_args(name, x, w_packed, scales, zeros, group_size, bias, glu)
    _check_fusion(name, x, N, K, norm_weight, norm_eps, residual)
    _require_triton(name)
    _check_kernel_dtype(name, x)
    x2 = _rows(x, x.shape[-1])  # (M, K), or (M, 2K) with glu
    M = x2.shape[0]
    opts = dict(norm_weight=norm_weight, norm_eps=norm_eps, glu=glu, residual=residual)
    gluon_config = config is not None and config.get("GLUON", False)
    if (gluon is False and gluon_config) or (gluon and config is not None and not gluon_config):
        raise ValueError(f"{name}: gluon={gluon} contradicts config={config}")
    forced = gluon or gluon_config
    if forced or (gluon is None and config is None):
        from . import int4_gemv_gluon as ig

        if ig.int4_gemv_gluon_applies(x2, w_packed, scales, zeros, group_size, glu=glu, norm_weight=norm_weight,
                                      residual=residual) and N:
            pdl = pdl_options(x)["PDL"]
            if gluon_config:
                cfg = {k: v for k, v in config.items() if k != "GLUON"}
            else:  # tuned with the options (they change the registers, and so the fastest tile)
                cfg = ig.tuned_config(x2, w_packed, scales, zeros, group_size, bias, pdl, **opts)
            out = ig.int4_gemv_gluon_launch(x2, w_packed, scales, zeros, group_size, bias, cfg, pdl, **opts)
            return out.reshape(*x.shape[:-1], N)
        if forced:
            raise ValueError(f"{name}: the Gluon GEMV needs one row of bf16 / fp16 x on a Hopper GPU with Triton's "
                             f"Gluon, scales and zeros (and a norm weight or residual) in x's dtype, "
                             f"group_size {ig.GROUPS}, K % 128 == 0, N > 0 and packed weights TMA can read "
                             f"(unit last stride, base and row stride 16-byte aligned); got {M} rows of {x.dtype} on "
                             f"{x.device}, scales {scales.dtype}, group_size={group_size}, K={K}, N={N}, weight "
                             f"strides {tuple(w_packed.stride())} at byte offset {w_packed.storage_offset()}")
    if glu or norm_weight is not None or residual is not None:  # the tl kernels take none of the options
        y = int4_weight_only_linear_triton(_prologue_ref(x, norm_weight, norm_eps, glu), w_packed, scales, zeros,
                                           group_size, bias, config, gluon=False)
        return _residual_ref(y, residual)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N and K:
        w = unit_stride_last(w_packed)
        if w.storage_offset() % 4 or w.stride(0) % 4:  # a copy: .contiguous() keeps a contiguous view's offset
            w = w.clone(memory_format=torch.contiguous_format)
        w = w.view(torch.int32)  # (N, K/8) words: 8 nibbles each, column 8j + i in bits 4i..4i+3
        if N * w.stride(0) >= 2**31:
            raise ValueError(f"{name} supports at most 2**31 int32 words of packed weights (int32 offsets), "
                             f"got N={N} rows of stride {w.stride(0)} words")
        s, z = unit_stride_last(scales), unit_stride_last(zeros)
        b = bias.contiguous() if bias is not None else s
        mma = _int4_mma_applies(x, s, z, group_size)
        if config is not None and config.get("MMA") and not (mma and M <= MAX_KERNEL_ROWS):
            raise ValueError(f"{name}: the tensor-core config needs at most {MAX_KERNEL_ROWS} rows of x on a CUDA "
                             f"GPU, scales and zeros in x's dtype, group_size >= {INT4_MMA_MIN_GROUP} and "
                             f"K % 128 == 0; got {M} rows, group_size={group_size}, K={K}")
        if M <= MAX_KERNEL_ROWS and mma and (config is None or config.get("MMA")):
            if x2.storage_offset() % 4 or (M > 1 and x2.stride(0) % 4):  # x read as int64 (4 elements each)
                x2 = x2.clone(memory_format=torch.contiguous_format)
            x64 = x2.view(torch.int64)
            w64 = (w.clone(memory_format=torch.contiguous_format) if w.stride(0) % 2 or w.storage_offset() % 2
                   else w).view(torch.int64)
            cfg = None if config is None else {k: v for k, v in config.items() if k != "MMA"}
            out = _run(_int4_mma_kernel, M, N, out, [x64, w64, s, z, b],
                       {"_scalars": (M, N, K, x64.stride(0) if M > 1 else 0, w64.stride(0), s.stride(0),
                                     z.stride(0)),
                        "GROUP": group_size, "HAS_BIAS": bias is not None, "F16": x.dtype == torch.float16,
                        "ROWS": 1 if M == 1 else (8 if M <= 8 else 16), **pdl_options(x)}, cfg)
            return out.reshape(*x.shape[:-1], N)
        out = _run(_int4_kernel, M, N, out, [x2, w, s, z, b],
                   {"_scalars": (M, N, K, _m_bucket(M), x2.stride(0), w.stride(0), s.stride(0), z.stride(0), N,
                                 _EXP_2_23),
                    "GROUP": group_size, "HAS_BIAS": bias is not None,
                    "UPCAST_DOT": _upcast_dot(x), **pdl_options(x)}, config)
    elif M and N:
        out.zero_()
        if bias is not None:
            out += bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], N)


_DEQUANT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def int4_dequantize_triton(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """Launch the one-pass dequantization kernel (``int4_dequantize_ref``'s result, bit for
    bit): reads the packed weights once and writes (N, K) ``dtype``. One fixed tile (16 rows
    × 256 columns, 4 warps): a streaming pass with nothing to tune."""
    name = "int4_dequantize_triton"
    _require_triton(name)
    N, K = _check_packed(name, w_packed, scales, zeros, group_size)
    if dtype not in _DEQUANT_DTYPES:
        raise TypeError(f"{name} writes bfloat16, float16 or float32, got {dtype}")
    out = torch.empty((N, K), dtype=dtype, device=w_packed.device)
    if N and K:
        w, sc, zr = unit_stride_last(w_packed), unit_stride_last(scales), unit_stride_last(zeros)
        grid = (triton.cdiv(N, 16), triton.cdiv(K, 256))
        _int4_dequant_kernel[grid](w, sc, zr, out, N, K, w.stride(0), sc.stride(0), zr.stride(0), GROUP=group_size,
                                   BLOCK_N=16, BLOCK_K=256, num_warps=4, enable_fp_fusion=False)
    return out


# ----------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------
def _kernel_applies(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        0 < rows <= MAX_KERNEL_ROWS
        and x.shape[-1] > 0
        and cuda_kernel_applies(x, dtypes=_KERNEL_DTYPES)
        and all(t is None or t.device == x.device for t in others)
    )


@torch.library.custom_op("fastzoo::decode_linear", mutates_args=())
def _decode_linear_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                      norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5, glu: bool = False,
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    opts = dict(norm_weight=norm_weight, norm_eps=norm_eps, glu=glu, residual=residual)
    if _kernel_applies(x, w, bias, norm_weight, residual) and w.shape[0] > 0:
        return decode_linear_triton(x, w, bias, **opts)
    return decode_linear_ref(x, w, bias, **opts)


@_decode_linear_op.register_fake
def _(x, w, bias, norm_weight=None, norm_eps=1e-5, glu=False, residual=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("fastzoo::int8_weight_only_linear", mutates_args=())
def _int8_op(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
             norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5, glu: bool = False,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    opts = dict(norm_weight=norm_weight, norm_eps=norm_eps, glu=glu, residual=residual)
    if _kernel_applies(x, w_int8, scales, bias, norm_weight, residual) and w_int8.shape[0] > 0:
        return int8_weight_only_linear_triton(x, w_int8, scales, bias, **opts)
    return int8_weight_only_linear_ref(x, w_int8, scales, bias, **opts)


@_int8_op.register_fake
def _(x, w_int8, scales, bias, norm_weight=None, norm_eps=1e-5, glu=False, residual=None):
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


@torch.library.custom_op("fastzoo::int4_weight_only_linear", mutates_args=())
def _int4_op(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group_size: int, bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor] = None,
             norm_eps: float = 1e-5, glu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    if _kernel_applies(x, w_packed, scales, zeros, bias, norm_weight, residual) and w_packed.shape[0] > 0:
        return int4_weight_only_linear_triton(x, w_packed, scales, zeros, group_size, bias, norm_weight=norm_weight,
                                              norm_eps=norm_eps, glu=glu, residual=residual)
    # more rows (prefill), or no kernel: dequantize (one pass on CUDA), then F.linear (cuBLAS);
    # int4_weight_only_linear_ref's result either way
    x = _prologue_ref(x, norm_weight, norm_eps, glu)
    w = _int4_dequantize_any(w_packed, scales, zeros, group_size, x.dtype)
    return _residual_ref(F.linear(x, w, None if bias is None else bias.to(x.dtype)), residual)


def _int4_dequantize_any(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """The dequantization kernel where it applies (float scales and zeros on the weights' CUDA
    device, Ampere or newer, Triton importable; a bf16 / fp16 / fp32 result), the reference
    elsewhere: the same bits."""
    if cuda_kernel_applies(scales, zeros) and w_packed.device == scales.device and dtype in _DEQUANT_DTYPES:
        return int4_dequantize_triton(w_packed, scales, zeros, group_size, dtype)
    return int4_dequantize_ref(w_packed, scales, zeros, group_size, dtype)


@torch.library.custom_op("fastzoo::int4_dequantize", mutates_args=())
def _int4_dequantize_op(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                        dtype: torch.dtype) -> torch.Tensor:
    return _int4_dequantize_any(w_packed, scales, zeros, group_size, dtype)


@_int4_dequantize_op.register_fake
def _(w_packed, scales, zeros, group_size, dtype):
    return w_packed.new_empty((w_packed.shape[0], w_packed.shape[1] * 2), dtype=dtype)


def int4_dequantize(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """(N, K/2) packed uint8 (``Int4WeightOnlyLinear``'s layout) → (N, K) ``dtype``:
    q · scale + zero per group in fp32, then cast. One Triton pass on CUDA (bf16, fp16 or
    fp32 out), ``int4_dequantize_ref`` elsewhere; the same bits either way."""
    _check_packed("int4_dequantize", w_packed, scales, zeros, group_size)
    return _int4_dequantize_op(w_packed, scales, zeros, int(group_size), dtype)


@_int4_op.register_fake
def _(x, w_packed, scales, zeros, group_size, bias, norm_weight=None, norm_eps=1e-5, glu=False, residual=None):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


def decode_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5, glu: bool = False,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` with a bandwidth-bound Triton kernel for at most 16 rows of x.

    x (..., K) bf16/fp16 (fp32: PyTorch only); w (N, K) in x's dtype; bias (N,) in x's
    dtype or fp32. Returns (..., N) in x's dtype. Kernel on CUDA (Ampere+) for <= 16
    rows, ``F.linear`` otherwise. Traceable by ``torch.compile(fullgraph=True)``.
    ``norm_weight``/``norm_eps``, ``glu``, ``residual``: RMSNorm / SwiGLU prologue and
    residual epilogue fused into the product (the module docstring); the reference elsewhere.
    """
    N, K = _check_float_args("decode_linear", x, w, bias, glu)
    _check_fusion("decode_linear", x, N, K, norm_weight, norm_eps, residual)
    return _decode_linear_op(x, w, bias, norm_weight, float(norm_eps), bool(glu), residual)


def int8_weight_only_linear(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, *, norm_weight: Optional[torch.Tensor] = None,
                            norm_eps: float = 1e-5, glu: bool = False,
                            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, w_int8.to(x.dtype)) * scales + bias``: int8 weight-only linear.

    x (..., K) bf16/fp16 (fp32: PyTorch only); w_int8 int8 (N, K); scales (N,) float
    (per output channel); bias (N,) in x's dtype or fp32. Kernel on CUDA for <= 16
    rows (weights dequantized in registers), dequantize + ``F.linear`` otherwise.
    ``norm_weight``/``norm_eps``, ``glu``, ``residual``: as in ``decode_linear``.
    """
    N, K = _check_int8_args("int8_weight_only_linear", x, w_int8, scales, bias, glu)
    _check_fusion("int8_weight_only_linear", x, N, K, norm_weight, norm_eps, residual)
    return _int8_op(x, w_int8, scales, bias, norm_weight, float(norm_eps), bool(glu), residual)


def int4_weight_only_linear(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                            group_size: int, bias: Optional[torch.Tensor] = None, *,
                            norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5, glu: bool = False,
                            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16 linear in ``Int4WeightOnlyLinear``'s layout (see the module docstring).

    x (..., K) bf16/fp16 (fp32: PyTorch only); w_packed uint8 (N, K/2); scales, zeros
    (N, K/group_size) float; group_size in (32, 64, 128, 256). Kernel on CUDA for <= 16
    rows, dequantize + ``F.linear`` otherwise. The options as in ``decode_linear``
    (``residual + F.linear(RMSNorm(silu(a) · b), ...)``): inside the kernel for one row on
    Hopper (``int4_gemv_gluon``), composed in PyTorch elsewhere.
    """
    N, K = _check_int4_args("int4_weight_only_linear", x, w_packed, scales, zeros, group_size, bias, glu)
    _check_fusion("int4_weight_only_linear", x, N, K, norm_weight, norm_eps, residual)
    return _int4_op(x, w_packed, scales, zeros, group_size, bias, norm_weight, float(norm_eps), bool(glu), residual)
