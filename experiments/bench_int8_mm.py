"""Benchmark the int8 GEMM with fused epilogues and the int8 attention, GPU only.

    python -m experiments.bench_int8_mm            # all shapes, JSON under experiments/results/<gpu>/
    python -m experiments.bench_int8_mm --quick    # ViT-L fc1 + attention at 197, few repeats, nothing saved

GEMM shapes: ViT-L/16-224 at batch 512 (M = 512·197 = 100864 tokens; qkv / proj / fc1 /
fc2, K and N in {1024, 3072, 4096}: the goal shapes), the linears of SAM's image encoder
at batch 16 (M = 16·64·64 = 65536; vit_b and vit_h) and 8192³. For each (M, N, K), timed in
the same run:

1. ``fused``: ``int8_scaled_mm`` (Triton; int32 accumulator dequantized in registers);
2. ``unfused``: ``torch._int_mm`` (cuBLAS, column-major B) followed by the epilogue in
   eager PyTorch (int32 → fp32 · scales + bias → bf16), as torchao-style int8 dynamic
   quantization does without a fused kernel; ``int_mm`` alone is reported too;
3. ``bf16``: ``F.linear`` in bfloat16 (cuBLAS), the baseline;
4. ``dyn``: the full ``int8_dynamic_linear`` (per-token quantization + fused GEMM) on
   bf16 activations, against ``bf16`` — the number that matters for a quantized model;
5. ``static``: the static-mode epilogue (per-tensor a_scale, int8 output re-quantized with
   a per-tensor scale; plus GELU for the fc1 shapes): int8 in, int8 out.

Attention (``int8_attention`` vs ``F.scaled_dot_product_attention`` on bf16, flash): ViT-L
heads (16 × 64) at sequence 197 (batch 512), 577 (batch 128) and 785 (batch 64);
``int8dq``: int8 q/k/v with per-token scales, bf16 out; ``int8static``: per-tensor scales,
int8 out; ``int8_vbf16``: int8 q/k, bf16 v. TFLOP/s = 4·B·H·N²·D / time.

Goal (H100): int8 GEMM ≥ 1.6× the bf16 matmul at the ViT-L shapes (``fused_vs_bf16``).
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
VIT_L_TOKENS = 512 * 197  # ViT-L/16-224 at batch 512
VIT_L = {"vit_l.qkv": (3072, 1024), "vit_l.proj": (1024, 1024), "vit_l.fc1": (4096, 1024), "vit_l.fc2": (1024, 4096)}
ATTN = [(197, 512), (577, 128), (785, 64)]  # (sequence, batch) with ViT-L's 16 heads of 64
VIT_B = {"vit_b.qkv": (2304, 768), "vit_b.proj": (768, 768), "vit_b.lin1": (3072, 768), "vit_b.lin2": (768, 3072)}
VIT_H = {"vit_h.qkv": (3840, 1280), "vit_h.proj": (1280, 1280), "vit_h.lin1": (5120, 1280),
         "vit_h.lin2": (1280, 5120)}


def shapes(quick: bool) -> list[tuple[str, int, int, int]]:
    if quick:
        return [("vit_l.fc1", VIT_L_TOKENS, 4096, 1024)]
    out = [(name, VIT_L_TOKENS, n, k) for name, (n, k) in VIT_L.items()]
    out += [(name, SAM_TOKENS, n, k) for name, (n, k) in {**VIT_B, **VIT_H}.items()]
    out.append(("square", 8192, 8192, 8192))
    return out


def _unfused(a, b_t, a_s, b_s, bias):
    acc = torch._int_mm(a, b_t)
    return (acc.to(torch.float32) * a_s * b_s + bias).to(torch.bfloat16)


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
    dyn_sqnr = harness.sqnr_db(dyn, F.linear(xs[0].float(), w.float(), bias.float()))
    del out, ref, dyn

    t = {}
    t["fused"] = harness.bench(lambda q: int8_scaled_mm(q[0], w_q, q[1], w_s, bias), inputs=qs, rep=rep)
    t["int_mm"] = harness.bench(lambda q: torch._int_mm(q[0], w_q_t), inputs=qs, rep=rep)
    t["unfused"] = harness.bench(lambda q: _unfused(q[0], w_q_t, q[1], w_s, bias), inputs=qs, rep=rep)
    t["bf16"] = harness.bench(lambda x: F.linear(x, w, bias), inputs=xs, rep=rep)
    t["quant"] = harness.bench(lambda x: quantize_rows_int8(x), inputs=xs, rep=rep)
    t["dyn"] = harness.bench(lambda x: int8_dynamic_linear(x, w_q, w_s, bias), inputs=xs, rep=rep)
    a_t = torch.tensor([0.02], device=device)  # per-tensor static scales
    o_t = torch.tensor([0.05], device=device)
    act = "gelu" if "fc1" in name or "lin1" in name else "none"
    t["static"] = harness.bench(lambda q: int8_scaled_mm(q[0], w_q, a_t, w_s, bias, torch.int8, activation=act,
                                                         out_scale=o_t), inputs=qs, rep=rep)

    ops = 2.0 * M * N * K
    ms = {k: v["median_ms"] for k, v in t.items()}
    rate = {k: ops / (v * 1e-3) / 1e12 for k, v in ms.items()}
    row = {"shape": name, "M": M, "N": N, "K": K}
    for k in ("fused", "int_mm", "unfused", "bf16", "quant", "dyn", "static"):
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
    row["static_tops"] = rate["static"]
    row["static_vs_bf16"] = harness.speedup(ms["bf16"], ms["static"])
    row["int_mm_vs_bf16"] = harness.speedup(ms["bf16"], ms["int_mm"])
    row["fused_err"] = fused_err
    row["dyn_sqnr_db"] = dyn_sqnr
    row["config"] = config
    row["timings"] = t
    return row


def bench_attention(N, B, device, rep, H=16, D=64):
    """int8_attention variants vs SDPA (bf16) on ViT-L heads; returns one row."""
    from fastzoo.ops.int8_attention import int8_attention, int8_attention_ref

    g = torch.Generator(device=device).manual_seed(N)
    qkv = torch.randn(B, N, 3, H, D, device=device, generator=g).to(torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    q8, s5 = quantize_rows_int8(qkv)
    q8s = [q8[:, :, i].transpose(1, 2) for i in range(3)]
    ss = [s5[:, :, i, :, 0].transpose(1, 2) for i in range(3)]
    st = [(qkv[:, :, i].float().abs().amax() / 127).reshape(1) for i in range(3)]
    q8t = [torch.clamp(torch.round(qkv[:, :, i].float() / st[i]), -127, 127).to(torch.int8).transpose(1, 2)
           for i in range(3)]
    o_s = torch.tensor([0.01], device=device)
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "int8dq": lambda: int8_attention(*q8s, *ss),
        "int8_vbf16": lambda: int8_attention(q8s[0], q8s[1], v, ss[0], ss[1]),
        "int8static": lambda: int8_attention(*q8t, *st, out_dtype=torch.int8, out_scale=o_s),
    }
    out = fns["int8dq"]()
    ref = int8_attention_ref(*q8s, *ss)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    sqnr_vs_bf16 = harness.sqnr_db(out, fns["sdpa"]().float())
    flops = 4.0 * B * H * N * N * D
    row = {"seq": N, "batch": B, "heads": H, "head_dim": D, "rel_err_vs_ref": err, "sqnr_vs_sdpa_db": sqnr_vs_bf16}
    for name, fn in fns.items():
        t = harness.bench(fn, rep=rep)
        row[f"{name}_ms"] = t["median_ms"]
        row[f"{name}_tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
    for name in ("int8dq", "int8_vbf16", "int8static"):
        row[f"{name}_vs_sdpa"] = harness.speedup(row["sdpa_ms"], row[f"{name}_ms"])
    from fastzoo.ops.int8_attention import _int8_attention_kernel
    row["config"] = str(getattr(_int8_attention_kernel, "best_config", "?"))
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
    harness.print_table(rows, ["shape", "quant_ms", "dyn_ms", "static_ms", "bf16_ms", "dyn_vs_bf16", "static_vs_bf16",
                               "int_mm_vs_bf16", "fused_err", "dyn_sqnr_db"])
    attn_rows = []
    for N, B in (ATTN[:1] if args.quick else ATTN):
        attn_rows.append(bench_attention(N, B, device, rep))
        torch.cuda.empty_cache()
    print("\nAttention (ViT-L heads 16x64): ms and TFLOP/s (4·B·H·N²·D)")
    harness.print_table(attn_rows, ["seq", "batch", "sdpa_ms", "int8dq_ms", "int8_vbf16_ms", "int8static_ms",
                                    "sdpa_tflops", "int8dq_tflops", "int8static_tflops", "int8dq_vs_sdpa",
                                    "int8static_vs_sdpa", "rel_err_vs_ref", "sqnr_vs_sdpa_db"])
    vit_l = [r for r in rows if r["shape"].startswith("vit_l.")]
    goal = {"goal_fused_vs_bf16": 1.6,
            "vit_l_min_fused_vs_bf16": min((r["fused_vs_bf16"] for r in vit_l), default=None),
            "vit_l_min_static_vs_bf16": min((r["static_vs_bf16"] for r in vit_l), default=None)}
    print("goal (int8 GEMM >= 1.6x bf16 at ViT-L shapes):", goal)
    if not args.quick:
        figures = {"int8_ceiling_tops": int8_tops, "bf16_ceiling_tflops": bf16_tflops, "goal": goal, "rows": rows,
                   "attention": attn_rows}
        print("saved", harness.save_result("int8_mm", figures, args))


if __name__ == "__main__":
    main()
