"""linear_act: the float linear with bias, GELU and residual in the persistent TMA kernel's
epilogue, against the reference (Triton's interpreter on the CPU, each interpreter tile)."""
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")
from fastzoo.ops import int8_mm  # noqa: E402
from fastzoo.ops.linear_act import linear_act, linear_act_ref, linear_act_triton  # noqa: E402

if not int8_mm._tma_api():
    pytest.skip(f"Triton {triton.__version__} has no host-side TMA descriptors", allow_module_level=True)


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# (M, N, K): K and N multiples of 8 (16-byte rows in bf16); tails of every tile dimension
SHAPES = [(1, 32, 64), (7, 48, 96), (129, 80, 40), (197, 24, 136)]
CASES = [(s, act, res, dt, i % len(int8_mm.TMA_INTERPRETER_CONFIGS))
         for i, (s, act, res, dt) in enumerate([(SHAPES[0], "gelu", True, torch.bfloat16),
                                                 (SHAPES[1], "none", False, torch.float16),
                                                 (SHAPES[2], "gelu", False, torch.bfloat16),
                                                 (SHAPES[3], "none", True, torch.bfloat16),
                                                 (SHAPES[2], "gelu", True, torch.float16),
                                                 (SHAPES[3], "gelu", False, torch.float16)])]


@pytest.mark.parametrize("shape,activation,residual,dtype,config", CASES, ids=str)
def test_linear_act_kernel_matches_reference(kernel_device, shape, activation, residual, dtype, config):
    M, N, K = shape
    g = _gen(shape, activation, residual, config)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype) if residual else None
    truth = linear_act_ref(x.double(), w.double(), b.double(), activation=activation,
                           residual=None if r is None else r.double())
    dev = lambda t: None if t is None else t.to(kernel_device)  # noqa: E731
    cfg = int8_mm.TMA_INTERPRETER_CONFIGS[config] if kernel_device.type == "cpu" else None
    out = linear_act_triton(dev(x), dev(w), dev(b), activation=activation, residual=dev(r), config=cfg)
    assert out.dtype == dtype and out.shape == (M, N)
    ref = linear_act_ref(x, w, b, activation=activation, residual=r)
    # one rounding of the fp32 result (the reference rounds after the GEMM, GELU and add)
    err, err_ref = ((t.double().cpu() - truth).abs().max().item() for t in (out, ref))
    assert err <= max(1.5 * err_ref, 1e-2 * truth.abs().max().item()), (err, err_ref)


def test_linear_act_public_op_is_the_reference_on_cpu_and_checks_its_arguments():
    g = _gen("op")
    x, w, b = torch.randn(3, 5, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    r = torch.randn(3, 5, 24, generator=g)
    torch.testing.assert_close(linear_act(x, w, b, activation="gelu", residual=r),
                               torch.nn.functional.gelu(x @ w.t() + b) + r)
    f = torch.compile(lambda x: linear_act(x, w, b, activation="gelu"), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), linear_act_ref(x, w, b, activation="gelu"))
    with pytest.raises(ValueError, match=r"expects x \(..., K\) and weight \(N, K\)"):
        linear_act(x, w[:, :8])
    with pytest.raises(ValueError, match="expects activation in"):
        linear_act(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"expects residual of shape \(3, 5, 24\)"):
        linear_act(x, w, residual=r[:, :2])
    with pytest.raises(TypeError, match="one float dtype"):
        linear_act(x, w.double())
