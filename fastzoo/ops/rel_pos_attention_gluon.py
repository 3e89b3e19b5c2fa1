"""SAM's global rel-pos attention layers on Hopper: a Gluon kernel (TMA loads, asynchronous wgmma).

The image encoder's global layers (vit_b / vit_l: blocks 2, 5, 8, 11 and 5, 11, 17, 23) attend
over the whole 64 x 64 token grid with head_dim 64: 4096 keys a query, the bias
``q · table_h[r_q − r_k + H − 1] + q · table_w[c_q − c_k + W − 1]`` added to each logit
(``rel_pos_attention.rel_pos_window_attention``, window 0, is the definition and the fallback).
In the vit_b bf16 encoder they are ~72 % of the attention kernel's time (four layers of ~2.4 ms
at batch 16 on an H100, the eight windowed ones ~0.47 ms each).

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
    if tuple(table_h.shape) != (2 * H - 1, HEAD_D) or tuple(table_w.shape) != (2 * W - 1, HEAD_D):
        raise ValueError(f"rel_pos_global_attention_gluon expects table_h of shape ({2 * H - 1}, {HEAD_D}) and table_w "
                         f"of shape ({2 * W - 1}, {HEAD_D}), got {tuple(table_h.shape)} and {tuple(table_w.shape)}")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dt = qkv.dtype
    gdt = gl.bfloat16 if dt == torch.bfloat16 else gl.float16
    out = torch.empty((B, H, W, num_heads * HEAD_D), dtype=dt, device=qkv.device)

    def desc(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gdt))

    # table boxes of TABLE_ROWS rows: table_h's from grid row r0 on (zero rows past its 2H − 1), all of
    # table_w's 2W − 1 and a zero row
    th = F.pad(table_h.to(dt), (0, 0, 0, H - rows + TABLE_ROWS - table_h.shape[0])).contiguous()
    tw = F.pad(table_w.to(dt), (0, 0, 0, TABLE_ROWS - table_w.shape[0])).contiguous()
    scratch = torch.empty((B * num_heads * H, BLOCK, TABLE_ROWS), dtype=dt, device=qkv.device)
    flat = qkv.view(B * H * W, C3)
    _global_attention_kernel[(H // rows, B * num_heads)](
        desc(flat, [rows * BLOCK, HEAD_D]), desc(flat, [BLOCK, HEAD_D]), desc(th, [TABLE_ROWS, HEAD_D]),
        desc(tw, [TABLE_ROWS, HEAD_D]), desc(out.view(B * H * W, num_heads * HEAD_D), [rows * BLOCK, HEAD_D]),
        scratch, H, num_heads, float(scale) * LOG2E, QR=rows, STAGES=stages, num_warps=4 * rows,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    return out
