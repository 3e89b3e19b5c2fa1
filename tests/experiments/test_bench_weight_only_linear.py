"""The weight-only linear sweep's summary (pure Python; the sweep itself needs a GPU)."""
from experiments.bench_weight_only_linear import sweep_summary


def _row(shape, kind, us, bn, split):
    cfg = {"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": 512, "SPLIT_K": split, "num_warps": 4, "num_stages": 1}
    return {"shape": shape, "M": 1, "N": 4096, "K": 4096, "kind": kind, "config": cfg, "us": us,
            "GB/s": 33.5e3 / us, "%copy": 1.1e3 / us}


def test_sweep_summary_keeps_the_fastest_per_shape_and_kind():
    rows = [_row("wo", "bf16", 20.0, 8, 1), _row("wo", "bf16", 18.5, 4, 2), _row("wo", "bf16", 25.0, 16, 1),
            _row("wo", "int8", 15.0, 64, 8), _row("w2", "bf16", 36.0, 4, 1)]
    best = sweep_summary(rows)
    assert [(b["shape"], b["kind"]) for b in best] == [("wo", "bf16"), ("wo", "int8"), ("w2", "bf16")]
    wo = best[0]
    assert wo["us"] == 18.5 and wo["config"] == "N4 K512 split2 w4 s1"
    assert wo["median_us"] == 20.0 and wo["slowest_us"] == 25.0 and wo["n_configs"] == 3
    assert best[1]["n_configs"] == 1 and best[1]["median_us"] == best[1]["us"] == 15.0


def test_partial_runs_get_their_own_record_name():
    import argparse

    from experiments.bench_weight_only_linear import _record_name

    def ns(shapes=None, kinds=("bf16", "int8", "int4"), llama3=False):
        return argparse.Namespace(shapes=shapes, kinds=list(kinds), llama3=llama3)

    assert _record_name("weight_only_linear_sweep", ns()) == "weight_only_linear_sweep"
    assert _record_name("weight_only_linear_sweep", ns(llama3=True)) == "weight_only_linear_sweep_llama3"
    assert _record_name("weight_only_linear_sweep", ns(shapes="wqkv,w2")) == "weight_only_linear_sweep_subset"
    assert _record_name("weight_only_linear", ns(kinds=("int8", "int4"))) == "weight_only_linear_subset"


def test_sweep_summary_names_gluon_tiles():
    """The Gluon GEMV's configurations (lower-case keys) are summarised too, with the ring's
    slots and segments a slot (4 slots of 1 and of 2 segments are different tiles)."""
    cfg = {"GLUON": True, "block_n": 128, "warps": 4, "split_k": 8, "stages": 4, "num_warps": 4, "num_stages": 3}
    rows = [{"shape": "wo", "M": 1, "N": 4096, "K": 4096, "kind": "int4gluon_g128", "config": cfg, "us": 5.0,
             "GB/s": 1.0, "%copy": 1.0}]
    assert sweep_summary(rows)[0]["config"] == "N128 split8 w4 ring4x1"
    rows[0]["config"] = dict(cfg, segs=2)
    assert sweep_summary(rows)[0]["config"] == "N128 split8 w4 ring4x2"
