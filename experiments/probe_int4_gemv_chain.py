"""One decode step's 128 int4 Gluon GEMVs chained in one CUDA graph under sets of tiles, GPU only.

    python -m experiments.probe_int4_gemv_chain        # ~1 minute on an H100, compiles included

Llama-2-7B's shapes with the decode's fusions (``probe_int4_gemv_par.SHAPES``), 32 layers on
distinct weights (3.4 GB: nothing stays in the L2), PDL on. The base set is the tuner's picks at
the decode (``llama_decode_int4_par_ab.json``); each other set changes some keys of some shapes'
tiles. One tile timed alone swings by 10-15 % from run to run on one machine (its launch and
ramp-up are most of it); the chain, where consecutive kernels overlap as in the model, repeats
within 1-3.5 % (the rounds of int4_gemv_gluon_boundary_study.json). Every set is timed in
``--rounds`` rounds of alternating order; the record keeps each round and the median. Each set's
outputs are checked against the base set's: bitwise, or within 2 % (relative norm) where the
tile adds the fp32 sums in another order (other warps or rows: RMSNorm's Σv²), as recorded.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from experiments import harness
from experiments.probe_int4_gemv_par import GROUP, SHAPES, _inputs

# the tuner's picks at the decode (llama_decode_int4_par_ab.json: the same in 3 processes of 3)
BASE = {"wqkv": {"block_n": 32, "warps": 4, "split_k": 1, "stages": 2, "segs": 2, "par": 2},
        "wo": {"block_n": 16, "warps": 4, "split_k": 1, "stages": 2, "segs": 1, "par": 4},
        "w13": {"block_n": 32, "warps": 4, "split_k": 1, "stages": 2, "segs": 2, "par": 2},
        "w2": {"block_n": 32, "warps": 4, "split_k": 4, "stages": 2, "segs": 2, "par": 2}}
RING4 = {"stages": 4, "segs": 1}  # 4 one-step slots: as many segments in flight as 2 two-step ones
# 64 rows on 8 warps: half the programs of 32 rows on 4 warps (each program stages its split's whole
# input: half the staging's loads), the same warps a row
R64 = {"block_n": 64, "warps": 8}
# name: {shape (or "*": every shape): the keys changed}
SETS = {"base": {},
        "ring4x1": {"*": RING4},
        **{f"ring4x1 {name}": {name: RING4} for name in BASE},
        **{f"r64 {name}": {name: R64} for name in ("wqkv", "w13", "w2")},
        "r64 wqkv w13 w2": {"wqkv": R64, "w13": R64, "w2": R64}}


def configs(changes: dict) -> dict:
    """The base tiles with a set's changes."""
    return {name: {**cfg, **changes.get("*", {}), **changes.get(name, {})} for name, cfg in BASE.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    p.add_argument("--name", default="int4_gemv_gluon_chain_sets")
    p.add_argument("--rounds", type=int, default=3, help="rounds of timing, at least 1")
    p.add_argument("--sets", default=None, help=f"comma-separated subset of: {', '.join(SETS)} (default all)")
    args = p.parse_args(argv)
    names = list(SETS) if args.sets is None else [n.strip() for n in args.sets.split(",")]
    unknown = [n for n in names if n not in SETS]
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if unknown or "base" not in names:
        p.error(f"--sets takes names of {', '.join(SETS)} and needs base; got {args.sets}")
    dev = harness.require_cuda("the Gluon int4 GEMV")
    from fastzoo.ops import int4_gemv_gluon as ig

    g = torch.Generator(device=dev).manual_seed(0)
    layers = [(name, *_inputs(*SHAPES[name], g, dev)[1:4]) for _ in range(32) for name in SHAPES]
    xin = {name: _inputs(*SHAPES[name], g, dev) for name in SHAPES}
    nbytes = sum(w.numel() + 4 * s.numel() for _, w, s, z in layers)
    base_out, checks = {}, {}
    sets = {n: SETS[n] for n in ["base", *[n for n in names if n != "base"]]}
    for set_name, changes in sets.items():  # each tile once (compiles) and its output against the base tile's
        for name, cfg in configs(changes).items():
            x, *_, kw = xin[name]  # the first layer's weights of this shape
            out = ig.int4_gemv_gluon_launch(x, *layers[list(SHAPES).index(name)][1:4], GROUP, None, cfg, True, **kw)
            if set_name == "base":
                base_out[name] = out
                continue
            ref = base_out[name].float()
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            if rel > 2e-2:  # a wrong tile, not another order of fp32 sums
                raise SystemExit(f"{set_name}: {name}'s tile {cfg} differs from the base tile's output "
                                 f"(relative norm {rel:.2e})")
            checks[f"{set_name} {name}"] = "bitwise" if torch.equal(out, base_out[name]) else f"rel {rel:.1e}"
    times = {k: [] for k in sets}
    for rnd in range(args.rounds):
        for set_name in (list(sets) if rnd % 2 == 0 else list(reversed(sets))):
            cfgs = configs(sets[set_name])

            def step(cfgs=cfgs):
                for name, w, s, z in layers:
                    x, _, _, _, kw = xin[name]
                    ig.int4_gemv_gluon_launch(x, w, s, z, GROUP, None, cfgs[name], True, **kw)
            us = harness.bench(step, warmup=2, rep=20, device=dev, cuda_graph=True)["median_ms"] * 1e3
            times[set_name].append(us)
            print(f"round {rnd} {set_name}: {us:.0f} us a step", flush=True)
    base = statistics.median(times["base"])
    rows = [{"set": k, "changes": sets[k], "configs": configs(sets[k]), "us_per_step": statistics.median(v),
             "rounds_us": v, "GB/s": nbytes / statistics.median(v) / 1e3, "vs_base": statistics.median(v) / base}
            for k, v in times.items()]
    for r in sorted(rows, key=lambda r: r["us_per_step"]):
        print(f"{r['set']:16s} {r['us_per_step']:7.0f} us {r['GB/s']:6.0f} GB/s {r['vs_base']:.3f}x base "
              f"(rounds {', '.join(f'{t:.0f}' for t in r['rounds_us'])})")
    path = harness.save_result(args.name, {"rows": rows, "base": BASE, "output_checks": checks}, args, args.out_dir)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
