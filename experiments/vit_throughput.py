"""ViT inference throughput: timm vs fastzoo, fp32 / bf16 / int8 dynamic / int8 static, random weights.

    python -m experiments.vit_throughput --quick        # the goal case: ViT-L/16-224, batch 512, all modes
    python -m experiments.vit_throughput                # ViT-S/B/L/16 at 224 and 384, batch 1/32/256/1024
    python -m experiments.vit_throughput --models vit_large_patch16_224 --batches 512 --modes timm-fp32,fz-int8static

Modes, timed in the same run on the same (timm-initialised) weights:

- ``timm-fp32``: timm, fp32, eager (PyTorch defaults: no TF32) — the QAttn paper's baseline;
- ``timm-bf16-compile``: timm, bf16, ``torch.compile``;
- ``fz-bf16-compile``: fastzoo, bf16, ``torch.compile`` (SDPA attention) — fastzoo's baseline;
- ``fz-int8dq``: fastzoo, ``quantize="int8dq"`` (per-token dynamic W8A8, fused LN+quant,
  GELU/residual epilogues, SDPA attention), compiled;
- ``fz-int8static``: fastzoo, ``quantize="int8static"`` (static W8A8 calibrated on two
  batches of 32 random images: int8 into every GEMM, fc1 writing GELU'd int8 for fc2, the
  qkv GEMM writing bf16 for SDPA), compiled;
- on request (``--modes``): ``fz-int8dq-qattn`` and ``fz-int8static-qattn`` (the same with
  ``int8_attention``: int8 q/k/v from the qkv GEMM, int8 out for the projection), to see what
  the int8 attention brings. (On an H100 at ViT-L/16's 197 tokens cuDNN's bf16 flash
  attention plus the re-quantization of its output is the faster of the two: 87.6 against
  92.4 ms a batch of 512, ``vit_epilogue_patch_embed_ab.json``.)

With ``--quick`` (or whenever the goal case runs with ``fz-int8static``) the record also
holds what bounds the model: the four linears of a block timed alone at the same token count
(bf16 ``F.linear`` vs the int8 kernel with its epilogue) × depth, as img/s, and each mode's
% of that linears-only figure.

Images/s from the median of CUDA-event timings (input sets rotated), % of the measured bf16
(and int8) matmul ceilings in matmul FLOPs, speed-ups against timm fp32 eager and fastzoo
bf16 compiled, and accuracy against timm fp32 on the same images (logits SQNR, top-1
agreement). JSON: ``experiments/results/<gpu>/vit_throughput[_quick].json``. Each
(model, mode) is compiled once; a new batch size re-specialises it (counted in
``first_call_s``). Goal (H100): ViT-L/16-224 at batch 512, ``fz-int8static`` ≥ 1.5×
``fz-bf16-compile`` and ≥ 8× ``timm-fp32``.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from tqdm import tqdm

from experiments import harness
from fastzoo.quant import quantize_vit_
from fastzoo.vit import VIT_CONFIGS, build_vit

MODELS = ["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
          "vit_small_patch16_384", "vit_base_patch16_384", "vit_large_patch16_384"]
BATCHES = [1, 32, 256, 1024]
EXTRA_BATCHES = {"vit_large_patch16_224": [512]}  # the goal case
MODES = ["timm-fp32", "timm-bf16-compile", "fz-bf16-compile", "fz-int8dq", "fz-int8static"]
# not in the default set (--modes): the other attention choices, to see what int8 attention brings;
# and each compiled mode with CUDA graphs ("+cg": torch.compile(mode="reduce-overhead")), which
# small batches need: there a forward's kernels take less time than the host takes to launch them
EXTRA_MODES = ["fz-int8dq-qattn", "fz-int8static-qattn"]
EXTRA_MODES += [m + "+cg" for m in MODES + EXTRA_MODES if m != "timm-fp32"]
QUICK = ("vit_large_patch16_224", 512)


def vit_flops(name: str) -> float:
    """Matmul FLOPs of one image's forward (linears + attention), 2 per multiply-add."""
    c = VIT_CONFIGS[name]
    n, d, h = c.num_tokens, c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    per_block = 2 * n * d * (3 * d + d + 2 * h) + 4 * n * n * d
    patch = 2 * (n - 1) * d * c.in_chans * c.patch_size**2
    return c.depth * per_block + patch + 2 * d * max(c.num_classes, 0)


