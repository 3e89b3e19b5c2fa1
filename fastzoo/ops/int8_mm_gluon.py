"""Hopper int8 GEMM in Gluon (Triton's lower-level dialect), with asynchronous wgmma.

Triton's software pipeliner keeps a ``tl.dot`` asynchronous only when its accumulator is
fp32 (rule 2.1 of ``dotCanBeProperlyAsync`` in Triton's WGMMAPipeline.cpp), so each int8
MMA of ``int8_mm``'s ``tl`` kernel is waited for right after it is issued. Here the
pipeline is written out:

* a persistent grid: one program per SM walks the output tiles in grouped order;
* a ring of STAGES shared-memory slots that TMA fills STAGES - 1 K-steps ahead, across tile
  boundaries (the next tile's first operands arrive during this tile's epilogue);
* one K-step of wgmma in flight while the next is issued; when the older one is done its
  slot is refilled;
* the epilogue's per-row / per-column vectors (scales, bias) loaded when the tile starts, so
  that their latency hides under its MMAs; the epilogue itself is ``int8_mm``'s
  (``_dequantize_tile``, ``_requantize_tile``); the residual arrives by TMA into the output
  buffer while the tile's MMAs run.

The public op (``fastzoo.ops.int8_scaled_mm``) takes this kernel on Hopper for large M
(``int8_mm._tma_path_applies``) where ``gluon_path_applies`` allows; the ``tl`` persistent
kernel is the fallback. Gluon does not run under Triton's interpreter: the CPU tests cover
the ``tl`` kernels and the reference, the ``cuda`` tests this one.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ._common import _capability, triton_available

# block (BLOCK_M, BLOCK_N, BLOCK_K), stages, warps, group (GROUP_M): the best tile of a sweep at
# ViT-L and SAM shapes on an H100, GROUP_M 4 / 8 / 16 within its noise
# (experiments/results/h100-80gb-hbm3/int8_mm_gluon_sweep.json). A tile always has two
# accumulators, each BLOCK_N / 2 wide (int8 wgmma's n is at most 224 in Triton).
DEFAULT_CONFIG = {"block": (128, 256, 128), "stages": 3, "warps": 8, "group": 8}


@functools.lru_cache(maxsize=None)
def gluon_available() -> bool:
    """Whether this Triton has Gluon's Hopper API (Triton >= 3.5: the GPU image's 3.6 does)."""
    if not triton_available():
        return False
    try:
        from triton.experimental import gluon  # noqa: F401
        from triton.experimental.gluon import language as gl  # noqa: F401
        from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401
            fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


if gluon_available():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from .int8_mm import _dequantize_tile, _requantize_tile, _tile_coords

    @gluon.jit
    def _issue_load(step, k_tiles, num_pid_m, num_pid_n, a_desc, b_desc, a_bufs, b_bufs, bars, total,
                    GROUP_M: gl.constexpr, STAGES: gl.constexpr):
        """TMA loads of this program's ``step``-th (tile, K block) into slot step % STAGES
        (nothing past its last step)."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        pred = step < total
        t = step // k_tiles
        kk = step - t * k_tiles
        pid_m, pid_n = _tile_coords(gl.program_id(0) + t * gl.num_programs(0), num_pid_m, num_pid_n, GROUP_M)
        s = step % STAGES
        bar = bars.index(s)
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, kk * BLOCK_K], bar, a_bufs.index(s), pred)
        tma.async_copy_global_to_shared(b_desc, [pid_n * BLOCK_N, kk * BLOCK_K], bar, b_bufs.index(s), pred)

    @gluon.jit
    def _load_vec(ptr, offs, n, stride, other: gl.constexpr):
        return gl.load(ptr + offs * stride, mask=offs < n, other=other).to(gl.float32)

    @gluon.jit
    def _epilogue_part(acc, a_s, b_s, bias, o_s, off_m, off_n, c_buf, c_desc, layout: gl.constexpr,
                       HAS_BIAS: gl.constexpr, ACT_GELU: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
                       OUT_INT8: gl.constexpr):
        """One accumulator part: ``int8_mm``'s epilogue (scales, bias, GELU, residual from
        ``c_buf``, int8 re-quantization), stored through ``c_buf`` by TMA. The vectors
        arrive in a compact layout and are spread over the accumulator's here."""
        row: gl.constexpr = gl.SliceLayout(1, layout)
        col: gl.constexpr = gl.SliceLayout(0, layout)
        out = _dequantize_tile(acc, gl.convert_layout(a_s, row), gl.convert_layout(b_s, col),
                               gl.convert_layout(bias, col), HAS_BIAS, ACT_GELU)
        if HAS_RESIDUAL:
            out = out + c_buf.load(layout).to(gl.float32)
        if OUT_INT8:
            out = _requantize_tile(out, 1.0 / gl.convert_layout(o_s, col))
        c_buf.store(out.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_buf)

    @gluon.jit
    def _tile_vectors(t, start, progs, num_pid_m, num_pid_n, M, N, as_ptr, bs_ptr, bias_ptr, os_ptr, stride_as,
                      stride_bs, stride_os, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                      vec: gl.constexpr, HAS_BIAS: gl.constexpr, OUT_INT8: gl.constexpr):
        """Tile t's origin and its two parts' epilogue vectors (a_s, b_s, bias, o_s each), in a
        compact layout: loaded when the tile starts, their latency hidden under its MMAs."""
        PART_N: gl.constexpr = BLOCK_N // 2
        pid_m, pid_n = _tile_coords(start + t * progs, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        a_s = _load_vec(as_ptr, off_m + gl.arange(0, BLOCK_M, layout=vec), M, stride_as, 0.0)
        offs_n0 = off_n + gl.arange(0, PART_N, layout=vec)
        offs_n1 = offs_n0 + PART_N
        b_s0 = _load_vec(bs_ptr, offs_n0, N, stride_bs, 0.0)
        b_s1 = _load_vec(bs_ptr, offs_n1, N, stride_bs, 0.0)
        bias0, bias1, o_s0, o_s1 = b_s0, b_s1, b_s0, b_s1
        if HAS_BIAS:
            bias0 = _load_vec(bias_ptr, offs_n0, N, 1, 0.0)
            bias1 = _load_vec(bias_ptr, offs_n1, N, 1, 0.0)
        if OUT_INT8:
            o_s0 = _load_vec(os_ptr, offs_n0, N, stride_os, 1.0)
            o_s1 = _load_vec(os_ptr, offs_n1, N, stride_os, 1.0)
        return off_m, off_n, (a_s, b_s0, bias0, o_s0), (a_s, b_s1, bias1, o_s1)

    @gluon.jit
    def _k_steps(acc0, acc1, c, a_bufs, b_bufs, bars, largs, PART_N: gl.constexpr, STAGES: gl.constexpr,
                 GROUP_M: gl.constexpr):
        """A tile's K-steps after its first (both parts accumulating; c: the program's step
        counter), one step's MMAs in flight while the next is issued."""
        for kk in range(1, largs[0]):  # largs[0]: k_tiles
            s = c % STAGES
            mbarrier.wait(bars.index(s), (c // STAGES) & 1)
            a_t = a_bufs.index(s)
            b_t = b_bufs.index(s)
            acc0 = warpgroup_mma(a_t, b_t.slice(0, PART_N).permute((1, 0)), acc0, is_async=True)
            acc1 = warpgroup_mma(a_t, b_t.slice(PART_N, PART_N).permute((1, 0)), acc1, is_async=True)
            # at most this step's MMAs in flight: the previous step's are done, its slot free
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))
            _issue_load(c + STAGES - 1, *largs, GROUP_M, STAGES)
            c += 1
        return acc0, acc1, c

    @gluon.jit
    def _first_mma(acc, c, a_bufs, b_bufs, bars, PART: gl.constexpr, PART_N: gl.constexpr, STAGES: gl.constexpr,
                   WAIT: gl.constexpr):
        """A tile's first K-step for one accumulator part (a fresh accumulator)."""
        s = c % STAGES
        if WAIT:
            mbarrier.wait(bars.index(s), (c // STAGES) & 1)
        b_t = b_bufs.index(s).slice(PART * PART_N, PART_N).permute((1, 0))
        return warpgroup_mma(a_bufs.index(s), b_t, acc, use_acc=False, is_async=True)

    @gluon.jit
    def _load_residual(r_desc, off_m, off_n, r_bar, c_bufs, PART_N: gl.constexpr):
        """The tile's residual into the output buffers (once the last tile's stores left them)."""
        tma.store_wait(pendings=0)
        mbarrier.expect(r_bar, r_desc.block_type.nbytes * 2)
        tma.async_copy_global_to_shared(r_desc, [off_m, off_n], r_bar, c_bufs.index(0))
        tma.async_copy_global_to_shared(r_desc, [off_m, off_n + PART_N], r_bar, c_bufs.index(1))

    @gluon.jit
    def _int8_mm_gluon_kernel(a_desc, b_desc, c_desc, r_desc, as_ptr, bs_ptr, bias_ptr, os_ptr,
                              M, N, K, stride_as, stride_bs, stride_os,
                              STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                              HAS_BIAS: gl.constexpr, ACT_GELU: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
                              OUT_INT8: gl.constexpr, num_warps: gl.constexpr):
        # Two accumulators per tile, each BLOCK_N / 2 columns (one wgmma n each), stored by the
        # epilogue one by one through their own buffers. At a tile boundary part 0's epilogue
        # runs first, then the next tile's first part-0 MMAs are issued and part 1's epilogue
        # runs under them: ptxas keeps the wgmma pipeline when the MMA in flight during an
        # epilogue starts a fresh accumulator (see int8_mm_gluon_skew_tried.json).
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        PART_N: gl.constexpr = BLOCK_N // 2
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, PART_N, 32])
        vec: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BLOCK_M, PART_N], c_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        r_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(r_bar, count=1)

        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        start = gl.program_id(0)
        progs = gl.num_programs(0)
        my_tiles = (num_pid_m * num_pid_n - start + progs - 1) // progs
        total = my_tiles * k_tiles
        largs = (k_tiles, num_pid_m, num_pid_n, a_desc, b_desc, a_bufs, b_bufs, bars, total)
        vargs = (start, progs, num_pid_m, num_pid_n, M, N, as_ptr, bs_ptr, bias_ptr, os_ptr, stride_as, stride_bs,
                 stride_os)
        for p in gl.static_range(STAGES - 1):
            _issue_load(p, *largs, GROUP_M, STAGES)

        # tile 0's first step
        off_m, off_n, v0, v1 = _tile_vectors(0, *vargs, BLOCK_M, BLOCK_N, GROUP_M, vec, HAS_BIAS, OUT_INT8)
        if HAS_RESIDUAL:
            _load_residual(r_desc, off_m, off_n, r_bar, c_bufs, PART_N)
        acc0 = gl.zeros((BLOCK_M, PART_N), dtype=gl.int32, layout=mma_layout)
        acc1 = acc0
        acc0 = _first_mma(acc0, 0, a_bufs, b_bufs, bars, 0, PART_N, STAGES, True)
        acc1 = _first_mma(acc1, 0, a_bufs, b_bufs, bars, 1, PART_N, STAGES, False)
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))
        _issue_load(STAGES - 1, *largs, GROUP_M, STAGES)
        c = 1
        for t in range(my_tiles - 1):
            acc0, acc1, c = _k_steps(acc0, acc1, c, a_bufs, b_bufs, bars, largs, PART_N, STAGES,
                                     GROUP_M)
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
            if HAS_RESIDUAL:
                mbarrier.wait(r_bar, t & 1)
            else:
                tma.store_wait(pendings=0)  # the last tile's stores have left the buffers
            _epilogue_part(acc0, v0[0], v0[1], v0[2], v0[3], off_m, off_n, c_bufs.index(0), c_desc, mma_layout,
                           HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8)
            # the next tile's first part-0 step runs under part 1's epilogue
            acc0 = _first_mma(acc0, c, a_bufs, b_bufs, bars, 0, PART_N, STAGES, True)
            _epilogue_part(acc1, v1[0], v1[1], v1[2], v1[3], off_m, off_n + PART_N, c_bufs.index(1), c_desc,
                           mma_layout, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8)
            acc1 = _first_mma(acc1, c, a_bufs, b_bufs, bars, 1, PART_N, STAGES, False)
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))
            _issue_load(c + STAGES - 1, *largs, GROUP_M, STAGES)
            c += 1
            off_m, off_n, v0, v1 = _tile_vectors(t + 1, *vargs, BLOCK_M, BLOCK_N, GROUP_M, vec, HAS_BIAS, OUT_INT8)
            if HAS_RESIDUAL:
                _load_residual(r_desc, off_m, off_n, r_bar, c_bufs, PART_N)
        # the last tile
        acc0, acc1, c = _k_steps(acc0, acc1, c, a_bufs, b_bufs, bars, largs, PART_N, STAGES, GROUP_M)
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
        if HAS_RESIDUAL:
            mbarrier.wait(r_bar, (my_tiles - 1) & 1)
        else:
            tma.store_wait(pendings=0)
        _epilogue_part(acc0, v0[0], v0[1], v0[2], v0[3], off_m, off_n, c_bufs.index(0), c_desc, mma_layout,
                       HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8)
        _epilogue_part(acc1, v1[0], v1[1], v1[2], v1[3], off_m, off_n + PART_N, c_bufs.index(1), c_desc,
                       mma_layout, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8)
        tma.store_wait(pendings=0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        mbarrier.invalidate(r_bar)


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.int8: "int8"}


