"""Where the GPU waits within SAM image-encoder calls (GPU only): 3 calls of one configuration under
torch.profiler with CPU and CUDA activities; for the longest idle gaps between kernels, the host
(CPU) events that ran during each gap, by overlap. A diagnostic of host stalls, not a benchmark.

    python -m experiments.sam_gaps --config fz-int8static+cg      # JSON under experiments/results/<gpu>/
"""
from __future__ import annotations

import argparse

import torch

from experiments import harness
from experiments.sam_throughput import ALL_CONFIGS, build_config, idle_gaps, kernel_timeline


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b")
    p.add_argument("--config", default="fz-int8static+cg")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gaps", type=int, default=8, help="longest gaps to explain")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    if args.config.removesuffix("+cg") not in ALL_CONFIGS:
        p.error(f"--config: one of {ALL_CONFIGS} (optionally +cg), got {args.config!r}")
    device = harness.require_cuda("experiments/sam_gaps.py")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from fastzoo.sam.build import build_sam_model

    torch.manual_seed(0)
    base = build_sam_model(args.model)
    enc = build_config(args.config, args.model, base, torch.bfloat16, device)
    x = torch.randn(args.batch, 3, 1024, 1024, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(4):
            enc(x)
        torch.cuda.synchronize()
        t = harness.bench(enc, inputs=[x], warmup=2, rep=10, device=device)["median_ms"]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                enc(x)
            torch.cuda.synchronize()
    events = prof.events()
    kern = [(e.time_range.start, e.time_range.end, e.name) for e in events
            if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    timeline = kernel_timeline(kern, 3, top=args.gaps)
    _, gaps = idle_gaps(kern)
    explained = []
    for g, g0, g1, a, b in gaps[:args.gaps]:
        over = []
        for e in cpu:
            o = min(g1, e.time_range.end) - max(g0, e.time_range.start)
            if o > 0.05 * g:
                over.append((o, e.name))
        over.sort(reverse=True)
        seen, names = set(), []
        for o, n in over:
            if n not in seen:
                seen.add(n)
                names.append({"name": n[:90], "overlap_us": round(o, 1)})
            if len(names) == 12:
                break
        explained.append({"gap_us": round(g, 1), "after": a[:70], "before": b[:70], "host_events": names})
        print(f"gap {g:8.1f} us after {a[:40]} before {b[:40]}")
        for n in names:
            print(f"      {n['overlap_us']:8.1f}  {n['name']}")
    out = {"config": args.config, "median_ms_unprofiled": t, "img_per_s_unprofiled": args.batch / t * 1e3,
           "timeline": timeline, "gaps": explained}
    print(f"unprofiled {out['img_per_s_unprofiled']:.1f} img/s; profiled span {timeline['span_ms_per_call']:.2f} "
          f"ms a call, kernels {timeline['busy_ms_per_call']:.2f}, idle {timeline['idle_ms_per_call']:.2f}")
    name = f"sam_gaps_{args.model}_{args.config.replace('+', '_')}"
    print("saved", harness.save_result(name, out, args, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
