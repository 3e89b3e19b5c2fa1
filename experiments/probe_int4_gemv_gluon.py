"""Ablations of the Gluon int4 GEMV on Llama-2-7B shapes, one row, group 128 (H100 probe, not a
benchmark of record): each variant timed in a CUDA graph of 20 launches over 4 rotated weight copies.

    python experiments/probe_int4_gemv_gluon.py time    # tl vs each Gluon candidate + a streaming read
    python experiments/probe_int4_gemv_gluon.py tiled   # weights re-laid out per program tile (contiguous TMA boxes)
    python experiments/probe_int4_gemv_gluon.py dry     # ring only (dry=1), ring + smem reads + mma (dry=2), wide boxes
    python experiments/probe_int4_gemv_gluon.py stage   # x staged in shared memory, scales/zeros prefetched to L1
    python experiments/probe_int4_gemv_gluon.py w1      # one-warp programs
    python experiments/probe_int4_gemv_gluon.py ns      # without the Σx mma (dry=3: wrong results, timing only)
    ncu ... python experiments/probe_int4_gemv_gluon.py ncu2

The config keys dry / tiled / stage_x / szpf exist only in this commit's kernel (experiment switches).
"""
import json, sys, os, statistics
import torch, triton, triton.language as tl
from fastzoo.ops import weight_only_linear as wol
from fastzoo.ops import int4_gemv_gluon as ig
dev = torch.device("cuda")
SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}
COPIES = 4

@triton.jit
def _stream_kernel(w_ptr, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.int32)
    base = pid * BLOCK * ITERS
    for i in range(ITERS):
        acc += tl.load(w_ptr + base + i * BLOCK + offs)
    tl.store(out_ptr + pid * BLOCK + offs, acc)

def data(N, K):
    out = []
    for _ in range(COPIES):
        w = torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8)
        s, z = [(torch.rand(N, K // 128, device=dev) * 0.02).bfloat16() for _ in range(2)]
        x = torch.randn(1, K, device=dev).bfloat16()
        out.append((x, w, s, z))
    return out

def graph_time(fn, ds, reps=5):
    for d in ds: fn(d)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for d in ds: fn(d)
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (reps * len(ds)))
    return statistics.median(ts)

def gcfg(bn, w, sk, st, sg, **kw):
    return dict(GLUON=True, block_n=bn, warps=w, split_k=sk, stages=st, segs=sg, **kw)

def variants(N, K):
    v = {"tl": dict(gluon=False), "auto": {}}
    cands = ig.candidates(N, K, 132)
    for c in cands:
        v["g" + "_".join(str(c[k]) for k in ("block_n", "warps", "split_k", "stages", "segs"))] = dict(config=dict(GLUON=True, **c))
    extra = [(64, 4, 4, 12, 1), (128, 8, 2, 8, 1), (32, 2, 4, 8, 1), (64, 2, 4, 8, 1), (128, 4, 1, 12, 1),
             (64, 4, 2, 16, 1), (128, 4, 2, 16, 1), (256, 8, 1, 8, 1), (256, 4, 1, 8, 1)]
    for e in extra:
        name = "g" + "_".join(map(str, e))
        if name not in v:
            v[name] = dict(config=gcfg(*e))
    return v

def main():
    mode = sys.argv[1]
    res = {}
    if mode == "time":
        for n, (N, K) in SHAPES.items():
            ds = data(N, K)
            nbytes = N * K // 2 + 2 * N * (K // 128) * 2
            w32 = [d[1].view(torch.int32).view(-1) for d in ds]
            o = torch.empty(1 << 22, dtype=torch.int32, device=dev)
            BL, IT = 1024, 16
            def stream(d, i=[0]):
                w = w32[i[0] % COPIES]; i[0] += 1
                _stream_kernel[(w.numel() // (BL * IT),)](w, o, BLOCK=BL, ITERS=IT, num_warps=4)
            row = {"stream": graph_time(stream, ds)}
            for name, kw in variants(N, K).items():
                try:
                    row[name] = graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, **kw), ds)
                except Exception as e:
                    row[name] = f"ERR {type(e).__name__}: {str(e)[:100]}"
            row["auto_cfg"] = str(ig._TUNED)
            res[n] = row
            floor = nbytes / 3.009e12 * 1e6
            print(n, f"floor {floor:.1f}us", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k != "auto_cfg"}, flush=True)
        print(ig._TUNED)
        json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "prof_g4.json"), "w"), indent=1)
    else:  # ncu: shape name, then variants
        n = mode
        N, K = SHAPES[n]
        ds = data(N, K)
        vs = variants(N, K)
        names = sys.argv[2].split(",")
        for name in names:
            for d in ds: wol.int4_weight_only_linear_triton(*d, 128, **vs[name])
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for name in names:
            wol.int4_weight_only_linear_triton(*ds[1], 128, **vs[name])
            torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()

