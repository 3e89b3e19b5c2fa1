"""SCRATCH: time _var_kernel variants vs fastzoo's rel_pos_window_attention (H100)."""
import json, os, sys, time, traceback
import torch
from experiments import harness
import scratch_relpos as S
from fastzoo.ops.rel_pos_attention import rel_pos_window_attention_triton, rel_pos_window_attention_ref, _rel_pos_attention_kernel

out_dir = sys.argv[1]
dev = "cuda"
dt = torch.bfloat16
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
import triton; res["triton"] = triton.__version__
shapes = [("vit_b.global", 12, 64, 0), ("vit_b.window", 12, 64, 14)] + ([("vit_h.global", 16, 80, 0)] if len(sys.argv) > 2 else [])
B = 16
rows = []
for name, heads, D, win in shapes:
    g = torch.Generator(device=dev).manual_seed(0)
    sets = [(torch.randn(B, 64, 64, 3 * heads * D, device=dev, generator=g).to(dt),
             torch.randn(2 * (win or 64) - 1, D, device=dev, generator=g).to(dt),
             torch.randn(2 * (win or 64) - 1, D, device=dev, generator=g).to(dt),
             torch.randn(3 * heads * D, device=dev, generator=g).to(dt)) for _ in range(2)]
    s0 = sets[0]
    base = rel_pos_window_attention_triton(s0[0], s0[1], s0[2], heads, win, None, s0[3])
    truth = rel_pos_window_attention_ref(*(x[:1].float() if i == 0 else x.float() for i, x in enumerate(s0[:3])), heads, win, None, s0[3].float())
    err = lambda o: float((o[:1].float() - truth).abs().max() / truth.abs().max())
    row = {"shape": name, "base_cfg": str(_rel_pos_attention_kernel.best_config), "base_err": err(base)}
    t = harness.bench(lambda s: rel_pos_window_attention_triton(s[0], s[1], s[2], heads, win, None, s[3]), inputs=sets, rep=40)
    row["base_ms"] = t["median_ms"]
    variants = [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]
    if win == 0:
        variants += [(0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)]
    for fold, tma, ws in variants:
        key = f"f{fold}t{tma}w{ws}"
        t0 = time.time()
        try:
            fn = lambda s: S.window_attention_var(s[0], s[1], s[2], heads, win, None, s[3], fold=bool(fold), tma=bool(tma), ws=bool(ws))
            o = fn(s0)
            row[key + "_err"] = err(o)
            row[key + "_vs_base"] = float((o.float() - base.float()).abs().max() / base.float().abs().max())
            row[key + "_cfg"] = str(S._var_kernel.best_config)
            row[key + "_ms"] = harness.bench(fn, inputs=sets, rep=40)["median_ms"]
            row[key + "_ms2"] = harness.bench(fn, inputs=sets, rep=40)["median_ms"]
        except Exception as e:
            row[key + "_error"] = repr(e)[:400]
        row[key + "_wall"] = time.time() - t0
        print(name, key, {k: v for k, v in row.items() if k.startswith(key)}, flush=True)
    row["base_ms2"] = harness.bench(lambda s: rel_pos_window_attention_triton(s[0], s[1], s[2], heads, win, None, s[3]), inputs=sets, rep=40)["median_ms"]
    print(name, "base", row["base_ms"], row["base_ms2"], row["base_cfg"], flush=True)
    rows.append(row)
    res["rows"] = rows
    json.dump(res, open(os.path.join(out_dir, "relpos_var.json"), "w"), indent=1)
