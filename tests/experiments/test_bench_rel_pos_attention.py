import pytest

pytest.importorskip("triton")

from experiments.bench_rel_pos_attention import main, parse_tile  # noqa: E402


def test_parse_tile_reads_the_register_cap():
    c = parse_tile("128x16_w4_s3_r168")
    assert (c.kwargs, c.num_warps, c.num_stages, c.maxnreg) == ({"BLOCK_M": 128, "BLOCK_N": 16}, 4, 3, 168)
    assert parse_tile(" 64x32_w8_s2 ").maxnreg is None


@pytest.mark.parametrize("bad", ["64x32", "64x32_w4", "64x32_w4_s3_r", "a64x32_w4_s3"])
def test_a_malformed_tile_is_refused_before_anything_runs(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--tiles", f"64x32_w4_s3,{bad}"])
    assert e.value.code == 2 and "BLOCK_MxBLOCK_N_wWARPS_sSTAGES" in capsys.readouterr().err


@pytest.mark.parametrize("argv,said", [(["--shapes", "vit_b.window,vit_x.global"], "vit_x.global"),
                                       (["--retune", "-1"], "--retune"),
                                       (["--retune", "2", "--tiles", "64x32_w4_s3"], "not together with --tiles")])
def test_bad_shape_names_and_retune_options_are_refused_before_anything_runs(argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err


def test_global_gluon_bench_reads_tiles_and_refuses_malformed_ones(capsys):
    from experiments.bench_rel_pos_global_gluon import main as gluon_main, parse_tile as gluon_tile

    from fastzoo.ops.rel_pos_attention_gluon import MAXNREG

    # no suffix: the kernel's own register cap; r0: none
    assert gluon_tile("2x3") == (2, 3, MAXNREG) and gluon_tile(" 2x2r128 ") == (2, 2, 128)
    assert gluon_tile("2x3r0") == (2, 3, None)
    for bad in ("2y3", "3x3", "2x1"):  # not a tile; rows not dividing 64; one K/V slot
        with pytest.raises(SystemExit) as e:
            gluon_main(["--tiles", f"2x3,{bad}"])
        assert e.value.code == 2 and "ROWSxSTAGES" in capsys.readouterr().err


def test_window_gluon_bench_refuses_bad_heads_and_needs_a_gpu(capsys):
    """Malformed --heads exits 2 before anything runs; without a GPU the run exits 2 naming what it needs."""
    import torch

    from experiments.bench_rel_pos_window_gluon import main as window_main

    with pytest.raises(SystemExit) as e:
        window_main(["--heads", "12,x"])
    assert e.value.code == 2 and "--heads expects comma-separated integers" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            window_main([])
        assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_time_against_tl_fills_the_row_from_its_timings():
    """The shared row builder: errors from err_of, TFLOP/s = flops / ms / 1e9, speedup = tl / gluon."""
    import torch

    from experiments.bench_rel_pos_global_gluon import time_against_tl

    a, b = torch.ones(3), torch.full((3,), 2.0)
    row = time_against_tl({"heads": 1}, lambda: a, lambda: b, lambda out: float(out[0]), 0.5, 1e9, 3, "test")
    assert row["heads"] == 1 and row["err"] == 1.0 and row["tl_err"] == 2.0 and row["ref_err"] == 0.5
    assert row["gluon_ms"] > 0 and row["tl_ms"] > 0
    assert row["gluon_tflops"] == pytest.approx(1e9 / row["gluon_ms"] / 1e9)
    assert row["speedup"] == pytest.approx(row["tl_ms"] / row["gluon_ms"])
