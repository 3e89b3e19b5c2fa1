"""experiments.reproduce: the configuration table and its runner, on tiny fake benchmarks."""
import json
import textwrap
import time

import pytest

from experiments import harness, reproduce
from experiments.reproduce import CONFIGS, Config, Runner, select

FAKES = {
    # writes one record through the harness, as every benchmark does
    "fake_ok": """
        import argparse
        from experiments import harness
        p = argparse.ArgumentParser()
        p.add_argument("--img-s", type=float, required=True)
        args = p.parse_args()
        harness.save_result("fake_ok", {"rows": [{"technique": "baseline", "img_s": args.img_s / 2},
                                                  {"technique": "fast", "img_s": args.img_s}]}, args)
    """,
    "fake_fail": """
        import sys
        from experiments import harness
        print("loading the model ...")
        harness.save_result("fake_fail", {"partial": 1})  # written before the crash: not a finished run
        print("RuntimeError: out of memory in fake_fail", file=sys.stderr)
        sys.exit(3)
    """,
    "fake_slow": """
        import time
        time.sleep(60)
    """,
    "fake_two": """
        from experiments import harness
        harness.save_result("a", {"x": 1})
        harness.save_result("b", {"x": 2})
    """,
}


@pytest.fixture
def fakes(tmp_path):
    folder = tmp_path / "fakes"
    folder.mkdir()
    for name, src in FAKES.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(src))
    return folder


def runner(out, fakes, **kw):
    return Runner(out, search_paths=(harness.REPO_ROOT, fakes), progress=False, gpu_count=0, **kw)


@pytest.mark.slow
def test_runner_records_resumes_and_reruns(tmp_path, fakes):
    """One run of every outcome (each configuration is a fresh Python process: ~5 s apiece)."""
    out = tmp_path / "out"
    configs = [
        Config("ok", "sam", "fake_ok", ("--img-s", "12.5")),
        Config("fail", "sam", "fake_fail"),
        Config("slow", "vit", "fake_slow", timeout_s=3),
        Config("two", "ops", "fake_two"),
        Config("missing", "llama", "fake_not_in_tree"),
        Config("tp", "llama", "fake_ok", ("--img-s", "1"), nproc=2),
    ]
    outcomes = runner(out, fakes).run(configs)
    assert outcomes == {"ok": "ok", "fail": "failed", "slow": "failed", "two": "failed",
                        "missing": "skipped", "tp": "skipped"}

    rec = json.loads((out / "ok.json").read_text())
    assert rec["config"] == "ok" and rec["model"] == "sam" and rec["module"] == "fake_ok"
    assert rec["name"] == "fake_ok" and rec["command"] == "python -m fake_ok --img-s 12.5"
    assert rec["args"] == {"img_s": 12.5}
    assert rec["figures"]["rows"][1] == {"technique": "fast", "img_s": 12.5}
    for key in ("gpu", "torch", "commit", "date", "ceilings", "pct_of_ceiling"):
        assert key in rec
    assert "fake_ok" in (out / "logs" / "ok.log").read_text()

    failures = json.loads((out / "failures.json").read_text())
    assert set(failures) == {"fail", "slow", "two"}
    assert failures["fail"]["returncode"] == 3 and failures["fail"]["reason"] == "exited with status 3"
    assert "out of memory in fake_fail" in failures["fail"]["log_tail"]
    assert failures["fail"]["command"] == "python -m fake_fail"
    assert failures["fail"]["partial_records"] == [".staging/fail/fake_fail.json"]
    assert not (out / "fail.json").exists()  # a partial record never counts as done
    assert failures["slow"]["reason"] == "timed out after 3 s" and failures["slow"]["returncode"] != 0
    assert "wrote 2 records" in failures["two"]["reason"]

    skipped = json.loads((out / "skipped.json").read_text())
    assert set(skipped) == {"missing", "tp"}
    assert "not in this tree" in skipped["missing"]["reason"]
    assert skipped["tp"]["reason"] == "needs 2 GPUs, 0 visible"

    # resume: a finished configuration starts no process; a fixed one clears its failure
    first = (out / "ok.json").read_text()
    t0 = time.monotonic()
    assert runner(out, fakes).run(configs[:1]) == {"ok": "done"}
    assert time.monotonic() - t0 < 1 and (out / "ok.json").read_text() == first
    assert runner(out, fakes).run([Config("fail", "sam", "fake_ok", ("--img-s", "1"))]) == {"fail": "ok"}
    assert set(json.loads((out / "failures.json").read_text())) == {"slow", "two"}
    # --force runs a finished configuration again
    assert runner(out, fakes, force=True).run(configs[:1]) == {"ok": "ok"}
    assert json.loads((out / "ok.json").read_text())["date"] >= json.loads(first)["date"]


def test_budget_stops_launching(tmp_path, fakes):
    out = tmp_path / "out"
    r = runner(out, fakes, budget_s=0.0)
    assert r.run([Config("ok", "sam", "fake_ok", ("--img-s", "1"))]) == {"ok": "skipped"}
    assert "budget" in json.loads((out / "skipped.json").read_text())["ok"]["reason"]
    assert not (out / "logs").exists()


def test_table_names_unique_and_sets():
    assert len({c.name for c in CONFIGS}) == len(CONFIGS)
    quick = select(CONFIGS, quick=True)
    assert quick[0].name == "ceilings"
    assert {c.model for c in quick[1:]} == {"llama", "sam", "vit"}  # every model
    assert len(quick) <= 6  # a short set: it must fit one 10-minute GPU call (8.3 min measured on an H100)
    full = select(CONFIGS, quick=False, models=["llama"])
    assert full[0].name == "ceilings" and {c.model for c in full[1:]} == {"llama"} and len(full) > 2
    assert not any(c in full for c in quick[1:])
    assert [c.name for c in select(CONFIGS, quick=False, only=["vit_quick"])] == ["ceilings", "vit_quick"]
    with pytest.raises(ValueError, match="unknown configuration"):
        select(CONFIGS, quick=False, only=["nope"])
    for c in CONFIGS:
        assert c.module.startswith("experiments.") and c.model in (*reproduce.MODELS, "device")


def test_cli_list_and_errors(capsys):
    assert reproduce.main(["--quick", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("ceilings") and "python -m experiments.vit_throughput --quick" in out
    with pytest.raises(SystemExit):
        reproduce.main(["--models", "gpt"])
    assert "unknown ['gpt']" in capsys.readouterr().err
