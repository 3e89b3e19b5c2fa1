import torch, triton
import scratch_relpos as S
dev = "cuda"; dt = torch.bfloat16; B = 16; heads = 12; D = 64
g = torch.Generator(device=dev).manual_seed(0)
runs = []
for win, cfg in [(0, (64, 64, 4, 3)), (0, (128, 64, 8, 2)), (14, (128, 32, 4, 3))]:
    x = (torch.randn(B, 64, 64, 3 * heads * D, device=dev, generator=g).to(dt),
         torch.randn(2 * (win or 64) - 1, D, device=dev, generator=g).to(dt),
         torch.randn(2 * (win or 64) - 1, D, device=dev, generator=g).to(dt),
         torch.randn(3 * heads * D, device=dev, generator=g).to(dt))
    c = triton.Config({"BLOCK_M": cfg[0], "BLOCK_N": cfg[1]}, num_warps=cfg[2], num_stages=cfg[3])
    for fold in (False, True):
        f = lambda: S.window_attention_var(x[0], x[1], x[2], heads, win, None, x[3], fold=fold, cfg=c)
        # .fn launch takes num_warps/num_stages as kwargs
        runs.append((win, cfg, fold, x, c))
def go(win, cfg, fold, x, c):
    import scratch_relpos as S2
    return S2.window_attention_var(x[0], x[1], x[2], heads, win, None, x[3], fold=fold, cfg=c)
for r in runs:
    go(*r); go(*r)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for r in runs:
    print("launch", r[0], r[1], r[2], flush=True)
    go(*r)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