def _timed(fn, xs, budget_s: float) -> tuple[dict, float]:
    """First call (compile / autotune included) timed on the host; then harness.bench with a
    repeat count that fits ``budget_s``."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(xs[0]).clone()  # a CUDA-graph replay ("+cg") reuses its output's memory
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        fn(xs[1])
        torch.cuda.synchronize()
        once = time.perf_counter() - t0
        rep = int(max(3, min(30, budget_s / max(once, 1e-4))))
        t = harness.bench(fn, inputs=xs, warmup=min(3, rep), rep=rep)
    return {"timing": t, "first_call_s": first_s, "out": out}


def build_models(name: str, modes: list[str], dev: torch.device) -> dict:
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval().requires_grad_(False)
    for p in ref.parameters():  # timm zero-initialises some tensors: perturb all, so logits differ per image
        p.add_(torch.randn_like(p) * 0.02)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    fz = build_vit(name, dtype=torch.float32)
    fz.load_state_dict(sd, strict=True)
    fz = fz.to(dev, torch.bfloat16)
    res = VIT_CONFIGS[name].img_size
    g = torch.Generator(device=dev).manual_seed(123)
    cal = [torch.randn(32, 3, res, res, device=dev, generator=g).to(torch.bfloat16) for _ in range(2)]
    eager = {  # each mode's model before torch.compile
        "timm-bf16-compile": lambda: copy.deepcopy(ref).to(dev, torch.bfloat16),
        "fz-bf16-compile": lambda: copy.deepcopy(fz),
        "fz-int8dq": lambda: quantize_vit_(copy.deepcopy(fz), "int8dq"),
        "fz-int8dq-qattn": lambda: quantize_vit_(copy.deepcopy(fz), "int8dq-qattn"),
        "fz-int8static": lambda: quantize_vit_(copy.deepcopy(fz), "int8static", calibration=cal),
        "fz-int8static-qattn": lambda: quantize_vit_(copy.deepcopy(fz), "int8static-qattn", calibration=cal),
    }
    models = {}
    for mode in modes:
        if mode == "timm-fp32":
            models[mode] = copy.deepcopy(ref).to(dev)
        elif mode.endswith("+cg"):
            models[mode] = torch.compile(eager[mode[:-len("+cg")]](), mode="reduce-overhead")
        else:
            models[mode] = torch.compile(eager[mode]())
    return models


def gemm_bound(name: str, batch: int, dev: torch.device) -> dict:
    """What bounds the model: the four linears of one block timed alone at the model's token
    count (bf16 ``F.linear`` vs the static int8 GEMM with its epilogue in ``fz-int8static``:
    qkv writes bf16 for SDPA, fc1 GELU'd int8, proj and fc2 bf16 with the residual), × depth →
    the img/s the model would reach if it were only its linears."""
    import torch.nn.functional as F

    from fastzoo.ops import int8_scaled_mm

    c = VIT_CONFIGS[name]
    M, d, h = batch * c.num_tokens, c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    # (N, K, activation, int8 out, residual)
    shapes = {"qkv": (3 * d, d, "none", False, False), "proj": (d, d, "none", False, True),
              "fc1": (h, d, "gelu", True, False), "fc2": (d, h, "none", False, True)}
    g = torch.Generator(device=dev).manual_seed(0)
    out = {"tokens": M}
    tot = {"bf16_ms": 0.0, "int8_ms": 0.0}
    for lin, (N, K, act, int8_out, with_residual) in shapes.items():
        x = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16)
        w = torch.randn(N, K, device=dev, generator=g).to(torch.bfloat16) * K**-0.5
        bias = torch.zeros(N, device=dev, dtype=torch.bfloat16)
        xq = torch.randint(-127, 128, (M, K), device=dev, generator=g, dtype=torch.int8)
        wq = torch.randint(-127, 128, (N, K), device=dev, generator=g, dtype=torch.int8)
        s1, sN = torch.full((1,), 1e-3, device=dev), torch.full((N,), 1e-3, device=dev)
        res = torch.randn(M, N, device=dev, generator=g).to(torch.bfloat16) if with_residual else None
        # CUDA-graph replays: the kernels' time, not the host's launch overhead (~0.25 ms a call of
        # the public int8 op in eager mode, more than a ~0.1 ms GEMM: host_overhead.json)
        t_bf16 = harness.bench(lambda: F.linear(x, w, bias), rep=10, cuda_graph=True)["median_ms"]
        t_int8 = harness.bench(lambda: int8_scaled_mm(xq, wq, s1, sN, bias, torch.int8 if int8_out else torch.bfloat16,
                                                      activation=act, residual=res,
                                                      out_scale=s1 if int8_out else None), rep=10,
                               cuda_graph=True)["median_ms"]
        flops = 2.0 * M * N * K
        out[f"{lin}_bf16_tflops"] = flops / (t_bf16 * 1e-3) / 1e12
        out[f"{lin}_int8_tops"] = flops / (t_int8 * 1e-3) / 1e12
        tot["bf16_ms"] += t_bf16
        tot["int8_ms"] += t_int8
        del x, w, xq, wq, res
    out["linears_only_bf16_img_s"] = batch / (tot["bf16_ms"] * c.depth * 1e-3)
    out["linears_only_int8_img_s"] = batch / (tot["int8_ms"] * c.depth * 1e-3)
    out["int8_vs_bf16_linears"] = tot["bf16_ms"] / tot["int8_ms"]
    torch.cuda.empty_cache()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32,256,1024, +512 for "
                                                   "ViT-L/16-224)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated, of {','.join(MODES + EXTRA_MODES)} (default: the first {len(MODES)})")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per measurement")
    p.add_argument("--quick", action="store_true", help="ViT-L/16-224 at batch 512 only, every mode")
    p.add_argument("--name", default=None, help="the results JSON's name (default: from the models and batches)")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    dev = harness.require_cuda("the ViT throughput benchmark")
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES + EXTRA_MODES]
    if bad:
        p.error(f"unknown modes {bad}; valid: {MODES + EXTRA_MODES}")
    if args.quick:
        plan = [(QUICK[0], [QUICK[1]])]
    else:
        names = args.models.split(",")
        unknown = [n for n in names if n not in VIT_CONFIGS]
        if unknown:
            p.error(f"unknown models {unknown}")
        if args.batches:
            plan = [(n, [int(b) for b in args.batches.split(",")]) for n in names]
        else:
            plan = [(n, sorted(BATCHES + EXTRA_BATCHES.get(n, []))) for n in names]
    bf16_ceiling = harness.measure_matmul_tflops(torch.bfloat16)
    int8_ceiling = harness.measure_matmul_tflops(torch.int8)
    print(f"{harness.gpu_name()}: bf16 {bf16_ceiling:.0f} TFLOP/s, int8 {int8_ceiling:.0f} TOP/s (8192^3)", flush=True)

    if args.quick:
        out_name = "vit_throughput_quick"
    elif args.models == ",".join(MODELS) and not args.batches and modes == MODES:
        out_name = "vit_throughput"
    else:  # a chunk of the sweep: its own record
        out_name = "vit_throughput_" + "-".join(n.replace("vit_", "").replace("_patch", "") for n, _ in plan)
        if args.batches:
            out_name += "_b" + "-".join(args.batches.split(","))

    def save(rows, goal, complete):
        """(Re)write the record; after each model too, so a run cut short keeps what it measured."""
        figures = {"bf16_ceiling_tflops": bf16_ceiling, "int8_ceiling_tops": int8_ceiling,
                   "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "complete": complete, "goal": goal,
                   "rows": rows}
        return harness.save_result(args.name or out_name, figures, args, out_dir=args.out_dir)

    rows = []
    bar = tqdm(total=sum(len(b) for _, b in plan) * len(modes), desc="vit throughput")
    for name, batches in plan:
        models = build_models(name, modes, dev)
        res = VIT_CONFIGS[name].img_size
        for batch in batches:
            g = torch.Generator(device=dev).manual_seed(batch)
            xs32 = [torch.randn(batch, 3, res, res, device=dev, generator=g) for _ in range(2)]
            xs16 = [x.to(torch.bfloat16) for x in xs32]
            truth = None
            group = []
            for mode in modes:
                bar.set_postfix_str(f"{name} b{batch} {mode}")
                xs = xs32 if mode == "timm-fp32" else xs16
                try:
                    r = _timed(models[mode], xs, args.budget)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append({"model": name, "batch": batch, "mode": mode, "error": "out of memory"})
                    bar.update()
                    continue
                out = r.pop("out").float()
                if mode == "timm-fp32":
                    truth = out
                ms = r["timing"]["median_ms"]
                img_s = batch / (ms * 1e-3)
                row = {"model": name, "batch": batch, "mode": mode, "ms": ms, "img_s": img_s,
                       "pct_bf16_ceiling": 100 * img_s * vit_flops(name) / (bf16_ceiling * 1e12),
                       "pct_int8_ceiling": 100 * img_s * vit_flops(name) / (int8_ceiling * 1e12),
                       "first_call_s": r["first_call_s"], "timing": r["timing"]}
                if truth is not None:
                    row["sqnr_db_vs_timm_fp32"] = harness.sqnr_db(out, truth)
                    row["top1_agree_vs_timm_fp32"] = float((out.argmax(-1) == truth.argmax(-1)).float().mean())
                rows.append(row)
                group.append(row)
                del out
                bar.update()
            by_mode = {r["mode"]: r["img_s"] for r in group}
            for r in group:
                if "timm-fp32" in by_mode:
                    r["x_vs_timm_fp32"] = r["img_s"] / by_mode["timm-fp32"]
                if "fz-bf16-compile" in by_mode:
                    r["x_vs_fz_bf16"] = r["img_s"] / by_mode["fz-bf16-compile"]
                if "fz-bf16-compile+cg" in by_mode:  # against the baseline of its kind
                    r["x_vs_fz_bf16_cg"] = r["img_s"] / by_mode["fz-bf16-compile+cg"]
            del xs32, xs16, truth
            torch.cuda.empty_cache()
            save(rows, {}, complete=False)
        del models
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    bar.close()
    harness.print_table([r for r in rows if "error" not in r],
                        ["model", "batch", "mode", "img_s", "x_vs_timm_fp32", "x_vs_fz_bf16", "x_vs_fz_bf16_cg",
                         "pct_bf16_ceiling",
                         "sqnr_db_vs_timm_fp32", "top1_agree_vs_timm_fp32", "first_call_s"])
    goal = {}
    g = {r["mode"]: r for r in rows if (r["model"], r["batch"]) == QUICK and "error" not in r}
    if "fz-int8static" in g:
        s = g["fz-int8static"]
        goal = {"int8static_x_vs_fz_bf16": s.get("x_vs_fz_bf16"), "int8static_x_vs_timm_fp32": s.get("x_vs_timm_fp32"),
                "goal_x_vs_fz_bf16": 1.5, "goal_x_vs_timm_fp32": 8.0}
        # what bounds it: the linears alone (bf16 cuBLAS vs the int8 kernel) at the same token count
        bound = gemm_bound(*QUICK, dev)
        goal["bound"] = bound
        for mode in ("fz-bf16-compile", "fz-int8static"):
            if mode in g:
                key = "bf16" if mode == "fz-bf16-compile" else "int8"
                goal[f"{mode}_pct_of_linears_only"] = 100 * g[mode]["img_s"] / bound[f"linears_only_{key}_img_s"]
        print("goal case ViT-L/16-224 b512:", goal)
    print("saved", save(rows, goal, complete=True))


if __name__ == "__main__":
    main()
