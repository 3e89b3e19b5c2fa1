"""int8_attention: int8 Q·Kᵀ, fp32 softmax, bf16/fp16 P·V; kernel vs reference (dequantize + SDPA)."""
import pytest
import torch
import torch.nn.functional as F

from fastzoo.ops.int8_attention import int8_attention, int8_attention_ref, int8_attention_triton
from fastzoo.ops.quantize_rows import quantize_rows_int8_ref
from helpers import rel_err, run_aot_compile, sqnr


def _qkv(B, N, H, D, seed, v_kind="int8", scale_kind="token"):
    """q, k, v as (B, H, N, D) views of one (B, N, 3, H, D) buffer, as after a fused qkv
    projection, quantized per (token, head) or per tensor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 3, H, D, generator=g) * torch.tensor([1.0, 1.0, 2.0]).reshape(1, 1, 3, 1, 1)
    x = x + torch.randn(1, 1, 3, H, D, generator=g)  # a shared offset: softmax not uniform
    if scale_kind == "token":
        q8, s = quantize_rows_int8_ref(x)
        scales = [s[:, :, i, :, 0].transpose(1, 2) for i in range(3)]  # (B, H, N) strided views
    else:
        s = x.abs().amax(dim=(0, 1, 3, 4)) / 127
        q8 = torch.round(x / s.reshape(1, 1, 3, 1, 1)).clamp(-127, 127).to(torch.int8)
        scales = [s[i].reshape(1) for i in range(3)]
    q, k, v = (q8[:, :, i].transpose(1, 2) for i in range(3))
    if v_kind != "int8":
        v, scales[2] = x[:, :, 2].transpose(1, 2).to(v_kind), None
    return (q, k, v, *scales), x


CASES = [  # (B, N, H, D, v kind, scale kind, out)
    (2, 7, 3, 16, "int8", "token", torch.bfloat16),
    (1, 197, 2, 32, "int8", "token", torch.bfloat16),
    (2, 7, 3, 16, torch.bfloat16, "token", torch.bfloat16),
    (1, 19, 2, 16, "int8", "tensor", torch.float16),
    (1, 33, 1, 24, torch.float16, "tensor", torch.float16),
    (2, 7, 3, 16, "int8", "token", torch.int8),
    (1, 129, 1, 32, "int8", "tensor", torch.int8),
    (1, 1, 2, 64, "int8", "token", torch.bfloat16),  # one token; ViT's head dim
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(kernel_device, case):
    B, N, H, D, v_kind, scale_kind, out_dtype = case
    args, _ = _qkv(B, N, H, D, seed=B * N * H + D, v_kind=v_kind, scale_kind=scale_kind)
    out_scale = None
    if out_dtype == torch.int8:  # a static scale a bit below the output's range (some values clamp)
        out_scale = (int8_attention_ref(*args, out_dtype=torch.float16).float().abs().amax() / 110).reshape(1)
    ref = int8_attention_ref(*args, out_dtype=out_dtype, out_scale=out_scale)
    dev = [None if t is None else t.to(kernel_device) for t in args]
    out = int8_attention_triton(*dev, out_dtype=out_dtype,
                                out_scale=None if out_scale is None else out_scale.to(kernel_device))
    assert out.shape == (B, H, N, D) and out.dtype == out_dtype
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) in memory
    if out_dtype == torch.int8:  # bf16 P·V: a few values one or two steps apart
        diff = (out.cpu().int() - ref.int()).abs()
        assert diff.max() <= 2 and (diff > 0).float().mean() <= 0.2
        assert rel_err(out.float(), ref.float()) <= 2e-2 and ref.abs().max() >= 100
    else:  # P and dequantized V rounded to 16 bits before the P·V product
        assert rel_err(out.float(), ref.float()) <= 1e-2


def test_reference_is_dequantized_sdpa_and_close_to_float_attention():
    (q, k, v, qs, ks, vs), x = _qkv(2, 50, 2, 32, seed=1)
    out = int8_attention_ref(q, k, v, qs, ks, vs, out_dtype=torch.float16)
    exact = F.scaled_dot_product_attention(x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2),
                                           x[:, :, 2].transpose(1, 2))
    assert sqnr(out, exact) >= 25  # int8 per-token quantization of q, k, v
    deq = F.scaled_dot_product_attention(q.float() * qs[..., None], k.float() * ks[..., None],
                                         v.float() * vs[..., None])
    assert rel_err(out.float(), deq) <= 1e-3


def test_public_op_cpu_fallback_errors_compile():
    import torch._dynamo.testing

    (q, k, v, qs, ks, vs), _ = _qkv(1, 9, 2, 16, seed=4)
    out = int8_attention(q, k, v, qs, ks, vs)
    assert torch.equal(out, int8_attention_ref(q, k, v, qs, ks, vs))
    with pytest.raises(TypeError, match="int8 q and k"):
        int8_attention(q.float(), k, v, qs, ks, vs)
    with pytest.raises(ValueError, match="v_scale with an int8 v"):
        int8_attention(q, k, v, qs, ks)
    with pytest.raises(ValueError, match=r"q_scale broadcastable to \(B, H, N\) = \(1, 2, 9\)"):
        int8_attention(q, k, v, qs[..., :4], ks, vs)
    with pytest.raises(ValueError, match="out_scale exactly when out_dtype is torch.int8"):
        int8_attention(q, k, v, qs, ks, vs, out_dtype=torch.int8)
    from fastzoo.ops.int8_attention import _int8_attention_op
    torch.library.opcheck(_int8_attention_op, (q, k, v, qs.contiguous(), ks.contiguous(), vs.contiguous(),
                                               0.25, torch.bfloat16, None))
    torch.library.opcheck(_int8_attention_op, (q, k, v, qs.contiguous(), ks.contiguous(), vs.contiguous(),
                                               0.25, torch.int8, torch.tensor([0.01])))
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c: int8_attention(a, b, c, qs, ks, vs).transpose(1, 2).reshape(1, 9, 32),
                      backend=counter, fullgraph=True)
    torch.testing.assert_close(f(q, k, v), out.transpose(1, 2).reshape(1, 9, 32))
    assert counter.frame_count == 1


@pytest.mark.cuda
@pytest.mark.parametrize("N", [197, 577, 785])
@pytest.mark.parametrize("mode", ["dynamic", "v_bf16", "static"])
def test_cuda_vit_lengths(N, mode):
    B, H, D = (64, 16, 64) if N == 197 else (8, 16, 64)
    args, x = _qkv(B, N, H, D, seed=N, v_kind=torch.bfloat16 if mode == "v_bf16" else "int8",
                   scale_kind="tensor" if mode == "static" else "token")
    args = [None if t is None else t.cuda() for t in args]
    kw = dict(out_dtype=torch.int8, out_scale=torch.tensor([0.02], device="cuda")) if mode == "static" else {}
    out = int8_attention(*args, **kw)
    ref = int8_attention_ref(*args, **kw)
    if mode == "static":
        diff = (out.int() - ref.int()).abs()
        assert diff.max() <= 2 and rel_err(out.float(), ref.float()) <= 2e-2
    else:
        assert rel_err(out.float(), ref.float()) <= 1e-2


# A fresh process: Triton's interpreter (on in this test process) cannot generate code.
_AOT_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
mod = importlib.import_module("fastzoo.ops.int8_attention")  # (fastzoo.ops.int8_attention is the function)

jit = mod._int8_attention_kernel.fn
report = []
for v_int8, out_int8 in [(True, True), (False, False)]:
    cfg = mod._CONFIGS[4]
    types = {"q_ptr": "*i8", "k_ptr": "*i8", "v_ptr": "*i8" if v_int8 else "*bf16", "qs_ptr": "*fp32",
             "ks_ptr": "*fp32", "vs_ptr": "*fp32", "o_ptr": "*i8" if out_int8 else "*bf16", "os_ptr": "*fp32",
             "qk_scale": "fp32"}
    constexprs = {"V_INT8": v_int8, "OUT_INT8": out_int8, "PV_FP16": False, "DOT_F32": False, "BLOCK_D": 64,
                  **cfg.kwargs}
    signature = {n: types.get(n, "constexpr" if n in constexprs else "i32") for n in jit.arg_names}
    aligned = ["q_ptr", "k_ptr", "v_ptr", "o_ptr", "sq_n", "sk_n", "sv_n", "so_n"]
    src = ASTSource(fn=jit, signature=signature,
                    constexprs={(jit.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={(jit.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    report.append({"ttgir": kernel.asm["ttgir"], "shared": kernel.metadata.shared})
print("AOT-REPORT" + json.dumps(report))
"""


def test_kernel_compiles_for_hopper_without_a_gpu():
    """Ahead-of-time sm_90 compile (Triton's bundled ptxas, no GPU): both dots on wgmma
    (int8 Q·Kᵀ, bf16 P·V), int8 and bf16 V, int8 and bf16 output."""
    import json

    proc = run_aot_compile(_AOT_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for item in json.loads(proc.stdout.split("AOT-REPORT", 1)[1]):
        assert item["ttgir"].count("warp_group_dot") >= 2 and "xi8" in item["ttgir"]
        assert item["shared"] <= 228 * 1024
