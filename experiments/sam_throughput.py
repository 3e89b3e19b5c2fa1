"""SAM image-encoder throughput: fastzoo against segment_anything, same run, GPU only.

    python -m experiments.sam_throughput --model vit_b --batch-sizes 16          # default configs
    python -m experiments.sam_throughput --model vit_h --batch-sizes 1,8,16,32 --configs all
    python -m experiments.sam_throughput --quick                                 # vit_b, batch 16, few repeats

Configurations (``--configs``, comma-separated, or ``all``):

- ``sa-eager``: Meta's ``segment_anything`` image encoder, eager, in ``--dtype`` (the baseline);
- ``sa-compile``: the same under ``torch.compile`` (default mode);
- ``fz-ref-eager``: fastzoo's encoder with the reference attention (bias materialised + SDPA);
- ``fz-eager``: fastzoo's encoder with the fused rel-pos attention kernel, eager;
- ``fz-compile``: ``build_sam_fast``'s encoder (fused kernel, regional compile) without CUDA
  graphs (``compile_mode="default"``, as in every record before CUDA graphs became
  ``build_sam_fast``'s default on CUDA);
- ``fz-compile-max``: the same with ``compile_mode="max-autotune-no-cudagraphs"`` (inductor
  autotunes Triton GEMM templates, which can take the GELU into the GEMM's epilogue);
- ``fz-full-compile``: fused kernel, the whole encoder compiled as one graph;
- ``<any fz- compiled configuration>+cg`` (e.g. ``fz-compile+cg``): the same compiled with
  ``compile_mode="reduce-overhead"`` (CUDA graphs: one launch per compiled region;
  ``build_sam_fast``'s default on CUDA);
- ``fz-int8`` / ``fz-sparse`` / ``fz-int8+sparse`` / ``fz-int8static``: ``build_sam_fast(...,
  quantize=...)`` (``int8static``: calibrated on 4 random images like the other inputs; skipped
  with the reason where this tree's ``build_sam_fast`` has no such option).

For each: images/s (batch over the median time of ``--rep`` calls after warm-up, CUDA
events), TFLOP/s from the counted FLOPs of the encoder (``encoder_flops``) and % of the
bf16 matmul ceiling measured in the same run, peak memory, the cold time of the first call
(compile and autotuning included), and the accuracy of the image embeddings against the
fp32 reference (fastzoo's encoder in fp32 with the reference attention — equal to
``segment_anything``'s to 1e-5, see tests/sam): relative error and SQNR on the first two
images. Weights are random (the same for every configuration) and so are the images.
``--profile`` adds the top kernels by GPU time for the fastest configuration and its timeline: per call,
the span from the first kernel to the last, the time in kernels, the idle time between them and the
longest idle gaps (``kernel_timeline``; ``experiments.sam_gaps`` names what the host was doing in them).
One JSON per model under experiments/results/<gpu>/sam_throughput_<model>.json.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from experiments import harness
from fastzoo.sam.build import SAM_CONFIGS, build_sam_fast, build_sam_model
from fastzoo.utils import parse_dtype

ALL_CONFIGS = ["sa-eager", "sa-compile", "fz-ref-eager", "fz-eager", "fz-compile", "fz-compile-max", "fz-full-compile",
               "fz-int8", "fz-sparse", "fz-int8+sparse", "fz-int8static"]
DEFAULT_CONFIGS = ["sa-eager", "fz-ref-eager", "fz-eager", "fz-compile"]


def encoder_flops(model_type: str, img_size: int = 1024, patch: int = 16, window: int = 14) -> float:
    """Multiply-adds × 2 of one image through SAM's image encoder (matmuls, convs, attention).

    Projections and MLPs count the real tokens (fastzoo projects windowed blocks' tokens
    before padding them to whole windows; segment_anything also projects the padding:
    64 → 70 = 5 × 14 per side); attention counts Q·Kᵀ and P·V over the padded windows;
    the rel-pos terms q·R are included.
    """
    cfg = SAM_CONFIGS[model_type]
    C, depth, heads = cfg["encoder_embed_dim"], cfg["encoder_depth"], cfg["encoder_num_heads"]
    g = img_size // patch
    T = g * g
    hd = C // heads
    gp = math.ceil(g / window) * window
    n_win = (gp // window) ** 2
    flops = 2 * T * (3 * patch * patch) * C  # patch embedding
    for i in range(depth):
        is_global = i in cfg["encoder_global_attn_indexes"]
        side = g if is_global else window
        n = side * side
        groups = 1 if is_global else n_win
        flops += 2 * T * C * (3 * C + C + 2 * 4 * C)  # qkv, proj, mlp (ratio 4) on the real tokens
        flops += groups * heads * (4 * n * n * hd + 2 * n * 2 * side * hd)  # QKᵀ, PV; q·R_h, q·R_w
    flops += 2 * T * C * 256 + 2 * T * 256 * 256 * 9  # neck: 1x1 and 3x3 convs
    return float(flops)


def _sa_encoder(model_type: str, fz_encoder: torch.nn.Module):
    """segment_anything's encoder with the same weights as ``fz_encoder`` (keys are identical)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        sam = sam_model_registry[model_type]()
    enc = sam.image_encoder
    enc.load_state_dict(fz_encoder.state_dict(), strict=True, assign=True)
    return enc


