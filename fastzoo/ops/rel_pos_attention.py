"""Attention with SAM's decomposed relative-position bias, fused (flash-attention style).

SAM's image encoder adds to every attention logit a bias made of two small terms
(segment_anything's ``add_decomposed_rel_pos``): for a query token ``i`` and a key
token ``j = kr * k_w + kc`` (row-major over a ``k_h x k_w`` grid of keys),

    bias[b, h, i, j] = rel_h[b, h, i, kr] + rel_w[b, h, i, kc]
    out = softmax(q @ k^T * scale + bias) @ v          (scale defaults to D ** -0.5)

with q: (B, H, Nq, D), k, v: (B, H, Nk, D), rel_h: (B, H, Nq, k_h),
rel_w: (B, H, Nq, k_w) and Nk = k_h * k_w.

- ``rel_pos_attention_ref``: the definition in plain PyTorch. It materialises the
  (B, H, Nq, Nk) bias and calls ``F.scaled_dot_product_attention`` with it as an
  additive mask, which is what SAM-style code does today.
- ``rel_pos_attention_triton``: the Triton kernel's launcher. The kernel never builds
  the bias: each key tile covers ``ROWS`` key rows of ``BLOCK_KW`` columns, so its
  bias is a column of ``rel_h`` (or a few) plus a slice of ``rel_w`` that, when a
  whole key row fits in a tile, is the same for every tile and is loaded once. Online
  softmax in fp32 with exp2 (log2(e) folded into the scale and the bias), Q·Kᵀ and
  P·V on the tensor cores with fp16/bf16 operands. The head dimension is not padded in
  memory: loads are masked up to power-of-two tiles (80 = 64 + 16). q/k/v/rel_h/rel_w may be
  strided views (e.g. slices of a fused qkv projection) as long as the last dimension
  has unit stride.
- ``rel_pos_attention``: the public op (``torch.ops.fastzoo.rel_pos_attention``):
  the kernel for fp16/bf16 CUDA tensors on Ampere or newer and scale >= 1e-20 (the
  kernel divides rel_w by it), the reference otherwise.
- ``rel_pos_window_attention``: SAM's encoder attention between its qkv and output
  projections on the (B, H, W, 3·heads·D) token grid: windows (or the whole grid) read in
  place by the same kernel (keys outside the grid take the qkv bias's k and v, queries
  outside it are not written), rel-pos terms from ``q · table`` per relative offset
  (each program computes its own queries' products first), output written into (B, H, W,
  heads·D); the reference partitions and pads as segment_anything does.
  On Hopper with head_dim 64 (SAM vit_b / vit_l) the global layers of a 64-token-wide grid and the
  windows of 14 take the Gluon kernels of ``rel_pos_attention_gluon`` instead (TMA, asynchronous
  wgmma: two grid rows of queries a program; one window and head a program).
- ``rel_pos_attention_packed``: the same op on one packed ``qkv`` tensor
  (B, N, 3, heads, D), the layout of a fused qkv projection. Under ``torch.compile`` a
  custom op receives each input as its own buffer, so three views q, k, v of one tensor
  would be copied out first; the packed form passes the one tensor and the kernel reads
  q, k and v through strides.

In every layout a window's queries (all of them in the flat one) run in tiles of BLOCK_M; the
few past the last whole tile (at most 32, e.g. SAM's 196 = 3 · 64 + 4) run in 16-row tiles of
the same launch (``_tail_rows``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (FLOAT_DTYPES, LOG2E, cuda_kernel_applies, launch, next_pow2, short_bench, triton_available,
                      unit_stride_last)

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def tile_launched(block_n: int, split_d: bool, kw_p: int | None) -> bool:
    """The autotuner's rule for tiles (``_prune_grid_configs``): whether a tile of ``block_n``
    keys may run with a split head dimension (``split_d``) on key rows of ``kw_p`` columns
    (a power of two)."""
    return not split_d or kw_p is None or block_n <= 2 * kw_p


def rel_pos_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference: materialise the decomposed bias and run SDPA with it (q's dtype out)."""
    B, H, Nq, _ = q.shape
    k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, H, Nq, k_h * k_w)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)


