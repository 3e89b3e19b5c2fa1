"""Benchmark the decode linears of fastzoo.ops.weight_only_linear, GPU only.

    python -m experiments.bench_weight_only_linear            # Llama-2-7B shapes, M = 1 and 8, JSON saved
    python -m experiments.bench_weight_only_linear --quick    # one shape, M = 1, nothing saved
    python -m experiments.bench_weight_only_linear --llama3   # Llama-3-8B shapes instead
    python -m experiments.bench_weight_only_linear --sweep    # every tile configuration, ranked
    # the quantized GEMVs only, two shapes, one row (~2 minutes on an H100, compiles included):
    python -m experiments.bench_weight_only_linear --sweep --shapes wqkv,w2 --kinds int8,int4 --groups 128 --ms 1
    # the int8 GEMV over a wider tile list than the autotuner's (~2 minutes for wo, w2):
    python -m experiments.bench_weight_only_linear --sweep --shapes wo,w2 --kinds int8 --ms 1 --int8-wide --rep 30
    # the int8 GEMV tiles with and without evict-first weight loads:
    python -m experiments.bench_weight_only_linear --sweep --shapes wqkv,wo,w13,w2 --kinds int8 --ms 1 --int8-variants
    # one decode step's int4 GEMVs back to back (ramp-ups, tails and launch overlap included),
    # the public dispatch (on Hopper the Gluon GEMV), the tl tensor-core kernel and the Gluon GEMV
    # with the early-launch trigger, twice each:
    python -m experiments.bench_weight_only_linear --chain

At decode time a linear reads every weight once per token, so its ceiling is the
weight bytes over the memory bandwidth. For each (N, K) of Llama-2-7B (fused wqkv, wo,
fused w1|w3, w2, output) and M tokens, timed in the same run (µs, median):

- ``bf16``:   ``F.linear`` (cuBLAS) vs ``decode_linear`` (ours);
- ``int8``:   ``int8_weight_only_linear`` (ours) vs the eager reference (dequantize +
  matmul) and the ``torch.compile``d reference (gpt-fast's ``F.linear(x, w.to(x.dtype))
  * scales``, mode max-autotune-no-cudagraphs);
- ``int4 g32`` / ``int4 g128``: ``int4_weight_only_linear`` (ours) vs dequantize +
  ``F.linear``, and ``torch._weight_int4pack_mm`` (tinygemm, gpt-fast's int4) as a
  baseline where this torch has it.

Every call rotates over ``--copies`` weight copies (default 4) so the 50 MB L2 cannot
hold the matrix between calls. Rates are weight bytes (+ scales / zeros) over the time,
GB/s and % of the device-to-device copy bandwidth measured in the same run. The
"decode step" rows sum 32 × (wqkv + wo + w1|w3 + w2) + output: the time one decoded
token spends in linears. ``fastzoo_fused`` rows: the same op with what the Llama model
fuses into that projection (``fusion``: RMSNorm prologue, SwiGLU prologue, residual
epilogue) and ``fused_overhead_us`` over the plain op. ``err``: max |out − ref| / max |ref| against an fp32 product
of the same (dequantized) weights.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from experiments import harness
from fastzoo.ops.weight_only_linear import (
    decode_linear,
    int4_dequantize,
    int4_weight_only_linear,
    int8_weight_only_linear,
    int8_weight_only_linear_ref,
)
from fastzoo.quant.linear import Int4WeightOnlyLinear, quantize_weight_int8_per_channel

LLAMA2_7B = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008),
             "output": (32000, 4096)}
LLAMA3_8B = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
             "output": (128256, 4096)}
LAYERS = {"llama2_7b": 32, "llama3_8b": 32}
# what the model fuses into each projection (fastzoo.llama.model.fused_linear)
FUSIONS = {"wqkv": "norm", "wo": "res", "w13": "norm", "w2": "glu+res", "output": "norm"}


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _int8_weights(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 weights (fastzoo.quant's quantizer) with scales in ``dtype``."""
    q, scales = quantize_weight_int8_per_channel(w)
    return q, scales.to(dtype)


