"""SCRATCH (not committed): variants of _rel_pos_attention_kernel for SAM's window/global layers.

FOLD: the bias enters the Q·Kᵀ accumulator (tl.dot acc init) in q·k units; with one key
row a tile, rel_h becomes a per-row offset of the max (exp2 argument one FMA).
TMA: K and V tiles by tensor descriptors (global layers only: whole grid rows, no pad).
WS: warp_specialize on the key loop.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastzoo.ops._common import LOG2E, next_pow2, short_bench, unit_stride_last
from fastzoo.ops.rel_pos_attention import _head_dim_blocks, _window_geometry


def _cfgs():
    out = []
    for bm, bn, w, s in [(64, 32, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2),
                         (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_hook))
    return out


def _hook(nargs):
    bn, bd, bd2 = nargs["BLOCK_N"], nargs["BLOCK_D"], nargs["BLOCK_D2"]
    if nargs["TMA"]:
        nargs["k_desc"].block_shape = [bn, bd]
        nargs["v_desc"].block_shape = [bn, bd]
        nargs["k2_desc"].block_shape = [bn, bd2]
        nargs["v2_desc"].block_shape = [bn, bd2]


def _prune(configs, named_args, **kwargs):
    get = lambda name: kwargs.get(name, named_args.get(name))  # noqa: E731
    kw_p = get("KW_P")
    kept = configs
    if get("SPLIT_D"):
        kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 2 * kw_p]
    if get("TMA") or get("FOLD_ONE"):
        kept = [c for c in kept if c.kwargs["BLOCK_N"] % kw_p == 0]
    if kw_p < 64:
        kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 2 * kw_p]
    else:
        kept = [c for c in kept if c.kwargs["BLOCK_N"] >= kw_p]
    return kept or configs[:1]


@triton.autotune(configs=_cfgs(), key=["Nq", "HEAD_D", "k_h", "k_w", "GRID", "HAS_PAD", "FOLD", "TMA", "WS"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=short_bench)
@triton.jit
def _var_kernel(
    q_ptr, k_ptr, v_ptr, rh_ptr, rw_ptr, o_ptr, pad_ptr, k_desc, v_desc, k2_desc, v2_desc,
    sq_b, sq_h, sq_y, sq_x,
    sk_b, sk_h, sk_y, sk_x,
    sv_b, sv_h, sv_y, sv_x,
    srh_b, srh_h, srh_y, srh_x,
    srw_b, srw_h, srw_y, srw_x,
    so_b, so_h, so_y, so_x,
    H, N_WH, N_WW, GRID_H, GRID_W, Nq, HEAD_D, k_h, k_w, qk_scale, inv_scale, kcol0, vcol0,
    BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    KW_P: tl.constexpr, KW_EXACT: tl.constexpr, KH_DIV: tl.constexpr,
    GRID: tl.constexpr, HAS_PAD: tl.constexpr, FOLD: tl.constexpr, FOLD_ONE: tl.constexpr, TMA: tl.constexpr,
    WS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    WHOLE_ROWS: tl.constexpr = KW_P <= BLOCK_N
    BLOCK_KW: tl.constexpr = KW_P if WHOLE_ROWS else BLOCK_N
    ROWS: tl.constexpr = BLOCK_N // BLOCK_KW
    EVEN: tl.constexpr = WHOLE_ROWS & KW_EXACT & (KH_DIV % ROWS == 0)
    DIR: tl.constexpr = -1

    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    h = (pid % H).to(tl.int64)
    win = pid // H
    n_win = N_WH * N_WW
    b = (win // n_win).to(tl.int64)
    wy0 = ((win % n_win) // N_WW) * k_h
    wx0 = (win % N_WW) * k_w

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    n_row = offs_n // BLOCK_KW
    n_col = offs_n % BLOCK_KW
    d_ok = offs_d < HEAD_D
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    q_r = offs_m // k_w
    q_c = offs_m % k_w
    m_ok = (offs_m < Nq) & (wy0 + q_r < GRID_H) & (wx0 + q_c < GRID_W)
    q_rows = q_ptr + b * sq_b + h * sq_h + (wy0 + q_r) * sq_y + (wx0 + q_c) * sq_x
    k_base += wy0 * sk_y + wx0 * sk_x
    v_base += wy0 * sv_y + wx0 * sv_x
    rh_rows = rh_ptr + b * srh_b + h * srh_h + (wy0 + q_r) * srh_y + (wx0 + q_c) * srh_x + q_r + k_h - 1
    rw_rows = rw_ptr + b * srw_b + h * srw_h + (wy0 + q_r) * srw_y + (wx0 + q_c) * srw_x + q_c + k_w - 1
    # TMA (global layers): token row of this image's first key in the (B·GRID_H·GRID_W, C3) view
    tok0 = (b * GRID_H * GRID_W).to(tl.int32)
    h32 = h.to(tl.int32)

    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_PAD:
        pad_k = tl.load(pad_ptr + (H + h) * HEAD_D + offs_d, mask=d_ok, other=0.0)
        pad_v = tl.load(pad_ptr + (2 * H + h) * HEAD_D + offs_d, mask=d_ok, other=0.0)
    if SPLIT_D:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_ok = offs_d2 < HEAD_D
        q2 = tl.load(q_rows[:, None] + offs_d2[None, :], mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
        if HAS_PAD:
            pad_k2 = tl.load(pad_ptr + (H + h) * HEAD_D + offs_d2, mask=d2_ok, other=0.0)
            pad_v2 = tl.load(pad_ptr + (2 * H + h) * HEAD_D + offs_d2, mask=d2_ok, other=0.0)

    n_col_chunks = tl.cdiv(k_w, BLOCK_KW)
    n_tiles = tl.cdiv(k_h, ROWS) * n_col_chunks
    if WHOLE_ROWS:
        rw_all = tl.load(rw_rows[:, None] + DIR * n_col[None, :],
                         mask=m_ok[:, None] & (n_col < k_w)[None, :], other=0.0)
        if FOLD:
            # q·k units; keys past the row's end: -inf (no mask later)
            rw_all = tl.where((n_col < k_w)[None, :], rw_all.to(tl.float32) * inv_scale, float("-inf"))
        else:
            rw_all = rw_all.to(tl.float32) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if ROWS == 1:
        rh_next = tl.load(rh_rows, mask=m_ok, other=0.0)
    for t in tl.range(0, n_tiles, warp_specialize=WS):
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
        if HAS_PAD:
            key_in = key_ok & (wy0 + kr < GRID_H) & (wx0 + kc < GRID_W)
        k_off = kr * sk_y + kc * sk_x
        v_off = kr * sv_y + kc * sv_x

        # ---- S = Q·Kᵀ (+ bias in the accumulator under FOLD)
        if FOLD:
            if ROWS == 1:
                if WHOLE_ROWS:
                    init = rw_all
                else:
                    rw = tl.load(rw_rows[:, None] + DIR * kc[None, :],
                                 mask=m_ok[:, None] & (kc < k_w)[None, :], other=0.0)
                    init = tl.where((kc < k_w)[None, :], rw.to(tl.float32) * inv_scale, float("-inf"))
            else:
                init = rw_all
                for r in tl.static_range(ROWS):
                    rh = tl.load(rh_rows + DIR * (kr0 + r), mask=m_ok & (kr0 + r < k_h), other=0.0)
                    rh = tl.where(kr0 + r < k_h, rh.to(tl.float32) * inv_scale, float("-inf"))
                    init += tl.where((n_row == r)[None, :], rh[:, None], 0.0)
        else:
            init = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if TMA:
            kt = k_desc.load([tok0 + t * BLOCK_N, kcol0 + h32 * HEAD_D]).T
        else:
            kt = tl.load(k_base + k_off[None, :] + offs_d[:, None], mask=key_in[None, :] & d_ok[:, None], other=0.0)
            if HAS_PAD:
                kt = tl.where(key_in[None, :], kt, pad_k[:, None])
        qk = tl.dot(q, kt, init)
        if SPLIT_D:
            if TMA:
                kt2 = k2_desc.load([tok0 + t * BLOCK_N, kcol0 + h32 * HEAD_D + BLOCK_D]).T
            else:
                kt2 = tl.load(k_base + k_off[None, :] + offs_d2[:, None],
                              mask=key_in[None, :] & d2_ok[:, None], other=0.0)
                if HAS_PAD:
                    kt2 = tl.where(key_in[None, :], kt2, pad_k2[:, None])
            qk = tl.dot(q2, kt2, qk)

        if FOLD:
            if ROWS == 1:
                c = rh_tile.to(tl.float32) * LOG2E
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale + c)
                p = tl.exp2(qk * qk_scale - (m_new - c)[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.exp2(qk * qk_scale - m_new[:, None])
        else:
            s = qk * qk_scale
            if ROWS == 1:
                s += (rh_tile.to(tl.float32) * LOG2E)[:, None]
            else:
                for r in tl.static_range(ROWS):
                    rh = tl.load(rh_rows + DIR * (kr0 + r), mask=m_ok & (kr0 + r < k_h), other=0.0)
                    s += tl.where((n_row == r)[None, :], (rh.to(tl.float32) * LOG2E)[:, None], 0.0)
            if WHOLE_ROWS:
                s += rw_all
            else:
                rw = tl.load(rw_rows[:, None] + DIR * kc[None, :],
                             mask=m_ok[:, None] & (kc < k_w)[None, :], other=0.0)
                s += rw.to(tl.float32) * LOG2E
            if not EVEN:
                s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)

        if TMA:
            vt = v_desc.load([tok0 + t * BLOCK_N, vcol0 + h32 * HEAD_D])
        else:
            vt = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=key_in[:, None] & d_ok[None, :], other=0.0)
            if HAS_PAD:
                vt = tl.where(key_in[:, None], vt, pad_v[None, :])
        p = p.to(vt.dtype)
        acc = tl.dot(p, vt, acc * alpha[:, None])
        if SPLIT_D:
            if TMA:
                vt2 = v2_desc.load([tok0 + t * BLOCK_N, vcol0 + h32 * HEAD_D + BLOCK_D])
            else:
                vt2 = tl.load(v_base + v_off[:, None] + offs_d2[None, :],
                              mask=key_in[:, None] & d2_ok[None, :], other=0.0)
                if HAS_PAD:
                    vt2 = tl.where(key_in[:, None], vt2, pad_v2[None, :])
            acc2 = tl.dot(p, vt2, acc2 * alpha[:, None])
        m_i = m_new

    out = acc / l_i[:, None]
    o_rows = o_ptr + b * so_b + h * so_h + (wy0 + q_r) * so_y + (wx0 + q_c) * so_x
    tl.store(o_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if SPLIT_D:
        out2 = acc2 / l_i[:, None]
        tl.store(o_rows[:, None] + offs_d2[None, :], out2.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d2_ok[None, :])


def window_attention_var(qkv, table_h, table_w, num_heads, window=0, scale=None, pad=None, *,
                         fold=False, tma=False, ws=False, cfg=None):
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    if scale is None:
        scale = D ** -0.5
    wh, ww, ph, pw = _window_geometry(H, W, window)
    qkv = unit_stride_last(qkv)
    q, k, v = qkv.view(B, H, W, 3, num_heads, D).unbind(3)
    out = torch.empty((B, H, W, num_heads, D), dtype=qkv.dtype, device=qkv.device)
    t = torch.cat([table_h, table_w]).to(qkv.dtype)
    t = F.pad(t, (0, 0, 0, (-t.shape[0]) % 8))
    q_heads = qkv.reshape(B * H * W, 3, num_heads, D)[:, 0].transpose(0, 1)
    S = torch.bmm(q_heads, t.t().expand(num_heads, D, t.shape[0]))
    S = S.view(num_heads, B, H, W, t.shape[0]).permute(1, 2, 3, 0, 4)
    s_h, s_w = S[..., :table_h.shape[0]], S[..., table_h.shape[0]:]
    if ph or pw:
        pad = (qkv.new_zeros(C3) if pad is None else pad.to(qkv.dtype)).contiguous()
    else:
        pad = None
    if tma:
        assert pad is None and window == 0
    q2d = qkv.view(B * H * W, C3)
    desc = TensorDescriptor(q2d, list(q2d.shape), list(q2d.stride()), [16, 16])
    descs = [TensorDescriptor(q2d, list(q2d.shape), list(q2d.stride()), [16, 16]) for _ in range(4)]
    gf = lambda t: (t.stride(0), t.stride(3), t.stride(1), t.stride(2))  # noqa: E731
    strides = [gf(x) for x in (q, k, v, s_h, s_w, out)]
    n_wh, n_ww = (H + ph) // wh, (W + pw) // ww
    nq = wh * ww
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), B * n_wh * n_ww * num_heads)  # noqa: E731
    blocks = _head_dim_blocks(D)
    kern = _var_kernel if cfg is None else _var_kernel.fn
    extra = {} if cfg is None else dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg is not None:
        _hook({**cfg.kwargs, "TMA": tma, "k_desc": descs[0], "v_desc": descs[1], "k2_desc": descs[2], "v2_desc": descs[3],
               **blocks})
    kern[grid](
        q, k, v, s_h, s_w, out, out if pad is None else pad, *descs,
        *[st for x in strides for st in x],
        num_heads, n_wh, n_ww, H, W, nq, D, wh, ww, float(scale) * LOG2E, 1.0 / float(scale),
        num_heads * D, 2 * num_heads * D,
        **blocks, KW_P=next_pow2(ww), KW_EXACT=ww == next_pow2(ww), KH_DIV=min(wh & -wh, 1024),
        GRID=True, HAS_PAD=pad is not None, FOLD=fold, FOLD_ONE=False, TMA=tma, WS=ws, **extra,
    )
    del desc
    return out.view(B, H, W, num_heads * D)


# ----------------------------------------------------------------------------------
# Small windows (k_h, k_w <= 16): the rel-pos bias as a second MMA
# ----------------------------------------------------------------------------------
import functools

_NEG = -30000.0  # bias of keys outside the window (finite: 0 x it stays 0 in the MMA)


@functools.lru_cache(maxsize=None)
def _onehot_keys(r_h: int, kp_w: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(r_h·kp_w, r_h + kp_w): row n (key row n // kp_w, column n % kp_w) is 1 at column
    n // kp_w and at r_h + n % kp_w."""
    n = torch.arange(r_h * kp_w, device=device)
    e = torch.zeros(r_h * kp_w, r_h + kp_w, device=device, dtype=dtype)
    e[n, n // kp_w] = 1
    e[n, r_h + n % kp_w] = 1
    return e


def _small_cfgs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2),
                                 (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2)]]


