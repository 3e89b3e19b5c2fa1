"""Benchmark the fused relative-position attention (fastzoo.ops.rel_pos_attention), GPU only.

    python -m experiments.bench_rel_pos_attention            # all shapes, JSON under experiments/results/<gpu>/
    python -m experiments.bench_rel_pos_attention --quick    # one shape, few repeats, nothing saved
    python -m experiments.bench_rel_pos_attention --tiles 64x32_w4_s3,128x16_w4_s3_r168   # each tile forced
    python -m experiments.bench_rel_pos_attention --retune 6   # the autotuner's picks, each timed

Shapes: the attention layers of SAM's image encoder at batch 16 (``--batch``):
windowed layers (16·25 windows of 14×14 = 196 tokens) and global layers (64×64 = 4096
tokens), for vit_b (12 heads, head_dim 64) and vit_h (16 heads, head_dim 80). q, k, v
are slices of one fused qkv tensor (B, N, 3, heads, D), as SAM's qkv projection gives
them (``--layout contiguous`` for separate contiguous tensors). For each shape, timed in
the same run:

1. ``fused``: ``rel_pos_attention`` (Triton kernel, bias added in registers);
2. ``ref``: ``rel_pos_attention_ref``: build the (B, heads, Nq, Nk) bias from rel_h/rel_w
   and call SDPA with it as the mask — what segment_anything-style code does;
   ``sdpa_mask``: the SDPA call alone, on a bias built beforehand;
3. ``flash``: SDPA with no bias (the flash backend): the lower bound for context;
4. ``window``: ``rel_pos_window_attention``, what SAM's encoder calls (on Hopper at head_dim 64
   both its global and its windowed layers take the Gluon kernels of ``rel_pos_attention_gluon``:
   vit_b.global and vit_b.window here, so records before 5e61e6c timed the tl kernel at vit_b's
   windows; ``bench_rel_pos_global_gluon`` / ``bench_rel_pos_window_gluon`` compare them): the same layer from
   the (images, 64, 64, 3·heads·D) qkv grid (windows of 14 read in place, the grid padded
   to 70×70 with the qkv bias; global: window 0), its rel-pos terms from q · table
   (computed by each program for its own queries, included in the time).

Rates are 4·B·heads·Nq·Nk·D FLOPs (Q·Kᵀ and P·V) over the time, and percentages of the
bf16 matmul ceiling measured in the same run (harness, 8192³). Accuracy: ``err`` =
max|fused − truth| / max|truth| with the truth the reference in fp32 on the first
``--check-batch`` batch entries; ``ref_err`` the same for the reference in the benchmark
dtype (the yardstick); ``err_vs_ref`` the fused output against the low-precision
reference on the whole batch.

``--tiles``: instead, SAM's window op (4. above) on the ``tl`` kernel with each listed tile forced
(``BLOCK_MxBLOCK_N_wWARPS_sSTAGES`` and optionally ``_rMAXNREG``, a register cap), timed twice
per shape, with its error against the fp32 reference on one image (``ref_err``: the reference's
own in bf16, the yardstick) and the compiled kernel's
registers and spills; written to ``rel_pos_attention_tiles.json``. Tiles the autotuner never
launches at a shape (``tile_launched``: wrong or faulting on an H100) are skipped there.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from experiments import harness
from fastzoo.ops._common import next_pow2
from fastzoo.ops.rel_pos_attention import (_head_dim_blocks, _rel_pos_attention_kernel, rel_pos_attention,
                                           rel_pos_attention_ref,
                                           rel_pos_window_attention, rel_pos_window_attention_ref,
                                           rel_pos_window_attention_triton, tile_launched)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shapes(batch: int, quick: bool) -> list[tuple[str, int, int, int, int]]:
    """(name, B, heads, grid side, head_dim); tokens = side²."""
    all_shapes = [
        ("vit_b.window", batch * 25, 12, 14, 64),
        ("vit_b.global", batch, 12, 64, 64),
        ("vit_h.window", batch * 25, 16, 14, 80),
        ("vit_h.global", batch, 16, 64, 80),
    ]
    return all_shapes[3:] if quick else all_shapes


GRID = 64  # SAM's 1024x1024 image: a 64x64 token grid


def bench_window_op(B, H, side, D, dtype, device, rep, n_inputs, op=rel_pos_window_attention):
    """``op`` (``rel_pos_window_attention``, or ``rel_pos_window_attention_triton``: the ``tl`` kernel
    whatever the GPU) on the grid of the images that give this layer: windowed (side 14: B / 25
    images) or global (side 64: B images)."""
    window = side if side != GRID else 0
    images = B // 25 if window else B
    g = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(images, GRID, GRID, 3 * H * D, device=device, generator=g).to(dtype),
             torch.randn(2 * side - 1, D, device=device, generator=g).to(dtype),
             torch.randn(2 * side - 1, D, device=device, generator=g).to(dtype),
             torch.randn(3 * H * D, device=device, generator=g).to(dtype)) for _ in range(n_inputs)]
    return harness.bench(lambda s: op(s[0], s[1], s[2], H, window, None, s[3]), inputs=sets, rep=rep)


def make_inputs(B, H, side, D, dtype, device, layout, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    N = side * side
    if layout == "qkv":
        qkv = torch.randn(B, N, 3, H, D, device=device, generator=g).to(dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views
    else:
        q, k, v = (torch.randn(B, H, N, D, device=device, generator=g).to(dtype) for _ in range(3))
    rel_h = (torch.randn(B, H, N, side, device=device, generator=g) * 2).to(dtype)
    rel_w = (torch.randn(B, H, N, side, device=device, generator=g) * 2).to(dtype)
    return q, k, v, rel_h, rel_w


def _max_rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    return float((out.float() - truth.float()).abs().max() / truth.float().abs().max())


def bench_shape(name, B, H, side, D, dtype, device, rep, n_inputs, layout, check_batch, bf16_tflops):
    N = side * side
    sets = [make_inputs(B, H, side, D, dtype, device, layout, seed=i + 1) for i in range(n_inputs)]

    # Accuracy (also runs the autotuner before anything is timed).
    x = sets[0]
    out = rel_pos_attention(*x)
    config = str(getattr(_rel_pos_attention_kernel, "best_config", "?"))
    ref_lp = rel_pos_attention_ref(*x)
    err_vs_ref = _max_rel_err(out, ref_lp)
    del ref_lp
    cb = min(check_batch, B)
    small = [t[:cb] for t in x]
    truth = rel_pos_attention_ref(*(t.float() for t in small))
    err = _max_rel_err(out[:cb], truth)
    ref_err = _max_rel_err(rel_pos_attention_ref(*small), truth)
    del out, truth
    torch.cuda.empty_cache()

    t = {}
    t["fused"] = harness.bench(lambda s: rel_pos_attention(*s), inputs=sets, rep=rep)
    t["ref"] = harness.bench(lambda s: rel_pos_attention_ref(*s), inputs=sets, rep=rep)
    # SDPA alone on a bias built beforehand (one set: the bias is the big tensor here).
    q0, k0, v0, rh0, rw0 = sets[0]
    bias = (rh0[..., :, None] + rw0[..., None, :]).reshape(B, H, N, N)
    t["sdpa_mask"] = harness.bench(lambda: F.scaled_dot_product_attention(q0, k0, v0, attn_mask=bias), rep=rep)
    del bias
    torch.cuda.empty_cache()
    t["flash"] = harness.bench(lambda s: F.scaled_dot_product_attention(s[0], s[1], s[2]), inputs=sets, rep=rep)
    del sets, x, small, q0, k0, v0, rh0, rw0
    torch.cuda.empty_cache()
    t["window"] = bench_window_op(B, H, side, D, dtype, device, rep, n_inputs)

    flops = 4.0 * B * H * N * N * D
    ms = {k: v["median_ms"] for k, v in t.items()}
    tflops = {k: flops / (v * 1e-3) / 1e12 for k, v in ms.items()}
    row = {"shape": name, "dtype": str(dtype).replace("torch.", ""), "B": B, "heads": H, "tokens": N, "D": D}
    for k in ("fused", "ref", "sdpa_mask", "flash", "window"):
        row[f"{k}_ms"] = ms[k]
    for k in ("fused", "ref", "flash", "window"):
        row[f"{k}_tflops"] = tflops[k]
        row[f"{k}_pct"] = 100 * tflops[k] / bf16_tflops
    row["speedup_vs_ref"] = harness.speedup(ms["ref"], ms["fused"])
    row["speedup_vs_sdpa_mask"] = harness.speedup(ms["sdpa_mask"], ms["fused"])
    row["flash_over_fused"] = ms["flash"] / ms["fused"]
    row["flash_over_window"] = ms["flash"] / ms["window"]
    row["err"] = err
    row["ref_err"] = ref_err
    row["err_vs_ref"] = err_vs_ref
    row["config"] = config
    row["timings"] = t
    return row


def parse_tile(text: str):
    """``64x32_w4_s3`` or ``128x16_w4_s3_r168`` -> a triton.Config."""
    import re

    import triton

    m = re.fullmatch(r"(\d+)x(\d+)_w(\d+)_s(\d+)(?:_r(\d+))?", text.strip())
    if m is None:
        raise ValueError(f"--tiles expects BLOCK_MxBLOCK_N_wWARPS_sSTAGES[_rMAXNREG] (e.g. 128x16_w4_s3_r168), "
                         f"got {text!r}")
    bm, bn, w, st, r = (int(g) if g else None for g in m.groups())
    kw = {"maxnreg": r} if r else {}
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st, **kw)


def bench_tiles(shape_list, tiles: list[str], device, rep, n_inputs) -> list[dict]:
    """SAM's window op on each shape with each tile forced (``--tiles``)."""
    kern = _rel_pos_attention_kernel
    jit_fn = kern.fn
    while not hasattr(jit_fn, "device_caches"):  # autotune -> heuristics -> jit
        jit_fn = jit_fn.fn
    saved = list(kern.configs)
    rows = []
    try:
        for name, B, H, side, D in shape_list:
            window = side if side != GRID else 0
            g = torch.Generator(device=device).manual_seed(1)
            one = (torch.randn(1, GRID, GRID, 3 * H * D, device=device, generator=g).bfloat16(),
                   torch.randn(2 * side - 1, D, device=device, generator=g).bfloat16(),
                   torch.randn(2 * side - 1, D, device=device, generator=g).bfloat16(),
                   torch.randn(3 * H * D, device=device, generator=g).bfloat16())
            truth = rel_pos_window_attention_ref(one[0].float(), one[1].float(), one[2].float(), H, window, None,
                                                 one[3].float())
            ref_err = _max_rel_err(rel_pos_window_attention_ref(*one[:3], H, window, None, one[3]), truth)
            for tile in tiles:
                cfg = parse_tile(tile)
                if not tile_launched(cfg.kwargs["BLOCK_N"], _head_dim_blocks(D)["SPLIT_D"], next_pow2(side)):
                    print(f"  {name} {tile}: skipped (a tile the autotuner never launches at this shape)")
                    rows.append({"shape": name, "tile": tile, "skipped": "pruned by the autotuner (tile_launched)"})
                    continue
                kern.configs = [cfg]
                kern.cache.clear()
                known = {id(k) for c in jit_fn.device_caches.values() for k in c[0].values()}
                got = rel_pos_window_attention_triton(one[0], one[1], one[2], H, window, None, one[3])
                row = {"shape": name, "tile": tile, "err": _max_rel_err(got, truth), "ref_err": ref_err,
                       "ms": [bench_window_op(B, H, side, D, torch.bfloat16, device, rep, n_inputs,
                                              rel_pos_window_attention_triton)["median_ms"] for _ in range(2)]}
                new = [k for c in jit_fn.device_caches.values() for k in c[0].values() if id(k) not in known]
                row["registers"] = sorted({k.n_regs for k in new})
                row["spills"] = sorted({k.n_spills for k in new})
                print(f"  {name} {tile}: {row['ms'][0]:.3f} / {row['ms'][1]:.3f} ms, err {row['err']:.2e}, "
                      f"registers {row['registers']}, spills {row['spills']}", flush=True)
                rows.append(row)
    finally:
        kern.configs = saved
        kern.cache.clear()
    return rows


