"""The Hopper Gluon kernels of SAM's global and windowed rel-pos attention layers
(``fastzoo.ops.rel_pos_attention_gluon``): parity with the reference on the GPU, the op's dispatch, and
ahead-of-time sm_90 compiles on the CPU."""
import json
import re

import pytest
import torch

from helpers import run_aot_compile

from fastzoo.ops import rel_pos_attention_gluon as rpg
from fastzoo.ops.int8_mm_gluon import gluon_available
from fastzoo.ops.rel_pos_attention import rel_pos_window_attention, rel_pos_window_attention_ref

from tests.ops.test_rel_pos_attention import _window_inputs


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _inputs(B, H, heads, dtype, seed):
    """test_rel_pos_attention's window inputs on a (B, H, 64) grid of head_dim 64, global (no pad)."""
    qkv, th, tw, _ = _window_inputs(B, H, 64, heads, 64, 0, dtype, seed, pad=False)
    return qkv, th, tw


def _op_matches_reference(monkeypatch, launcher: str, qkv, th, tw, heads, window, scale=None, pad=None):
    """The public op on these inputs calls ``rpg.<launcher>`` once (a spy) and returns (B, H, W, heads · 64) in
    qkv's dtype, finite and within 1.5x the low-precision reference's own error of the fp32 reference (the
    rel-pos terms are rounded to the low precision, as in the model) or 1 % of the output's range."""
    calls = []
    launch = getattr(rpg, launcher)
    monkeypatch.setattr(rpg, launcher, lambda *a, **k: calls.append(1) or launch(*a, **k))
    got = rel_pos_window_attention(qkv, th, tw, heads, window, scale, pad=pad)
    B, H, W, _ = qkv.shape
    assert calls == [1] and got.shape == (B, H, W, heads * 64) and got.dtype == qkv.dtype
    ref = rel_pos_window_attention_ref(qkv.float(), th, tw, heads, window, scale, None if pad is None else pad.float())
    ref_lp = rel_pos_window_attention_ref(qkv, th.to(qkv.dtype), tw.to(qkv.dtype), heads, window, scale, pad)
    err, err_lp = ((x.float() - ref).abs().max().item() for x in (got, ref_lp))
    assert torch.isfinite(got).all()
    assert err <= max(1.5 * err_lp, 1e-2 * ref.abs().max().item()), (err, err_lp)


def test_kernel_applies_only_where_it_was_built_for(monkeypatch):
    """Never on the CPU; on a GPU only global attention on a 64-wide grid, head_dim 64, an even number
    of grid rows up to 64 (two a program), a contiguous qkv, 1 to 65535 images x heads; the rest takes
    the tl kernel."""
    qkv = torch.zeros(1, 64, 64, 3 * 12 * 64, dtype=torch.bfloat16)
    assert not rpg.global_attention_applies(qkv, 12, 0, None)
    if not (_hopper() and gluon_available()):
        pytest.skip("the rest needs a Hopper GPU")
    cuda = qkv.cuda()
    assert rpg.global_attention_applies(cuda, 12, 0, None)
    assert not rpg.global_attention_applies(cuda, 12, 14, None)  # windowed
    assert not rpg.global_attention_applies(cuda[:, :63], 12, 0, None)  # odd rows
    assert not rpg.global_attention_applies(torch.zeros(1, 64, 48, 3 * 12 * 64, dtype=torch.bfloat16,
                                                        device="cuda"), 12, 0, None)  # narrower grid
    shape = (1, 62, 64, 3 * 12 * 64)
    unaligned = torch.zeros(62 * 64 * 3 * 12 * 64 + 4, dtype=torch.bfloat16, device="cuda")[4:].view(shape)
    assert not rpg.global_attention_applies(unaligned, 12, 0, None)  # 8 bytes past a 16-byte boundary (TMA)
    assert rpg.global_attention_applies(unaligned.clone(), 12, 0, None)
    with pytest.raises(ValueError, match="dividing the grid's 64 rows"):
        rpg.rel_pos_global_attention_gluon(cuda, torch.zeros(127, 64), torch.zeros(127, 64), 12, 0.125, rows=3)
    with pytest.raises(ValueError, match="2 or more K/V slots"):
        rpg.rel_pos_global_attention_gluon(cuda, torch.zeros(127, 64), torch.zeros(127, 64), 12, 0.125, stages=1)
    assert not rpg.global_attention_applies(cuda.float(), 12, 0, None)
    assert not rpg.global_attention_applies(cuda[:0], 12, 0, None)  # no images
    monkeypatch.setattr(rpg, "_MAX_GRID_Y", 11)
    assert not rpg.global_attention_applies(cuda, 12, 0, None)  # 12 image x heads past the grid's limit
    assert not rpg.global_attention_applies(torch.zeros(1, 64, 64, 3 * 16 * 80, dtype=torch.bfloat16,
                                                        device="cuda"), 16, 0, None)  # head_dim 80 (vit_h)


