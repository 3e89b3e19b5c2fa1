"""Tile sweep of the Hopper Gluon int8 GEMM (``fastzoo.ops.int8_mm_gluon``) against the ``tl``
persistent kernel (autotuned), ``torch._int_mm`` and the bf16 matmul, at ViT-L (M = 512·197)
and SAM vit_b (M = 16·64·64) linears, bare epilogue (per-row and per-column scales, bf16 out;
``--bias``: and a bias, in the bf16 linear too, as in the ≥ 1.6× goal's measure).
CUDA-graph replays, median of repeats; every output checked against the reference.

    python -m experiments.sweep_int8_mm_gluon [--configs NAME,...] [--shapes NAME,...] [--bias] [--name NAME] [--out-dir DIR]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from experiments import harness

SHAPES = [("vit_l.qkv", 100864, 3072, 1024), ("vit_l.proj", 100864, 1024, 1024), ("vit_l.fc1", 100864, 4096, 1024),
          ("vit_l.fc2", 100864, 1024, 4096), ("vit_b.qkv", 65536, 2304, 768), ("vit_b.lin1", 65536, 3072, 768),
          ("vit_b.lin2", 65536, 768, 3072), ("vit_b.proj", 65536, 768, 768), ("odd", 4133, 200, 336)]
CONFIGS = {
    "g128x256x128_s3_w8_n2": dict(block=(128, 256, 128), stages=3, warps=8),
    "g128x256x128_s3_w8_n2_g16": dict(block=(128, 256, 128), stages=3, warps=8, group=16),
    "g128x256x128_s3_w8_n2_g4": dict(block=(128, 256, 128), stages=3, warps=8, group=4),
    "g128x256x64_s6_w8_n2": dict(block=(128, 256, 64), stages=6, warps=8),
    "g128x256x64_s5_w8_n2": dict(block=(128, 256, 64), stages=5, warps=8),
    # ping-pong (a producer warp, two consumer warpgroups on alternate tiles; the other keys, registers
    # included, from PINGPONG_CONFIG)
    "pp128x128x128_s4": dict(block=(128, 128, 128), stages=4, pingpong=True),
    "pp128x128x128_s5": dict(block=(128, 128, 128), stages=5, pingpong=True),
    "pp128x128x128_s4_g16": dict(block=(128, 128, 128), stages=4, group=16, pingpong=True),
    "pp128x128x64_s8": dict(block=(128, 128, 64), stages=8, pingpong=True),
    "pp128x128x64_s10": dict(block=(128, 128, 64), stages=10, pingpong=True),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES), help="comma-separated shape names")
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--bias", action="store_true", help="a bias in the epilogue (and in the bf16 linear): the goal's case")
    p.add_argument("--name", default="int8_mm_gluon_sweep", help="the results JSON's name")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    bad = [c for c in configs if c not in CONFIGS] + [s for s in args.shapes.split(",") if s not in {x[0] for x in SHAPES}]
    if bad or not shapes or not configs:
        raise SystemExit(f"error: unknown or empty --configs / --shapes {bad}; known: {list(CONFIGS)}, "
                         f"{[s[0] for s in SHAPES]}")
    dev = harness.require_cuda("the Gluon int8 GEMM sweep")
    from fastzoo.ops.int8_mm import int8_scaled_mm_ref, int8_scaled_mm_triton
    from fastzoo.ops.int8_mm_gluon import gluon_available, int8_mm_gluon_launch
    from fastzoo.ops.quantize_rows import quantize_rows_int8

    if not gluon_available() or torch.cuda.get_device_capability(dev)[0] != 9:
        raise SystemExit("error: the Gluon kernel needs a Hopper GPU (capability 9.x) and Triton >= 3.5 with Gluon")
    rows = []
    for name, M, N, K in shapes:
        g = torch.Generator(device=dev).manual_seed(N + K)
        xs = [torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16) for _ in range(2)]
        w = (torch.randn(N, K, device=dev, generator=g) * K**-0.5).to(torch.bfloat16)
        w_q, w_s = quantize_rows_int8(w)
        w_s = w_s.reshape(N)
        qs = [(a, s.reshape(-1)) for a, s in (quantize_rows_int8(x) for x in xs)]
        bias = torch.randn(N, device=dev, generator=g).to(torch.bfloat16) if args.bias else None
        ref = int8_scaled_mm_ref(qs[0][0], w_q, qs[0][1], w_s, bias).float()
        ops = 2.0 * M * N * K

        def tops(fn, inputs):
            return ops / harness.bench(fn, inputs=inputs, rep=args.rep, cuda_graph=True)["median_ms"] / 1e9

        row = {"shape": name, "M": M, "N": N, "K": K,
               "bf16_tflops": tops(lambda x: F.linear(x, w, bias), xs),
               "tl_tops": tops(lambda q: int8_scaled_mm_triton(q[0], w_q, q[1], w_s, bias, gluon=False), qs),
               "int_mm_tops": tops(lambda q: torch._int_mm(q[0], w_q.t()), qs), "gluon": {}}

        def gluon(q, cfg):
            out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
            return int8_mm_gluon_launch(q[0], w_q, q[1], w_s, bias, out, None, None, "none", config=cfg,
                                        return_kernel=True)

        for cname in configs:
            try:
                out, kern = gluon(qs[0], CONFIGS[cname])
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                t = tops(lambda q: gluon(q, CONFIGS[cname])[0], qs)
                row["gluon"][cname] = {"tops": t, "vs_bf16": t / row["bf16_tflops"], "vs_tl": t / row["tl_tops"],
                                       "max_rel_err": err, "regs": kern.n_regs, "spills": kern.n_spills,
                                       "shared": kern.metadata.shared}
            except Exception as e:  # a tile that does not compile or fit: recorded, the sweep goes on
                row["gluon"][cname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        ok = {k: v["tops"] for k, v in row["gluon"].items() if "tops" in v and v["max_rel_err"] < 1e-2}
        row["best"] = max(ok, key=ok.get) if ok else None
        print(name, f"bf16 {row['bf16_tflops']:.0f}", f"tl {row['tl_tops']:.0f}",
              " ".join(f"{k}={v.get('tops', float('nan')):.0f}" for k, v in row["gluon"].items()), flush=True)
        rows.append(row)
    print("saved", harness.save_result(args.name, {"rows": rows, "configs": CONFIGS}, args,
                                       out_dir=args.out_dir))


if __name__ == "__main__":
    main()
