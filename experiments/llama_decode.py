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

Modes: ``--quantize int8 | int4-g32..256 | gptq-g128`` (GPTQ on random calibration tokens:
for speed only), ``--kv-cache-dtype int8``, and speculative decoding at batch 1
(``--speculate-k K [--draft-quantize int4-g128]``: the draft is a quantized copy of the
target, or the target itself), reported with its acceptance rate, the bytes it reads per
kept token and, in the same run, the target's plain decode as the baseline.  ``--quick``
measures one configuration (batch 1, 100 tokens, one run, eager prefill and no prefill
measurement: only the decode step is compiled) in a few minutes.

Generation runs the library's :class:`fastzoo.llama.generate.Generator` with sampling as
in gpt-fast's benchmark (temperature 0.8, top-k 200) and stop tokens off, so every run
decodes exactly ``--new-tokens`` tokens.  Results are saved as JSON under
``experiments/results/<gpu>/``.  Without a GPU the script exits with status 2 unless
the preset is one of the tiny CPU presets (``tiny``, ``stories*``), which run on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from experiments import harness
from fastzoo.llama.checkpoint import parse_dtype
from fastzoo.llama.config import TINY_PRESETS, LlamaConfig
from fastzoo.llama.generate import Generator, SpeculativeGenerator
from fastzoo.llama.model import RMSNorm, Transformer
from fastzoo.quant import quantize_


def fill_random_(module: torch.nn.Module, device, gen: torch.Generator) -> None:
    """Allocate ``module``'s (meta) parameters on ``device``: norms 1, the rest N(0, 0.02)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for m in module.modules():
            for p in m.parameters(recurse=False):
                if isinstance(m, RMSNorm):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)


def random_model(cfg: LlamaConfig, device, dtype) -> Transformer:
    """Random weights without a full-precision copy: build on meta, allocate, fill in place."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype)  # cast on meta: no fp32 copy
    fill_random_(model, device, torch.Generator(device=device).manual_seed(0))
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
    name = args.name or default_name(args)
    path = harness.save_result(name.replace("/", "-"), figures, args, out_dir=args.out_dir)
    print(f"saved {path}", file=sys.stderr)


def default_name(args) -> str:
    name = f"llama_decode_{args.preset}_{args.quantize or args.dtype}"
    if args.kv_cache_dtype:
        name += f"_kv{args.kv_cache_dtype}"
    if args.speculate_k:
        name += f"_spec{args.speculate_k}-{args.draft_quantize or 'self'}"
    return name + ("_compile" if args.compile else "") + ("_quick" if args.quick else "")


def quantize_model(model, spec: str, cfg: LlamaConfig, device, args) -> dict:
    """Apply ``--quantize``: a fastzoo.quant config string, or ``gptq-g<N>`` (GPTQ on random
    calibration tokens: speed only, the weights are random anyway). Returns figures."""
    t0 = time.perf_counter()
    if spec.startswith("gptq-g"):
        from fastzoo.llama.quantize import gptq_quantize_llama_
        from fastzoo.quant.gptq import GPTQ
        try:
            config = GPTQ(int(spec[len("gptq-g"):]))
        except ValueError as e:
            raise SystemExit(f"--quantize {spec}: {e}") from None
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (args.gptq_samples, args.gptq_seq_len), generator=g)
        gptq_quantize_llama_(model, tokens, config, device=device)
    else:
        try:
            quantize_(model, spec)
        except ValueError as e:  # an unknown name, a group size the model's widths do not fit
            raise SystemExit(f"--quantize {spec}: {e}") from None
    sync(device)
    return {"quantize_s": time.perf_counter() - t0}