def build_config(name: str, model_type: str, base_sam, dtype, device):
    """The image encoder of configuration ``name`` (a callable on (B, 3, H, W) images)."""
    if name.startswith("sa-"):
        enc = _sa_encoder(model_type, copy.deepcopy(base_sam.image_encoder)).to(device=device, dtype=dtype).eval()
        return torch.compile(enc) if name == "sa-compile" else enc
    # compiled fz- configurations run without CUDA graphs ("default": as every record before
    # build_sam_fast made CUDA graphs its default on CUDA), "+cg" with them (that default)
    kwargs = {"compile_mode": "default"}
    if name.startswith("fz-") and name.endswith("+cg"):  # the same, compiled with CUDA graphs
        name = name[:-len("+cg")]
        kwargs["compile_mode"] = "reduce-overhead"
    if name in ("fz-ref-eager", "fz-eager"):
        kwargs = {"compile": False, "kernel": "sdpa" if name == "fz-ref-eager" else "fused"}
    elif name == "fz-full-compile":
        kwargs["compile"] = "full"
    elif name == "fz-compile-max":
        kwargs["compile_mode"] = "max-autotune-no-cudagraphs"
    elif name != "fz-compile":
        kwargs["quantize"] = name[len("fz-"):]
        if name == "fz-int8static":
            kwargs["calibration"] = [torch.randn(4, 3, 1024, 1024)]
    # build_sam_fast with the shared random weights, so every configuration computes the same function
    sam = _build_fast_from(base_sam, model_type, device, dtype, kwargs)
    return sam.image_encoder


