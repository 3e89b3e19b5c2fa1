"""SCRATCH: top kernels of ViT-L/16-224 b512, fz-bf16-compile vs fz-int8static / int8dq (H100)."""
import json, os, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from experiments import harness
from experiments.vit_throughput import build_models

out_dir = sys.argv[1]
dev = torch.device("cuda")
name, B = "vit_large_patch16_224", 512
modes = ["fz-bf16-compile", "fz-int8static", "fz-int8dq", "fz-int8static-sdpa"]
models = build_models(name, modes, dev)
x = [torch.randn(B, 3, 224, 224, device=dev).to(torch.bfloat16) for _ in range(2)]
res = {}
for m in modes:
    enc = models[m]
    with torch.inference_mode():
        enc(x[0]); enc(x[1]); torch.cuda.synchronize()
        t = harness.bench(enc, inputs=x, warmup=2, rep=10)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                enc(x[0])
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    rows = [{"kernel": e.key[:140], "pct": 100 * e.self_device_time_total / total,
             "ms": e.self_device_time_total / 3 / 1e3, "n": e.count / 3} for e in events[:16]]
    res[m] = {"ms": t["median_ms"], "kernel_total_ms": total / 3 / 1e3, "top": rows}
    print(m, t["median_ms"], "kernels", total / 3 / 1e3, flush=True)
    for r in rows:
        print(f"   {r['pct']:5.1f}% {r['ms']:7.2f} ms x{r['n']:.0f} {r['kernel']}", flush=True)
    json.dump(res, open(os.path.join(out_dir, "vit_prof.json"), "w"), indent=1)
