"""SCRATCH: the small-window kernel vs fastzoo's window attention (H100)."""
import json, os, sys, time
import torch, triton
from experiments import harness
import scratch_relpos as S
from fastzoo.ops.rel_pos_attention import rel_pos_window_attention_triton, rel_pos_window_attention_ref, _rel_pos_attention_kernel

out_dir = sys.argv[1]
dev = "cuda"; dt = torch.bfloat16; B = 16
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}
for name, heads, D, win in [("vit_b.window", 12, 64, 14), ("vit_h.window", 16, 80, 14)]:
    g = torch.Generator(device=dev).manual_seed(0)
    sets = [(torch.randn(B, 64, 64, 3 * heads * D, device=dev, generator=g).to(dt),
             torch.randn(2 * win - 1, D, device=dev, generator=g).to(dt),
             torch.randn(2 * win - 1, D, device=dev, generator=g).to(dt),
             torch.randn(3 * heads * D, device=dev, generator=g).to(dt)) for _ in range(2)]
    s0 = sets[0]
    base = rel_pos_window_attention_triton(s0[0], s0[1], s0[2], heads, win, None, s0[3])
    truth = rel_pos_window_attention_ref(s0[0][:1].float(), s0[1].float(), s0[2].float(), heads, win, None, s0[3].float())
    err = lambda o: float((o[:1].float() - truth).abs().max() / truth.abs().max())
    row = {"shape": name, "base_cfg": str(_rel_pos_attention_kernel.best_config), "base_err": err(base)}
    base_fn = lambda s: rel_pos_window_attention_triton(s[0], s[1], s[2], heads, win, None, s[3])
    row["base_ms"] = harness.bench(base_fn, inputs=sets, rep=40)["median_ms"]
    fn = lambda s: S.window_small(s[0], s[1], s[2], heads, win, None, s[3])
    o = fn(s0)
    row["small_err"] = err(o)
    row["small_vs_base"] = float((o.float() - base.float()).abs().max() / base.float().abs().max())
    row["small_cfg"] = str(S._small_window_kernel.best_config)
    row["small_ms"] = harness.bench(fn, inputs=sets, rep=40)["median_ms"]
    print(name, row, flush=True)
    per = {}
    for c in S._small_cfgs():
        key = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}_w{c.num_warps}_s{c.num_stages}"
        try:
            f = lambda s, c=c: S.window_small(s[0], s[1], s[2], heads, win, None, s[3], cfg=c)
            o = f(s0)
            per[key] = [harness.bench(f, inputs=sets, rep=30)["median_ms"], err(o)]
        except Exception as e:
            per[key] = repr(e)[:200]
        print(name, key, per[key], flush=True)
    row["per_cfg"] = per
    row["base_ms2"] = harness.bench(base_fn, inputs=sets, rep=40)["median_ms"]
    row["small_ms2"] = harness.bench(fn, inputs=sets, rep=40)["median_ms"]
    print(name, "base", row["base_ms"], row["base_ms2"], "small", row["small_ms"], row["small_ms2"], flush=True)
    res["rows"].append(row)
    json.dump(res, open(os.path.join(out_dir, "small_window.json"), "w"), indent=1)
