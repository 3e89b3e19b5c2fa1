"""Benchmark the int8 GEMM with fused dequantization (fastzoo.ops.int8_mm), GPU only.

    python -m experiments.bench_int8_mm            # all shapes, JSON under experiments/results/<gpu>/
    python -m experiments.bench_int8_mm --quick    # one shape, few repeats, nothing saved

Shapes: the linears of SAM's image encoder at batch 16 (M = 16·64·64 = 65536 tokens;
vit_b and vit_h qkv / proj / lin1 / lin2) and 8192³. For each (M, N, K), timed in
the same run:

1. ``fused``: ``int8_scaled_mm`` (Triton; int32 accumulator dequantized in registers);
2. ``unfused``: ``torch._int_mm`` (cuBLAS, column-major B) followed by the epilogue in
   eager PyTorch (int32 → fp32 · scales + bias → bf16), as torchao-style int8 dynamic
   quantization does without a fused kernel; ``int_mm`` alone is reported too;
3. ``bf16``: ``F.linear`` in bfloat16 (cuBLAS), the baseline;
4. ``dyn``: the full ``int8_dynamic_linear`` (per-token quantization + fused GEMM) on
   bf16 activations, against ``bf16`` — the number that matters for a quantized model.

Rates are 2·M·N·K over the time (TOP/s for int8, TFLOP/s for bf16), and percentages of
the int8 / bf16 matmul ceilings measured in the same run (8192³, harness). Accuracy:
``fused_err`` = max|out − ref| / max|ref| against ``int8_scaled_mm_ref`` (exact product
via ``torch._int_mm``); ``dyn_sqnr_db`` = SQNR of the dynamic linear against the fp32
linear of the same bf16 inputs.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from experiments import harness
from fastzoo.ops.int8_mm import _int8_scaled_mm_kernel, int8_dynamic_linear, int8_scaled_mm, int8_scaled_mm_ref
from fastzoo.ops.quantize_rows import quantize_rows_int8

SAM_TOKENS = 16 * 64 * 64  # batch 16 of 64×64 image-embedding tokens
VIT_B = {"vit_b.qkv": (2304, 768), "vit_b.proj": (768, 768), "vit_b.lin1": (3072, 768), "vit_b.lin2": (768, 3072)}
VIT_H = {"vit_h.qkv": (3840, 1280), "vit_h.proj": (1280, 1280), "vit_h.lin1": (5120, 1280),
         "vit_h.lin2": (1280, 5120)}


def shapes(quick: bool) -> list[tuple[str, int, int, int]]:
    if quick:
        return [("vit_b.lin1", SAM_TOKENS, 3072, 768)]
    out = [(name, SAM_TOKENS, n, k) for name, (n, k) in {**VIT_B, **VIT_H}.items()]
    out.append(("square", 8192, 8192, 8192))
    return out


def _unfused(a, b_t, a_s, b_s, bias):
    acc = torch._int_mm(a, b_t)
    return (acc.to(torch.float32) * a_s * b_s + bias).to(torch.bfloat16)


def _sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(torch.float64)
    noise = (out.to(torch.float64) - ref).norm()
    return float(20 * torch.log10(ref.norm() / noise)) if noise > 0 else float("inf")


def bench_shape(name, M, N, K, device, rep, n_inputs, int8_tops, bf16_tflops):
    g = torch.Generator(device=device).manual_seed(M + N + K)
    xs = [torch.randn(M, K, device=device, generator=g).to(torch.bfloat16) for _ in range(n_inputs)]
    w = (torch.randn(N, K, device=device, generator=g) * K**-0.5).to(torch.bfloat16)
    bias = (torch.randn(N, device=device, generator=g) * 0.1).to(torch.bfloat16)
    w_q, w_s = quantize_rows_int8(w)
    w_s = w_s.reshape(N)
    w_q_t = w_q.t()  # (K, N) column-major: cuBLAS int8's fast layout
    qs = [quantize_rows_int8(x) for x in xs]  # (a, a_scale) per input

    # Accuracy (also triggers autotuning before anything is timed).
    a0, s0 = qs[0]
    out = int8_scaled_mm(a0, w_q, s0, w_s, bias)
    ref = int8_scaled_mm_ref(a0, w_q, s0, w_s, bias)
    fused_err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    config = str(getattr(_int8_scaled_mm_kernel, "best_config", "?"))
    dyn = int8_dynamic_linear(xs[0], w_q, w_s, bias)
    dyn_sqnr = _sqnr_db(dyn, F.linear(xs[0].float(), w.float(), bias.float()))
    del out, ref, dyn

    t = {}
    t["fused"] = harness.bench(lambda q: int8_scaled_mm(q[0], w_q, q[1], w_s, bias), inputs=qs, rep=rep)
    t["int_mm"] = harness.bench(lambda q: torch._int_mm(q[0], w_q_t), inputs=qs, rep=rep)
    t["unfused"] = harness.bench(lambda q: _unfused(q[0], w_q_t, q[1], w_s, bias), inputs=qs, rep=rep)
    t["bf16"] = harness.bench(lambda x: F.linear(x, w, bias), inputs=xs, rep=rep)
    t["quant"] = harness.bench(lambda x: quantize_rows_int8(x), inputs=xs, rep=rep)
    t["dyn"] = harness.bench(lambda x: int8_dynamic_linear(x, w_q, w_s, bias), inputs=xs, rep=rep)

    ops = 2.0 * M * N * K
    ms = {k: v["median_ms"] for k, v in t.items()}
    rate = {k: ops / (v * 1e-3) / 1e12 for k, v in ms.items()}
    row = {"shape": name, "M": M, "N": N, "K": K}
    for k in ("fused", "int_mm", "unfused", "bf16", "quant", "dyn"):
        row[f"{k}_ms"] = ms[k]
    row["fused_tops"] = rate["fused"]
    row["fused_pct_int8"] = 100 * rate["fused"] / int8_tops
    row["int_mm_pct_int8"] = 100 * rate["int_mm"] / int8_tops
    row["unfused_tops"] = rate["unfused"]
    row["bf16_tflops"] = rate["bf16"]
    row["bf16_pct"] = 100 * rate["bf16"] / bf16_tflops
    row["fused_vs_unfused"] = harness.speedup(ms["unfused"], ms["fused"])
    row["fused_vs_bf16"] = harness.speedup(ms["bf16"], ms["fused"])
    row["dyn_vs_bf16"] = harness.speedup(ms["bf16"], ms["dyn"])
    row["fused_err"] = fused_err
    row["dyn_sqnr_db"] = dyn_sqnr
    row["config"] = config
    row["timings"] = t
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape, few repeats, no JSON")
    p.add_argument("--rep", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--inputs", type=int, default=2, help="input sets rotated between calls")
    args = p.parse_args(argv)
    device = harness.require_cuda("experiments/bench_int8_mm.py")
    rep = args.rep or (10 if args.quick else 50)

    int8_tops = harness.measure_matmul_tflops(torch.int8)
    bf16_tflops = harness.measure_matmul_tflops(torch.bfloat16)
    print(f"{harness.gpu_name()}: measured ceilings int8 {int8_tops:.0f} TOP/s (torch._int_mm), "
          f"bf16 {bf16_tflops:.0f} TFLOP/s (torch.mm), 8192^3")

    rows = []
    for name, M, N, K in shapes(args.quick):
        row = bench_shape(name, M, N, K, device, rep, args.inputs, int8_tops, bf16_tflops)
        rows.append(row)
        print(f"  {name} ({M}x{N}x{K}): fused {row['fused_ms']:.3f} ms, config {row['config']}", flush=True)
        torch.cuda.empty_cache()  # 65536-token activations of the next shape

    print("\nTimes in ms (medians); rates in TOP/s (int8) / TFLOP/s (bf16); speed-ups are time ratios.")
    harness.print_table(rows, ["shape", "M", "N", "K", "fused_ms", "int_mm_ms", "unfused_ms", "bf16_ms",
                               "fused_tops", "fused_pct_int8", "int_mm_pct_int8", "bf16_pct",
                               "fused_vs_unfused", "fused_vs_bf16"])
    print()
    harness.print_table(rows, ["shape", "quant_ms", "dyn_ms", "bf16_ms", "dyn_vs_bf16", "fused_err",
                               "dyn_sqnr_db"])
    if not args.quick:
        figures = {"int8_ceiling_tops": int8_tops, "bf16_ceiling_tflops": bf16_tflops, "rows": rows}
        print("saved", harness.save_result("int8_mm", figures, args))


if __name__ == "__main__":
    main()
