"""Benchmark the fused decode attention (fastzoo.ops.decode_attention), GPU only.

    python -m experiments.bench_decode_attention            # B 1 and 8, kv_len 128/256/1024/4096
    python -m experiments.bench_decode_attention --quick    # B 1, kv_len 128/256/1024/4096, few repeats
    python -m experiments.bench_decode_attention --quick --split-lens 16,32,64,128   # + forced slice sizes
    python -m experiments.bench_decode_attention --kv-int8  # int8 caches with a scale per slot and head

One decode token of one Llama-2-7B attention layer (32 heads, head_dim 128, bf16): RoPE
of q and the new k, the cache write at the token's position and attention over slots
0..pos, with q/k/v slices of one fused wqkv output, as in ``fastzoo.llama.model``. Every
sequence sits at the last slot (pos = kv_len - 1): the whole cache is read. Timed in the
same run (µs per call: medians of CUDA-graph replays of ``--inner`` back-to-back calls, as
the 32 layers of a decode step run them, divided by ``--inner``; the calls rotate over
``--copies`` cache sets so the 50 MB L2 does not hold the caches between calls):

- ``fused``: ``decode_attention`` (the Triton kernel: one launch; the cache slices of the
  default ``split_len`` — recorded with the number of slices — merge in the same launch);
- ``split<n>`` (``--split-lens``): the kernel with ``n`` slots per slice forced (what the
  default's choice is tuned against);
- ``compiled_ref``: ``decode_attention_ref`` compiled by inductor (fullgraph, static
  shapes, the SDPA math backend as ``fastzoo.llama.generate`` compiles decode steps):
  what a compiled decode step ran before this op;
- ``eager_ref``: the reference in eager PyTorch (for context).

``--kv-int8``: int8 caches with an fp32 scale per (sequence, kv head, slot), every row the
same with them (the kernel reads the int8 tiles and applies each slot's scale to its score and
softmax weight; the references dequantize the whole cache), KV bytes 2 · B · heads · kv_len ·
(128 + 4).

Rates: KV bytes read (2 · B · heads · kv_len · 128 · 2 bytes) over the time, in GB/s and
in % of the device-to-device copy bandwidth measured in the same run (harness). ``err``:
max |fused − ref| / max |ref| against the reference in fp32 on the same (rounded) inputs.
"""
from __future__ import annotations

import argparse
import math

import torch

from experiments import harness
from fastzoo.ops.decode_attention import _split_len, decode_attention, decode_attention_ref, decode_attention_triton
from fastzoo.ops.quantize_rows import quantize_rows_int8_ref

H, HK, D = 32, 32, 128  # Llama-2-7B attention


