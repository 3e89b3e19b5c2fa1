"""Measure the device's ceilings: copy bandwidth and dense matmul rates.

    python -m experiments.ceilings

Bandwidth counts bytes read plus bytes written of a large device-to-device copy;
matmul rates are 8192³ products on random data (bf16, fp16 via torch.mm; int8 via
torch._int_mm with a column-major and a row-major second operand).
Results go to experiments/results/<gpu>/ceilings.json; other benchmarks quote
their figures as a percentage of these.
"""
from __future__ import annotations

import argparse

import torch

from experiments import harness


def measure(size: int = 8192) -> dict[str, float]:
    figures = {
        "copy_gbps": harness.measure_copy_bandwidth(),
        "bf16_tflops": harness.measure_matmul_tflops(torch.bfloat16, size),
        "fp16_tflops": harness.measure_matmul_tflops(torch.float16, size),
        "int8_tops": harness.measure_matmul_tflops(torch.int8, size),
    }
    a = torch.randint(-128, 127, (size, size), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 127, (size, size), dtype=torch.int8, device="cuda")
    t = harness.bench(lambda: torch._int_mm(a, b), warmup=3, rep=10)
    figures["int8_tops_row_major_b"] = 2 * size**3 / (t["median_ms"] * 1e-3) / 1e12
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8192, help="matmul size (default 8192)")
    args = p.parse_args(argv)
    harness.require_cuda("the ceilings benchmark")
    figures = measure(args.size)
    harness.print_table([{"ceiling": k, "value": v} for k, v in figures.items()])
    print("saved", harness.save_result("ceilings", figures, args))


if __name__ == "__main__":
    main()
