"""layernorm_quant_int8: fused LayerNorm + int8 quantization, kernel vs reference."""
import pytest
import torch
import torch.nn.functional as F

from fastzoo.ops.layernorm_quant import (layernorm_quant_int8, layernorm_quant_int8_ref,
                                         layernorm_quant_int8_triton)
from fastzoo.ops.quantize_rows import quantize_rows_int8_ref


def _inputs(M, D, dtype, seed, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, D, generator=g) * 3 + 1).to(dtype)
    w = (torch.rand(D, generator=g) + 0.5).to(dtype) if affine else None
    b = (torch.randn(D, generator=g) * 0.2).to(dtype) if affine else None
    return x, w, b


def _close_int8(out, ref):
    diff = (out.cpu().int() - ref.cpu().int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


@pytest.mark.parametrize("shape", [(1, 7), (7, 129), (197, 64), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_kernel_matches_reference(kernel_device, shape, dtype, static):
    M, D = shape
    x, w, b = _inputs(M, D, dtype, seed=M * D + static)
    scale = torch.tensor([0.012]) if static else None
    q_ref, s_ref = layernorm_quant_int8_ref(x, w, b, 1e-6, scale)
    dev = lambda t: None if t is None else t.to(kernel_device)  # noqa: E731
    q, s = layernorm_quant_int8_triton(dev(x), dev(w), dev(b), 1e-6, dev(scale))
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (M, 1)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=1e-5, atol=0)
    _close_int8(q, q_ref)
    if static and M > 1:
        assert (q_ref.abs() == 127).any()  # the static scale clamps some values


def test_kernel_no_affine_and_batched_shape(kernel_device):
    x, _, _ = _inputs(10, 48, torch.float32, seed=3, affine=False)
    x3 = x.reshape(2, 5, 48).to(kernel_device)
    q, s = layernorm_quant_int8_triton(x3, None, None, 1e-5)
    q_ref, s_ref = layernorm_quant_int8_ref(x.reshape(2, 5, 48), None, None, 1e-5)
    assert q.shape == (2, 5, 48) and s.shape == (2, 5, 1)
    _close_int8(q, q_ref)
    torch.testing.assert_close(s.cpu(), s_ref)


def test_reference_is_layernorm_then_quantize():
    x, w, b = _inputs(13, 96, torch.float32, seed=5)
    q, s = layernorm_quant_int8_ref(x, w, b, 1e-6)
    q2, s2 = quantize_rows_int8_ref(F.layer_norm(x, (96,), w, b, 1e-6))
    assert torch.equal(q, q2) and torch.allclose(s, s2)
    y = F.layer_norm(x, (96,), w, b, 1e-6)
    assert (q.float() * s - y).abs().max() <= 0.5 * s.max() + 1e-6


def test_public_op_cpu_fallback_errors_and_compile():
    import torch._dynamo.testing

    x, w, b = _inputs(6, 32, torch.bfloat16, seed=7)
    q, s = layernorm_quant_int8(x, w, b)
    q_ref, s_ref = layernorm_quant_int8_ref(x, w, b)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    with pytest.raises(ValueError, match=r"weight of shape \(32,\), got \(31,\)"):
        layernorm_quant_int8(x, w[:31], b)
    with pytest.raises(ValueError, match="static scale of one float32 element"):
        layernorm_quant_int8(x, w, b, scale=torch.ones(2))
    with pytest.raises(TypeError, match="got torch.int32"):
        layernorm_quant_int8(x.int(), w, b)
    with pytest.raises(ValueError, match=r"D > 0 features.*got shape \(3, 0\)"):
        layernorm_quant_int8(torch.randn(3, 0), None, None)
    q0, s0 = layernorm_quant_int8(torch.randn(0, 32), w.float(), b.float())  # no rows: empty outputs
    assert q0.shape == (0, 32) and s0.shape == (0, 1)
    from fastzoo.ops.layernorm_quant import _layernorm_quant_int8_op
    torch.library.opcheck(_layernorm_quant_int8_op, (x, w, b, 1e-6, None))
    torch.library.opcheck(_layernorm_quant_int8_op, (x, w, b, 1e-6, torch.tensor([0.1])))
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    f = torch.compile(lambda t: layernorm_quant_int8(t * 2, w, b), backend=counter, fullgraph=True)
    q2, _ = f(x)
    assert torch.equal(q2, layernorm_quant_int8_ref(x * 2, w, b)[0]) and counter.frame_count == 1


@pytest.mark.cuda
@pytest.mark.parametrize("D", [384, 768, 1024, 1280])
@pytest.mark.parametrize("static", [False, True])
def test_cuda_vit_shapes(D, static):
    x, w, b = (t.cuda() for t in _inputs(512 * 197, D, torch.bfloat16, seed=D))
    scale = torch.tensor([0.03], device="cuda") if static else None
    q, s = layernorm_quant_int8(x, w, b, 1e-6, scale)
    q_ref, s_ref = layernorm_quant_int8_ref(x, w, b, 1e-6, scale)
    _close_int8(q, q_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
