"""Tensor-parallel Llama decode benchmark on random weights of a named preset (no checkpoint).

    torchrun --standalone --nproc-per-node 2 -m experiments.llama_tp --preset llama-2-7b --dtype bf16 \
        [--quantize int8|int4-g128] [--no-compile] [--new-tokens 128]
    torchrun --standalone --nproc-per-node 1 -m experiments.llama_tp ...   # the 1-GPU baseline, same code
    torchrun --standalone --nproc-per-node 2 -m experiments.llama_tp --allreduce-bench   # all-reduce latency

``--allreduce auto|nccl|symm_mem|lamport`` picks the model's all-reduce
(:func:`fastzoo.llama.tp.setup_allreduce_`; symm_mem: torch's one-shot over NVLink peer-to-peer
through symmetric memory; lamport: one kernel, no barrier, the residual added in it); the
record's ``allreduce`` field holds the choice made ("none" with one rank).  ``--profile`` also
records the kernels of the decode steps of one more run on rank 0 (GPU time per step).

Each rank builds only its own shard, directly on its GPU: the model is created on the meta
device and sharded there (:func:`fastzoo.llama.tp.shard_model_`; with one rank that is the
plain model), then each block is allocated on the GPU, filled with random numbers and, with
``--quantize``, quantized before the next block is allocated.  A 70B model never exists on
the host, and the GPU holds at most one block in float beside the quantized shard.  The
replicated tensors (embedding, final norm, output) get the same values on every rank.

Generation runs the library's :class:`fastzoo.llama.generate.Generator` (the path of
``fastzoo.llama.generate``), sampling as gpt-fast's benchmark does (temperature 0.8,
top-k 200, the same seed on every rank) with stop tokens off, so every run decodes exactly
``--new-tokens`` tokens.  With ``--compile`` the decode step is compiled as ``generate``
compiles it (inductor, CUDA graphs); the prefill is compiled only with ``--compile-prefill``
(it doubles the compile time), so by default the time to first token is that of an eager
prefill.  Recorded, from rank 0 (all ranks run in lockstep):

* batch-1 decode tokens/s; bytes one step reads per GPU (the rank's shard) × tokens/s, and
  that as a % of the device-to-device copy bandwidth measured in the same run;
* time to first token, compile time (first run minus a steady run), model set-up time;
* latency of one eager NCCL all-reduce of a ``dim``-sized activation (the decode step runs
  2 × n_layers of them) and of the model's own all-reduce in a CUDA graph (one call; and per
  call in a chain of ``--allreduce-chain`` calls each adding the previous output as residual),
  inductor's count of CUDA-graph skips, peak GPU memory, and whether every rank sampled the
  same tokens.

``--allreduce-bench`` (no model) times one all-reduce of ``--allreduce-kb`` sizes of bf16
(default 8 and 32 KB: one and four tokens of Llama-2-7B's 4096-wide hidden state), NCCL against
symm_mem and lamport: eager calls, one call captured in a CUDA graph and replayed, and a chain
of ``--allreduce-chain`` calls in one graph, each adding the previous output as its residual (as
a decode step's 2 × n_layers all-reduces plus residuals follow each other), per call (median
µs); checks that all give the same sums, and saves ``llama_tp_allreduce_ws<N>.json``.

``--simulate-world N`` (one process, one GPU) runs rank 0's shard of an N-way split with its
blocks' modules made plain (no all-reduce, the residual fused into wo / w2 as on one GPU): the decode step N GPUs would take if communication
were free, the bound of what tensor parallelism can reach (record suffix ``_sim<N>``).  With
``--simulate-allreduce lamport`` each all-reduce is a real one-rank lamport kernel instead (its
own cost in the step, without the NVLink trip; suffix ``_sim<N>_lamport``).

Rank 0 saves ``llama_tp_<preset>_<dtype|quant>_ws<N>_<compile|eager>.json`` under
``experiments/results/<gpu>/``.  ``--summary FILE...`` prints a table of saved records.
Without a GPU only the tiny CPU presets run (gloo), for testing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from experiments import harness
from experiments.llama_decode import fill_random_, random_prompts, sync
from fastzoo.llama.checkpoint import parse_dtype
from fastzoo.llama.config import TINY_PRESETS, LlamaConfig, LlamaError
from fastzoo.llama.generate import Generator, prefill_bucket
from fastzoo.llama.model import Transformer
from fastzoo.llama._allreduce import (all_reduce, setup_lamport, setup_symm_mem, symm_mem_backend,
                                      symm_mem_problem)
from fastzoo.llama.tp import setup_allreduce_, shard_config, shard_model_
from fastzoo.quant import quantize_


def random_tp_model(cfg: LlamaConfig, rank: int, world_size: int, device, dtype, quantize=None,
                    group=None, seed: int = 0, progress: bool = False) -> Transformer:
    """Rank ``rank``'s shard of a random-weight model, built block by block on ``device``."""
    from tqdm import tqdm
    with torch.device("meta"):
        model = Transformer(cfg)
    shard_model_(model, rank, world_size, group)
    model = model.to(dtype)  # still on meta: nothing allocated
    device = torch.device(device)
    replicated = torch.Generator(device=device).manual_seed(seed)  # same on every rank
    sharded = torch.Generator(device=device).manual_seed(seed + 1 + rank)
    for name in ("tok_embeddings", "norm", "output"):
        fill_random_(getattr(model, name), device, replicated)
    if quantize:
        quantize_(model, quantize, filter_fn=lambda m, fqn: fqn == "output")
    for layer in tqdm(model.layers, desc="random weights", unit="block", disable=not progress):
        fill_random_(layer, device, sharded)
        if quantize:
            quantize_(layer, quantize)
    return model.eval()


