"""Benchmark fastzoo.ops kernels against their references.

    python -m experiments.bench_ops            # GPU: real sizes, JSON under experiments/results/<gpu>/
    python -m experiments.bench_ops --quick    # a small size; on a CPU-only machine this is what runs
    python -m experiments.bench_ops --layernorm-quant   # layernorm_quant_int8, each tile forced too

``--layernorm-quant`` (GPU): ``layernorm_quant_int8`` at SAM's and ViT-L's pre-norm shapes,
static and dynamic, the autotuned op and each candidate configuration of its kernel forced
(``LN_QUANT_SWEEP_CONFIGS``), bytes (x read, int8 and scales written) over time as % of copy.

For each op and shape: the kernel (public op), the eager PyTorch reference and the
reference under torch.compile, timed in the same run; bytes moved (each input read
once, each output written once) over time, as a percentage of the copy bandwidth
measured in the same run; and the kernel's agreement with the reference.
"""
from __future__ import annotations

import argparse

import torch

from experiments import harness
from fastzoo.ops import quantize_rows_int8, quantize_rows_int8_ref
from fastzoo.utils import parse_dtype

GPU_SHAPES = [(8192, 8192), (65536, 768), (16, 4096)]
CPU_SHAPES = [(256, 1024)]


def bench_quantize_rows(shapes, dtype, device, copy_gbps, rep):
    rows = []
    ref_compiled = torch.compile(quantize_rows_int8_ref, fullgraph=True, dynamic=False)
    for m, n in shapes:
        xs = [torch.randn(m, n, device=device, dtype=dtype) for _ in range(3)]
        q, s = quantize_rows_int8(xs[0])
        q_ref, s_ref = quantize_rows_int8_ref(xs[0])
        mismatch = (q.to(torch.int16) - q_ref.to(torch.int16)).abs()
        nbytes = m * n * xs[0].element_size() + m * n + m * 4
        row = {"op": "quantize_rows_int8", "shape": f"{m}x{n}", "dtype": str(dtype).split(".")[-1],
               "max_q_diff": int(mismatch.max()), "scale_max_rel_err":
               float(((s - s_ref).abs() / s_ref).max())}
        for label, fn in [("kernel", quantize_rows_int8), ("eager_ref", quantize_rows_int8_ref),
                          ("compiled_ref", ref_compiled)]:
            # CUDA-graph replays: device time without the host's launch overhead
            t = harness.bench(fn, inputs=xs, warmup=5, rep=rep, device=device, cuda_graph=True)
            row[f"{label}_us"] = t["median_ms"] * 1e3
            row[f"{label}_gbps"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
        print(f"  {row['shape']}: kernel {row['kernel_us']:.1f} us ({row['kernel_gbps']:.0f} GB/s), "
              f"eager {row['eager_ref_us']:.1f} us, compiled {row['compiled_ref_us']:.1f} us", flush=True)
        row["speedup_vs_eager"] = row["eager_ref_us"] / row["kernel_us"]
        row["speedup_vs_compiled"] = row["compiled_ref_us"] / row["kernel_us"]
        if copy_gbps:
            row["kernel_pct_of_copy"] = 100 * row["kernel_gbps"] / copy_gbps
        rows.append(row)
    return rows


LN_SHAPES = [(65536, 768), (65536, 1280), (100864, 1024)]  # SAM vit_b / vit_h at batch 16, ViT-L at 512


def bench_layernorm_quant(device, copy_gbps, rep):
    """layernorm_quant_int8: the autotuned op and each forced configuration, CUDA-graph timed."""
    import triton

    from fastzoo.ops import layernorm_quant as lnq

    rows = []
    for m, d in LN_SHAPES:
        g = torch.Generator(device=device).manual_seed(m + d)
        xs = [torch.randn(m, d, device=device, generator=g).to(torch.bfloat16) for _ in range(2)]
        w = torch.rand(d, device=device, generator=g).to(torch.bfloat16) + 0.5
        b = torch.randn(d, device=device, generator=g).to(torch.bfloat16) * 0.1
        nbytes = m * d * 2 + m * d + m * 4
        for static in (True, False):
            scale = torch.full((1,), 0.05, device=device) if static else None
            q_ref, _ = lnq.layernorm_quant_int8_ref(xs[0], w, b, 1e-6, scale)
            row = {"shape": f"{m}x{d}", "mode": "static" if static else "dynamic"}
            t = harness.bench(lambda x: lnq.layernorm_quant_int8(x, w, b, 1e-6, scale), inputs=xs, rep=rep,
                              device=device, cuda_graph=True)["median_ms"]
            row.update(auto_us=t * 1e3, auto_pct_of_copy=100 * nbytes / (t * 1e-3) / 1e9 / copy_gbps)
            row["auto_config"] = str(getattr(lnq._layernorm_quant_int8_kernel, "best_config", "?"))
            for cfg in lnq.LN_QUANT_SWEEP_CONFIGS:
                name = f"m{cfg.kwargs['BLOCK_M']}_w{cfg.num_warps}"

                def run(x, cfg=cfg):
                    q = torch.empty(m, d, dtype=torch.int8, device=device)
                    s = torch.empty(m, 1, dtype=torch.float32, device=device)
                    grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]),)
                    lnq._layernorm_quant_int8_kernel.fn[grid](
                        x, w, b, scale if static else s, q, s, m, d, x.stride(0), q.stride(0), 1e-6,
                        HAS_W=True, HAS_B=True, STATIC=static, EPS_=lnq.EPS, BLOCK_D=triton.next_power_of_2(d),
                        **cfg.all_kwargs())
                    return q

                q = run(xs[0])
                row[f"{name}_q_diff"] = int((q.to(torch.int16) - q_ref.to(torch.int16)).abs().max())
                t = harness.bench(run, inputs=xs, rep=rep, device=device, cuda_graph=True)["median_ms"]
                row[f"{name}_us"] = t * 1e3
            print(row, flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--layernorm-quant", action="store_true", help="layernorm_quant_int8 and its configs (GPU)")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    if args.layernorm_quant:
        device = harness.require_cuda("bench_ops --layernorm-quant")
        copy_gbps = harness.measure_copy_bandwidth()
        rows = bench_layernorm_quant(device, copy_gbps, 50)
        print("saved", harness.save_result("bench_layernorm_quant", {"copy_gbps": copy_gbps, "rows": rows}, args,
                                           out_dir=args.out_dir))
        return
    dtype = parse_dtype(args.dtype)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        copy_gbps = harness.measure_copy_bandwidth()
        shapes = GPU_SHAPES[:1] if args.quick else GPU_SHAPES
        rep = 20 if args.quick else 100
    else:
        print("No CUDA GPU: running the PyTorch reference path on the CPU at a small size "
              "(the Triton kernel needs a GPU).")
        copy_gbps, shapes, rep = None, CPU_SHAPES, 10
    rows = bench_quantize_rows(shapes, dtype, device, copy_gbps, rep)
    cols = ["op", "shape", "dtype", "kernel_us", "kernel_gbps", "eager_ref_us", "compiled_ref_us",
            "speedup_vs_eager", "speedup_vs_compiled", "max_q_diff"]
    if copy_gbps:
        cols.insert(5, "kernel_pct_of_copy")
        print(f"copy bandwidth (read+write): {copy_gbps:.0f} GB/s")
    harness.print_table(rows, cols)
    if on_gpu and not args.quick:
        print("saved", harness.save_result("bench_ops", {"copy_gbps": copy_gbps, "rows": rows}, args,
                                           out_dir=args.out_dir))


if __name__ == "__main__":
    main()