if triton_available():
    import triton
    import triton.language as tl

    # The first configuration is what runs under Triton's interpreter (CPU tests):
    # keep it small. The others are for Ampere/Hopper; configurations whose shared
    # memory does not fit the GPU are dropped by the autotuner.
    _CONFIGS = [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        # Register caps that let more programs share an SM (3 or 4 programs of 4 warps instead of 2),
        # a few spills included. H100, SAM's windowed layers each tile forced
        # (rel_pos_occupancy_sweep.json): vit_b 128x16 (one key row a tile, 168 registers)
        # 0.545 -> 0.480 ms, vit_h 64x32 at 128 registers 1.05 -> 0.85 ms.
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 16}, num_warps=4, num_stages=3, maxnreg=168),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3, maxnreg=128),
    ]

    _TAIL_ROWS = 16  # query rows of a tail tile (``_tail_rows``): tensor-core mma.sync tiles of 16 rows
    TAIL_M = tl.constexpr(_TAIL_ROWS)

    @triton.jit
    def _mm(a, b, DOT_F32: tl.constexpr):
        if DOT_F32:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _table_chunk(tab_ptr, row0, offs_d, d_ok, HEAD_D, TAB_C: tl.constexpr):
        """Rows row0 .. row0 + TAB_C of the (TAB_P, HEAD_D) table, transposed: (len(offs_d), TAB_C)."""
        return tl.load(tab_ptr + (row0 + tl.arange(0, TAB_C))[None, :] * HEAD_D + offs_d[:, None],
                       mask=d_ok[:, None], other=0.0)

    def _prune_grid_configs(configs, named_args, **kwargs):
        """With a split head dimension (SPLIT_D), only tiles of at most two key rows: on an
        H100 (Triton 3.6), SAM vit_h's windows on the grid layout (k_w 14, head_dim 80 as
        64 + 16) gave wrong outputs or illegal addresses with 4 or 8 key rows a tile (BLOCK_N
        64 / 128), while 1-2 rows were right for every BLOCK_M, windowed and global, and
        head_dim 64 was right with every tile; the interpreter runs all of them right. The
        flat layout runs the same code, so it is held to the same tiles. Launches whose key
        rows are too narrow for any such tile go to the reference (``_tiles_known_good``)."""
        get = lambda name: kwargs.get(name, named_args.get(name))  # noqa: E731
        kept = [c for c in configs if tile_launched(c.kwargs["BLOCK_N"], get("SPLIT_D"), get("KW_P"))]
        return kept or configs[:1]

    @triton.jit
    def _key_loop(q, q2, pad_k, pad_v, pad_k2, pad_v2, rw_all, rh_rows, rw_rows, m_ok, k_base, v_base,
                  offs_d, offs_d2, d_ok, d2_ok, n_row, n_col, wy0, wx0, GRID_H, GRID_W, k_h, k_w,
                  sk_y, sk_x, sv_y, sv_x, qk_scale, n_col_chunks, n_tiles,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_KW: tl.constexpr, ROWS: tl.constexpr, WHOLE_ROWS: tl.constexpr, EVEN: tl.constexpr,
                  NO_KEY_MASK: tl.constexpr, DIR: tl.constexpr, SPLIT_D: tl.constexpr, GRID: tl.constexpr,
                  DOT_F32: tl.constexpr, PAD: tl.constexpr):
        """The online softmax over a window's key tiles (``_rel_pos_attention_kernel``):
        returns (m_i, l_i, acc, acc2). PAD: keys outside the grid take ``pad_k`` / ``pad_v``
        (the kernel runs it only for windows that reach past the grid). NO_KEY_MASK: every key
        of every tile is in the window, or masked through ``rw_all``'s -inf columns."""
        LOG2E: tl.constexpr = 1.4426950408889634
        rw_scale = LOG2E / qk_scale  # rel_w into q·k's units
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)

        if ROWS == 1:
            # One key row a tile (the global layers): its rel_h term, one 2-byte gather per
            # query that never becomes an asynchronous copy, is loaded a tile ahead so its
            # latency hides behind the tile before (H100, SAM's global layers, two timings
            # each: vit_b 2.71 / 2.77 -> 2.57 / 2.57 ms, vit_h 4.81 / 4.85 -> 4.65 / 4.68;
            # loading the 2-4 rows of windowed tiles ahead was slower there:
            # experiments/results/h100-80gb-hbm3/rel_pos_attention_variants.json).
            rh_next = tl.load(rh_rows, mask=m_ok, other=0.0)
        for t in range(0, n_tiles):
            if WHOLE_ROWS:
                kr0 = t * ROWS
                kc = n_col
                kr0_next = kr0 + ROWS
            else:
                kr0 = t // n_col_chunks
                kc = (t % n_col_chunks) * BLOCK_KW + n_col
                kr0_next = (t + 1) // n_col_chunks
            if ROWS == 1:
                rh_tile = rh_next
                rh_next = tl.load(rh_rows + DIR * kr0_next, mask=m_ok & (kr0_next < k_h), other=0.0)
            kr = kr0 + n_row
            if EVEN:
                key_ok = tl.full([BLOCK_N], 1, tl.int1)
            else:
                key_ok = (kr < k_h) & (kc < k_w)
            key_in = key_ok
            if PAD:
                key_in = key_ok & (wy0 + kr < GRID_H) & (wx0 + kc < GRID_W)
            if GRID:
                k_off = kr * sk_y + kc * sk_x
                v_off = kr * sv_y + kc * sv_x
            else:
                j = kr * k_w + kc
                k_off = j * sk_x
                v_off = j * sv_x

            kt = tl.load(k_base + k_off[None, :] + offs_d[:, None],
                         mask=key_in[None, :] & d_ok[:, None], other=0.0)
            if PAD:
                kt = tl.where(key_in[None, :], kt, pad_k[:, None])
            qk = _mm(q, kt, DOT_F32)
            if SPLIT_D:
                kt2 = tl.load(k_base + k_off[None, :] + offs_d2[:, None],
                              mask=key_in[None, :] & d2_ok[:, None], other=0.0)
                if PAD:
                    kt2 = tl.where(key_in[None, :], kt2, pad_k2[:, None])
                qk += _mm(q2, kt2, DOT_F32)
            # s: q·k plus the column terms in q·k's units (rel_w / scale; rw_all is loaded once,
            # -inf at key columns past k_w); the row terms and the scale enter below
            if WHOLE_ROWS:
                s = qk + rw_all
            else:
                rw = tl.load(rw_rows[:, None] + DIR * kc[None, :],
                             mask=m_ok[:, None] & (kc < k_w)[None, :], other=0.0)
                s = qk + rw.to(tl.float32) * rw_scale
            if not NO_KEY_MASK:
                s = tl.where(key_ok[None, :], s, float("-inf"))

            if ROWS == 1:
                # One key row a tile: its rel_h term is one value per query, so it enters the
                # row maximum and the exponent per row (scale > 0: the maximum commutes with it)
                # and each logit takes one fused multiply-add before exp2.
                rh_l = rh_tile.to(tl.float32) * LOG2E
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale + rh_l)
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s * qk_scale + (rh_l - m_new)[:, None])
            else:
                # ROWS key rows a tile: their rel_h terms are ROWS values per query, loaded as
                # vectors and selected per key row (no 2-D gather)
                rh = tl.load(rh_rows + DIR * kr0, mask=m_ok, other=0.0)
                rh_b = tl.broadcast_to((rh.to(tl.float32) * LOG2E)[:, None], [BLOCK_M, BLOCK_N])
                for r in tl.static_range(1, ROWS):
                    rh = tl.load(rh_rows + DIR * (kr0 + r), mask=m_ok & (kr0 + r < k_h), other=0.0)
                    rh_b = tl.where((n_row == r)[None, :], (rh.to(tl.float32) * LOG2E)[:, None], rh_b)
                s = s * qk_scale + rh_b
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)

            vt = tl.load(v_base + v_off[:, None] + offs_d[None, :],
                         mask=key_in[:, None] & d_ok[None, :], other=0.0)
            if PAD:
                vt = tl.where(key_in[:, None], vt, pad_v[None, :])
            p = p.to(vt.dtype)
            acc = acc * alpha[:, None] + _mm(p, vt, DOT_F32)
            if SPLIT_D:
                vt2 = tl.load(v_base + v_off[:, None] + offs_d2[None, :],
                              mask=key_in[:, None] & d2_ok[None, :], other=0.0)
                if PAD:
                    vt2 = tl.where(key_in[:, None], vt2, pad_v2[None, :])
                acc2 = acc2 * alpha[:, None] + _mm(p, vt2, DOT_F32)
            m_i = m_new
        return m_i, l_i, acc, acc2

    @triton.jit
    def _attend_rows(
        q_ptr, k_ptr, v_ptr, rh_ptr, rw_ptr, o_ptr, pad_ptr, tab_ptr,
        sq_b, sq_h, sq_y, sq_x,
        sk_b, sk_h, sk_y, sk_x,
        sv_b, sv_h, sv_y, sv_x,
        srh_b, srh_h, srh_y, srh_x,
        srw_b, srw_h, srw_y, srw_x,
        so_b, so_h, so_y, so_x,
        H, N_WH, N_WW, GRID_H, GRID_W, Nq, m0, HEAD_D, k_h, k_w, qk_scale,
        BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D2: tl.constexpr,
        KW_P: tl.constexpr, KW_EXACT: tl.constexpr, KH_DIV: tl.constexpr, DOT_F32: tl.constexpr,
        GRID: tl.constexpr, REL_TABLE: tl.constexpr, HAS_PAD: tl.constexpr, TAB_P: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # BLOCK_M queries of one window of one head (program_id(1)), from query m0 of the window
        # on (those from Nq on are neither computed nor stored). Tokens are addressed on a 2-D
        # grid: token n of a window is row n // k_w, column n % k_w of it, and the window
        # (wy, wx) sits at (wy·k_h, wx·k_w) of a GRID_H x GRID_W grid (strides *_y, *_x).
        # GRID=False is the flat (B, heads, N, D) layout of ``rel_pos_attention`` (one window,
        # token n at n · *_x: no division, fewer live registers). Keys of the window outside
        # the grid (the padding of windowed attention) take the values ``pad_ptr`` gives for k
        # and v (the qkv projection of a zero token) when HAS_PAD; queries outside it are
        # neither read nor written.
        # rel terms: REL_TABLE=False, rel_h[i, kr] at row i's address + kr (precomputed
        # terms); REL_TABLE=True, at + (r(i) - kr + k_h - 1), i.e. q_i · table[offset]
        # for every relative offset (rel_w likewise with columns), which the program
        # computes for its own queries first: ``q · tab_ptrᵀ`` (TAB_P table rows, [table_h;
        # table_w] zero-padded) into row i of the rel_h buffer (rel_w's is the same row,
        # table_h's offsets further on).
        LOG2E: tl.constexpr = 1.4426950408889634
        # A key tile is ROWS key rows x BLOCK_KW key columns (BLOCK_N keys in all).
        # WHOLE_ROWS: a key row fits in BLOCK_KW columns, so the column part of the
        # bias (rel_w) is the same for every tile.
        WHOLE_ROWS: tl.constexpr = KW_P <= BLOCK_N
        BLOCK_KW: tl.constexpr = KW_P if WHOLE_ROWS else BLOCK_N
        ROWS: tl.constexpr = BLOCK_N // BLOCK_KW
        # EVEN: every tile is full of keys of the window (k_w a power of two, k_h a
        # multiple of ROWS, e.g. the 64x64 global layers): no key masks at all.
        EVEN: tl.constexpr = WHOLE_ROWS & KW_EXACT & (KH_DIV % ROWS == 0)
        DIR: tl.constexpr = -1 if REL_TABLE else 1

        pid = tl.program_id(1)
        h = (pid % H).to(tl.int64)
        win = pid // H
        n_win = N_WH * N_WW
        b = (win // n_win).to(tl.int64)
        wy0 = ((win % n_win) // N_WW) * k_h
        wx0 = (win % N_WW) * k_w

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        n_row = offs_n // BLOCK_KW
        n_col = offs_n % BLOCK_KW
        d_ok = offs_d < HEAD_D
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        if GRID:
            q_r = offs_m // k_w
            q_c = offs_m % k_w
            m_ok = (offs_m < Nq) & (wy0 + q_r < GRID_H) & (wx0 + q_c < GRID_W)
            q_rows = q_ptr + b * sq_b + h * sq_h + (wy0 + q_r) * sq_y + (wx0 + q_c) * sq_x
            k_base += wy0 * sk_y + wx0 * sk_x
            v_base += wy0 * sv_y + wx0 * sv_x
            rh_rows = rh_ptr + b * srh_b + h * srh_h + (wy0 + q_r) * srh_y + (wx0 + q_c) * srh_x
            rw_rows = rw_ptr + b * srw_b + h * srw_h + (wy0 + q_r) * srw_y + (wx0 + q_c) * srw_x
            s_rows = rh_rows  # REL_TABLE: each query's row of q · tableᵀ
            if REL_TABLE:
                rh_rows += q_r + k_h - 1
                rw_rows += q_c + k_w - 1
        else:
            m_ok = offs_m < Nq
            q_rows = q_ptr + b * sq_b + h * sq_h + offs_m * sq_x
            rh_rows = rh_ptr + b * srh_b + h * srh_h + offs_m * srh_x
            rw_rows = rw_ptr + b * srw_b + h * srw_h + offs_m * srw_x
            s_rows = rh_rows

        TAB_C: tl.constexpr = TAB_P if TAB_P < 64 else 64  # REL_TABLE: table rows a chunk
        if REL_TABLE:  # the first chunk of the table (REL_TABLE below), loaded ahead of q
            tab = _table_chunk(tab_ptr, 0, offs_d, d_ok, HEAD_D, TAB_C)
        q = tl.load(q_rows[:, None] + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        # the key loop's arguments that an option leaves unused
        pad_k, pad_v, pad_k2, pad_v2, rw_all = offs_d, offs_d, offs_d, offs_d, offs_d
        offs_d2, d2_ok, q2 = offs_d, d_ok, offs_d
        if HAS_PAD:  # k and v of a key outside the grid (pad_ptr: (3, heads, HEAD_D))
            pad_k = tl.load(pad_ptr + (H + h) * HEAD_D + offs_d, mask=d_ok, other=0.0)
            pad_v = tl.load(pad_ptr + (2 * H + h) * HEAD_D + offs_d, mask=d_ok, other=0.0)
        if SPLIT_D:
            # Head dims [BLOCK_D, HEAD_D) as a second, narrow slice (80 = 64 + 16).
            offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            d2_ok = offs_d2 < HEAD_D
            q2 = tl.load(q_rows[:, None] + offs_d2[None, :], mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
            if REL_TABLE:
                tab2 = _table_chunk(tab_ptr, 0, offs_d2, d2_ok, HEAD_D, TAB_C)
            if HAS_PAD:
                pad_k2 = tl.load(pad_ptr + (H + h) * HEAD_D + offs_d2, mask=d2_ok, other=0.0)
                pad_v2 = tl.load(pad_ptr + (2 * H + h) * HEAD_D + offs_d2, mask=d2_ok, other=0.0)
        if REL_TABLE:
            # This program's rows of S = q · tableᵀ (every relative offset of both tables), in
            # column chunks of at most 64 (the fp32 chunk's registers), rounded to the buffer's
            # dtype and stored; the key loop gathers its rel_h / rel_w terms from them after
            # the barrier (other threads of the program wrote them). H100, SAM's layers: the
            # separate batched GEMM this replaces wrote and the kernel re-read every row from
            # DRAM (vit_b: 0.19 ms a global layer, 0.07 a windowed one, ~4 % of the encoder).
            # Each chunk's table rows are loaded a chunk ahead (the first before q), so that their
            # L2 latency is not paid once per chunk in a row.
            offs_t = tl.arange(0, TAB_C)
            for c in tl.static_range(0, TAB_P // TAB_C):
                if c + 1 < TAB_P // TAB_C:
                    tab_next = _table_chunk(tab_ptr, (c + 1) * TAB_C, offs_d, d_ok, HEAD_D, TAB_C)
                    if SPLIT_D:
                        tab2_next = _table_chunk(tab_ptr, (c + 1) * TAB_C, offs_d2, d2_ok, HEAD_D, TAB_C)
                s_tile = _mm(q, tab, DOT_F32)
                if SPLIT_D:
                    s_tile += _mm(q2, tab2, DOT_F32)
                tl.store(s_rows[:, None] + (c * TAB_C + offs_t)[None, :], s_tile.to(rh_ptr.dtype.element_ty),
                         mask=m_ok[:, None])
                if c + 1 < TAB_P // TAB_C:
                    tab = tab_next
                    if SPLIT_D:
                        tab2 = tab2_next
            tl.debug_barrier()

        n_col_chunks = tl.cdiv(k_w, BLOCK_KW)
        n_tiles = tl.cdiv(k_h, ROWS) * n_col_chunks
        if HAS_PAD:
            # a block of queries whose first row is past the grid (rows only grow within a block:
            # the bottom windows' padding rows) has nothing to compute or store
            n_tiles = tl.where(wy0 + m0 // k_w < GRID_H, n_tiles, 0)
        # NO_KEY_MASK: whole key rows a tile and whole tiles of key rows, so the only keys outside the
        # window are the columns past k_w, which rw_all sets to -inf (no mask in the key loop)
        NO_KEY_MASK: tl.constexpr = WHOLE_ROWS & (KH_DIV % ROWS == 0)
        if WHOLE_ROWS:
            # rel_w for every key column of a tile in q·k's units (rel_w / scale): loaded once
            rw_all = tl.load(rw_rows[:, None] + DIR * n_col[None, :],
                             mask=m_ok[:, None] & (n_col < k_w)[None, :], other=0.0)
            rw_all = tl.where((n_col < k_w)[None, :], rw_all.to(tl.float32) * (LOG2E / qk_scale), float("-inf"))

        # Only the windows that reach past the grid (9 of vit_b's 25 windowed-layer windows) run
        # the key loop with the padding's masks and selects: a runtime branch per program
        # (without padding the condition is a constant and the branch is not compiled).
        if HAS_PAD:
            outside = (wy0 + k_h > GRID_H) | (wx0 + k_w > GRID_W)
        else:
            outside: tl.constexpr = False
        if outside:
            m_i, l_i, acc, acc2 = _key_loop(
                q, q2, pad_k, pad_v, pad_k2, pad_v2, rw_all, rh_rows, rw_rows, m_ok, k_base, v_base, offs_d,
                offs_d2, d_ok, d2_ok, n_row, n_col, wy0, wx0, GRID_H, GRID_W, k_h, k_w, sk_y, sk_x, sv_y, sv_x,
                qk_scale, n_col_chunks, n_tiles, BLOCK_M, BLOCK_D, BLOCK_D2, BLOCK_N, BLOCK_KW, ROWS, WHOLE_ROWS,
                EVEN, NO_KEY_MASK, DIR, SPLIT_D, GRID, DOT_F32, True)
        else:
            m_i, l_i, acc, acc2 = _key_loop(
                q, q2, pad_k, pad_v, pad_k2, pad_v2, rw_all, rh_rows, rw_rows, m_ok, k_base, v_base, offs_d,
                offs_d2, d_ok, d2_ok, n_row, n_col, wy0, wx0, GRID_H, GRID_W, k_h, k_w, sk_y, sk_x, sv_y, sv_x,
                qk_scale, n_col_chunks, n_tiles, BLOCK_M, BLOCK_D, BLOCK_D2, BLOCK_N, BLOCK_KW, ROWS, WHOLE_ROWS,
                EVEN, NO_KEY_MASK, DIR, SPLIT_D, GRID, DOT_F32, False)

        out = acc / l_i[:, None]
        if GRID:
            o_rows = o_ptr + b * so_b + h * so_h + (wy0 + q_r) * so_y + (wx0 + q_c) * so_x
        else:
            o_rows = o_ptr + b * so_b + h * so_h + offs_m * so_x
        tl.store(o_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        if SPLIT_D:
            out2 = acc2 / l_i[:, None]
            tl.store(o_rows[:, None] + offs_d2[None, :], out2.to(o_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & d2_ok[None, :])

    def _tail_rows(nq: int, block_m: int) -> int:
        """Queries of a window past its last whole tile of ``block_m`` that run as 16-query
        tiles (``TAIL_M``) rather than one more mostly empty tile: at most 32 of them, after at
        least one whole tile (SAM's 14x14 windows: 196 = 3 · 64 + 4); 0 otherwise."""
        rem = nq % block_m
        return rem if nq > block_m > _TAIL_ROWS and rem <= 32 else 0

    def _row_programs(nq: int, block_m: int) -> int:
        """Programs a window and head: whole tiles, then the tail's 16-query tiles."""
        tail = _tail_rows(nq, block_m)
        return (nq - tail) // block_m + triton.cdiv(tail, _TAIL_ROWS) if tail else triton.cdiv(nq, block_m)

    @triton.autotune(configs=_CONFIGS, key=["Nq", "HEAD_D", "k_h", "k_w", "GRID", "REL_TABLE", "HAS_PAD"],
                     prune_configs_by={"early_config_prune": _prune_grid_configs}, do_bench=short_bench)
    @triton.heuristics({"TAIL": lambda a: _tail_rows(a["Nq"], a["BLOCK_M"]) > 0})
    @triton.jit
    def _rel_pos_attention_kernel(
        q_ptr, k_ptr, v_ptr, rh_ptr, rw_ptr, o_ptr, pad_ptr, tab_ptr,
        sq_b, sq_h, sq_y, sq_x,
        sk_b, sk_h, sk_y, sk_x,
        sv_b, sv_h, sv_y, sv_x,
        srh_b, srh_h, srh_y, srh_x,
        srw_b, srw_h, srw_y, srw_x,
        so_b, so_h, so_y, so_x,
        H, N_WH, N_WW, GRID_H, GRID_W, Nq, HEAD_D, k_h, k_w, qk_scale,
        BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D2: tl.constexpr,
        KW_P: tl.constexpr, KW_EXACT: tl.constexpr, KH_DIV: tl.constexpr, DOT_F32: tl.constexpr,
        GRID: tl.constexpr, REL_TABLE: tl.constexpr, HAS_PAD: tl.constexpr, TAB_P: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr,
    ):
        # program_id(0): a tile of BLOCK_M queries of a window, or with TAIL (``_tail_rows``),
        # past the window's whole tiles, a tile of TAIL_M of its last queries: the softmax work
        # of a row is the same whether it is a query or padding, so SAM's windows (196 queries)
        # run 3 tiles of 64 and one of 16 instead of 4 of 64. Measured only together with the
        # in-kernel q · table (H100, vit_b encoder +2.0 % bf16, +2.6 % int8 static); in one launch,
        # because a second launch for the tail cost the int8 encoder without CUDA graphs more host
        # time than it saved. program_id(1): the window and head (``_attend_rows``).
        pid_m = tl.program_id(0)
        n_whole = Nq // BLOCK_M
        if TAIL:
            is_tail = pid_m >= n_whole
        else:
            is_tail: tl.constexpr = False
        if is_tail:
            m0 = n_whole * BLOCK_M + (pid_m - n_whole) * TAIL_M
            _attend_rows(q_ptr, k_ptr, v_ptr, rh_ptr, rw_ptr, o_ptr, pad_ptr, tab_ptr,
                         sq_b, sq_h, sq_y, sq_x, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h, sv_y, sv_x,
                         srh_b, srh_h, srh_y, srh_x, srw_b, srw_h, srw_y, srw_x, so_b, so_h, so_y, so_x,
                         H, N_WH, N_WW, GRID_H, GRID_W, Nq, m0, HEAD_D, k_h, k_w, qk_scale,
                         BLOCK_D, SPLIT_D, BLOCK_D2, KW_P, KW_EXACT, KH_DIV, DOT_F32, GRID, REL_TABLE, HAS_PAD, TAB_P,
                         TAIL_M, BLOCK_N)
        else:
            _attend_rows(q_ptr, k_ptr, v_ptr, rh_ptr, rw_ptr, o_ptr, pad_ptr, tab_ptr,
                         sq_b, sq_h, sq_y, sq_x, sk_b, sk_h, sk_y, sk_x, sv_b, sv_h, sv_y, sv_x,
                         srh_b, srh_h, srh_y, srh_x, srw_b, srw_h, srw_y, srw_x, so_b, so_h, so_y, so_x,
                         H, N_WH, N_WW, GRID_H, GRID_W, Nq, pid_m * BLOCK_M, HEAD_D, k_h, k_w, qk_scale,
                         BLOCK_D, SPLIT_D, BLOCK_D2, KW_P, KW_EXACT, KH_DIV, DOT_F32, GRID, REL_TABLE, HAS_PAD, TAB_P,
                         BLOCK_M, BLOCK_N)


def _check_shapes(name: str, q, k, v, rel_h, rel_w) -> None:
    for t_name, t in (("q", q), ("k", k), ("v", v), ("rel_h", rel_h), ("rel_w", rel_w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} expects {t_name} to be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} expects {t_name} with 4 dimensions (B, heads, N, ·), "
                             f"got shape {tuple(t.shape)}")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[-1] != D:
        raise ValueError(f"{name} expects k of shape ({B}, {H}, Nk, {D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{name} expects v of k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Nk = k.shape[2]
    if rel_h.shape[:3] != (B, H, Nq):
        raise ValueError(f"{name} expects rel_h of shape ({B}, {H}, {Nq}, k_h), got {tuple(rel_h.shape)}")
    if rel_w.shape[:3] != (B, H, Nq):
        raise ValueError(f"{name} expects rel_w of shape ({B}, {H}, {Nq}, k_w), got {tuple(rel_w.shape)}")
    k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
    if k_h * k_w != Nk:
        raise ValueError(f"{name} expects k_h * k_w == Nk (keys on a k_h x k_w grid), got "
                         f"k_h={k_h} (rel_h) * k_w={k_w} (rel_w) = {k_h * k_w}, Nk={Nk}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name} expects q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for t_name, t in (("q", q), ("rel_h", rel_h), ("rel_w", rel_w)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} expects {t_name} float32/float16/bfloat16, got {t.dtype}")


def _head_dim_blocks(D: int) -> dict:
    """Tensor-core tiles covering the head dimension (powers of two, at least 16).

    One tile of next_pow2(D) columns, or, where that wastes more than a narrower second
    tile would, two: D = 80 runs as 64 + 16 rather than 128 (loads are masked beyond D
    either way; nothing is padded in memory).
    """
    full = max(16, next_pow2(D))
    hi = max(16, full // 2)
    lo = max(16, next_pow2(D - hi)) if D > hi else 0
    if lo and hi + lo < full:
        return {"BLOCK_D": hi, "SPLIT_D": True, "BLOCK_D2": lo}
    return {"BLOCK_D": full, "SPLIT_D": False, "BLOCK_D2": 16}


def rel_pos_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Launch the fused kernel (CUDA tensors, or CPU tensors under Triton's interpreter).

    q, k, v: fp16 or bf16; rel_h, rel_w: any float dtype. Strided views are used as
    they are when their last dimension has unit stride (copied otherwise).
    Returns a contiguous (B, H, Nq, D) tensor of q's dtype.
    """
    if not triton_available():
        raise RuntimeError("rel_pos_attention_triton needs Triton, which is not importable here")
    _check_shapes("rel_pos_attention_triton", q, k, v, rel_h, rel_w)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"rel_pos_attention_triton expects float16 or bfloat16 q/k/v, got {q.dtype}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
    if scale is None:
        scale = D ** -0.5
    q, k, v, rel_h, rel_w = (unit_stride_last(t) for t in (q, k, v, rel_h, rel_w))
    out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Nk == 0:  # softmax over no keys: SDPA's convention (NaN) via the reference
        return rel_pos_attention_ref(q, k, v, rel_h, rel_w, scale)
    # The flat layout as one window of k_h key rows on an unbounded grid: token n is row
    # n // k_w, column n % k_w (y stride = k_w · n stride).
    flat = lambda t: (t.stride(0), t.stride(1), k_w * t.stride(2), t.stride(2))  # noqa: E731
    _launch(q, k, v, rel_h, rel_w, out, None, [flat(t) for t in (q, k, v, rel_h, rel_w, out)],
            B=B, heads=H, n_wh=1, n_ww=1, grid_hw=(_UNBOUNDED, _UNBOUNDED), nq=Nq, k_hw=(k_h, k_w),
            scale=scale)
    return out


_UNBOUNDED = 1 << 30  # grid size of the flat layout: no token is outside it
# The kernel's smallest scale: it takes each tile's row maximum before scaling (so scale > 0)
# and adds rel_w / scale to q·kᵀ, which must stay finite (|rel_w| up to 1e18 at this bound).
_MIN_KERNEL_SCALE = 1e-20
_MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second dimension


def _launch(q, k, v, rel_h, rel_w, out, pad, strides, *, B, heads, n_wh, n_ww, grid_hw, nq, k_hw, scale,
            table=None):
    """Run ``_rel_pos_attention_kernel``: ``strides`` are the (batch, head, y, x) strides of
    q, k, v, rel_h, rel_w and out (in that order); one program per BLOCK_M queries of one
    window and head. ``table``: None (rel_h / rel_w hold the terms), or the (TAB_P, D)
    [table_h; table_w] (zero rows to a power of two) whose products with q the kernel
    writes into rel_h's rows (rel_w: a view of the same rows, table_w's offsets on)."""
    rel_table = table is not None
    if not scale >= _MIN_KERNEL_SCALE:
        raise ValueError(f"the rel-pos attention kernel expects scale >= {_MIN_KERNEL_SCALE:g} (it takes the row "
                         f"maximum before scaling and divides rel_w by the scale), got {scale}; rel_pos_attention "
                         f"and rel_pos_window_attention run the reference for it")
    per_image = n_wh * n_ww * heads
    if per_image > _MAX_GRID_Y:
        raise ValueError(f"rel_pos attention launches one program per window and head: {n_wh * n_ww} windows x "
                         f"{heads} heads = {per_image} for one image, more than a launch grid's {_MAX_GRID_Y}; "
                         f"use larger windows or the reference")
    if B * per_image > _MAX_GRID_Y:  # CUDA's grid y limit: launch per chunk of images
        step = max(1, _MAX_GRID_Y // per_image)
        for b0 in range(0, B, step):
            part = [t[b0:b0 + step] for t in (q, k, v, rel_h, rel_w, out)]
            _launch(*part, pad, strides, B=part[0].shape[0], heads=heads, n_wh=n_wh, n_ww=n_ww, grid_hw=grid_hw,
                    nq=nq, k_hw=k_hw, scale=scale, table=table)
        return
    D = q.shape[-1]
    k_h, k_w = k_hw
    grid = lambda meta: (_row_programs(nq, meta["BLOCK_M"]), B * per_image)  # noqa: E731
    launch(
        _rel_pos_attention_kernel, grid,
        q, k, v, rel_h, rel_w, out, out if pad is None else pad, out if table is None else table,
        *[st for t in strides for st in t],
        heads, n_wh, n_ww, grid_hw[0], grid_hw[1], nq, D, k_h, k_w, float(scale) * LOG2E,
        device=q.device, **_head_dim_blocks(D),
        KW_P=next_pow2(k_w), KW_EXACT=k_w == next_pow2(k_w), KH_DIV=min(k_h & -k_h, 1024),
        # Triton's interpreter (CPU tensors) multiplies the raw bits of bf16 operands
        # in tl.dot; there the kernel widens its already-rounded fp16/bf16 dot operands
        # to fp32, which gives the same (exact) products. On GPUs: fp16/bf16 MMA.
        DOT_F32=q.device.type != "cuda",
        GRID=rel_table or pad is not None or n_wh * n_ww > 1, REL_TABLE=rel_table, HAS_PAD=pad is not None,
        TAB_P=16 if table is None else table.shape[0],
    )


def _tiles_known_good(D: int, k_w: int) -> bool:
    """False where the kernel would have only tiles that were wrong on an H100 or never run
    there: a split head dimension (e.g. 80 = 64 + 16) with key rows of at most 8 columns, where
    the tiles of 4 or more key rows were wrong and the pruner's only other tile, 128x16 (2 rows),
    has not been run on a GPU (``_prune_grid_configs``)."""
    return not _head_dim_blocks(D)["SPLIT_D"] or 2 * next_pow2(k_w) >= 32


def _kernel_applies(q, k, v, rel_h, rel_w) -> bool:
    return (
        _tiles_known_good(q.shape[-1], rel_w.shape[-1])
        and q.dtype in KERNEL_DTYPES
        and cuda_kernel_applies(q, k, v, dtypes=KERNEL_DTYPES)
        and cuda_kernel_applies(q, rel_h, rel_w)
        and q.shape[-1] <= 256
        and k.shape[2] > 0
    )


@torch.library.custom_op("fastzoo::rel_pos_attention", mutates_args=())
def _rel_pos_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    if scale >= _MIN_KERNEL_SCALE and _kernel_applies(q, k, v, rel_h, rel_w):
        return rel_pos_attention_triton(q, k, v, rel_h, rel_w, scale)
    return rel_pos_attention_ref(q, k, v, rel_h, rel_w, scale).contiguous()


@_rel_pos_attention_op.register_fake
def _(q, k, v, rel_h, rel_w, scale):
    return q.new_empty(q.shape)  # new_empty: contiguous, like the kernel's and the fallback's output


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q @ kᵀ * scale + rel_h[..., kr] + rel_w[..., kc]) @ v, SAM's decomposed rel-pos attention.

    q: (B, heads, Nq, D); k, v: (B, heads, Nk, D) with Nk = k_h * k_w (key j = kr * k_w + kc);
    rel_h: (B, heads, Nq, k_h); rel_w: (B, heads, Nq, k_w); ``scale`` defaults to D ** -0.5.
    Returns (B, heads, Nq, D) in q's dtype. Runs the fused Triton kernel (no Nq x Nk
    bias in memory) for fp16/bf16 CUDA tensors on Ampere or newer and scale >= 1e-20, the SDPA
    reference otherwise. Traceable by ``torch.compile(fullgraph=True)``.
    """
    _check_shapes("rel_pos_attention", q, k, v, rel_h, rel_w)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"rel_pos_attention expects a finite scale, got {scale}")
    return _rel_pos_attention_op(q, k, v, rel_h, rel_w, scale)


def _unpack_qkv(qkv: torch.Tensor):
    """(B, N, 3, heads, D) -> q, k, v views of shape (B, heads, N, D)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _check_packed(name: str, qkv: torch.Tensor) -> None:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"{name} expects qkv to be a tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"{name} expects qkv of shape (B, N, 3, heads, head_dim), got {tuple(qkv.shape)}")


@torch.library.custom_op("fastzoo::rel_pos_attention_packed", mutates_args=())
def _rel_pos_attention_packed_op(
    qkv: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    return _rel_pos_attention_op(*_unpack_qkv(qkv), rel_h, rel_w, scale)


@_rel_pos_attention_packed_op.register_fake
def _(qkv, rel_h, rel_w, scale):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, H, N, D))


def rel_pos_attention_packed(
    qkv: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`rel_pos_attention` with q, k, v packed in one ``qkv`` (B, N, 3, heads, D) tensor.

    Returns (B, heads, N, D). Same kernel and reference; the packed form spares
    ``torch.compile`` a copy of each of q, k and v before the call.
    """
    _check_packed("rel_pos_attention_packed", qkv)
    _check_shapes("rel_pos_attention_packed", *_unpack_qkv(qkv), rel_h, rel_w)
    if scale is None:
        scale = qkv.shape[-1] ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"rel_pos_attention_packed expects a finite scale, got {scale}")
    return _rel_pos_attention_packed_op(qkv, rel_h, rel_w, scale)


# ----------------------------------------------------------------------------------
# SAM's encoder attention on the token grid: windows read in place
# ----------------------------------------------------------------------------------
def _window_geometry(H: int, W: int, window: int):
    """(window rows, window columns, grid padding rows, padding columns); window 0 = global."""
    wh, ww = (window, window) if window > 0 else (H, W)
    return wh, ww, (-H) % wh, (-W) % ww


def _relative_table(n: int, table: torch.Tensor) -> torch.Tensor:
    """(n, n, D): ``table[r - k + n - 1]`` for query row r and key row k."""
    r = torch.arange(n, device=table.device)
    return table[r[:, None] - r[None, :] + n - 1]


def rel_pos_window_attention_ref(
    qkv: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    num_heads: int,
    window: int = 0,
    scale: float | None = None,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: SAM's encoder attention between the qkv and output projections, as
    segment_anything computes it: the (B, H, W, 3·heads·D) grid padded to whole windows with
    tokens whose projection is ``pad`` (the qkv bias: what a zero token projects to; zeros
    when None), partitioned into windows, rel-pos terms ``q · table[r_q − r_k + w − 1]`` (rows
    and columns), attention per window and head, windows put back, padding dropped. Returns
    (B, H, W, heads·D) in qkv's dtype."""
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    wh, ww, ph, pw = _window_geometry(H, W, window)
    x = qkv
    if ph or pw:
        fill = qkv.new_zeros(C3) if pad is None else pad.to(qkv.dtype)
        x = fill.expand(B, H + ph, W + pw, C3).clone()
        x[:, :H, :W] = qkv
    nwh, nww = (H + ph) // wh, (W + pw) // ww
    x = x.reshape(B, nwh, wh, nww, ww, 3, num_heads, D).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = x.reshape(3, B * nwh * nww, num_heads, wh * ww, D).unbind(0)
    r_q = q.reshape(-1, num_heads, wh, ww, D)
    rel_h = torch.einsum("bnywd,ykd->bnywk", r_q, _relative_table(wh, table_h).to(q.dtype))
    rel_w = torch.einsum("bnywd,wkd->bnywk", r_q, _relative_table(ww, table_w).to(q.dtype))
    out = rel_pos_attention_ref(q, k, v, rel_h.reshape(-1, num_heads, wh * ww, wh),
                                rel_w.reshape(-1, num_heads, wh * ww, ww), scale)
    out = out.reshape(B, nwh, nww, num_heads, wh, ww, D).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, nwh * wh, nww * ww, num_heads * D)[:, :H, :W].contiguous()


def rel_pos_window_attention_triton(
    qkv: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    num_heads: int,
    window: int = 0,
    scale: float | None = None,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused kernel on the grid itself: no window partition, no padded copy, no
    un-partition. Each window's q, k, v are read in place from ``qkv`` (keys outside the
    grid take ``pad``'s k and v), the output is written in place into (B, H, W, heads·D),
    and the rel-pos terms come from ``S = q · tableᵀ`` for every relative offset (both tables),
    which each program computes for its own queries (one MMA a 64-offset chunk) into a
    scratch buffer and then indexes by ``r_q − r_k + w − 1``."""
    if not triton_available():
        raise RuntimeError("rel_pos_window_attention_triton needs Triton, which is not importable here")
    _check_window_args("rel_pos_window_attention_triton", qkv, table_h, table_w, num_heads, window, pad)
    if qkv.dtype not in KERNEL_DTYPES:
        raise TypeError(f"rel_pos_window_attention_triton expects float16 or bfloat16 qkv, got {qkv.dtype}")
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    if scale is None:
        scale = D ** -0.5
    wh, ww, ph, pw = _window_geometry(H, W, window)
    qkv = unit_stride_last(qkv)
    q, k, v = qkv.view(B, H, W, 3, num_heads, D).unbind(3)  # (B, H, W, heads, D) views
    out = torch.empty((B, H, W, num_heads, D), dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out.view(B, H, W, num_heads * D)

    # S = q · [table_h; table_w]ᵀ for every token and head: the kernel's programs compute their
    # queries' rows (heads, B·H·W, TAB_P) and read them as (B, H, W, heads, offset) views of the
    # two tables' column ranges
    t = torch.cat([table_h, table_w]).to(qkv.dtype)
    t = F.pad(t, (0, 0, 0, max(16, next_pow2(t.shape[0])) - t.shape[0])).contiguous()
    S = torch.empty((num_heads, B, H, W, t.shape[0]), dtype=qkv.dtype, device=qkv.device).permute(1, 2, 3, 0, 4)
    s_h, s_w = S[..., :table_h.shape[0]], S[..., table_h.shape[0]:]
    if ph or pw:
        pad = (qkv.new_zeros(C3) if pad is None else pad.to(qkv.dtype)).contiguous()
    else:
        pad = None
    grid_form = lambda t: (t.stride(0), t.stride(3), t.stride(1), t.stride(2))  # noqa: E731 (b, head, y, x)
    _launch(q, k, v, s_h, s_w, out, pad, [grid_form(t) for t in (q, k, v, s_h, s_w, out)],
            B=B, heads=num_heads, n_wh=(H + ph) // wh, n_ww=(W + pw) // ww, grid_hw=(H, W), nq=wh * ww,
            k_hw=(wh, ww), scale=scale, table=t)
    return out.view(B, H, W, num_heads * D)


def _check_window_args(name, qkv, table_h, table_w, num_heads, window, pad) -> None:
    for t_name, t in (("qkv", qkv), ("table_h", table_h), ("table_w", table_w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} expects {t_name} to be a tensor, got {type(t).__name__}")
    if qkv.dim() != 4 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"{name} expects qkv of shape (B, H, W, 3 * num_heads * head_dim) with num_heads="
                         f"{num_heads}, got {tuple(qkv.shape)}")
    if window < 0:
        raise ValueError(f"{name} expects window >= 0 (0: global attention), got {window}")
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    if H == 0 or W == 0:
        raise ValueError(f"{name} expects a non-empty token grid, got qkv of shape {tuple(qkv.shape)}")
    wh, ww, _, _ = _window_geometry(H, W, window)
    for t_name, t, n in (("table_h", table_h, wh), ("table_w", table_w, ww)):
        if tuple(t.shape) != (2 * n - 1, D):
            raise ValueError(f"{name} expects {t_name} of shape ({2 * n - 1}, {D}) (2 * window - 1 relative "
                             f"offsets, head_dim), got {tuple(t.shape)}")
    if pad is not None and tuple(pad.shape) != (C3,):
        raise ValueError(f"{name} expects pad of shape ({C3},) (the qkv projection of a padding token), "
                         f"got {tuple(pad.shape)}")
    if qkv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} expects qkv float32/float16/bfloat16, got {qkv.dtype}")


@torch.library.custom_op("fastzoo::rel_pos_window_attention", mutates_args=())
def _rel_pos_window_attention_op(
    qkv: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor, pad: Optional[torch.Tensor],
    num_heads: int, window: int, scale: float,
) -> torch.Tensor:
    D = qkv.shape[-1] // (3 * num_heads)
    tensors = [t for t in (qkv, table_h, table_w, pad) if t is not None]
    k_w = window if window > 0 else qkv.shape[2]
    if (scale >= _MIN_KERNEL_SCALE and qkv.dtype in KERNEL_DTYPES and cuda_kernel_applies(*tensors) and D <= 256
            and qkv.shape[1] * qkv.shape[2] > 0
            and _tiles_known_good(D, k_w)):
        from . import rel_pos_attention_gluon as rpg

        if rpg.global_attention_applies(qkv, num_heads, window, pad):  # Hopper, SAM's 64 x 64 global layers
            return rpg.rel_pos_global_attention_gluon(qkv, table_h, table_w, num_heads, scale)
        if rpg.window_attention_applies(qkv, num_heads, window, pad, scale):  # Hopper, SAM's 14 x 14 windows
            return rpg.rel_pos_window_attention_gluon(qkv, table_h, table_w, num_heads, window, scale, pad)
        return rel_pos_window_attention_triton(qkv, table_h, table_w, num_heads, window, scale, pad)
    return rel_pos_window_attention_ref(qkv, table_h, table_w, num_heads, window, scale, pad)


@_rel_pos_window_attention_op.register_fake
def _(qkv, table_h, table_w, pad, num_heads, window, scale):
    B, H, W, C3 = qkv.shape
    return qkv.new_empty((B, H, W, C3 // 3))


def rel_pos_window_attention(
    qkv: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    num_heads: int,
    window: int = 0,
    scale: float | None = None,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """SAM's image-encoder attention between its qkv and output projections, on the token grid.

    qkv: (B, H, W, 3 · num_heads · head_dim), the qkv projection of every token;
    table_h / table_w: (2·w − 1, head_dim) relative-position tables of the window's rows /
    columns (w = window, or H / W for global attention, ``window=0``); pad: (3 · num_heads ·
    head_dim,), the projection of the zero tokens that pad the grid to whole windows (the
    qkv bias; zeros when None). Returns (B, H, W, num_heads · head_dim) in qkv's dtype:
    per window and head, ``softmax(q kᵀ · scale + q · table_h[r_q − r_k + w − 1] + q ·
    table_w[c_q − c_k + w − 1]) v``, as segment_anything computes it. The fused kernel (fp16/bf16
    CUDA tensors) reads the windows in place; elsewhere the reference partitions and pads.
    Traceable by ``torch.compile(fullgraph=True)``.
    """
    _check_window_args("rel_pos_window_attention", qkv, table_h, table_w, num_heads, window, pad)
    if scale is None:
        scale = (qkv.shape[-1] // (3 * num_heads)) ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"rel_pos_window_attention expects a finite scale, got {scale}")
    return _rel_pos_window_attention_op(qkv, table_h, table_w, pad, int(num_heads), int(window), scale)