@pytest.mark.cuda
@pytest.mark.parametrize("B,H,heads,dtype", [(2, 64, 12, torch.bfloat16), (1, 64, 16, torch.float16),
                                             (1, 8, 2, torch.float16), (3, 2, 3, torch.bfloat16)],
                         ids=str)
def test_cuda_kernel_matches_reference(B, H, heads, dtype, monkeypatch):
    """Against the fp32 reference, within 1.5x the reference's own error in the low precision (the
    rel-pos terms are rounded to it, as in the model) or 1 % of the output's range; and the public op
    takes this kernel for these inputs (a spy on its launcher)."""
    if not (_hopper() and gluon_available()):
        pytest.skip("the Gluon kernel runs on Hopper with Triton >= 3.5")
    qkv, th, tw = (t.cuda() for t in _inputs(B, H, heads, dtype, seed=B + H + heads))
    _op_matches_reference(monkeypatch, "rel_pos_global_attention_gluon", qkv, th, tw, heads, 0)


@pytest.mark.cuda
def test_cuda_tables_and_heads_matter():
    """Flipped tables, or the heads' columns swapped, change the output: the kernel reads the right
    table rows and each head's own q, k and v."""
    if not (_hopper() and gluon_available()):
        pytest.skip("the Gluon kernel runs on Hopper with Triton >= 3.5")
    qkv, th, tw = (t.cuda() for t in _inputs(1, 8, 2, torch.bfloat16, seed=3))
    got = rpg.rel_pos_global_attention_gluon(qkv, th, tw, 2, 0.125).float()
    for args in ((th.flip(0), tw), (th, tw.flip(0))):
        other = rel_pos_window_attention_ref(qkv.float(), args[0], args[1], 2, 0, 0.125)
        assert (got - other).abs().max() > 0.05
    swapped = qkv.view(1, 8, 64, 3, 2, 64).flip(4).reshape(qkv.shape)
    other = rpg.rel_pos_global_attention_gluon(swapped, th, tw, 2, 0.125).float()
    torch.testing.assert_close(other.view(1, 8, 64, 2, 64).flip(3), got.view(1, 8, 64, 2, 64))


# ---- the windowed layers' kernel ----------------------------------------------------------------------

