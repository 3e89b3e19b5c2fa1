"""Host (CPU) time per call of fastzoo's GEMM ops next to ``F.linear`` (GPU only): each op is
called ``--calls`` times back to back with no synchronisation, at a shape small enough that
the host, not the GPU, sets the pace; reports µs per call and, with ``--profile``, cProfile's
top functions of the public int8 op. A benchmark of launch overhead, not of the kernels."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from experiments import harness
from fastzoo.ops import int8_mm
from fastzoo.ops.int8_mm import int8_scaled_mm, int8_scaled_mm_triton
from fastzoo.ops.linear_act import linear_act
from fastzoo.ops.quantize_rows import quantize_rows_int8


def per_call_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--n", type=int, default=768)
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    dev = harness.require_cuda("experiments/host_overhead.py")
    M, N, K = args.m, args.n, args.k
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
    bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
    res = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    a, a_s = quantize_rows_int8(x)
    b, b_s = quantize_rows_int8(w)
    b_s = b_s.reshape(N)
    out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    cfg = int8_mm._TMA_CONFIGS[0]
    cases = {
        "F.linear": lambda: F.linear(x, w, bias),
        "int8_scaled_mm (public op)": lambda: int8_scaled_mm(a, b, a_s, b_s, bias),
        "int8_scaled_mm_triton": lambda: int8_scaled_mm_triton(a, b, a_s, b_s, bias),
        "_int8_scaled_mm_tma_launch (forced config)": lambda: int8_mm._int8_scaled_mm_tma_launch(
            a, b, a_s.reshape(-1), b_s, bias, out, None, None, "none", config=cfg),
        "int8_scaled_mm + residual": lambda: int8_scaled_mm(a, b, a_s, b_s, bias, residual=res),
        "linear_act gelu (public op)": lambda: linear_act(x, w, bias, activation="gelu"),
    }
    rows = [{"op": k, "us_per_call": round(per_call_us(f, args.calls), 1)} for k, f in cases.items()]
    harness.print_table(rows, ["op", "us_per_call"])
    print("saved", harness.save_result("host_overhead", {"M": M, "N": N, "K": K, "calls": args.calls, "rows": rows},
                                       args, out_dir=args.out_dir))
    if args.profile:
        for name in ("int8_scaled_mm (public op)", "_int8_scaled_mm_tma_launch (forced config)"):
            table = harness.host_profile(cases[name], args.calls)
            print(f"--- {name}: cProfile over {args.calls} calls\n" + table[:6000])


if __name__ == "__main__":
    main()
