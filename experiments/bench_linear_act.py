"""Benchmark ``fastzoo.ops.linear_act`` (a float linear with GELU / residual in its epilogue), GPU only.

    python -m experiments.bench_linear_act            # all shapes, JSON under experiments/results/<gpu>/
    python -m experiments.bench_linear_act --quick    # SAM vit_h's two MLP linears, nothing saved
    python -m experiments.bench_linear_act --sweep    # every kernel configuration, JSON linear_act_sweep

Shapes: the MLP linears of SAM's image encoder at batch 16 (M = 16·64·64 tokens; lin1 with
exact GELU, lin2 with the block's residual) for vit_b and vit_h, and ViT-L/16-224's fc1 / fc2
at batch 512 (M = 512·197). For each, timed in the same run (CUDA events, median, inputs
rotated over ``--inputs`` sets):

1. ``fused``: ``linear_act`` (the persistent TMA kernel on Hopper; autotuned);
2. ``compiled``: ``torch.compile`` of ``F.gelu(F.linear(x, w, b))`` / ``F.linear(x, w, b) + r``,
   what the compiled model runs today (cuBLAS, then the GELU or add as its own pass);
3. ``gemm``: ``F.linear`` alone (cuBLAS with its bias epilogue): the GEMM's floor.

Rates are 2·M·N·K FLOPs over the time and percentages of the bf16 matmul ceiling measured in
the same run. ``err``: max |fused − truth| / max |truth| against an fp64 reference on the
first 512 rows; ``ref_err`` the same for the compiled path.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from experiments import harness
from fastzoo.ops.linear_act import linear_act

# (name, M, K, N, epilogue)
SHAPES = [
    ("sam_vit_b.lin1", 16 * 4096, 768, 3072, "gelu"),
    ("sam_vit_b.lin2", 16 * 4096, 3072, 768, "residual"),
    ("sam_vit_h.lin1", 16 * 4096, 1280, 5120, "gelu"),
    ("sam_vit_h.lin2", 16 * 4096, 5120, 1280, "residual"),
    ("vit_l.fc1", 512 * 197, 1024, 4096, "gelu"),
    ("vit_l.fc2", 512 * 197, 4096, 1024, "residual"),
    ("sam_vit_b.proj", 16 * 4096, 768, 768, "residual"),  # attention's output projection + residual
    ("sam_vit_h.proj", 16 * 4096, 1280, 1280, "residual"),
]


def _problem(M, K, N, epilogue, dtype, device, n_inputs):
    """Seeded inputs of one shape: ``n_inputs`` (x, residual or None) sets, weight, bias, activation."""
    g = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(M, K, device=device, generator=g).to(dtype),
             torch.randn(M, N, device=device, generator=g).to(dtype) if epilogue == "residual" else None)
            for _ in range(n_inputs)]
    w = (torch.randn(N, K, device=device, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=device, generator=g).to(dtype)
    act = "gelu" if epilogue == "gelu" else "none"
    return sets, w, b, act


def bench_shape(name, M, K, N, epilogue, dtype, device, rep, n_inputs, ceiling):
    sets, w, b, act = _problem(M, K, N, epilogue, dtype, device, n_inputs)

    def fused(s):
        return linear_act(s[0], w, b, activation=act, residual=s[1])

    if epilogue == "gelu":
        compiled = torch.compile(lambda s: F.gelu(F.linear(s[0], w, b)))
    else:
        compiled = torch.compile(lambda s: F.linear(s[0], w, b) + s[1])
    # CUDA-graph replays: the kernels' time, not the host's launch time (~0.1-0.2 ms a call of
    # the Triton path, as long as a small GEMM: host_overhead.json)
    t = {"fused": harness.bench(fused, inputs=sets, rep=rep, cuda_graph=True),
         "compiled": harness.bench(compiled, inputs=sets, rep=rep, cuda_graph=True),
         "gemm": harness.bench(lambda s: F.linear(s[0], w, b), inputs=sets, rep=rep, cuda_graph=True)}
    x, r = sets[0][0][:512], None if sets[0][1] is None else sets[0][1][:512]
    truth, scale = _truth(x, w, b, act, r)
    s0 = (x, r)
    flops = 2 * M * N * K
    row = {"shape": name, "M": M, "K": K, "N": N, "epilogue": epilogue, "dtype": str(dtype)}
    for k, v in t.items():
        row[f"{k}_ms"] = v["median_ms"]
        row[f"{k}_tflops"] = flops / v["median_ms"] / 1e9
        row[f"{k}_pct"] = 100 * row[f"{k}_tflops"] / ceiling
    row["fused_over_compiled"] = harness.speedup(t["compiled"]["median_ms"], t["fused"]["median_ms"])
    row["err"] = (fused(s0).double() - truth).abs().max().item() / scale
    row["ref_err"] = (compiled(s0).double() - truth).abs().max().item() / scale
    row["timings"] = t
    return row


def _truth(x, w, b, act, r):
    """fp64 reference of a few rows and its scale (max |·|)."""
    truth = F.linear(x.double(), w.double(), b.double())
    truth = F.gelu(truth) if act == "gelu" else truth + r.double()
    return truth, truth.abs().max().item()


def sweep_shape(name, M, K, N, epilogue, dtype, device, rep, n_inputs, ceiling, only=None):
    """Every candidate configuration of the persistent kernel (``TMA_FLOAT_SWEEP_CONFIGS``, or
    those named in ``only``), each launched directly (no autotuner), against cuBLAS alone: ms,
    % of the ceiling, and the error on the first 512 rows against fp64 (as ``err`` above)."""
    from fastzoo.ops import int8_mm
    from fastzoo.ops.linear_act import linear_act_triton
    sets, w, b, act = _problem(M, K, N, epilogue, dtype, device, n_inputs)
    flops = 2 * M * N * K
    out_bytes, res_bytes = 2, 2 if epilogue == "residual" else 0
    x, r = sets[0][0][:512], None if sets[0][1] is None else sets[0][1][:512]
    truth, scale = _truth(x, w, b, act, r)
    row = {"shape": name, "M": M, "K": K, "N": N, "epilogue": epilogue,
           "gemm_ms": harness.bench(lambda s: F.linear(s[0], w, b), inputs=sets, rep=rep,
                                    cuda_graph=True)["median_ms"], "configs": {}}
    for cfg in int8_mm.TMA_FLOAT_SWEEP_CONFIGS:
        cname = int8_mm.tma_config_name(cfg)
        if only is not None and cname not in only:
            continue
        if int8_mm.tma_shared_bytes(cfg, out_bytes, res_bytes, 2) > int8_mm._tma_shared_limit(cfg):
            row["configs"][cname] = "shared memory"
            continue
        try:
            ms = harness.bench(lambda s: linear_act_triton(s[0], w, b, activation=act, residual=s[1], config=cfg),
                               inputs=sets, rep=rep, cuda_graph=True)["median_ms"]
            # the config's own output on 512 rows (a full-size call: the tiles' order is the real one)
            y = linear_act_triton(sets[0][0], w, b, activation=act, residual=sets[0][1], config=cfg)[:512]
            err = (y.double() - truth).abs().max().item() / scale
        except Exception as e:  # a config that does not compile or launch: recorded, skipped
            row["configs"][cname] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        row["configs"][cname] = {"ms": ms, "pct": 100 * flops / ms / 1e9 / ceiling, "err": err}
    timed = {k: v["ms"] for k, v in row["configs"].items() if isinstance(v, dict)}
    row["best"] = min(timed, key=timed.get) if timed else None
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="SAM vit_h's two linears, nothing saved")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--rep", type=int, default=30)
    p.add_argument("--inputs", type=int, default=2, help="input sets rotated between calls")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    p.add_argument("--sweep", action="store_true",
                   help="time every candidate configuration of the persistent kernel; JSON linear_act_sweep")
    p.add_argument("--configs", default=None,
                   help="with --sweep: comma-separated configuration names (tma_config_name) to time, not all")
    p.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    p.add_argument("--name", default=None, help="the results JSON's name (default linear_act / linear_act_sweep)")
    args = p.parse_args(argv)
    device = harness.require_cuda("the linear_act benchmark")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ceiling = harness.measure_matmul_tflops(dtype)
    print(f"{args.dtype} matmul ceiling {ceiling:.0f} TFLOP/s")
    shapes = [s for s in SHAPES if s[0] in ("sam_vit_h.lin1", "sam_vit_h.lin2")] if args.quick else SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = sorted(set(wanted) - {s[0] for s in SHAPES})
        if unknown:
            raise SystemExit(f"unknown --shapes {unknown}; expected names among {[s[0] for s in SHAPES]}")
        shapes = [s for s in shapes if s[0] in wanted]
    if args.configs and not args.sweep:
        p.error("--configs selects configurations of --sweep; pass --sweep too")
    if not shapes:
        p.error(f"no shape selected (--shapes {args.shapes!r} with --quick keeps only the sam_vit_h MLP linears)")
    only = None
    if args.configs:
        from fastzoo.ops import int8_mm
        only = set(args.configs.split(","))
        unknown = sorted(only - {int8_mm.tma_config_name(c) for c in int8_mm.TMA_FLOAT_SWEEP_CONFIGS})
        if unknown:
            raise SystemExit(f"unknown --configs {unknown}; expected names of TMA_FLOAT_SWEEP_CONFIGS")
    if args.sweep:
        rows = []
        for shape in shapes:
            rows.append(sweep_shape(*shape, dtype, device, args.rep, args.inputs, ceiling, only))
            r = rows[-1]
            print(f"{r['shape']:16s} cuBLAS {r['gemm_ms']:.3f} ms; best {r['best']}: "
                  + ", ".join(f"{k} {v['ms']:.3f} (err {v['err']:.1e})" if isinstance(v, dict) else f"{k} ({v[:40]})"
                              for k, v in r["configs"].items()), flush=True)
            figures = {"bf16_tflops_ceiling" if dtype == torch.bfloat16 else "fp16_tflops_ceiling": ceiling,
                       "rows": rows}
            if not args.quick:  # --quick saves nothing
                path = harness.save_result(args.name or "linear_act_sweep", figures, args, out_dir=args.out_dir)
            torch.cuda.empty_cache()
        if not args.quick:
            print("saved", path)
        return
    rows = []
    for shape in shapes:
        row = bench_shape(*shape, dtype, device, args.rep, args.inputs, ceiling)
        rows.append(row)
        print(f"{row['shape']:16s} fused {row['fused_ms']:.3f} ms ({row['fused_pct']:.0f} %), compiled "
              f"{row['compiled_ms']:.3f}, gemm {row['gemm_ms']:.3f}: {row['fused_over_compiled']:.2f}x, "
              f"err {row['err']:.1e} (compiled {row['ref_err']:.1e})", flush=True)
        torch.cuda.empty_cache()
    harness.print_table([{k: v for k, v in r.items() if k != "timings"} for r in rows],
                        ["shape", "fused_ms", "compiled_ms", "gemm_ms", "fused_over_compiled", "fused_pct", "err"])
    if not args.quick:
        figures = {"bf16_tflops_ceiling" if dtype == torch.bfloat16 else "fp16_tflops_ceiling": ceiling, "rows": rows}
        print("saved", harness.save_result(args.name or "linear_act", figures, args, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
