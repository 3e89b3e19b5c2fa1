"""The Gluon int4 GEMV's tiles at Llama-2-7B's shapes with the decode's fusions, GPU only.

    python -m experiments.probe_int4_gemv_par              # ~2 minutes on an H100, compiles included
    python -m experiments.probe_int4_gemv_par --tuner 3    # and the tuner's pick, 3 times a shape

Per shape (wqkv and w1|w3 with the RMSNorm prologue, wo with the residual, w2 with SwiGLU and
the residual, as ``Int4WeightOnlyLinear.fuses`` runs them), every candidate of
``int4_gemv_gluon.candidates`` plus a few more, int4 group 128, one row of bf16 x, PDL on:
µs a call (CUDA-graph replay over 4 weight copies, so the L2 holds none), GB/s of the weight
bytes. Then one decode step's 128 GEMVs chained in one CUDA graph, each shape forced to its
fastest tile without segments side by side (``par`` 1) and to its fastest overall, twice in
alternation: the step-level effect without the rest of the model. ``--tuner N``: the tile
``tuned_config`` picks, N times a shape (its cache cleared between picks).
"""
from __future__ import annotations

import argparse

import torch

from experiments import harness

GROUP = 128
# name: (N, K, the options the decode fuses into it)
SHAPES = {"wqkv": (12288, 4096, dict(norm=True)), "wo": (4096, 4096, dict(res=True)),
          "w13": (22016, 4096, dict(norm=True)), "w2": (4096, 11008, dict(glu=True, res=True))}
# timed beside the candidates (the sweep that chose them)
EXTRA = [{"block_n": 16, "warps": 4, "par": 4, "split_k": 1, "stages": 2, "segs": 1},
         {"block_n": 32, "warps": 4, "par": 2, "split_k": 1, "stages": 8, "segs": 1},
         {"block_n": 32, "warps": 8, "par": 4, "split_k": 1, "stages": 2, "segs": 1},
         {"block_n": 128, "warps": 4, "split_k": 1, "stages": 4, "segs": 2}]


def _inputs(N, K, opts, g, dev, dtype=torch.bfloat16):
    """Random packed weights, scales and zeros, x ([a | b] with SwiGLU) and the options' tensors."""
    w = torch.randint(0, 256, (N, K // 2), device=dev, generator=g, dtype=torch.uint8)
    s, z = [(torch.rand(N, K // GROUP, device=dev, generator=g) * 0.02).to(dtype) for _ in range(2)]
    x = torch.randn(1, 2 * K if opts.get("glu") else K, device=dev, generator=g).to(dtype)
    kw = {}
    if opts.get("norm"):
        kw["norm_weight"] = torch.rand(K, device=dev, generator=g).to(dtype)
    if opts.get("glu"):
        kw["glu"] = True
    if opts.get("res"):
        kw["residual"] = torch.randn(1, N, device=dev, generator=g).to(dtype)
    return x, w, s, z, kw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    p.add_argument("--name", default="int4_gemv_gluon_par_probe")
    p.add_argument("--tuner", type=int, default=0, help="also the tuner's pick, this many times a shape")
    args = p.parse_args(argv)
    dev = harness.require_cuda("the Gluon int4 GEMV")
    from fastzoo.ops import int4_gemv_gluon as ig
    from fastzoo.ops._common import pdl_options

    g = torch.Generator(device=dev).manual_seed(0)
    rows, best, picks = [], {}, {}
    for name, (N, K, opts) in SHAPES.items():
        packs = [_inputs(N, K, opts, g, dev) for _ in range(4)]
        if not ig.int4_gemv_gluon_applies(packs[0][0][:, :K], *packs[0][1:4], GROUP):
            raise SystemExit("the Gluon int4 GEMV does not run here (it needs a Hopper GPU and Triton's Gluon)")
        nbytes = N * K // 2 + 2 * N * (K // GROUP) * 2
        timed = []
        for c in ig.candidates(N, K, torch.cuda.get_device_properties(dev).multi_processor_count) + EXTRA:
            r = harness.bench(lambda q, c=c: ig.int4_gemv_gluon_launch(q[0], q[1], q[2], q[3], GROUP, None, c, True,
                                                                       **q[4]),
                              inputs=packs, warmup=3, rep=100, device=dev, cuda_graph=True)
            us = r["median_ms"] * 1e3
            timed.append({"shape": name, "N": N, "K": K, "tile": ig.tile_name(c), "us": us, "GB/s": nbytes / us / 1e3,
                          "config": c, "fusions": sorted(opts)})
            print(f"{name} {us:7.2f} us {nbytes / us / 1e3:7.0f} GB/s {c}", flush=True)
        rows += sorted(timed, key=lambda r: r["us"])
        p1 = min((r for r in timed if r["config"].get("par", 1) == 1), key=lambda r: r["us"])
        pa = min(timed, key=lambda r: r["us"])
        best[name] = (p1["config"], pa["config"])
        print(f"== {name}: fastest par 1 {p1['us']:.2f} us {p1['config']}; overall {pa['us']:.2f} us {pa['config']}")
        if args.tuner:
            x, w, s, z, kw = packs[0]
            picks[name] = []
            for _ in range(args.tuner):
                ig._TUNED.clear()
                picks[name].append(ig.tuned_config(x, w, s, z, GROUP, None, pdl_options(x)["PDL"], **kw))
            print(f"   tuner: {picks[name]}", flush=True)

    # one step's GEMVs, 32 layers on distinct weights (3.4 GB: nothing stays in L2)
    layers = [(name, *_inputs(*SHAPES[name], g, dev)[1:4]) for _ in range(32) for name in SHAPES]
    xin = {name: _inputs(*SHAPES[name], g, dev) for name in SHAPES}
    nbytes = sum(w.numel() + 4 * s.numel() for _, w, s, z in layers)
    chain = []
    for _ in range(2):
        for variant, idx in (("fastest_par1", 0), ("fastest", 1)):
            def step(idx=idx):
                for name, w, s, z in layers:
                    x, _, _, _, kw = xin[name]
                    ig.int4_gemv_gluon_launch(x, w, s, z, GROUP, None, best[name][idx], True, **kw)
            us = harness.bench(step, warmup=2, rep=20, device=dev, cuda_graph=True)["median_ms"] * 1e3
            chain.append({"variant": variant, "us_per_step": us, "GB/s": nbytes / us / 1e3,
                          "configs": {k: v[idx] for k, v in best.items()}})
            print(f"chain {variant}: {us:.0f} us a step, {nbytes / us / 1e3:.0f} GB/s", flush=True)
    path = harness.save_result(args.name, {"rows": rows, "chain": chain, "tuner_picks": picks}, args, args.out_dir)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
