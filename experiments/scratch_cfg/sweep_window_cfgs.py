"""SCRATCH (experiment, reverted after): every tile configuration of _rel_pos_attention_kernel forced in
turn on SAM's windowed layers (rel_pos_window_attention, batch 16, bf16): time, registers, spills."""
import json, os, sys, time
import torch
import triton
from experiments import harness
import importlib
R = importlib.import_module("fastzoo.ops.rel_pos_attention")

out_dir = sys.argv[1]
dev, dt = "cuda", torch.bfloat16
extra = [(128, 32, 8, 3), (128, 32, 8, 2), (128, 32, 4, 2), (64, 32, 4, 2), (64, 32, 2, 3), (64, 16, 4, 3),
         (128, 16, 4, 3), (128, 16, 8, 3), (32, 32, 2, 3), (64, 32, 8, 3)]
cfgs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in R._CONFIGS] + extra
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}
kern = R._rel_pos_attention_kernel
orig = list(kern.configs)
for name, heads, D in [("vit_b.window", 12, 64), ("vit_h.window", 16, 80)]:
    g = torch.Generator(device=dev).manual_seed(0)
    sets = [(torch.randn(16, 64, 64, 3 * heads * D, device=dev, generator=g).to(dt),
             torch.randn(27, D, device=dev, generator=g).to(dt), torch.randn(27, D, device=dev, generator=g).to(dt),
             torch.randn(3 * heads * D, device=dev, generator=g).to(dt)) for _ in range(2)]
    fn = lambda s: R.rel_pos_window_attention_triton(s[0], s[1], s[2], heads, 14, None, s[3])
    kern.configs = orig
    kern.cache.clear()
    ref = fn(sets[0]).float()
    auto = str(kern.best_config)
    t_auto = harness.bench(fn, inputs=sets, rep=40)["median_ms"]
    print(name, "auto", auto, t_auto, flush=True)
    res["rows"].append({"shape": name, "config": "autotuned " + auto, "ms": t_auto})
    for bm, bn, w, st in cfgs:
        kern.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)]
        kern.cache.clear()
        row = {"shape": name, "config": f"{bm}x{bn}_w{w}_s{st}"}
        try:
            o = fn(sets[0]).float()
            row["err"] = float((o - ref).abs().max() / ref.abs().max())
            row["ms"] = harness.bench(fn, inputs=sets, rep=40)["median_ms"]
            row["ms2"] = harness.bench(fn, inputs=sets, rep=40)["median_ms"]
            try:
                for cache in kern.fn.device_caches.values():
                    for ck in cache[0].values():
                        row["n_regs"], row["n_spills"] = getattr(ck, "n_regs", None), getattr(ck, "n_spills", None)
            except Exception as e:
                row["regs_error"] = repr(e)[:200]
        except Exception as e:
            row["error"] = repr(e)[:300]
        print(row, flush=True)
        res["rows"].append(row)
    json.dump(res, open(os.path.join(out_dir, "window_cfg_sweep.json"), "w"), indent=1)
kern.configs = orig
