"""rel_pos_attention: fused Triton kernel vs SDPA-with-bias reference, fallback, errors, compile."""
import pytest
import torch
import torch.nn.functional as F

from fastzoo.ops.rel_pos_attention import (
    rel_pos_attention,
    rel_pos_attention_packed,
    rel_pos_attention_ref,
    rel_pos_attention_triton,
)

KERNEL_DTYPES = [torch.bfloat16, torch.float16]


def _inputs(B, H, q_hw, k_hw, D, dtype, device, seed, rel_mag=2.0):
    """Random q/k/v (unit variance) and rel_h/rel_w of magnitude ``rel_mag``: the
    bias shifts the logits by several units, so a wrong gather changes the result."""
    g = torch.Generator().manual_seed(seed)
    Nq, Nk = q_hw[0] * q_hw[1], k_hw[0] * k_hw[1]
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, H, Nk, D, generator=g)
    v = torch.randn(B, H, Nk, D, generator=g)
    rel_h = torch.randn(B, H, Nq, k_hw[0], generator=g) * rel_mag
    rel_w = torch.randn(B, H, Nq, k_hw[1], generator=g) * rel_mag
    return tuple(t.to(dtype).to(device) for t in (q, k, v, rel_h, rel_w))


def _explicit_fp32(q, k, v, rel_h, rel_w, scale=None):
    """Attention written out in fp32 with an explicit bias loop (independent of SDPA)."""
    q, k, v, rel_h, rel_w = (t.detach().cpu().float() for t in (q, k, v, rel_h, rel_w))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
    bias = torch.empty(*q.shape[:3], k_h * k_w)
    for kr in range(k_h):
        for kc in range(k_w):
            bias[..., kr * k_w + kc] = rel_h[..., kr] + rel_w[..., kc]
    return torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1) @ v


def _check_close(out, inputs, scale=None):
    """Kernel output vs the fp32 truth, with the error of the reference run in the low
    precision dtype as the yardstick (within 2x of it, or 1e-2 relative)."""
    q = inputs[0]
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    truth = _explicit_fp32(*inputs, scale=scale)
    ref_lp = rel_pos_attention_ref(*(t.cpu() for t in inputs), scale=scale).float()
    err = (out.cpu().float() - truth).abs().max().item()
    ref_err = (ref_lp - truth).abs().max().item()
    rel = err / truth.abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * ref_err + 1e-6 or rel <= 1e-2, (err, ref_err, rel)


# (q_h, q_w), (k_h, k_w), D: tiles of several key rows (k_w 5, 7), of one whole key row
# (k_w 20) and of part of a key row (k_w 40, wider than the first config's BLOCK_N), and
# tiles with no padding keys at all (k_w 16, k_h 4: the unmasked path of the 64x64 grid);
# head dims in one tile (16; 20 masked to 32) and split in two like vit_h's 80 = 64 + 16
# (48 = 32 + 16; 40 = 32 + 16 masked).
CASES = [
    ((1, 1), (1, 1), 16),
    ((3, 5), (3, 5), 20),
    ((7, 7), (7, 7), 16),
    ((7, 7), (3, 5), 40),
    ((2, 3), (2, 20), 16),
    ((3, 3), (4, 16), 20),
    ((5, 3), (2, 40), 48),
]


@pytest.mark.parametrize("q_hw,k_hw,D", CASES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_matches_reference(kernel_device, q_hw, k_hw, D, dtype):
    inputs = _inputs(2, 3, q_hw, k_hw, D, dtype, kernel_device, seed=hash((q_hw, k_hw, D, str(dtype))) % 2**31)
    out = rel_pos_attention_triton(*inputs)
    _check_close(out, inputs)


def test_kernel_sam_window_at_vit_h_head_dim(kernel_device):
    """SAM's real window (14×14 = 196 tokens) at vit_h's head dim 80 (one head: the
    interpreter is slow at this size)."""
    inputs = _inputs(1, 1, (14, 14), (14, 14), 80, torch.bfloat16, kernel_device, seed=14)
    _check_close(rel_pos_attention_triton(*inputs), inputs)


def test_kernel_bias_matters(kernel_device):
    """The relative-position terms really change the output (not a no-op bias)."""
    q, k, v, rel_h, rel_w = _inputs(1, 2, (3, 5), (3, 5), 16, torch.bfloat16, kernel_device, seed=3)
    out = rel_pos_attention_triton(q, k, v, rel_h, rel_w).float()
    no_bias = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out - no_bias).abs().max() > 0.1
    # Swapping the two tables (transposed key grid) must change the result too.
    out_t = rel_pos_attention_triton(q, k, v, rel_h, rel_w.roll(1, dims=-1)).float()
    assert (out - out_t).abs().max() > 0.05