def _allreduce_us(dim: int, dtype, device, group) -> float:
    x = torch.randn(1, 1, dim, dtype=dtype, device=device)
    t = harness.bench(lambda: dist.all_reduce(x, group=group), warmup=20, rep=200, device=device)
    return t["median_ms"] * 1e3


def _allreduce_call(x, group, symm, residual=None):
    """One all-reduce of ``x`` as the compiled decode step issues it, plus ``residual`` when
    given: the functional NCCL op and its wait (``symm`` None), or the spec's symmetric-memory
    custom op (lamport adds the residual in its kernel, the others in a kernel after)."""
    if symm is not None:
        return lambda: all_reduce(x, group, symm, residual=residual)
    c10d = torch.ops._c10d_functional
    name = str(group.group_name)
    if residual is None:
        return lambda: c10d.wait_tensor(c10d.all_reduce(x, "sum", name))
    return lambda: residual + c10d.wait_tensor(c10d.all_reduce(x, "sum", name))


def _graph_allreduce_us(x, group, symm, device, chain: int = 1) -> float:
    """Median µs per all-reduce of ``x`` (``symm`` set: its symmetric-memory op, else NCCL) in
    CUDA-graph replays: one call (``chain`` 1), or ``chain`` calls each adding the previous
    call's output as its residual, as a decode step's all-reduces follow each other (each call
    waits for the previous; the sums grow linearly, never overflow; the residual add is part of
    what is timed, as in the step)."""
    def calls():
        if chain == 1:
            return _allreduce_call(x, group, symm)()
        y = torch.zeros_like(x)
        for _ in range(chain):
            y = _allreduce_call(x, group, symm, residual=y)()
        return y
    _barrier(device)
    t = harness.bench(calls, warmup=5, rep=100 if chain > 1 else 200, device=device, cuda_graph=True)
    return t["median_ms"] * 1e3 / chain