if sys.argv[1] not in ("tiled", "dry", "stage", "w1", "ns", "ncu2"):
    main()

@triton.jit
def _pattern_kernel(w_ptr, out_ptr, KW, n_seg, BN: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)[:, None]
    cols = tl.arange(0, 16)[None, :]
    acc = tl.zeros((BN, 16), tl.int32)
    for j in range(n_seg):
        acc += tl.load(w_ptr + rows * KW + j * 16 + cols)
    tl.store(out_ptr + pid * BN * 16 + tl.arange(0, BN)[:, None] * 16 + cols, acc)

def tile(w, bn):
    N, Kh = w.shape
    w32 = w.view(torch.int32)
    n_seg = Kh * 2 // 128
    return w32.view(N // bn, bn, n_seg, 16).permute(0, 2, 1, 3).contiguous().view(N, Kh // 4).view(torch.uint8)

def main_tiled():
    res = {}
    for n, (N, K) in SHAPES.items():
        ds = data(N, K)
        o = torch.empty(1 << 23, dtype=torch.int32, device=dev)
        row = {}
        for bn in (64, 128):
            w32 = [d[1].view(torch.int32) for d in ds]
            def pat(d, i=[0]):
                w = w32[i[0] % COPIES]; i[0] += 1
                _pattern_kernel[(N // bn,)](w, o, K // 8, K // 128, BN=bn, num_warps=4)
            row[f"pattern{bn}"] = graph_time(pat, ds)
        cfgs = [c for c in ig.candidates(N, K, 132)] + [dict(block_n=64, warps=4, split_k=s, stages=st, segs=sg) for s in (1, 2, 4) for st, sg in ((8, 1), (4, 2), (6, 2))] + [dict(block_n=128, warps=8, split_k=s, stages=4, segs=2) for s in (1, 2, 4)]
        seen = set()
        for c in cfgs:
            key = "_".join(str(c[k]) for k in ("block_n", "warps", "split_k", "stages", "segs"))
            if key in seen: continue
            seen.add(key)
            bn = c["block_n"]
            dt = [(x, tile(w, bn), s, z) for (x, w, s, z) in ds]
            try:
                row["g" + key] = graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, config=dict(GLUON=True, **c)), ds)
                row["t" + key] = graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, config=dict(GLUON=True, tiled=True, **c)), dt)
                a = wol.int4_weight_only_linear_triton(*ds[0], 128, config=dict(GLUON=True, **c))
                b = wol.int4_weight_only_linear_triton(*dt[0], 128, config=dict(GLUON=True, tiled=True, **c))
                row["same" + key] = bool(torch.equal(a, b))
            except Exception as e:
                row["g" + key] = f"ERR {type(e).__name__}: {str(e)[:100]}"
        res[n] = row
        print(n, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "prof_g4_tiled.json"), "w"), indent=1)

if __name__ == "__main__" and sys.argv[1] == "tiled":
    main_tiled()

BEST = {"wqkv": [(64, 4, 2, 4, 2), (64, 4, 2, 8, 1), (128, 4, 1, 8, 1)], "wo": [(128, 4, 8, 4, 2), (64, 4, 4, 8, 1)],
        "w13": [(64, 4, 1, 4, 2), (64, 4, 1, 8, 1), (128, 4, 1, 8, 1)], "w2": [(64, 4, 4, 4, 2), (64, 4, 4, 8, 1), (32, 2, 4, 8, 1)]}

def main_dry():
    res = {}
    for n, (N, K) in SHAPES.items():
        ds = data(N, K)
        row = {}
        for c in BEST[n]:
            key = "_".join(map(str, c))
            c = dict(GLUON=True, block_n=c[0], warps=c[1], split_k=c[2], stages=c[3], segs=c[4])
            dt = [(x, tile(w, c["block_n"]), s, z) for (x, w, s, z) in ds]
            for var, extra, dd in (("plain", {}, ds), ("t1", dict(tiled=1), dt), ("t4", dict(tiled=4), dt),
                                   ("dry1", dict(dry=1), ds), ("dry2", dict(dry=2), ds), ("dry1t4", dict(dry=1, tiled=4), dt),
                                   ("dry2t4", dict(dry=2, tiled=4), dt)):
                try:
                    row[f"{var}_{key}"] = graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, config=dict(c, **extra)), dd)
                except Exception as e:
                    row[f"{var}_{key}"] = f"ERR {type(e).__name__}: {str(e)[:200]}"
            a = wol.int4_weight_only_linear_triton(*ds[0], 128, config=c)
            b = wol.int4_weight_only_linear_triton(*dt[0], 128, config=dict(c, tiled=4))
            row["same_t4_" + key] = bool(torch.equal(a, b))
        res[n] = row
        print(n, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "prof_g4_dry.json"), "w"), indent=1)

if __name__ == "__main__" and sys.argv[1] == "dry":
    main_dry()