def test_kernel_rejects_non_positive_scale_and_op_falls_back(kernel_device, monkeypatch):
    """The kernel takes each tile's row maximum before scaling and divides rel_w by the scale, so
    it refuses scales below 1e-20 (a scale of 1e-38 made rel_w / scale infinite); the public op,
    routed to the kernel for these tensors (on the CPU through the interpreter), runs the
    reference for them and the kernel for a usual scale."""
    from helpers import kernels_on_cpu

    inputs = _inputs(1, 1, (3, 3), (3, 3), 16, torch.bfloat16, kernel_device, seed=6)
    launched = kernels_on_cpu(monkeypatch, ("rel_pos_attention",)) if kernel_device.type == "cpu" else None
    for bad in (0.0, -0.25, 1e-38):
        with pytest.raises(ValueError, match="scale >= 1e-20"):
            rel_pos_attention_triton(*inputs, scale=bad)
        torch.testing.assert_close(rel_pos_attention(*inputs, scale=bad), rel_pos_attention_ref(*inputs, scale=bad))
    if launched is not None:
        assert launched == []
        rel_pos_attention(*inputs, scale=0.25)
        assert launched == ["_rel_pos_attention_kernel"]


def test_kernel_scale_and_single_batch(kernel_device):
    inputs = _inputs(1, 1, (3, 3), (3, 3), 20, torch.bfloat16, kernel_device, seed=5)
    out = rel_pos_attention_triton(*inputs, scale=0.37)
    _check_close(out, inputs, scale=0.37)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_strided_views_of_qkv(kernel_device, dtype):
    """q, k, v sliced out of a fused qkv projection, rel tables as strided views: no copies."""
    B, H, (qh, qw), D = 2, 2, (3, 5), 40
    N = qh * qw
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(dtype).to(kernel_device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each, strided
    assert not q.is_contiguous() and q.stride(-1) == 1
    rel = (torch.randn(B, H, N, qh + qw + 3, generator=g) * 2).to(dtype).to(kernel_device)
    rel_h, rel_w = rel[..., :qh], rel[..., qh + 3:]
    assert not rel_w.is_contiguous()
    out = rel_pos_attention_triton(q, k, v, rel_h, rel_w)
    _check_close(out, (q, k, v, rel_h, rel_w))


def test_reference_matches_explicit_definition():
    inputs = _inputs(2, 3, (3, 4), (2, 5), 8, torch.float32, "cpu", seed=7)
    torch.testing.assert_close(rel_pos_attention_ref(*inputs), _explicit_fp32(*inputs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        rel_pos_attention_ref(*inputs, scale=0.3), _explicit_fp32(*inputs, scale=0.3), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_op_falls_back_on_cpu(dtype):
    inputs = _inputs(2, 2, (3, 5), (3, 5), 20, dtype, "cpu", seed=9)
    out = rel_pos_attention(*inputs)
    torch.testing.assert_close(out, rel_pos_attention_ref(*inputs))
    assert torch.ops.fastzoo.rel_pos_attention.default is not None


def test_public_op_rejects_bad_input():
    q, k, v, rel_h, rel_w = _inputs(1, 2, (3, 5), (3, 5), 16, torch.float32, "cpu", seed=1)
    with pytest.raises(ValueError, match=r"k_h \* k_w == Nk.*k_h=3.*k_w=4.*Nk=15"):
        rel_pos_attention(q, k, v, rel_h, rel_w[..., :4])
    with pytest.raises(ValueError, match=r"rel_h of shape \(1, 2, 15, k_h\), got \(1, 2, 14, 3\)"):
        rel_pos_attention(q, k, v, rel_h[:, :, :14], rel_w)
    with pytest.raises(ValueError, match=r"v of k's shape"):
        rel_pos_attention(q, k, v[..., :8], rel_h, rel_w)
    with pytest.raises(ValueError, match=r"k of shape \(1, 2, Nk, 16\)"):
        rel_pos_attention(q, k[..., :8], v[..., :8], rel_h, rel_w)
    with pytest.raises(ValueError, match="4 dimensions"):
        rel_pos_attention(q[0], k, v, rel_h, rel_w)
    with pytest.raises(TypeError, match="one dtype"):
        rel_pos_attention(q, k.half(), v, rel_h, rel_w)
    with pytest.raises(TypeError, match="got torch.int32"):
        rel_pos_attention(q, k, v, rel_h.to(torch.int32), rel_w)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        rel_pos_attention_triton(q, k, v, rel_h, rel_w)


def test_compile_fullgraph_no_graph_break():
    import torch._dynamo.testing

    def f(q, k, v, rel_h, rel_w):
        return rel_pos_attention(q * 1.0, k, v, rel_h, rel_w).sum(-1)

    inputs = _inputs(2, 2, (3, 5), (3, 5), 16, torch.float32, "cpu", seed=2)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), f(*inputs))
    assert counter.frame_count == 1
    assert any("rel_pos_attention" in str(n.target) for g in counter.graphs for n in g.graph.nodes)


def _packed_inputs(B, H, hw, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    N = hw[0] * hw[1]
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(dtype).to(device)
    rel_h = (torch.randn(B, H, N, hw[0], generator=g) * 2).to(dtype).to(device)
    rel_w = (torch.randn(B, H, N, hw[1], generator=g) * 2).to(dtype).to(device)
    return qkv, rel_h, rel_w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_unpacked_on_cpu(dtype):
    qkv, rel_h, rel_w = _packed_inputs(2, 3, (3, 5), 20, dtype, "cpu", seed=4)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = rel_pos_attention_packed(qkv, rel_h, rel_w, scale=0.4)
    assert out.shape == q.shape
    torch.testing.assert_close(out, rel_pos_attention_ref(q, k, v, rel_h, rel_w, scale=0.4))
    with pytest.raises(ValueError, match=r"qkv of shape \(B, N, 3, heads, head_dim\), got \(2, 15, 2, 3, 20\)"):
        rel_pos_attention_packed(qkv[:, :, :2], rel_h, rel_w)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_on_packed_views(kernel_device, dtype):
    # The views the packed op hands to the kernel (strided q, k, v of one tensor).
    qkv, rel_h, rel_w = _packed_inputs(2, 3, (7, 7), 16, dtype, kernel_device, seed=6)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    _check_close(rel_pos_attention_triton(q, k, v, rel_h, rel_w), (q, k, v, rel_h, rel_w))


def test_packed_compile_fullgraph_no_graph_break():
    import torch._dynamo.testing

    qkv, rel_h, rel_w = _packed_inputs(2, 2, (3, 5), 16, torch.float32, "cpu", seed=8)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    f = lambda t: rel_pos_attention_packed(t * 1.0, rel_h, rel_w)  # noqa: E731
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(qkv), f(qkv))
    assert counter.frame_count == 1
    assert any("rel_pos_attention_packed" in str(n.target) for g in counter.graphs for n in g.graph.nodes)


# ---- real SAM shapes on a GPU (scripts/gpu_check.sh) ----

def _cuda_check(B, H, hw, D, dtype, seed=0):
    torch.manual_seed(seed)
    Nq = hw * hw
    q, k, v = (torch.randn(B, H, Nq, D, device="cuda", dtype=dtype) for _ in range(3))
    rel_h = (torch.randn(B, H, Nq, hw, device="cuda") * 2).to(dtype)
    rel_w = (torch.randn(B, H, Nq, hw, device="cuda") * 2).to(dtype)
    out = rel_pos_attention(q, k, v, rel_h, rel_w)
    assert out.dtype == dtype and out.shape == q.shape
    truth = rel_pos_attention_ref(q.float(), k.float(), v.float(), rel_h.float(), rel_w.float())
    ref_lp = rel_pos_attention_ref(q, k, v, rel_h, rel_w).float()
    err = (out.float() - truth).abs().max().item()
    ref_err = (ref_lp - truth).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * ref_err + 1e-6 or err / truth.abs().max().item() <= 1e-2, (err, ref_err)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("H,D", [(12, 64), (16, 80)])
def test_cuda_windowed_layers(dtype, H, D):
    # 16 images x 25 windows of 14x14 tokens.
    _cuda_check(400, H, 14, D, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,H,D", [(2, 16, 80), (2, 12, 64), (1, 16, 80)])
def test_cuda_global_layers(dtype, B, H, D):
    _cuda_check(B, H, 64, D, dtype)


@pytest.mark.cuda
def test_cuda_strided_qkv_and_compile():
    B, H, hw, D = 2, 16, 64, 80
    N = hw * hw
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    rel_h = (torch.randn(B, H, N, hw, device="cuda") * 2).bfloat16()
    rel_w = (torch.randn(B, H, N, hw, device="cuda") * 2).bfloat16()
    out = rel_pos_attention(q, k, v, rel_h, rel_w)
    ref = rel_pos_attention_ref(q.float(), k.float(), v.float(), rel_h.float(), rel_w.float())
    assert (out.float() - ref).abs().max() / ref.abs().max() < 1e-2
    compiled = torch.compile(rel_pos_attention, fullgraph=True)
    assert torch.equal(compiled(q, k, v, rel_h, rel_w), out)


@pytest.mark.cuda
def test_cuda_packed_compiled_equals_eager():
    qkv, rel_h, rel_w = _packed_inputs(2, 12, (64, 64), 64, torch.bfloat16, "cuda", seed=3)
    out = rel_pos_attention_packed(qkv, rel_h, rel_w)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert torch.equal(out, rel_pos_attention(q, k, v, rel_h, rel_w))
    compiled = torch.compile(lambda t: rel_pos_attention_packed(t, rel_h, rel_w), fullgraph=True)
    assert torch.equal(compiled(qkv), out)


# ----------------------------------------------------------------------------------
# rel_pos_window_attention: SAM's encoder attention on the token grid
# ----------------------------------------------------------------------------------
from fastzoo.ops.rel_pos_attention import (  # noqa: E402
    _rel_pos_window_attention_op,
    rel_pos_window_attention,
    rel_pos_window_attention_ref,
    rel_pos_window_attention_triton,
)


def _window_inputs(B, H, W, heads, D, window, dtype, seed, pad=True):
    g = torch.Generator().manual_seed(seed)
    wh, ww = (window, window) if window else (H, W)
    qkv = torch.randn(B, H, W, 3 * heads * D, generator=g).to(dtype)
    table_h = torch.randn(2 * wh - 1, D, generator=g) * 0.5
    table_w = torch.randn(2 * ww - 1, D, generator=g) * 0.5
    p = (torch.randn(3 * heads * D, generator=g)).to(dtype) if pad else None
    return qkv, table_h, table_w, p


def _window_explicit(qkv, table_h, table_w, heads, window, pad):
    """Window by window with Python loops: the padded grid, each window's tokens, the
    rel-pos terms from the tables, attention in fp32 (_explicit_fp32)."""
    qkv = qkv.float()
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * heads)
    wh, ww = (window, window) if window else (H, W)
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    grid = (torch.zeros(C3) if pad is None else pad.float()).repeat(B, Hp, Wp, 1)
    grid[:, :H, :W] = qkv
    out = torch.zeros(B, Hp, Wp, heads * D)
    for y0 in range(0, Hp, wh):
        for x0 in range(0, Wp, ww):
            t = grid[:, y0:y0 + wh, x0:x0 + ww].reshape(B, wh * ww, 3, heads, D)
            q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))
            rows = torch.arange(wh * ww) // ww
            cols = torch.arange(wh * ww) % ww
            rel_h = torch.stack([(q * table_h[rows - kr + wh - 1]).sum(-1) for kr in range(wh)], -1)
            rel_w = torch.stack([(q * table_w[cols - kc + ww - 1]).sum(-1) for kc in range(ww)], -1)
            o = _explicit_fp32(q, k, v, rel_h, rel_w)
            out[:, y0:y0 + wh, x0:x0 + ww] = o.transpose(1, 2).reshape(B, wh, ww, heads * D)
    return out[:, :H, :W]