def _small_prune(configs, named_args, **kwargs):
    get = lambda name: kwargs.get(name, named_args.get(name))  # noqa: E731
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= get("R_H") * get("KP_W")]
    return kept or configs[:1]


@triton.autotune(configs=_small_cfgs(), key=["Nq", "HEAD_D", "k_h", "k_w", "HAS_PAD"], do_bench=short_bench,
                 prune_configs_by={"early_config_prune": _small_prune})
@triton.jit
def _small_window_kernel(
    q_ptr, k_ptr, v_ptr, rh_ptr, rw_ptr, o_ptr, pad_ptr, e_ptr,
    sq_b, sq_h, sq_y, sq_x,
    sk_b, sk_h, sk_y, sk_x,
    sv_b, sv_h, sv_y, sv_x,
    srh_b, srh_h, srh_y, srh_x,
    srw_b, srw_h, srw_y, srw_x,
    so_b, so_h, so_y, so_x,
    H, N_WH, N_WW, GRID_H, GRID_W, Nq, HEAD_D, k_h, k_w, qk_scale,
    BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    KP_W: tl.constexpr, R_H: tl.constexpr, HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    R_TOT: tl.constexpr = R_H + KP_W
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    h = (pid % H).to(tl.int64)
    win = pid // H
    n_win = N_WH * N_WW
    b = (win // n_win).to(tl.int64)
    wy0 = ((win % n_win) // N_WW) * k_h
    wx0 = (win % N_WW) * k_w

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, R_TOT)
    d_ok = offs_d < HEAD_D
    q_r = offs_m // k_w
    q_c = offs_m % k_w
    m_ok = (offs_m < Nq) & (wy0 + q_r < GRID_H) & (wx0 + q_c < GRID_W)
    q_rows = q_ptr + b * sq_b + h * sq_h + (wy0 + q_r) * sq_y + (wx0 + q_c) * sq_x
    k_base = k_ptr + b * sk_b + h * sk_h + wy0 * sk_y + wx0 * sk_x
    v_base = v_ptr + b * sv_b + h * sv_h + wy0 * sv_y + wx0 * sv_x
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    # rel terms of every key row (columns < R_H) and key column (the rest), q·k units:
    # rel_h[i, kr] = S_h[i, r_i - kr + k_h - 1]; key rows / columns past the window: _NEG
    is_h = offs_j < R_H
    jj = tl.where(is_h, offs_j, offs_j - R_H)
    j_ok = tl.where(is_h, offs_j < k_h, jj < k_w)
    rh_rows = rh_ptr + b * srh_b + h * srh_h + (wy0 + q_r) * srh_y + (wx0 + q_c) * srh_x + q_r + k_h - 1
    rw_rows = rw_ptr + b * srw_b + h * srw_h + (wy0 + q_r) * srw_y + (wx0 + q_c) * srw_x + q_c + k_w - 1
    rel_ptrs = tl.where(is_h[None, :], rh_rows[:, None], rw_rows[:, None]) - jj[None, :]
    rel = tl.load(rel_ptrs, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
    rel = tl.where(j_ok[None, :], rel.to(tl.float32), -30000.0).to(q.dtype)
    if HAS_PAD:
        pad_k = tl.load(pad_ptr + (H + h) * HEAD_D + offs_d, mask=d_ok, other=0.0)
        pad_v = tl.load(pad_ptr + (2 * H + h) * HEAD_D + offs_d, mask=d_ok, other=0.0)
    if SPLIT_D:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_ok = offs_d2 < HEAD_D
        q2 = tl.load(q_rows[:, None] + offs_d2[None, :], mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
        if HAS_PAD:
            pad_k2 = tl.load(pad_ptr + (H + h) * HEAD_D + offs_d2, mask=d2_ok, other=0.0)
            pad_v2 = tl.load(pad_ptr + (2 * H + h) * HEAD_D + offs_d2, mask=d2_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_tiles = tl.cdiv(k_h * KP_W, BLOCK_N)
    for t in range(0, n_tiles):
        n = t * BLOCK_N + offs_n
        kr = n // KP_W
        kc = n % KP_W
        key_in = (kr < k_h) & (kc < k_w)
        if HAS_PAD:
            key_in = key_in & (wy0 + kr < GRID_H) & (wx0 + kc < GRID_W)
        k_off = kr * sk_y + kc * sk_x
        v_off = kr * sv_y + kc * sv_x
        kt = tl.load(k_base + k_off[None, :] + offs_d[:, None], mask=key_in[None, :] & d_ok[:, None], other=0.0)
        if HAS_PAD:
            kt = tl.where(key_in[None, :], kt, pad_k[:, None])
        e = tl.load(e_ptr + n[None, :] * R_TOT + offs_j[:, None])  # (R_TOT, BLOCK_N) one-hot
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32))
            s = tl.dot(rel.to(tl.float32), e.to(tl.float32), s)
        else:
            s = tl.dot(q, kt)
            s = tl.dot(rel, e, s)
        if SPLIT_D:
            kt2 = tl.load(k_base + k_off[None, :] + offs_d2[:, None], mask=key_in[None, :] & d2_ok[:, None],
                          other=0.0)
            if HAS_PAD:
                kt2 = tl.where(key_in[None, :], kt2, pad_k2[:, None])
            if DOT_F32:
                s = tl.dot(q2.to(tl.float32), kt2.to(tl.float32), s)
            else:
                s = tl.dot(q2, kt2, s)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=key_in[:, None] & d_ok[None, :], other=0.0)
        if HAS_PAD:
            vt = tl.where(key_in[:, None], vt, pad_v[None, :])
        p = p.to(vt.dtype)
        if DOT_F32:
            acc = tl.dot(p.to(tl.float32), vt.to(tl.float32), acc * alpha[:, None])
        else:
            acc = tl.dot(p, vt, acc * alpha[:, None])
        if SPLIT_D:
            vt2 = tl.load(v_base + v_off[:, None] + offs_d2[None, :], mask=key_in[:, None] & d2_ok[None, :],
                          other=0.0)
            if HAS_PAD:
                vt2 = tl.where(key_in[:, None], vt2, pad_v2[None, :])
            if DOT_F32:
                acc2 = tl.dot(p.to(tl.float32), vt2.to(tl.float32), acc2 * alpha[:, None])
            else:
                acc2 = tl.dot(p, vt2, acc2 * alpha[:, None])
        m_i = m_new

    out = acc / l_i[:, None]
    o_rows = o_ptr + b * so_b + h * so_h + (wy0 + q_r) * so_y + (wx0 + q_c) * so_x
    tl.store(o_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if SPLIT_D:
        out2 = acc2 / l_i[:, None]
        tl.store(o_rows[:, None] + offs_d2[None, :], out2.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d2_ok[None, :])


def window_small(qkv, table_h, table_w, num_heads, window, scale=None, pad=None, *, cfg=None):
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    if scale is None:
        scale = D ** -0.5
    wh, ww, ph, pw = _window_geometry(H, W, window)
    assert wh <= 16 and ww <= 16
    qkv = unit_stride_last(qkv)
    q, k, v = qkv.view(B, H, W, 3, num_heads, D).unbind(3)
    out = torch.empty((B, H, W, num_heads, D), dtype=qkv.dtype, device=qkv.device)
    # tables / scale: the terms enter the q·k accumulator
    t = (torch.cat([table_h, table_w]).float() / scale).to(qkv.dtype)
    t = F.pad(t, (0, 0, 0, (-t.shape[0]) % 8))
    q_heads = qkv.reshape(B * H * W, 3, num_heads, D)[:, 0].transpose(0, 1)
    S = torch.bmm(q_heads, t.t().expand(num_heads, D, t.shape[0]))
    S = S.view(num_heads, B, H, W, t.shape[0]).permute(1, 2, 3, 0, 4)
    s_h, s_w = S[..., :table_h.shape[0]], S[..., table_h.shape[0]:]
    if ph or pw:
        pad = (qkv.new_zeros(C3) if pad is None else pad.to(qkv.dtype)).contiguous()
    else:
        pad = None
    kp_w = r_h = max(8, next_pow2(max(wh, ww)))
    e = _onehot_keys(r_h, kp_w, str(qkv.device), qkv.dtype)
    gf = lambda t: (t.stride(0), t.stride(3), t.stride(1), t.stride(2))  # noqa: E731
    strides = [gf(x) for x in (q, k, v, s_h, s_w, out)]
    n_wh, n_ww = (H + ph) // wh, (W + pw) // ww
    nq = wh * ww
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), B * n_wh * n_ww * num_heads)  # noqa: E731
    blocks = _head_dim_blocks(D)
    kern = _small_window_kernel if cfg is None else _small_window_kernel.fn
    extra = {} if cfg is None else dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kern[grid](
        q, k, v, s_h, s_w, out, out if pad is None else pad, e,
        *[st for x in strides for st in x],
        num_heads, n_wh, n_ww, H, W, nq, D, wh, ww, float(scale) * LOG2E,
        **blocks, KP_W=kp_w, R_H=r_h, HAS_PAD=pad is not None, DOT_F32=qkv.device.type != "cuda", **extra,
    )
    return out.view(B, H, W, num_heads * D)
