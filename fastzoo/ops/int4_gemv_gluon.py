"""One-row int4 weight-only GEMV on Hopper in Gluon: the weights stream through a TMA ring.

``weight_only_linear._int4_mma_kernel`` (Triton ``tl``) loads each lane's weight words with
scalar global loads into registers. Nsight Compute showed it latency bound: 127-156
registers a thread, 19-25 % occupancy, warps waiting on their loads and DRAM at 26-53 % of
peak. Here the same arithmetic (inline-PTX ``mma.sync.m16n8k16``: the nibbles become the
16-bit floats magic + q by bit operations, the group's scale and zero apply once per row in
fp32; see ``_int4_mma_asm``) consumes words that TMA has copied into a ring of STAGES
shared-memory slots of one or two 128-column segments (64 bytes a row each), STAGES slots
ahead: the bytes in flight no longer cost registers.

A program owns BLOCK_N = 16 * G rows (G row blocks of 16, spread over its warps) and a
contiguous range of segments (split-K). A slot holds the program's rows' words of one
segment (or two, one after the other), (BLOCK_N, 16) int32 without swizzle, read back as
(G, 2, 8, 4, 4): row 16 g + 8 h + r, words 4 c + w. Lane 4 r + c of a row block's warp
takes words 4c..4c+3 of rows r and r + 8 (two 16-byte shared loads); the lane layout is
explicit here, so no compiler choice can mix lanes of different row blocks (the reason the
``tl`` kernel keeps every tensor 1-D). Split-K partials meet in a workspace; the last split
to arrive sums them in order.

With ``PAR`` > 1 a step of a slot holds PAR segments side by side (PAR · G row blocks over
the warps): warp rows q = p·G + g accumulate row block g's share of the step's p-th segment
(their x and Σx rows differ, ``_x_from_smem``), and the PAR shares of each row block are
summed across warps once, at the end. That puts PAR times the warps on the same rows and
bytes without split-K's costs (each program stages its split's x, and the splits' partials
meet in global memory).

Before its first segment each program stages its split's product input in shared memory, 8
segments a warp a pass (a pass's loads all in flight at once, 8 columns a thread in one 16-byte
load): each 8 columns in the order the mma's pairs take them (reordered in registers), and
each segment's Σx (the zero point's term). The loop then reads x with 16-byte
shared loads and needs no permutes and no second mma for Σx; the scales and zeros come from
global memory a segment ahead. ``decode_linear``'s options (RMSNorm, SwiGLU, residual) run
in the same staging: silu(a)·b and the norm weight are applied to the staged values, each
rounded to x's dtype (the reference rounds the normalized value before the weight; here the
row's factor comes last, in fp32), and Σv² for the norm comes from the same loads;
the norm's row factor rsqrt(Σv²/K + eps), the bias and the residual apply to the fp32 sums
(with split-K, each split's Σv² share is combined by the reducing split).

Groups of 32 or 64 columns (gpt-fast's default int4 group is 32) take the same mma, which
sums 16 columns of 4 lanes, i.e. of all 4 column quarters of a segment: a group's sum is
kept apart in the mma's output columns, 7 of whose 8 the one-row product leaves unused. A
lane zeroes its x in every output column but its group's (an and per x pair and segment), so
each group's Σ t·x lands in its own column, where its lane applies the group's scale and zero;
a row's result is then the sum of its 4 lanes' shares.

Gluon does not run under Triton's interpreter. ``cuda`` tests compare it to the reference;
a CPU test compiles it for sm_90 ahead of time.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import _capability, arrival_counters, gdc_launch_dependents, gdc_wait
from .int8_mm_gluon import gluon_available

SEGMENT = 128  # columns of one segment: one quantization group, part of one, or 4 / 2 whole ones
GROUPS = "in (32, 64) or a multiple of 128"  # the group sizes the kernel takes (``group_applies``)


def group_applies(group_size: int) -> bool:
    """Groups of 32 or 64 columns (4 or 2 to a segment: each lane's 32 columns are whole
    groups, see ``_int4_gemv_gluon_kernel``) or a multiple of 128 (a segment in one group)."""
    return group_size in (32, 64) or (group_size > 0 and group_size % SEGMENT == 0)


# rows a program (16 * row blocks; times par, at least one a warp), warps, splits of K at most
# (each split a contiguous range of 128-column segments), ring depth in slots, segments a slot
# (1 or 2 one after the other: one barrier wait and refill per slot); optional "par" (1, 2 or 4): each step
# of a slot holds that many segments side by side, taken by different warps (par · block_n / 16
# row blocks' shares over the warps, summed across warps at the end: more warps on the same
# rows without split-K's partials and its per-program staging of x); optional "trigger": True
# (with PDL) lets the next kernel launch as soon as this grid's programs have started
DEFAULT_CONFIG = {"block_n": 64, "warps": 4, "split_k": 8, "stages": 8, "segs": 1}
# the candidates ``experiments.bench_weight_only_linear --sweep`` times (kind int4gluon)
SWEEP = ([{"block_n": bn, "warps": w, "split_k": sk, "stages": st, "segs": sg}
          for bn, w in ((32, 2), (64, 4), (128, 4), (256, 8))
          for sk in (1, 2, 4, 8, 16) for st, sg in ((4, 1), (8, 1), (4, 2))]
         + [{"block_n": bn, "warps": w, "par": par, "split_k": sk, "stages": st, "segs": sg}
            for bn, w, par in ((32, 4, 2), (64, 8, 2), (16, 4, 4))
            for sk in (1, 2, 4, 8) for st, sg in ((4, 1), (2, 2), (8, 1))])
SHARED_LIMIT = 232448  # bytes of shared memory a program may take on Hopper (227 KiB)
_TUNED: dict = {}  # (device, N, K, group, dtype, bias, pdl, options) -> the fastest candidate (tuned_config)


def ring_bytes(cfg: dict) -> int:
    """Shared memory of a configuration's weight ring: stages × segments a slot (segs one after
    the other, each of par side by side) × 64 bytes a row."""
    return cfg["stages"] * cfg.get("segs", 1) * cfg.get("par", 1) * cfg["block_n"] * 64


def tile_name(cfg: dict) -> str:
    """A configuration as text, e.g. ``N32 split1 w4 ring2x2 par2`` (benchmarks' tables)."""
    return (f"N{cfg['block_n']} split{cfg['split_k']} w{cfg['warps']} ring{cfg['stages']}x{cfg.get('segs', 1)}"
            + (f" par{cfg['par']}" if cfg.get("par", 1) > 1 else ""))


def _staged_segments(n_seg: int, split: int, warps: int) -> int:
    """Segments of staged input a program holds (the kernel's ``NS``): a split's segments
    rounded up to a pass of ``_stage_x`` (8 a warp)."""
    per = -(-n_seg // split)
    return -(-per // (8 * warps)) * 8 * warps


def _staged_bytes(n_seg: int, split: int, warps: int) -> int:
    """Shared memory for the staged product input of one split and its segments' Σx: 384
    bytes a segment (256 of x, 128 of Σx copies)."""
    return _staged_segments(n_seg, split, warps) * 384


def candidates(N: int, K: int, num_sms: int) -> list[dict]:
    """The configurations ``tuned_config`` times for an (N, K) weight, chosen from a probe of
    Llama-2-7B's shapes with the decode's fusions (``int4_gemv_gluon_par_probe.json``): 64 rows
    a program on 4 warps with 8 segments in flight (8 one-segment slots or 4 two-segment
    ones) at the splits of K that give between one and four programs an SM (or the largest
    split where even that is too few); 32 rows on 4 warps taking 2 segments side by side
    (``par``), at those splits and without split-K; 16 or 32 rows on 4 or 8 warps taking 4
    segments side by side, without split-K. 5–9 candidates at Llama-2-7B's shapes, each a
    compile at the first call (the whole sweep: ``experiments.bench_weight_only_linear
    --sweep``)."""
    n_seg = max(1, K // SEGMENT)

    def filling(bn):  # the splits that give one to four programs an SM (or the largest where even that is too few)
        tiles = -(-N // bn)
        splits = [sk for sk in (1, 2, 4, 8, 16) if sk <= n_seg and num_sms <= tiles * sk <= 4 * num_sms]
        return splits or [min(16, n_seg) if tiles < num_sms else 1]

    out = []
    # rows, warps, par, ring (slots, segments a slot), splits
    for bn, warps, par, rings, splits in ((64, 4, 1, ((8, 1), (4, 2)), filling(64)),
                                          (32, 4, 2, ((2, 2),), sorted({1, *filling(32)})),
                                          (16, 4, 4, ((2, 1),), [1]), (32, 8, 4, ((2, 1),), [1])):
        out += [{"block_n": bn, "warps": warps, "split_k": sk, "stages": st, "segs": sg,
                 **({"par": par} if par > 1 else {})}
                for sk in splits for st, sg in rings]
    return out


if gluon_available():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    import triton.language as tl  # tl.debug_barrier: a CTA barrier in every Gluon version (gl.thread_barrier
    # in Triton 3.6, gl.barrier in 3.8)
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

    from .weight_only_linear import _int4_mma_segment_p, _int4_mma_sz

    @gluon.jit
    def _issue(w_desc, bufs, bars, i, seg0, n_local, row0, STAGES: gl.constexpr, T: gl.constexpr):
        """TMA of the program's i-th slot, its T segments i·T.., into ring slot i % STAGES
        (none past the last; a last slot with fewer segments left reads the last one again)."""
        pred = i * T < n_local
        s = i % STAGES
        bar = bars.index(s)
        mbarrier.expect(bar, T * w_desc.block_type.nbytes, pred=pred)
        for t in gl.static_range(T):
            seg = seg0 + gl.minimum(i * T + t, n_local - 1)
            tma.async_copy_global_to_shared(w_desc, [row0, seg * 16], bar, bufs.index(s * T + t), pred)

    @gluon.jit
    def _lane_words(t, L2: gl.constexpr):
        """(G, 2, 8, 4, 4) words [row block, h, r, c, w] held as lane 4r + c's 8 words →
        U, V: 4 tensors (G, 32) each, word w of rows r (h = 0) and r + 8 (h = 1) in lane 4r + c."""
        G: gl.constexpr = t.shape[0]
        t = gl.permute(t, (0, 2, 3, 1, 4))  # [g, r, c, h, w]
        t = gl.reshape(t, (G, 8, 4, 2, 2, 2))  # w = 2 w1 + w0
        w_0, w_1 = gl.split(t)  # w0
        w_00, w_10 = gl.split(w_0)  # w1: words 0, 2
        w_01, w_11 = gl.split(w_1)  # words 1, 3
        u0, v0 = gl.split(w_00)
        u2, v2 = gl.split(w_10)
        u1, v1 = gl.split(w_01)
        u3, v3 = gl.split(w_11)
        U = (_lanes(u0, L2), _lanes(u1, L2), _lanes(u2, L2), _lanes(u3, L2))
        V = (_lanes(v0, L2), _lanes(v1, L2), _lanes(v2, L2), _lanes(v3, L2))
        return U, V

    @gluon.jit
    def _lanes(t, L2: gl.constexpr):
        """(G, 8, 4) [g, r, c] → (G, 32) in L2 (element [g, 4r + c] in lane 4r + c): only a
        relabelling, checked at compile time."""
        return gl.convert_layout(gl.reshape(t, (t.shape[0], 32)), L2, assert_trivial=True)

    @gluon.jit
    def _prologue(xe_ptr, nw_ptr, cols, mask, K, GLU: gl.constexpr, NORM: gl.constexpr):
        """The product's input at ``cols``, each step rounded to x's dtype, in fp32: silu(a)·b
        of x = [a | b] with GLU (as the reference), times the RMSNorm weight with NORM (the
        row's factor comes in the epilogue, on the fp32 sums: the reference applies it before
        the weight); and the values before the norm weight (Σ their squares is the norm's)."""
        XDT: gl.constexpr = xe_ptr.dtype.element_ty
        a = gl.load(xe_ptr + cols, mask=mask, other=0.0).to(gl.float32)
        if GLU:
            # (K is a multiple of 128: written so, the compiler knows b's 16-byte loads are aligned)
            b = gl.load(xe_ptr + (K // 128) * 128 + cols, mask=mask, other=0.0).to(gl.float32)
            a = (a / (1.0 + gl.exp(-a))).to(XDT).to(gl.float32)  # F.silu in x's dtype
            a = (a * b).to(XDT).to(gl.float32)
        v = a
        if NORM:
            a = (a * gl.load(nw_ptr + cols, mask=mask, other=0.0).to(gl.float32)).to(XDT).to(gl.float32)
        return a, v

    @gluon.jit
    def _stage_x(xe_ptr, nw_ptr, xs, sxs, seg0, n_local, K, GLU: gl.constexpr, NORM: gl.constexpr,
                 GROUP: gl.constexpr, num_warps: gl.constexpr):
        """The split's product input (``_prologue``) into shared memory, 8 segments a warp a
        pass (the pass's loads all in flight at once: the input's latency is paid once, not once
        a segment; each thread's 8 columns in one 16-byte load: 8 times fewer loads than one a
        column, and a program's staging 1.3-3.9 µs instead of 1.5-4.4 at Llama-2-7B's shapes):
        xs (segments rounded up to a pass, 2, 64) in x's dtype, segment j's 128 values at j ·
        128 with each 8 columns in the order the mma's pairs take them (0 4 1 5 2 6 3 7,
        reordered in registers: no permutes in the loop), and sxs (segments, 1, 32): segment
        j's Σ of those values, 32 copies (one a lane; the zero point's term, which the ``tl`` kernel gets from
        a second mma). With groups of 32 or 64 columns (``Q`` = 1 or 2 column quarters of a
        segment) lane 4r + c holds instead the Σx of the group that starts at quarter c, 0 where
        no group starts there (see ``_int4_gemv_gluon_kernel``). Returns Σv² over the split's
        columns (the RMSNorm's share: the splits of a row tile together cover the row)."""
        LP: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
        flat2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        CH: gl.constexpr = 8 * num_warps  # segments a pass: all their loads in flight together
        rows = gl.arange(0, CH, layout=gl.SliceLayout(1, LP))
        cols = gl.expand_dims(gl.arange(0, 128, layout=gl.SliceLayout(0, LP)), 0)
        ssq = 0.0
        for t in range(gl.cdiv(n_local, CH)):
            segs = gl.expand_dims(t * CH + rows, 1)
            # each thread's 8 columns in one 16-byte load (cols < 128 always holds: it broadcasts
            # the segments' mask over the tile)
            xp, v = _prologue(xe_ptr, nw_ptr, (seg0 + segs) * 128 + cols, (segs < n_local) & (cols < 128), K,
                              GLU, NORM)
            # each 8 columns in the mma's pair order, 0 4 1 5 2 6 3 7, in registers: [.., h, i] → [.., i, h]
            xq = gl.reshape(gl.permute(gl.reshape(xp, (CH, 16, 2, 4)), (0, 1, 3, 2)), (CH, 128))
            tiles = xs._reinterpret(xs.dtype, [xs.shape[0] // CH, 2 * CH, 64], xs.layout)
            tiles.index(t)._reinterpret(xs.dtype, [CH, 128], flat2).store(xq.to(xs.dtype))
            if GROUP < 128:  # (the permutation keeps each column in its quarter: the sums of xp)
                Q: gl.constexpr = GROUP // 32
                c = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, LP)), 0) % 4  # lane 4r + c's quarter
                sums = gl.zeros((CH, 32), gl.float32, LP)
                for cq in gl.static_range(4):  # the quarters
                    part = gl.expand_dims(gl.sum(gl.where(cols // 32 == cq, xp, 0.0), axis=1), 1)
                    sums += gl.where((c // Q == cq // Q) & (c % Q == 0), part, 0.0)
            else:
                sums, _ = gl.broadcast(gl.expand_dims(gl.sum(xp, axis=1), 1), gl.zeros((CH, 32), gl.float32, LP))
            stiles = sxs._reinterpret(gl.float32, [sxs.shape[0] // CH, CH, 32], sxs.layout)
            stiles.index(t)._reinterpret(gl.float32, [CH, 32], flat2).store(sums)
            ssq += gl.sum(gl.sum(v * v, axis=1), axis=0)  # masked columns load as 0 (and silu(0) · 0 = 0)
        return ssq

    @gluon.jit
    def _x_from_smem(xs, j, fill, L2: gl.constexpr, num_warps: gl.constexpr, PAR: gl.constexpr, GB: gl.constexpr):
        """Segments j..j+PAR-1's product input from ``_stage_x``'s buffer as ``_int4_mma_segment_p``
        takes it: 8 pairs of int32 (two 16-bit values each), (PAR·GB, 32) tensors in L2, row
        p·GB + g holding segment j + p (GB: 1, broadcast over the row blocks, or G where the
        segments go to different warps: the kernel's PAR), lane 4r + c holding the words
        16c..16c+15 (its 32 columns, each 8 in the mma's pair order). Four 16-byte shared loads
        a lane for each segment its rows hold (the 8 lanes of a column quarter read the same
        addresses). ``fill``: the (8, 4) [r, c] int32 mask each lane's pairs are and-ed with
        (-1: kept, 0: zero), or None: kept in every lane (groups of 128 or more)."""
        # GB warps take one segment (one row block each: GB ≤ num_warps, see the launcher)
        LX: gl.constexpr = gl.BlockedLayout([1, 1, 16], [1, 4, 8], [num_warps // GB, 1, GB], [1, 2, 0])
        flat3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
        # xs (NS, 2, 64) → (NS / PAR, 2 PAR, 64): j is a multiple of PAR
        t = xs._reinterpret(xs.dtype, [xs.shape[0] // PAR, 2 * PAR, 64], xs.layout).index(j // PAR)
        t = t._reinterpret(gl.int32, [PAR, 4, 16], flat3).load(LX)
        t = gl.reshape(t, (PAR, 4, 8, 2))  # [p, c, pair, half]
        lo, hi = gl.split(t)
        lo = gl.reshape(lo, (PAR, 4, 4, 2))
        hi = gl.reshape(hi, (PAR, 4, 4, 2))
        lo_a, lo_b = gl.split(lo)  # pairs 0, 2, 4, 6 / 1, 3, 5, 7
        hi_a, hi_b = gl.split(hi)
        lo_a = gl.reshape(lo_a, (PAR, 4, 2, 2))
        lo_b = gl.reshape(lo_b, (PAR, 4, 2, 2))
        hi_a = gl.reshape(hi_a, (PAR, 4, 2, 2))
        hi_b = gl.reshape(hi_b, (PAR, 4, 2, 2))
        l0, l4 = gl.split(lo_a)  # pairs 0, 4 / 2, 6 after the next split
        l1, l5 = gl.split(lo_b)
        h0, h4 = gl.split(hi_a)
        h1, h5 = gl.split(hi_b)
        p0, p4 = gl.split(l0)
        p2, p6 = gl.split(l4)
        p1, p5 = gl.split(l1)
        p3, p7 = gl.split(l5)
        q0, q4 = gl.split(h0)
        q2, q6 = gl.split(h4)
        q1, q5 = gl.split(h1)
        q3, q7 = gl.split(h5)
        return ((_quarter(p0, fill, L2, num_warps, GB), _quarter(q0, fill, L2, num_warps, GB)),
                (_quarter(p1, fill, L2, num_warps, GB), _quarter(q1, fill, L2, num_warps, GB)),
                (_quarter(p2, fill, L2, num_warps, GB), _quarter(q2, fill, L2, num_warps, GB)),
                (_quarter(p3, fill, L2, num_warps, GB), _quarter(q3, fill, L2, num_warps, GB)),
                (_quarter(p4, fill, L2, num_warps, GB), _quarter(q4, fill, L2, num_warps, GB)),
                (_quarter(p5, fill, L2, num_warps, GB), _quarter(q5, fill, L2, num_warps, GB)),
                (_quarter(p6, fill, L2, num_warps, GB), _quarter(q6, fill, L2, num_warps, GB)),
                (_quarter(p7, fill, L2, num_warps, GB), _quarter(q7, fill, L2, num_warps, GB)))

    @gluon.jit
    def _quarter(t, fill, L2: gl.constexpr, num_warps: gl.constexpr, GB: gl.constexpr):
        """(PAR, 4) [p, c], lane 4r + c holding element [p, c] → (PAR·GB, 32) in L2, element
        [p·GB + g, 4r + c] in lane 4r + c (the same for every g): relabellings only, checked at
        compile time; and-ed with ``fill`` [r, c] if given."""
        LB: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1], [1, 1, 8, 4], [num_warps // GB, GB, 1, 1], [3, 2, 1, 0])
        PAR: gl.constexpr = t.shape[0]
        t = gl.convert_layout(t, gl.SliceLayout(1, gl.SliceLayout(2, LB)), assert_trivial=True)
        t = gl.expand_dims(gl.expand_dims(t, 1), 2)  # [p, g, r, c]
        if fill is None:
            t = t + gl.zeros((PAR, GB, 8, 4), gl.int32, LB)  # the same in every g and r
        else:
            t = t & gl.expand_dims(gl.expand_dims(gl.convert_layout(fill, gl.SliceLayout(0, gl.SliceLayout(1, LB)),
                                                                    assert_trivial=True), 0), 1)
            if GB > 1:
                t = t + gl.zeros((PAR, GB, 8, 4), gl.int32, LB)
        return gl.convert_layout(gl.reshape(t, (PAR * GB, 32)), L2, assert_trivial=True)

    @gluon.jit
    def _sx_from_smem(sxs, j, L2: gl.constexpr, num_warps: gl.constexpr, PAR: gl.constexpr, GB: gl.constexpr):
        """Segments j..j+PAR-1's Σx from ``_stage_x``'s buffer, (PAR·GB, 32) in L2 as
        ``_x_from_smem``'s pairs."""
        flat2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        if PAR == 1:  # (GB is 1)
            return sxs.index(j)._reinterpret(gl.float32, [1, 32], flat2).load(L2)
        LS: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 1, 32], [num_warps // GB, GB, 1], [2, 1, 0])
        t = sxs._reinterpret(gl.float32, [sxs.shape[0] // PAR, PAR, 32], sxs.layout).index(j // PAR)
        t = t._reinterpret(gl.float32, [PAR, 32], flat2).load(gl.SliceLayout(1, LS))
        t = gl.expand_dims(t, 1) + gl.zeros((PAR, GB, 32), gl.float32, LS)
        return gl.convert_layout(gl.reshape(t, (PAR * GB, 32)), L2, assert_trivial=True)

    @gluon.jit
    def _int4_gemv_gluon_kernel(w_desc, xe_ptr, nw_ptr, r_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                                N, K, stride_sn, stride_zn, eps,
                                GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, F16: gl.constexpr,
                                SPLIT_K: gl.constexpr, STAGES: gl.constexpr, SEGS: gl.constexpr, PAR: gl.constexpr,
                                NORM: gl.constexpr, GLU: gl.constexpr, HAS_RES: gl.constexpr, NS: gl.constexpr,
                                PDL: gl.constexpr, TRIGGER: gl.constexpr, num_warps: gl.constexpr):
        # xe_ptr: x in its dtype ([a | b] with GLU), from which each program makes its split's
        # product input into shared memory first (_stage_x). NS: segments of staged input
        # (_staged_segments: a split's, rounded up to a pass of _stage_x).
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        G: gl.constexpr = BLOCK_N // 16
        L5: gl.constexpr = gl.BlockedLayout([1, 2, 1, 1, 4], [1, 1, 8, 4, 1], [num_warps, 1, 1, 1, 1],
                                            [4, 3, 2, 1, 0])
        L2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0])

        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        row0 = pid_n * BLOCK_N
        n_seg = K // 128
        per = gl.cdiv(n_seg, SPLIT_K)
        seg0 = pid_k * per
        n_local = gl.maximum(gl.minimum(n_seg, seg0 + per) - seg0, 0)

        T: gl.constexpr = SEGS * PAR  # segments a slot
        bufs = gl.allocate_shared_memory(gl.int32, [STAGES * T, BLOCK_N, 16], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        # the weights do not depend on the previous kernel: requested before waiting for it
        for i in gl.static_range(STAGES):
            _issue(w_desc, bufs, bars, i, seg0, n_local, row0, STAGES, T)
        if PDL:
            gdc_wait()
        if TRIGGER:  # the next kernel may launch now: its programs take the SMs this grid frees
            gdc_launch_dependents()
        # the staged input (NS, 2, 64) in x's dtype and each segment's Σx (NS, 1, 32); index() needs
        # a layout of the view's rank or one less: unswizzled NVMMA layouts of rank 2 as the
        # containers, read and written through plain row-major reinterpretations
        xs = gl.allocate_shared_memory(xe_ptr.dtype.element_ty, [NS, 2, 64],
                                       gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2))
        sxs = gl.allocate_shared_memory(gl.float32, [NS, 1, 32],
                                        gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2))
        ssq = _stage_x(xe_ptr, nw_ptr, xs, sxs, seg0, n_local, K, GLU, NORM, GROUP, num_warps)
        tl.debug_barrier()  # the staged input is visible to every warp

        # the accumulators' rows: q = p·G + g, row block g's share of segment j + p of a step (one
        # segment of each row block with PAR = 1; PAR segments side by side in PAR·G warps else)
        q = gl.expand_dims(gl.arange(0, PAR * G, layout=gl.SliceLayout(1, L2)), 1)
        if PAR > 1:  # (PAR = 1 keeps the code of before: no index arithmetic)
            g_idx = q % G
            qp = q // G
            GB: gl.constexpr = G  # x differs between a warp's row blocks (_x_from_smem)
        else:
            g_idx = q
            qp = 0
            GB: gl.constexpr = 1
        lane = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, L2)), 0)
        r = lane // 4
        row = (row0 + g_idx * 16 + r) % N  # rows past the edge wrap (their results are not stored)
        row8 = (row0 + g_idx * 16 + 8 + r) % N
        s_offs = row * stride_sn
        z_offs = row * stride_zn
        s8_offs = row8 * stride_sn
        z8_offs = row8 * stride_zn
        if GROUP < 128:
            # Groups of 32 / 64 columns, Q = 1 / 2 quarters: the mma's output column n (wasted
            # otherwise: x is one column) keeps the groups apart. Lane 4r + c gives its x (of
            # quarter c) to column n = r only where r = 2 (c - c % Q), zero elsewhere, so column
            # 2c' sums the group that starts at quarter c', and the lane 4r + c' that holds
            # output column 2c' (mma d0 / d2, rows r / r + 8) applies that group's scale and zero
            # (the Σx staged for it; the other lanes hold zero sums and a zero Σx)
            Q: gl.constexpr = GROUP // 32
            LB: gl.constexpr = gl.BlockedLayout([1, 1], [8, 4], [num_warps, 1], [1, 0])
            rb = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(1, LB)), 1)
            cb = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LB)), 0)
            fill = gl.where(rb == 2 * (cb - cb % Q), -1, 0)
            gcol = (lane % 4) * 32 // GROUP  # the lane's group in the segment
            s_offs += gcol
            z_offs += gcol
            s8_offs += gcol
            z8_offs += gcol
        else:
            fill = None
        acc_r = gl.zeros((PAR * G, 32), gl.float32, L2)
        acc_r8 = gl.zeros((PAR * G, 32), gl.float32, L2)
        zero = gl.zeros((PAR * G, 32), gl.float32, L2)

        # scales and zeros a segment ahead; x and Σx from the staged buffers when used
        last = seg0 + gl.maximum(n_local - 1, 0)
        SZ = _int4_mma_sz(s_ptr, z_ptr, gl.minimum(seg0 + qp, n_seg - 1), s_offs, z_offs, s8_offs, z8_offs, GROUP)
        # a slot's words as (STAGES·SEGS) steps of PAR segments: (PAR·G, 2, 8, 4, 4) each
        words = bufs._reinterpret(gl.int32, [STAGES * SEGS, PAR * BLOCK_N, 16], w_desc.layout)
        for i in range(gl.cdiv(n_local, T)):
            j = i * T  # the slot's first segment
            SZ1 = _int4_mma_sz(s_ptr, z_ptr, gl.minimum(seg0 + j + PAR + qp, last), s_offs, z_offs, s8_offs, z8_offs,
                               GROUP)
            s = i % STAGES
            mbarrier.wait(bars.index(s), (i // STAGES) & 1)
            U, V = _lane_words(words.index(s * SEGS)._reinterpret(gl.int32, [PAR * G, 2, 8, 4, 4], flat).load(L5), L2)
            if SEGS == 2:
                U2, V2 = _lane_words(
                    words.index(s * SEGS + 1)._reinterpret(gl.int32, [PAR * G, 2, 8, 4, 4], flat).load(L5), L2)
            tl.debug_barrier()  # every warp has read slot s before it is refilled
            _issue(w_desc, bufs, bars, i + STAGES, seg0, n_local, row0, STAGES, T)
            acc_r, acc_r8 = _segment(acc_r, acc_r8, U, V, SZ, xs, sxs, j, zero, fill, F16, L2, num_warps, PAR, GB)
            SZ = SZ1
            if SEGS == 2:
                SZ1 = _int4_mma_sz(s_ptr, z_ptr, gl.minimum(seg0 + j + 2 * PAR + qp, last), s_offs, z_offs, s8_offs,
                                   z8_offs, GROUP)
                if j + PAR < n_local:  # not past the split's last segment (past it, x is staged as 0)
                    acc_r, acc_r8 = _segment(acc_r, acc_r8, U2, V2, SZ, xs, sxs, j + PAR, zero, fill, F16, L2,
                                             num_warps, PAR, GB)
                SZ = SZ1
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        # row r's result is in lanes 4r..4r+3: rows 16g + r (lo) and 16g + 8 + r (hi); all equal
        # (groups of 128+), or a share each (groups of 32 / 64)
        LG: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [num_warps, 1], [1, 0])
        if PAR > 1:  # the PAR segments' shares of each row block: summed across warps
            acc_r = gl.convert_layout(gl.sum(gl.reshape(acc_r, (PAR, G, 32)), axis=0), L2)
            acc_r8 = gl.convert_layout(gl.sum(gl.reshape(acc_r8, (PAR, G, 32)), axis=0), L2)
        if GROUP < 128:
            lo = gl.convert_layout(gl.sum(gl.reshape(acc_r, (G, 8, 4)), axis=2), LG)
            hi = gl.convert_layout(gl.sum(gl.reshape(acc_r8, (G, 8, 4)), axis=2), LG)
        else:
            lo = gl.convert_layout(gl.max(gl.reshape(acc_r, (G, 8, 4)), axis=2), LG)
            hi = gl.convert_layout(gl.max(gl.reshape(acc_r8, (G, 8, 4)), axis=2), LG)
        offs_lo = (row0 + 16 * gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, LG)), 1)
                   + gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, LG)), 0))
        offs_hi = offs_lo + 8
        m_lo = offs_lo < N
        m_hi = offs_hi < N
        if SPLIT_K == 1:
            factor = gl.rsqrt(ssq / K + eps)  # RMSNorm's row factor (unused without NORM)
            _finish(lo, offs_lo, m_lo, b_ptr, r_ptr, out_ptr, factor, HAS_BIAS, NORM, HAS_RES)
            _finish(hi, offs_hi, m_hi, b_ptr, r_ptr, out_ptr, factor, HAS_BIAS, NORM, HAS_RES)
        else:
            gl.store(ws_ptr + pid_k * N + offs_lo, lo, mask=m_lo)
            gl.store(ws_ptr + pid_k * N + offs_hi, hi, mask=m_hi)
            n_tiles = gl.num_programs(0)
            ss_ptr = ws_ptr + SPLIT_K * N + pid_n  # each split's Σv² share for this row tile after the partials
            if NORM:
                gl.store(ss_ptr + pid_k * n_tiles, ssq)
            tl.debug_barrier()  # every thread's partial is stored before the arrival is released
            arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                lo = gl.zeros_like(lo)
                hi = gl.zeros_like(hi)
                total_ss = 0.0
                for i in gl.static_range(SPLIT_K):  # in split order: the same sum every launch
                    lo += gl.load(ws_ptr + i * N + offs_lo, mask=m_lo, other=0.0, cache_modifier=".cg")
                    hi += gl.load(ws_ptr + i * N + offs_hi, mask=m_hi, other=0.0, cache_modifier=".cg")
                    if NORM:
                        total_ss += gl.load(ss_ptr + i * n_tiles, cache_modifier=".cg")
                factor = gl.rsqrt(total_ss / K + eps)
                _finish(lo, offs_lo, m_lo, b_ptr, r_ptr, out_ptr, factor, HAS_BIAS, NORM, HAS_RES)
                _finish(hi, offs_hi, m_hi, b_ptr, r_ptr, out_ptr, factor, HAS_BIAS, NORM, HAS_RES)
                gl.atomic_xchg(cnt_ptr + pid_n, 0)

    @gluon.jit
    def _segment(acc_r, acc_r8, U, V, SZ, xs, sxs, j, zero, fill, F16: gl.constexpr, L2: gl.constexpr,
                 num_warps: gl.constexpr, PAR: gl.constexpr, GB: gl.constexpr):
        """Segments j..j+PAR-1's products into the accumulators (PAR·G rows, see the kernel): their
        words U, V, scales and zeros SZ, x (in the mma's pair order, and-ed with ``fill``) and Σx
        from ``_stage_x``'s buffers."""
        return _int4_mma_segment_p(acc_r, acc_r8, U, V, _x_from_smem(xs, j, fill, L2, num_warps, PAR, GB), SZ,
                                   _sx_from_smem(sxs, j, L2, num_warps, PAR, GB), zero, F16)

    @gluon.jit
    def _finish(res, offs_n, mask, b_ptr, r_ptr, out_ptr, factor, HAS_BIAS: gl.constexpr, NORM: gl.constexpr,
                HAS_RES: gl.constexpr):
        """The row's RMSNorm factor, bias and residual on the fp32 sums; stored in out's dtype."""
        if NORM:
            res = res * factor
        if HAS_BIAS:
            res += gl.load(b_ptr + offs_n, mask=mask, other=0.0).to(gl.float32)
        if HAS_RES:
            res += gl.load(r_ptr + offs_n, mask=mask, other=0.0).to(gl.float32)
        gl.store(out_ptr + offs_n, res.to(out_ptr.dtype.element_ty), mask=mask)


@torch.compiler.assume_constant_result
def _gluon_device(index: int) -> bool:
    """Whether CUDA device ``index`` runs the Gluon GEMV (Hopper, a Triton with Gluon): a
    constant to ``torch.compile`` (the device of a compiled model does not change)."""
    return gluon_available() and _capability(index)[0] == 9


def int4_fusion_applies(x: torch.Tensor, in_features: int, group_size: int) -> bool:
    """Whether ``int4_weight_only_linear`` runs its RMSNorm / SwiGLU / residual options
    inside the Gluon kernel for an input like ``x`` (one row of bf16 / fp16 on a Hopper GPU,
    groups as ``group_applies``, ``in_features`` a multiple of 128); elsewhere it composes them in
    PyTorch, and a model does better to leave them to ``torch.compile``. Shapes, dtypes and
    the device only (no data pointers): traceable by ``torch.compile``."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[:-1].numel() == 1
            and group_applies(group_size) and in_features % SEGMENT == 0 and in_features > 0):
        return False
    return _gluon_device(x.device.index if x.device.index is not None else torch.cuda.current_device())


def int4_gemv_gluon_applies(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                            group_size: int, *, glu: bool = False, norm_weight: Optional[torch.Tensor] = None,
                            residual: Optional[torch.Tensor] = None) -> bool:
    """One row of bf16 / fp16 x on a Hopper GPU (TMA), scales and zeros in x's dtype, groups
    of 32, 64 or a multiple of 128 columns (``group_applies``), K a multiple of 128 (x holds
    2K values with ``glu``), the packed weights as TMA reads them (unit last stride, base and
    row stride 16-byte aligned: a weight made by ``quantize``; others go to the ``tl``
    kernels rather than being copied at every call); a norm weight and a residual in x's
    dtype."""
    K = x.shape[-1] // (2 if glu else 1)
    if not (x.is_cuda and gluon_available() and x.dtype in (torch.bfloat16, torch.float16)
            and scales.dtype == x.dtype and zeros.dtype == x.dtype and group_applies(group_size)
            and K > 0 and K % SEGMENT == 0 and x.numel() == x.shape[-1]
            and w_packed.dim() == 2 and w_packed.stride(-1) == 1 and w_packed.stride(0) % 16 == 0
            and w_packed.data_ptr() % 16 == 0
            and (norm_weight is None or norm_weight.dtype == x.dtype)
            and (residual is None or residual.dtype == x.dtype)):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] == 9


def int4_gemv_gluon_launch(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, bias: Optional[torch.Tensor] = None, config: Optional[dict] = None,
                           pdl: bool = False, out: Optional[torch.Tensor] = None, *,
                           norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-5, glu: bool = False,
                           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x · dequantize(w_packed)ᵀ (+ bias) for one row of x (``int4_gemv_gluon_applies``
    true; shapes checked by the caller): (N, K/2) packed uint8 (column 2j in byte j's low
    nibble), (N, K/group_size) scales and zeros. With the options, as
    ``weight_only_linear.int4_weight_only_linear_ref``: ``residual + F.linear(RMSNorm(silu(a)
    · b), w, bias)`` for x = [a | b] (``glu``), the RMSNorm's weight ``norm_weight``; the
    product's input is made once per program into shared memory, the norm's row factor
    applies to the sums. ``config``: a dict like ``DEFAULT_CONFIG``. Returns (1, N) in x's
    dtype (into ``out`` where given)."""
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if not group_applies(group_size):  # any other group would mix groups in the mma (or divide by zero)
        raise ValueError(f"int4_gemv_gluon_launch: group_size must be {GROUPS}, got {group_size}")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    K = x.shape[-1] // (2 if glu else 1)
    # (whole segments; the kernel reads SwiGLU's b at (K // 128) · 128)
    if K <= 0 or K % SEGMENT or x.shape[-1] != K * (2 if glu else 1):
        raise ValueError(f"int4_gemv_gluon_launch: x's last dimension must be a positive multiple of {SEGMENT}"
                         f"{' (twice that with glu)' if glu else ''}, got {x.shape[-1]}")
    N = w_packed.shape[0]
    x2 = x.reshape(1, -1).contiguous()
    w32 = w_packed.view(torch.int32)  # (N, K/8): word j holds columns 8j..8j+7, column 8j + i at bits 4i
    bn, warps, par, segs = cfg["block_n"], cfg["warps"], cfg.get("par", 1), cfg.get("segs", 1)
    if par not in (1, 2, 4):
        raise ValueError(f"int4_gemv_gluon_launch: par (segments side by side in a program's warps) must be 1, 2 or 4, "
                         f"got {par}")
    if bn not in (16, 32, 64, 128, 256) or (bn * par) % (16 * warps):
        raise ValueError(f"int4_gemv_gluon_launch: block_n must be a power of two of 16..256 rows with, times "
                         f"par={par}, a row block of 16 for each of the {warps} warps at least, got block_n={bn}")
    if par > 1 and bn > 16 * warps:  # each warp holds at most one row block of a segment (_x_from_smem's layout)
        raise ValueError(f"int4_gemv_gluon_launch: with par={par} a warp takes one row block of a segment: block_n "
                         f"must be at most 16 rows a warp ({16 * warps} for {warps} warps), got block_n={bn}")
    if segs not in (1, 2):
        raise ValueError(f"int4_gemv_gluon_launch: segs (segments a ring slot) must be 1 or 2, got {segs}")
    if cfg["stages"] < 1:
        raise ValueError(f"int4_gemv_gluon_launch: stages (ring slots) must be at least 1, got {cfg['stages']}")
    ring = ring_bytes(cfg)
    n_seg = K // SEGMENT
    least = _staged_bytes(n_seg, n_seg, warps)  # the staged input at the largest split
    if ring + least + 1024 > SHARED_LIMIT:
        raise ValueError(f"int4_gemv_gluon_launch: a ring of {cfg['stages']} slots of {segs * par} segments "
                         f"for {bn} rows needs {ring} bytes of shared memory; beside the staged input ({least} "
                         f"bytes at least for {warps} warps) at most {SHARED_LIMIT - 1024 - least} fit")
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    w_desc = TensorDescriptor(w32, [N, K // 8], [w32.stride(0), 1], [bn, 16], layout)
    split = max(1, min(cfg["split_k"], n_seg))
    while ring + _staged_bytes(n_seg, split, warps) + 1024 > SHARED_LIMIT and split < n_seg:
        split = min(n_seg, split * 2)  # the staged input of a split must fit beside the ring
    n_tiles = triton.cdiv(N, bn)
    if out is None:
        out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    ws = torch.empty(split * (N + n_tiles) if split > 1 else 1, dtype=torch.float32, device=x.device)
    cnt = arrival_counters(x.device, n_tiles)
    s = scales if scales.stride(-1) == 1 else scales.contiguous()
    z = zeros if zeros.stride(-1) == 1 else zeros.contiguous()
    b = bias.contiguous() if bias is not None else s
    nw = norm_weight.contiguous() if norm_weight is not None else x2
    r = residual.reshape(-1).contiguous() if residual is not None else x2
    pdl = pdl and gdc_wait is not None
    _int4_gemv_gluon_kernel[(n_tiles, split)](
        w_desc, x2, nw, r, s, z, b, out, ws, cnt, N, K, s.stride(0), z.stride(0),
        float(norm_eps), GROUP=group_size, HAS_BIAS=bias is not None, F16=x.dtype == torch.float16,
        SPLIT_K=split, STAGES=cfg["stages"], SEGS=segs, PAR=par, NORM=norm_weight is not None, GLU=glu,
        HAS_RES=residual is not None, NS=_staged_segments(n_seg, split, warps), PDL=pdl,
        TRIGGER=pdl and cfg.get("trigger", False), num_warps=warps, **({"launch_pdl": True} if pdl else {}))
    return out


def tuned_config(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias: Optional[torch.Tensor], pdl: bool, **opts) -> dict:
    """The fastest of ``candidates`` for this shape, timed once a process with
    ``_common.short_bench`` (host gaps excluded) on these arguments and ``opts`` (the options of
    ``int4_gemv_gluon_launch`` the call will run with: RMSNorm, SwiGLU and the residual add
    registers, which can change the fastest tile), as Triton's autotuner would, but in three
    rounds of alternating order, each candidate's best round counting (one round picked
    different tiles from one process to the next); cached per (device, N, K,
    group size, dtype, bias, PDL, options). During a CUDA-graph capture (nothing can be
    timed) an untuned shape takes ``DEFAULT_CONFIG``."""
    N, K = w_packed.shape[0], x.shape[-1] // (2 if opts.get("glu") else 1)
    key = (x.device, N, K, group_size, x.dtype, bias is not None, pdl, bool(opts.get("glu")),
           opts.get("norm_weight") is not None, opts.get("residual") is not None)
    if key not in _TUNED:
        if torch.cuda.is_current_stream_capturing():
            return DEFAULT_CONFIG
        from ._common import short_bench
        from .int8_mm import _num_sms

        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        cands = candidates(N, K, _num_sms(index))
        if len(cands) == 1:
            _TUNED[key] = cands[0]
        else:
            out = torch.empty((1, N), dtype=x.dtype, device=x.device)
            times = [float("inf")] * len(cands)
            for rnd in range(3):
                for i in (range(len(cands)) if rnd % 2 == 0 else reversed(range(len(cands)))):
                    c = cands[i]
                    t = short_bench(lambda c=c: int4_gemv_gluon_launch(x, w_packed, scales, zeros, group_size, bias,
                                                                       c, pdl, out, **opts), [0.5])
                    times[i] = min(times[i], t)
            _TUNED[key] = cands[min(range(len(cands)), key=times.__getitem__)]
    return _TUNED[key]