def measure(gen, B, cfg, args, sampling, device, weight_bytes, copy_gbs) -> dict:
    """Decode figures at batch ``B`` for a Generator or SpeculativeGenerator."""
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
    rate = statistics.median(sorted(res.steps / res.decode_s for _, res in runs))
    entry = {
        "decode_tokens_per_s_per_seq": rate,
        "total_tokens_per_s": B * rate,
        "bandwidth_gbs": weight_bytes * rate / 1e9,
        "time_to_first_token_ms": statistics.median(res.prefill_s for _, res in runs) * 1e3,
        "first_run_s": first_s,
        "steady_run_s": steady_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        # every timed run, in order: the spread between runs and processes (host speed, the
        # autotuner's picks) is part of the figure
        "runs_tokens_per_s_per_seq": [res.steps / res.decode_s for _, res in runs],
        "runs_time_to_first_token_ms": [res.prefill_s * 1e3 for _, res in runs],
    }
    if args.compile:
        entry["compile_s"] = max(first_s - steady_s, 0.0)
    stats = [res.stats for _, res in runs if "acceptance_rate" in res.stats]
    if stats:  # speculative: bytes actually read per kept token (draft steps + target verifies)
        acc = sum(st["accepted"] for st in stats) / max(sum(st["proposed"] for st in stats), 1)
        rounds = sum(st["rounds"] for st in stats)
        kept = sum(res.steps for _, res in runs)
        k = stats[0]["speculate_k"]
        per_token = rounds * ((k + 1) * gen.draft.weight_bytes() + gen.target.weight_bytes()) / max(kept, 1)
        entry.update(acceptance_rate=acc, tokens_per_round=kept / max(rounds, 1), speculate_k=k,
                     bytes_read_per_token=per_token, bandwidth_gbs=per_token * rate / 1e9,
                     target_equivalent_gbs=weight_bytes * rate / 1e9)
    if copy_gbs:
        entry["pct_of_copy_bandwidth"] = 100 * entry["bandwidth_gbs"] / copy_gbs
    return entry