def make_inputs(B, kv_len, dtype, device, seed, kv_int8=False):
    """q, k, v, inv_freq, input_pos, k_cache, v_cache (+ k_scales, v_scales with ``kv_int8``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    fused = torch.randn(B, 1, (H + 2 * HK) * D, device=device, generator=g).to(dtype)
    q, k, v = fused.split([H * D, HK * D, HK * D], dim=-1)
    q, k, v = q.view(B, 1, H, D), k.view(B, 1, HK, D), v.view(B, 1, HK, D)
    pos = torch.full((B, 1), kv_len - 1, dtype=torch.int64, device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    k_cache = torch.randn(B, HK, kv_len, D, device=device, generator=g).to(dtype)
    v_cache = torch.randn(B, HK, kv_len, D, device=device, generator=g).to(dtype)
    if kv_int8:
        (k_cache, k_scales), (v_cache, v_scales) = quantize_rows_int8_ref(k_cache), quantize_rows_int8_ref(v_cache)
        return [q, k, v, inv_freq, pos, k_cache, v_cache, k_scales, v_scales]
    return [q, k, v, inv_freq, pos, k_cache, v_cache]


def _call(fn, s, kv_len, **kw):
    """fn(q, ..., v_cache, kv_len[, k_scales, v_scales]) on an input set of make_inputs."""
    scales = dict(k_scales=s[7], v_scales=s[8]) if len(s) > 7 else {}
    return fn(*s[:7], kv_len, **kw, **scales)


def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def bench_shape(B, kv_len, dtype, device, args, copy_gbs):
    kv_bytes = 2 * B * HK * kv_len * (D + 4 if args.kv_int8 else D * torch.tensor([], dtype=dtype).element_size())
    # enough sets that one pass over them (150 MB) does not fit in L2, at most 64
    copies = max(2, min(64, math.ceil(150e6 / kv_bytes))) if args.copies is None else args.copies
    inner = max(1, min(args.inner, copies))
    sets = [make_inputs(B, kv_len, dtype, device, seed, args.kv_int8) for seed in range(copies)]
    groups = [[sets[(i * inner + j) % copies] for j in range(inner)] for i in range(copies)]

    def t_us(fn):
        def run(group):
            for s in group:
                fn(s)
        r = harness.bench(run, inputs=groups, warmup=args.warmup, rep=args.rep, device=device, cuda_graph=True)
        return r["median_ms"] * 1e3 / inner

    # accuracy, on copies of the first set (the caches are mutated)
    first = sets[0]
    fused_out = _call(decode_attention, [t.clone() for t in first], kv_len)
    ref32 = _call(decode_attention_ref, [t.float() if t.dtype in (torch.bfloat16, torch.float16) else t.clone()
                                         for t in first], kv_len)
    err = float((fused_out.float() - ref32).abs().max() / ref32.abs().max())

    torch._dynamo.reset()
    compiled = torch.compile(decode_attention_ref, fullgraph=True, dynamic=False)
    with _math_sdpa():
        _call(compiled, [t.clone() for t in first], kv_len)  # compile outside the timing
        us_ref = t_us(lambda s: _call(compiled, s, kv_len))
        us_eager = t_us(lambda s: _call(decode_attention_ref, s, kv_len))
    us_fused = t_us(lambda s: _call(decode_attention, s, kv_len))
    split_len = _split_len(kv_len, B * HK, device)

    def gbs(us):
        return kv_bytes / (us * 1e-6) / 1e9

    row = {"B": B, "kv_len": kv_len, "dtype": str(dtype).replace("torch.", ""), "kv_MB": kv_bytes / 1e6,
           "kv_cache": "int8" if args.kv_int8 else "model dtype",
           "copies": copies, "inner": inner, "split_len": split_len, "slices": -(-kv_len // split_len),
           "fused_us": us_fused, "compiled_ref_us": us_ref, "eager_ref_us": us_eager,
           "fused_GBs": gbs(us_fused), "compiled_ref_GBs": gbs(us_ref),
           "fused_pct_copy": 100 * gbs(us_fused) / copy_gbs, "compiled_ref_pct_copy": 100 * gbs(us_ref) / copy_gbs,
           "speedup_vs_compiled": us_ref / us_fused, "speedup_vs_eager": us_eager / us_fused, "err": err}
    for n in args.split_lens:
        row[f"split{n}_us"] = t_us(lambda s, n=n: _call(decode_attention_triton, s, kv_len, split_len=n))
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B 1, kv_len 128/256/1024/4096, few repeats")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--kv-lens", default="128,256,1024,4096", help="comma-separated kv lengths")
    p.add_argument("--split-lens", default="",
                   help="comma-separated slots per slice (multiples of 16) also timed with the kernel forced to them")
    p.add_argument("--inner", type=int, default=8, help="back-to-back calls per timed CUDA-graph replay")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--kv-int8", action="store_true", help="int8 caches with a scale per slot and head")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    p.add_argument("--rep", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--copies", type=int, default=None,
                   help="cache sets rotated between calls (default: enough for 150 MB, 2 to 64)")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    args.rep = args.rep or (20 if args.quick else 100)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        kv_lens = [int(n) for n in args.kv_lens.split(",") if n.strip()]
        args.split_lens = [int(n) for n in args.split_lens.split(",") if n.strip()]
    except ValueError as e:
        p.error(f"--batches / --kv-lens / --split-lens: expected comma-separated integers ({e})")
    bad = [n for n in args.split_lens if n <= 0 or n % 16]
    if bad:
        p.error(f"--split-lens: expected positive multiples of 16, got {bad}")
    if args.quick:
        batches, kv_lens = [1], [128, 256, 1024, 4096]
    device = harness.require_cuda("experiments/bench_decode_attention.py")

    copy_gbs = harness.measure_copy_bandwidth()
    print(f"{harness.gpu_name()}: measured copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    for B in batches:
        for kv_len in kv_lens:
            row = bench_shape(B, kv_len, dtype, device, args, copy_gbs)
            rows.append(row)
            print(f"  B={B} kv_len={kv_len}: fused {row['fused_us']:.1f} us, compiled ref "
                  f"{row['compiled_ref_us']:.1f} us, eager ref {row['eager_ref_us']:.1f} us", flush=True)
    print("\nOne Llama-2-7B layer, one token per sequence; µs per call = median of CUDA-graph replays of"
          f" {args.inner} calls / {args.inner}; GB/s = KV bytes read / time; pct_copy = % of the copy bandwidth.")
    harness.print_table(rows, ["B", "kv_len", "kv_MB", "slices", "fused_us", "compiled_ref_us", "eager_ref_us",
                               "fused_GBs", "fused_pct_copy", "compiled_ref_pct_copy", "speedup_vs_compiled", "err",
                               *[f"split{n}_us" for n in args.split_lens]])
    figures = {"copy_GBs": copy_gbs, "heads": H, "kv_heads": HK, "head_dim": D, "rows": rows}
    name = ("decode_attention_quick" if args.quick else "decode_attention") + ("_kv_int8" if args.kv_int8 else "")
    print("saved", harness.save_result(name, figures, args, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