def main_stage():
    res = {}
    for n, (N, K) in SHAPES.items():
        ds = data(N, K)
        row = {"tl": graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, gluon=False), ds)}
        for c in BEST[n][:2]:
            key = "_".join(map(str, c))
            c = dict(GLUON=True, block_n=c[0], warps=c[1], split_k=c[2], stages=c[3], segs=c[4])
            for var, extra in (("plain", {}), ("stage", dict(stage_x=True)), ("szpf", dict(szpf=True)),
                               ("stage_szpf", dict(stage_x=True, szpf=True)), ("dry2", dict(dry=2))):
                try:
                    row[f"{var}_{key}"] = graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, config=dict(c, **extra)), ds)
                except Exception as e:
                    row[f"{var}_{key}"] = f"ERR {type(e).__name__}: {str(e)[:300]}"
            a = wol.int4_weight_only_linear_triton(*ds[0], 128, config=c)
            b = wol.int4_weight_only_linear_triton(*ds[0], 128, config=dict(c, stage_x=True, szpf=True))
            row["same_" + key] = bool(torch.equal(a, b))
        res[n] = row
        print(n, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "prof_g4_stage.json"), "w"), indent=1)

if __name__ == "__main__" and sys.argv[1] == "stage":
    main_stage()

def main_w1():
    res = {}
    for n, (N, K) in SHAPES.items():
        ds = data(N, K)
        row = {"tl": graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, gluon=False), ds)}
        c0 = BEST[n][0]
        row["best4w"] = graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, config=dict(GLUON=True, block_n=c0[0], warps=c0[1], split_k=c0[2], stages=c0[3], segs=c0[4])), ds)
        for bn in (16, 32):
            for sk in (1, 2, 4, 8):
                for st, sg in ((8, 1), (16, 1), (6, 2), (8, 2)):
                    c = dict(GLUON=True, block_n=bn, warps=1, split_k=sk, stages=st, segs=sg)
                    key = f"{bn}_1_{sk}_{st}_{sg}"
                    try:
                        row[key] = graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, config=c), ds)
                    except Exception as e:
                        row[key] = f"ERR {type(e).__name__}: {str(e)[:200]}"
        a = wol.int4_weight_only_linear_triton(*ds[0], 128, gluon=False)
        b = wol.int4_weight_only_linear_triton(*ds[0], 128, config=dict(GLUON=True, block_n=16, warps=1, split_k=2, stages=8, segs=1))
        row["maxdiff"] = float((a.float() - b.float()).abs().max())
        res[n] = row
        best = sorted((v, k) for k, v in row.items() if isinstance(v, float) and k not in ("maxdiff",))[:6]
        print(n, "tl", round(row["tl"], 2), "best4w", round(row["best4w"], 2), "maxdiff", row["maxdiff"], [(k, round(v, 2)) for v, k in best], flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "prof_g4_w1.json"), "w"), indent=1)

if __name__ == "__main__" and sys.argv[1] == "w1":
    main_w1()

def main_ns():
    res = {}
    for n, (N, K) in SHAPES.items():
        ds = data(N, K)
        row = {"tl": graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, gluon=False), ds)}
        for c in BEST[n][:2] + [(16, 1, {"wqkv": 2, "wo": 8, "w13": 1, "w2": 4}[n], 8, 1)]:
            key = "_".join(map(str, c))
            c = dict(GLUON=True, block_n=c[0], warps=c[1], split_k=c[2], stages=c[3], segs=c[4])
            for var, extra in (("plain", {}), ("ns", dict(dry=3)), ("dry2", dict(dry=2)), ("ns_stage", dict(dry=3, stage_x=True))):
                try:
                    row[f"{var}_{key}"] = graph_time(lambda d: wol.int4_weight_only_linear_triton(*d, 128, config=dict(c, **extra)), ds)
                except Exception as e:
                    row[f"{var}_{key}"] = f"ERR {type(e).__name__}: {str(e)[:300]}"
        res[n] = row
        print(n, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "prof_g4_ns.json"), "w"), indent=1)

if __name__ == "__main__" and sys.argv[1] == "ns":
    main_ns()

def main_ncu2():
    N, K = SHAPES["w13"]
    ds = data(N, K)
    c = dict(GLUON=True, block_n=64, warps=4, split_k=1, stages=4, segs=2)
    cfgs = [c, dict(c, dry=2), dict(c, dry=1), dict(c, split_k=2, stages=8, segs=1), dict(block_n=16, warps=1, split_k=1, stages=8, segs=1, GLUON=True), dict(block_n=16, warps=1, split_k=2, stages=8, segs=1, GLUON=True)]
    for cf in cfgs:
        for d in ds: wol.int4_weight_only_linear_triton(*d, 128, config=cf)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for cf in cfgs:
        wol.int4_weight_only_linear_triton(*ds[1], 128, config=cf)
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()

if __name__ == "__main__" and sys.argv[1] == "ncu2":
    main_ncu2()
