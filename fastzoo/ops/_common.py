"""Helpers shared by the ops: when a Triton kernel applies, and how to launch it.

Nothing here reads environment variables or changes global state.  Kernels run on
CUDA tensors; the tests also run them on CPU tensors under Triton's interpreter,
where autotuning (which needs a GPU to time configurations) is replaced by the
first configuration of the kernel's list.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634  # log2(e): softmax kernels scale scores by it and use exp2


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its last dimension is contiguous (or of size <= 1), else a contiguous copy:
    what kernels that load rows with unit stride need."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton can be imported (Linux wheels of torch ship it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an odd platform
        return False
    return True


# Triton's griddepcontrol.wait / .launch_dependents (programmatic dependent launch), where
# this Triton has them
gdc_wait = gdc_launch_dependents = None
if triton_available():
    try:  # Triton >= 3.3
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:
        gdc_wait = gdc_launch_dependents = None

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_to_f32(w):
        """An int8 tile in fp32 without an int-to-float conversion (I2F issues at 16/clk/SM on
        sm_90, a quarter of the integer ALU rate: it bounds int8 streaming kernels below the
        bandwidth): the byte zero-extended, b = w + 128 (sign bit flipped) placed in the
        mantissa of 2^23, bits(2^23 + b) = 0x4B000000 | b, minus 2^23 + 128. Exact; ~3 ALU ops
        (byte extract, xor/or, fsub) at full rate."""
        b = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080
        return b.to(tl.float32, bitcast=True) - 8388736.0
else:
    int8_to_f32 = None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_kernel_applies(
    *tensors: torch.Tensor,
    dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
    min_capability: tuple[int, int] = (8, 0),
) -> bool:
    """Whether a Triton kernel may run on these tensors.

    All tensors on one CUDA device of at least ``min_capability`` (Ampere by
    default, where bf16 is native), dtypes among ``dtypes``, Triton importable.
    Anything else goes to the op's pure-PyTorch reference.
    """
    if not tensors or not triton_available():
        return False
    dev = tensors[0].device
    if dev.type != "cuda":
        return False
    dtypes = tuple(dtypes)
    for t in tensors:
        if t.device != dev or t.dtype not in dtypes:
            return False
    return _capability(dev.index if dev.index is not None else torch.cuda.current_device()) >= min_capability


def launch(kernel: Any, grid: Callable | tuple, *args: Any, device: torch.device, **kwargs: Any) -> None:
    """Launch an autotuned Triton kernel.

    On CUDA the autotuner picks the configuration (cached per key).  On the CPU
    (Triton's interpreter, used by the tests) there is nothing to time, so the
    first configuration of the kernel's list runs.
    """
    if device.type == "cuda":
        kernel[grid](*args, **kwargs)
        return
    config = kernel.configs[0]
    kernel.fn[grid](*args, **kwargs, **config.kwargs)


_BENCH_CHUNK = 20  # timed calls queued behind one GPU sleep (short_bench)
_BENCH_SLEEP_CYCLES = 8_000_000  # ~4 ms at H100 clocks: time for the host to queue a chunk
_BENCH_MAX_SLEEP_CYCLES = 64_000_000  # the sleep doubles up to this where the host was slower
_BENCH_MAX_CALLS = 100  # timed calls (each after a ~0.1 ms L2 flush) and warm-up calls at most


def short_bench(kernel_call: Callable, quantiles) -> Any:
    """Timing for ``triton.autotune(..., do_bench=short_bench)``: as Triton's ``do_bench``
    (an L2 flush before each timed call, CUDA events, the quantiles the autotuner asks
    for), with 5 ms of warm-up and 25 ms of timed calls (at most 100 of each) instead of
    25 and 100 ms, and with the timed calls queued on the GPU behind a short sleep,
    ``_BENCH_CHUNK`` at a time, so the host's launch latency never falls between a call's
    start and end events. (``do_bench`` records the start event, then launches: where the
    host is slow or busy that gap is most of a 10-40 µs decode kernel's time, and the
    autotuner's choice becomes noise.) Where the GPU has woken before the host finished
    queueing a chunk (an event recorded after the sleep has completed by then), the
    following chunks sleep twice as long."""
    import triton

    driver = triton.runtime.driver.active
    kernel_call()
    torch.cuda.synchronize()
    cache = driver.get_empty_cache_for_benchmark()
    clear = getattr(driver, "clear_cache", None) or (lambda c: c.zero_())

    sleep = [_BENCH_SLEEP_CYCLES]

    def timed(n: int) -> list:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        woke = None
        for i in range(n):
            if i % _BENCH_CHUNK == 0:
                if woke is not None and woke.query() and sleep[0] < _BENCH_MAX_SLEEP_CYCLES:
                    sleep[0] *= 2  # the last chunk's calls were queued after the GPU woke
                torch.cuda._sleep(sleep[0])
                woke = torch.cuda.Event()
                woke.record()
            clear(cache)
            starts[i].record()
            kernel_call()
            ends[i].record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(starts, ends)]

    estimate_ms = max(sum(timed(5)) / 5, 1e-3)
    for _ in range(min(_BENCH_MAX_CALLS, max(1, int(5 / estimate_ms)))):
        kernel_call()
    times = torch.tensor(timed(min(_BENCH_MAX_CALLS, max(1, int(25 / estimate_ms)))), dtype=torch.float)
    if quantiles:
        out = torch.quantile(times, torch.tensor(quantiles, dtype=torch.float)).tolist()
        return out[0] if len(out) == 1 else out
    return times.mean().item()


# Arrival counters of the kernels that reduce their partial results in the same launch
# (split-K decode linears, split decode attention): the last program of a group to arrive
# combines the group's partials and resets its counter to zero.
ARRIVAL_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED_COUNTERS: list[torch.Tensor] = []  # outgrown buffers, kept alive for graphs that captured them


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``n`` arrival counters on ``device``, kept across
    calls and shared by every such kernel: each launch leaves the counters it used at zero,
    and kernels of one stream do not overlap (a kernel launched with programmatic dependent
    launch touches counters only after ``griddepcontrol.wait``). 65536 counters cover every
    Llama shape up to 16 rows; a call that needs more gets a larger buffer (a power of two),
    and the outgrown one is kept, since a captured CUDA graph may still use it."""
    buf = ARRIVAL_COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:  # a CUDA graph may hold its address: never free it
            _RETIRED_COUNTERS.append(buf)
        buf = torch.zeros(max(1 << 16, 1 << (n - 1).bit_length()), dtype=torch.int32, device=device)
        ARRIVAL_COUNTERS[device] = buf
    return buf


def pdl_options(x: torch.Tensor) -> dict:
    """The ``PDL`` kernel flag and launch option of the decode kernels: on Hopper and newer
    GPUs they use programmatic dependent launch: a kernel starts while the previous one
    drains, requests what does not depend on it, and ``griddepcontrol.wait`` orders its
    other reads after that kernel's writes; a kernel that calls
    ``griddepcontrol.launch_dependents`` lets the next one launch as soon as all of its own
    programs have started, so the next grid's programs take the SMs the draining grid
    frees. That hides most of a launch's ramp-up and of the previous kernel's tail between
    the consecutive kernels of a decode step."""
    on = (x.device.type == "cuda" and gdc_wait is not None
          and _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= (9, 0))
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}