def test_window_kernel_applies_only_where_it_was_built_for():
    """Never on the CPU; on a GPU only windows of 14 with head_dim 64 on a contiguous, aligned qkv, a scale of
    at least WIN_MIN_SCALE, and a pad row of the qkv's width (contiguous, on its device) or none."""
    qkv = torch.zeros(1, 64, 64, 3 * 12 * 64, dtype=torch.bfloat16)
    assert not rpg.window_attention_applies(qkv, 12, 14, None, 0.125)
    if not (_hopper() and gluon_available()):
        pytest.skip("the rest needs a Hopper GPU")
    cuda = qkv.cuda()
    pad = torch.zeros(3 * 12 * 64, device="cuda")
    assert rpg.window_attention_applies(cuda, 12, 14, None, 0.125)
    assert rpg.window_attention_applies(cuda[:, :37, :5].contiguous(), 12, 14, pad, 0.125)
    assert not rpg.window_attention_applies(cuda, 12, 0, None, 0.125)  # global
    assert not rpg.window_attention_applies(cuda, 12, 16, None, 0.125)  # another window
    assert not rpg.window_attention_applies(cuda[:, :, :63], 12, 14, None, 0.125)  # not contiguous
    assert not rpg.window_attention_applies(cuda.float(), 12, 14, None, 0.125)
    assert not rpg.window_attention_applies(torch.zeros(1, 64, 64, 3 * 16 * 80, dtype=torch.bfloat16,
                                                        device="cuda"), 16, 14, None, 0.125)  # head_dim 80 (vit_h)
    assert not rpg.window_attention_applies(cuda, 12, 14, None, rpg.WIN_MIN_SCALE / 2)  # the mask would leak
    assert not rpg.window_attention_applies(cuda, 12, 14, pad[:-64], 0.125)  # a pad row of another width
    assert not rpg.window_attention_applies(cuda, 12, 14, torch.zeros(2 * 3 * 12 * 64, device="cuda")[::2],
                                            0.125)  # strided
    assert not rpg.window_attention_applies(cuda, 12, 14, pad.cpu(), 0.125)
    with pytest.raises(ValueError, match="table_w of shape"):
        rpg.rel_pos_window_attention_gluon(cuda, torch.zeros(27, 64), torch.zeros(25, 64), 12, 14, 0.125)
    with pytest.raises(ValueError, match="a scale >= "):
        rpg.rel_pos_window_attention_gluon(cuda, torch.zeros(27, 64), torch.zeros(27, 64), 12, 14, 1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("B,H,W,heads,dtype,pad,scale", [
    (2, 64, 64, 12, torch.bfloat16, True, None),   # SAM vit_b's windowed layers (25 windows, 9 padded)
    (1, 64, 64, 16, torch.float16, True, None),    # vit_l's heads
    (1, 14, 14, 2, torch.bfloat16, True, None),    # one whole window, nothing padded
    (3, 29, 17, 3, torch.bfloat16, True, None),    # odd grid: windows cut on both sides
    (2, 30, 33, 2, torch.bfloat16, False, None),   # several windows, zero padding
    (1, 5, 9, 1, torch.float16, False, None),      # smaller than a window, zero padding
    (1, 1, 1, 2, torch.bfloat16, True, None),      # one token
    (1, 20, 23, 2, torch.bfloat16, True, 0.3),     # a scale that is not a power of two
    (1, 20, 23, 2, torch.float16, True, 2.0 ** -6),  # the smallest scale taken
], ids=str)
def test_cuda_window_kernel_matches_reference(B, H, W, heads, dtype, pad, scale, monkeypatch):
    """Against the fp32 reference (padding tokens with the pad row's k and v, or zeros), within 1.5x the
    reference's own error in the low precision or 1 % of the output's range; and the public op takes
    this kernel for these inputs (a spy on its launcher)."""
    if not (_hopper() and gluon_available()):
        pytest.skip("the Gluon kernel runs on Hopper with Triton >= 3.5")
    qkv, th, tw, p = _window_inputs(B, H, W, heads, 64, 14, dtype, seed=B + H + W + heads, pad=pad)
    qkv, th, tw = qkv.cuda(), th.cuda(), tw.cuda()
    p = p.cuda() if p is not None else None
    _op_matches_reference(monkeypatch, "rel_pos_window_attention_gluon", qkv, th, tw, heads, 14, scale, p)


@pytest.mark.cuda
def test_cuda_window_kernel_reads_its_own_window_tables_and_pad():
    """Flipped tables, another pad row, or the heads swapped change the output the way the reference
    says: the kernel reads the right table rows, the pad row's k and v, and each head's own q, k, v."""
    if not (_hopper() and gluon_available()):
        pytest.skip("the Gluon kernel runs on Hopper with Triton >= 3.5")
    qkv, th, tw, p = (t.cuda() for t in _window_inputs(1, 20, 20, 2, 64, 14, torch.bfloat16, seed=5))
    got = rpg.rel_pos_window_attention_gluon(qkv, th, tw, 2, 14, 0.125, p).float()
    for args in ((th.flip(0), tw, p), (th, tw.flip(0), p), (th, tw, -p)):
        other = rel_pos_window_attention_ref(qkv.float(), args[0], args[1], 2, 14, 0.125, args[2].float())
        assert (got - other).abs().max() > 0.05
    swapped = qkv.view(1, 20, 20, 3, 2, 64).flip(4).reshape(qkv.shape)
    p_swapped = p.view(3, 2, 64).flip(1).reshape(p.shape)
    other = rpg.rel_pos_window_attention_gluon(swapped, th, tw, 2, 14, 0.125, p_swapped).float()
    torch.testing.assert_close(other.view(1, 20, 20, 2, 64).flip(3), got.view(1, 20, 20, 2, 64))


# Gluon cannot run under Triton's interpreter: its code generation for sm_90 runs here instead.
_AOT_SCRIPT = r"""
import json, sys
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from fastzoo.ops import rel_pos_attention_gluon as mod
from tests.helpers import sm90_compile_report

report = []
for name in json.loads(sys.argv[1]):
    dt = getattr(gl, name)
    short = {"bfloat16": "bf16", "float16": "fp16"}[name]
    rows = mod.QUERY_ROWS * mod.BLOCK

    def desc(shape):
        return f"tensordesc<{short}[{shape[0]}, {shape[1]}],{gl.NVMMASharedLayout.get_default_for(shape, dt)!r}>"

    jit = mod._global_attention_kernel
    sig = {"q_desc": desc([rows, mod.HEAD_D]), "kv_desc": desc([mod.BLOCK, mod.HEAD_D]),
           "tab_h_desc": desc([mod.TABLE_ROWS, mod.HEAD_D]), "tab_w_desc": desc([mod.TABLE_ROWS, mod.HEAD_D]),
           "out_desc": desc([rows, mod.HEAD_D]), "scratch_ptr": "*" + short, "H": "i32", "heads": "i32",
           "qk_scale": "fp32"}
    const = {"QR": mod.QUERY_ROWS, "STAGES": mod.STAGES, "num_warps": 4 * mod.QUERY_ROWS}
    sig = {n: sig.get(n, "constexpr") for n in jit.arg_names}
    src = GluonASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in const.items()},
                         attrs={(jit.arg_names.index("scratch_ptr"),): [["tt.divisibility", 16]]})
    report.append(sm90_compile_report(src, 4 * mod.QUERY_ROWS, maxnreg=mod.MAXNREG))
print("AOT-REPORT" + json.dumps(report))
"""


def test_kernel_compiles_for_hopper_without_a_gpu():
    """The kernel compiles for sm_90 in bf16 and fp16: TMA loads, the next tile's q·kᵀ waited for
    with this tile's P·V in flight (a wait for all but one group), no wgmma serialized by ptxas
    (C7514), no spills, registers and shared memory for two programs an SM, a CTA barrier before
    the ring's refill."""
    if not gluon_available():
        pytest.skip("this Triton has no Gluon Hopper API")
    proc = run_aot_compile(_AOT_SCRIPT, json.dumps(["bfloat16", "float16"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for item in json.loads(proc.stdout.split("AOT-REPORT", 1)[1]):
        ptx = item["ptx"]
        assert "cp.async.bulk.tensor.2d" in ptx
        assert "wgmma.wait_group.sync.aligned 1;" in ptx
        assert item["ptxas_rc"] == 0, item["ptxas"][-2000:]
        assert "C7514" not in item["ptxas"], item["ptxas"][-2000:]
        assert "0 bytes spill stores" in item["ptxas"], item["ptxas"][-2000:]
        # two programs an SM: at most 128 registers a thread and half an SM's shared memory each (a
        # variant over both ran ~25 % slower: rel_pos_global_prologue_tried.json)
        used = re.search(r"Used (\d+) registers", item["ptxas"])
        assert used, item["ptxas"][-2000:]
        assert rpg.MAXNREG == 128 and int(used.group(1)) <= 128, used.group(0)
        assert item["shared"] <= rpg.SHARED_LIMIT, item["shared"]
        # the K/V ring's refill (the last TMA request) follows a barrier after the P·V wait: no warpgroup still
        # reads the slot it overwrites
        lines = ptx.splitlines()
        refill = max(i for i, line in enumerate(lines) if "mbarrier.arrive.expect_tx" in line)
        wait = max(i for i in range(refill) if "wgmma.wait_group.sync.aligned 0;" in lines[i])
        assert any("bar.sync" in line for line in lines[wait:refill]), "\n".join(lines[wait:refill + 1])


_WINDOW_AOT_SCRIPT = r"""
import json, sys
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from fastzoo.ops import rel_pos_attention_gluon as mod
from tests.helpers import sm90_compile_report

report = []
for name, has_pad in json.loads(sys.argv[1]):
    dt = getattr(gl, name)
    short = {"bfloat16": "bf16", "float16": "fp16"}[name]
    box = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=5)

    def d5(rows):
        return f"tensordesc<{short}[1, {rows}, {mod.WIN_COLS}, 1, {mod.HEAD_D}],{box!r}>"

    def d2(shape):
        return f"tensordesc<{short}[{shape[0]}, {shape[1]}],{gl.NVMMASharedLayout.get_default_for(shape, dt)!r}>"

    jit = mod._window_attention_kernel
    sig = {"q_desc": d5(mod.WIN_QROWS), "k8_desc": d5(8), "k2_desc": d5(2), "tab_desc": d2([2 * mod.WIN_TAB, 64]),
           "out_ptr": "*" + short, "pad_ptr": "*" + short, "H": "i32", "W": "i32", "heads": "i32", "n_ww": "i32",
           "qk_scale": "fp32", "inv_scale": "fp32"}
    const = {"WIN": mod.WIN_SIZE, "HAS_PAD": has_pad, "num_warps": 4}
    sig = {n: sig.get(n, "constexpr") for n in jit.arg_names}
    src = GluonASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in const.items()},
                         attrs={(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("out_ptr", "pad_ptr")})
    report.append(sm90_compile_report(src, 4))
print("AOT-REPORT" + json.dumps(report))
"""


def test_window_kernel_compiles_for_hopper_without_a_gpu():
    """The windowed kernel compiles for sm_90 in bf16 and fp16, with and without a pad row: q, k and v by
    5-D TMA boxes (k and v in boxes of 8, 4 and 2 key rows, the first two query tiles, then each later one
    in the loop), 36 wgmma in the query tiles' loop (the rel-pos products 4, q·kᵀ 12, the bias 6, P·V 14),
    no spills, and shared memory for two programs an SM."""
    if not gluon_available():
        pytest.skip("this Triton has no Gluon Hopper API")
    cases = [["bfloat16", True], ["float16", True], ["bfloat16", False]]
    proc = run_aot_compile(_WINDOW_AOT_SCRIPT, json.dumps(cases))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for item in json.loads(proc.stdout.split("AOT-REPORT", 1)[1]):
        ptx = item["ptx"]
        assert ptx.count("cp.async.bulk.tensor.5d") == 9
        assert ptx.count("wgmma.mma_async") == 36
        assert item["ptxas_rc"] == 0, item["ptxas"][-2000:]
        assert "0 bytes spill stores" in item["ptxas"], item["ptxas"][-2000:]
        assert item["shared"] <= rpg.SHARED_LIMIT, item["shared"]
