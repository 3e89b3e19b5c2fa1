"""Llama decode / prefill benchmark on random weights of a named preset (no download).

    python -m experiments.llama_decode --preset llama-2-7b --batch-sizes 1,4,8,16 \
        --prompt-len 5 --new-tokens 200 --compile --dtype bf16

Reports, for the preset's shapes:

* batch-1 decode: tokens/s, achieved bandwidth = weight bytes × tokens/s, and that as a
  percentage of the device-to-device copy bandwidth measured in the same run;
* time to first token (the ``--prompt-len`` prompt) and prefill tokens/s (a
  ``--prefill-len`` prompt at batch 1);
* compile time (first run minus a steady-state run, when ``--compile``);
* total tokens/s at each batch size with distinct random prompts, and its ratio to batch 1;
* peak GPU memory.

Generation runs the library's :class:`fastzoo.llama.generate.Generator` with sampling as
in gpt-fast's benchmark (temperature 0.8, top-k 200) and stop tokens off, so every run
decodes exactly ``--new-tokens`` tokens.  Results are saved as JSON under
``experiments/results/<gpu>/``.  Without a GPU the script exits with status 2 unless
the preset is one of the tiny CPU presets (``tiny``, ``stories*``), which run on the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from experiments import harness
from fastzoo.llama.checkpoint import parse_dtype
from fastzoo.llama.config import TINY_PRESETS, LlamaConfig
from fastzoo.llama.generate import Generator
from fastzoo.llama.model import Transformer
from fastzoo.quant import quantize_


def random_model(cfg: LlamaConfig, device, dtype) -> Transformer:
    """Random weights without a full-precision copy: build on meta, allocate, fill in place."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: no fp32 copy
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def random_prompts(batch, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save(figures, args):
    """Write (or overwrite) the result JSON; called after each batch size so a run cut short keeps what it measured."""
    if args.no_save:
        return
    name = args.name or (f"llama_decode_{args.preset}_{args.quantize or args.dtype}"
                         + ("_compile" if args.compile else ""))
    path = harness.save_result(name.replace("/", "-"), figures, args)
    print(f"saved {path}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--prompt-len", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prefill-len", type=int, default=512, help="prompt length of the prefill measurement")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--runs", type=int, default=3, help="timed runs per batch size (median reported)")
    p.add_argument("--name", default=None, help="result name (default: llama_decode_<preset>_<dtype>[_compile])")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--quantize", default=None, help="a fastzoo.quant config string: int8, int4-g128, ...")
    args = p.parse_args(argv)

    cfg = LlamaConfig.from_preset(args.preset)
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.preset.lower() in TINY_PRESETS:
        device = torch.device("cpu")
        print(f"no GPU: running the tiny preset {args.preset!r} on the CPU", file=sys.stderr)
    else:
        device = harness.require_cuda(f"the {args.preset} decode benchmark")
    dtype = parse_dtype(args.dtype)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, stop_ids=(), check_every=0)

    model = random_model(cfg, device, dtype)
    if args.quantize:
        quantize_(model, args.quantize)
    weight_bytes = model.weight_bytes()
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"{weight_bytes / 1e9:.2f} GB in {dtype}, device {harness.gpu_name()}", file=sys.stderr)
    copy_gbs = harness.measure_copy_bandwidth(device=device) if device.type == "cuda" else None

    gen = Generator(model, compile=args.compile)
    figures = {"preset": args.preset, "dtype": str(dtype), "compile": args.compile, "quantize": args.quantize, "weight_bytes": weight_bytes,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "copy_bandwidth_gbs": copy_gbs,
               "batches": {}}

    for B in batch_sizes:
        prompts = random_prompts(B, args.prompt_len, cfg.vocab_size, seed=B)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        gen.generate(prompts, args.new_tokens, **sampling)  # warm-up (and compilation)
        first_s = time.perf_counter() - t0
        runs = []
        for r in range(args.runs):
            prompts = random_prompts(B, args.prompt_len, cfg.vocab_size, seed=1000 * B + r)
            t0 = time.perf_counter()
            res = gen.generate(prompts, args.new_tokens, **sampling)
            runs.append((time.perf_counter() - t0, res))
        steady_s = statistics.median(t for t, _ in runs)
        step_rates = sorted(res.steps / res.decode_s for _, res in runs)
        rate = statistics.median(step_rates)
        ttft_ms = statistics.median(res.prefill_s for _, res in runs) * 1e3
        entry = {
            "decode_tokens_per_s_per_seq": rate,
            "total_tokens_per_s": B * rate,
            "bandwidth_gbs": weight_bytes * rate / 1e9,
            "time_to_first_token_ms": ttft_ms,
            "first_run_s": first_s,
            "steady_run_s": steady_s,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        }
        if args.compile:
            entry["compile_s"] = max(first_s - steady_s, 0.0)
        if copy_gbs:
            entry["pct_of_copy_bandwidth"] = 100 * entry["bandwidth_gbs"] / copy_gbs
        figures["batches"][str(B)] = entry
        save(figures, args)
        print(f"batch {B:3d}: {rate:8.2f} tok/s per sequence, {B * rate:9.2f} tok/s total, "
              f"{entry['bandwidth_gbs']:8.1f} GB/s"
              + (f" ({entry['pct_of_copy_bandwidth']:.0f}% of copy {copy_gbs:.0f} GB/s)" if copy_gbs else "")
              + f", TTFT {ttft_ms:.1f} ms" + (f", compile {entry['compile_s']:.1f} s" if args.compile else ""),
              file=sys.stderr)

    b1 = figures["batches"].get("1")
    if b1:
        for B, e in figures["batches"].items():
            e["total_vs_batch1"] = e["total_tokens_per_s"] / b1["total_tokens_per_s"]
        figures["compile_s"] = b1.get("compile_s")

    # prefill throughput at batch 1 (a long prompt, bucketed length)
    n = min(args.prefill_len, cfg.max_position_embeddings - 1)
    prompt = random_prompts(1, n, cfg.vocab_size, seed=7)
    times = []
    for r in range(args.runs + 1):
        sync(device)
        t0 = time.perf_counter()
        gen.prefill(prompt, 1, temperature=args.temperature, top_k=args.top_k)
        sync(device)
        times.append(time.perf_counter() - t0)
    figures["prefill_len"] = n
    figures["prefill_tokens_per_s"] = n / statistics.median(times[1:])
    print(f"prefill: {n} tokens at {figures['prefill_tokens_per_s']:.0f} tokens/s", file=sys.stderr)

    save(figures, args)
    return figures


if __name__ == "__main__":
    main()