def _line(label, B, e, copy_gbs, compiled):
    return (f"{label}batch {B:3d}: {e['decode_tokens_per_s_per_seq']:8.2f} tok/s per sequence, "
            f"{e['total_tokens_per_s']:9.2f} tok/s total, {e['bandwidth_gbs']:8.1f} GB/s"
            + (f" ({e['pct_of_copy_bandwidth']:.0f}% of copy {copy_gbs:.0f} GB/s)" if copy_gbs else "")
            + (f", acceptance {e['acceptance_rate']:.1%}, {e['tokens_per_round']:.2f} tok/round"
               if "acceptance_rate" in e else "")
            + f", TTFT {e['time_to_first_token_ms']:.1f} ms" + (f", compile {e['compile_s']:.1f} s" if compiled else "")
            + (f" (runs {min(e['runs_tokens_per_s_per_seq']):.1f} to {max(e['runs_tokens_per_s_per_seq']):.1f} tok/s)"
               if len(e.get("runs_tokens_per_s_per_seq", ())) > 1 else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,8,16; --quick: 1)")
    p.add_argument("--prompt-len", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=None, help="default 200 (--quick: 100)")
    p.add_argument("--prefill-len", type=int, default=None,
                   help="prompt length of the prefill measurement (0: skip; default 512, --quick: 0)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--runs", type=int, default=None, help="timed runs per batch size, median reported (default 3, --quick: 1)")
    p.add_argument("--name", default=None, help="result name (default: llama_decode_<preset>_<quant or dtype>[...])")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    p.add_argument("--quantize", default=None,
                   help="a fastzoo.quant config string (int8, int4-g128, ...) or gptq-g<N> (random calibration)")
    p.add_argument("--gptq-samples", type=int, default=4, help="GPTQ calibration sequences (random tokens)")
    p.add_argument("--gptq-seq-len", type=int, default=512)
    p.add_argument("--kv-cache-dtype", choices=["int8"], default=None)
    p.add_argument("--speculate-k", type=int, default=None, help="speculative decoding at batch 1 with k draft tokens")
    p.add_argument("--draft-quantize", default=None,
                   help="draft = a copy of the float target quantized with this config; "
                        "default: the target itself (acceptance 100%%, measures the overhead)")
    p.add_argument("--spec-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="with --speculate-k: also measure the target's plain decode in the same run")
    p.add_argument("--compile-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the prefill too (with --compile; default on, --quick: off)")
    p.add_argument("--quick", action="store_true",
                   help="one config in a few minutes: batch 1 only, 100 new tokens, 1 timed run, eager prefill, "
                        "no prefill measurement (each unless given explicitly)")
    args = p.parse_args(argv)
    # defaults, or --quick's where an option is not given (None: not given, however spelled)
    for name, full, quick in (("batch_sizes", "1,4,8,16", "1"), ("new_tokens", 200, 100), ("runs", 3, 1),
                              ("prefill_len", 512, 0), ("compile_prefill", True, False)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

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
    if args.speculate_k is not None:
        if args.speculate_k < 1:
            p.error(f"--speculate-k must be >= 1, got {args.speculate_k}")
        if batch_sizes != [1]:
            p.error(f"speculative decoding runs at batch 1; got --batch-sizes {args.batch_sizes}")
    elif args.draft_quantize:
        p.error("--draft-quantize needs --speculate-k")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, stop_ids=(), check_every=0)
    kv_dtype = torch.int8 if args.kv_cache_dtype == "int8" else None

    model = random_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())  # before quantization turns weights into buffers
    figures = {"preset": args.preset, "dtype": str(dtype), "compile": args.compile,
               "compile_prefill": args.compile and args.compile_prefill, "quantize": args.quantize,
               "kv_cache_dtype": args.kv_cache_dtype, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "batches": {}}
    draft = None
    if args.draft_quantize:  # from the float weights, before the target is quantized
        draft = quantize_(copy.deepcopy(model), args.draft_quantize)
    if args.quantize:
        figures.update(quantize_model(model, args.quantize, cfg, device, args))
    weight_bytes = model.weight_bytes()
    print(f"{args.preset}: {n_params / 1e9:.2f} B parameters, "
          f"{weight_bytes / 1e9:.2f} GB in {args.quantize or dtype}, device {harness.gpu_name()}", file=sys.stderr)
    copy_gbs = harness.measure_copy_bandwidth(device=device) if device.type == "cuda" else None
    figures.update(weight_bytes=weight_bytes, copy_bandwidth_gbs=copy_gbs)

    gen = Generator(model, compile=args.compile, kv_cache_dtype=kv_dtype, compile_prefill=args.compile_prefill)
    if args.speculate_k is None or args.spec_baseline:
        label = "baseline " if args.speculate_k else ""
        for B in batch_sizes:
            entry = measure(gen, B, cfg, args, sampling, device, weight_bytes, copy_gbs)
            figures["batches"][str(B)] = entry
            save(figures, args)
            print(_line(label, B, entry, copy_gbs, args.compile), file=sys.stderr)
        b1 = figures["batches"].get("1")
        if b1:
            for B, e in figures["batches"].items():
                e["total_vs_batch1"] = e["total_tokens_per_s"] / b1["total_tokens_per_s"]
            figures["compile_s"] = b1.get("compile_s")

    if args.speculate_k is not None:
        draft = draft if draft is not None else model
        spec = SpeculativeGenerator(model, draft, args.speculate_k, compile=args.compile, kv_cache_dtype=kv_dtype,
                                    compile_prefill=args.compile_prefill)
        spec_sampling = dict(sampling, check_every=1)
        entry = measure(spec, 1, cfg, args, spec_sampling, device, weight_bytes, copy_gbs)
        entry.update(draft_quantize=args.draft_quantize, draft_weight_bytes=draft.weight_bytes())
        if "1" in figures["batches"]:
            entry["speedup_vs_baseline"] = (entry["decode_tokens_per_s_per_seq"]
                                            / figures["batches"]["1"]["decode_tokens_per_s_per_seq"])
        figures["speculative"] = entry
        save(figures, args)
        print(_line(f"speculative k={args.speculate_k} draft {args.draft_quantize or 'self'} ", 1, entry,
                    copy_gbs, args.compile), file=sys.stderr)
        del spec, draft

    if args.prefill_len > 0:  # prefill throughput at batch 1 (a long prompt, bucketed length)
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
