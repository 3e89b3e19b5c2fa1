"""ViT inference throughput: fastzoo vs timm, bf16 and int8 dynamic, on random weights.

    python -m experiments.vit_throughput [--models vit_base_patch16_224,...] [--batch 256] [--quick]

Per model: timm bf16 eager and compiled (the baseline, same weights), fastzoo bf16 eager
and compiled, fastzoo int8 dynamic (``quantize="int8dq"``) compiled. Images/s (median of
CUDA-event timings), % of the measured bf16 matmul ceiling, agreement with timm in fp32
terms (relative error of the bf16 logits, SQNR of int8). JSON: results/<gpu>/vit_throughput.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from experiments import harness
from fastzoo.quant import quantize_
from fastzoo.vit import VIT_CONFIGS, build_vit


def vit_flops(name: str) -> float:
    """Matmul FLOPs of one image's forward (linears + attention), 2 per multiply-add."""
    c = VIT_CONFIGS[name]
    n, d, h = c.num_tokens, c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    per_block = 2 * n * d * (3 * d + d + 2 * h) + 4 * n * n * d
    patch = 2 * (n - 1) * d * c.in_chans * c.patch_size**2
    return c.depth * per_block + patch + 2 * d * max(c.num_classes, 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_base_patch16_224,vit_large_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="vit_base only, few repeats")
    args = p.parse_args(argv)
    dev = harness.require_cuda("the ViT throughput benchmark")
    import timm

    models = ["vit_base_patch16_224"] if args.quick else args.models.split(",")
    rep = 10 if args.quick else 30
    ceiling = harness.measure_matmul_tflops(torch.bfloat16)
    rows = []
    for name in models:
        torch.manual_seed(0)
        ref = timm.create_model(name, pretrained=False).eval().requires_grad_(False)
        sd = {k: v.clone() for k, v in ref.state_dict().items()}
        ref = ref.to(dev, torch.bfloat16)
        res = VIT_CONFIGS[name].img_size
        xs = [torch.randn(args.batch, 3, res, res, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        with torch.no_grad():
            truth = ref.float()(xs[0].float())
            ref = ref.to(torch.bfloat16)

        def ours(quantize=None):
            m = build_vit(name, dtype=torch.float32)
            m.load_state_dict(sd, strict=True)
            m = m.to(dev, torch.bfloat16)
            if quantize:
                quantize_(m, quantize, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear)
                          and fqn.startswith("blocks."))
            return m

        variants = {
            "timm bf16 eager": ref,
            "timm bf16 compile": torch.compile(ref),
            "fastzoo bf16 eager": ours(),
            "fastzoo bf16 compile": torch.compile(ours()),
            "fastzoo int8dq compile": torch.compile(ours("int8dq")),
        }
        for label, m in variants.items():
            with torch.no_grad():
                t0 = time.perf_counter()
                out = m(xs[0])
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                t = harness.bench(m, inputs=xs, warmup=3, rep=rep)
            img_s = args.batch / (t["median_ms"] * 1e-3)
            rows.append({
                "model": name, "variant": label, "batch": args.batch, "img_s": img_s,
                "pct_bf16_ceiling": 100 * img_s * vit_flops(name) / (ceiling * 1e12),
                "first_call_s": first_s,
                "rel_err_vs_fp32": rel_err(out.float(), truth),
            })
        base = next(r["img_s"] for r in rows if r["model"] == name and r["variant"] == "timm bf16 compile")
        for r in rows:
            if r["model"] == name:
                r["speedup_vs_timm_compile"] = r["img_s"] / base
    harness.print_table(rows)
    print("saved", harness.save_result("vit_throughput", {"bf16_ceiling_tflops": ceiling, "rows": rows}, args))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


if __name__ == "__main__":
    main()