def gluon_path_applies(a: torch.Tensor, out: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """The Gluon kernel serves int8 CUDA operands on Hopper into a bf16 / fp16 / int8 output;
    a residual only of the output's dtype (it is read through the output's shared-memory
    buffer). The caller checks the TMA conditions (large M, strides)."""
    if not (a.is_cuda and gluon_available() and a.dtype == torch.int8 and out.dtype in _GL_DTYPES
            and (residual is None or residual.dtype == out.dtype)):
        return False
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] == 9  # wgmma, TMA: Hopper


def int8_mm_gluon_launch(a, b, a_s, b_s, bias, out, residual, o_s, activation, config=None, return_kernel=False):
    """Launch the Gluon kernel into ``out`` (arguments checked and laid out as for
    ``int8_mm._int8_scaled_mm_tma_launch``; ``gluon_path_applies`` true). ``config``: a
    dict like ``DEFAULT_CONFIG`` (the benchmark's sweep). Returns ``out``, or ``(out,
    compiled kernel)`` with ``return_kernel``."""
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    cfg = {**DEFAULT_CONFIG, **(config or {})}
    bm, bn, bk = cfg["block"]
    part = bn // 2
    M, K = a.shape
    N = b.shape[0]

    def desc(t, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, _GL_DTYPES[t.dtype]))
        return TensorDescriptor.from_tensor(t, block, layout)

    c_desc = desc(out, [bm, part])
    r_desc = desc(residual, [bm, part]) if residual is not None else c_desc
    from .int8_mm import _num_sms

    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    progs = min(_num_sms(index), triton.cdiv(M, bm) * triton.cdiv(N, bn))
    kernel = _int8_mm_gluon_kernel[(progs,)](
        desc(a, [bm, bk]), desc(b, [bn, bk]), c_desc, r_desc, a_s, b_s,
        bias if bias is not None else b_s, o_s if o_s is not None else b_s,
        M, N, K,
        a_s.stride(0) if a_s.numel() > 1 else 0,
        b_s.stride(0) if b_s.numel() > 1 else 0,
        o_s.stride(0) if o_s is not None and o_s.numel() > 1 else 0,
        STAGES=cfg["stages"], GROUP_M=cfg["group"],
        HAS_BIAS=bias is not None, ACT_GELU=activation == "gelu", HAS_RESIDUAL=residual is not None,
        OUT_INT8=o_s is not None, num_warps=cfg["warps"])
    return (out, kernel) if return_kernel else out
