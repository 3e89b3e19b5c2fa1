"""Where a compiled Llama decode step spends its GPU time (random weights, GPU only).

    python -m experiments.llama_profile --preset llama-2-7b --steps 32

Compiles the library's Generator like ``experiments.llama_decode`` does, decodes once to
warm up, then records ``--steps`` decode steps with the PyTorch profiler (kernels inside
CUDA graphs included) and prints the kernels by GPU time per decode step, the sum of
kernel time per step against the wall time per step (the difference is idle GPU time:
launch gaps and host work), and the weight bytes over kernel time; records them as
``llama_profile_<preset>_<dtype>[_<quantize>]`` (``--no-save``: print only).
"""
from __future__ import annotations

import argparse
import time

import torch

from experiments import harness
from experiments.llama_decode import random_model, random_prompts
from fastzoo.llama.config import LlamaConfig
from fastzoo.llama.generate import Generator
from fastzoo.quant import quantize_
from fastzoo.utils import parse_dtype


def kernel_rows(prof, steps: int, top: int) -> tuple[float, list[dict], float]:
    """From a ``torch.profiler.profile`` of ``steps`` decode steps: GPU kernel ms per step, the
    ``top`` kernels by GPU time (``kernel``, ``us_per_step``, ``calls_per_step``) and kernel
    calls per step.  GPU kernels only: not the compiled-graph wrapper ("## Call CompiledFxGraph
    ..."), operator rows (aten::, fastzoo::) that repeat their kernels' time, or profiler notes."""
    ev = [e for e in prof.key_averages() if e.self_device_time_total > 0
          and not e.key.startswith(("##", "Command Buffer", "aten::", "fastzoo::"))]
    total_us = sum(e.self_device_time_total for e in ev)
    ev.sort(key=lambda e: e.self_device_time_total, reverse=True)
    rows = [{"kernel": e.key[:160], "us_per_step": e.self_device_time_total / steps,
             "calls_per_step": e.count / steps} for e in ev[:top]]
    return total_us / 1e3 / steps, rows, sum(e.count for e in ev) / steps


def print_kernel_rows(rows: list[dict], kernel_ms: float, say=print) -> None:
    say(f"{'%':>6} {'us/step':>9} {'calls/step':>10}  kernel")
    for r in rows:
        say(f"{100 * r['us_per_step'] / (kernel_ms * 1e3):6.1f} {r['us_per_step']:9.1f} "
            f"{r['calls_per_step']:10.1f}  {r['kernel'][:110]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--quantize", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-save", dest="save", action="store_false")
    args = p.parse_args(argv)
    device = harness.require_cuda("llama_profile")
    cfg = LlamaConfig.from_preset(args.preset)
    model = random_model(cfg, device, parse_dtype(args.dtype))
    if args.quantize:
        quantize_(model, args.quantize)
    gen = Generator(model, compile=True)
    prompts = random_prompts(args.batch, 5, cfg.vocab_size, seed=0)
    kw = dict(temperature=0.8, top_k=200, stop_ids=(), check_every=0)
    t0 = time.perf_counter()
    gen.generate(prompts, args.steps + 1, **kw)
    warmup_s = time.perf_counter() - t0
    print(f"warm-up (compile) {warmup_s:.1f} s")
    res = gen.generate(prompts, args.steps + 1, **kw)
    wall_step_ms = res.decode_s / res.steps * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        res = gen.generate(prompts, args.steps + 1, **kw)
        torch.cuda.synchronize()
    steps = res.steps
    kernel_ms, rows, calls = kernel_rows(prof, steps, args.top)
    total_us = kernel_ms * 1e3 * steps
    print(f"{steps} decode steps (+ prefill): wall {wall_step_ms:.3f} ms/step unprofiled; "
          f"kernel time {kernel_ms:.3f} ms/step (prefill included)")
    wb = model.weight_bytes()
    print(f"weights {wb / 1e9:.2f} GB: at kernel time {wb / (total_us / steps * 1e-6) / 1e9:.0f} GB/s, "
          f"at wall time {wb / (wall_step_ms * 1e-3) / 1e9:.0f} GB/s")
    print_kernel_rows(rows, kernel_ms)
    if args.save:
        name = (f"llama_profile_{args.preset}_{args.dtype}" + (f"_{args.quantize}" if args.quantize else "")
                + (f"_batch{args.batch}" if args.batch != 1 else ""))
        figures = {"wall_ms_per_step": wall_step_ms, "tokens_per_s": 1e3 / wall_step_ms * args.batch,
                   "kernel_ms_per_step": total_us / 1e3 / steps, "weight_bytes": wb,
                   "kernel_bandwidth_gbs": wb / (total_us / steps * 1e-6) / 1e9, "warmup_compile_s": warmup_s,
                   "kernel_calls_per_step": calls, "rows": rows}
        print(f"saved {harness.save_result(name, figures, args)}")


if __name__ == "__main__":
    main()
