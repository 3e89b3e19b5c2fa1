"""SAM's rel-pos attention layers on Hopper: Gluon kernels (TMA loads, asynchronous wgmma), one for the
global layers, one for the windowed ones (``_window_attention_kernel``, below).

The image encoder's global layers (vit_b / vit_l: blocks 2, 5, 8, 11 and 5, 11, 17, 23) attend
over the whole 64 x 64 token grid with head_dim 64: 4096 keys a query, the bias
``q · table_h[r_q − r_k + H − 1] + q · table_w[c_q − c_k + W − 1]`` added to each logit
(``rel_pos_attention.rel_pos_window_attention``, window 0, is the definition and the fallback).
In the vit_b bf16 encoder they took ~72 % of the attention kernel's time when the windowed layers
ran on the ``tl`` kernel (four layers of ~2.4 ms at batch 16 on an H100, the eight windowed ones
~0.47 ms each; on their own Gluon kernel since, ~0.3 ms).

``_global_attention_kernel``: one program per ``QUERY_ROWS`` grid rows of one image and head
(64 queries a row, a warpgroup each, sharing every K/V tile), keys one grid row (64 keys) a tile:

- q, the table rows it needs and the key and value tiles arrive by TMA straight from the qkv
  projection's (B·H·W, 3·heads·D) output, the K/V tiles through a ring of ``STAGES`` slots;
- the rel-pos terms: ``P_h = q · table_h[r0 : r0 + 128]ᵀ`` and ``P_w = q · table_wᵀ`` on the tensor
  cores first (rounded to the activations' dtype, as the ``tl`` kernel and the bf16 model do);
  rel_h for key row kr is column δ + H − 1 − kr of P_h for the queries of grid row r0 + δ, kept
  transposed in shared memory (a row load a tile); rel_w, the same for every tile,
  ``P_w[i, c_i − kc + W − 1]``, gathered once through a scratch buffer (each query row shifts
  its own way);
- per tile: S = q·kᵀ (wgmma), the online softmax in fp32 with exp2, O += P·V (wgmma, P from
  registers); the next tile's q·kᵀ is issued before this tile's P·V, and waited for with the
  P·V still running, so the softmax of one tile overlaps the tensor cores' work on the other;
- the output tile is written by TMA into (B·H·W, heads·D).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import LOG2E, _capability
from .int8_mm_gluon import gluon_available
# the tl kernel's module: its dtypes, smallest scale and launch-grid limit hold here too (it imports this
# module only inside its op, so no cycle)
from .rel_pos_attention import _MAX_GRID_Y, _MIN_KERNEL_SCALE, KERNEL_DTYPES
BLOCK = 64  # queries a program (one grid row) and keys a tile (one grid row): W must be 64
HEAD_D = 64
# Two grid rows of queries a program (a warpgroup each: the K/V tiles read once for both), a ring of
# three K/V slots. Two programs share an SM (16 warps): 114,728 B of shared memory and at most 128
# registers a thread each. Under Triton 3.6, ncu on an H100 gives 127 registers, a limit of 2 blocks an SM
# by both registers and shared memory, and 15.85 active warps (rel_pos_global_ws_tried.json). A variant
# over both budgets (160 registers and 131 KB under Triton 3.6), so likely one program an SM, took 2.9 ms
# instead of 2.3 (rel_pos_global_prologue_tried.json). Hence MAXNREG: Triton 3.8 compiles the kernel to
# 159 registers when left free, and to 128 without spills when capped.
# H100, SAM vit_b's global layer at batch 16, each against the tl kernel in the same call
# (rel_pos_global_gluon_tiles.json): 2.26-2.28 ms against 2.41-2.54. Slower: one row a program 2.59
# (8 warps a program, twice the K/V traffic); two rows with 2 slots and 128 registers 2.61; 4 slots
# (one program an SM) 3.05; four rows 2.91-3.51.
STAGES = 3  # K/V ring slots
MAXNREG = 128  # registers a thread: two programs an SM (2 x 256 threads x 128 = the 64K register file)
SHARED_LIMIT = (228 * 1024) // 2 - 1024  # bytes of shared memory a program for two an SM (1 KB each reserved)
QUERY_ROWS = 2  # grid rows of queries a program (a warpgroup each)
TABLE_ROWS = 2 * BLOCK  # rows of a table box (table_w: 2W − 1 = 127 and a zero row)

if gluon_available():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    # a barrier across the program's warps (Triton 3.6: thread_barrier; later: barrier)
    _cta_barrier = getattr(gl, "thread_barrier", None) or getattr(gl, "barrier")

    @gluon.jit
    def _softmax_tile(s_cur, rw, ph_s, ph_row, grid_row, m_i, l_i, qk_scale, QR: gl.constexpr, rows: gl.constexpr):
        """One key row's online-softmax step: its logits q·kᵀ + rel_w (q·k's units) and rel_h (row
        ``ph_row`` + d of P_hᵀ for the queries of the program's grid row d, ``grid_row``: one value a
        query, in log2 units); returns (P, alpha, m, l)."""
        LOG2E: gl.constexpr = 1.4426950408889634
        rh = ph_s.index(ph_row).load(rows)
        for d in gl.static_range(1, QR):
            rh = gl.where(grid_row == d, ph_s.index(ph_row + d).load(rows), rh)
        rh = rh.to(gl.float32) * LOG2E
        s = s_cur + rw
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale + rh)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale + (rh - m_new)[:, None])
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _global_attention_kernel(q_desc, kv_desc, tab_h_desc, tab_w_desc, out_desc, scratch_ptr, H, heads, qk_scale,
                                 QR: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        # QR grid rows of queries a program (BLOCK_M = QR · 64, one warpgroup each); keys one grid row
        # (BLOCK_N = 64) a tile; the table boxes TB = 128 rows.
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = kv_desc.block_type.shape[0]
        D: gl.constexpr = kv_desc.block_type.shape[1]
        TB: gl.constexpr = tab_w_desc.block_type.shape[0]
        dtype: gl.constexpr = q_desc.dtype
        LOG2E: gl.constexpr = 1.4426950408889634
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        t_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, TB, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        cols: gl.constexpr = gl.SliceLayout(0, s_layout)

        r0 = gl.program_id(0) * QR  # the queries' first grid row
        bh = gl.program_id(1)
        b = bh // heads
        h = bh % heads
        tok0 = b * H * BLOCK_N  # the image's first token
        q_col = h * D
        k_col = (heads + h) * D
        v_col = (2 * heads + h) * D

        q_s = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_desc.layout)
        t_s = gl.allocate_shared_memory(dtype, [TB, D], tab_w_desc.layout)  # table_h's rows, then table_w
        k_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kv_desc.layout)
        v_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], kv_desc.layout)
        ph_s = gl.allocate_shared_memory(dtype, [TB, BLOCK_M],
                                         gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)

        mbarrier.expect(q_bar, q_desc.block_type.nbytes + tab_h_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [tok0 + r0 * BLOCK_N, q_col], q_bar, q_s)
        tma.async_copy_global_to_shared(tab_h_desc, [r0, 0], q_bar, t_s)
        kv_bytes: gl.constexpr = 2 * kv_desc.block_type.nbytes
        for i in gl.static_range(STAGES - 1):  # the first key rows (H >= STAGES - 1: the launcher's check)
            mbarrier.expect(ready.index(i), kv_bytes)
            tma.async_copy_global_to_shared(kv_desc, [tok0 + i * BLOCK_N, k_col], ready.index(i), k_s.index(i))
            tma.async_copy_global_to_shared(kv_desc, [tok0 + i * BLOCK_N, v_col], ready.index(i), v_s.index(i))
        mbarrier.wait(q_bar, 0)

        # rel-pos products, rounded to the activations' dtype as the tl kernel and the bf16 model do.
        # P_h[i, o] = q_i · table_h[r0 + o], kept transposed in shared memory; then table_w into the
        # same buffer once every warpgroup's MMA has read it, P_w[i, o] = q_i · table_w[o] into this
        # program's scratch rows
        ph = warpgroup_mma(q_s, t_s.permute((1, 0)), gl.zeros([BLOCK_M, TB], gl.float32, t_layout), use_acc=False)
        ph_s.store(gl.permute(ph.to(dtype), [1, 0]))
        _cta_barrier()
        mbarrier.expect(q_bar, tab_w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(tab_w_desc, [0, 0], q_bar, t_s)
        mbarrier.wait(q_bar, 1)
        pw = warpgroup_mma(q_s, t_s.permute((1, 0)), gl.zeros([BLOCK_M, TB], gl.float32, t_layout), use_acc=False)
        scratch = scratch_ptr + (bh.to(gl.int64) * H + r0) * (BLOCK_N * TB)
        wi = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, t_layout))
        wo = gl.arange(0, TB, layout=gl.SliceLayout(0, t_layout))
        gl.store(scratch + wi[:, None] * TB + wo[None, :], pw.to(dtype))
        _cta_barrier()
        # rel_w[i, kc] = P_w[i, c_i − kc + 63] (query column c_i = i mod 64), in q·k's units (/ scale)
        qi = gl.arange(0, BLOCK_M, layout=rows)
        kc = gl.arange(0, BLOCK_N, layout=cols)
        rw = gl.load(scratch + qi[:, None] * TB + (qi[:, None] % BLOCK_N - kc[None, :] + BLOCK_N - 1)).to(gl.float32)
        rw = rw * (LOG2E / qk_scale)
        # rel_h of key row kr: row δ_i + H − 1 − kr of P_hᵀ for the queries of grid row r0 + δ_i
        ph_s = ph_s._reinterpret(dtype, [TB, BLOCK_M], gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                                              order=[0]))
        grid_row = qi // BLOCK_N

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows)
        l_i = gl.zeros([BLOCK_M], gl.float32, rows)
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        mbarrier.wait(ready.index(0), 0)
        s_cur = warpgroup_mma(q_s, k_s.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(s_cur, ))
        for kr in range(H - 1):
            p, alpha, m_i, l_i = _softmax_tile(s_cur, rw, ph_s, H - 1 - kr, grid_row, m_i, l_i, qk_scale, QR, rows)
            # the previous tile's P·V is done: its slot takes key row kr + STAGES − 1 once every
            # warpgroup's P·V has read it (the barrier; Triton 3.6 and 3.8 put one there by themselves)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            _cta_barrier()
            nxt = kr + STAGES - 1
            if nxt < H:
                ns = nxt % STAGES
                mbarrier.expect(ready.index(ns), kv_bytes)
                tma.async_copy_global_to_shared(kv_desc, [tok0 + nxt * BLOCK_N, k_col], ready.index(ns), k_s.index(ns))
                tma.async_copy_global_to_shared(kv_desc, [tok0 + nxt * BLOCK_N, v_col], ready.index(ns), v_s.index(ns))
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            # the next tile's q·kᵀ first, then this tile's P·V; the q·kᵀ waited for with the P·V still
            # running, so the next softmax overlaps it
            ks = (kr + 1) % STAGES
            mbarrier.wait(ready.index(ks), ((kr + 1) // STAGES) & 1)
            s_next = warpgroup_mma(q_s, k_s.index(ks).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_s.index(kr % STAGES), acc, is_async=True)
            s_cur, acc = warpgroup_mma_wait(num_outstanding=1, deps=(s_next, acc))
        # the last key row (H >= 2: the launcher's check)
        p, alpha, m_i, l_i = _softmax_tile(s_cur, rw, ph_s, 0, grid_row, m_i, l_i, qk_scale, QR, rows)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_s.index((H - 1) % STAGES), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(q_bar)

        out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        q_s.store(out.to(dtype))  # q's buffer holds the output tile
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [tok0 + r0 * BLOCK_N, q_col], q_s)
        tma.store_wait(pendings=0)


    @gluon.jit
    def _window_attention_kernel(q_desc, k8_desc, k2_desc, tab_desc, out_ptr, pad_ptr, H, W, heads, n_ww, qk_scale,
                                 inv_scale, WIN: gl.constexpr, HAS_PAD: gl.constexpr, num_warps: gl.constexpr):
        # One program: one window of one image and head. Its queries in tiles of QR = 4 grid rows (64 slots,
        # 16 a row: the window's 14 columns and 2 of the next window's, or zeros past the grid), one after
        # the other, each against all the window's 14 x 16 key slots at once (no running maximum); the keys
        # in three boxes of 8, 4 and 2 rows (Triton's shapes are powers of two), loaded once; the next
        # tile's queries arrive while this one's are processed.
        gl.static_assert(WIN == 14, "key boxes of 8, 4 and 2 rows")
        gl.static_assert(q_desc.block_type.shape[1] == 4, "the 4-row key boxes share the query box's descriptor")
        QR: gl.constexpr = q_desc.block_type.shape[1]
        COLS: gl.constexpr = q_desc.block_type.shape[2]
        D: gl.constexpr = q_desc.block_type.shape[4]
        BLOCK_M: gl.constexpr = QR * COLS
        TAB: gl.constexpr = tab_desc.block_type.shape[0]  # table_h's rows (TAB / 2, zeros past 2·WIN − 1), table_w's
        RC: gl.constexpr = 2 * COLS  # bias columns: 16 key rows, 16 key columns
        NT: gl.constexpr = (WIN + QR - 1) // QR  # query tiles
        dtype: gl.constexpr = q_desc.dtype
        t_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, TAB, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])
        flat: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        r_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=2)
        g_layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        v_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

        win = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // heads
        h = bh % heads
        y0 = (win // n_ww) * WIN
        x0 = (win % n_ww) * WIN

        q5 = gl.allocate_shared_memory(dtype, [2, 1, QR, COLS, 1, D], q_desc.layout)
        ka = gl.allocate_shared_memory(dtype, [1, 8, COLS, 1, D], k8_desc.layout)
        kb = gl.allocate_shared_memory(dtype, [1, 4, COLS, 1, D], q_desc.layout)
        kc = gl.allocate_shared_memory(dtype, [1, 2, COLS, 1, D], k2_desc.layout)
        va = gl.allocate_shared_memory(dtype, [1, 8, COLS, 1, D], k8_desc.layout)
        vb = gl.allocate_shared_memory(dtype, [1, 4, COLS, 1, D], q_desc.layout)
        vc = gl.allocate_shared_memory(dtype, [1, 2, COLS, 1, D], k2_desc.layout)
        t_s = gl.allocate_shared_memory(dtype, [TAB, D], tab_desc.layout)
        ea = gl.allocate_shared_memory(dtype, [8 * COLS, RC], r_layout)
        eb = gl.allocate_shared_memory(dtype, [4 * COLS, RC], r_layout)
        ec = gl.allocate_shared_memory(dtype, [2 * COLS, RC], r_layout)
        r_s = gl.allocate_shared_memory(dtype, [BLOCK_M, RC], r_layout)
        bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())  # k, v, q slots 0 / 1
        for i in gl.static_range(4):
            mbarrier.init(bars.index(i), count=1)
        kv_bytes: gl.constexpr = k8_desc.block_type.nbytes + q_desc.block_type.nbytes + k2_desc.block_type.nbytes
        for i in gl.static_range(2):  # k, then v
            slot = (1 + i) * heads + h
            bar = bars.index(i)
            mbarrier.expect(bar, kv_bytes)
            tma.async_copy_global_to_shared(k8_desc, [b, y0, x0, slot, 0], bar, ka if i == 0 else va)
            tma.async_copy_global_to_shared(q_desc, [b, y0 + 8, x0, slot, 0], bar, kb if i == 0 else vb)
            tma.async_copy_global_to_shared(k2_desc, [b, y0 + 12, x0, slot, 0], bar, kc if i == 0 else vc)
        mbarrier.expect(bars.index(2), q_desc.block_type.nbytes + tab_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(tab_desc, [0, 0], bars.index(2), t_s)
        tma.async_copy_global_to_shared(q_desc, [b, y0, x0, h, 0], bars.index(2), q5.index(0))
        mbarrier.expect(bars.index(3), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, y0 + QR, x0, h, 0], bars.index(3), q5.index(1))
        # E: each key slot's one-hot row (its key row) and column (16 + its key column), so that R·Eᵀ adds
        # each query's rel_h and rel_w of the key; built while the loads are in flight
        _one_hot(ea, 0, COLS, v_layout)
        _one_hot(eb, 8 * COLS, COLS, v_layout)
        _one_hot(ec, 12 * COLS, COLS, v_layout)
        # the boxes' rows (grid row, column) as the MMAs' rows: the same bytes (128-byte swizzle a 64-wide row)
        ka = ka._reinterpret(dtype, [8 * COLS, D], flat)
        kb = kb._reinterpret(dtype, [4 * COLS, D], flat)
        kc = kc._reinterpret(dtype, [2 * COLS, D], flat)
        va = va._reinterpret(dtype, [8 * COLS, D], flat)
        vb = vb._reinterpret(dtype, [4 * COLS, D], flat)
        vc = vc._reinterpret(dtype, [2 * COLS, D], flat)
        mbarrier.wait(bars.index(0), 0)
        mbarrier.wait(bars.index(1), 0)
        if HAS_PAD:
            if (y0 + WIN > H) | (x0 + WIN > W):  # keys past the grid take the padding token's k and v
                pk = pad_ptr + (heads + h) * D
                pv = pad_ptr + (2 * heads + h) * D
                _pad_keys(ka, pk, y0, x0, 0, H, W, WIN, COLS, D, v_layout)
                _pad_keys(kb, pk, y0, x0, 8, H, W, WIN, COLS, D, v_layout)
                _pad_keys(kc, pk, y0, x0, 12, H, W, WIN, COLS, D, v_layout)
                _pad_keys(va, pv, y0, x0, 0, H, W, WIN, COLS, D, v_layout)
                _pad_keys(vb, pv, y0, x0, 8, H, W, WIN, COLS, D, v_layout)
                _pad_keys(vc, pv, y0, x0, 12, H, W, WIN, COLS, D, v_layout)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        mi = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, g_layout))
        jj = gl.arange(0, RC, layout=gl.SliceLayout(0, g_layout))[None, :]
        kk = jj % COLS  # the key row (jj < 16) or column (jj >= 16) of a bias column
        mo = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, v_layout))
        d = gl.arange(0, D, layout=gl.SliceLayout(0, v_layout))
        for t in range(NT):
            qb = t % 2
            q_s = q5.index(qb)._reinterpret(dtype, [BLOCK_M, D], flat)
            mbarrier.wait(bars.index(2 + qb), (t // 2) & 1)
            # rel-pos products P = q · [table_h; table_w]ᵀ, rounded to the activations' dtype (as the
            # model's einsums); each query's bias row R: rel_h of the 16 key rows, then rel_w of the 16
            # key columns (rows and columns past the window masked), in q·k's units. The logits are
            # q·kᵀ + R·Eᵀ, both on the tensor cores.
            ph = warpgroup_mma(q_s, t_s.permute((1, 0)), gl.zeros([BLOCK_M, TAB], gl.float32, t_layout),
                               use_acc=False)
            ph = gl.convert_layout(ph.to(dtype), g_layout).to(gl.float32)
            qr = (t * QR + mi // COLS)[:, None]
            qc = (mi % COLS)[:, None]
            idx = gl.where(jj < COLS, qr, TAB // 2 + qc) - kk + WIN - 1
            idx = gl.minimum(gl.maximum(idx, 0), TAB - 1)
            rel = gl.gather(ph, idx, 1) * inv_scale
            r_s.store(gl.where(kk < WIN, rel, -60000.0).to(dtype))
            fence_async_shared()
            _cta_barrier()
            sa = _window_logits(q_s, ka, r_s, ea, num_warps)
            sb = _window_logits(q_s, kb, r_s, eb, num_warps)
            sc = _window_logits(q_s, kc, r_s, ec, num_warps)
            sa, sb, sc = warpgroup_mma_wait(num_outstanding=0, deps=(sa, sb, sc))
            # this q slot is free: tile t + 2's queries into it
            if t + 2 < NT:
                mbarrier.expect(bars.index(2 + qb), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [b, y0 + (t + 2) * QR, x0, h, 0], bars.index(2 + qb),
                                                q5.index(qb))
            rows_a: gl.constexpr = gl.SliceLayout(1, sa.type.layout)
            m = gl.maximum(gl.max(sa, 1), gl.convert_layout(gl.max(sb, 1), rows_a))
            m = gl.maximum(m, gl.convert_layout(gl.max(sc, 1), rows_a)) * qk_scale
            pa = gl.exp2(sa * qk_scale - m[:, None])
            pb = gl.exp2(sb * qk_scale - gl.convert_layout(m, gl.SliceLayout(1, sb.type.layout))[:, None])
            pc = gl.exp2(sc * qk_scale - gl.convert_layout(m, gl.SliceLayout(1, sc.type.layout))[:, None])
            l = gl.convert_layout(gl.sum(pa, 1), rows_o) + gl.convert_layout(gl.sum(pb, 1), rows_o)
            l = l + gl.convert_layout(gl.sum(pc, 1), rows_o)
            o = warpgroup_mma(gl.convert_layout(pa.to(dtype), p_layout), va,
                              gl.zeros([BLOCK_M, D], gl.float32, o_layout), use_acc=False, is_async=True)
            o = warpgroup_mma(gl.convert_layout(pb.to(dtype), p_layout), vb, o, is_async=True)
            o = warpgroup_mma(gl.convert_layout(pc.to(dtype), p_layout), vc, o, is_async=True)
            o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
            o = o / l[:, None]
            # the window's queries inside the grid
            o = gl.convert_layout(o.to(dtype), v_layout)
            wr = t * QR + mo // COLS
            wc = mo % COLS
            ok = (wr < WIN) & (wc < WIN) & (y0 + wr < H) & (x0 + wc < W)
            tok = (b * H + y0 + wr).to(gl.int64) * W + x0 + wc
            gl.store(out_ptr + tok[:, None] * (heads * D) + h * D + d[None, :], o, mask=ok[:, None])
        for i in gl.static_range(4):
            mbarrier.invalidate(bars.index(i))

    @gluon.jit
    def _one_hot(buf, n0: gl.constexpr, COLS: gl.constexpr, layout: gl.constexpr):
        """Rows n0 … of E: key slot n = COLS·row + column has ones at ``row`` and ``COLS + column``."""
        n = n0 + gl.arange(0, buf.shape[0], layout=gl.SliceLayout(1, layout))[:, None]
        j = gl.arange(0, buf.shape[1], layout=gl.SliceLayout(0, layout))[None, :]
        buf.store(((j == n // COLS) | (j == COLS + n % COLS)).to(buf.dtype))

    @gluon.jit
    def _window_logits(q_s, k_s, r_s, e_s, num_warps: gl.constexpr):
        """q·kᵀ + R·Eᵀ for one key box (issued, not waited for)."""
        M: gl.constexpr = q_s.shape[0]
        N: gl.constexpr = k_s.shape[0]
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, N, 16])
        s = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([M, N], gl.float32, layout), use_acc=False,
                          is_async=True)
        return warpgroup_mma(r_s, e_s.permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _pad_keys(buf, pad_ptr, y0, x0, kr0: gl.constexpr, H, W, WIN: gl.constexpr, COLS: gl.constexpr,
                  D: gl.constexpr, layout: gl.constexpr):
        """A key box's slots past the grid (zeros from TMA) set to the padding token's row (box rows from
        the window's key row kr0)."""
        x = buf.load(layout)
        n = gl.arange(0, buf.shape[0], layout=gl.SliceLayout(1, layout))
        kr = kr0 + n // COLS
        kc = n % COLS
        outside = (kc < WIN) & ((y0 + kr >= H) | (x0 + kc >= W))
        fill = gl.load(pad_ptr + gl.arange(0, D, layout=gl.SliceLayout(0, layout)))
        buf.store(gl.where(outside[:, None], fill[None, :], x))


def _check_tables(name: str, table_h: torch.Tensor, table_w: torch.Tensor, n_h: int, n_w: int) -> None:
    """The rel-pos tables of an n_h x n_w attention span: (2·n − 1, 64) each."""
    if tuple(table_h.shape) != (2 * n_h - 1, HEAD_D) or tuple(table_w.shape) != (2 * n_w - 1, HEAD_D):
        raise ValueError(f"{name} expects table_h of shape ({2 * n_h - 1}, {HEAD_D}) and table_w of shape "
                         f"({2 * n_w - 1}, {HEAD_D}), got {tuple(table_h.shape)} and {tuple(table_w.shape)}")


def _tma_desc(t: torch.Tensor, block: list):
    """A TMA descriptor of the 2-D bf16 / fp16 ``t`` in ``block`` boxes, NVMMA-swizzled for the MMAs."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gdt))


def global_attention_applies(qkv: torch.Tensor, num_heads: int, window: int, pad) -> bool:
    """The Gluon kernel's domain: global attention (window 0) on a grid 64 tokens wide and an even
    2 to 64 high, head_dim 64, a contiguous bf16 / fp16 qkv of 1 to 65535 images x heads (a launch
    grid's second dimension) on a Hopper GPU with Gluon. (A global layer pads nothing: ``pad`` is
    not read.)"""
    if window != 0 or not (qkv.is_cuda and qkv.dtype in KERNEL_DTYPES and gluon_available()):
        return False
    B, H, W, C3 = qkv.shape
    if (W != BLOCK or not (max(STAGES - 1, 2) <= H <= BLOCK) or H % QUERY_ROWS or C3 != 3 * num_heads * HEAD_D
            or not 1 <= B * num_heads <= _MAX_GRID_Y or not qkv.is_contiguous() or qkv.data_ptr() % 16):
        return False  # (TMA: a 16-byte aligned base)
    index = qkv.device.index if qkv.device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] == 9


def rel_pos_global_attention_gluon(qkv, table_h, table_w, num_heads: int, scale: float, stages: int = STAGES,
                                   rows: int = QUERY_ROWS, maxnreg: int | None = MAXNREG) -> torch.Tensor:
    """``rel_pos_window_attention(qkv, table_h, table_w, num_heads, 0, scale)`` by the Gluon kernel
    (``global_attention_applies`` true): ``rows`` grid rows of queries a program. Returns
    (B, H, W, heads · 64)."""
    B, H, W, C3 = qkv.shape
    if rows < 1 or H % rows or stages < 2 or not max(stages - 1, 2) <= H <= BLOCK or not scale >= _MIN_KERNEL_SCALE:
        raise ValueError(f"rel_pos_global_attention_gluon expects grid rows of queries a program dividing the grid's "
                         f"{H} rows, 2 or more K/V slots, at most H + 1 of them, 2 <= H <= {BLOCK} and a positive "
                         f"scale (the row maximum is taken before scaling); got rows={rows}, stages={stages}, "
                         f"scale={scale}")
    if not global_attention_applies(qkv, num_heads, 0, None):
        raise ValueError(f"rel_pos_global_attention_gluon expects a contiguous, 16-byte aligned bf16 / fp16 qkv of "
                         f"shape (B, H, {BLOCK}, 3 * {num_heads} * {HEAD_D}) with an even H on a Hopper GPU, got "
                         f"{tuple(qkv.shape)} {qkv.dtype} on {qkv.device}")
    _check_tables("rel_pos_global_attention_gluon", table_h, table_w, H, W)
    dt = qkv.dtype
    out = torch.empty((B, H, W, num_heads * HEAD_D), dtype=dt, device=qkv.device)

    # table boxes of TABLE_ROWS rows: table_h's from grid row r0 on (zero rows past its 2H − 1), all of
    # table_w's 2W − 1 and a zero row
    th = F.pad(table_h.to(dt), (0, 0, 0, H - rows + TABLE_ROWS - table_h.shape[0])).contiguous()
    tw = F.pad(table_w.to(dt), (0, 0, 0, TABLE_ROWS - table_w.shape[0])).contiguous()
    scratch = torch.empty((B * num_heads * H, BLOCK, TABLE_ROWS), dtype=dt, device=qkv.device)
    flat = qkv.view(B * H * W, C3)
    _global_attention_kernel[(H // rows, B * num_heads)](
        _tma_desc(flat, [rows * BLOCK, HEAD_D]), _tma_desc(flat, [BLOCK, HEAD_D]),
        _tma_desc(th, [TABLE_ROWS, HEAD_D]), _tma_desc(tw, [TABLE_ROWS, HEAD_D]),
        _tma_desc(out.view(B * H * W, num_heads * HEAD_D), [rows * BLOCK, HEAD_D]),
        scratch, H, num_heads, float(scale) * LOG2E, QR=rows, STAGES=stages, num_warps=4 * rows,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    return out


# ---- the windowed layers -----------------------------------------------------------------------------
# ``_window_attention_kernel``: one program per 14 x 14 window of one image and head (4 warps), from the qkv grid
# in place (5-D TMA boxes of grid rows x 16 columns; zeros past the grid, replaced by the padding token's k and v
# where ``pad`` is given, as segment_anything pads the grid before its qkv projection):
# - the keys once: 14 key rows of 16 slots (a row's 14 columns and 2 of the next window's, masked), in boxes of
#   8, 4 and 2 rows (Triton's shapes are powers of two);
# - the queries in 4 tiles of 4 grid rows (64 slots), the next tile's loaded while one is processed;
# - a tile's rel-pos bias on the tensor cores: P = q · [table_h; table_w]ᵀ (rounded as the model's einsums),
#   each query's 32-column bias row R gathered from P (rel_h of the 16 key rows, rel_w of the 16 key columns,
#   masked past the window, divided by the scale), and the logits q·kᵀ + R·Eᵀ with E the key slots' one-hot
#   rows and columns, built once a program;
# - all 224 key slots' logits at once, so the softmax needs no running maximum or rescaling; P·V on the tensor
#   cores with P from registers.
# H100, SAM's windowed layer at batch 16 against the tl kernel in the same call (rel_pos_window_gluon.json):
# vit_b 0.346 against 0.485 ms, vit_l 0.405 against 0.586; the errors equal the tl kernel's. A first version, one
# program per query tile (K and V read four times, no prefetch of the next tile's queries), took 0.440 ms against
# 0.509 (rel_pos_window_gluon_first_version.json).
WIN_COLS = 16  # slots a window row: its columns, then the next window's (or zeros past the grid), masked
WIN_QROWS = 4  # grid rows of queries a program: 4 x 16 = 64 query slots (one warpgroup's wgmma M)
WIN_TAB = 32  # rows of each table in the table box (2 · window − 1 <= 31, zeros past)
WIN_SIZE = 14  # SAM's window: key boxes of 8, 4 and 2 rows (Triton's shapes are powers of two)
# The bias row R is stored in the activations' dtype in q·k's units (rel / scale; exact for a power-of-two
# scale, e.g. SAM's 64^-0.5), its masked slots at −60000: the scales where these hold (the mask's weight
# 2^(−60000 · scale · log2 e) is 0 in fp32, and fp16 rel terms up to 65504 · scale do not overflow)
WIN_MIN_SCALE = 2.0 ** -6


def window_attention_applies(qkv: torch.Tensor, num_heads: int, window: int, pad, scale: float) -> bool:
    """The windowed Gluon kernel's domain: SAM's windows of 14 x 14 tokens, head_dim 64, a contiguous,
    16-byte aligned bf16 / fp16 qkv of 1 to 65535 images x heads on a Hopper GPU with Gluon, a scale of at
    least ``WIN_MIN_SCALE``; ``pad`` (the padding token's qkv row, (3 · heads · 64,)) None or contiguous on
    qkv's device."""
    if not (window == WIN_SIZE and scale >= WIN_MIN_SCALE and qkv.is_cuda and qkv.dtype in KERNEL_DTYPES
            and gluon_available()):
        return False
    B, H, W, C3 = qkv.shape
    bad_pad = pad is not None and (tuple(pad.shape) != (C3,) or not pad.is_contiguous() or pad.device != qkv.device)
    if (C3 != 3 * num_heads * HEAD_D or not 1 <= B * num_heads <= _MAX_GRID_Y or H * W == 0
            or not qkv.is_contiguous() or qkv.data_ptr() % 16 or bad_pad):
        return False
    index = qkv.device.index if qkv.device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] == 9


def rel_pos_window_attention_gluon(qkv, table_h, table_w, num_heads: int, window: int, scale: float,
                                   pad: torch.Tensor | None = None) -> torch.Tensor:
    """``rel_pos_window_attention(qkv, table_h, table_w, num_heads, window, scale, pad)`` by the windowed
    Gluon kernel (``window_attention_applies`` true). Returns (B, H, W, heads · 64)."""
    if not window_attention_applies(qkv, num_heads, window, pad, scale):
        pad_desc = None
        if pad is not None:
            pad_desc = f"{tuple(pad.shape)} {'contiguous' if pad.is_contiguous() else 'strided'} on {pad.device}"
        raise ValueError(f"rel_pos_window_attention_gluon expects a contiguous, 16-byte aligned bf16 / fp16 qkv of "
                         f"shape (B, H, W, 3 * {num_heads} * {HEAD_D}) with B * heads <= {_MAX_GRID_Y}, a window of "
                         f"{WIN_SIZE}, a scale >= {WIN_MIN_SCALE} and a pad row of shape (3 * heads * {HEAD_D},) "
                         f"(contiguous, on qkv's device) or None, on a Hopper GPU; got qkv {tuple(qkv.shape)} "
                         f"{qkv.dtype} on {qkv.device}, window {window}, scale {scale}, pad {pad_desc}")
    _check_tables("rel_pos_window_attention_gluon", table_h, table_w, window, window)
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dt = qkv.dtype
    B, H, W, C3 = qkv.shape
    out = torch.empty((B, H, W, num_heads * HEAD_D), dtype=dt, device=qkv.device)
    rows = 2 * window - 1
    tab = torch.cat([F.pad(t.to(dt), (0, 0, 0, WIN_TAB - rows)) for t in (table_h, table_w)]).contiguous()
    # qkv as (B, H, W, 3 · heads, 64): a box is grid rows x 16 columns of one head's q, k or v (TMA fills zeros
    # past the grid)
    grid5 = qkv.view(B, H, W, 3 * num_heads, HEAD_D)
    swz = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=5)

    def box(rows_):
        return TensorDescriptor(grid5, list(grid5.shape), list(grid5.stride()), [1, rows_, WIN_COLS, 1, HEAD_D], swz)

    n_wh, n_ww = -(-H // window), -(-W // window)
    pad_t = pad.to(dt) if pad is not None else tab  # (not read without a pad)
    _window_attention_kernel[(n_wh * n_ww, B * num_heads)](
        box(WIN_QROWS), box(8), box(2), _tma_desc(tab, [2 * WIN_TAB, HEAD_D]), out, pad_t, H, W, num_heads, n_ww,
        float(scale) * LOG2E, 1.0 / float(scale), WIN=window, HAS_PAD=pad is not None, num_warps=4)
    return out
