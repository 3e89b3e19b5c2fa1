"""One forced-configuration launch of the persistent int8 GEMM between cudaProfilerStart/Stop,
for Nsight Compute (GPU only)::

    ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python -m experiments.profile_int8_mm --shape vit_b.proj --variant bare \\
        --config 128x128x128_w4_s3_o2_sub2_flat

Shapes and epilogue variants are ``bench_int8_mm --sweep``'s (SAM vit_b / vit_h and ViT-L
linears; bare / dyn / static); several ``--shape`` values profile one launch each."""
from __future__ import annotations

import argparse

import torch

from experiments import harness
from experiments.bench_int8_mm import SWEEP_SHAPES, SWEEP_VARIANTS, _case_spec, _spec_args
from fastzoo.ops import int8_mm
from fastzoo.ops.quantize_rows import quantize_rows_int8


def main(argv: list[str] | None = None) -> None:
    linears = {name: (tokens, n, k) for tokens, lin in SWEEP_SHAPES.values() for name, (n, k) in lin.items()}
    configs = {int8_mm.tma_config_name(c): c for c in int8_mm.TMA_SWEEP_CONFIGS}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", required=True, choices=sorted(linears))
    p.add_argument("--variant", default="bare", choices=SWEEP_VARIANTS)
    p.add_argument("--config", required=True, choices=sorted(configs))
    args = p.parse_args(argv)
    device = harness.require_cuda("experiments/profile_int8_mm.py")
    cfg = configs[args.config]
    for shape in args.shape:
        M, N, K = linears[shape]
        spec = _case_spec(shape, args.variant)
        g = torch.Generator(device=device).manual_seed(0)
        a, a_s_tok = quantize_rows_int8(torch.randn(M, K, device=device, generator=g).to(torch.bfloat16))
        b, b_s = quantize_rows_int8(torch.randn(N, K, device=device, generator=g).to(torch.bfloat16))
        bias = torch.randn(N, device=device, generator=g).to(torch.bfloat16)
        residual = torch.randn(M, N, device=device, generator=g).to(torch.bfloat16)
        a_s, out_dtype, kw = _spec_args(spec, a_s_tok, device, residual)
        o_s = torch.full((N if spec["out_scale"] == "channel" else 1,), 0.05, device=device) \
            if spec["out_scale"] else None
        out = torch.empty(M, N, dtype=out_dtype, device=device)

        def run():
            int8_mm._int8_scaled_mm_tma_launch(a, b, a_s.reshape(-1), b_s.reshape(-1), bias, out, kw["residual"], o_s,
                                               kw["activation"], config=cfg)

        ms = harness.bench(run, rep=20, cuda_graph=True)["median_ms"]  # kernel time, not the host's launch
        print(f"{shape} {args.variant} {args.config}: {ms:.3f} ms, {2 * M * N * K / ms / 1e9:.0f} TOP/s", flush=True)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
