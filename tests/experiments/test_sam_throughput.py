"""experiments.sam_throughput's helpers that run without a GPU."""


def test_kernel_timeline_splits_a_span_into_kernel_and_idle_time():
    from experiments.sam_throughput import kernel_timeline

    # b overlaps c (c inside b), then a gap of 5 us before d; 2 us between a and b
    t = kernel_timeline([(25, 30, "d"), (0, 10, "a"), (15, 18, "c"), (12, 20, "b")], calls=1)
    assert abs(t["span_ms_per_call"] - 0.030) < 1e-12
    assert abs(t["busy_ms_per_call"] - 0.023) < 1e-12 and abs(t["idle_ms_per_call"] - 0.007) < 1e-12
    assert t["gaps_per_call"] == 2
    assert t["longest_gaps"] == [{"us": 5, "after": "b", "before": "d"}, {"us": 2, "after": "a", "before": "b"}]
    halves = kernel_timeline([(0, 10, "a"), (12, 20, "b")], calls=2)
    assert abs(halves["idle_ms_per_call"] - 0.001) < 1e-12 and halves["gaps_per_call"] == 0.5
