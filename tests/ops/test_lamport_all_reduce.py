"""lamport_all_reduce: the kernel's arithmetic, buffer protocol and errors, with several ranks
simulated in one process (each rank's buffer a tensor here; every rank pushes, then every rank
reduces: the kernel's two phases launched apart).  The concurrent kernel across GPUs is tested
in tests/llama/test_tp.py (2 GPUs)."""
import pytest
import torch

from fastzoo.ops.lamport_all_reduce import (LAMPORT_BLOCK, lamport_all_reduce_ref, lamport_all_reduce_triton,
                                            lamport_sentinel_fill_)

CAPACITY = 2 * LAMPORT_BLOCK
_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


class _Ranks:
    """``world`` simulated ranks: their buffers (sentinel-filled), the address table and counters."""

    def __init__(self, world, dtype, device, capacity=CAPACITY):
        self.world, self.capacity = world, capacity
        self.bufs = [lamport_sentinel_fill_(torch.empty(2 * world * capacity, dtype=dtype, device=device))
                     for _ in range(world)]
        self.ptrs = torch.tensor([b.data_ptr() for b in self.bufs], dtype=torch.int64, device=device)
        self.counters = [torch.zeros(capacity // LAMPORT_BLOCK, dtype=torch.int32, device=device)
                         for _ in range(world)]

    def all_reduce(self, xs, residual=None):
        for r, x in enumerate(xs):
            lamport_all_reduce_triton(x, residual, self.ptrs, self.counters[r], r, self.world, self.capacity,
                                      reduce=False)
        return [lamport_all_reduce_triton(x, residual, self.ptrs, self.counters[r], r, self.world, self.capacity,
                                          push=False) for r, x in enumerate(xs)]

    def clean(self):
        return all(bool((b.view(_INT[b.dtype]) == torch.iinfo(_INT[b.dtype]).min).all()) for b in self.bufs)


def _tolerance(dtype, device):
    # Triton's interpreter rounds fp32 -> bf16 by truncation: one bf16 step; a GPU rounds to nearest
    return dict(rtol=2 ** -7, atol=2 ** -7) if dtype == torch.bfloat16 and device.type == "cpu" else dict(rtol=0, atol=0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_matches_reference_over_calls(kernel_device, world, dtype):
    """Calls of different sizes (odd ones, one element, a partial last block, the full capacity),
    with and without a residual: every rank gets the reference sum, the same bits on every rank,
    and the buffers hold only the sentinel again after each call; -0.0 inputs are summed as 0."""
    torch.manual_seed(world * 10 + len(str(dtype)))
    ranks = _Ranks(world, dtype, kernel_device)
    for call, shape in enumerate([(1, 7), (1, 1, 1500), (CAPACITY,), (1,), (3, 1, 343), (1, 1, 129)]):
        xs = [(torch.randn(shape) * 4).to(dtype).to(kernel_device) for _ in range(world)]
        xs[0].view(-1)[0] = -0.0
        residual = torch.randn(shape).to(dtype).to(kernel_device) if call % 2 else None
        outs = ranks.all_reduce(xs, residual)
        want = lamport_all_reduce_ref(xs, residual)
        for out in outs:
            assert out.shape == want.shape and out.dtype == dtype
            torch.testing.assert_close(out.cpu(), want.cpu(), **_tolerance(dtype, kernel_device))
            assert torch.equal(out.cpu(), outs[0].cpu())
        assert ranks.clean(), f"call {call}: a slot was not cleared"
    # each program flips its half once per call it takes part in: program 0 in all 6 calls,
    # program 1 in the 3 calls of > 1024 elements
    assert ranks.counters[0][0].item() == 0 and ranks.counters[0][1].item() == 1


def test_kernel_keeps_special_values(kernel_device):
    """NaN and infinities pass through (no value but -0.0 looks like the sentinel); -0.0 is
    summed as +0.0 and the result of -0.0 + -0.0 is +0.0 on every rank."""
    ranks = _Ranks(2, torch.float32, kernel_device)
    a = torch.tensor([float("nan"), float("inf"), -0.0, 1.0, -0.0], device=kernel_device)
    b = torch.tensor([1.0, 1.0, -0.0, float("-inf"), 2.0], device=kernel_device)
    for out in ranks.all_reduce([a, b]):
        got = out.cpu()
        assert got[0].isnan() and got[1] == float("inf") and got[3] == float("-inf") and got[4] == 2.0
        assert got[2] == 0 and not got[2].signbit()
    assert ranks.clean()


def test_one_rank_whole_kernel(kernel_device):
    """With one rank the single launch (push, spin, reduce) returns x + residual."""
    ranks = _Ranks(1, torch.float32, kernel_device)
    x, r = torch.randn(2, 700, device=kernel_device), torch.randn(2, 700, device=kernel_device)
    out = lamport_all_reduce_triton(x, r, ranks.ptrs, ranks.counters[0], 0, 1, CAPACITY)
    torch.testing.assert_close(out, x + r, rtol=0, atol=0)
    assert ranks.clean()


def test_reference_is_fp32_sum_rounded_once():
    """1 + 3·2^-10 + 3·2^-10 in fp32 is 0.75 of a bf16 step above 1: rounded once, 1 + 2^-7
    (adding in bf16 step by step would round each partial sum back to 1)."""
    xs = [torch.tensor([1.0, 2 ** -9], dtype=torch.bfloat16), torch.tensor([3 * 2 ** -10, 2 ** -9], dtype=torch.bfloat16)]
    out = lamport_all_reduce_ref(xs, torch.tensor([3 * 2 ** -10, 0.0], dtype=torch.bfloat16))
    assert out.tolist() == [1.0 + 2 ** -7, 2 ** -8]


def test_errors_name_expected_and_found(kernel_device):
    ranks = _Ranks(2, torch.bfloat16, kernel_device)
    x = torch.randn(4, dtype=torch.bfloat16, device=kernel_device)
    with pytest.raises(ValueError, match="expected one of .*got torch.float64"):
        lamport_all_reduce_triton(x.double(), None, ranks.ptrs, ranks.counters[0], 0, 2, CAPACITY)
    with pytest.raises(ValueError, match=f"{CAPACITY + 1} elements for a capacity of {CAPACITY}"):
        lamport_all_reduce_triton(torch.randn(CAPACITY + 1, dtype=torch.bfloat16, device=kernel_device), None,
                                  ranks.ptrs, ranks.counters[0], 0, 2, CAPACITY)
    with pytest.raises(ValueError, match="residual of its shape and dtype"):
        lamport_all_reduce_triton(x, x.float(), ranks.ptrs, ranks.counters[0], 0, 2, CAPACITY)
    with pytest.raises(ValueError, match="contiguous"):
        lamport_all_reduce_triton(torch.randn(4, 2, dtype=torch.bfloat16, device=kernel_device).t(), None,
                                  ranks.ptrs, ranks.counters[0], 0, 2, CAPACITY)
    assert ranks.clean()  # nothing was pushed


_CONCURRENT = r"""
import sys, torch
sys.path.insert(0, {root!r})
from tests.ops.test_lamport_all_reduce import _Ranks
from fastzoo.ops.lamport_all_reduce import lamport_all_reduce_ref, lamport_all_reduce_triton
dev = torch.device("cuda")
torch.manual_seed(0)
for world, dtype in [(2, torch.bfloat16), (4, torch.float32)]:
    ranks = _Ranks(world, dtype, dev, capacity=4096)
    streams = [torch.cuda.Stream() for _ in range(world)]
    for call in range(50):
        n = [4096, 7, 2048, 1, 1500][call % 5]
        xs = [torch.randn(n, device=dev).to(dtype) for _ in range(world)]
        res = torch.randn(n, device=dev).to(dtype) if call % 2 else None
        torch.cuda.synchronize()
        outs = []
        for r in (reversed(range(world)) if call % 3 else range(world)):  # launch orders vary
            with torch.cuda.stream(streams[r]):
                outs.append(lamport_all_reduce_triton(xs[r], res, ranks.ptrs, ranks.counters[r], r, world,
                                                      ranks.capacity))
        torch.cuda.synchronize()
        want = lamport_all_reduce_ref(xs, res)
        assert all(torch.equal(o, want) for o in outs), (world, dtype, call, [(o - want).abs().max() for o in outs])
        assert ranks.clean(), (world, dtype, call)
print("ok")
"""


@pytest.mark.cuda
def test_kernel_concurrent_ranks_on_one_gpu():
    """The whole kernel (push, spin, reduce, clear in one launch) for 2 and 4 simulated ranks on
    one GPU, each rank on its own stream, launched in varying orders so that ranks spin on one
    another, 50 calls of varying sizes: the reference sums, clean buffers.  In a subprocess with a
    time limit: a protocol error would spin for ever."""
    import subprocess
    import sys
    from pathlib import Path
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    root = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", _CONCURRENT.format(root=root)], capture_output=True, text=True,
                       timeout=300, cwd=root)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