def _gpt_fast_int8(x, w, s):
    return F.linear(x, w.to(x.dtype)) * s


def _int4pack_baseline(w_bf16: torch.Tensor, group: int):
    """tinygemm (torch._weight_int4pack_mm) on the same weights, or None where unsupported."""
    try:
        N, K = w_bf16.shape
        packed, scales, zeros = Int4WeightOnlyLinear.quantize(w_bf16, group)
        q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(N, K).to(torch.int32)
        # tinygemm: w = (q - 8) * scale + zero_mid, with scales_and_zeros (K/g, N, 2)
        zero_mid = zeros + 8 * scales
        sz = torch.stack([scales, zero_mid], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        try:
            wp = torch.ops.aten._convert_weight_to_int4pack(q, 8)
        except Exception:
            wp = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)

        def fn(x):
            return torch._weight_int4pack_mm(x, wp, group, sz)

        fn(torch.zeros(1, K, device=w_bf16.device, dtype=torch.bfloat16))
        return fn, wp.numel() * wp.element_size() + sz.numel() * sz.element_size()
    except Exception as e:  # noqa: BLE001 - a baseline only
        print(f"  (tinygemm baseline unavailable: {type(e).__name__}: {str(e)[:120]})")
        return None


def bench_shape(name, N, K, M, args, copy_gbs, compiled_int8, dev=None):
    dev = torch.device("cuda") if dev is None else dev
    g = torch.Generator(device=dev).manual_seed(N * 7 + K + M)
    dtype = torch.bfloat16
    C = args.copies
    xs = [torch.randn(M, K, device=dev, generator=g).to(dtype) for _ in range(C)]
    ws = [(torch.randn(N, K, device=dev, generator=g) * K**-0.5).to(dtype) for _ in range(C)]
    rows = []

    def t_us(fn, inputs):
        r = harness.bench(fn, inputs=inputs, warmup=args.warmup, rep=args.rep, device=dev, cuda_graph=args.cuda_graph)
        return r["median_ms"] * 1e3

    def row(kind, impl, us, nbytes, err=None):
        gbs = nbytes / (us * 1e-6) / 1e9
        r = {"shape": name, "M": M, "N": N, "K": K, "kind": kind, "impl": impl, "us": us, "GB/s": gbs,
             "%copy": 100 * gbs / copy_gbs, "MB": nbytes / 1e6}
        if err is not None:
            r["err"] = err
        rows.append(r)
        print("  ", kind, impl, f"{us:.1f} us", f"{gbs:.0f} GB/s", f"{100 * gbs / copy_gbs:.0f}%",
              "" if err is None else f"err {err:.2e}", flush=True)

    pairs = list(zip(xs, ws))
    # the model's fusion for this projection: the inputs (x twice as wide for the SwiGLU) and options
    fusion = FUSIONS.get(name, "")
    xs_f = [torch.randn(M, 2 * K if "glu" in fusion else K, device=dev, generator=g).to(dtype) for _ in range(C)]
    fopts = {"glu": "glu" in fusion}
    if "norm" in fusion:
        fopts["norm_weight"] = (torch.rand(K, device=dev, generator=g) + 0.5).to(dtype)
    if "res" in fusion:
        fopts["residual"] = torch.randn(M, N, device=dev, generator=g).to(dtype)

    def fused_row(kind, fn, weights, nbytes, plain_us):
        """The fused op on the same weights, its time next to the plain one (fused_overhead_us)."""
        us = t_us(lambda p: fn(p[0], *p[1:], **fopts), [(x, *w) for x, w in zip(xs_f, weights)])
        row(kind, "fastzoo_fused", us, nbytes)
        rows[-1].update(fusion=fusion, fused_overhead_us=us - plain_us)

    # ---- bf16
    if "bf16" in args.kinds:
        wbytes = N * K * 2
        ref = F.linear(xs[0].float(), ws[0].float())
        err = _err(decode_linear(xs[0], ws[0]), ref)
        row("bf16", "cublas", t_us(lambda p: F.linear(p[0], p[1]), pairs), wbytes, _err(F.linear(xs[0], ws[0]), ref))
        row("bf16", "fastzoo", t_us(lambda p: decode_linear(p[0], p[1]), pairs), wbytes, err)
        if fusion:
            fused_row("bf16", decode_linear, [(w,) for w in ws], wbytes, rows[-1]["us"])

    # ---- int8
    qs = [_int8_weights(w, dtype) for w in ws]
    del ws
    trip8 = [(x, q, s) for x, (q, s) in zip(xs, qs)]
    nbytes8 = N * K + N * 2
    if "int8" in args.kinds:
        ref8 = F.linear(xs[0].float(), qs[0][0].float()) * qs[0][1].float()
        err8 = _err(int8_weight_only_linear(xs[0], *qs[0]), ref8)
        row("int8", "eager_ref", t_us(lambda p: int8_weight_only_linear_ref(*p), trip8), nbytes8,
            _err(int8_weight_only_linear_ref(xs[0], *qs[0]), ref8))
        try:
            compiled_int8(*trip8[0])
            row("int8", "compiled_ref", t_us(lambda p: compiled_int8(*p), trip8), nbytes8,
                _err(compiled_int8(*trip8[0]), ref8))
        except Exception as e:  # noqa: BLE001 - a baseline only
            print(f"  (compiled baseline failed: {type(e).__name__}: {str(e)[:200]})")
        row("int8", "fastzoo", t_us(lambda p: int8_weight_only_linear(*p), trip8), nbytes8, err8)
        if fusion:
            fused_row("int8", int8_weight_only_linear, qs, nbytes8, rows[-1]["us"])

    # ---- int4
    for group in (args.groups if "int4" in args.kinds else ()):
        packs = []
        for q, s in qs:  # re-create float weights from the int8 copies (any values will do)
            w = q.to(dtype) * s[:, None]
            p, sc, z = Int4WeightOnlyLinear.quantize(w, group)
            packs.append((p, sc.to(dtype), z.to(dtype)))
        nbytes4 = N * K // 2 + 2 * N * (K // group) * 2
        deq = int4_dequantize(*packs[0], group, torch.float32)
        ref4 = F.linear(xs[0].float(), deq)
        del deq
        err4 = _err(int4_weight_only_linear(xs[0], *packs[0], group), ref4)
        quads = [(x, *pk) for x, pk in zip(xs, packs)]
        row(f"int4g{group}", "dequant+mm",
            t_us(lambda p: F.linear(p[0], int4_dequantize(p[1], p[2], p[3], group, dtype)), quads), nbytes4)
        if args.tinygemm:
            base = _int4pack_baseline(qs[0][0].to(dtype) * qs[0][1][:, None], group)
            if base is not None:
                fn, nb = base
                row(f"int4g{group}", "tinygemm", t_us(lambda x: fn(x), xs), nb)
        row(f"int4g{group}", "fastzoo", t_us(lambda p: int4_weight_only_linear(p[0], p[1], p[2], p[3], group), quads),
            nbytes4, err4)
    return rows