def _build_fast_from(base_sam, model_type, device, dtype, kwargs):
    """``build_sam_fast`` with the weights of ``base_sam`` (through a temporary checkpoint)."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sam.pth")
        torch.save(base_sam.state_dict(), path)
        return build_sam_fast(model_type, path, device=device, dtype=dtype, **kwargs)


def random_sam(model_type: str):
    """The reference SAM model every configuration is built from: seed 0, its relative-position
    tables random too (zeros in a fresh model)."""
    torch.manual_seed(0)
    base = build_sam_model(model_type)
    with torch.no_grad():
        for n, p in base.image_encoder.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.02)
    return base


def config_error(name: str) -> str | None:
    """Why ``name`` is not a configuration of this benchmark (None if it is): one of
    ``ALL_CONFIGS``, or a compiled fz- one of the default mode followed by ``+cg``."""
    base = name[:-len("+cg")] if name.endswith("+cg") else name
    if base not in ALL_CONFIGS or (base != name and (not base.startswith("fz-")
                                                     or base in ("fz-ref-eager", "fz-eager", "fz-compile-max"))):
        return (f"expects names among {ALL_CONFIGS} (a compiled fz- one of the default mode may end in +cg), "
                f"got {name!r}")
    return None


def run_model(args, model_type: str, device, dtype, bf16_tflops: float) -> dict:
    base = random_sam(model_type)
    flops = encoder_flops(model_type)
    check_imgs = torch.randn(2, 3, 1024, 1024, device=device)
    ref_enc = copy.deepcopy(base.image_encoder).to(device).eval()
    for m in ref_enc.modules():
        if hasattr(m, "fused_attention"):
            m.fused_attention = False
    with torch.inference_mode():
        ref_out = ref_enc(check_imgs).float()
    del ref_enc
    torch.cuda.empty_cache()

    results = {}
    fastest = (0.0, None, None)  # (img/s, name, encoder): kept for --profile, the others are freed
    for name in args.configs:
        try:
            enc = build_config(name, model_type, base, dtype, device)
        except (NotImplementedError, ValueError) as e:
            print(f"  {model_type} {name}: skipped ({e})")
            results[name] = {"skipped": str(e)}
            continue
        entry = {"batches": {}}
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = enc(check_imgs.to(dtype)).float()
            torch.cuda.synchronize()
            entry["first_call_s"] = time.perf_counter() - t0
            entry["embed_rel_err"] = harness.rel_err(out, ref_out)
            entry["embed_sqnr_db"] = harness.sqnr_db(out, ref_out)
            for bs in args.batch_sizes:
                imgs = [torch.randn(bs, 3, 1024, 1024, device=device, dtype=dtype) for _ in range(2)]
                t0 = time.perf_counter()
                enc(imgs[0])
                torch.cuda.synchronize()
                cold = time.perf_counter() - t0
                t = harness.bench(enc, inputs=imgs, warmup=args.warmup, rep=args.rep, device=device)
                mem = harness.peak_memory(lambda: enc(imgs[0]), device)
                ips = bs / (t["median_ms"] * 1e-3)
                tflops = ips * flops / 1e12
                entry["batches"][str(bs)] = {
                    "img_per_s": ips, "median_ms": t["median_ms"], "p10_ms": t["p10_ms"], "p90_ms": t["p90_ms"],
                    "tflops": tflops, "pct_bf16_ceiling": 100 * tflops / bf16_tflops,
                    "peak_mem_gib": mem / 2**30, "cold_s": cold,
                }
                print(f"  {model_type} {name:16s} batch {bs:3d}: {ips:8.1f} img/s  {tflops:6.1f} TFLOP/s "
                      f"({100 * tflops / bf16_tflops:4.1f}% of bf16)  mem {mem / 2**30:5.1f} GiB  "
                      f"first call {entry['first_call_s']:6.1f} s  emb rel.err {entry['embed_rel_err']:.2e} "
                      f"SQNR {entry['embed_sqnr_db']:.1f} dB", flush=True)
        results[name] = entry
        best_ips = max(b["img_per_s"] for b in entry["batches"].values())
        if args.profile and best_ips > fastest[0]:
            fastest = (best_ips, name, enc)
        del enc
        torch.cuda.empty_cache()
    if args.profile and fastest[1] is not None:
        top, idle = profile_top(fastest[2], args, device, dtype)
        results["profile"] = {"config": fastest[1], "top_kernels": top, "timeline": idle}
    rows = [{"config": name, "batch": int(bs), "img_s": round(b["img_per_s"], 1), "tflops": round(b["tflops"], 1),
             "pct_bf16": round(b["pct_bf16_ceiling"], 1), "peak_mem_gib": round(b["peak_mem_gib"], 2),
             "first_call_s": round(r["first_call_s"], 1), "embed_sqnr_db": round(r["embed_sqnr_db"], 1)}
            for name, r in results.items() if isinstance(r, dict) and "batches" in r
            for bs, b in r["batches"].items()]
    return {"flops_per_image": flops, "configs": results, "rows": rows}


def idle_gaps(intervals: list[tuple[float, float, str]]) -> tuple[float, list[tuple[float, float, float, str, str]]]:
    """The union of kernel intervals (start_us, end_us, name) as busy time, and the idle gaps
    between them, longest first: (length, start, end, kernel before, kernel after)."""
    intervals = sorted(intervals)
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_name = intervals[0]
    for start, end, name in intervals[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_end, start, cur_name, name))
            cur_start, cur_end = start, end
        elif end > cur_end:
            cur_end = end
        if end >= cur_end:
            cur_name = name
    busy += cur_end - cur_start
    gaps.sort(reverse=True)
    return busy, gaps


def kernel_timeline(intervals: list[tuple[float, float, str]], calls: int, top: int = 8) -> dict:
    """GPU time between the first kernel's start and the last one's end of ``calls`` calls, split
    into kernel time (the union of the intervals) and idle time, per call, with the ``top`` longest
    idle gaps and the kernels on either side. ``intervals``: (start_us, end_us, name)."""
    busy, gaps = idle_gaps(intervals)
    span = max(e for _, e, _ in intervals) - min(s for s, _, _ in intervals)
    return {"span_ms_per_call": span / calls / 1e3, "busy_ms_per_call": busy / calls / 1e3,
            "idle_ms_per_call": (span - busy) / calls / 1e3, "gaps_per_call": len(gaps) / calls,
            "longest_gaps": [{"us": g, "after": a[:80], "before": b[:80]} for g, _, _, a, b in gaps[:top]]}


def profile_top(enc, args, device, dtype, top: int = 15) -> tuple[list[dict], dict]:
    """The top kernels of 3 calls under the profiler, and their timeline (``kernel_timeline``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    bs = max(args.batch_sizes)
    x = torch.randn(bs, 3, 1024, 1024, device=device, dtype=dtype)
    with torch.inference_mode():
        enc(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                enc(x)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    rows = [{"kernel": e.key[:120], "pct": 100 * e.self_device_time_total / total,
             "ms_per_call": e.self_device_time_total / 3 / 1e3, "count_per_call": e.count / 3} for e in events[:top]]
    print("  top kernels:")
    for r in rows:
        print(f"    {r['pct']:5.1f}%  {r['ms_per_call']:7.2f} ms  x{r['count_per_call']:.0f}  {r['kernel']}")
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    timeline = kernel_timeline(kernels, 3) if kernels else {}
    if timeline:
        print(f"  timeline a call: {timeline['span_ms_per_call']:.2f} ms, kernels {timeline['busy_ms_per_call']:.2f}, "
              f"idle {timeline['idle_ms_per_call']:.3f} in {timeline['gaps_per_call']:.0f} gaps; longest:")
        for g in timeline["longest_gaps"]:
            print(f"    {g['us']:7.1f} us  after {g['after'][:50]}  before {g['before'][:50]}")
    return rows, timeline


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b", help="comma-separated SAM sizes: vit_b, vit_l, vit_h")
    p.add_argument("--batch-sizes", default="16")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated of {ALL_CONFIGS} or 'all'")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="top kernels of the fastest configuration")
    p.add_argument("--quick", action="store_true", help="vit_b, batch 16, 2 warm-up + 5 timed calls")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch_sizes, args.warmup, args.rep = "vit_b", "16", 2, 5
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    for m in args.models:
        if m not in SAM_CONFIGS:
            p.error(f"--model expects names among {sorted(SAM_CONFIGS)}, got {m!r}")
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    args.configs = ALL_CONFIGS if args.configs == "all" else [c.strip() for c in args.configs.split(",")]
    for c in args.configs:
        if config_error(c):
            p.error(f"--configs {config_error(c)}")
    dtype = parse_dtype(args.dtype)
    device = harness.require_cuda("the SAM throughput benchmark")
    bf16 = harness.measure_matmul_tflops(torch.bfloat16)
    print(f"bf16 matmul ceiling {bf16:.0f} TFLOP/s")
    for m in args.models:
        figures = {"model": m, "dtype": args.dtype, "bf16_tflops_ceiling": bf16, **run_model(args, m, device, dtype, bf16)}
        print("saved", harness.save_result(f"sam_throughput_{m}", figures, args, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
