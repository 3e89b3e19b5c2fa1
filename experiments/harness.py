"""The benchmark harness every fastzoo benchmark uses.

- ``bench``: CUDA-event timing after warm-up, median of repeats, optional rotation
  over several input sets so that caches do not flatter the numbers (host clock
  with a synchronize on the CPU).
- ``peak_memory``: peak device memory of one call.
- ``measure_copy_bandwidth`` / ``measure_matmul_tflops``: the device's ceilings,
  so results can be given as a percentage of what the card does.
- ``save_result``: one JSON record per benchmark with GPU name, versions, git
  commit, command line, producing module, date and the figures, under
  ``experiments/results/<gpu>/`` (or the folder of an enclosing ``redirect_results``).
- ``require_cuda``: GPU-only benchmarks exit with status 2 and a message on a
  machine without one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "experiments" / "results"


def require_cuda(what: str) -> torch.device:
    """Return the CUDA device, or exit with status 2 saying that ``what`` needs one."""
    if not torch.cuda.is_available():
        print(f"error: {what} needs a CUDA GPU, and none is visible to PyTorch "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}).", file=sys.stderr)
        raise SystemExit(2)
    return torch.device("cuda")


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    fn: Callable[..., Any],
    inputs: Sequence[Any] | None = None,
    warmup: int = 10,
    rep: int = 50,
    device: torch.device | str | None = None,
    cuda_graph: bool = False,
) -> dict[str, float]:
    """Time ``fn()`` (or ``fn(inputs[i % len(inputs)])``) and return median and spread in ms.

    On CUDA each call is bracketed by events (recorded back to back, read after one
    final synchronize); on the CPU by the host clock. ``warmup`` calls run first and
    are not timed. ``cuda_graph=True`` captures each call (one graph per input set)
    after the warm-up and times graph replays: the device time of the work without the
    host's launch overhead, as in a CUDA-graph-captured decode step.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)

    def call(i: int) -> Any:
        return fn(inputs[i % len(inputs)]) if inputs else fn()

    for i in range(warmup):
        call(i)
    _sync(device)
    if cuda_graph and device.type == "cuda":
        graphs = []
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for i in range(len(inputs) if inputs else 1):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=stream):
                    call(i)
                graphs.append(g)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        return bench(lambda g: g.replay(), inputs=graphs, warmup=3, rep=rep, device=device)
    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for i in range(rep):
            starts[i].record()
            call(i)
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(rep):
            t0 = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[int(0.1 * (len(times) - 1))],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "min_ms": times[0],
        "n": len(times),
    }


def host_profile(fn: Callable[[], Any], calls: int, sort: str = "cumulative", lines: int = 28) -> str:
    """cProfile's table of ``calls`` calls of ``fn`` (host time: the GPU work is only launched),
    sorted by ``sort``, its first ``lines`` functions."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats(sort).print_stats(lines)
    return buf.getvalue()


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cuda") -> int:
    """Peak bytes allocated on the device during one call of ``fn`` (0 on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def measure_copy_bandwidth(nbytes: int = 1 << 30, device: torch.device | str = "cuda") -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    n = nbytes // 4
    srcs = [torch.randn(n, device=device) for _ in range(2)]
    dst = torch.empty_like(srcs[0])
    t = bench(lambda s: dst.copy_(s), inputs=srcs, warmup=5, rep=20, device=device)
    return 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9


def measure_matmul_tflops(dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                          device: torch.device | str = "cuda") -> float:
    """Dense matmul rate (TFLOP/s, or TOP/s for int8) of ``size``³ on random data.

    int8 uses ``torch._int_mm`` with a column-major second operand (its fast layout).
    """
    device = torch.device(device)
    if dtype == torch.int8:
        a = torch.randint(-128, 127, (size, size), dtype=torch.int8, device=device)
        b = torch.randint(-128, 127, (size, size), dtype=torch.int8, device=device).t()
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        fn = lambda: torch.mm(a, b)  # noqa: E731
    t = bench(fn, warmup=5, rep=20, device=device)
    return 2 * size**3 / (t["median_ms"] * 1e-3) / 1e12


def gpu_name(device: torch.device | str | None = None) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def gpu_slug(name: str | None = None) -> str:
    """Folder name for a device: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    name = (name or gpu_name()).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip()
        if not re.fullmatch(r"[0-9a-f]{40}", commit):  # not a git checkout (e.g. a copied tree)
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info() -> dict[str, Any]:
    import fastzoo

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info: dict[str, Any] = {
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fastzoo": fastzoo.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "module": _main_module(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def _main_module() -> str | None:
    """The module run as ``python -m <module>`` (None for a script or an interactive session)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None)


_redirected: list[Path] = []  # folders of the enclosing ``redirect_results`` blocks, innermost last


@contextlib.contextmanager
def redirect_results(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Within the block, ``save_result`` calls without an ``out_dir`` write into ``out_dir``.

    ``experiments.run_config`` uses it to send an unmodified benchmark's records to the
    folder ``experiments.reproduce`` gives it; the previous folder comes back on exit.
    """
    folder = Path(out_dir)
    _redirected.append(folder)
    try:
        yield folder
    finally:
        _redirected.pop()


def results_dir(out_dir: str | os.PathLike | None = None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    return _redirected[-1] if _redirected else RESULTS_DIR / gpu_slug()


def save_result(name: str, figures: dict[str, Any], args: Any = None,
                out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``{env..., "name", "args", "figures"}`` to ``<results>/<gpu>/<name>.json`` atomically."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"result name must be letters, digits, '.', '_' or '-', got {name!r}")
    record = {"name": name, **env_info(),
              "args": vars(args) if hasattr(args, "__dict__") else args,
              "figures": figures}
    return write_record(record, results_dir(out_dir))


def write_record(record: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Write ``record`` to ``folder/<record["name"]>.json`` atomically (nothing half-written)."""
    name = record["name"]
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"result name must be letters, digits, '.', '_' or '-', got {name!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")
    os.replace(f.name, path)
    return path


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB (float64; inf if equal)."""
    ref = ref.double()
    noise = (out.double() - ref).norm()
    return float(20 * torch.log10(ref.norm() / noise)) if noise > 0 else float("inf")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def speedup(baseline_ms: float, fast_ms: float) -> float:
    return baseline_ms / fast_ms if fast_ms > 0 else float("nan")


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print rows of dicts as an aligned text table (floats to 3 significant figures)."""
    if not rows:
        return
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
