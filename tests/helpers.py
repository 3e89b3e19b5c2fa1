"""Numerical helpers shared by the tests."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖, computed in float64 (0 when both are zero)."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "output has NaN or inf"
    denom = ref.norm()
    num = (out - ref).norm()
    if denom == 0:
        return float(num)
    return float(num / denom)


def sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20·log10(‖ref‖ / ‖out − ref‖)."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    noise = (out - ref).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / noise))


def _kernel_name(kernel) -> str:
    while hasattr(kernel, "fn"):  # Autotuner -> Heuristics -> JITFunction -> python function
        kernel = kernel.fn
    return kernel.__name__


INT8_OP_MODULES = ("int8_attention", "int8_mm", "layernorm_quant", "quantize_rows")


def kernels_on_cpu(monkeypatch, modules=INT8_OP_MODULES) -> list:
    """Route the public ops of ``fastzoo.ops.<module>`` (default: the int8 ops) to their Triton
    kernels for CPU tensors (Triton's interpreter), so that a model's use of them (strided
    views, scales, epilogues, shapes) is checked against its reference path without a GPU.
    Returns the list that collects the name of every kernel launched from then on."""
    import importlib

    def applies(*tensors, dtypes=None, **kw):
        return all(dtypes is None or t.dtype in tuple(dtypes) for t in tensors)

    launched = []
    # (fastzoo.ops re-exports functions named like their modules: import the modules by name)
    for name in modules:
        mod = importlib.import_module(f"fastzoo.ops.{name}")
        monkeypatch.setattr(mod, "cuda_kernel_applies", applies)
        monkeypatch.setattr(mod, "launch", lambda kernel, *a, _l=mod.launch, **k: (launched.append(_kernel_name(kernel)),
                                                                                   _l(kernel, *a, **k)))
    return launched


def run_aot_compile(script: str, *args: str):
    """Run ``script`` (Python that compiles Triton kernels ahead of time for sm_90 with
    Triton's bundled ptxas: no GPU needed) in a fresh process without Triton's interpreter,
    with the repository on the path; returns the CompletedProcess. Skips the calling test
    where Triton or its ahead-of-time API is missing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)


def exact_int4_cases(N: int, K: int, group: int, dtype: torch.dtype, hot: tuple, generator, device,
                     rows: int = 1) -> list:
    """int4 GEMV inputs whose product is exact in ``dtype``: integer x / 4, every nibble value
    (row 0 walks them), scales 2^-e, integer zeros; and a single nonzero weight at ``hot``
    times ones (a kernel that mixed rows would spread it). ``rows`` rows of x (m + 1 times
    ones in the second case: a product that took another row of x would show).
    [(x, packed, scales, zeros, truth)]."""
    from fastzoo.ops.weight_only_linear import int4_dequantize

    g, dev = generator, device
    q = torch.randint(0, 16, (N, K), device=dev, generator=g, dtype=torch.uint8)
    q[0] = torch.arange(K, device=dev) % 16
    s4 = (2.0 ** -torch.randint(0, 3, (N, K // group), device=dev, generator=g)).to(dtype)
    z4 = torch.randint(-3, 4, (N, K // group), device=dev, generator=g).to(dtype)
    x = torch.randint(-2, 3, (rows, K), device=dev, generator=g).to(dtype) / 4
    one = torch.zeros_like(q)
    one[hot] = 3
    ones = torch.ones_like(x) * torch.arange(1, rows + 1, device=dev, dtype=dtype)[:, None]
    cases = []
    for qq, xx in ((q, x), (one, ones)):
        p = qq[:, 0::2] | (qq[:, 1::2] << 4)
        truth = torch.nn.functional.linear(xx.double(), int4_dequantize(p, s4, z4, group, torch.float64)).to(dtype)
        cases.append((xx, p, s4, z4, truth))
    return cases


def sm90_compile_report(src, num_warps: int, maxnreg=None) -> dict:
    """Compile a Triton / Gluon AST source for sm_90 (no GPU) and run the bundled ``ptxas -v``
    on its PTX: {"ptx", "shared", "ptxas" (its report), "ptxas_rc"}. For the scripts that
    ``run_aot_compile`` runs (they import this as ``tests.helpers``)."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "k.ptx"), "w").write(kernel.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", os.path.join(d, "k.ptx"), "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True)
    return {"ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared, "ptxas": log.stdout + log.stderr,
            "ptxas_rc": log.returncode}
