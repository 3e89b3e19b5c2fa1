"""SCRATCH: where the window kernel's time goes: padding, grid addressing, rel table (H100)."""
import json, os, sys
import torch, triton
from experiments import harness
import scratch_relpos as S
from fastzoo.ops.rel_pos_attention import rel_pos_window_attention_triton, rel_pos_attention_triton, _rel_pos_attention_kernel

out_dir = sys.argv[1]
dev = "cuda"; dt = torch.bfloat16; B = 16; heads = 12; D = 64; win = 14
g = torch.Generator(device=dev).manual_seed(0)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
def mk(side):
    return [(torch.randn(B, side, side, 3 * heads * D, device=dev, generator=g).to(dt),
             torch.randn(2 * win - 1, D, device=dev, generator=g).to(dt),
             torch.randn(2 * win - 1, D, device=dev, generator=g).to(dt),
             torch.randn(3 * heads * D, device=dev, generator=g).to(dt)) for _ in range(2)]
for side in (64, 70):
    sets = mk(side)
    f = lambda s: rel_pos_window_attention_triton(s[0], s[1], s[2], heads, win, None, s[3])
    f(sets[0])
    res[f"grid{side}"] = [harness.bench(f, inputs=sets, rep=40)["median_ms"] for _ in range(2)]
    res[f"grid{side}_cfg"] = str(_rel_pos_attention_kernel.best_config)
    for fold in (0, 1):
        f = lambda s: S.window_attention_var(s[0], s[1], s[2], heads, win, None, s[3], fold=bool(fold))
        f(sets[0])
        res[f"var{side}_fold{fold}"] = [harness.bench(f, inputs=sets, rep=40)["median_ms"] for _ in range(2)]
        res[f"var{side}_fold{fold}_cfg"] = str(S._var_kernel.best_config)
    # the S bmm alone
    def bmm_only(s):
        qkv = s[0]; t = torch.cat([s[1], s[2]]); t = torch.nn.functional.pad(t, (0, 0, 0, (-t.shape[0]) % 8))
        qh = qkv.reshape(-1, 3, heads, D)[:, 0].transpose(0, 1)
        return torch.bmm(qh, t.t().expand(heads, D, t.shape[0]))
    res[f"bmm{side}"] = harness.bench(bmm_only, inputs=sets, rep=40)["median_ms"]
    print(res, flush=True)
    del sets
# flat: pre-partitioned windows, precomputed rel terms
Bw = B * 25
fl = []
for i in range(2):
    qkv = torch.randn(Bw, 196, 3, heads, D, device=dev, generator=g).to(dt)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    rh = torch.randn(Bw, heads, 196, 14, device=dev, generator=g).to(dt)
    rw = torch.randn(Bw, heads, 196, 14, device=dev, generator=g).to(dt)
    fl.append((q, k, v, rh, rw))
f = lambda s: rel_pos_attention_triton(*s)
f(fl[0])
res["flat"] = [harness.bench(f, inputs=fl, rep=40)["median_ms"] for _ in range(2)]
res["flat_cfg"] = str(_rel_pos_attention_kernel.best_config)
sd = lambda s: torch.nn.functional.scaled_dot_product_attention(s[0], s[1], s[2])
res["flash"] = [harness.bench(sd, inputs=fl, rep=40)["median_ms"] for _ in range(2)]
print(res, flush=True)
json.dump(res, open(os.path.join(out_dir, "pad.json"), "w"), indent=1)
