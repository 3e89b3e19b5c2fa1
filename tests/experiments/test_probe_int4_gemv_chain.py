"""The int4 GEMV chain probe's sets (pure Python; the chain itself needs a Hopper GPU)."""
import pytest

from experiments import probe_int4_gemv_chain as chain


def test_sets_change_only_their_shapes_keys():
    base = chain.configs({})
    assert base == chain.BASE and base is not chain.BASE
    every = chain.configs(chain.SETS["ring4x1"])
    assert all(every[n] == {**chain.BASE[n], "stages": 4, "segs": 1} for n in chain.BASE)
    one = chain.configs(chain.SETS["r64 w13"])
    assert one["w13"]["block_n"] == 64 and one["w13"]["warps"] == 8 and one["w13"]["par"] == 2
    assert all(one[n] == chain.BASE[n] for n in chain.BASE if n != "w13")
    # every set's tile is one the launcher takes: one row block of a segment a warp at most with par
    for changes in chain.SETS.values():
        for cfg in chain.configs(changes).values():
            assert cfg["block_n"] * cfg.get("par", 1) % (16 * cfg["warps"]) == 0
            assert cfg.get("par", 1) == 1 or cfg["block_n"] <= 16 * cfg["warps"]


@pytest.mark.parametrize("argv,said", [(["--sets", "base,nope"], "--sets takes names of base, ring4x1"),
                                       (["--sets", "ring4x1"], "--sets takes names of base, ring4x1"),
                                       (["--rounds", "0"], "--rounds must be at least 1, got 0")])
def test_unknown_sets_no_base_or_no_rounds_are_refused(argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        chain.main(argv)
    assert e.value.code == 2
    assert said in capsys.readouterr().err
