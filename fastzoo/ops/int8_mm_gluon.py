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

A second kernel, ``_int8_mm_pingpong_kernel``, is warp-specialized (``gl.warp_specialize``):
a one-warp producer issues the TMA loads, two consumer warpgroups take the program's tiles in
turn, each with a whole 128 x 128 accumulator, so that one's epilogue runs while the other's
MMAs do (the scheme of CUTLASS's "ping-pong" kernels). ``default_config`` picks between them
by K.

The public op (``fastzoo.ops.int8_scaled_mm``) takes these kernels on Hopper for large M
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
# accumulators, each BLOCK_N / 2 wide (one wgmma n of 128 each).
DEFAULT_CONFIG = {"block": (128, 256, 128), "stages": 3, "warps": 8, "group": 8}
# The ping-pong kernel (``_int8_mm_pingpong_kernel``): a consumer warpgroup's 128 x 128 tile,
# a 4-slot ring; registers (consumer, producer) a thread under ``maxnreg`` for its 12 warps
# (168 * 384 fits the 64K register file; consumer 0 gets what the other two leave: 232).
PINGPONG_CONFIG = {"block": (128, 128, 128), "stages": 4, "group": 8, "pingpong": True, "regs": (232, 40),
                   "maxnreg": 168}
# Ping-pong up to this K: its overlapped epilogue wins where the epilogue is a large share of a
# tile's time (ViT-L and SAM vit_b at K = 768 / 1024: 2-8 % faster on an H100), the one-partition
# 128 x 256 tile at deeper K (5-15 % faster at K = 3072 / 4096, where a 128-wide tile's extra
# operand traffic costs more than the epilogue): int8_mm_gluon_pingpong_sweep.json.
PINGPONG_MAX_K = 2048
# and a 5-slot ring up to this K (230,520 B of shared memory with bf16 out): SAM vit_b's K = 768
# GEMMs 3-11 % faster than with 4 slots in three calls, ViT-L's K = 1024 qkv and fc1 5-12 % slower
# (int8_mm_gluon_pingpong_stages.json)
PINGPONG_5_SLOTS_MAX_K = 768


def default_config(K: int) -> dict:
    """The kernel and tile the public op takes for reduction depth ``K`` (a copy)."""
    if K > PINGPONG_MAX_K:
        return dict(DEFAULT_CONFIG)
    return {**PINGPONG_CONFIG, "stages": 5 if K <= PINGPONG_5_SLOTS_MAX_K else PINGPONG_CONFIG["stages"]}


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
    def _program_tiles(M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
        """The persistent grid's walk: tiles along M and N, K-steps a tile, this program's first
        tile and stride, and its number of tiles."""
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        start = gl.program_id(0)
        progs = gl.num_programs(0)
        my_tiles = (num_pid_m * num_pid_n - start + progs - 1) // progs
        return num_pid_m, num_pid_n, gl.cdiv(K, BLOCK_K), start, progs, my_tiles

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
        b_s0, bias0, o_s0 = _column_vectors(offs_n0, N, bs_ptr, bias_ptr, os_ptr, stride_bs, stride_os, HAS_BIAS,
                                            OUT_INT8)
        b_s1, bias1, o_s1 = _column_vectors(offs_n0 + PART_N, N, bs_ptr, bias_ptr, os_ptr, stride_bs, stride_os,
                                            HAS_BIAS, OUT_INT8)
        return off_m, off_n, (a_s, b_s0, bias0, o_s0), (a_s, b_s1, bias1, o_s1)

    @gluon.jit
    def _column_vectors(offs_n, N, bs_ptr, bias_ptr, os_ptr, stride_bs, stride_os, HAS_BIAS: gl.constexpr,
                        OUT_INT8: gl.constexpr):
        """The epilogue's per-column vectors at ``offs_n``: b_s, bias and o_s (b_s where absent)."""
        b_s = _load_vec(bs_ptr, offs_n, N, stride_bs, 0.0)
        bias = b_s
        o_s = b_s
        if HAS_BIAS:
            bias = _load_vec(bias_ptr, offs_n, N, 1, 0.0)
        if OUT_INT8:
            o_s = _load_vec(os_ptr, offs_n, N, stride_os, 1.0)
        return b_s, bias, o_s

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

        num_pid_m, num_pid_n, k_tiles, start, progs, my_tiles = _program_tiles(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
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

    # ---- ping-pong: a producer warp and two consumer warpgroups on alternate tiles ----------

    @gluon.jit
    def _pp_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, STAGES: gl.constexpr,
                     GROUP_M: gl.constexpr):
        """The producer warp: TMA loads of every (tile, K-step) of this program, in order, into
        the ring's slots as the consumers free them."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        num_pid_m, num_pid_n, k_tiles, start, progs, my_tiles = _program_tiles(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
        c = 0
        for t in range(my_tiles):
            pid_m, pid_n = _tile_coords(start + t * progs, num_pid_m, num_pid_n, GROUP_M)
            for kk in range(k_tiles):
                s = c % STAGES
                mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
                bar = ready.index(s)
                mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, kk * BLOCK_K], bar, a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [pid_n * BLOCK_N, kk * BLOCK_K], bar, b_bufs.index(s))
                c += 1

    @gluon.jit
    def _pp_consumer(a_desc, b_desc, c_desc, r_desc, a_bufs, b_bufs, c_bufs, ready, empty, r_bars, turns, as_ptr,
                     bs_ptr, bias_ptr, os_ptr, M, N, K, stride_as, stride_bs, stride_os, STAGES: gl.constexpr,
                     GROUP_M: gl.constexpr, HAS_BIAS: gl.constexpr, ACT_GELU: gl.constexpr,
                     HAS_RESIDUAL: gl.constexpr, OUT_INT8: gl.constexpr, WG: gl.constexpr):
        """Consumer warpgroup WG (0 or 1) of four warps: the program's tiles WG, WG + 2, ... with
        the whole tile's accumulator; while it runs one tile's epilogue the other warpgroup
        runs its tile's MMAs (the ring hands the slots over in tile order)."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
        vec: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        num_pid_m, num_pid_n, k_tiles, start, progs, my_tiles = _program_tiles(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
        c_buf = c_bufs.index(WG)
        r_bar = r_bars.index(WG)
        for t in range(WG, my_tiles, 2):
            pid_m, pid_n = _tile_coords(start + t * progs, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            # the epilogue's vectors, their latency hidden under the MMAs
            a_s = _load_vec(as_ptr, off_m + gl.arange(0, BLOCK_M, layout=vec), M, stride_as, 0.0)
            b_s, bias, o_s = _column_vectors(off_n + gl.arange(0, BLOCK_N, layout=vec), N, bs_ptr, bias_ptr, os_ptr,
                                             stride_bs, stride_os, HAS_BIAS, OUT_INT8)
            if HAS_RESIDUAL:  # into the output buffer, once this warpgroup's last stores left it
                tma.store_wait(pendings=0)
                mbarrier.expect(r_bar, r_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(r_desc, [off_m, off_n], r_bar, c_buf)
            c0 = t * k_tiles
            acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.int32, layout=layout)
            # The other warpgroup's turn ends when it has waited for all of tile t - 1's slots:
            # only then may this one wait on them, since a parity wait cannot tell a slot's
            # fill for step c from its fill for step c - 2 * STAGES.
            mbarrier.wait(turns.index(WG), ((t - 1) // 2) & 1, pred=t > 0)
            for kk in range(k_tiles):
                s = (c0 + kk) % STAGES
                mbarrier.wait(ready.index(s), ((c0 + kk) // STAGES) & 1)
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, use_acc=kk > 0,
                                    is_async=True)
                # this step's MMAs in flight, the previous step's done: its slot back to the producer
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                mbarrier.arrive(empty.index((c0 + kk + STAGES - 1) % STAGES), pred=kk > 0)
            mbarrier.arrive(turns.index(1 - WG))  # the other warpgroup's MMAs may start
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((c0 + k_tiles - 1) % STAGES))
            if HAS_RESIDUAL:
                mbarrier.wait(r_bar, (t // 2) & 1)
            else:
                tma.store_wait(pendings=0)  # this warpgroup's last stores have left the buffer
            _epilogue_part(acc, a_s, b_s, bias, o_s, off_m, off_n, c_buf, c_desc, layout, HAS_BIAS, ACT_GELU,
                           HAS_RESIDUAL, OUT_INT8)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _int8_mm_pingpong_kernel(a_desc, b_desc, c_desc, r_desc, as_ptr, bs_ptr, bias_ptr, os_ptr,
                                 M, N, K, stride_as, stride_bs, stride_os,
                                 STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                                 HAS_BIAS: gl.constexpr, ACT_GELU: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
                                 OUT_INT8: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                 PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        # Warp-specialized: the default partition (num_warps = 4) is consumer 0, a worker
        # warpgroup consumer 1, a one-warp worker the producer (12 warps in all: a warpgroup
        # each). Each consumer holds a whole BLOCK_M x BLOCK_N tile in one accumulator (one
        # wgmma n); the epilogue of one overlaps the other's MMAs, where the one-partition
        # kernel's MMAs wait for its own epilogue.
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        # a consumer releases step c - 1's slot once step c is in flight: two slots at least
        gl.static_assert(STAGES >= 2, "the ping-pong ring needs two slots at least")
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BLOCK_M, BLOCK_N], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        r_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(r_bars.index(i), count=1)
            mbarrier.init(turns.index(i), count=1)
        # the default partition (consumer 0), then the workers: consumer 1, the producer
        gl.warp_specialize([
            (_pp_consumer, (a_desc, b_desc, c_desc, r_desc, a_bufs, b_bufs, c_bufs, ready, empty, r_bars, turns,
                            as_ptr, bs_ptr, bias_ptr, os_ptr, M, N, K, stride_as, stride_bs, stride_os, STAGES,
                            GROUP_M, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8, 0)),
            (_pp_consumer, (a_desc, b_desc, c_desc, r_desc, a_bufs, b_bufs, c_bufs, ready, empty, r_bars, turns,
                            as_ptr, bs_ptr, bias_ptr, os_ptr, M, N, K, stride_as, stride_bs, stride_os, STAGES,
                            GROUP_M, HAS_BIAS, ACT_GELU, HAS_RESIDUAL, OUT_INT8, 1)),
            (_pp_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, STAGES, GROUP_M)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


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
    dict overriding ``DEFAULT_CONFIG``, or ``PINGPONG_CONFIG`` where it sets ``pingpong`` (the
    benchmark's sweep); None: ``default_config(K)``. Returns ``out``, or ``(out, compiled
    kernel)`` with ``return_kernel``."""
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    M, K = a.shape
    if config is None:
        cfg = default_config(K)
    else:
        cfg = {**(PINGPONG_CONFIG if config.get("pingpong") else DEFAULT_CONFIG), **config}
    bm, bn, bk = cfg["block"]
    part = bn // 2
    N = b.shape[0]

    def desc(t, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, _GL_DTYPES[t.dtype]))
        return TensorDescriptor.from_tensor(t, block, layout)

    pingpong = cfg.get("pingpong", False)
    if pingpong and (bm * bn > 128 * 128 or cfg["stages"] < 2):
        raise ValueError(f"int8_mm_gluon_launch: a ping-pong consumer holds at most a 128 x 128 int32 accumulator "
                         f"(128 registers a thread) and needs 2 ring slots at least; got block {cfg['block']}, "
                         f"stages {cfg['stages']}")
    c_block = [bm, bn] if pingpong else [bm, part]  # ping-pong: a consumer stores its whole tile
    c_desc = desc(out, c_block)
    r_desc = desc(residual, c_block) if residual is not None else c_desc
    from .int8_mm import _num_sms

    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    progs = min(_num_sms(index), triton.cdiv(M, bm) * triton.cdiv(N, bn))
    args = (desc(a, [bm, bk]), desc(b, [bn, bk]), c_desc, r_desc, a_s, b_s,
            bias if bias is not None else b_s, o_s if o_s is not None else b_s,
            M, N, K,
            a_s.stride(0) if a_s.numel() > 1 else 0,
            b_s.stride(0) if b_s.numel() > 1 else 0,
            o_s.stride(0) if o_s is not None and o_s.numel() > 1 else 0)
    flags = dict(STAGES=cfg["stages"], GROUP_M=cfg["group"], HAS_BIAS=bias is not None,
                 ACT_GELU=activation == "gelu", HAS_RESIDUAL=residual is not None, OUT_INT8=o_s is not None)
    if pingpong:
        kernel = _int8_mm_pingpong_kernel[(progs,)](*args, **flags, CONSUMER_REGS=cfg["regs"][0],
                                                    PRODUCER_REGS=cfg["regs"][1], num_warps=4,
                                                    maxnreg=cfg["maxnreg"])
    else:
        kernel = _int8_mm_gluon_kernel[(progs,)](*args, **flags, num_warps=cfg["warps"])
    return (out, kernel) if return_kernel else out
