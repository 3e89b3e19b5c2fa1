"""Where the GPU waits within SAM image-encoder calls (GPU only), for one configuration: its call
time as the throughput benchmark takes it (median of 10 back-to-back calls), the same with Python's
garbage collector off, the host's time to issue one call while the GPU is busy (above the GPU's
time a call, back-to-back calls run at the host's pace), and 3 calls under torch.profiler with
CPU and CUDA activities: kernel and idle time, and for the longest idle gaps the host (CPU)
events that ran during each, by overlap. A diagnostic of host stalls, not a benchmark.

    python -m experiments.sam_gaps --config fz-int8static+cg      # JSON under experiments/results/<gpu>/
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from experiments import harness
from experiments.sam_throughput import build_config, config_error, idle_gaps, kernel_timeline, random_sam
from fastzoo.sam.build import SAM_CONFIGS


def host_ms_per_call(enc, x, calls: int = 3) -> float:
    """Host time to issue one call while the GPU is busy with a long sleep, so that no launch
    waits for it (the median of ``calls``): above the GPU time of a call, back-to-back calls run
    at the host's pace."""
    times = []
    for _ in range(calls):
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued ahead of the call
        t0 = time.perf_counter()
        enc(x)
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b", help=f"one of {sorted(SAM_CONFIGS)}")
    p.add_argument("--config", default="fz-int8static+cg")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gaps", type=int, default=8, help="longest gaps to explain (at least 1)")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    if config_error(args.config):
        p.error(f"--config {config_error(args.config)}")
    if args.model not in SAM_CONFIGS:
        p.error(f"--model expects one of {sorted(SAM_CONFIGS)}, got {args.model!r}")
    if args.gaps < 1 or args.batch < 1:
        p.error(f"--gaps and --batch expect at least 1, got {args.gaps} and {args.batch}")
    device = harness.require_cuda("experiments/sam_gaps.py")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    enc = build_config(args.config, args.model, random_sam(args.model), torch.bfloat16, device)
    x = torch.randn(args.batch, 3, 1024, 1024, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(4):
            enc(x)
        torch.cuda.synchronize()
        t = harness.bench(enc, inputs=[x], warmup=2, rep=10, device=device)["median_ms"]
        gc.disable()  # the same timing without Python's garbage collector
        try:
            t_nogc = harness.bench(enc, inputs=[x], warmup=2, rep=10, device=device)["median_ms"]
        finally:
            gc.enable()
        host = host_ms_per_call(enc, x)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                enc(x)
            torch.cuda.synchronize()
    events = prof.events()
    kern = [(e.time_range.start, e.time_range.end, e.name) for e in events
            if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    if not kern:
        raise SystemExit("error: the profiler recorded no CUDA kernels")
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
           "median_ms_unprofiled_gc_off": t_nogc, "host_ms_per_call": host, "timeline": timeline,
           "gaps": explained}
    print(f"unprofiled {out['img_per_s_unprofiled']:.1f} img/s ({t:.2f} ms a call; {t_nogc:.2f} with the garbage "
          f"collector off); the host issues a call in {host:.2f} ms; profiled span {timeline['span_ms_per_call']:.2f} "
          f"ms a call, kernels {timeline['busy_ms_per_call']:.2f}, idle {timeline['idle_ms_per_call']:.2f}")
    name = f"sam_gaps_{args.model}_{args.config.replace('+', '_')}"
    print("saved", harness.save_result(name, out, args, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
