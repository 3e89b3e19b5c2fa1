"""Kernels a compiled forward launches, fastzoo ViT vs timm (same weights, bf16, GPU only):
their count, the host's wall time per call without CUDA graphs, and the top kernels by GPU
time. Shows where a small-batch forward's host time goes."""
from __future__ import annotations

import argparse
import collections
import copy
import time

import torch

from experiments import harness
from fastzoo.vit import VIT_CONFIGS, build_vit


def main(argv=None):
    import timm

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--host-profile", action="store_true", help="cProfile 20 calls of each compiled model")
    args = p.parse_args(argv)
    dev = harness.require_cuda("experiments/vit_kernel_count.py")
    ref = timm.create_model(args.model, pretrained=False).eval().requires_grad_(False)
    fz = build_vit(args.model)
    fz.load_state_dict(ref.state_dict(), strict=True)
    res = VIT_CONFIGS[args.model].img_size
    x = torch.randn(args.batch, 3, res, res, device=dev, dtype=torch.bfloat16)
    out = {}
    for name, m in (("timm", ref), ("fastzoo", fz)):
        cm = torch.compile(copy.deepcopy(m).to(dev, torch.bfloat16))
        with torch.no_grad():
            for _ in range(3):
                cm(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                cm(x)
            host_ms = (time.perf_counter() - t0) / 20 * 1e3
            torch.cuda.synchronize()
            if args.host_profile:
                table = harness.host_profile(lambda: cm(x), 20, sort="tottime", lines=18)
                print(f"--- {name}: cProfile of 20 calls, by own time\n" + table[:5000])
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                cm(x)
                torch.cuda.synchronize()
        kernels = collections.Counter()
        gpu_us = collections.Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name] += 1
                gpu_us[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        out[name] = {"host_ms_per_call": host_ms, "kernels": sum(kernels.values()),
                     "gpu_ms": sum(gpu_us.values()) / 1e3,
                     "top": [(k[:90], kernels[k], round(v / 1e3, 3)) for k, v in gpu_us.most_common(12)]}
        print(name, {k: v for k, v in out[name].items() if k != "top"})
        for row in out[name]["top"]:
            print("   ", row)
    print("saved", harness.save_result(f"vit_kernel_count_{args.model}_b{args.batch}", out, args, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