def bench_retune(shape_list, n: int, device, rep, n_inputs) -> list[dict]:
    """SAM's window op on each shape, its autotuning run ``n`` times (cache cleared before each):
    the configuration each run picked and the autotuner's timings of every candidate, then each
    picked configuration forced and timed as the benchmark times (twice) (``--retune``)."""
    kern = _rel_pos_attention_kernel
    saved = list(kern.configs)
    rows = []
    try:
        for name, B, H, side, D in shape_list:
            window = side if side != GRID else 0
            images = B // 25 if window else B
            g = torch.Generator(device=device).manual_seed(2)
            args = (torch.randn(images, GRID, GRID, 3 * H * D, device=device, generator=g).bfloat16(),
                    torch.randn(2 * side - 1, D, device=device, generator=g).bfloat16(),
                    torch.randn(2 * side - 1, D, device=device, generator=g).bfloat16())
            pad = torch.randn(3 * H * D, device=device, generator=g).bfloat16()
            picks, tunings = [], []
            for _ in range(n):
                kern.cache.clear()
                kern.configs_timings = {}  # stays empty where pruning leaves one configuration (no timing)
                rel_pos_window_attention_triton(*args, H, window, None, pad)
                picks.append(str(kern.best_config))
                tunings.append({str(c): t for c, t in kern.configs_timings.items()})
            by_str = {str(c): c for c in saved}
            forced = {}
            for pick in sorted(set(picks)):
                kern.configs = [by_str[pick]]
                kern.cache.clear()
                forced[pick] = [bench_window_op(B, H, side, D, torch.bfloat16, device, rep, n_inputs,
                                                rel_pos_window_attention_triton)["median_ms"] for _ in range(2)]
                kern.configs = saved
            row = {"shape": name, "picks": picks, "distinct_picks": len(set(picks)), "forced_ms": forced,
                   "tunings": tunings}
            print(f"  {name}: {len(set(picks))} distinct picks in {n} tunings", flush=True)
            for pick in sorted(set(picks)):
                print(f"    {picks.count(pick)}x  {forced[pick][0]:.3f} / {forced[pick][1]:.3f} ms  {pick}", flush=True)
            rows.append(row)
    finally:
        kern.configs = saved
        kern.cache.clear()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape (vit_h global), bf16, few repeats, no JSON")
    p.add_argument("--batch", type=int, default=16, help="images per batch (windowed layers: 25 windows each)")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16")
    p.add_argument("--layout", choices=["qkv", "contiguous"], default="qkv",
                   help="q/k/v as slices of a fused qkv tensor (SAM) or separate contiguous tensors")
    p.add_argument("--rep", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--tiles", default="", help="comma-separated tiles to force on SAM's window op, e.g. "
                   "64x32_w4_s3,128x16_w4_s3_r168 (BLOCK_MxBLOCK_N_wWARPS_sSTAGES[_rMAXNREG]); see above")
    p.add_argument("--retune", type=int, default=0, help="instead: autotune SAM's window op this many times a "
                   "shape (cache cleared each time; bf16, the qkv layout) and time each configuration it picked")
    p.add_argument("--shapes", default="", help="comma-separated shape names to run (default: all), e.g. "
                   "vit_b.window,vit_h.window")
    p.add_argument("--inputs", type=int, default=2, help="input sets rotated between calls")
    p.add_argument("--check-batch", type=int, default=2, help="batch entries checked against the fp32 reference")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    tiles = [t.strip() for t in args.tiles.split(",") if t.strip()]
    if args.retune < 0 or (args.retune and tiles):
        p.error(f"--retune expects a number of tunings >= 1, and not together with --tiles; got {args.retune}"
                + (f" with --tiles {args.tiles}" if tiles else ""))
    for t in tiles:
        try:
            parse_tile(t)
        except ValueError as e:
            p.error(str(e))
    all_shapes = shapes(args.batch, False)
    names = [s[0] for s in all_shapes]
    wanted = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        p.error(f"--shapes: unknown {unknown}; expected names from {names}")
    shape_list = [s for s in all_shapes if s[0] in wanted] if wanted else shapes(args.batch, args.quick)
    device = harness.require_cuda("experiments/bench_rel_pos_attention.py")
    rep = args.rep or (10 if args.quick else 50)
    dtypes = ["bf16"] if args.quick else [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: expected bf16 or fp16, got {d!r}")

    if args.retune:
        rows = bench_retune(shape_list, args.retune, device, rep, args.inputs)
        if not args.quick:
            print("saved", harness.save_result("rel_pos_attention_retune", {"rows": rows}, args, args.out_dir))
        return
    if tiles:
        rows = bench_tiles(shape_list, tiles, device, rep, args.inputs)
        if not args.quick:
            print("saved", harness.save_result("rel_pos_attention_tiles", {"rows": rows}, args, args.out_dir))
        return

    bf16_tflops = harness.measure_matmul_tflops(torch.bfloat16)
    print(f"{harness.gpu_name()}: measured bf16 matmul ceiling {bf16_tflops:.0f} TFLOP/s (torch.mm, 8192^3)")

    rows = []
    for d in dtypes:
        for name, B, H, side, D in shape_list:
            row = bench_shape(name, B, H, side, D, DTYPES[d], device, rep, args.inputs, args.layout,
                              args.check_batch, bf16_tflops)
            rows.append(row)
            print(f"  {name} {d}: fused {row['fused_ms']:.3f} ms, ref {row['ref_ms']:.3f} ms, "
                  f"config {row['config']}", flush=True)

    print("\nTimes in ms (medians); TFLOP/s = 4·B·heads·N²·D / time; pct = % of the bf16 matmul ceiling.")
    harness.print_table(rows, ["shape", "dtype", "B", "heads", "tokens", "D", "fused_ms", "ref_ms", "sdpa_mask_ms",
                               "flash_ms", "fused_tflops", "fused_pct", "ref_pct", "flash_pct", "speedup_vs_ref",
                               "speedup_vs_sdpa_mask", "flash_over_fused", "window_ms", "window_pct",
                               "flash_over_window"])
    print()
    harness.print_table(rows, ["shape", "dtype", "err", "ref_err", "err_vs_ref", "config"])
    if not args.quick:
        figures = {"bf16_ceiling_tflops": bf16_tflops, "layout": args.layout, "rows": rows}
        print("saved", harness.save_result("rel_pos_attention", figures, args, args.out_dir))


if __name__ == "__main__":
    main()