def allreduce_bench(args, rank, world_size, device):
    """NCCL vs symm_mem vs lamport: latency of one bf16 all-reduce per size, eager, alone in a
    CUDA graph, and in a chain of dependent calls in one graph."""
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    if world_size < 2 or device.type != "cuda":
        sys.exit("error: --allreduce-bench needs >= 2 ranks on CUDA GPUs (torchrun --nproc-per-node 2)")
    group = dist.group.WORLD
    dtype = torch.bfloat16
    problem = symm_mem_problem(device, group)
    if problem is not None:
        sys.exit(f"error: the symm_mem all-reduce is not available: {problem}")
    sizes = [int(kb * 1024) // 2 for kb in args.allreduce_kb]
    max_bytes = max(max(sizes) * 2, 4096)
    specs = {"nccl": None, "symm_mem": setup_symm_mem(group, device, dtype, max_bytes=max_bytes),
             "lamport": setup_lamport(group, device, dtype, max_bytes=max_bytes)}
    rows = []
    for numel in sizes:
        g = torch.Generator(device=device).manual_seed(1000 + rank)
        x = torch.randn(1, numel, dtype=dtype, device=device, generator=g)
        want = x.clone()
        dist.all_reduce(want, group=group)
        row = {"kb": numel * 2 / 1024, "numel": numel, "chain": args.allreduce_chain}
        for name, spec in specs.items():
            got = _allreduce_call(x, group, spec)()
            row[f"{name}_same_sum"] = bool(torch.equal(got, want))
            _barrier(device)
            eager = harness.bench(_allreduce_call(x, group, spec), warmup=20, rep=200, device=device)
            row[f"{name}_eager_us"] = eager["median_ms"] * 1e3
            row[f"{name}_graph_us"] = _graph_allreduce_us(x, group, spec, device)
            row[f"{name}_chain_us"] = _graph_allreduce_us(x, group, spec, device, chain=args.allreduce_chain)
        row["same_sum"] = all(row[f"{n}_same_sum"] for n in specs)
        row["nccl_over_symm_mem_graph"] = row["nccl_graph_us"] / row["symm_mem_graph_us"]
        row["symm_mem_over_lamport_chain"] = row["symm_mem_chain_us"] / row["lamport_chain_us"]
        rows.append(row)
        say(f"all-reduce {row['kb']:g} KB bf16 over {world_size} GPUs, us per call (chain of {args.allreduce_chain} "
            f"in a CUDA graph / one call in a graph / eager): "
            + ", ".join(f"{n} {row[f'{n}_chain_us']:.1f} / {row[f'{n}_graph_us']:.1f} / {row[f'{n}_eager_us']:.1f}"
                        for n in specs)
            + f"; same sums: {row['same_sum']}")
    figures = {"world_size": world_size, "dtype": str(dtype), "symm_mem_backend": symm_mem_backend(device),
               "rows": rows}
    if rank == 0 and not args.no_save:
        path = harness.save_result(args.name or f"llama_tp_allreduce_ws{world_size}", figures, args,
                                   out_dir=args.out_dir)
        say(f"saved {path}")
    return figures


def _result_name(args, world_size: int, allreduce: str = "nccl") -> str:
    # NCCL and one rank keep the names of the records made before the all-reduce choice existed
    return (args.name or f"llama_tp_{args.preset}_{args.quantize or args.dtype}_ws{world_size}_"
            + ("compile" if args.compile else "eager")
            + ("" if allreduce in ("nccl", "none") or getattr(args, "simulate_world", None) else f"_{allreduce}")
            + (f"_sim{args.simulate_world}" if getattr(args, "simulate_world", None) else "")
            + ("_lamport" if getattr(args, "simulate_allreduce", "none") == "lamport" else "")).replace("/", "-")


def summary(paths) -> list[dict]:
    """Rows of the saved records; ``vs_ws1``: tokens/s over the 1-rank record of the same model,
    quantization and compile setting, when one is among ``paths``."""
    recs = []
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        if "decode_tokens_per_s" in r.get("figures", {}):
            recs.append(r["figures"])
    base = {(f["preset"], f["weights"], f["compile"]): f["decode_tokens_per_s"] for f in recs
            if f["world_size"] == 1 and not f.get("simulated_world_size")}
    rows = []
    for f in sorted(recs, key=lambda f: (f["compile"] is False, f["preset"], f["weights"], f["world_size"])):
        b = base.get((f["preset"], f["weights"], f["compile"]))
        sim = f.get("simulated_world_size")
        rows.append({"model": f["preset"], "weights": f["weights"],
                     "gpus": f"1 as {sim} (no comm)" if sim else f["world_size"],
                     "allreduce": f.get("allreduce", "nccl" if f["world_size"] > 1 else "none"),
                     "compile": f["compile"], "tok/s": f["decode_tokens_per_s"],
                     "vs_1gpu": f["decode_tokens_per_s"] / b if b else "",
                     "GB/s/gpu": f["bandwidth_gbs_per_gpu"], "%copy": f.get("pct_of_copy_bandwidth") or "",
                     "TTFT_ms": f["time_to_first_token_ms"], "compile_s": f.get("compile_s", ""),
                     "setup_s": f["setup_s"], "allreduce_us": f.get("allreduce_us") or "",
                     "graph_allreduce_us": f.get("graph_allreduce_us") or "",
                     "cg_skips": f.get("cudagraph_skips", ""),
                     "same_tokens": f.get("same_tokens_on_every_rank", "")})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--quantize", default=None, help="a fastzoo.quant config string: int8, int4-g128, ...")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the decode step (inductor, CUDA graphs on GPUs)")
    p.add_argument("--compile-prefill", action="store_true", help="compile the prefill too")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (CPU tests: aot_eager)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="result name (default: llama_tp_<preset>_<weights>_ws<N>_<mode>)")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--summary", nargs="+", metavar="JSON", help="print a table of saved records and exit")
    p.add_argument("--allreduce", choices=["auto", "nccl", "symm_mem", "lamport"], default="auto",
                   help="the model's all-reduce (fastzoo.llama.tp.setup_allreduce_)")
    p.add_argument("--allreduce-bench", action="store_true",
                   help="only time one bf16 all-reduce, NCCL vs symm_mem vs lamport (no model)")
    p.add_argument("--allreduce-kb", type=float, nargs="+", default=[8, 32],
                   help="message sizes of --allreduce-bench in KB")
    p.add_argument("--allreduce-chain", type=int, default=64,
                   help="--allreduce-bench: dependent all-reduces per CUDA graph (a 32-layer decode step: 64)")
    p.add_argument("--simulate-world", type=int, default=None, metavar="N",
                   help="one GPU, no communication: a plain model whose blocks are one rank's shard of an "
                        "N-way split (local heads and MLP width; embedding and output whole): the decode step "
                        "of N GPUs with free all-reduces, a bound for tensor parallelism")
    p.add_argument("--simulate-allreduce", choices=["none", "lamport"], default="none",
                   help="with --simulate-world: the all-reduces are the identity (none) or a one-rank lamport "
                        "kernel (its own cost in the step, without NVLink)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one more run's decode steps on rank 0 (GPU kernels, time per step)")
    args = p.parse_args(argv)

    if args.summary:
        harness.print_table(summary(args.summary))
        allreduce_rows = []
        for path in args.summary:
            with open(path) as f:
                r = json.load(f)
            if "decode_tokens_per_s" not in r.get("figures", {}):
                allreduce_rows += [{"gpus": r["figures"].get("world_size"), **row}
                                   for row in r.get("figures", {}).get("rows", [])]
        if allreduce_rows:
            print()
            harness.print_table(allreduce_rows)
        return None

    env = os.environ
    world_size, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    cfg = LlamaConfig.from_preset(args.preset)
    if args.simulate_allreduce != "none" and not args.simulate_world:
        sys.exit("error: --simulate-allreduce goes with --simulate-world")
    if args.simulate_world:
        if world_size != 1:
            sys.exit("error: --simulate-world runs in one process (no torchrun, or --nproc-per-node 1)")
        try:
            shard_config(cfg, args.simulate_world)  # raises where the model does not split N ways
        except LlamaError as e:
            sys.exit(f"error: {e}")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            sys.exit(f"error: rank {rank} needs GPU {local_rank}, but only {torch.cuda.device_count()} are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif args.preset.lower() in TINY_PRESETS or args.allreduce_bench:  # the latter: an error below
        device = torch.device("cpu")
    else:
        device = harness.require_cuda(f"the {args.preset} tensor-parallel benchmark")
    if "MASTER_ADDR" in env:  # torchrun, any number of ranks (1 included: the same code path)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=10), device_id=device if device.type == "cuda" else None)
    elif world_size != 1:
        sys.exit("error: launch with torchrun for more than one rank")
    try:
        if args.allreduce_bench:
            return allreduce_bench(args, rank, world_size, device)
        try:
            return _bench(args, cfg, rank, world_size, device)
        except LlamaError as e:  # e.g. --allreduce symm_mem where it is not available
            sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _barrier(device):
    if dist.is_initialized():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def _simulated_allreduce_(model, kind: str, device, dtype, args) -> str:
    """--simulate-world: the shard's all-reduces become the identity plus the residual
    (``"none"``: the plain model's own fused path, wo / w2 adding the residual), or a real
    one-rank lamport kernel (``"lamport"``: the kernel's own cost in the step, without NVLink)."""
    from fastzoo.llama.model import Attention, FeedForward
    from fastzoo.llama.tp import TPAttention, TPFeedForward
    tp = [m for m in model.modules() if isinstance(m, (TPAttention, TPFeedForward))]
    if kind == "none":
        for m in tp:  # the plain modules: no all-reduce, the residual fused into wo / w2
            m.__class__ = Attention if isinstance(m, TPAttention) else FeedForward
        return "none"
    from fastzoo.llama._allreduce import DEFAULT_SYMM_MEM_BYTES, setup_lamport_local
    if device.type != "cuda":
        sys.exit("error: --simulate-allreduce lamport needs a CUDA GPU")
    # the prefill's all-reduces too: batch x the prompt's bucket x dim
    bucket = prefill_bucket(args.prompt_len, model.config.max_position_embeddings)
    spec = setup_lamport_local(device, dtype, max(DEFAULT_SYMM_MEM_BYTES, args.batch * bucket * model.config.dim
                                                  * torch.empty((), dtype=dtype).element_size()))
    for m in tp:
        m.tp_symm = spec
    return "lamport (one rank)"


def _bench(args, cfg, rank, world_size, device):
    from torch._dynamo.utils import counters
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    dtype = parse_dtype(args.dtype)
    group = dist.group.WORLD if dist.is_initialized() else None

    sync(device)
    t0 = time.perf_counter()
    if args.simulate_world:  # rank 0's shard of an N-way split, alone on this GPU
        model = random_tp_model(cfg, 0, args.simulate_world, device, dtype, args.quantize, None, seed=args.seed,
                                progress=True)
        allreduce = _simulated_allreduce_(model, args.simulate_allreduce, device, dtype, args)
    else:
        model = random_tp_model(cfg, rank, world_size, device, dtype, args.quantize, group, seed=args.seed,
                                progress=rank == 0)
        allreduce = setup_allreduce_(model, args.allreduce)  # collective; the same choice on every rank
    sync(device)
    setup_s = time.perf_counter() - t0
    weight_bytes = model.weight_bytes()
    weights = args.quantize or args.dtype
    say(f"{args.preset} {weights} on {world_size} rank(s): {weight_bytes / 1e9:.2f} GB per GPU, "
        f"set up in {setup_s:.1f} s, device {harness.gpu_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"all-reduce: {allreduce}")
    copy_gbs = harness.measure_copy_bandwidth(device=device) if device.type == "cuda" else None
    allreduce_us = _allreduce_us(cfg.dim, dtype, device, group) if world_size > 1 else None
    graph_allreduce_us = graph_allreduce_chain_us = None
    if world_size > 1 and device.type == "cuda":  # the model's own all-reduce, as the decode graph runs it
        symm = model.layers[0].feed_forward.tp_symm
        x = torch.randn(1, 1, cfg.dim, dtype=dtype, device=device)
        graph_allreduce_us = _graph_allreduce_us(x, group, symm, device)
        graph_allreduce_chain_us = _graph_allreduce_us(x, group, symm, device, chain=args.allreduce_chain)

    # eager prefill unless --compile-prefill: halves the compile time (documented above)
    gen = Generator(model, compile=args.compile, compile_backend=args.compile_backend,
                    compile_prefill=args.compile_prefill)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, stop_ids=(), check_every=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run(seed):
        prompts = random_prompts(args.batch, args.prompt_len, cfg.vocab_size, seed=seed)
        torch.manual_seed(args.seed + seed)  # the same sampling on every rank
        _barrier(device)
        t = time.perf_counter()
        res = gen.generate(prompts, args.new_tokens, **sampling)
        return time.perf_counter() - t, res

    first_s, _ = run(0)  # warm-up and compilation
    say(f"first run (compilation included): {first_s:.1f} s")
    runs = [run(1 + r) for r in range(args.runs)]
    steady_s = statistics.median(t for t, _ in runs)
    rate = statistics.median(res.steps / res.decode_s for _, res in runs)
    figures = {
        "preset": args.preset, "dtype": str(dtype), "quantize": args.quantize, "weights": weights,
        "world_size": world_size, "allreduce": allreduce, "simulated_world_size": args.simulate_world,
        "symm_mem_backend": symm_mem_backend(device) if allreduce in ("symm_mem", "lamport") else None,
        "batch": args.batch, "compile": args.compile,
        "compile_prefill": args.compile and args.compile_prefill,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "weight_bytes_per_gpu": weight_bytes, "setup_s": setup_s,
        "copy_bandwidth_gbs": copy_gbs, "allreduce_us": allreduce_us, "graph_allreduce_us": graph_allreduce_us,
        "graph_allreduce_chain_us": graph_allreduce_chain_us,
        "decode_tokens_per_s": rate, "total_tokens_per_s": args.batch * rate,
        "bandwidth_gbs_per_gpu": weight_bytes * rate / 1e9,
        "time_to_first_token_ms": statistics.median(res.prefill_s for _, res in runs) * 1e3,
        "first_run_s": first_s, "steady_run_s": steady_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }
    if args.compile:
        figures["compile_s"] = max(first_s - steady_s, 0.0)
    if args.profile and device.type == "cuda":  # every rank runs (lockstep), rank 0 records its kernels
        from torch.profiler import ProfilerActivity, profile

        from experiments.llama_profile import kernel_rows, print_kernel_rows
        prof = profile(activities=[ProfilerActivity.CUDA]) if rank == 0 else contextlib.nullcontext()
        with prof:
            _, res = run(1 + args.runs)
            sync(device)
        if rank == 0:
            kernel_ms, rows, calls = kernel_rows(prof, res.steps, 30)
            figures["profile"] = {"kernel_ms_per_step": kernel_ms, "kernel_calls_per_step": calls,
                                  "wall_ms_per_step": 1e3 / rate, "rows": rows}
            say(f"profile (rank 0, prefill included): kernels {kernel_ms:.3f} ms/step, {calls:.0f} calls/step; "
                f"wall {1e3 / rate:.3f} ms/step unprofiled")
            print_kernel_rows(rows, kernel_ms, say=say)
    if copy_gbs:
        figures["pct_of_copy_bandwidth"] = 100 * figures["bandwidth_gbs_per_gpu"] / copy_gbs
    if world_size > 1:  # every rank's rate (they run in lockstep: should agree) and tokens
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (rate, runs[-1][1].tokens), group=group)
        figures["decode_tokens_per_s_per_rank"] = [r for r, _ in gathered]
        figures["same_tokens_on_every_rank"] = all(t == gathered[0][1] for _, t in gathered)
    say(f"decode: {rate:.1f} tokens/s (batch {args.batch}), {figures['bandwidth_gbs_per_gpu']:.0f} GB/s per GPU"
        + (f" = {figures['pct_of_copy_bandwidth']:.0f}% of copy {copy_gbs:.0f} GB/s" if copy_gbs else "")
        + f", TTFT {figures['time_to_first_token_ms']:.1f} ms"
        + (f", compile {figures['compile_s']:.1f} s" if args.compile else "")
        + (f", NCCL all-reduce {allreduce_us:.1f} us (eager)" if allreduce_us else "")
        + (f", {allreduce} all-reduce {graph_allreduce_us:.1f} us (CUDA graph; {graph_allreduce_chain_us:.1f} us "
           f"a call in a chain of {args.allreduce_chain} with residuals)" if graph_allreduce_us else "")
        + f", CUDA-graph skips {figures['cudagraph_skips']}")
    if rank == 0 and not args.no_save:
        path = harness.save_result(_result_name(args, world_size, allreduce), figures, args, out_dir=args.out_dir)
        say(f"saved {path}")
    return figures


if __name__ == "__main__":
    main()
