"""Benchmark the int8 GEMM with fused epilogues and the int8 attention, GPU only.

    python -m experiments.bench_int8_mm            # all shapes, JSON under experiments/results/<gpu>/
    python -m experiments.bench_int8_mm --quick    # ViT-L fc1 + attention at 197, few repeats, nothing saved
    python -m experiments.bench_int8_mm --sweep    # every config of the Hopper persistent kernel, JSON int8_mm_sweep

GEMM shapes: ViT-L/16-224 at batch 512 (M = 512·197 = 100864 tokens; qkv / proj / fc1 /
fc2, K and N in {1024, 3072, 4096}: the goal shapes), the linears of SAM's image encoder
at batch 16 (M = 16·64·64 = 65536; vit_b and vit_h) and 8192³. For each (M, N, K), timed in
the same run:

1. ``fused``: ``int8_scaled_mm`` (Triton; int32 accumulator dequantized in registers);
2. ``unfused``: ``torch._int_mm`` (cuBLAS, column-major B) followed by the epilogue in
   eager PyTorch (int32 → fp32 · scales + bias → bf16), as torchao-style int8 dynamic
   quantization does without a fused kernel; ``int_mm`` alone is reported too;
3. ``bf16``: ``F.linear`` in bfloat16 (cuBLAS), the baseline;
4. ``dyn``: the full ``int8_dynamic_linear`` (per-token quantization + fused GEMM) on
   bf16 activations, against ``bf16`` — the number that matters for a quantized model;
5. ``static``: the static-mode epilogue (per-tensor a_scale, int8 output re-quantized with
   a per-tensor scale; plus GELU for the fc1 shapes): int8 in, int8 out.

Attention (``int8_attention`` vs ``F.scaled_dot_product_attention`` on bf16, flash): ViT-L
heads (16 × 64) at sequence 197 (batch 512), 577 (batch 128) and 785 (batch 64);
``int8dq``: int8 q/k/v with per-token scales, bf16 out; ``int8static``: per-tensor scales,
int8 out; ``int8_vbf16``: int8 q/k, bf16 v. TFLOP/s = 4·B·H·N²·D / time.

Goal (H100): int8 GEMM ≥ 1.6× the bf16 matmul at the ViT-L shapes (``fused_vs_bf16``).
Rates are 2·M·N·K over the time (TOP/s for int8, TFLOP/s for bf16), and percentages of
the int8 / bf16 matmul ceilings measured in the same run (8192³, harness). Accuracy:
``fused_err`` = max|out − ref| / max|ref| against ``int8_scaled_mm_ref`` (exact product
via ``torch._int_mm``); ``dyn_sqnr_db`` = SQNR of the dynamic linear against the fp32
linear of the same bf16 inputs.

``--sweep`` (Hopper): every candidate configuration of the persistent TMA kernel
(``TMA_SWEEP_CONFIGS``: tile, stages, warps, CTAs per SM, epilogue subtiles, flattened
loop, warp specialization) forced one at a time at the four ViT-L shapes (M = 100864) in
three epilogue variants, next to bf16 ``F.linear``, ``torch._int_mm`` and the public op
(autotuned): ``bare`` (per-token a_scale, bias, bf16 out), ``dyn`` (the int8-dynamic ViT
block's epilogues: proj/fc2 add the residual, fc1 applies GELU) and ``static`` (per-tensor
a_scale; qkv writes int8 with a per-channel out_scale, fc1 GELU + int8 out, proj/fc2 bf16
with the residual). All configurations are compiled first in parallel worker processes
(Triton's on-disk cache), so the sweep stays within ~3 minutes. Per config and case:
median ms, TOP/s, speed-up over bf16, error against ``int8_scaled_mm_ref`` (float: max
|out − ref| / max |ref|; int8: share of values that differ and the largest difference),
registers / spills / shared memory of the compiled kernel, or the compile/launch error.
The JSON (``int8_mm_sweep``) is rewritten after each shape, so an interrupted sweep keeps
what it measured.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from experiments import harness
from fastzoo.ops import int8_mm
from fastzoo.ops.int8_mm import (_int8_scaled_mm_kernel, int8_dynamic_linear, int8_scaled_mm, int8_scaled_mm_ref,
                                 int8_scaled_mm_triton)
from fastzoo.ops.quantize_rows import quantize_rows_int8

SAM_TOKENS = 16 * 64 * 64  # batch 16 of 64×64 image-embedding tokens
VIT_L_TOKENS = 512 * 197  # ViT-L/16-224 at batch 512
VIT_L = {"vit_l.qkv": (3072, 1024), "vit_l.proj": (1024, 1024), "vit_l.fc1": (4096, 1024), "vit_l.fc2": (1024, 4096)}
ATTN = [(197, 512), (577, 128), (785, 64)]  # (sequence, batch) with ViT-L's 16 heads of 64
VIT_B = {"vit_b.qkv": (2304, 768), "vit_b.proj": (768, 768), "vit_b.lin1": (3072, 768), "vit_b.lin2": (768, 3072)}
VIT_H = {"vit_h.qkv": (3840, 1280), "vit_h.proj": (1280, 1280), "vit_h.lin1": (5120, 1280),
         "vit_h.lin2": (1280, 5120)}


def shapes(quick: bool) -> list[tuple[str, int, int, int]]:
    if quick:
        return [("vit_l.fc1", VIT_L_TOKENS, 4096, 1024)]
    out = [(name, VIT_L_TOKENS, n, k) for name, (n, k) in VIT_L.items()]
    out += [(name, SAM_TOKENS, n, k) for name, (n, k) in {**VIT_B, **VIT_H}.items()]
    out.append(("square", 8192, 8192, 8192))
    return out


def _chosen_config(a, b, out, tl: bool = False) -> str:
    """The kernel of the last call: on Hopper at large M the Gluon kernel's fixed tile (the public
    op) or, with ``tl``, the tl persistent kernel's autotuned choice; else the plain kernel's."""
    from fastzoo.ops import int8_mm_gluon

    if not tl and int8_mm._tma_path_applies(a, b, out, None) and int8_mm_gluon.gluon_path_applies(a, out, None):
        return "gluon " + str(int8_mm_gluon.default_config(a.shape[1]))
    if int8_mm._tma_path_applies(a, b, out, None):
        best = getattr(int8_mm._int8_scaled_mm_tma, "best_config", None)
        return "persistent " + (int8_mm.tma_config_name(best) if best is not None else "?")
    return str(getattr(_int8_scaled_mm_kernel, "best_config", "?"))


def _unfused(a, b_t, a_s, b_s, bias):
    acc = torch._int_mm(a, b_t)
    return (acc.to(torch.float32) * a_s * b_s + bias).to(torch.bfloat16)


def bench_shape(name, M, N, K, device, rep, n_inputs, int8_tops, bf16_tflops):
    g = torch.Generator(device=device).manual_seed(M + N + K)
    xs = [torch.randn(M, K, device=device, generator=g).to(torch.bfloat16) for _ in range(n_inputs)]
    w = (torch.randn(N, K, device=device, generator=g) * K**-0.5).to(torch.bfloat16)
    bias = (torch.randn(N, device=device, generator=g) * 0.1).to(torch.bfloat16)
    w_q, w_s = quantize_rows_int8(w)
    w_s = w_s.reshape(N)
    w_q_t = w_q.t()  # (K, N) column-major: cuBLAS int8's fast layout
    qs = [quantize_rows_int8(x) for x in xs]  # (a, a_scale) per input

    # Accuracy (also triggers autotuning before anything is timed).
    a0, s0 = qs[0]
    out = int8_scaled_mm(a0, w_q, s0, w_s, bias)
    ref = int8_scaled_mm_ref(a0, w_q, s0, w_s, bias)
    fused_err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    config = _chosen_config(a0, w_q, out)
    dyn = int8_dynamic_linear(xs[0], w_q, w_s, bias)
    dyn_sqnr = harness.sqnr_db(dyn, F.linear(xs[0].float(), w.float(), bias.float()))
    del out, ref, dyn

    t = {}
    t["fused"] = harness.bench(lambda q: int8_scaled_mm(q[0], w_q, q[1], w_s, bias), inputs=qs, rep=rep, cuda_graph=True)
    # Hopper, large M: the public op takes the Gluon kernel (async wgmma); the tl persistent kernel beside it
    out_like = torch.empty(0, N, device=device, dtype=torch.bfloat16)  # for the path checks: dtype and strides
    tl_path = int8_mm._tma_path_applies(a0, w_q, out_like, None)
    if tl_path:
        t["fused_tl"] = harness.bench(lambda q: int8_scaled_mm_triton(q[0], w_q, q[1], w_s, bias, gluon=False),
                                      inputs=qs, rep=rep, cuda_graph=True)
        config_tl = _chosen_config(a0, w_q, out_like, tl=True)
    t["int_mm"] = harness.bench(lambda q: torch._int_mm(q[0], w_q_t), inputs=qs, rep=rep, cuda_graph=True)
    t["unfused"] = harness.bench(lambda q: _unfused(q[0], w_q_t, q[1], w_s, bias), inputs=qs, rep=rep, cuda_graph=True)
    t["bf16"] = harness.bench(lambda x: F.linear(x, w, bias), inputs=xs, rep=rep, cuda_graph=True)
    t["quant"] = harness.bench(lambda x: quantize_rows_int8(x), inputs=xs, rep=rep, cuda_graph=True)
    t["dyn"] = harness.bench(lambda x: int8_dynamic_linear(x, w_q, w_s, bias), inputs=xs, rep=rep, cuda_graph=True)
    a_t = torch.tensor([0.02], device=device)  # per-tensor static scales
    o_t = torch.tensor([0.05], device=device)
    act = "gelu" if "fc1" in name or "lin1" in name else "none"
    t["static"] = harness.bench(lambda q: int8_scaled_mm(q[0], w_q, a_t, w_s, bias, torch.int8, activation=act,
                                                         out_scale=o_t), inputs=qs, rep=rep, cuda_graph=True)
    if tl_path:
        t["static_tl"] = harness.bench(lambda q: int8_scaled_mm_triton(q[0], w_q, a_t, w_s, bias, torch.int8,
                                                                       activation=act, out_scale=o_t, gluon=False),
                                       inputs=qs, rep=rep, cuda_graph=True)

    ops = 2.0 * M * N * K
    ms = {k: v["median_ms"] for k, v in t.items()}
    rate = {k: ops / (v * 1e-3) / 1e12 for k, v in ms.items()}
    row = {"shape": name, "M": M, "N": N, "K": K}
    for k in ("fused", "int_mm", "unfused", "bf16", "quant", "dyn", "static"):
        row[f"{k}_ms"] = ms[k]
    row["fused_tops"] = rate["fused"]
    row["fused_pct_int8"] = 100 * rate["fused"] / int8_tops
    row["int_mm_pct_int8"] = 100 * rate["int_mm"] / int8_tops
    row["unfused_tops"] = rate["unfused"]
    row["bf16_tflops"] = rate["bf16"]
    row["bf16_pct"] = 100 * rate["bf16"] / bf16_tflops
    row["fused_vs_unfused"] = harness.speedup(ms["unfused"], ms["fused"])
    row["fused_vs_bf16"] = harness.speedup(ms["bf16"], ms["fused"])
    row["dyn_vs_bf16"] = harness.speedup(ms["bf16"], ms["dyn"])
    row["static_tops"] = rate["static"]
    row["static_vs_bf16"] = harness.speedup(ms["bf16"], ms["static"])
    row["int_mm_vs_bf16"] = harness.speedup(ms["bf16"], ms["int_mm"])
    for k in ("fused", "static"):
        if f"{k}_tl" in ms:  # the Gluon kernel (public op) against the tl persistent kernel
            row[f"{k}_tl_tops"] = rate[f"{k}_tl"]
            row[f"{k}_vs_tl"] = harness.speedup(ms[f"{k}_tl"], ms[k])
    row["timing"] = "CUDA-graph replays (the kernels' time, not the host's launch)"
    row["fused_err"] = fused_err
    row["dyn_sqnr_db"] = dyn_sqnr
    row["config"] = config
    if tl_path:
        row["config_tl"] = config_tl
    row["timings"] = t
    return row


def bench_attention(N, B, device, rep, H=16, D=64):
    """int8_attention variants vs SDPA (bf16) on ViT-L heads; returns one row."""
    from fastzoo.ops.int8_attention import int8_attention, int8_attention_ref

    g = torch.Generator(device=device).manual_seed(N)
    qkv = torch.randn(B, N, 3, H, D, device=device, generator=g).to(torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    q8, s5 = quantize_rows_int8(qkv)
    q8s = [q8[:, :, i].transpose(1, 2) for i in range(3)]
    ss = [s5[:, :, i, :, 0].transpose(1, 2) for i in range(3)]
    st = [(qkv[:, :, i].float().abs().amax() / 127).reshape(1) for i in range(3)]
    q8t = [torch.clamp(torch.round(qkv[:, :, i].float() / st[i]), -127, 127).to(torch.int8).transpose(1, 2)
           for i in range(3)]
    o_s = torch.tensor([0.01], device=device)
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "int8dq": lambda: int8_attention(*q8s, *ss),
        "int8_vbf16": lambda: int8_attention(q8s[0], q8s[1], v, ss[0], ss[1]),
        "int8static": lambda: int8_attention(*q8t, *st, out_dtype=torch.int8, out_scale=o_s),
    }
    out = fns["int8dq"]()
    ref = int8_attention_ref(*q8s, *ss)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    sqnr_vs_bf16 = harness.sqnr_db(out, fns["sdpa"]().float())
    flops = 4.0 * B * H * N * N * D
    row = {"seq": N, "batch": B, "heads": H, "head_dim": D, "rel_err_vs_ref": err, "sqnr_vs_sdpa_db": sqnr_vs_bf16}
    for name, fn in fns.items():
        t = harness.bench(fn, rep=rep)
        row[f"{name}_ms"] = t["median_ms"]
        row[f"{name}_tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
    for name in ("int8dq", "int8_vbf16", "int8static"):
        row[f"{name}_vs_sdpa"] = harness.speedup(row["sdpa_ms"], row[f"{name}_ms"])
    from fastzoo.ops.int8_attention import _int8_attention_kernel
    row["config"] = str(getattr(_int8_attention_kernel, "best_config", "?"))
    return row


# ----------------------------------------------------------------------------------
# --sweep: every configuration of the Hopper persistent kernel at the ViT-L shapes
# ----------------------------------------------------------------------------------
SWEEP_VARIANTS = ("bare", "dyn", "static")


# --sweep-shapes: (tokens, linears) of each model; SAM's lin1 / lin2 are the MLP's fc1 / fc2
SWEEP_SHAPES = {"vit_l": (VIT_L_TOKENS, VIT_L), "sam_vit_b": (SAM_TOKENS, VIT_B), "sam_vit_h": (SAM_TOKENS, VIT_H)}


def _case_spec(shape: str, variant: str) -> dict:
    """The epilogue of one (linear, variant): what the int8 block asks of the GEMM. ViT-L's
    static qkv writes int8 for the int8 attention; SAM's writes bf16 for its rel-pos
    attention."""
    layer = {"lin1": "fc1", "lin2": "fc2"}.get(shape.split(".")[-1], shape.split(".")[-1])
    spec = {"per_tensor_a": variant == "static", "residual": False, "gelu": False, "out_scale": None}
    if variant == "bare":
        return spec
    spec["residual"] = layer in ("proj", "fc2")
    spec["gelu"] = layer == "fc1"
    if variant == "static" and layer == "fc1":
        spec["out_scale"] = "tensor"
    if variant == "static" and layer == "qkv" and shape.startswith("vit_l."):
        spec["out_scale"] = "channel"
    return spec


def _spec_key(spec: dict) -> tuple:
    return tuple(sorted(spec.items()))


def _spec_args(spec, a_s_tok, device, residual=None, out_scale=None):
    """(a_scale, out_dtype, keyword arguments) of a case."""
    a_s = torch.full((1,), 0.02, device=device) if spec["per_tensor_a"] else a_s_tok
    kw = {"activation": "gelu" if spec["gelu"] else "none", "residual": residual if spec["residual"] else None,
          "out_scale": out_scale}
    return a_s, (torch.int8 if spec["out_scale"] else torch.bfloat16), kw


def _precompile(job):
    """Worker process: compile one (configuration, epilogue) of the persistent kernel by
    running it on small tensors of the same dtypes, strides and alignments as the sweep's
    (same specialization, so the sweep's process finds it in Triton's on-disk cache)."""
    name, spec_items, device = job
    spec = dict(spec_items)
    t0 = time.perf_counter()
    try:
        cfg = {int8_mm.tma_config_name(c): c
               for c in int8_mm.TMA_SWEEP_CONFIGS + int8_mm.TMA_INTERPRETER_CONFIGS}[name]
        dev = torch.device(device)
        M, N, K = 256, 1024, 1024
        a = torch.zeros(M, K, dtype=torch.int8, device=dev)
        b = torch.zeros(N, K, dtype=torch.int8, device=dev)
        a_s = torch.ones(1 if spec["per_tensor_a"] else M, device=dev)
        b_s = torch.ones(N, device=dev)
        bias = torch.zeros(N, dtype=torch.bfloat16, device=dev)
        res = torch.zeros(M, N, dtype=torch.bfloat16, device=dev) if spec["residual"] else None
        o_s = None if spec["out_scale"] is None else torch.ones(N if spec["out_scale"] == "channel" else 1, device=dev)
        out = torch.empty(M, N, dtype=torch.int8 if o_s is not None else torch.bfloat16, device=dev)
        int8_mm._int8_scaled_mm_tma_launch(a, b, a_s, b_s, bias, out, res, o_s, "gelu" if spec["gelu"] else "none",
                                           config=cfg)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return name, spec_items, None, time.perf_counter() - t0
    except Exception as e:  # recorded, and the config is skipped in the sweep
        return name, spec_items, f"{type(e).__name__}: {str(e)[:400]}", time.perf_counter() - t0


def _run_pool(jobs, workers: int, fresh: bool, timeout_s: float, desc: str) -> dict:
    """Run ``_precompile`` over ``jobs`` in spawned processes (a fresh process per job with
    ``fresh``); a job that hangs past ``timeout_s`` stops the pool and the jobs left are
    reported as timed out. {(name, spec): (error or None, seconds)}."""
    import multiprocessing

    from tqdm import tqdm

    results = {}
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(processes=min(workers, len(jobs)), maxtasksperchild=1 if fresh else None)
    try:
        it = pool.imap_unordered(_precompile, jobs)
        for _ in tqdm(range(len(jobs)), desc=desc, mininterval=2):
            try:
                name, spec_items, err, _secs = it.next(timeout=timeout_s)
            except multiprocessing.TimeoutError:
                for name, spec_items, _ in jobs:
                    results.setdefault((name, spec_items), (f"timeout: no result within {timeout_s:.0f} s (hang?)",
                                                            timeout_s))
                break
            results[(name, spec_items)] = (err, _secs)
    finally:
        pool.terminate()
        pool.join()
    return results


def precompile_all(configs, specs, workers: int, device: torch.device) -> dict:
    """Compile (and run once on small tensors) every (config, epilogue) in ``workers``
    spawned processes, filling Triton's on-disk cache for the sweep; {(name, spec): (error or
    None, seconds of compile and first run)}. Jobs that fail are retried once, each in a fresh process (a kernel fault leaves a
    process's CUDA context unusable for the jobs after it), so that only their own errors
    stay; the sweep skips those configurations (a fault in its own process would end it)."""
    jobs = [(int8_mm.tma_config_name(c), _spec_key(s), str(device)) for c in configs for s in specs]
    t0 = time.perf_counter()
    try:
        results = _run_pool(jobs, workers, fresh=False, timeout_s=300, desc="compile")
        failed = [j for j in jobs if results.get((j[0], j[1]), ("missing", 0))[0]]
        if failed:
            print(f"{len(failed)} jobs failed; retrying each in a fresh process", flush=True)
            results.update(_run_pool(failed, workers, fresh=True, timeout_s=300, desc="retry"))
    except Exception as e:  # the pool itself failed: the sweep compiles in its own process
        print(f"warning: parallel compilation failed ({type(e).__name__}: {e}); compiling in turn", flush=True)
        return {}
    for (name, spec_items), (err, _secs) in results.items():
        if err:
            print(f"  error {name} {dict(spec_items)}: {err[:300]}", flush=True)
    print(f"compiled {len(jobs)} kernels in {time.perf_counter() - t0:.0f} s with {workers} processes", flush=True)
    return results


def _error(out, ref) -> dict:
    if out.dtype == torch.int8:
        diff = (out.int() - ref.int()).abs()
        return {"int8_mismatch": float((diff > 0).float().mean()), "int8_max_diff": int(diff.max())}
    return {"rel_max_err": float((out.float() - ref.float()).abs().max() / ref.float().abs().max())}


def _ok(err: dict) -> bool:
    if "rel_max_err" in err:
        return err["rel_max_err"] < 2e-2
    return err["int8_max_diff"] <= 1 and err["int8_mismatch"] <= 0.01


def sweep(args, device) -> None:
    from tqdm import tqdm

    rep = args.rep or 20
    configs = list(int8_mm.TMA_SWEEP_CONFIGS)
    if args.configs:
        wanted = set(args.configs.split(","))
        configs = [c for c in configs if int8_mm.tma_config_name(c) in wanted]
    names = [int8_mm.tma_config_name(c) for c in configs]
    shape_list = [(name, tokens, n, k) for family in args.sweep_shapes.split(",")
                  for tokens, linears in [SWEEP_SHAPES[family]] for name, (n, k) in linears.items()]
    specs = {_spec_key(_case_spec(sh, v)): _case_spec(sh, v) for sh, *_ in shape_list for v in SWEEP_VARIANTS}
    if not int8_mm._tma_api():
        raise SystemExit(f"error: --sweep needs Triton >= 3.4 (TMA descriptors), found {int8_mm.triton.__version__}")
    if torch.cuda.get_device_capability()[0] != 9:
        print("warning: the persistent kernel is for Hopper (capability 9.x); the public op will not use it here")
    compiled = precompile_all(configs, list(specs.values()), args.workers, device) if args.workers > 0 else {}
    compile_errors = {k: err for k, (err, _secs) in compiled.items() if err}
    int8_tops = harness.measure_matmul_tflops(torch.int8)
    bf16_tflops = harness.measure_matmul_tflops(torch.bfloat16)
    print(f"{harness.gpu_name()}: ceilings int8 {int8_tops:.0f} TOP/s, bf16 {bf16_tflops:.0f} TFLOP/s (8192^3)")
    figures = {"int8_ceiling_tops": int8_tops, "bf16_ceiling_tflops": bf16_tflops, "configs": names,
               "autotune_configs": [int8_mm.tma_config_name(c) for c in int8_mm._TMA_CONFIGS],
               "compile_errors": {f"{n} {dict(k)}": e for (n, k), e in compile_errors.items()},
               "compile_s": {f"{n} {dict(k)}": round(t, 2) for (n, k), (_e, t) in compiled.items()},
               "cases": [], "rows": []}
    t_start = time.perf_counter()
    for shape, M, N, K in shape_list:
        g = torch.Generator(device=device).manual_seed(N + K)
        xs = [torch.randn(M, K, device=device, generator=g).to(torch.bfloat16) for _ in range(args.inputs)]
        w = (torch.randn(N, K, device=device, generator=g) * K**-0.5).to(torch.bfloat16)
        bias = (torch.randn(N, device=device, generator=g) * 0.1).to(torch.bfloat16)
        residual = torch.randn(M, N, device=device, generator=g).to(torch.bfloat16)
        w_q, w_s = quantize_rows_int8(w)
        w_s = w_s.reshape(N)
        qs = [quantize_rows_int8(x) for x in xs]
        ops = 2.0 * M * N * K
        # CUDA-graph replays throughout: the kernels' time, not the host's launch time (~0.1-0.25 ms a
        # call of the Triton paths, more than SAM vit_b's proj kernel: host_overhead.json)
        base = {"bf16": harness.bench(lambda x: F.linear(x, w, bias), inputs=xs, rep=rep, cuda_graph=True)["median_ms"],
                "int_mm": harness.bench(lambda q: torch._int_mm(q[0], w_q.t()), inputs=qs, rep=rep,
                                        cuda_graph=True)["median_ms"]}
        for variant in SWEEP_VARIANTS:
            spec = _case_spec(shape, variant)
            a_s0, out_dtype, kw = _spec_args(spec, qs[0][1], device, residual)
            if spec["out_scale"]:  # about 1/120 of the float output's range, per channel or per tensor
                y = int8_scaled_mm_ref(qs[0][0], w_q, a_s0, w_s, bias.float(), torch.float32, activation=kw["activation"],
                                       residual=kw["residual"])
                amax = y.abs().amax(0) if spec["out_scale"] == "channel" else y.abs().amax().reshape(1)
                kw["out_scale"] = (amax / 120).clamp_min(1e-6)
                del y
            ref = int8_scaled_mm_ref(qs[0][0], w_q, a_s0, w_s, bias, out_dtype, **kw)

            def call_args(q):
                return (q[0], w_q, a_s0 if spec["per_tensor_a"] else q[1], w_s, bias, out_dtype)

            case = {"shape": shape, "variant": variant, "M": M, "N": N, "K": K, "spec": spec,
                    "bf16_ms": base["bf16"], "int_mm_ms": base["int_mm"],
                    "bf16_tflops": ops / base["bf16"] / 1e9, "int_mm_tops": ops / base["int_mm"] / 1e9}
            # the public op (the autotuner's choice among _TMA_CONFIGS on Hopper)
            out = int8_scaled_mm(*call_args(qs[0]), **kw)
            case["auto_err"] = _error(out, ref)
            case["auto_config"] = _chosen_config(qs[0][0], w_q, out)
            del out
            t = harness.bench(lambda q: int8_scaled_mm(*call_args(q), **kw), inputs=qs, rep=rep,
                              cuda_graph=True)["median_ms"]
            case.update(auto_ms=t, auto_tops=ops / t / 1e9, auto_vs_bf16=harness.speedup(base["bf16"], t))
            if args.plain:  # the plain (non-persistent) kernel, autotuned
                out = int8_scaled_mm_triton(*call_args(qs[0]), **kw, persistent=False)
                case["plain_err"] = _error(out, ref)
                del out
                t = harness.bench(lambda q: int8_scaled_mm_triton(*call_args(q), **kw, persistent=False), inputs=qs,
                                  rep=rep)["median_ms"]
                case.update(plain_ms=t, plain_tops=ops / t / 1e9, plain_vs_bf16=harness.speedup(base["bf16"], t))
            figures["cases"].append(case)
            print(f"{shape} {variant}: bf16 {case['bf16_tflops']:.0f} TFLOP/s, _int_mm {case['int_mm_tops']:.0f}, "
                  f"public op {case['auto_tops']:.0f} TOP/s ({case['auto_vs_bf16']:.2f}x bf16, "
                  f"{case['auto_config']})", flush=True)

            o_s = kw["out_scale"].reshape(-1) if kw["out_scale"] is not None else None
            res = kw["residual"]
            for cfg, name in tqdm(list(zip(configs, names)), desc=f"{shape} {variant}", mininterval=2, leave=False):
                row = {"shape": shape, "variant": variant, "config": name}
                err = compile_errors.get((name, _spec_key(spec)))
                if err:
                    row["error"] = err
                    figures["rows"].append(row)
                    continue

                def run(q, cfg=cfg, want_kernel=False):
                    a, b, a_s, b_s, bias_, out_dtype_ = call_args(q)
                    out = torch.empty(M, N, dtype=out_dtype_, device=device)
                    return int8_mm._int8_scaled_mm_tma_launch(a, b, a_s.reshape(-1), b_s, bias_, out, res, o_s,
                                                              kw["activation"], config=cfg, return_kernel=want_kernel)

                try:
                    out, kernel = run(qs[0], want_kernel=True)
                    row.update(_error(out, ref))
                    row["correct"] = _ok(row)
                    del out
                    for attr in ("n_regs", "n_spills"):
                        row[attr] = getattr(kernel, attr, None)
                    row["shared"] = getattr(getattr(kernel, "metadata", None), "shared", None)
                    t = harness.bench(run, inputs=qs, warmup=3, rep=rep, cuda_graph=True)["median_ms"]
                    row.update(ms=t, tops=ops / t / 1e9, vs_bf16=harness.speedup(base["bf16"], t),
                               pct_int8=100 * ops / t / 1e9 / int8_tops)
                except Exception as e:  # out of resources at launch, ...
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                figures["rows"].append(row)
            del ref
        del xs, qs, residual
        torch.cuda.empty_cache()
        figures["summary"] = _sweep_summary(figures)
        figures["elapsed_s"] = time.perf_counter() - t_start
        path = harness.save_result(args.name or "int8_mm_sweep", figures, args, out_dir=args.out_dir)
        print("saved", path, flush=True)
    _print_sweep(figures)


def _sweep_summary(figures) -> dict:
    """Best config per case, and per config the geometric mean and minimum speed-up over bf16
    across all cases (only correct runs count; a config missing a case gets no aggregate)."""
    cases = {(c["shape"], c["variant"]) for c in figures["cases"]}
    best = {}
    per_config = {}
    for r in figures["rows"]:
        if "ms" not in r or not r.get("correct"):
            continue
        key = f"{r['shape']} {r['variant']}"
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = {"config": r["config"], "ms": r["ms"], "tops": r["tops"], "vs_bf16": r["vs_bf16"]}
        per_config.setdefault(r["config"], []).append(r["vs_bf16"])
    agg = {n: {"geomean_vs_bf16": math.exp(sum(math.log(v) for v in vs) / len(vs)), "min_vs_bf16": min(vs)}
           for n, vs in per_config.items() if len(vs) == len(cases)}
    ranked = sorted(agg.items(), key=lambda kv: -kv[1]["geomean_vs_bf16"])
    return {"best_per_case": best, "per_config": dict(ranked),
            "best_single_config": ranked[0][0] if ranked else None,
            "goal_min_best_vs_bf16": min((b["vs_bf16"] for b in best.values()), default=None)}


def _print_sweep(figures) -> None:
    print("\nPer config (TOP/s; x = speed-up over bf16 F.linear):")
    rows = {}
    for r in figures["rows"]:
        col = f"{r['shape'].split('.')[-1]}.{r['variant']}"
        cell = f"{r['tops']:.0f} {r['vs_bf16']:.2f}x" + ("" if r.get("correct") else " WRONG") if "ms" in r else "err"
        rows.setdefault(r["config"], {"config": r["config"]})[col] = cell
    harness.print_table(list(rows.values()))
    print("\nPublic op (autotuned) and baselines:")
    harness.print_table(figures["cases"], ["shape", "variant", "bf16_tflops", "int_mm_tops", "auto_tops",
                                           "auto_vs_bf16", "plain_tops", "plain_vs_bf16", "auto_config"])
    s = figures.get("summary", {})
    print("\nbest per case:")
    for k, v in s.get("best_per_case", {}).items():
        print(f"  {k}: {v['config']} {v['tops']:.0f} TOP/s {v['vs_bf16']:.2f}x")
    print("best single config:", s.get("best_single_config"), "| goal: min best speed-up",
          s.get("goal_min_best_vs_bf16"), ">= 1.6")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape, few repeats, no JSON")
    p.add_argument("--rep", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--inputs", type=int, default=2, help="input sets rotated between calls")
    p.add_argument("--sweep", action="store_true",
                   help="time every persistent-kernel config at the ViT-L shapes (Hopper); JSON int8_mm_sweep")
    p.add_argument("--configs", default="", help="--sweep: only these configs (comma-separated names)")
    p.add_argument("--sweep-shapes", default="vit_l",
                   help=f"--sweep: the models whose linears are swept, comma-separated among {sorted(SWEEP_SHAPES)}")
    p.add_argument("--name", default=None, help="--sweep: the results JSON's name (default int8_mm_sweep)")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="--sweep: processes compiling the configs ahead of the timing (0: compile in turn)")
    p.add_argument("--plain", action="store_true", help="--sweep: also time the plain (non-persistent) kernel")
    args = p.parse_args(argv)
    unknown = sorted(set(args.sweep_shapes.split(",")) - set(SWEEP_SHAPES))
    if unknown:
        p.error(f"unknown --sweep-shapes {unknown}; expected names among {sorted(SWEEP_SHAPES)}")
    device = harness.require_cuda("experiments/bench_int8_mm.py")
    if args.sweep:
        sweep(args, device)
        return
    rep = args.rep or (10 if args.quick else 50)

    int8_tops = harness.measure_matmul_tflops(torch.int8)
    bf16_tflops = harness.measure_matmul_tflops(torch.bfloat16)
    print(f"{harness.gpu_name()}: measured ceilings int8 {int8_tops:.0f} TOP/s (torch._int_mm), "
          f"bf16 {bf16_tflops:.0f} TFLOP/s (torch.mm), 8192^3")

    rows = []
    for name, M, N, K in shapes(args.quick):
        row = bench_shape(name, M, N, K, device, rep, args.inputs, int8_tops, bf16_tflops)
        rows.append(row)
        print(f"  {name} ({M}x{N}x{K}): fused {row['fused_ms']:.3f} ms, config {row['config']}", flush=True)
        torch.cuda.empty_cache()  # 65536-token activations of the next shape

    print("\nTimes in ms (medians); rates in TOP/s (int8) / TFLOP/s (bf16); speed-ups are time ratios.")
    harness.print_table(rows, ["shape", "M", "N", "K", "fused_ms", "int_mm_ms", "unfused_ms", "bf16_ms",
                               "fused_tops", "fused_pct_int8", "int_mm_pct_int8", "bf16_pct",
                               "fused_vs_unfused", "fused_vs_bf16"])
    print()
    harness.print_table(rows, ["shape", "quant_ms", "dyn_ms", "static_ms", "bf16_ms", "dyn_vs_bf16", "static_vs_bf16",
                               "int_mm_vs_bf16", "fused_err", "dyn_sqnr_db"])
    attn_rows = []
    for N, B in (ATTN[:1] if args.quick else ATTN):
        attn_rows.append(bench_attention(N, B, device, rep))
        torch.cuda.empty_cache()
    print("\nAttention (ViT-L heads 16x64): ms and TFLOP/s (4·B·H·N²·D)")
    harness.print_table(attn_rows, ["seq", "batch", "sdpa_ms", "int8dq_ms", "int8_vbf16_ms", "int8static_ms",
                                    "sdpa_tflops", "int8dq_tflops", "int8static_tflops", "int8dq_vs_sdpa",
                                    "int8static_vs_sdpa", "rel_err_vs_ref", "sqnr_vs_sdpa_db"])
    vit_l = [r for r in rows if r["shape"].startswith("vit_l.")]
    goal = {"goal_fused_vs_bf16": 1.6,
            "vit_l_min_fused_vs_bf16": min((r["fused_vs_bf16"] for r in vit_l), default=None),
            "vit_l_min_static_vs_bf16": min((r["static_vs_bf16"] for r in vit_l), default=None)}
    print("goal (int8 GEMM >= 1.6x bf16 at ViT-L shapes):", goal)
    if not args.quick:
        figures = {"int8_ceiling_tops": int8_tops, "bf16_ceiling_tflops": bf16_tflops, "goal": goal, "rows": rows,
                   "attention": attn_rows}
        print("saved", harness.save_result("int8_mm", figures, args, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
