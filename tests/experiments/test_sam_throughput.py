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


def test_idle_gaps_gives_each_gap_its_bounds_and_neighbours():
    from experiments.sam_throughput import idle_gaps

    busy, gaps = idle_gaps([(0, 10, "a"), (12, 20, "b"), (15, 18, "c"), (25, 30, "d")])
    assert busy == 23
    assert gaps == [(5, 20, 25, "b", "d"), (2, 10, 12, "a", "b")]


def test_sam_gaps_checks_its_config_and_needs_a_gpu(capsys):
    import pytest
    import torch

    from experiments import sam_gaps

    for bad, said in ((["--config", "fz-bogus"], "fz-bogus"), (["--config", "fz-eager+cg"], "fz-eager+cg"),
                      (["--model", "vit_x"], "vit_x"), (["--gaps", "0"], "at least 1")):
        with pytest.raises(SystemExit) as e:
            sam_gaps.main(bad)
        assert e.value.code == 2 and said in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            sam_gaps.main(["--config", "fz-int8static+cg"])
        assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_config_error_names_the_benchmark_configurations():
    from experiments.sam_throughput import ALL_CONFIGS, config_error

    assert all(config_error(c) is None for c in ALL_CONFIGS)
    assert config_error("fz-int8static+cg") is None and config_error("fz-compile+cg") is None
    for bad in ("fz-bogus", "sa-eager+cg", "fz-eager+cg", "fz-compile-max+cg", "fz-ref-eager+cg"):
        assert bad in config_error(bad)
