"""fastzoo.ops._common: the autotuner's timing."""
import time

import pytest
import torch

from fastzoo.ops._common import short_bench


@pytest.mark.cuda
def test_short_bench_times_the_gpu_not_the_host():
    """Each call spends 100 µs on the host before a few-µs kernel: short_bench queues the
    timed calls behind a GPU sleep, so it times the kernel, not the host's gap (Triton's
    do_bench, which records the start event and then launches, would time at least the
    gap); the autotuner's quantiles come back in order."""
    x = torch.randn(1 << 16, device="cuda")

    def call():
        t = time.perf_counter()
        while time.perf_counter() - t < 1e-4:
            pass
        x.mul_(1.0)

    q50, q20, q80 = short_bench(call, (0.5, 0.2, 0.8))
    assert 0 < q20 <= q50 <= q80
    assert q50 < 0.05, q50  # ms: the host's gap alone is 0.1 ms
    assert isinstance(short_bench(call, None), float)
