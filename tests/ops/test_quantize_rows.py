"""quantize_rows_int8: Triton kernel vs reference, known properties, compile."""
import pytest
import torch

from fastzoo.ops import quantize_rows_int8, quantize_rows_int8_ref, quantize_rows_int8_triton
from fastzoo.ops.quantize_rows import EPS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 129), (333, 4096), (3, 5, 197), (2, 20000)]


def _check_against_ref(q, s, x):
    q_ref, s_ref = quantize_rows_int8_ref(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == (*x.shape[:-1], 1)
    torch.testing.assert_close(s.cpu(), s_ref.cpu(), rtol=1e-6, atol=0)
    diff = (q.cpu().to(torch.int16) - q_ref.cpu().to(torch.int16)).abs()
    # Division may round differently in the last bit on a GPU: at most one step,
    # and only where x / s lands within rounding of a .5 tie.
    assert diff.max() <= 1
    assert diff.float().mean() < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference(kernel_device, shape, dtype):
    torch.manual_seed(hash((shape, str(dtype))) % 2**31)
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(dtype).to(kernel_device)
    q, s = quantize_rows_int8_triton(x)
    _check_against_ref(q, s, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_all_zero_rows(kernel_device, dtype):
    x = torch.randn(9, 300).to(dtype)
    x[2] = 0
    x[7] = 0
    x = x.to(kernel_device)
    q, s = quantize_rows_int8_triton(x)
    _check_against_ref(q, s, x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert (q[2] == 0).all() and (q[7] == 0).all()
    torch.testing.assert_close(s[2].cpu(), torch.tensor([EPS / 127.0]))


def test_kernel_non_contiguous_rows(kernel_device):
    base = torch.randn(64, 258).to(kernel_device)
    x = base[::3, 1:200]  # strided rows, unit stride inside a row
    q, s = quantize_rows_int8_triton(x)
    _check_against_ref(q, s, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_properties(dtype):
    x = (torch.randn(31, 77) * 3).to(dtype)
    q, s = quantize_rows_int8_ref(x)
    xf = x.float()
    # The row maximum maps to ±127 and the error is at most half a step.
    assert (q.abs().amax(dim=-1) == 127).all()
    assert ((q.float() * s - xf).abs() <= s / 2 * (1 + 1e-5)).all()
    torch.testing.assert_close(s.squeeze(-1), xf.abs().amax(-1) / 127)


def test_public_op_falls_back_on_cpu_and_rejects_bad_input():
    x = torch.randn(5, 33)
    q, s = quantize_rows_int8(x)
    q_ref, s_ref = quantize_rows_int8_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    with pytest.raises(TypeError, match="got torch.int32"):
        quantize_rows_int8(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="scalar"):
        quantize_rows_int8(torch.tensor(1.0))


def test_compile_fullgraph_no_graph_break():
    import torch._dynamo.testing

    def f(x):
        q, s = quantize_rows_int8(x * 2.0)
        return q.float() * s

    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    x = torch.randn(7, 129)
    torch.testing.assert_close(compiled(x), f(x))
    assert counter.frame_count == 1
    assert any(
        getattr(n.target, "__name__", "").startswith("quantize_rows_int8")
        or "quantize_rows_int8" in str(n.target)
        for g in counter.graphs for n in g.graph.nodes
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_op_uses_kernel_on_cuda(dtype):
    x = torch.randn(257, 1000, device="cuda").to(dtype)
    q, s = quantize_rows_int8(x)
    _check_against_ref(q, s, x)
    compiled = torch.compile(lambda t: quantize_rows_int8(t), fullgraph=True)
    q2, s2 = compiled(x)
    assert torch.equal(q2, q) and torch.equal(s2, s)


def test_zero_length_rows_reference_and_kernel_agree(kernel_device):
    for fn, dev in ((quantize_rows_int8, "cpu"), (quantize_rows_int8_triton, kernel_device)):
        q, s = fn(torch.randn(3, 0, device=dev))
        assert q.shape == (3, 0) and s.shape == (3, 1)
        torch.testing.assert_close(s.cpu(), torch.full((3, 1), EPS / 127.0))