# (B, H, W, heads, D, window, pad): windows that need padding in both directions, none,
# global attention, zero padding (pad None), the split head dimension (40 = 32 + 8), and
# windows of 64 queries whose second block of 32 (the interpreter's tile) lies wholly in the
# padding rows of the bottom windows (a block the kernel skips), and windows of 81 queries
# whose last 17 run as two 16-query tail tiles (the bottom windows' skipped), and global attention
# with the split head dimension on tables of 33 + 39 offsets (two 64-row chunks of q · table)
WINDOW_CASES = [(2, 5, 7, 2, 16, 3, True), (1, 6, 4, 2, 16, 2, True), (1, 4, 6, 2, 16, 0, True),
                (2, 5, 7, 1, 16, 3, False), (1, 5, 5, 1, 40, 2, True), (1, 10, 12, 1, 16, 8, True),
                (1, 11, 10, 2, 16, 9, True), (1, 17, 20, 1, 40, 0, True)]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_window_reference_matches_explicit_windows(case):
    B, H, W, heads, D, window, pad = case
    qkv, th, tw, p = _window_inputs(B, H, W, heads, D, window, torch.float32, seed=sum(case))
    got = rel_pos_window_attention_ref(qkv, th, tw, heads, window, None, p)
    torch.testing.assert_close(got, _window_explicit(qkv, th, tw, heads, window, p), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_window_kernel_matches_reference(kernel_device, case):
    """The kernel reads the windows in place (keys outside the grid = pad's k and v) and
    indexes the rel-pos terms by relative offset; against the reference on the same fp16
    values (fp16: the kernel's dot operands are exact, the terms differ by fp16 rounding)."""
    B, H, W, heads, D, window, pad = case
    qkv, th, tw, p = _window_inputs(B, H, W, heads, D, window, torch.float16, seed=sum(case) + 1)
    ref = rel_pos_window_attention_ref(qkv.float(), th, tw, heads, window, None, None if p is None else p.float())
    dev = lambda t: None if t is None else t.to(kernel_device)  # noqa: E731
    got = rel_pos_window_attention_triton(dev(qkv), dev(th), dev(tw), heads, window, None, dev(p))
    assert got.shape == (B, H, W, heads * D) and got.dtype == torch.float16
    torch.testing.assert_close(got.float().cpu(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_window_padding_and_tables_matter(kernel_device):
    """A wrong pad vector or a table read in the wrong direction changes the result."""
    qkv, th, tw, p = _window_inputs(1, 5, 5, 1, 16, 3, torch.float16, seed=7)
    dev = lambda t: t.to(kernel_device)  # noqa: E731
    got = rel_pos_window_attention_triton(dev(qkv), dev(th), dev(tw), 1, 3, None, dev(p)).float().cpu()
    for args in ((th, tw, p * 0), (th.flip(0), tw, p), (th, tw.flip(0), p)):
        other = rel_pos_window_attention_ref(qkv.float(), args[0], args[1], 1, 3, None, args[2].float())
        assert (got - other).abs().max() > 0.05


def test_window_op_falls_back_on_cpu_and_checks_its_input():
    qkv, th, tw, p = _window_inputs(1, 5, 7, 2, 16, 3, torch.float32, seed=3)
    torch.testing.assert_close(rel_pos_window_attention(qkv, th, tw, 2, 3, None, p),
                               rel_pos_window_attention_ref(qkv, th, tw, 2, 3, None, p))
    torch.library.opcheck(_rel_pos_window_attention_op, (qkv, th, tw, p, 2, 3, 0.25))
    with pytest.raises(ValueError, match=r"table_h of shape \(5, 16\)"):
        rel_pos_window_attention(qkv, th[:4], tw, 2, 3)
    with pytest.raises(ValueError, match=r"3 \* num_heads \* head_dim"):
        rel_pos_window_attention(qkv[..., :-1], th, tw, 2, 3)
    with pytest.raises(ValueError, match="window >= 0"):
        rel_pos_window_attention(qkv, th, tw, 2, -1)
    with pytest.raises(ValueError, match=r"pad of shape \(96,\)"):
        rel_pos_window_attention(qkv, th, tw, 2, 3, pad=p[:-1])


def test_window_op_compiles_fullgraph():
    qkv, th, tw, p = _window_inputs(1, 5, 7, 2, 16, 3, torch.float32, seed=5)
    f = torch.compile(lambda x: rel_pos_window_attention(x * 1.0, th, tw, 2, 3, None, p), fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(qkv), rel_pos_window_attention_ref(qkv, th, tw, 2, 3, None, p))


@pytest.mark.cuda
@pytest.mark.parametrize("heads,D,window", [(12, 64, 14), (12, 64, 0), (16, 80, 14)])
def test_cuda_window_op_at_sam_shapes(heads, D, window):
    """SAM's 64x64 grid: windows of 14 (padded to 70) and global, vit_b / vit_h heads. The
    rel-pos logits (|q·table| up to ~20 here) are rounded to bf16 as in the bf16 model, so
    the bound is the error of the pure-torch reference run in bf16, both against fp32."""
    qkv, th, tw, p = _window_inputs(2, 64, 64, heads, D, window, torch.bfloat16, seed=heads + D + window)
    qkv, th, tw, p = (t.cuda() for t in (qkv, th, tw, p))
    got = rel_pos_window_attention(qkv, th, tw, heads, window, None, p)
    ref = rel_pos_window_attention_ref(qkv.float(), th, tw, heads, window, None, p.float())
    ref_bf16 = rel_pos_window_attention_ref(qkv, th.bfloat16(), tw.bfloat16(), heads, window, None, p)
    err, err_bf16 = ((x.float() - ref).abs().max().item() for x in (got, ref_bf16))
    assert err <= max(1.5 * err_bf16, 1e-2 * ref.abs().max().item()), (err, err_bf16)


# A block of queries wholly in the padding rows runs no key tiles; its 0 / 0 outputs are never
# stored, but the interpreter's numpy warns about them.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("idx", [2, 4, 5, 10, 12, 13], ids=lambda i: f"config{i}")
@pytest.mark.parametrize("case", [(1, 10, 12, 1, 16, 8, True), (1, 3, 40, 1, 16, 0, False),
                                  (1, 7, 9, 1, 40, 4, True), (1, 15, 15, 1, 16, 14, True),
                                  (1, 13, 12, 1, 16, 12, True)], ids=str)
def test_window_kernel_every_tile_shape(kernel_device, monkeypatch, idx, case):
    """The GPU tile shapes (the interpreter otherwise runs only the first, 32x32): several key
    rows per tile (ROWS up to 8), full tiles with grid padding (windows of 8), a key row
    wider than the tile (k_w = 40 > 32), one key row a tile with its columns past k_w masked
    through rel_w (128x16 on windows of 14, padded), the register-capped tiles (12, 13), the
    split head dimension, windows of 144 queries (a 16-row tail tile after whole tiles of 64 or
    128)."""
    import importlib

    rpa = importlib.import_module("fastzoo.ops.rel_pos_attention")

    kern = rpa._rel_pos_attention_kernel
    B, H, W, heads, D, window, pad = case
    if kernel_device.type == "cuda" and not rpa._tiles_known_good(D, window or W):
        pytest.skip("split head dim with narrow key rows: tiles wrong on an H100, never launched there")
    monkeypatch.setattr(kern, "configs", [kern.configs[idx]])
    qkv, th, tw, p = _window_inputs(B, H, W, heads, D, window, torch.float16, seed=idx + sum(case))
    ref = rel_pos_window_attention_ref(qkv.float(), th, tw, heads, window, None, None if p is None else p.float())
    dev = lambda t: None if t is None else t.to(kernel_device)  # noqa: E731
    got = rel_pos_window_attention_triton(dev(qkv), dev(th), dev(tw), heads, window, None, dev(p))
    torch.testing.assert_close(got.float().cpu(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_window_kernel_launches_in_batch_chunks(kernel_device, monkeypatch):
    """More (image, window, head) programs than a launch grid's y dimension takes: the
    launcher splits the batch (here a limit of 5 programs: 2 images of 4 windows x 1 head)."""
    import importlib

    rpa = importlib.import_module("fastzoo.ops.rel_pos_attention")

    monkeypatch.setattr(rpa, "_MAX_GRID_Y", 5)
    qkv, th, tw, p = _window_inputs(3, 5, 5, 1, 16, 3, torch.float16, seed=11)
    ref = rel_pos_window_attention_ref(qkv.float(), th, tw, 1, 3, None, p.float())
    got = rel_pos_window_attention_triton(qkv.to(kernel_device), th.to(kernel_device), tw.to(kernel_device), 1,
                                          3, None, p.to(kernel_device))
    torch.testing.assert_close(got.float().cpu(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    with pytest.raises(ValueError, match="non-empty token grid"):
        rel_pos_window_attention(qkv[:, :0], th, tw, 1, 3)


def test_grid_launches_tune_only_tiles_of_at_most_two_key_rows():
    """With a split head dimension the autotuning keeps BLOCK_N <= 2 key rows (KW_P columns
    each), on either layout; unsplit head dims keep every configuration; where no tile has so
    few rows, the public ops take the reference."""
    import importlib

    from fastzoo.ops._common import triton_available

    if not triton_available():
        pytest.skip("needs Triton")

    rpa = importlib.import_module("fastzoo.ops.rel_pos_attention")
    cfgs = rpa._CONFIGS
    window = rpa._prune_grid_configs(cfgs, {}, GRID=True, SPLIT_D=True, KW_P=16)
    assert window and all(c.kwargs["BLOCK_N"] <= 32 for c in window)
    assert {c.kwargs["BLOCK_M"] for c in window} == {32, 64, 128}
    assert len(rpa._prune_grid_configs(cfgs, {}, GRID=True, SPLIT_D=True, KW_P=64)) == len(cfgs)
    assert rpa._prune_grid_configs(cfgs, {"GRID": True, "KW_P": 16}, SPLIT_D=False) == cfgs
    assert rpa._prune_grid_configs(cfgs, {}, GRID=False, SPLIT_D=True, KW_P=16) == window
    assert rpa._tiles_known_good(80, 14) and rpa._tiles_known_good(64, 4) and rpa._tiles_known_good(80, 64)
    assert not rpa._tiles_known_good(80, 8) and not rpa._tiles_known_good(40, 4)


def test_window_op_refuses_more_programs_per_image_than_a_grid_takes(kernel_device, monkeypatch):
    """One image's windows x heads must fit a launch grid's y dimension (the batch is split,
    an image is not): a clear error, not endless splitting."""
    import importlib

    rpa = importlib.import_module("fastzoo.ops.rel_pos_attention")
    monkeypatch.setattr(rpa, "_MAX_GRID_Y", 3)
    qkv, th, tw, p = _window_inputs(2, 5, 5, 1, 16, 3, torch.float16, seed=2)  # 4 windows x 1 head
    dev = lambda t: t.to(kernel_device)  # noqa: E731
    with pytest.raises(ValueError, match=r"4 windows x 1 heads = 4 for one image, more than .* 3"):
        rel_pos_window_attention_triton(dev(qkv), dev(th), dev(tw), 1, 3, None, dev(p))


@pytest.mark.cuda
@pytest.mark.parametrize("heads,D,window", [(12, 64, 14), (16, 80, 14), (16, 80, 0)])
def test_cuda_window_op_every_tile_the_autotuner_may_pick(monkeypatch, heads, D, window):
    """Each configuration left after pruning, forced alone, at SAM's layers (grid 64, windows
    of 14 or global): a wrong tile must not be left for the autotuner to pick."""
    import importlib

    rpa = importlib.import_module("fastzoo.ops.rel_pos_attention")
    kern = rpa._rel_pos_attention_kernel
    blocks = rpa._head_dim_blocks(D)
    tiles = rpa._prune_grid_configs(rpa._CONFIGS, {}, GRID=True, KW_P=16 if window else 64, **blocks)
    qkv, th, tw, p = _window_inputs(4 if window else 2, 64, 64, heads, D, window, torch.bfloat16, seed=D)
    qkv, th, tw, p = (t.cuda() for t in (qkv, th, tw, p))
    ref = rel_pos_window_attention_ref(qkv.float(), th, tw, heads, window, None, p.float())
    ref_bf16 = rel_pos_window_attention_ref(qkv, th.bfloat16(), tw.bfloat16(), heads, window, None, p)
    bound = max(1.5 * (ref_bf16.float() - ref).abs().max().item(), 1e-2 * ref.abs().max().item())
    for cfg in tiles:
        monkeypatch.setattr(kern, "configs", [cfg])
        got = rel_pos_window_attention_triton(qkv, th, tw, heads, window, None, p)
        err = (got.float() - ref).abs().max().item()
        assert err <= bound, (str(cfg), err, bound)