def sweep_shape(name, N, K, M, args, copy_gbs, dev=None):
    """Time every configuration the autotuner would try for this shape (after pruning),
    for bf16, int8 and each int4 group size, with the weights rotated and CUDA-graph
    replays, and return one row per (kind, configuration), fastest first per kind. Shows
    how much the choice of tile matters and what the autotuner leaves on the table."""
    from fastzoo.ops import int4_gemv_gluon as ig
    from fastzoo.ops import weight_only_linear as wol

    dev = torch.device("cuda") if dev is None else dev
    g = torch.Generator(device=dev).manual_seed(N * 7 + K + M)
    dtype = torch.bfloat16
    xs = [torch.randn(M, K, device=dev, generator=g).to(dtype) for _ in range(args.copies)]
    ws = [(torch.randn(N, K, device=dev, generator=g) * K**-0.5).to(dtype) for _ in range(args.copies)]
    named = {"M_BUCKET": wol._m_bucket(M), "N": N, "K": K}
    kinds = []  # (kind, the configurations the autotuner would try, weight bytes, inputs, call)
    if "bf16" in args.kinds:
        kinds.append(("bf16", wol._prune_linear(wol._linear_kernel.configs, named, QUANT=0), N * K * 2,
                      [(x, w) for x, w in zip(xs, ws)], lambda p, c: wol.decode_linear_triton(p[0], p[1], config=c)))
    if "int8" in args.kinds:
        qs = [_int8_weights(w, dtype) for w in ws]
        inputs8 = [(x, *q) for x, q in zip(xs, qs)]
        call8 = lambda p, c: wol.int8_weight_only_linear_triton(p[0], p[1], p[2], config=c)  # noqa: E731
        kinds.append(("int8", wol._prune_linear(wol._linear_kernel.configs, named, QUANT=1), N * K + N * 2,
                      inputs8, call8))
        if M == 1 and args.int8_wide:  # the wider candidate list (wol.INT8_GEMV_SWEEP)
            kinds.append(("int8wide", wol._prune(wol.INT8_GEMV_SWEEP, named), N * K + N * 2, inputs8, call8))
        if M == 1 and args.int8_variants:  # with and without evict-first loads (wol.INT8_GEMV_VARIANTS)
            kinds.append(("int8var", wol._prune(wol.INT8_GEMV_VARIANTS, named), N * K + N * 2, inputs8, call8))
    for group in (args.groups if "int4" in args.kinds else ()):
        packs = [(x, *(t.to(dtype) if t.is_floating_point() else t
                       for t in Int4WeightOnlyLinear.quantize(w, group))) for x, w in zip(xs, ws)]
        call4 = lambda p, c, gr=group: wol.int4_weight_only_linear_triton(p[0], p[1], p[2], p[3], gr, config=c)  # noqa: E731
        nbytes4 = N * K // 2 + 2 * N * (K // group) * 2
        kinds.append((f"int4g{group}", wol._prune(wol._int4_kernel.configs, named), nbytes4, packs, call4))
        if M <= wol.MAX_KERNEL_ROWS and group >= wol.INT4_MMA_MIN_GROUP:  # the tensor-core kernel ("MMA")
            mma = [wol.triton.Config(dict(c.kwargs, MMA=True), num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in (wol.INT4_MMA_SWEEP if M == 1 else wol.INT4_MMA_ROWS_SWEEP)]
            kinds.append((f"int4mma_g{group}", mma, nbytes4, packs, call4))
        if M == 1 and ig.int4_gemv_gluon_applies(*packs[0], group):  # the Gluon GEMV (Hopper, every group)
            gl_cfgs = [wol.triton.Config(dict(c, GLUON=True), num_warps=c["warps"]) for c in ig.SWEEP]
            kinds.append((f"int4gluon_g{group}", gl_cfgs, nbytes4, packs, call4))
    rows = []
    for kind, configs, nbytes, inputs, call in kinds:
        ranked = []
        for c in configs:
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            try:
                r = harness.bench(lambda p: call(p, cfg), inputs=inputs, warmup=3, rep=args.rep, device=dev,
                                  cuda_graph=True)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is skipped
                print(f"  {kind} {cfg}: {type(e).__name__}: {str(e)[:100]}")
                continue
            us = r["median_ms"] * 1e3
            gbs = nbytes / (us * 1e-6) / 1e9
            ranked.append({"shape": name, "M": M, "N": N, "K": K, "kind": kind, "config": cfg, "us": us,
                           "GB/s": gbs, "%copy": 100 * gbs / copy_gbs})
        if not ranked:
            continue
        ranked.sort(key=lambda r: r["us"])
        for i, r in enumerate(ranked):
            r["rank"] = i
        print(f"  {kind}: {len(ranked)} configs; best {ranked[0]['us']:.1f} us ({ranked[0]['%copy']:.0f}% copy) "
              f"{ranked[0]['config']}; median {ranked[len(ranked) // 2]['us']:.1f} us", flush=True)
        for r in ranked[1:5]:
            print(f"      {r['us']:.1f} us {r['%copy']:.0f}% {r['config']}")
        rows += ranked
    return rows


def sweep_summary(rows: list[dict]) -> list[dict]:
    """One row per (shape, M, kind): the fastest configuration (us, GB/s, %copy, its
    tile as text) and the median and slowest over all configurations tried."""
    out = []
    for key in dict.fromkeys((r["shape"], r["M"], r["kind"]) for r in rows):
        sel = sorted((r for r in rows if (r["shape"], r["M"], r["kind"]) == key), key=lambda r: r["us"])
        c = sel[0]["config"]
        if c.get("GLUON"):  # the Gluon GEMV's keys (int4_gemv_gluon.SWEEP)
            from fastzoo.ops.int4_gemv_gluon import tile_name

            tile = tile_name(c)
        else:
            tile = (f"N{c['BLOCK_N']} K{c.get('BLOCK_K', 128)} split{c['SPLIT_K']} w{c['num_warps']} "
                    f"s{c['num_stages']}" + (" prefetch" if c.get("PREFETCH") else "")
                    + (" evict" if c.get("EVICT_W") else ""))
        out.append({**{k: sel[0][k] for k in ("shape", "M", "N", "K", "kind", "us", "GB/s", "%copy")},
                    "median_us": sel[len(sel) // 2]["us"], "slowest_us": sel[-1]["us"], "n_configs": len(sel),
                    "config": tile})
    return out


def step_rows(rows, model, copy_gbs):
    """Σ over the layers' shapes + output per (M, kind, impl): one decode step's linears."""
    layers = LAYERS[model]
    out = []
    keys = sorted({(r["M"], r["kind"], r["impl"]) for r in rows})
    for M, kind, impl in keys:
        sel = {r["shape"]: r for r in rows if (r["M"], r["kind"], r["impl"]) == (M, kind, impl)}
        if set(sel) != {"wqkv", "wo", "w13", "w2", "output"}:
            continue
        us = sum(layers * sel[s]["us"] for s in ("wqkv", "wo", "w13", "w2")) + sel["output"]["us"]
        mb = sum(layers * sel[s]["MB"] for s in ("wqkv", "wo", "w13", "w2")) + sel["output"]["MB"]
        gbs = mb * 1e6 / (us * 1e-6) / 1e9
        out.append({"shape": f"{model}_step", "M": M, "N": "", "K": "", "kind": kind, "impl": impl, "us": us,
                    "GB/s": gbs, "%copy": 100 * gbs / copy_gbs, "MB": mb, "tok/s": 1e6 / us})
    return out


def _record_name(base: str, args) -> str:
    """The JSON record's name: ``_llama3`` for those shapes, ``_int8wide`` with the wider
    int8 list, ``_int8var`` with the eviction variants, ``_subset`` where
    --shapes or --kinds left some out (a partial run never replaces the full record)."""
    subset = bool(args.shapes) or set(args.kinds) != {"bf16", "int8", "int4"}
    wide = "_int8wide" if getattr(args, "int8_wide", False) else ""
    wide += "_int8var" if getattr(args, "int8_variants", False) else ""
    return base + ("_llama3" if args.llama3 else "") + wide + ("_subset" if subset else "")


def chain_bench(model: str, shapes: dict, args, copy_gbs: float) -> list[dict]:
    """One decode step's int4 (g128) linears back to back in one CUDA graph, as in the model:
    LAYERS × (wqkv, wo, w1|w3, w2) on distinct random weights (3.4 GB for Llama-2-7B, so
    nothing stays in L2), one row of x, the autotuner's tiles. Unlike the per-shape
    timings, each kernel's ramp-up and tail and the overlap of consecutive kernels count:
    the model's GEMV time without the rest of the model (µs a step, GB/s, % of copy).
    Load variants measured this way (16-byte loads, PDL trigger, bulk L2 prefetch; commit
    7b9f9ad) were no faster: weight_only_linear_int4_chain_variants_llama2_7b.json."""
    from fastzoo.ops import weight_only_linear as wol

    dev, dtype, group = torch.device("cuda"), torch.bfloat16, 128
    g = torch.Generator(device=dev).manual_seed(0)
    layers, nbytes = [], 0
    for _ in range(LAYERS[model]):
        for name in ("wqkv", "wo", "w13", "w2"):
            N, K = shapes[name]
            w = torch.randint(0, 256, (N, K // 2), device=dev, generator=g, dtype=torch.uint8)
            sz = [(torch.rand(N, K // group, device=dev, generator=g) * 0.02).to(dtype) for _ in range(2)]
            layers.append((name, K, w, *sz))
            nbytes += w.numel() + 2 * sz[0].numel() * 2
    xs = {K: torch.randn(1, K, device=dev, generator=g).to(dtype) for _, K, *_ in layers}

    rows = []
    # the public dispatch (on Hopper the Gluon GEMV: int4_gemv_gluon), the tl tensor-core
    # kernel and, on Hopper, the Gluon GEMV with the early-launch trigger, in this order and
    # then again, so that none gains from its place
    from fastzoo.ops import int4_gemv_gluon as ig
    from fastzoo.ops._common import pdl_options

    variants = [("autotuned", {"gluon": None}), ("tl", {"gluon": False})]
    _, K0, w0, s0, z0 = layers[0]
    if ig.int4_gemv_gluon_applies(xs[K0], w0, s0, z0, group):
        pdl = pdl_options(xs[K0])["PDL"]
        trig = {(w.shape[0], K): dict(ig.tuned_config(xs[K], w, s, z, group, None, pdl), GLUON=True, trigger=True)
                for _, K, w, s, z in layers[:4]}
        variants.append(("gluon+trigger", {"trig": trig}))
    for variant, opts in variants * 2:
        def step(opts=opts):
            for name, K, w, s, z in layers:
                if "trig" in opts:
                    wol.int4_weight_only_linear_triton(xs[K], w, s, z, group, config=opts["trig"][(w.shape[0], K)])
                else:
                    wol.int4_weight_only_linear_triton(xs[K], w, s, z, group, gluon=opts["gluon"])

        # warm-up calls autotune outside the graph; then one graph of the whole step, replayed
        us = harness.bench(step, warmup=2, rep=max(5, args.rep // 5), device=dev, cuda_graph=True)["median_ms"] * 1e3
        gbs = nbytes / (us * 1e-6) / 1e9
        rows.append({"variant": variant, "us_per_step": us, "us_per_kernel": us / len(layers), "GB/s": gbs,
                     "%copy": 100 * gbs / copy_gbs, "kernels": len(layers), "MB": nbytes / 1e6,
                     "floor_us": nbytes / (copy_gbs * 1e9) * 1e6})
        print(f"  {variant}: {us:.0f} us a step ({gbs:.0f} GB/s, {rows[-1]['%copy']:.0f}% copy)", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape (wo), M = 1, few repeats, nothing saved")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    p.add_argument("--llama3", action="store_true", help="Llama-3-8B shapes instead of Llama-2-7B")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 8])
    p.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    p.add_argument("--copies", type=int, default=4, help="weight copies rotated (defeats the L2)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="time eager launches (host overhead included) instead of CUDA-graph replays")
    p.add_argument("--shapes", default=None, help="comma-separated subset of the layer names (wqkv,wo,w13,w2,output)")
    p.add_argument("--no-tinygemm", dest="tinygemm", action="store_false")
    p.add_argument("--kinds", default="bf16,int8,int4", type=lambda v: v.split(","),
                   help="comma-separated subset of bf16,int8,int4 (int4: each of --groups)")
    p.add_argument("--sweep", action="store_true",
                   help="time every tile configuration per shape and kind (ranked), instead of the ops")
    p.add_argument("--int8-wide", action="store_true",
                   help="with --sweep and int8 at M = 1: also time the wider int8 GEMV list (INT8_GEMV_SWEEP)")
    p.add_argument("--int8-variants", action="store_true",
                   help="with --sweep and int8 at M = 1: also time the autotuner's int8 GEMV tiles with "
                        "and without evict-first loads (INT8_GEMV_VARIANTS)")
    p.add_argument("--chain", action="store_true",
                   help="time one decode step's int4 g128 linears back to back in one CUDA graph (chain_bench)")
    args = p.parse_args(argv)
    unknown = set(args.kinds) - {"bf16", "int8", "int4"}
    if unknown:
        p.error(f"--kinds expects a comma-separated subset of bf16,int8,int4, got {','.join(sorted(unknown))}")
    harness.require_cuda("bench_weight_only_linear")
    model = "llama3_8b" if args.llama3 else "llama2_7b"
    shapes = LLAMA3_8B if args.llama3 else LLAMA2_7B
    if args.quick:
        shapes, args.ms, args.rep = {"wo": shapes["wo"]}, [1], 30
    copy_gbs = harness.measure_copy_bandwidth()
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s on {harness.gpu_name()}")
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
    if args.chain:
        if args.quick or args.shapes:
            p.error("--chain times a whole decode step's linears: it takes neither --quick nor --shapes")
        rows = chain_bench(model, shapes, args, copy_gbs)
        harness.print_table(rows, ["variant", "us_per_step", "us_per_kernel", "GB/s", "%copy", "floor_us"])
        path = harness.save_result(f"weight_only_linear_int4_chain_{model}", {"copy_gbs": copy_gbs, "rows": rows}, args,
                                   out_dir=args.out_dir)
        print(f"saved {path}")
        return
    if args.sweep:
        rows = []
        for M in args.ms:
            for name, (N, K) in shapes.items():
                print(f"{name} M={M} N={N} K={K}", flush=True)
                rows += sweep_shape(name, N, K, M, args, copy_gbs)
                torch.cuda.empty_cache()
        best = sweep_summary(rows)
        harness.print_table(best, ["shape", "M", "kind", "us", "GB/s", "%copy", "median_us", "n_configs", "config"])
        path = harness.save_result(_record_name("weight_only_linear_sweep", args),
                                   {"copy_gbs": copy_gbs, "rows": best, "all_configs": rows}, args,
                                   out_dir=args.out_dir)
        print(f"saved {path}")
        return
    compiled_int8 = torch.compile(_gpt_fast_int8, dynamic=False,
                                  options={"coordinate_descent_tuning": True})
    rows = []
    for M in args.ms:
        for name, (N, K) in shapes.items():
            print(f"{name} M={M} N={N} K={K}", flush=True)
            rows += bench_shape(name, N, K, M, args, copy_gbs, compiled_int8)
            torch.cuda.empty_cache()
    steps = step_rows(rows, model, copy_gbs)
    cols = ["shape", "M", "N", "K", "kind", "impl", "us", "GB/s", "%copy", "err", "fused_overhead_us"]
    harness.print_table(rows, cols)
    print()
    harness.print_table(steps, ["shape", "M", "kind", "impl", "us", "GB/s", "%copy", "tok/s"])
    errs = [r["err"] for r in rows if r["impl"] == "fastzoo" and "err" in r]
    worst = max(errs) if errs else math.nan
    print(f"\nmax rel err of the fastzoo kernels: {worst:.2e}")
    if not args.quick:
        path = harness.save_result(_record_name("weight_only_linear", args),
                                   {"copy_gbs": copy_gbs, "rows": rows, "steps": steps, "max_err": worst}, args,
                                   out_dir=args.out_dir)
        print(f"saved {path}")
    if not worst < 2e-2:
        raise SystemExit(f"kernel error too large: {worst}")


if __name__ == "__main__":
    main()
