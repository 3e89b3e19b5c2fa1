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
